//! Scenarios 10-12: what the stream carries gets awkward (DDL mid-stream, one huge
//! transaction) or a client stops reading.

use std::time::Duration;

use serde_json::json;
use walcast_faults::check::BULK_BASE;
use walcast_faults::knobs::{knob, let_run};
use walcast_faults::rawws::{Ended, RawSocket};
use walcast_faults::subscriber::Line;
use walcast_faults::token::token;
use walcast_faults::{Expect, Options, Scenario};

/// 10. Add, retype and drop a column of `events` while rows are written: every row arrives
///     with the columns and JSON types the table had when it was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_mid_stream() {
    let steps = [
        "ALTER TABLE public.events ADD COLUMN extra int4 DEFAULT 7",
        "ALTER TABLE public.events ALTER COLUMN extra TYPE text",
        "ALTER TABLE public.events DROP COLUMN extra",
        "ALTER TABLE public.events ADD COLUMN flag boolean DEFAULT true",
    ];
    let fault = format!("{}, 1 s apart", steps.join("; "));
    let mut opts = Options::new("ddl-mid-stream", &fault);
    opts.keep_shape = true;
    let mut s = Scenario::start(opts).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    for step in steps {
        if let Err(e) = s.admin.batch_execute(step).await {
            s.fail(format!("{step}: {e}"));
        }
        let_run(Duration::from_secs(1)).await;
    }
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    s.finish(Expect::no_loss()).await;
}

/// 11. One large transaction (CI form 100 MB; FAULTS_BIG_TX_MB for the long form): every row
///     delivered, walcast's memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transaction() {
    let mb = knob("FAULTS_BIG_TX_MB", 100);
    let row_bytes = knob("FAULTS_BIG_TX_ROW_BYTES", 1000).max(10);
    let rows = (mb * 1_000_000 / row_bytes) as i64;
    let fault =
        format!("one transaction inserting {rows} rows of {row_bytes} B into events ({mb} MB)");
    let mut s = Scenario::start(Options::new("large-transaction", &fault)).await;
    s.before_fault().await;
    s.fault_begin(&fault);
    let bulk = s
        .db
        .connect()
        .await
        .expect("bulk connection")
        .execute(
            "INSERT INTO public.events (id, owner, body) \
             SELECT $1::int8 + g, 'bulk', repeat('x', $2::int4) FROM generate_series(1, $3::int8) g",
            &[&BULK_BASE, &(row_bytes as i32), &rows],
        )
        .await;
    match bulk {
        Ok(n) => {
            s.note(format!("bulk transaction committed {n} rows"));
            s.extra_committed
                .push(("events".into(), BULK_BASE + 1..=BULK_BASE + rows));
        }
        Err(e) => s.fail(format!("bulk insert: {e}")),
    }
    s.fault_end();
    // Wait for the last bulk row, watching memory meanwhile.
    let last = BULK_BASE + rows;
    let wait = Duration::from_secs(knob("FAULTS_BIG_TX_WAIT_SECS", 300));
    let deadline = tokio::time::Instant::now() + wait;
    let mut peak_kb = 0;
    loop {
        if let Some(r) = s.server.rss() {
            peak_kb = peak_kb.max(r.rss_kb);
        }
        let got = s.sub("carol").with_lines(|lines| {
            lines
                .iter()
                .rev()
                .any(|l| matches!(l, Line::Change { id, .. } if *id == last))
        });
        if got || s.server_gone("while the bulk rows are delivered") {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            s.fail(format!(
                "carol did not get the last bulk row within {wait:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.note(format!(
        "walcast RSS peak seen while delivering: {} MB",
        peak_kb / 1024
    ));
    s.recover(Duration::from_secs(60)).await;
    s.after_fault().await;
    let mut expect = Expect::no_loss();
    expect.rss_growth_limit_kb = Some(knob("FAULTS_RSS_GROWTH_MB", 96) * 1024);
    expect.final_wait_secs = 120;
    s.finish(expect).await;
}

/// 12. A client joins `room` and never reads while large broadcasts flow: it is
///     disconnected, the others get everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_stops_reading() {
    let count = knob("FAULTS_FLOOD_COUNT", 600) as i64;
    let kb = knob("FAULTS_FLOOD_KB", 100);
    let fault = format!(
        "a raw WebSocket joins room and never reads; {count} broadcasts of {kb} KB are sent"
    );
    let mut s = Scenario::start(Options::new("subscriber-stops-reading", &fault)).await;
    s.before_fault().await;
    let tok = token(&s.secret, "authenticated", "sloth").expect("token");
    let mut sloth = match RawSocket::join(s.server.port, &tok, "room").await {
        Ok(r) => r,
        Err(e) => panic!("the raw socket could not join: {e:#}"),
    };
    s.fault_begin(&fault);
    let sent = s
        .command(
            "watcher",
            json!({ "cmd": "flood", "event": "big", "count": count, "bytes": kb * 1000, "perSecond": 100 }),
        )
        .await;
    if let Err(e) = sent {
        s.fail(format!("flood command: {e:#}"));
    }
    // The others get every large broadcast.
    for name in ["carol", "alice"] {
        let all = s
            .sub(name)
            .wait_until(Duration::from_secs(120), |lines| {
                lines
                    .iter()
                    .filter(|l| matches!(l, Line::Broadcast { event, .. } if event == "big"))
                    .count() as i64
                    >= count
            })
            .await;
        if !all {
            let got = s.sub(name).with_lines(|lines| {
                lines
                    .iter()
                    .filter(|l| matches!(l, Line::Broadcast { event, .. } if event == "big"))
                    .count()
            });
            s.fail(format!("{name} received {got} of {count} large broadcasts"));
        }
    }
    // Without reading: has the server let it go? (its write timeout is 30 s)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut counted = None;
    while tokio::time::Instant::now() < deadline {
        counted = s.metric("walcast_slow_client_disconnects_total").await;
        if counted.unwrap_or(0.0) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.note(format!(
        "walcast_slow_client_disconnects_total = {counted:?}"
    ));
    // Now read what was buffered: the socket must end.
    match sloth.drain(Duration::from_secs(20)).await {
        Ended::StillOpen => s.fail("the socket that never read was not disconnected"),
        ended => s.note(format!("the socket that never read ended: {ended:?}")),
    }
    s.fault_end();
    s.recover(Duration::from_secs(60)).await;
    let_run(Duration::from_millis(100)).await;
    s.after_fault().await;
    s.finish(Expect::no_loss()).await;
}
