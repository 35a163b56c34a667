//! Scenarios 7 and 8: the replication slot goes away under walcast (dropped, or invalidated
//! by `max_slot_wal_keep_size`). Replication stops for good and says so, broadcast and
//! presence go on, and no slot is made behind the operator's back, unless walcast runs with
//! `--recreate-slot`, which makes a new one and tells every channel to resync.

use std::time::Duration;

use walcast_faults::check::RESYNC;
use walcast_faults::clock::now_ms;
use walcast_faults::knobs::let_run;
use walcast_faults::subscriber::Line;
use walcast_faults::{Expect, Options, Scenario};

async fn stopped_for_good(s: &mut Scenario) {
    if s.server_gone("after the slot was lost") {
        return;
    }
    let stopped = s
        .readyz
        .wait_for(Duration::from_secs(30), |t| {
            t.code == 503 && t.body.starts_with("not ready: replication stopped")
        })
        .await;
    if !stopped {
        let now = s.readyz.current().map(|t| t.label()).unwrap_or_default();
        s.fail(format!(
            "/readyz did not say `replication stopped` within 30 s (now: {now})"
        ));
    }
    s.probe_broadcast("after replication stopped", true).await;
    s.probe_presence("after replication stopped", true).await;
    // Give a reconnecting server time to (wrongly) make a slot.
    let_run(Duration::from_secs(3)).await;
}

/// 7a. The slot is dropped while walcast streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped() {
    let fault = "terminate the walsender, pg_drop_replication_slot (repeated until it wins)";
    let mut s = Scenario::start(Options::new("slot-dropped", fault)).await;
    s.before_fault().await;
    s.fault_begin(fault);
    s.drop_slot().await;
    s.fault_end();
    stopped_for_good(&mut s).await;
    let slots = s.slots().await;
    if !slots.is_empty() {
        s.fail(format!(
            "a slot exists again without --recreate-slot: {slots:?}"
        ));
    }
    s.finish(Expect::definite()).await;
}

/// 7b. The same with `--recreate-slot`: a new slot, `ResyncRequired` to every channel, and
///     the stream resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_recreate_slot() {
    let fault =
        "terminate the walsender, pg_drop_replication_slot, walcast runs with --recreate-slot";
    let mut opts = Options::new("slot-dropped-recreate", fault);
    opts.server_args = vec!["--recreate-slot".into()];
    let mut s = Scenario::start(opts).await;
    s.before_fault().await;
    s.fault_begin(fault);
    s.drop_slot().await;
    s.fault_end();
    // When the last changes subscriber was told to resync: rows committed after it must come.
    let mut told = now_ms();
    for name in ["carol", "alice", "bob"] {
        let got = s
            .sub(name)
            .wait_until(Duration::from_secs(30), |lines| {
                lines
                    .iter()
                    .any(|l| matches!(l, Line::System { message, .. } if message == RESYNC))
            })
            .await;
        if got {
            let t = s.sub(name).with_lines(|lines| {
                lines.iter().find_map(|l| match l {
                    Line::System { message, t, .. } if message == RESYNC => Some(*t),
                    _ => None,
                })
            });
            told = told.max(t.unwrap_or(0));
        }
    }
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    let slots = s.slots().await;
    if !slots.iter().any(|(name, _)| *name == s.slot) {
        s.fail(format!("the slot was not recreated (slots: {slots:?})"));
    }
    s.finish(Expect::recreated(told)).await;
}

/// 8. The slot is invalidated: walcast is stalled behind the proxy while WAL moves on past
///    `max_slot_wal_keep_size`, then a checkpoint removes the WAL it needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_invalidated() {
    let fault = "proxy pause; pg_switch_wal and CHECKPOINT until the slot is lost \
                 (max_slot_wal_keep_size = 32MB); proxy resume";
    let mut opts = Options::new("slot-invalidated", fault);
    opts.cluster_settings = vec![
        ("max_slot_wal_keep_size".into(), "32MB".into()),
        ("max_wal_size".into(), "64MB".into()),
        ("min_wal_size".into(), "32MB".into()),
    ];
    let mut s = Scenario::start(opts).await;
    s.before_fault().await;
    s.fault_begin(fault);
    s.proxy.pause();
    let mut lost = false;
    for round in 0..40 {
        let _ = s.admin.batch_execute("SELECT pg_switch_wal()").await;
        // The writer keeps WAL moving between switches.
        let_run(Duration::from_millis(50)).await;
        if round % 4 == 3 {
            if let Err(e) = s.admin.batch_execute("CHECKPOINT").await {
                s.fail(format!("CHECKPOINT: {e}"));
            }
            let slots = s.slots().await;
            if slots
                .iter()
                .any(|(n, st)| *n == s.slot && st.as_deref() == Some("lost"))
            {
                lost = true;
                break;
            }
        }
    }
    if !lost {
        let slots = s.slots().await;
        s.fail(format!(
            "harness: the slot was not invalidated (slots: {slots:?})"
        ));
    }
    s.proxy.resume();
    s.fault_end();
    stopped_for_good(&mut s).await;
    let slots = s.slots().await;
    if slots != vec![(s.slot.clone(), Some("lost".to_string()))] {
        s.fail(format!(
            "slots changed after the invalidation without --recreate-slot: {slots:?}"
        ));
    }
    s.finish(Expect::definite()).await;
}
