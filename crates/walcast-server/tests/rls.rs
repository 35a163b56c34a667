//! Row-level security on postgres_changes, differential: for generated tables, policies
//! (owner, tenant, membership through a second table, restrictive + permissive, per-role
//! policies), column privileges and claims, what the real `walcast serve` delivers to each
//! subscriber equals what `SELECT` under that role and claims returns for the same row.
//!
//! Fixed seed by default (`WALCAST_RLS_SEED`), `WALCAST_RLS_OPS` operations (default 60);
//! the bench runs it with a larger count.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use walcast_testkit::PgCluster;

const SECRET: &str = "rls-differential-secret-at-least-32-bytes";

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn token(claims: &Value) -> String {
    let mut c = claims.clone();
    c["exp"] = json!(4_000_000_000u64);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("test token encodes")
}

struct Server {
    child: std::process::Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(url: &str, slot: &str) -> Server {
    serve_with(url, slot, &[]).await
}

async fn serve_with(url: &str, slot: &str, extra: &[&str]) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = support::walcast()
        .args(["serve", "--database-url", url, "--jwt-secret", SECRET])
        .args(["--slot", slot, "--publication", slot, "--temporary-slot"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(extra)
        .env("CHANNEL_ERROR_BACKOFF_MS", "0")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn walcast serve");
    let server = Server { child, port };
    for _ in 0..300 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = vec![0u8; 64];
            if let Ok(n) = s.read(&mut buf).await {
                if String::from_utf8_lossy(&buf[..n]).contains(" 200") {
                    return server;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("walcast serve did not become ready");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One channel (vsn 1.0.0 JSON frames) subscribed to `tables` under `claims`.
struct Subscriber {
    ws: Ws,
    topic: String,
    events: Vec<Value>,
    system: Vec<Value>,
}

impl Subscriber {
    async fn join(port: u16, name: &str, claims: &Value, tables: &[String]) -> Subscriber {
        let tok = token(claims);
        let url = format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={tok}&vsn=1.0.0");
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        let topic = format!("realtime:{name}");
        let bindings: Vec<Value> = tables
            .iter()
            .map(|t| json!({"event": "*", "schema": "public", "table": t}))
            .collect();
        let join = json!({"topic": topic, "event": "phx_join", "ref": "1", "join_ref": "1",
            "payload": {"config": {"postgres_changes": bindings}, "access_token": tok}});
        ws.send(Message::text(join.to_string()))
            .await
            .expect("send join");
        let mut sub = Subscriber {
            ws,
            topic,
            events: Vec::new(),
            system: Vec::new(),
        };
        loop {
            let v = sub.next_frame().await;
            if v["event"] == "phx_reply" {
                assert_eq!(v["payload"]["status"], "ok", "join refused: {v}");
                break;
            }
        }
        sub
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within 30 s", self.topic))
                .expect("socket open")
                .expect("frame");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).expect("json frame");
                match v["event"].as_str() {
                    Some("postgres_changes") => self.events.push(v["payload"]["data"].clone()),
                    Some("system") => self.system.push(v["payload"].clone()),
                    _ => {}
                }
                return v;
            }
        }
    }

    /// Collect until a change of `fence` with id `id` arrives.
    async fn until_fence(&mut self, fence: &str, id: i64) {
        loop {
            let seen = self
                .events
                .iter()
                .any(|e| e["table"] == fence && e["record"]["id"] == id);
            if seen {
                return;
            }
            self.next_frame().await;
        }
    }

    async fn heartbeat(&mut self) {
        let hb = json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"});
        let _ = self.ws.send(Message::text(hb.to_string())).await;
    }
}

/// A generated table: which policies it has and what each role may read.
struct Spec {
    name: String,
    full: bool,
    /// Columns each role may SELECT.
    granted: HashMap<&'static str, Vec<&'static str>>,
}

const COLS: [&str; 6] = ["id", "owner", "tenant", "team", "score", "secret"];

async fn setup(sql: &tokio_postgres::Client, rng: &mut Rng, roles: [&'static str; 2]) -> Vec<Spec> {
    support::exec_each(
        sql,
        &[
            "CREATE SCHEMA auth",
            "CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS \
             $$ SELECT coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb $$",
            "CREATE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE AS \
             $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '') $$",
            "GRANT USAGE ON SCHEMA auth TO PUBLIC",
            "CREATE TABLE members (team int4, member text, PRIMARY KEY (team, member))",
            "INSERT INTO members VALUES (1, 'u1'), (2, 'u1'), (2, 'u2'), (3, 'u3')",
            "GRANT SELECT ON members TO PUBLIC",
            "CREATE TABLE fence (id int8 PRIMARY KEY)",
            "GRANT SELECT ON fence TO PUBLIC",
        ],
    )
    .await;
    let mut specs = Vec::new();
    for k in 0..4 {
        let name = format!("docs{k}");
        let full = rng.chance(70);
        let mut stmts = vec![
            format!(
                "CREATE TABLE {name} (id int8 PRIMARY KEY, owner text, tenant int4, team int4, \
                 score int4, secret text)"
            ),
            format!("ALTER TABLE {name} ENABLE ROW LEVEL SECURITY"),
        ];
        if full {
            stmts.push(format!("ALTER TABLE {name} REPLICA IDENTITY FULL"));
        }
        let permissive = [
            "owner = auth.uid()".to_string(),
            "tenant = ((auth.jwt() ->> 'tenant'))::int4".to_string(),
            "team IN (SELECT m.team FROM members m WHERE m.member = auth.uid())".to_string(),
            format!("EXISTS (SELECT 1 FROM members m WHERE m.team = {name}.team AND m.member = auth.uid() AND {name}.score > 5)"),
        ];
        let restrictive = ["score >= 0", "secret IS DISTINCT FROM 'classified'"];
        // A third of the tables get only claims-only comparisons, the shapes walcast decides
        // in process (authz/shape.rs), a third claims-only comparisons and membership
        // sub-selects (decided in process too, with each identity's sets of teams); the
        // others the per-group shapes above.
        let class = rng.below(3);
        let shaped = class == 1;
        let membership_permissive = [
            "team IN (SELECT m.team FROM members m WHERE m.member = auth.uid())".to_string(),
            format!("EXISTS (SELECT 1 FROM members m WHERE m.team = {name}.team AND m.member = auth.uid())"),
            "owner = auth.uid() AND tenant = ((auth.jwt() ->> 'tenant'))::int4".to_string(),
        ];
        let shaped_permissive = [
            "owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')".to_string(),
            "tenant = ((current_setting('request.jwt.claims', true)::jsonb ->> 'tenant'))::int4 \
             AND owner = current_setting('request.jwt.claim.sub', true) OR team = 3"
                .to_string(),
            "(SELECT (current_setting('request.jwt.claims', true)::jsonb ->> 'tenant')::int4) = tenant"
                .to_string(),
        ];
        let shaped_restrictive = [
            "tenant = ((current_setting('request.jwt.claims', true)::jsonb ->> 'tenant'))::int4 OR owner = 'u4'",
            "secret = 'open'",
        ];
        let (permissive, restrictive): (&[String], &[&str]) = match class {
            1 => (&shaped_permissive, &shaped_restrictive),
            2 => (&membership_permissive, &shaped_restrictive),
            _ => (&permissive, &restrictive),
        };
        eprintln!(
            "{name}: claims-only shapes {shaped}, membership shapes {}, replica identity full {full}",
            class == 2
        );
        let last = permissive.len() - 1;
        let mut n = 0;
        for (i, p) in permissive.iter().enumerate() {
            if rng.chance(55) || (i == last && n == 0) {
                let to = match rng.below(3) {
                    0 => roles[0],
                    1 => roles[1],
                    _ => "PUBLIC",
                };
                stmts.push(format!(
                    "CREATE POLICY p{i} ON {name} FOR {} TO {to} USING ({p})",
                    if rng.chance(50) { "SELECT" } else { "ALL" }
                ));
                n += 1;
            }
        }
        for (i, r) in restrictive.iter().enumerate() {
            if rng.chance(50) {
                stmts.push(format!(
                    "CREATE POLICY r{i} ON {name} AS RESTRICTIVE FOR SELECT TO PUBLIC USING ({r})"
                ));
            }
        }
        let mut granted = HashMap::new();
        for role in roles {
            if rng.chance(40) {
                let cols = vec!["id", "owner", "tenant", "team", "score"];
                stmts.push(format!(
                    "GRANT SELECT ({}) ON {name} TO {role}",
                    cols.join(", ")
                ));
                granted.insert(role, cols);
            } else {
                stmts.push(format!("GRANT SELECT ON {name} TO {role}"));
                granted.insert(role, COLS.to_vec());
            }
        }
        let refs: Vec<&str> = stmts.iter().map(String::as_str).collect();
        support::exec_each(sql, &refs).await;
        specs.push(Spec {
            name,
            full,
            granted,
        });
    }
    specs
}

/// The end of a row's transaction that also changes the membership table: the change after
/// the row, if any, then COMMIT (if a transaction was opened).
async fn finish_txn(sql: &tokio_postgres::Client, after: Option<&str>, open: bool) {
    if let Some(c) = after {
        sql.batch_execute(c).await.expect("membership change");
    }
    if open {
        sql.batch_execute("COMMIT").await.expect("commit");
    }
}

/// The row as `SELECT` under the role and claims returns it (granted columns), if visible.
async fn visible_as(
    sql: &tokio_postgres::Client,
    role: &str,
    claims: &Value,
    spec: &Spec,
    id: i64,
) -> Option<Value> {
    let cols = spec.granted[role].join(", ");
    sql.batch_execute(&format!("BEGIN; SET LOCAL ROLE {role}"))
        .await
        .expect("begin");
    let sub = claims["sub"].as_str().unwrap_or("").to_string();
    sql.execute(
        "SELECT set_config('request.jwt.claims', $1, true), set_config('request.jwt.claim.sub', $2, true)",
        &[&claims.to_string(), &sub],
    )
    .await
    .expect("claims");
    let row = sql
        .query_opt(
            &format!(
                "SELECT to_jsonb(x)::text FROM (SELECT {cols} FROM {} WHERE id = $1) x",
                spec.name
            ),
            &[&id],
        )
        .await
        .expect("select as role");
    sql.batch_execute("ROLLBACK").await.expect("rollback");
    row.map(|r| serde_json::from_str(&r.get::<_, String>(0)).expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_equal_select_under_each_role_and_claims() {
    let seed: u64 = std::env::var("WALCAST_RLS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    let ops: usize = std::env::var("WALCAST_RLS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut rng = Rng(seed | 1);
    let db = PgCluster::shared()
        .fresh_database()
        .await
        .expect("database");
    let sql = db.connect().await.expect("connect");
    let ra: &'static str = Box::leak(format!("{}_ra", db.name()).into_boxed_str());
    let rb: &'static str = Box::leak(format!("{}_rb", db.name()).into_boxed_str());
    for r in [ra, rb] {
        sql.batch_execute(&format!("CREATE ROLE {r} NOLOGIN"))
            .await
            .expect("role");
    }
    let specs = setup(&sql, &mut rng, [ra, rb]).await;
    let server = serve(db.url(), &format!("{}_rls", db.name())).await;

    let identities: Vec<(&'static str, Value)> = vec![
        (ra, json!({"role": ra, "sub": "u1", "tenant": 1})),
        (ra, json!({"role": ra, "sub": "u2", "tenant": 2})),
        (rb, json!({"role": rb, "sub": "u1", "tenant": 2})),
        (rb, json!({"role": rb, "sub": "u3", "tenant": 1})),
        (ra, json!({"role": ra})),
        (rb, json!({"role": rb, "sub": "u2"})),
    ];
    let mut tables: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    tables.push("fence".into());
    let mut subs = Vec::new();
    for (i, (_, claims)) in identities.iter().enumerate() {
        // Two channels per identity: they share the identity group.
        for j in 0..2 {
            subs.push(Subscriber::join(server.port, &format!("s{i}-{j}"), claims, &tables).await);
        }
    }

    // Expected per identity: (table, type, id, record or old_record).
    let mut expected: Vec<Vec<(String, &'static str, i64, Value)>> =
        vec![Vec::new(); identities.len()];
    let mut live: Vec<(usize, i64)> = Vec::new();
    let owners = ["u1", "u2", "u3", "u4"];
    let mut last_heartbeat = std::time::Instant::now();
    let mut fence_id: i64 = 1000;
    for n in 0..ops {
        // Long runs take minutes: keep the channels from idling out (--idle-timeout-secs).
        // By the clock, not by the count: on a loaded box 200 operations outlasted the
        // timeout and a subscriber was closed (seen at load 9).
        if last_heartbeat.elapsed() >= Duration::from_secs(10) {
            for s in &mut subs {
                s.heartbeat().await;
            }
            last_heartbeat = std::time::Instant::now();
        }
        let t = rng.below(specs.len() as u64) as usize;
        let spec = &specs[t];
        let kind = match rng.below(10) {
            _ if live.is_empty() => 0,
            0..=4 => 0,
            5..=7 => 1,
            _ => 2,
        };
        let values = (
            owners[rng.below(4) as usize],
            rng.below(3) as i32 + 1,
            rng.below(4) as i32,
            rng.below(12) as i32 - 2,
            if rng.chance(20) { "classified" } else { "open" },
        );
        // Sometimes a membership change goes with the row: in its own transaction just
        // before, or in the row's transaction before or after it.
        let members = rng.chance(30).then(|| {
            let team = rng.below(4);
            let who = owners[rng.below(4) as usize];
            let change = if rng.chance(50) {
                format!("INSERT INTO members VALUES ({team}, '{who}') ON CONFLICT DO NOTHING")
            } else {
                format!("DELETE FROM members WHERE team = {team} AND member = '{who}'")
            };
            (change, rng.below(3))
        });
        let (alone, before, after) = match &members {
            Some((c, 0)) if kind != 2 => (Some(c.clone()), None, None),
            Some((c, 1)) if kind != 2 => (None, Some(c.clone()), None),
            Some((c, _)) if kind != 2 => (None, None, Some(c.clone())),
            _ => (None, None, None),
        };
        if alone.is_some() || before.is_some() || after.is_some() {
            // Every earlier row judged before the membership changes: a row still waiting
            // for its check may be judged in a snapshot that sees a later change (as of no
            // earlier than its commit), where SELECT right after its commit would not.
            fence_id += 1;
            sql.execute("INSERT INTO fence VALUES ($1)", &[&fence_id])
                .await
                .expect("fence");
            for s in &mut subs {
                s.until_fence("fence", fence_id).await;
            }
        }
        if let Some(c) = &alone {
            sql.batch_execute(c).await.expect("membership change");
        }
        if let Some(c) = &before {
            sql.batch_execute(&format!("BEGIN; {c}"))
                .await
                .expect("membership change");
        } else if after.is_some() {
            sql.batch_execute("BEGIN").await.expect("begin");
        }
        let open = before.is_some() || after.is_some();
        match kind {
            0 | 1 => {
                let id = if kind == 0 {
                    let id = n as i64 + 1;
                    sql.execute(
                        &format!("INSERT INTO {} VALUES ($1, $2, $3, $4, $5, $6)", spec.name),
                        &[&id, &values.0, &values.1, &values.2, &values.3, &values.4],
                    )
                    .await
                    .expect("insert");
                    finish_txn(&sql, after.as_deref(), open).await;
                    live.push((t, id));
                    id
                } else {
                    let pick = rng.below(live.len() as u64) as usize;
                    let (lt, id) = live[pick];
                    sql.execute(
                        &format!(
                            "UPDATE {} SET owner = $2, tenant = $3, team = $4, score = $5, secret = $6 WHERE id = $1",
                            specs[lt].name
                        ),
                        &[&id, &values.0, &values.1, &values.2, &values.3, &values.4],
                    )
                    .await
                    .expect("update");
                    finish_txn(&sql, after.as_deref(), open).await;
                    let spec = &specs[lt];
                    for (i, (role, claims)) in identities.iter().enumerate() {
                        if let Some(row) = visible_as(&sql, role, claims, spec, id).await {
                            expected[i].push((spec.name.clone(), "UPDATE", id, row));
                        }
                    }
                    continue;
                };
                for (i, (role, claims)) in identities.iter().enumerate() {
                    if let Some(row) = visible_as(&sql, role, claims, spec, id).await {
                        expected[i].push((spec.name.clone(), "INSERT", id, row));
                    }
                }
            }
            _ => {
                let pick = rng.below(live.len() as u64) as usize;
                let (lt, id) = live.swap_remove(pick);
                let spec = &specs[lt];
                let mut before = Vec::new();
                for (role, claims) in &identities {
                    before.push(visible_as(&sql, role, claims, spec, id).await);
                }
                sql.execute(&format!("DELETE FROM {} WHERE id = $1", spec.name), &[&id])
                    .await
                    .expect("delete");
                for (i, row) in before.into_iter().enumerate() {
                    // Without the full old row a DELETE cannot be authorized: not delivered.
                    if let (Some(row), true) = (row, spec.full) {
                        expected[i].push((spec.name.clone(), "DELETE", id, row));
                    }
                }
            }
        }
    }
    sql.execute("INSERT INTO fence VALUES (1)", &[])
        .await
        .expect("fence");

    let mut delivered_total = 0;
    for (k, sub) in subs.iter_mut().enumerate() {
        sub.heartbeat().await;
        sub.until_fence("fence", 1).await;
        let i = k / 2;
        let got: Vec<(String, &'static str, i64, Value)> = sub
            .events
            .iter()
            .filter(|e| e["table"] != "fence")
            .map(|e| {
                let kind: &'static str = match e["type"].as_str() {
                    Some("INSERT") => "INSERT",
                    Some("UPDATE") => "UPDATE",
                    Some("DELETE") => "DELETE",
                    other => panic!("unexpected type {other:?}"),
                };
                let row = if kind == "DELETE" {
                    e["old_record"].clone()
                } else {
                    e["record"].clone()
                };
                let id = row["id"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("id in row: {e}"));
                (e["table"].as_str().unwrap_or("").to_string(), kind, id, row)
            })
            .collect();
        assert!(
            sub.system.iter().all(|s| s["status"] != "error"),
            "{}: unexpected system error {:?}",
            sub.topic,
            sub.system
        );
        assert_eq!(
            got, expected[i],
            "subscriber {} ({}) got a different set of rows than SELECT returns",
            sub.topic, identities[i].1
        );
        delivered_total += got.len();
    }
    // The workload must exercise both outcomes.
    let expected_total: usize = expected.iter().map(Vec::len).sum::<usize>() * 2;
    assert_eq!(delivered_total, expected_total);
    eprintln!(
        "seed {seed}, {ops} ops: {delivered_total} deliveries, every one as SELECT returns it"
    );
    assert!(expected_total > 0, "some rows must be visible to someone");
    let hidden = expected.iter().any(|e| e.len() < ops / 3);
    assert!(hidden, "some rows must be hidden from someone");
}

/// One identity whose claims make a policy raise (a cast error, Supabase #2093) loses its
/// binding with a system error; the others keep receiving.
/// A row's tenant against the token's `tenant` claim.
const TENANT_POLICY: &str =
    "tenant = (current_setting('request.jwt.claims', true)::jsonb ->> 'tenant')::int4";

/// One subscriber per tenant in `tenants`, topic `tenant<n>`, on `role` with claim
/// `tenant: n`, each joined to `tables`.
async fn join_tenants(
    port: u16,
    role: &str,
    tenants: impl IntoIterator<Item = i64>,
    tables: &[String],
) -> Vec<Subscriber> {
    let mut subs = Vec::new();
    for tenant in tenants {
        let claims = json!({"role": role, "tenant": tenant});
        subs.push(Subscriber::join(port, &format!("tenant{tenant}"), &claims, tables).await);
    }
    subs
}

/// A fresh database with role `<db>_r`, table `t (id, tenant)` under row-level security with
/// one SELECT policy `p` using `policy`, and a `fence` table without RLS; the role may
/// SELECT both.
async fn tenant_table(policy: &str) -> (walcast_testkit::TestDb, tokio_postgres::Client, String) {
    tenant_table_in(PgCluster::shared(), policy).await
}

async fn tenant_table_in(
    cluster: &PgCluster,
    policy: &str,
) -> (walcast_testkit::TestDb, tokio_postgres::Client, String) {
    let db = cluster.fresh_database().await.expect("database");
    let sql = db.connect().await.expect("connect");
    let role = format!("{}_r", db.name());
    support::exec_each(
        &sql,
        &[
            &format!("CREATE ROLE {role} NOLOGIN"),
            "CREATE TABLE t (id int8 PRIMARY KEY, tenant int4)",
            "CREATE TABLE fence (id int8 PRIMARY KEY)",
            "ALTER TABLE t ENABLE ROW LEVEL SECURITY",
            &format!("GRANT SELECT ON t, fence TO {role}"),
            &format!("CREATE POLICY p ON t FOR SELECT USING ({policy})"),
        ],
    )
    .await;
    (db, sql, role)
}

/// A DELETE on an RLS table without REPLICA IDENTITY FULL carries only the key, which the
/// policies cannot judge: by default nobody gets it; with `--rls-deletes=primary-key` every
/// subscriber whose role may SELECT the table gets the key alone (Supabase's behaviour, and
/// its disclosure: tenant 1 learns that tenant 2's row 2 was deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_deletes_without_the_old_row_are_dropped_unless_the_key_is_opted_in() {
    let (db, sql, role) = tenant_table(TENANT_POLICY).await;
    let safe = serve(db.url(), &format!("{}_del_drop", db.name())).await;
    let keyed = serve_with(
        db.url(),
        &format!("{}_del_pk", db.name()),
        &["--rls-deletes", "primary-key"],
    )
    .await;
    let claims = json!({"role": role, "tenant": 1});
    let tables = vec!["t".to_string()];
    let mut a = Subscriber::join(safe.port, "drop", &claims, &tables).await;
    let mut b = Subscriber::join(keyed.port, "pk", &claims, &tables).await;
    for stmt in [
        "INSERT INTO t VALUES (1, 1), (2, 2)",
        "DELETE FROM t WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO t VALUES (3, 1)",
    ] {
        sql.batch_execute(stmt).await.expect(stmt);
    }
    let seen = |s: &Subscriber| -> Vec<String> {
        s.events
            .iter()
            .map(|e| match e["type"].as_str() {
                Some("DELETE") => format!("DELETE {}", e["old_record"]),
                t => format!("{} {}", t.unwrap_or("?"), e["record"]["id"]),
            })
            .collect()
    };
    for s in [&mut a, &mut b] {
        while !s.events.iter().any(|e| e["record"]["id"] == 3) {
            s.next_frame().await;
        }
    }
    assert_eq!(seen(&a), ["INSERT 1", "INSERT 3"], "default: no DELETE");
    assert_eq!(
        seen(&b),
        [
            "INSERT 1",
            r#"DELETE {"id":1}"#,
            r#"DELETE {"id":2}"#,
            "INSERT 3"
        ],
        "primary-key: the key alone, to whoever may SELECT the table"
    );
    // Said once at join, with status ok (the channel is live): which table, and the fix.
    let notices = |s: &Subscriber| -> Vec<String> {
        s.system
            .iter()
            .filter(|m| {
                m["message"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("DeletesNotDelivered"))
            })
            .map(|m| {
                assert_eq!(m["status"], "ok", "{m}");
                assert_eq!(m["extension"], "postgres_changes", "{m}");
                m["message"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    };
    let warned = notices(&a);
    assert_eq!(warned.len(), 1, "{:?}", a.system);
    assert!(
        warned[0].contains("public.t ") && warned[0].contains("REPLICA IDENTITY FULL"),
        "{warned:?}"
    );
    assert_eq!(
        notices(&b),
        Vec::<String>::new(),
        "the key goes out: nothing missed"
    );
    // Once the table logs the whole old row, nothing is missed and nothing is said. The
    // change after the ALTER carries the new Relation, so joins after it see the new identity.
    sql.batch_execute("ALTER TABLE t REPLICA IDENTITY FULL; INSERT INTO t VALUES (4, 1)")
        .await
        .expect("replica identity full");
    while !a.events.iter().any(|e| e["record"]["id"] == 4) {
        a.next_frame().await;
    }
    let mut c = Subscriber::join(safe.port, "full", &claims, &tables).await;
    sql.batch_execute("INSERT INTO t VALUES (5, 1)")
        .await
        .expect("insert");
    while !c.events.iter().any(|e| e["record"]["id"] == 5) {
        c.next_frame().await;
    }
    assert_eq!(notices(&c), Vec::<String>::new(), "{:?}", c.system);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_policy_stops_only_that_subscriber() {
    let (db, sql, role) = tenant_table(TENANT_POLICY).await;
    let server = serve(db.url(), &format!("{}_iso", db.name())).await;
    let tables = vec!["t".to_string()];
    let mut bad = Subscriber::join(
        server.port,
        "bad",
        &json!({"role": role, "tenant": "not a number"}),
        &tables,
    )
    .await;
    let mut good = Subscriber::join(
        server.port,
        "good",
        &json!({"role": role, "tenant": 1}),
        &tables,
    )
    .await;
    sql.batch_execute("INSERT INTO t VALUES (1, 1); INSERT INTO t VALUES (2, 2)")
        .await
        .expect("insert");
    sql.batch_execute("INSERT INTO t VALUES (3, 1)")
        .await
        .expect("insert");
    while good.events.len() < 2 {
        good.next_frame().await;
    }
    let ids: Vec<&Value> = good.events.iter().map(|e| &e["record"]["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(3)]);
    while !bad.system.iter().any(|s| s["status"] == "error") {
        bad.next_frame().await;
    }
    let err = bad
        .system
        .iter()
        .find(|s| s["status"] == "error")
        .expect("an error");
    assert_eq!(err["extension"], "postgres_changes");
    assert!(
        err["message"].as_str().is_some_and(|m| m.contains("22P02")),
        "{:?}",
        bad.system
    );
    assert!(
        bad.events.is_empty(),
        "nothing was delivered to the failing identity"
    );
}

/// A policy or privilege changed while a subscriber listens applies from the DDL's position
/// in the stream, not after the policy cache's 10-second time limit: the DDL invalidates the
/// table's relcache, so pgoutput sends the table's Relation message again before its next
/// change, and the pump forgets the compiled policy there. The row committed right after
/// the ALTER POLICY is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_applies_from_its_commit() {
    let (db, sql, role) = tenant_table("true").await;
    let server = serve(db.url(), &format!("{}_ddl", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut sub = Subscriber::join(
        server.port,
        "watcher",
        &json!({"role": role, "tenant": 1}),
        &tables,
    )
    .await;
    sql.batch_execute("INSERT INTO t VALUES (1, 2); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    sub.until_fence("fence", 1).await;
    // The cached policy now says "every row". Tighten it and write at once.
    sql.batch_execute(&format!(
            "ALTER POLICY p ON t USING ({TENANT_POLICY});
             INSERT INTO t VALUES (2, 2); INSERT INTO t VALUES (3, 1); INSERT INTO fence VALUES (2)"
        ))
    .await
    .expect("alter and insert");
    sub.until_fence("fence", 2).await;
    let ids: Vec<&Value> = sub
        .events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| &e["record"]["id"])
        .collect();
    assert_eq!(ids, [&json!(1), &json!(3)], "row 2 is another tenant's");
    // Loosening works the same way (GRANT/REVOKE and DROP POLICY take the same path).
    sql.batch_execute(
        "DROP POLICY p ON t; CREATE POLICY p2 ON t FOR SELECT USING (true);
         INSERT INTO t VALUES (4, 2); INSERT INTO fence VALUES (3)",
    )
    .await
    .expect("replace and insert");
    sub.until_fence("fence", 3).await;
    assert!(
        sub.events.iter().any(|e| e["record"]["id"] == 4),
        "{:?}",
        sub.events
    );
    // Revoking the table privilege stops delivery from the next change on.
    sql.batch_execute(&format!(
        "REVOKE SELECT ON t FROM {role}; INSERT INTO t VALUES (5, 1); INSERT INTO fence VALUES (4)"
    ))
    .await
    .expect("revoke and insert");
    sub.until_fence("fence", 4).await;
    assert!(
        !sub.events.iter().any(|e| e["record"]["id"] == 5),
        "{:?}",
        sub.events
    );
}

/// A dedicated cluster where a session that sets `synchronous_commit = on` flushes its
/// commit and then waits for a synchronous standby that never connects: its transaction is
/// in the WAL (and so in the stream) but invisible to every other session until its wait is
/// cancelled. Everyone else commits without waiting.
fn cluster_with_a_standby_nobody_runs() -> PgCluster {
    PgCluster::start(walcast_testkit::ClusterOptions {
        settings: vec![
            (
                "synchronous_standby_names".into(),
                "walcast_never_connects".into(),
            ),
            ("synchronous_commit".into(), "local".into()),
        ],
        ..Default::default()
    })
    .expect("dedicated cluster")
}

/// Commit `statements` (one transaction) so that walcast receives it while it is still
/// invisible: wait until the commit waits for the standby and the walsender has sent it,
/// leave walcast half a second to judge it, then cancel the wait (which completes the local
/// commit and makes it visible).
async fn commit_decoded_before_visible(
    db: &walcast_testkit::TestDb,
    sql: &tokio_postgres::Client,
    statements: String,
) {
    let session = db.connect().await.expect("connect");
    session
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("set");
    let commit = tokio::spawn(async move { session.batch_execute(&statements).await });
    let mut polls = 0;
    loop {
        let row = sql
            .query_one(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'),
                        coalesce((SELECT bool_and(sent_lsn >= pg_current_wal_flush_lsn())
                                  FROM pg_stat_replication), false)",
                &[],
            )
            .await
            .expect("poll");
        let (waiting, sent): (i64, bool) = (row.get(0), row.get(1));
        if waiting == 1 && sent {
            break;
        }
        if commit.is_finished() {
            panic!("the commit did not wait: {:?}", commit.await);
        }
        polls += 1;
        assert!(polls < 500, "the commit never reached the stream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    sql.batch_execute(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
    )
    .await
    .expect("cancel the wait");
    commit
        .await
        .expect("join")
        .expect("the commit completes locally");
}

/// The walsender may send a transaction once its commit record is flushed, before the
/// committing backend makes it visible to other snapshots; a policy compiled in that moment
/// would be the one the DDL replaced. Here the moment lasts half a second: nothing may be
/// judged by the old policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_decoded_before_it_is_visible_still_applies() {
    let cluster = cluster_with_a_standby_nobody_runs();
    let (db, sql, role) = tenant_table_in(&cluster, "true").await;
    let server = serve(db.url(), &format!("{}_vis", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut sub = Subscriber::join(
        server.port,
        "watcher",
        &json!({"role": role, "tenant": 1}),
        &tables,
    )
    .await;
    sql.batch_execute("INSERT INTO t VALUES (1, 2); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    sub.until_fence("fence", 1).await;
    // The cached policy now says "every row". Tighten it and write in the same transaction.
    commit_decoded_before_visible(
        &db,
        &sql,
        format!(
            "ALTER POLICY p ON t USING ({TENANT_POLICY});
             INSERT INTO t VALUES (2, 2); INSERT INTO t VALUES (3, 1); INSERT INTO fence VALUES (2)"
        ),
    )
    .await;
    sub.until_fence("fence", 2).await;
    let ids: Vec<&Value> = sub
        .events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| &e["record"]["id"])
        .collect();
    assert_eq!(ids, [&json!(1), &json!(3)], "row 2 is another tenant's");
}

/// The same moment with a policy that reads another table: a member removed from a room in
/// the transaction that writes the room's next row must not receive that row, although a
/// check run before the transaction is visible would still find the membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_removed_with_the_row_keeps_the_row_from_the_former_member() {
    let cluster = cluster_with_a_standby_nobody_runs();
    let (db, sql, role) = tenant_table_in(&cluster, "false").await;
    support::exec_each(
        &sql,
        &[
            "CREATE TABLE members (room int4, who text, PRIMARY KEY (room, who))",
            &format!("GRANT SELECT ON members TO {role}"),
            "INSERT INTO members VALUES (1, 'ann')",
            "ALTER POLICY p ON t USING (EXISTS (SELECT 1 FROM members m WHERE m.room = tenant
               AND m.who = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
        ],
    )
    .await;
    let server = serve(db.url(), &format!("{}_mem", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut sub = Subscriber::join(
        server.port,
        "ann",
        &json!({"role": role, "sub": "ann"}),
        &tables,
    )
    .await;
    sql.batch_execute("INSERT INTO t VALUES (1, 1); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    sub.until_fence("fence", 1).await;
    commit_decoded_before_visible(
        &db,
        &sql,
        "DELETE FROM members WHERE who = 'ann';
         INSERT INTO t VALUES (2, 1); INSERT INTO fence VALUES (2)"
            .to_string(),
    )
    .await;
    sub.until_fence("fence", 2).await;
    let ids: Vec<&Value> = sub
        .events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| &e["record"]["id"])
        .collect();
    assert_eq!(ids, [&json!(1)], "ann left room 1 before row 2 was written");
}

/// Claims groups are judged in one transaction (one round trip for many users), but nothing
/// one group's evaluation leaves behind is visible to the next. The policy function reads a
/// setting, then sets it to the caller's `sub`, and lets the row through only when it found
/// another user's value there: in a shared transaction without isolation, whichever group is
/// judged second would see the first one's setting and get the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_one_claims_group_sets_reaches_another() {
    let (db, sql, role) = tenant_table("true").await;
    support::exec_each(
        &sql,
        &[
            "CREATE FUNCTION peek_and_set() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
             DECLARE
               me text := current_setting('request.jwt.claims', true)::jsonb ->> 'sub';
               found text := current_setting('walcast_test.leak', true);
             BEGIN
               PERFORM set_config('walcast_test.leak', me, false);
               CREATE TEMP TABLE IF NOT EXISTS leak_marker (who text);
               IF EXISTS (SELECT 1 FROM leak_marker WHERE who <> me) THEN
                 RETURN true;
               END IF;
               INSERT INTO leak_marker VALUES (me);
               RETURN coalesce(found, '') NOT IN ('', me);
             END $$",
            "GRANT EXECUTE ON FUNCTION peek_and_set() TO PUBLIC",
            "DROP POLICY p ON t",
            "CREATE POLICY p ON t FOR SELECT USING (peek_and_set())",
        ],
    )
    .await;
    sql.batch_execute(&format!(
        "GRANT CREATE, TEMP ON DATABASE \"{}\" TO {role}",
        db.name()
    ))
    .await
    .expect("grant temp");
    let server = serve(db.url(), &format!("{}_leak", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut subs = Vec::new();
    // More identities than the authorization pool runs side by side, so batches hold
    // several groups each.
    for name in [
        "ann", "bob", "cid", "dee", "eve", "fay", "gus", "hal", "ida", "jon",
    ] {
        subs.push(
            Subscriber::join(
                server.port,
                name,
                &json!({"role": role, "sub": name}),
                &tables,
            )
            .await,
        );
    }
    // Several rounds: the first checks run each identity alone, later ones share one
    // transaction per batch.
    for round in 1..=6i64 {
        sql.batch_execute(&format!(
            "INSERT INTO t VALUES ({round}, 1); INSERT INTO fence VALUES ({round})"
        ))
        .await
        .expect("insert");
        for s in subs.iter_mut() {
            s.until_fence("fence", round).await;
        }
    }
    for s in &subs {
        let leaked: Vec<&Value> = s
            .events
            .iter()
            .filter(|e| e["table"] == "t")
            .map(|e| &e["record"]["id"])
            .collect();
        assert!(
            leaked.is_empty(),
            "another group's setting or temp table reached this one: rows {leaked:?}"
        );
    }
}

/// A new token arriving while changes flow re-scopes the channel without losing its
/// bindings: rows after the switch keep coming, now as the new user sees them. Several
/// subscribers switch at once, repeatedly, to catch races between the switch and the
/// pump's deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_switch_under_load_keeps_every_binding_live() {
    let policy = "owner = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub')";
    let (db, sql, role) = tenant_table("true").await;
    support::exec_each(
        &sql,
        &[
            "ALTER TABLE t ADD COLUMN owner text",
            "DROP POLICY p ON t",
            &format!("CREATE POLICY p ON t FOR SELECT USING ({policy})"),
        ],
    )
    .await;
    let server = serve(db.url(), &format!("{}_switch", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut subs = Vec::new();
    for i in 0..6 {
        let name = format!("s{i}");
        subs.push(
            Subscriber::join(
                server.port,
                &name,
                &json!({"role": role, "sub": format!("{name}-a")}),
                &tables,
            )
            .await,
        );
    }
    let mut id = 0i64;
    let users = ["a", "b", "c", "d", "e"];
    for round in 1..users.len() {
        let user = |i: usize, r: usize| format!("s{i}-{}", users[r]);
        for (i, s) in subs.iter_mut().enumerate() {
            s.events.clear();
            let tok = token(&json!({"role": role, "sub": user(i, round)}));
            let frame = json!({"topic": s.topic, "event": "access_token", "ref": "t",
                "join_ref": "1", "payload": {"access_token": tok}});
            s.ws.send(Message::text(frame.to_string()))
                .await
                .expect("send token");
        }
        // Rows for the old and the new user keep coming while the switch travels; every
        // fence must arrive, and each channel must see its old user's rows, then only its
        // new user's, never mixed.
        for attempt in 0.. {
            assert!(attempt < 200, "round {round}: the switch never took effect");
            id += 1;
            let mut sql_text = String::new();
            for i in 0..subs.len() {
                for (k, r) in [round - 1, round].into_iter().enumerate() {
                    sql_text.push_str(&format!(
                        "INSERT INTO t (id, tenant, owner) VALUES ({}, 1, '{}');",
                        id * 100 + i as i64 * 2 + k as i64,
                        user(i, r)
                    ));
                }
            }
            sql_text.push_str(&format!("INSERT INTO fence VALUES ({id})"));
            sql.batch_execute(&sql_text).await.expect("insert");
            for s in subs.iter_mut() {
                s.until_fence("fence", id).await;
            }
            let switched = subs.iter().enumerate().all(|(i, s)| {
                s.events
                    .iter()
                    .any(|e| e["record"]["owner"].as_str() == Some(&user(i, round)))
            });
            if switched {
                break;
            }
        }
        for (i, s) in subs.iter().enumerate() {
            let owners: Vec<&str> = s
                .events
                .iter()
                .filter(|e| e["table"] == "t")
                .filter_map(|e| e["record"]["owner"].as_str())
                .collect();
            let first_new = owners
                .iter()
                .position(|o| *o == user(i, round))
                .unwrap_or(owners.len());
            assert!(
                owners[..first_new].iter().all(|o| *o == user(i, round - 1))
                    && owners[first_new..].iter().all(|o| *o == user(i, round)),
                "round {round}: {} got {owners:?}",
                s.topic
            );
            assert!(
                s.system.iter().all(|m| m["status"] != "error"),
                "{:?}",
                s.system
            );
        }
    }
}

/// `walcast_authz_checks_total` over every outcome: how many per-group policy statements ran.
async fn policy_checks(port: u16) -> u64 {
    metric_sum(port, "walcast_authz_checks_total").await
}

/// The sum of a metric's series.
async fn metric_sum(port: u16, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A claims-only policy (`tenant = (claims ->> 'tenant')::int4`) is decided in process once
/// each identity's value is known: rows keep reaching exactly their tenant's subscribers and
/// no per-group policy statement runs for them (authz/shape.rs). A derivation that ran
/// outside its transaction (without the claims) made every row fall back to the per-group
/// check, or lose the user's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_only_policy_needs_no_check_per_row() {
    let (db, sql, role) = tenant_table(TENANT_POLICY).await;
    let server = serve(db.url(), &format!("{}_shape", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut subs = join_tenants(server.port, &role, 1..=5, &tables).await;
    // One row per tenant: each identity's value is derived (in its check batch).
    for tenant in 1..=5i32 {
        sql.execute(
            "INSERT INTO t VALUES ($1, $2)",
            &[&i64::from(tenant), &tenant],
        )
        .await
        .expect("insert");
    }
    sql.execute("INSERT INTO fence VALUES (1)", &[])
        .await
        .expect("fence");
    for s in &mut subs {
        s.until_fence("fence", 1).await;
    }
    let before = policy_checks(server.port).await;
    let routed_before = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    for id in 6..56i64 {
        let tenant = (id % 5 + 1) as i32;
        sql.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &tenant])
            .await
            .expect("insert");
    }
    sql.execute("INSERT INTO fence VALUES (2)", &[])
        .await
        .expect("fence");
    for (k, s) in subs.iter_mut().enumerate() {
        s.until_fence("fence", 2).await;
        let tenant = k as i64 + 1;
        let got: Vec<i64> = s
            .events
            .iter()
            .filter(|e| e["table"] == "t")
            .map(|e| e["record"]["id"].as_i64().expect("id"))
            .collect();
        let want: Vec<i64> = std::iter::once(tenant)
            .chain((6..56).filter(|id| id % 5 + 1 == tenant))
            .collect();
        assert_eq!(got, want, "tenant {tenant}");
        assert!(
            s.system.iter().all(|m| m["status"] != "error"),
            "{:?}",
            s.system
        );
    }
    assert_eq!(
        policy_checks(server.port).await,
        before,
        "rows of a claims-only policy ran per-group policy statements"
    );
    // Routed by value: each of the 50 rows reaches its tenant's identity only, except
    // perhaps the first, which goes to all five when their gates are not in place yet (they
    // are gated once the table's policy is compiled and their values derived, ahead of
    // rows, or else by deciding that row in process); the fence row (a table without
    // policies) goes to all five. Without the value gate every row is routed to all five
    // identities (250 + 5).
    let routed = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    assert!(
        (1 + 49 + 5..=5 + 49 + 5).contains(&(routed - routed_before)),
        "rows were routed to identities whose value they do not carry: {}",
        routed - routed_before
    );
}

/// Supabase's own spelling, `owner = auth.uid()` (and `(select auth.uid())`), where
/// `auth.uid()` is a SQL function over the claim settings: Postgres inlines it, walcast
/// reads the inlined expression and decides rows in process, as for the spelled-out claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_auth_uid_policies_are_decided_in_process() {
    let (db, sql, role) = tenant_table("true").await;
    support::exec_each(
        &sql,
        &[
            "CREATE SCHEMA IF NOT EXISTS auth",
            // The definition Supabase ships (the `sub` claim, from either setting).
            "CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
               SELECT coalesce(
                 nullif(current_setting('request.jwt.claim.sub', true), ''),
                 (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
               )::uuid $$",
            &format!("GRANT USAGE ON SCHEMA auth TO {role}"),
            &format!("GRANT EXECUTE ON FUNCTION auth.uid() TO {role}"),
            "CREATE TABLE notes (id int8 PRIMARY KEY, owner uuid, team uuid)",
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
            &format!("GRANT SELECT ON notes TO {role}"),
            "CREATE POLICY mine ON notes FOR SELECT USING (owner = auth.uid())",
            "CREATE POLICY lead ON notes FOR SELECT USING (team = (SELECT auth.uid()))",
        ],
    )
    .await;
    let server = serve(db.url(), &format!("{}_uid", db.name())).await;
    let tables = vec!["notes".to_string(), "fence".to_string()];
    let users: Vec<String> = (1..=4)
        .map(|k| format!("00000000-0000-0000-0000-00000000000{k}"))
        .collect();
    let mut subs = Vec::new();
    for (k, user) in users.iter().enumerate() {
        subs.push(
            Subscriber::join(
                server.port,
                &format!("user{k}"),
                &json!({"role": role, "sub": user}),
                &tables,
            )
            .await,
        );
    }
    // Warm up: one row per user derives each identity's value.
    for (k, user) in users.iter().enumerate() {
        sql.execute(
            "INSERT INTO notes VALUES ($1, $2::text::uuid, NULL)",
            &[&(k as i64), user],
        )
        .await
        .expect("insert");
    }
    sql.execute("INSERT INTO fence VALUES (1)", &[])
        .await
        .expect("fence");
    for s in &mut subs {
        s.until_fence("fence", 1).await;
    }
    let before = policy_checks(server.port).await;
    // Rows owned by user k, led by user k+1 (team), or nobody's.
    for id in 10..50i64 {
        let owner = &users[(id % 4) as usize];
        let team = &users[((id + 1) % 4) as usize];
        if id % 5 == 0 {
            sql.execute("INSERT INTO notes VALUES ($1, NULL, NULL)", &[&id])
                .await
                .expect("insert");
        } else {
            sql.execute(
                "INSERT INTO notes VALUES ($1, $2::text::uuid, $3::text::uuid)",
                &[&id, owner, team],
            )
            .await
            .expect("insert");
        }
    }
    sql.execute("INSERT INTO fence VALUES (2)", &[])
        .await
        .expect("fence");
    for (k, s) in subs.iter_mut().enumerate() {
        s.until_fence("fence", 2).await;
        let got: Vec<i64> = s
            .events
            .iter()
            .filter(|e| e["table"] == "notes")
            .map(|e| e["record"]["id"].as_i64().expect("id"))
            .collect();
        let k = k as i64;
        let want: Vec<i64> = std::iter::once(k)
            .chain((10..50).filter(|id| id % 5 != 0 && (id % 4 == k || (id + 1) % 4 == k)))
            .collect();
        assert_eq!(got, want, "user {k}");
    }
    assert_eq!(
        policy_checks(server.port).await,
        before,
        "rows of an auth.uid() policy ran per-group policy statements"
    );
}

/// New identities on a table whose policy is decided in process share one check batch, and
/// their claims values are computed together in one round trip (a thousand users signing
/// in at once would otherwise cost a thousand): every one still gets exactly its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_identities_on_a_claims_only_policy_are_derived_together() {
    let (db, sql, role) = tenant_table(TENANT_POLICY).await;
    let server = serve(db.url(), &format!("{}_many", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    // One identity first: its row compiles (and caches) the table's policy.
    let mut first = Subscriber::join(
        server.port,
        "first",
        &json!({"role": role, "tenant": 0}),
        &tables,
    )
    .await;
    sql.batch_execute("INSERT INTO t VALUES (0, 0); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    first.until_fence("fence", 1).await;
    // Counted from before the joins: identities joining a table whose policy is compiled
    // are derived as they join (ahead of their rows).
    let batched_before = metric_sum(server.port, "walcast_authz_derivations_batched_total").await
        + metric_sum(server.port, "walcast_authz_derived_ahead_total").await;
    let mut subs = join_tenants(server.port, &role, 1..=12, &tables).await;
    let checks_before = policy_checks(server.port).await;
    // One transaction with a row for every new tenant, then a few more each.
    let mut rows = String::from("BEGIN;");
    for id in 1..=36i64 {
        rows.push_str(&format!(
            "INSERT INTO t VALUES ({id}, {});",
            (id - 1) % 12 + 1
        ));
    }
    rows.push_str("INSERT INTO fence VALUES (2); COMMIT;");
    sql.batch_execute(&rows).await.expect("insert");
    for (k, s) in subs.iter_mut().enumerate() {
        s.until_fence("fence", 2).await;
        let tenant = k as i64 + 1;
        let got: Vec<i64> = s
            .events
            .iter()
            .filter(|e| e["table"] == "t")
            .map(|e| e["record"]["id"].as_i64().expect("id"))
            .collect();
        let want: Vec<i64> = (1..=36).filter(|id| (id - 1) % 12 + 1 == tenant).collect();
        assert_eq!(got, want, "tenant {tenant}");
    }
    // Together in a check batch, or (joining after the policy was compiled) ahead of their
    // rows, in one round trip per arrival wave.
    let batched = metric_sum(server.port, "walcast_authz_derivations_batched_total").await
        + metric_sum(server.port, "walcast_authz_derived_ahead_total").await;
    assert!(
        batched - batched_before >= 2,
        "new identities' values were not computed together ({batched_before} -> {batched})"
    );
    assert_eq!(
        policy_checks(server.port).await,
        checks_before,
        "rows of a claims-only policy ran per-group policy statements"
    );
}

/// Cold start (issue #15): an identity that joins a table whose claims-only policy is
/// compiled already gets its claims values derived when it joins, and is gated at once, so
/// from its first row on it is decided in process: other users' rows never reach it (no
/// lane items for rows it may not see), its own row needs no per-group statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_is_derived_when_it_joins() {
    let (db, sql, role) = tenant_table(TENANT_POLICY).await;
    let server = serve(db.url(), &format!("{}_ahead", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut subs = join_tenants(server.port, &role, 1..=3, &tables).await;
    // Warm: the policy is compiled, these three are derived and gated.
    sql.batch_execute("INSERT INTO t VALUES (1, 1), (2, 2), (3, 3); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    for s in &mut subs {
        s.until_fence("fence", 1).await;
    }
    let ahead_before = metric_sum(server.port, "walcast_authz_derived_ahead_total").await;
    let mut newcomer = Subscriber::join(
        server.port,
        "tenant4",
        &json!({"role": role, "tenant": 4}),
        &tables,
    )
    .await;
    // Its values are derived beside the pump, without any row: wait for that (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric_sum(server.port, "walcast_authz_derived_ahead_total").await <= ahead_before
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let checks_before = policy_checks(server.port).await;
    let routed_before = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    sql.batch_execute(
        "INSERT INTO t VALUES (10, 1), (11, 2), (12, 3), (13, 1), (14, 4); \
         INSERT INTO fence VALUES (2)",
    )
    .await
    .expect("insert");
    newcomer.until_fence("fence", 2).await;
    for s in &mut subs {
        s.until_fence("fence", 2).await;
    }
    let got: Vec<i64> = newcomer
        .events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| e["record"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(got, vec![14], "the newcomer gets exactly its row");
    for (k, s) in subs.iter().enumerate() {
        let tenant = k as i64 + 1;
        let got: Vec<i64> = s
            .events
            .iter()
            .filter(|e| e["table"] == "t")
            .map(|e| e["record"]["id"].as_i64().expect("id"))
            .collect();
        let want: Vec<i64> = [1, 2, 3, 10, 11, 12, 13, 14]
            .into_iter()
            .filter(|id| match id {
                1..=3 => *id == tenant,
                14 => false,
                _ => (id - 10) % 3 + 1 == tenant,
            })
            .collect();
        assert_eq!(got, want, "tenant {tenant}");
    }
    assert_eq!(
        policy_checks(server.port).await,
        checks_before,
        "a row of a claims-only policy ran a per-group policy statement"
    );
    // Each of the five rows reaches its owner only, the newcomer included (it was gated
    // when it joined); the fence row (no policy) reaches all four. Were the newcomer
    // derived only by its first row, the four rows of other tenants would reach it too
    // (5 + 4 + 4 = 13), each queued in its lane for a check batch.
    let routed = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    assert_eq!(
        routed - routed_before,
        5 + 4,
        "rows reached an identity whose value they do not carry"
    );
}

/// The ids of table `t` a subscriber received, in order.
fn t_ids(sub: &Subscriber) -> Vec<i64> {
    sub.events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| e["record"]["id"].as_i64().expect("id"))
        .collect()
}

/// Lanes holding more than the pump's queue limit (100,000 items) stop it reading the
/// stream until checks free them. The checks must still start while later transactions
/// wait unread: new identities' lanes run alone, a few at a time, and the pump used to wait
/// for the buffered stream to drain before starting the rest, which it never would (the
/// 1,000-user membership bench delivered its first transaction and then nothing). Here 40
/// identities on a policy no shape recognizes (so every row is routed to every identity)
/// get a transaction of 3,000 rows (120,000 items) with more transactions right behind it;
/// the policy is slow on row 1, so each identity's first check takes a while and the pump
/// fills the lanes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_start_while_full_lanes_hold_the_stream_back() {
    let (db, sql, role) = tenant_table("false").await;
    support::exec_each(
        &sql,
        &[
            // One slow row per check statement, under its 2 s timeout.
            "CREATE FUNCTION tenant_is(id int8, x int4) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
             BEGIN
               IF id = 1 THEN PERFORM pg_sleep(1.2); END IF;
               RETURN x = (current_setting('request.jwt.claims', true)::jsonb ->> 'tenant')::int4;
             END $$",
            "ALTER POLICY p ON t USING (tenant_is(id, tenant))",
        ],
    )
    .await;
    let server = serve(db.url(), &format!("{}_full", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    const TENANTS: i64 = 40;
    let mut subs = join_tenants(server.port, &role, 0..TENANTS, &tables).await;
    let mut txns = String::from(
        "BEGIN; INSERT INTO t SELECT g, g % 40 FROM generate_series(1, 3000) g; COMMIT;",
    );
    for k in 0..10i64 {
        let first = 3001 + 40 * k;
        txns.push_str(&format!(
            "INSERT INTO t SELECT g, g % 40 FROM generate_series({first}, {}) g;",
            first + 39
        ));
    }
    txns.push_str("INSERT INTO fence VALUES (1);");
    sql.batch_execute(&txns).await.expect("insert");
    for (tenant, s) in subs.iter_mut().enumerate() {
        s.until_fence("fence", 1).await;
        let want: Vec<i64> = (1..=3400)
            .filter(|id| id % TENANTS == tenant as i64)
            .collect();
        assert_eq!(t_ids(s), want, "tenant {tenant}");
        assert!(
            s.system.iter().all(|m| m["status"] != "error"),
            "tenant {tenant}: {:?}",
            s.system
        );
    }
}

/// A column dropped after a row was written but before walcast compiled the table's access
/// for it (the catalog is read as of now, not as of the row) must not vanish from that row
/// for a role with SELECT on the whole table: the grant covers every column the table had.
/// The proxy holds walcast's connections while the row and the DROP COLUMN commit, so the
/// first compilation after it resumes sees the catalog without the column (CI once saw this
/// in the DDL fault scenario: one row, written just before a DROP COLUMN, came without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_after_its_row_stays_in_that_row() {
    let (db, sql, role) = tenant_table("true").await;
    sql.batch_execute("ALTER TABLE t ADD COLUMN extra text")
        .await
        .expect("add column");
    let proxy =
        walcast_testkit::FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], db.port())))
            .expect("proxy");
    let url = proxy.url_for(db.url()).expect("proxy url");
    let server = serve(&url, &format!("{}_dropped", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut sub = Subscriber::join(server.port, "dropped", &json!({"role": role}), &tables).await;
    // The slot is there (the join above went through its readiness): hold walcast back.
    proxy.pause();
    support::exec_each(
        &sql,
        &[
            "INSERT INTO t VALUES (1, 1, 'kept')",
            "ALTER TABLE t DROP COLUMN extra",
            "INSERT INTO t VALUES (2, 1)",
            "INSERT INTO fence VALUES (1)",
        ],
    )
    .await;
    proxy.resume();
    sub.until_fence("fence", 1).await;
    let rows: Vec<&Value> = sub
        .events
        .iter()
        .filter(|e| e["table"] == "t")
        .map(|e| &e["record"])
        .collect();
    assert_eq!(
        rows,
        [
            &json!({"id": 1, "tenant": 1, "extra": "kept"}),
            &json!({"id": 2, "tenant": 1})
        ],
        "each row as it was written"
    );
}

/// Supabase's membership policies (`tenant IN (SELECT m.room FROM members m WHERE m.who =
/// <claims>)`, and the EXISTS form) are decided in process: each identity's set of rooms is
/// derived in Postgres, then rows are routed and decided by it without a per-group policy
/// statement (authz/shape.rs). A change of the membership table applies from its point in
/// the stream, judged as of each row's commit: a member added or removed in the row's own
/// transaction (before or after the row) or in the transaction just before is honoured.
/// With the sets not invalidated by the membership changes (checked by switching the
/// change count off), ann receives row 105 after leaving its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_policy_is_decided_in_process_and_follows_membership_changes() {
    for policy in [
        "tenant IN (SELECT m.room FROM members m \
         WHERE m.who = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
        "EXISTS (SELECT 1 FROM members m WHERE m.room = t.tenant \
         AND m.who = (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
    ] {
        membership_follows_changes(policy).await;
    }
}

async fn membership_follows_changes(policy: &str) {
    let (db, sql, role) = tenant_table("false").await;
    support::exec_each(
        &sql,
        &[
            "CREATE TABLE members (room int4, who text, PRIMARY KEY (room, who))",
            &format!("GRANT SELECT ON members TO {role}"),
            "INSERT INTO members VALUES (1, 'ann'), (2, 'ann'), (2, 'bob')",
            &format!("ALTER POLICY p ON t USING ({policy})"),
        ],
    )
    .await;
    let server = serve(db.url(), &format!("{}_members", db.name())).await;
    let tables = vec!["t".to_string(), "fence".to_string()];
    let mut subs = Vec::new();
    for who in ["ann", "bob", "carl"] {
        subs.push(
            Subscriber::join(
                server.port,
                who,
                &json!({"role": role, "sub": who}),
                &tables,
            )
            .await,
        );
    }
    // Warm-up: every identity's set derived (in its first check batch).
    sql.batch_execute("INSERT INTO t VALUES (1, 1), (2, 2), (3, 3); INSERT INTO fence VALUES (1)")
        .await
        .expect("insert");
    for s in &mut subs {
        s.until_fence("fence", 1).await;
    }
    let checks = policy_checks(server.port).await;
    let derived = metric_sum(server.port, "walcast_authz_derivations_batched_total").await;
    let routed = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    // Steady state: decided in the pump with the sets it has, routed by room.
    for id in 10..40i64 {
        let room = (id % 3 + 1) as i32;
        sql.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &room])
            .await
            .expect("insert");
    }
    sql.execute("INSERT INTO fence VALUES (2)", &[])
        .await
        .expect("fence");
    for s in &mut subs {
        s.until_fence("fence", 2).await;
    }
    assert_eq!(
        metric_sum(server.port, "walcast_authz_derivations_batched_total").await,
        derived,
        "{policy}: rows without membership changes derived sets again"
    );
    // The first row goes to all three identities (deciding it gates them), each later one
    // to its room's members only, the fence to all three.
    let routed_now = metric_sum(server.port, "walcast_authz_identities_routed_total").await;
    assert!(
        routed_now - routed < 3 * 30 + 3,
        "{policy}: every row was routed to every identity ({} routes)",
        routed_now - routed
    );
    // Membership changes in the stream. Before each, every subscriber has received the
    // rows before it: a row still waiting for its check when a later transaction removes a
    // membership may be judged in a snapshot that already sees the removal (as of no
    // earlier than its commit, like the per-group check), which this test does not probe.
    let mut fence = 10;
    for step in [
        // carl joins room 3 in the row's transaction, after the row.
        "BEGIN; INSERT INTO t VALUES (102, 3); INSERT INTO members VALUES (3, 'carl'); COMMIT",
        // bob leaves room 2 in the row's transaction, before the row.
        "BEGIN; DELETE FROM members WHERE who = 'bob'; INSERT INTO t VALUES (103, 2); COMMIT",
        // carl joins room 1 in the transaction before the row.
        "INSERT INTO members VALUES (1, 'carl')",
        "INSERT INTO t VALUES (104, 1)",
        // ann leaves room 1 after the row, in its transaction.
        "BEGIN; INSERT INTO t VALUES (105, 1); DELETE FROM members WHERE who = 'ann' AND room = 1; COMMIT",
        "INSERT INTO t VALUES (106, 2), (107, 3); INSERT INTO fence VALUES (3)",
    ] {
        if step.contains("members") {
            fence += 1;
            sql.execute("INSERT INTO fence VALUES ($1)", &[&fence])
                .await
                .expect("fence");
            for s in &mut subs {
                s.until_fence("fence", fence).await;
            }
        }
        sql.batch_execute(step).await.expect(step);
    }
    let steady: Vec<i64> = (10..40).collect();
    let of_room = |rooms: &[i64]| -> Vec<i64> {
        steady
            .iter()
            .copied()
            .filter(|id| rooms.contains(&(id % 3 + 1)))
            .collect()
    };
    let mut want_ann = vec![1, 2];
    want_ann.extend(of_room(&[1, 2]));
    want_ann.extend([103, 104, 106]);
    let mut want_bob = vec![2];
    want_bob.extend(of_room(&[2]));
    let want_carl = vec![102, 104, 105, 107];
    for (s, want) in subs.iter_mut().zip([want_ann, want_bob, want_carl]) {
        s.until_fence("fence", 3).await;
        assert_eq!(t_ids(s), want, "{policy}: {}", s.topic);
        assert!(
            s.system.iter().all(|m| m["status"] != "error"),
            "{:?}",
            s.system
        );
    }
    assert_eq!(
        policy_checks(server.port).await,
        checks,
        "{policy}: rows of a membership policy ran per-group policy statements"
    );
}
