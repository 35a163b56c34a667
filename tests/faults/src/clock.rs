//! The wall clock shared with the Node subscribers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall clock in ms since the epoch: the same clock the Node subscribers stamp their lines
/// with, so a commit time and a receive time can be subtracted.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
