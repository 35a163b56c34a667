//! Authorized postgres_changes throughput: 1,000 subscribers in 100 distinct claims groups
//! (10 channels per `tenant` claim) on a table with row-level security, side by side with
//! the same writes on the same table without RLS.
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/rls-throughput [--subscribers 1000 --groups 100 --rows 20000 --batch 100]
//! ```
//!
//! What is measured, per mode (`rls` then `no-rls`, same server, same subscribers): the
//! writer commits `--rows` INSERTs in transactions of `--batch` rows, tenants round-robin;
//! each subscriber counts the postgres_changes frames it receives; the figure is delivered
//! frames / (last receipt − first commit). With RLS each row reaches the 10 channels of its
//! tenant (policy `tenant = claims.tenant`); without RLS every row reaches all 1,000, so the
//! no-RLS line is the fan-out ceiling of the box and the RLS line is what authorization
//! leaves of it. Correctness: with RLS every channel must receive exactly its tenant's rows.
//! Target: ≥ 20,000 authorized messages/s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use walcast_bench::harness::{Harness, HarnessArgs, JWT_SECRET};
use walcast_bench::realtime;

#[derive(Parser)]
#[command(about = "postgres_changes throughput with row-level security vs without")]
struct Opts {
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Distinct claims groups (tenants).
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Rows written per mode.
    #[arg(long, default_value_t = 20_000)]
    rows: usize,
    /// Rows per transaction.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Mint a token per channel (at join time, so `exp` varies): as many claims groups as
    /// channels, like real clients whose tokens carry their own `exp`/`iat`/session.
    #[arg(long)]
    token_per_channel: bool,
    #[command(flatten)]
    harness: HarnessArgs,
}

fn token(tenant: usize) -> Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"role": "rls_bench", "exp": exp,
        "sub": format!("user-{tenant}"), "tenant": tenant});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

struct Counters {
    frames: Vec<AtomicU64>,
    last_ns: AtomicU64,
}

async fn run(o: Opts) -> Result<()> {
    let harness = Harness::start(&o.harness).await?;
    let sql = harness.db.connect().await?;
    sql.batch_execute(
        "DO $$ BEGIN CREATE ROLE rls_bench NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE rls_rows (id int8 PRIMARY KEY, tenant int4 NOT NULL, body text);
         GRANT USAGE ON SCHEMA public TO rls_bench;
         GRANT SELECT ON rls_rows TO rls_bench;
         ALTER PUBLICATION walcast ADD TABLE rls_rows;
         CREATE POLICY tenant_rows ON rls_rows FOR SELECT TO rls_bench
           USING (tenant = ((current_setting('request.jwt.claims', true)::jsonb ->> 'tenant'))::int4);",
    )
    .await
    .context("creating the bench table")?;

    let addr = harness.addr();
    let base = Instant::now();
    let counters = Arc::new(Counters {
        frames: (0..o.subscribers).map(|_| AtomicU64::new(0)).collect(),
        last_ns: AtomicU64::new(0),
    });
    // One token per tenant, shared by its channels: the claims (including `exp`) of a
    // tenant's channels are identical, so they form exactly `--groups` claims groups. A token
    // minted per channel would differ in `exp` whenever a second passes during the joins,
    // multiplying the groups (see `--token-per-channel`).
    let tenant_tokens: Vec<String> = (0..o.groups).map(token).collect::<Result<_>>()?;
    for i in 0..o.subscribers {
        let tenant = i % o.groups;
        let tok = if o.token_per_channel {
            token(tenant)?
        } else {
            tenant_tokens[tenant].clone()
        };
        let mut ws = realtime::connect(addr, None, &tok, 64 * 1024).await?;
        let join = serde_json::json!([ "1", "1", format!("realtime:rls-{i}"), "phx_join",
            {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "rls_rows"}]},
             "access_token": tok}]);
        ws.send(Message::text(join.to_string())).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .context("join reply")?
                .context("socket closed during join")??;
            if let Message::Text(t) = msg {
                if t.contains("phx_reply") {
                    if !t.contains("\"ok\"") {
                        bail!("join refused: {t}");
                    }
                    break;
                }
            }
        }
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut hb = tokio::time::interval(Duration::from_secs(20));
            let mut r = 0u64;
            loop {
                tokio::select! {
                    _ = hb.tick() => {
                        r += 1;
                        if ws.send(Message::text(realtime::heartbeat_frame(r))).await.is_err() { return; }
                    }
                    msg = ws.next() => {
                        let Some(Ok(msg)) = msg else { return };
                        if let Message::Text(t) = msg {
                            if t.contains("\"postgres_changes\"") {
                                counters.frames[i].fetch_add(1, Ordering::Relaxed);
                                counters.last_ns.store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        });
    }
    println!(
        "rls-throughput: {} subscribers, {} claims groups, {} rows per mode in transactions of {}",
        o.subscribers, o.groups, o.rows, o.batch
    );
    let mut next_id: i64 = 1;
    for mode in ["rls", "no-rls"] {
        sql.batch_execute(if mode == "rls" {
            "ALTER TABLE rls_rows ENABLE ROW LEVEL SECURITY"
        } else {
            "ALTER TABLE rls_rows DISABLE ROW LEVEL SECURITY"
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before: Vec<u64> = counters
            .frames
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let expected_per_sub: Vec<u64> = (0..o.subscribers)
            .map(|i| {
                if mode == "rls" {
                    (0..o.rows).filter(|r| r % o.groups == i % o.groups).count() as u64
                } else {
                    o.rows as u64
                }
            })
            .collect();
        let expected: u64 = expected_per_sub.iter().sum();
        let start_ns = base.elapsed().as_nanos() as u64;
        let mut written = 0;
        while written < o.rows {
            let n = o.batch.min(o.rows - written);
            let first = next_id;
            sql.execute(
                "INSERT INTO rls_rows (id, tenant, body)
                 SELECT g, ((g - $1) + $3) % $4, 'row ' || g FROM generate_series($1::int8, $2::int8) g",
                &[&first, &(first + n as i64 - 1), &(written as i64), &(o.groups as i64)],
            )
            .await?;
            next_id += n as i64;
            written += n;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let delivered = loop {
            let got: u64 = counters
                .frames
                .iter()
                .zip(&before)
                .map(|(c, b)| c.load(Ordering::Relaxed) - b)
                .sum();
            if got >= expected || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let secs = counters
            .last_ns
            .load(Ordering::Relaxed)
            .saturating_sub(start_ns) as f64
            / 1e9;
        let exact = counters
            .frames
            .iter()
            .zip(&before)
            .zip(&expected_per_sub)
            .all(|((c, b), e)| c.load(Ordering::Relaxed) - b == *e);
        println!(
            "{mode:>7}: delivered {delivered} of {expected} in {secs:.2} s = {:.0} msgs/s; every channel got exactly its rows: {exact}",
            delivered as f64 / secs
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(o))
}
