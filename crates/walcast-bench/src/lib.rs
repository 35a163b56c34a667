//! Load generators and benchmarks for walcast.
