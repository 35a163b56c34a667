//! Rate limits: one fixed-window counter type for every limit walcast enforces (joins per
//! socket, per client and server-wide; broadcast and presence pushes per channel; REST
//! broadcasts per client and server-wide).
//!
//! ```text
//!  RateWindow { start, used }        one counter, owned by whoever it limits (a channel, a socket)
//!  SharedWindow(Mutex<RateWindow>)   one counter shared by every task (server-wide ceilings)
//!  KeyedWindows(Mutex<HashMap>)      one counter per client key (token `sub`, else address)
//!
//!  Limited::check(now): client share first, then the server-wide ceiling
//!    over the client's share ─▶ Client   (that client alone is refused)
//!    over the ceiling ─────────▶ Server   (everyone is refused until the window turns)
//! ```
//!
//! Invariants:
//! - The clock is passed in: nothing here reads time or sleeps, so every rule is unit-tested.
//! - Units refused for a client's share are never taken from the server-wide budget, so one
//!   client can use at most its own share of the ceiling, never everyone's.
//! - Keyed counters are pruned once their window is over, so the map holds at most the
//!   clients seen in the last window (plus one sweep's worth).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most `limit` units per `window`, counted from the first unit of the window.
#[derive(Debug, Clone, Copy)]
pub struct RateWindow {
    start: Instant,
    used: u32,
}

impl RateWindow {
    pub fn new(now: Instant) -> RateWindow {
        RateWindow {
            start: now,
            used: 0,
        }
    }

    /// Take `n` units if they fit under `limit` in the window that contains `now`.
    pub fn try_take(&mut self, now: Instant, window: Duration, n: u32, limit: u32) -> bool {
        if now.saturating_duration_since(self.start) >= window {
            self.start = now;
            self.used = 0;
        }
        match self.used.checked_add(n) {
            Some(total) if total <= limit => {
                self.used = total;
                true
            }
            _ => false,
        }
    }

    /// Whether the window that contained the last unit is over at `now`.
    fn expired(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.start) >= window
    }
}

/// A [`RateWindow`] shared between tasks.
#[derive(Debug)]
pub struct SharedWindow(Mutex<RateWindow>);

impl SharedWindow {
    pub fn new(now: Instant) -> SharedWindow {
        SharedWindow(Mutex::new(RateWindow::new(now)))
    }

    pub fn try_take(&self, now: Instant, window: Duration, n: u32, limit: u32) -> bool {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.try_take(now, window, n, limit)
    }
}

/// One [`RateWindow`] per client key.
#[derive(Debug, Default)]
pub struct KeyedWindows {
    windows: Mutex<HashMap<Arc<str>, RateWindow>>,
}

/// Sweep expired keys once the map holds this many.
const SWEEP_AT: usize = 4096;

impl KeyedWindows {
    pub fn try_take(
        &self,
        key: &Arc<str>,
        now: Instant,
        window: Duration,
        n: u32,
        limit: u32,
    ) -> bool {
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SWEEP_AT && !map.contains_key(key) {
            map.retain(|_, w| !w.expired(now, window));
        }
        map.entry(key.clone())
            .or_insert_with(|| RateWindow::new(now))
            .try_take(now, window, n, limit)
    }

    /// Number of keys held (tests).
    pub fn len(&self) -> usize {
        self.windows.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client used up its own share.
    Client,
    /// The server-wide ceiling is reached.
    Server,
}

/// A per-client share under a server-wide ceiling, per second.
#[derive(Debug)]
pub struct Limited {
    per_client: u32,
    ceiling: u32,
    clients: KeyedWindows,
    server: SharedWindow,
}

const SECOND: Duration = Duration::from_secs(1);

impl Limited {
    pub fn new(per_client: u32, ceiling: u32, now: Instant) -> Limited {
        Limited {
            per_client: per_client.max(1),
            ceiling: ceiling.max(1),
            clients: KeyedWindows::default(),
            server: SharedWindow::new(now),
        }
    }

    pub fn per_client(&self) -> u32 {
        self.per_client
    }

    /// Take `n` units for `client`: its share first, then the ceiling.
    pub fn check(&self, client: &Arc<str>, now: Instant, n: u32) -> Result<(), Refused> {
        if !self
            .clients
            .try_take(client, now, SECOND, n, self.per_client)
        {
            return Err(Refused::Client);
        }
        if !self.server.try_take(now, SECOND, n, self.ceiling) {
            return Err(Refused::Server);
        }
        Ok(())
    }
}

/// The key a client's shares are counted under: its token's `sub`, else its address.
pub fn client_key(sub: Option<&str>, addr: Option<std::net::IpAddr>) -> Arc<str> {
    match (sub.filter(|s| !s.is_empty()), addr) {
        (Some(sub), _) => Arc::from(format!("sub:{sub}")),
        (None, Some(ip)) => Arc::from(format!("ip:{ip}")),
        (None, None) => Arc::from("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_and_turns() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(t0);
        let s = Duration::from_secs(1);
        assert!(w.try_take(t0, s, 3, 5));
        assert!(!w.try_take(t0, s, 3, 5));
        assert!(w.try_take(t0 + Duration::from_millis(999), s, 2, 5));
        assert!(!w.try_take(t0 + Duration::from_millis(999), s, 1, 5));
        assert!(w.try_take(t0 + s, s, 5, 5));
        assert!(
            !w.try_take(t0 + s, s, u32::MAX, u32::MAX),
            "overflow is refused"
        );
    }

    #[test]
    fn one_client_cannot_use_up_the_ceiling() {
        let t0 = Instant::now();
        let l = Limited::new(10, 25, t0);
        let greedy: Arc<str> = Arc::from("ip:10.0.0.1");
        let other: Arc<str> = Arc::from("sub:alice");
        for _ in 0..10 {
            assert_eq!(l.check(&greedy, t0, 1), Ok(()));
        }
        // Thousands more from the greedy client are refused at its share...
        for _ in 0..3000 {
            assert_eq!(l.check(&greedy, t0, 1), Err(Refused::Client));
        }
        // ...and cost the others nothing.
        assert_eq!(l.check(&other, t0, 10), Ok(()));
        // The ceiling still holds across clients.
        let third: Arc<str> = Arc::from("sub:bob");
        assert_eq!(l.check(&third, t0, 5), Ok(()));
        assert_eq!(l.check(&third, t0, 1), Err(Refused::Server));
        // Next second: fresh budgets.
        assert_eq!(l.check(&greedy, t0 + SECOND, 10), Ok(()));
    }

    #[test]
    fn keyed_windows_are_swept() {
        let t0 = Instant::now();
        let k = KeyedWindows::default();
        for i in 0..SWEEP_AT {
            let key: Arc<str> = Arc::from(format!("ip:{i}"));
            assert!(k.try_take(&key, t0, SECOND, 1, 1));
        }
        assert_eq!(k.len(), SWEEP_AT);
        let late: Arc<str> = Arc::from("ip:late");
        assert!(k.try_take(&late, t0 + SECOND, SECOND, 1, 1));
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn client_keys_prefer_sub() {
        let ip = "127.0.0.1".parse().ok();
        assert_eq!(&*client_key(Some("u1"), ip), "sub:u1");
        assert_eq!(&*client_key(Some(""), ip), "ip:127.0.0.1");
        assert_eq!(&*client_key(None, None), "unknown");
    }
}
