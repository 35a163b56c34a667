//! The walcast server library.
