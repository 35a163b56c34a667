//! Scenarios 1-5: the replication stream is broken from outside (Postgres restarts, the
//! walsender is killed, the network stalls or is cut) while rows are written; every committed
//! row must still reach every subscriber, in order, with `/readyz` telling the truth.

use std::time::Duration;

use walcast_faults::knobs::{knob, knob_secs, let_run};
use walcast_faults::{Expect, Options, Scenario};
use walcast_testkit::StopMode;

/// How long the database or the network stays down in the restart and cut scenarios.
fn down() -> Duration {
    knob_secs("FAULTS_DOWN_SECS", 3)
}

async fn restart(name: &str, mode: StopMode, label: &str) {
    let held = down();
    // FAULTS_DOWN_SECS=0: the literal `pg_ctl restart`, too short to probe the outage.
    let fault = if held.is_zero() {
        format!("pg_ctl restart -m {label}")
    } else {
        format!(
            "pg_ctl stop -m {label}, {} s down (broadcast and presence probed meanwhile), pg_ctl start",
            held.as_secs()
        )
    };
    let mut s = Scenario::start(Options::new(name, &fault)).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    if held.is_zero() {
        if let Err(e) = s.cluster.pg_restart(mode) {
            s.fail(format!("pg_ctl restart: {e:#}"));
        }
    } else {
        if let Err(e) = s.cluster.pg_stop(mode) {
            s.fail(format!("pg_ctl stop: {e:#}"));
        }
        let down_until = tokio::time::Instant::now() + held;
        s.probe_broadcast("while Postgres is down", true).await;
        s.probe_presence("while Postgres is down", true).await;
        tokio::time::sleep_until(down_until).await;
        if let Err(e) = s.cluster.pg_start() {
            s.fail(format!("pg_ctl start: {e:#}"));
        }
    }
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    // A held-down database must show on /readyz; a bare restart may be too quick to poll.
    s.finish(Expect::transient(!held.is_zero())).await;
}

/// 1. `pg_ctl stop -m fast` mid-stream, held down, started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart() {
    restart("pg-fast-restart", StopMode::Fast, "fast").await;
}

/// 2. `pg_ctl stop -m immediate` (no checkpoint: the start runs crash recovery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_restart() {
    restart("pg-immediate-restart", StopMode::Immediate, "immediate").await;
}

/// 3. The walsender serving walcast is terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_terminated() {
    let fault = "SELECT pg_terminate_backend(pid) FROM pg_stat_replication";
    let mut s = Scenario::start(Options::new("walsender-terminated", fault)).await;
    s.before_fault().await;
    s.fault_begin(fault);
    match s.admin.query(fault, &[]).await {
        Ok(rows) if rows.is_empty() => s.fail("no walsender to terminate"),
        Ok(_) => {}
        Err(e) => s.fail(format!("terminating the walsender: {e}")),
    }
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    s.finish(Expect::transient(false)).await;
}

/// 4. The network between walcast and Postgres stalls (no byte either way, nothing closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_stall() {
    let secs = knob("FAULTS_STALL_SECS", 12);
    let fault = format!("proxy pause (network stall) for {secs} s");
    let mut s = Scenario::start(Options::new("network-stall", &fault)).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    s.proxy.pause();
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    s.probe_broadcast("during the stall", true).await;
    s.probe_presence("during the stall", true).await;
    tokio::time::sleep_until(until).await;
    s.proxy.resume();
    s.fault_end();
    s.recover(Duration::from_secs(90)).await;
    s.after_fault().await;
    s.finish(Expect::maybe_transient()).await;
}

/// 5. The network is cut: every walcast connection reset, new ones refused for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut() {
    let fault = format!(
        "proxy cut (RST on every connection), new connections refused for {} s",
        down().as_secs()
    );
    let mut s = Scenario::start(Options::new("network-cut", &fault)).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    s.proxy.refuse(true);
    s.proxy.cut();
    let until = tokio::time::Instant::now() + down();
    s.probe_broadcast("while the network is cut", true).await;
    s.probe_presence("while the network is cut", true).await;
    tokio::time::sleep_until(until).await;
    s.proxy.refuse(false);
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    let_run(Duration::from_millis(100)).await;
    s.after_fault().await;
    s.finish(Expect::transient(true)).await;
}
