//! The suite's environment knobs (documented in tests/faults/README.md) and letting load run.

use std::time::Duration;

/// An unsigned knob from the environment.
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// `knob` in seconds.
pub fn knob_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(knob(name, default))
}

/// Sleep to let load run (never used as an assertion).
pub async fn let_run(d: Duration) {
    tokio::time::sleep(d).await;
}
