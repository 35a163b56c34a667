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
//!
//! `--mode` picks the policy shape (issue #15):
//! - `tenant` (default): the above, `rls` then `no-rls`.
//! - `owner`: table `rls_owned`, every row owned by one user (`owner = 'user-<n>'`), policy
//!   `owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')`; every
//!   subscriber has its own user's token (`--groups` users) and no client filter, so each row
//!   is routed to every user and authorization decides who gets it.
//! - `owner-filtered`: the same plus `filter: owner=eq.user-<n>`: the subscriber's own filter
//!   drops the other users' rows before authorization.
//! - `unrecognized`: the same rows behind a policy calling a plpgsql function (a shape no
//!   recognizer can see through: evaluated per claims group).
//! - `owner-auth-uid`: `owner` with Supabase's spelling, `owner = auth.uid()`, where
//!   `auth.uid()` is Supabase's SQL function over the `sub` claim (returning text here, as
//!   the bench's user ids are not uuids); walcast looks through it to the claims.
//! - `membership`: Supabase's membership policy, table `rls_room_rows (id, room, body)` with
//!   `room IN (SELECT m.room FROM rls_members m WHERE m.member = auth.uid())`; user n
//!   (`--groups` users, one token each) is a member of room n % `--rooms`, row r is in room
//!   r % `--rooms`, so each row reaches the channels of its room's members. walcast derives
//!   each user's set of rooms and decides rows in process (issue #15).
//!
//! The owner-shaped and membership modes run the `rls` pass only.
//!
//! `--rate N` is the latency mode: the same subscribers, but the rows are single-row commits
//! paced at N per second over `--writers` connections; each row carries the writer's clock
//! just before its INSERT, and each delivery's age on receipt is its commit-to-client
//! latency (p50 / p99 / max over the pass). Before the pass, one untimed row per user warms
//! every identity up (its claims values derived: the steady state); `--no-warmup` leaves it
//! out (the cold start). Use `--synchronous-commit on`: with `off` the walsender waits for the
//! WAL writer (`wal_writer_delay`), which would be most of the latency.

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
    /// Latency mode: single-row commits at this many per second (from `--writers`
    /// connections, `--batch` ignored); reports commit-to-client p50/p99/max besides the rate.
    #[arg(long)]
    rate: Option<u32>,
    /// Writer connections in latency mode.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Latency mode without the untimed warm-up row per user: the timed rows start right
    /// after the joins (the cold start: no identity's claims values derived by a row yet).
    #[arg(long)]
    no_warmup: bool,
    /// Mint a token per channel (at join time, so `exp` varies): as many claims groups as
    /// channels, like real clients whose tokens carry their own `exp`/`iat`/session.
    #[arg(long)]
    token_per_channel: bool,
    /// Policy shape: tenant | owner | owner-filtered | unrecognized | owner-auth-uid (see the
    /// module docs).
    #[arg(long, default_value = "tenant")]
    mode: Mode,
    /// Rooms in `--mode membership`.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Tenant,
    Owner,
    OwnerFiltered,
    Unrecognized,
    OwnerAuthUid,
    Membership,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Tenant => "tenant",
            Mode::Owner => "owner",
            Mode::OwnerFiltered => "owner-filtered",
            Mode::Unrecognized => "unrecognized",
            Mode::OwnerAuthUid => "owner-auth-uid",
            Mode::Membership => "membership",
        }
    }

    fn table(self) -> &'static str {
        if self == Mode::Tenant {
            "rls_rows"
        } else if self == Mode::Membership {
            "rls_room_rows"
        } else {
            "rls_owned"
        }
    }
}

