//! The walcast server library.

pub mod auth;
