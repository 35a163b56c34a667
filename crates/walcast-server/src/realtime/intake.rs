//! Intake: a new socket's first join runs on a runtime of its own, whose threads the kernel
//! runs after everything else in the process (a raised nice value), so a reconnect storm
//! cannot hold back sockets that are already live.
//!
//! ```text
//!  serving runtime (nice 0): accept, HTTP upgrade, every socket's I/O readiness, the pump,
//!  │                         pooled database connections, established sockets
//!  │  upgraded socket
//!  ▼
//!  intake runtime (nice --intake-nice): the socket task until its first join is live
//!  │                                     (or INTAKE_LIMIT has passed)
//!  │  the same task's state, moved with Handle::spawn
//!  ▼
//!  serving runtime: the socket task for the rest of its life
//! ```
//!
//! Why: tokio's run queue is first in, first out with no priorities. When 10,000 sockets
//! send their joins at once, one runtime wakes 10,000 tasks and an established socket's
//! heartbeat waits behind all of them (BENCHMARKS.md, "Reconnect storm"). With two runtimes
//! the ordering is the kernel's: a serving thread woken by a heartbeat preempts an intake
//! thread busy with joins.
//!
//! Invariants:
//! - Every I/O resource is registered with the serving runtime's driver (sockets are
//!   accepted there), so their readiness is noticed at full priority even mid-storm; the
//!   intake threads only run tasks.
//! - Anything that outlives the socket task that started it (pooled database connections'
//!   drivers, the catalog cache's look-ups, the private check batcher) is spawned with
//!   [`spawn_serving`], never left on the intake runtime.
//! - A socket moves at most once, intake → serving, between two turns of its loop.

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// Longest a socket stays on the intake runtime without a live channel. A socket that has
/// not joined anything by then moves anyway: its later traffic is that of an established
/// socket. Long enough that sockets opened during a storm's connect phase (10,000 take
/// seconds on a loaded box) still make their first join there.
pub const INTAKE_LIMIT: Duration = Duration::from_secs(30);

thread_local! {
    /// On the intake runtime's threads: the serving runtime.
    static SERVING: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// The intake runtime; dropped (without blocking) by [`Intake::shutdown`].
pub struct Intake {
    runtime: Option<Runtime>,
}

impl Intake {
    /// Start `threads` intake threads, `nice` steps below the calling thread's priority
    /// (nice values are per thread on Linux), handing sockets on to the current (serving)
    /// runtime.
    pub fn start(threads: usize, nice: i32) -> std::io::Result<Intake> {
        let serving = Handle::current();
        let base = rustix::process::getpriority_process(None).unwrap_or(0);
        let target = base.saturating_add(nice.max(0)).min(19);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("walcast-intake")
            .enable_all()
            .on_thread_start(move || {
                SERVING.with(|s| *s.borrow_mut() = Some(serving.clone()));
                lower_this_thread(target);
            })
            .build()?;
        Ok(Intake {
            runtime: Some(runtime),
        })
    }

    /// Where new sockets start.
    pub fn handle(&self) -> Option<Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Stop the intake threads without waiting for them (callable from async code, where
    /// dropping a runtime would panic). Sockets still on it are dropped.
    pub fn shutdown(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The serving runtime, when called on an intake thread; `None` elsewhere.
pub fn serving() -> Option<Handle> {
    SERVING.with(|s| s.borrow().clone())
}

/// Spawn `fut` on the serving runtime: the current runtime, unless this is an intake thread.
/// For tasks that outlive the socket that caused them (they would otherwise run at the
/// intake's priority for as long as they live).
pub fn spawn_serving<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match serving() {
        Some(h) => h.spawn(fut),
        None => tokio::spawn(fut),
    }
}

/// Give the calling thread the nice value `nice` (on Linux `setpriority(PRIO_PROCESS, 0)`
/// applies to the calling thread only). Lowering one's priority needs no privilege; should
/// it fail anyway, the intake still separates the run queues, so it is only logged.
fn lower_this_thread(nice: i32) {
    if rustix::process::getpriority_process(None).is_ok_and(|n| n >= nice) {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(error = %e, nice, "cannot lower the intake thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Intake threads run at the nice value asked for, know the serving runtime, and tasks
    /// they hand on with `spawn_serving` run on the serving runtime's threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn intake_threads_are_lowered_and_hand_on_to_the_serving_runtime() {
        assert!(
            serving().is_none(),
            "the test runtime is not an intake runtime"
        );
        let base = rustix::process::getpriority_process(None).expect("getpriority");
        let intake = Intake::start(1, 7).expect("intake runtime");
        let handle = intake.handle().expect("running");
        let (nice, thread, served_on) = handle
            .spawn(async {
                let nice = rustix::process::getpriority_process(None).expect("getpriority");
                let thread = std::thread::current().name().map(str::to_string);
                let served_on = spawn_serving(async {
                    (
                        std::thread::current().name().map(str::to_string),
                        serving().is_some(),
                    )
                })
                .await
                .expect("served task");
                (nice, thread, served_on)
            })
            .await
            .expect("intake task");
        assert_eq!(nice, (base + 7).min(19));
        assert_eq!(thread.as_deref(), Some("walcast-intake"));
        assert_ne!(served_on.0.as_deref(), Some("walcast-intake"));
        assert!(!served_on.1, "spawn_serving ran on an intake thread");
        intake.shutdown();
    }
}