/// The membership-shaped tables: `users` users, user n a member of room n % `rooms`.
fn membership_setup(users: usize, rooms: usize) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS auth;
         CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE AS $f$
           SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                           (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')) $f$;
         GRANT USAGE ON SCHEMA auth TO rls_bench;
         CREATE TABLE rls_members (room int4, member text, PRIMARY KEY (room, member));
         INSERT INTO rls_members SELECT n % {rooms}, 'user-' || n FROM generate_series(0, {users} - 1) n;
         GRANT SELECT ON rls_members TO rls_bench;
         CREATE TABLE rls_room_rows (id int8 PRIMARY KEY, room int4 NOT NULL, body text);
         GRANT SELECT ON rls_room_rows TO rls_bench;
         ALTER PUBLICATION walcast ADD TABLE rls_members, rls_room_rows;
         ALTER TABLE rls_room_rows ENABLE ROW LEVEL SECURITY;
         CREATE POLICY room_rows ON rls_room_rows FOR SELECT TO rls_bench
           USING (room IN (SELECT m.room FROM rls_members m WHERE m.member = auth.uid()));",
        users = users.max(1),
        rooms = rooms.max(1)
    )
}

/// The owner-shaped table and the policy of `mode`.
fn owner_setup(mode: Mode) -> String {
    let policy = if mode == Mode::Unrecognized {
        "CREATE FUNCTION rls_bench_is_mine(o text) RETURNS boolean LANGUAGE plpgsql STABLE AS $f$
           BEGIN RETURN o = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'); END $f$;
         CREATE POLICY owned_rows ON rls_owned FOR SELECT TO rls_bench USING (rls_bench_is_mine(owner));"
    } else if mode == Mode::OwnerAuthUid {
        "CREATE SCHEMA IF NOT EXISTS auth;
         CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE AS $f$
           SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                           (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')) $f$;
         GRANT USAGE ON SCHEMA auth TO rls_bench;
         CREATE POLICY owned_rows ON rls_owned FOR SELECT TO rls_bench USING (owner = auth.uid());"
    } else {
        "CREATE POLICY owned_rows ON rls_owned FOR SELECT TO rls_bench
           USING (owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'));"
    };
    format!(
        "CREATE TABLE rls_owned (id int8 PRIMARY KEY, owner text NOT NULL, body text);
         GRANT SELECT ON rls_owned TO rls_bench;
         ALTER PUBLICATION walcast ADD TABLE rls_owned;
         ALTER TABLE rls_owned ENABLE ROW LEVEL SECURITY;
         {policy}"
    )
}

struct Counters {
    frames: Vec<AtomicU64>,
    /// Change frames whose row id the channel had received already.
    duplicates: AtomicU64,
    last_ns: AtomicU64,
    /// Latency mode: each delivery's age (ns) on receipt.
    ages: std::sync::Mutex<Vec<u64>>,
}

/// The writer clock a latency-mode row carries in its body (`t<ns since base>`).
fn row_age_ns(frame: &str, now_ns: u64) -> Option<u64> {
    let at = frame.find("\"body\":\"t")? + "\"body\":\"t".len();
    let digits: &str = &frame[at..];
    let end = digits.find('"')?;
    let sent: u64 = digits[..end].parse().ok()?;
    Some(now_ns.saturating_sub(sent))
}

/// Percentile `p` (0..=100) of sorted `v`, in milliseconds.
fn pct_ms(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * p / 100.0).round() as usize;
    v[i] as f64 / 1e6
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
    if o.mode == Mode::Membership {
        sql.batch_execute(&membership_setup(o.groups, o.rooms))
            .await
            .context("creating the membership-shaped tables")?;
    } else if o.mode != Mode::Tenant {
        sql.batch_execute(&owner_setup(o.mode))
            .await
            .context("creating the owner-shaped table")?;
    }

    let addr = harness.addr();
    let base = Instant::now();
    let counters = Arc::new(Counters {
        frames: (0..o.subscribers).map(|_| AtomicU64::new(0)).collect(),
        last_ns: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        ages: Default::default(),
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
        let mut binding =
            serde_json::json!({"event": "INSERT", "schema": "public", "table": o.mode.table()});
        if o.mode == Mode::OwnerFiltered {
            binding["filter"] = format!("owner=eq.user-{tenant}").into();
        }
        let join = serde_json::json!([ "1", "1", format!("realtime:rls-{i}"), "phx_join",
            {"config": {"postgres_changes": [binding]}, "access_token": tok}]);
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
            // Only change frames count: a `system` message names the postgres_changes
            // extension too, and one arriving late (a loaded box) counted as a row.
            let classifier = realtime::Classifier::default();
            let mut seen = std::collections::HashSet::new();
            loop {
                tokio::select! {
                    _ = hb.tick() => {
                        r += 1;
                        if ws.send(Message::text(realtime::heartbeat_frame(r))).await.is_err() { return; }
                    }
                    msg = ws.next() => {
                        let Some(Ok(msg)) = msg else { return };
                        if let Message::Text(t) = msg {
                            if let realtime::Inbound::Change(id) = classifier.classify(t.as_bytes()) {
                                if id.is_some_and(|id| !seen.insert(id)) {
                                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                                }
                                let now_ns = base.elapsed().as_nanos() as u64;
                                counters.frames[i].fetch_add(1, Ordering::Relaxed);
                                counters.last_ns.store(now_ns, Ordering::Relaxed);
                                if let Some(age) = row_age_ns(&t, now_ns) {
                                    counters.ages.lock().unwrap_or_else(|p| p.into_inner()).push(age);
                                }
                            }
                        }
                    }
                }
            }
        });
    }
    println!(
        "rls-throughput --mode {}: {} subscribers, {} claims groups, {} rows per pass in transactions of {}",
        o.mode.name(),
        o.subscribers,
        o.groups,
        o.rows,
        o.batch
    );
    let mut next_id: i64 = 1;
    let passes: &[&str] = if o.mode == Mode::Tenant {
        &["rls", "no-rls"]
    } else {
        &["rls"]
    };
    for &mode in passes {
        sql.batch_execute(if o.mode != Mode::Tenant {
            "SELECT 1"
        } else if mode == "rls" {
            "ALTER TABLE rls_rows ENABLE ROW LEVEL SECURITY"
        } else {
            "ALTER TABLE rls_rows DISABLE ROW LEVEL SECURITY"
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(rate) = o.rate.filter(|_| !o.no_warmup) {
            // Warm-up, not measured: one row per user, so every identity's claims values
            // are known (the steady state) before the timed rows.
            let delivered =
                |c: &Counters| -> u64 { c.frames.iter().map(|f| f.load(Ordering::Relaxed)).sum() };
            let at_start = delivered(&counters);
            paced_writes(&harness, &o, rate, (next_id, o.groups), 'w', base).await?;
            next_id += o.groups as i64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while delivered(&counters) < at_start + o.subscribers as u64
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let before: Vec<u64> = counters
            .frames
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let expected_per_sub: Vec<u64> = (0..o.subscribers)
            .map(|i| {
                if mode == "rls" && o.mode == Mode::Membership {
                    let room = (i % o.groups) % o.rooms.max(1);
                    (0..o.rows).filter(|r| r % o.rooms.max(1) == room).count() as u64
                } else if mode == "rls" {
                    (0..o.rows).filter(|r| r % o.groups == i % o.groups).count() as u64
                } else {
                    o.rows as u64
                }
            })
            .collect();
        let expected: u64 = expected_per_sub.iter().sum();
        let start_ns = base.elapsed().as_nanos() as u64;
        counters
            .ages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut written = 0;
        if let Some(rate) = o.rate {
            written = o.rows;
            let committed = paced_writes(&harness, &o, rate, (next_id, o.rows), 't', base).await?;
            next_id += o.rows as i64;
            let took = (base.elapsed().as_nanos() as u64 - start_ns) as f64 / 1e9;
            println!(
                "{:>14} {mode:>6}: {committed} single-row commits in {took:.2} s = {:.0} commits/s (asked {rate})",
                o.mode.name(),
                committed as f64 / took
            );
        }
        while written < o.rows {
            let n = o.batch.min(o.rows - written);
            let first = next_id;
            // Row r (counted from 0 within the pass) belongs to tenant / user r % groups.
            let groups = if o.mode == Mode::Membership {
                o.rooms.max(1)
            } else {
                o.groups
            };
            let insert = if o.mode == Mode::Tenant {
                "INSERT INTO rls_rows (id, tenant, body)
                 SELECT g, ((g - $1) + $3) % $4, 'row ' || g FROM generate_series($1::int8, $2::int8) g"
            } else if o.mode == Mode::Membership {
                "INSERT INTO rls_room_rows (id, room, body)
                 SELECT g, ((g - $1) + $3) % $4, 'row ' || g FROM generate_series($1::int8, $2::int8) g"
            } else {
                "INSERT INTO rls_owned (id, owner, body)
                 SELECT g, 'user-' || (((g - $1) + $3) % $4), 'row ' || g FROM generate_series($1::int8, $2::int8) g"
            };
            sql.execute(
                insert,
                &[
                    &first,
                    &(first + n as i64 - 1),
                    &(written as i64),
                    &(groups as i64),
                ],
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
        let duplicates = counters.duplicates.load(Ordering::Relaxed);
        let exact = exact && duplicates == 0;
        println!(
            "{:>14} {mode:>6}: delivered {delivered} of {expected} in {secs:.2} s = {:.0} msgs/s; every channel got exactly its rows: {exact} ({duplicates} duplicates)",
            o.mode.name(),
            delivered as f64 / secs
        );
        if o.rate.is_some() {
            let mut ages =
                std::mem::take(&mut *counters.ages.lock().unwrap_or_else(|p| p.into_inner()));
            ages.sort_unstable();
            println!(
                "{:>14} {mode:>6}: commit-to-client p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} deliveries",
                o.mode.name(),
                pct_ms(&ages, 50.0),
                pct_ms(&ages, 99.0),
                pct_ms(&ages, 100.0),
                ages.len()
            );
        }
    }
    Ok(())
}

/// Latency mode's writers: `rows` single-row commits, ids from `first`, row r owned by user
/// (tenant) r % groups, bodies marked `mark` (`t`: timed), paced at `rate` per second in
/// total; returns the commits made.
async fn paced_writes(
    harness: &Harness,
    o: &Opts,
    rate: u32,
    (first, rows): (i64, usize),
    mark: char,
    base: Instant,
) -> Result<usize> {
    let writers = o.writers.max(1);
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let client = harness.db.connect().await?;
        let (groups, mode) = if o.mode == Mode::Membership {
            (o.rooms.max(1), o.mode)
        } else {
            (o.groups, o.mode)
        };
        // Each writer takes every `writers`-th row, one commit per tick.
        let period = Duration::from_secs_f64(writers as f64 / f64::from(rate.max(1)));
        tasks.push(tokio::spawn(async move {
            let insert = if mode == Mode::Tenant {
                "INSERT INTO rls_rows (id, tenant, body) VALUES ($1, $2::int8::int4, $3)"
            } else if mode == Mode::Membership {
                "INSERT INTO rls_room_rows (id, room, body) VALUES ($1, $2::int8::int4, $3)"
            } else {
                "INSERT INTO rls_owned (id, owner, body) VALUES ($1, 'user-' || $2::int8, $3)"
            };
            let statement = client.prepare(insert).await?;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut done = 0usize;
            for r in (w..rows).step_by(writers) {
                tick.tick().await;
                let sent = format!("{mark}{}", base.elapsed().as_nanos());
                let owner = (r % groups) as i64;
                client
                    .execute(&statement, &[&(first + r as i64), &owner, &sent])
                    .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.context("writer task")??;
    }
    Ok(total)
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(o))
}
