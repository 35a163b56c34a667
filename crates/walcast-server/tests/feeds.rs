//! Change feeds over plain HTTP against a real `walcast serve` and Postgres: server-sent
//! events with Last-Event-ID resume, 409/400, snapshots aligned with concurrent writes, RLS
//! on the stream and on replays, long-poll, and broadcast topics as SSE.

mod support;
use support::{database, name};

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{token_with, Options, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use walcast_testkit::TestDb;

/// How long any single expected event may take (shared 2-core machines).
const WAIT: Duration = Duration::from_secs(20);

async fn serve(db: &TestDb, tag: &str, extra: &[&str]) -> Server {
    Server::start_with(
        db.url(),
        &name(db, tag),
        Options::default().args(&["--temporary-slot"]).args(extra),
    )
    .await
}

async fn exec(sql: &tokio_postgres::Client, statements: &[String]) {
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    support::exec_each(sql, &refs).await;
}

/// A role for feed tokens that may read `tables`.
async fn reader_role(sql: &tokio_postgres::Client, role: &str, tables: &[&str]) {
    let mut s = vec![
        format!("CREATE ROLE {role} NOLOGIN"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
    ];
    for t in tables {
        s.push(format!("GRANT SELECT ON {t} TO {role}"));
    }
    exec(sql, &s).await;
}

fn tok(role: &str, sub: &str) -> String {
    token_with(json!({"role": role, "sub": sub}))
}

/// One server-sent event.
#[derive(Debug, Clone)]
struct Event {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A raw HTTP/1.1 server-sent event stream (chunked body decoded incrementally).
struct Sse {
    stream: TcpStream,
    raw: Vec<u8>,
    text: String,
    retry_seen: bool,
}

impl Sse {
    /// Open `path` with `Accept: text/event-stream`: the stream, or (status, body).
    async fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Sse, (u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("TCP connect to the server");
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send request");
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("response headers in time")
                .expect("read response");
            assert!(n > 0, "connection closed before the headers");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let rest = raw[head_end + 4..].to_vec();
        if status != 200 {
            // Read the (small) error body to the end or a short timeout.
            let mut body = rest;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&buf[..n]);
                }
            })
            .await;
            let parsed = support::server::parse_http_response(
                &[head.as_bytes(), b"\r\n\r\n", &body].concat(),
            );
            return Err((status, parsed.body));
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        Ok(Sse {
            stream,
            raw: rest,
            text: String::new(),
            retry_seen: false,
        })
    }

    /// Move whole chunks from `raw` to `text`; false once the body ended.
    fn decode(&mut self) -> bool {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size = usize::from_str_radix(String::from_utf8_lossy(&self.raw[..eol]).trim(), 16)
                .expect("a chunk size");
            if size == 0 {
                return false;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return true;
            }
            let chunk = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.text.push_str(&String::from_utf8_lossy(&chunk));
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next event (comments and `retry:` skipped), or None when the stream ended or
    /// nothing came within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Option<Event> {
        let deadline = Instant::now() + limit;
        loop {
            let open = self.decode();
            while let Some(i) = self.text.find("\n\n") {
                let block: String = self.text[..i].to_string();
                self.text.drain(..i + 2);
                let mut event = String::from("message");
                let mut id = None;
                let mut data: Vec<&str> = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    } else if line.starts_with("retry: ") {
                        self.retry_seen = true;
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data: Value = serde_json::from_str(&data.join("\n"))
                    .unwrap_or_else(|e| panic!("event data is JSON ({e}): {block}"));
                return Some(Event { event, id, data });
            }
            if !open {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut buf = [0u8; 16384];
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Read until the raw body text contains `needle` (comments included); false after
    /// `limit` or when the stream ended.
    async fn wait_text(&mut self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let open = self.decode();
            if self.text.contains(needle) {
                return true;
            }
            if !open {
                return false;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn next(&mut self) -> Event {
        self.next_within(WAIT)
            .await
            .expect("an event within the wait")
    }

    /// `n` events named `event` (others fail the test).
    async fn take(&mut self, n: usize, event: &str) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = self.next().await;
            assert_eq!(e.event, event, "unexpected event {e:?}");
            out.push(e);
        }
        out
    }
}

fn changes_path(token: &str, table: &str, extra: &str) -> String {
    format!("/api/changes?schema=public&table={table}&apikey={token}{extra}")
}

fn ids_of(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.data["record"]["id"].as_i64().expect("record.id"))
        .collect()
}

async fn insert(sql: &tokio_postgres::Client, table: &str, ids: std::ops::RangeInclusive<i64>) {
    for i in ids {
        sql.execute(
            &format!("INSERT INTO {table} (id, v) VALUES ($1, $2)"),
            &[&i, &format!("v{i}")],
        )
        .await
        .expect("insert");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_after_a_cut_with_neither_gap_nor_repeat() {
    let (db, sql) = database().await;
    let role = name(&db, "reader");
    exec(
        &sql,
        &["CREATE TABLE items (id bigint PRIMARY KEY, v text)".to_string()],
    )
    .await;
    reader_role(&sql, &role, &["items"]).await;
    let server = serve(&db, "resume", &[]).await;
    let t = tok(&role, "u1");

    let mut feed = Sse::open(server.port, &changes_path(&t, "items", ""), &[])
        .await
        .expect("the feed opens");
    // The headers arrived: everything committed from now on is delivered.
    insert(&sql, "items", 1..=5).await;
    let first = feed.take(3, "change").await;
    assert!(feed.retry_seen, "retry: is sent first");
    assert_eq!(ids_of(&first), [1, 2, 3]);
    let d = &first[0].data;
    assert_eq!(d["schema"], "public");
    assert_eq!(d["table"], "items");
    assert_eq!(d["type"], "INSERT");
    assert_eq!(d["record"], json!({"id": 1, "v": "v1"}));
    assert_eq!(d["columns"][0], json!({"name": "id", "type": "int8"}));
    assert!(d["commit_timestamp"].is_string());
    assert!(d.get("errors").is_some());
    let ids: Vec<String> = first.iter().map(|e| e.id.clone().expect("an id")).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids sort in commit order: {ids:?}"
    );
    assert!(ids.iter().all(|i| i.len() == 24));
    // The cut: the client goes after the third event; more commits meanwhile.
    drop(feed);
    insert(&sql, "items", 6..=8).await;
    let mut again = Sse::open(
        server.port,
        &changes_path(&t, "items", ""),
        &[("Last-Event-ID", &ids[2])],
    )
    .await
    .expect("the resumed feed opens");
    let resumed = again.take(5, "change").await;
    assert_eq!(ids_of(&resumed), [4, 5, 6, 7, 8], "no gap, no repeat");
    insert(&sql, "items", 9..=9).await;
    let live = again.take(1, "change").await;
    assert_eq!(ids_of(&live), [9], "live after the replay, nothing twice");
    // The query parameter works the same for clients that cannot set headers.
    let last = resumed[1].id.clone().expect("id");
    let mut by_param = Sse::open(
        server.port,
        &changes_path(&t, "items", &format!("&last_event_id={last}")),
        &[],
    )
    .await
    .expect("opens");
    assert_eq!(ids_of(&by_param.take(4, "change").await), [6, 7, 8, 9]);
    // Filters, event and select apply to replays as to the live stream.
    let mut filtered = Sse::open(
        server.port,
        &changes_path(
            &t,
            "items",
            &format!(
                "&filter=id=gt.6&event=INSERT&select=v&last_event_id={}",
                ids[0]
            ),
        ),
        &[],
    )
    .await
    .expect("opens");
    let got = filtered.take(3, "change").await;
    assert_eq!(ids_of(&got), [7, 8, 9]);
    assert_eq!(got[0].data["record"], json!({"id": 7, "v": "v7"}));
    assert!(filtered
        .next_within(Duration::from_millis(500))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_old_positions_get_409_and_malformed_requests_400() {
    let (db, sql) = database().await;
    let role = name(&db, "reader");
    exec(
        &sql,
        &["CREATE TABLE items (id bigint PRIMARY KEY, v text)".to_string()],
    )
    .await;
    reader_role(&sql, &role, &["items"]).await;
    // A history of one byte holds nothing: only the newest position can be resumed.
    let server = serve(&db, "old", &["--history-bytes", "1"]).await;
    let t = tok(&role, "u1");
    let mut feed = Sse::open(server.port, &changes_path(&t, "items", ""), &[])
        .await
        .expect("opens");
    insert(&sql, "items", 1..=3).await;
    let got = feed.take(3, "change").await;
    let newest = got[2].id.clone().expect("id");
    let oldest = got[0].id.clone().expect("id");
    drop(feed);
    let (status, body) = Sse::open(
        server.port,
        &changes_path(&t, "items", ""),
        &[("Last-Event-ID", &oldest)],
    )
    .await
    .err()
    .expect("an old position is refused");
    assert_eq!(status, 409, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("ResyncRequired: "),
        "{v}"
    );
    // The newest one is still fine.
    let mut ok = Sse::open(
        server.port,
        &changes_path(&t, "items", ""),
        &[("Last-Event-ID", &newest)],
    )
    .await
    .expect("the newest position resumes");
    insert(&sql, "items", 4..=4).await;
    assert_eq!(ids_of(&ok.take(1, "change").await), [4]);
    // Long-poll says the same.
    let r = server
        .request(
            "GET",
            &changes_path(&t, "items", &format!("&offset={oldest}")),
            &[],
            b"",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 409, "{r:?}");

    for (path, headers, want, what) in [
        (
            changes_path(&t, "items", ""),
            vec![("Last-Event-ID", "xyz")],
            400,
            "malformed id",
        ),
        (
            changes_path(&t, "items", "&last_event_id=00000000000000000000000G"),
            vec![],
            400,
            "non-hex id",
        ),
        (
            changes_path(&t, "items", "&event=UPSERT"),
            vec![],
            400,
            "unknown event",
        ),
        (
            changes_path(&t, "items", "&filter=id=zz.1"),
            vec![],
            400,
            "bad filter",
        ),
        (
            changes_path(&t, "items", "&snapshot=maybe"),
            vec![],
            400,
            "bad flag",
        ),
        (format!("/api/changes?apikey={t}"), vec![], 400, "no table"),
        (
            changes_path("not-a-token", "items", ""),
            vec![],
            401,
            "bad token",
        ),
        (
            "/api/changes?schema=public&table=items".to_string(),
            vec![],
            401,
            "no token",
        ),
        (
            changes_path(&t, "nosuchtable", ""),
            vec![],
            400,
            "unknown table",
        ),
    ] {
        let (status, body) = Sse::open(server.port, &path, &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: refused"));
        assert_eq!(status, want, "{what}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: JSON {body}"));
        assert!(v["error"].is_string(), "{what}: {v}");
    }
    let r = server
        .request("GET", &changes_path(&t, "items", "&offset=12"), &[], b"")
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "malformed offset: {r:?}");
}

/// Two writers commit concurrently while the snapshot is read: every row is in the
/// snapshot or in the changes after it, exactly once, and resuming from `snapshot_end`'s id
/// gives exactly the changes that followed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_has_each_row_exactly_once() {
    let (db, sql) = database().await;
    let role = name(&db, "reader");
    exec(
        &sql,
        &[
            "CREATE TABLE items (id bigint PRIMARY KEY, v text)".to_string(),
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 2000) g".to_string(),
        ],
    )
    .await;
    reader_role(&sql, &role, &["items"]).await;
    let server = serve(&db, "snap", &[]).await;
    let t = tok(&role, "u1");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let client = db.connect().await.expect("writer connects");
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = 10_000 + w * 100_000 + n;
                // Inserts, and updates of seed rows (visible or not to the snapshot).
                client
                    .execute("INSERT INTO items (id, v) VALUES ($1, 'new')", &[&id])
                    .await
                    .expect("insert");
                client
                    .execute(
                        "UPDATE items SET v = $2 WHERE id = $1",
                        &[&(1 + (n * 7 + w) % 2000), &format!("u{w}-{n}")],
                    )
                    .await
                    .expect("update");
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut feed = Sse::open(
        server.port,
        &changes_path(&t, "items", "&snapshot=true"),
        &[],
    )
    .await
    .expect("opens");
    let mut state: BTreeMap<i64, String> = BTreeMap::new();
    let mut seen_insert: HashMap<i64, usize> = HashMap::new();
    let end = loop {
        let e = feed.next().await;
        match e.event.as_str() {
            "snapshot" => {
                assert_eq!(e.data["schema"], "public");
                assert_eq!(e.data["table"], "items");
                assert!(e.data["columns"].is_array());
                let id = e.data["record"]["id"].as_i64().expect("id");
                let v = e.data["record"]["v"].as_str().expect("v").to_string();
                assert!(
                    state.insert(id, v).is_none(),
                    "row {id} twice in the snapshot"
                );
                *seen_insert.entry(id).or_default() += 1;
            }
            "snapshot_end" => break e.id.clone().expect("snapshot_end has an id"),
            other => panic!("unexpected {other} before snapshot_end: {e:?}"),
        }
    };
    // Keep writing a little after the snapshot, then stop and read everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let rows = sql
        .query("SELECT id, v FROM items ORDER BY id", &[])
        .await
        .expect("final rows");
    let want: BTreeMap<i64, String> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect();
    let mut changes = Vec::new();
    while state != want {
        let e = feed
            .next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream stalled; {} rows differ", want.len()));
        assert_eq!(e.event, "change", "{e:?}");
        let id = e.data["record"]["id"].as_i64().expect("id");
        match e.data["type"].as_str() {
            Some("INSERT") => {
                *seen_insert.entry(id).or_default() += 1;
                assert!(
                    state.insert(id, "new".into()).is_none(),
                    "insert of {id} repeats a snapshot row"
                );
            }
            Some("UPDATE") => {
                let v = e.data["record"]["v"].as_str().expect("v").to_string();
                assert!(state.contains_key(&id), "update of {id} before its row");
                state.insert(id, v);
            }
            other => panic!("unexpected change {other:?}"),
        }
        changes.push(e);
    }
    assert!(seen_insert.values().all(|n| *n == 1));
    assert_eq!(seen_insert.len(), want.len());
    assert!(!changes.is_empty(), "writes ran after the snapshot");
    assert!(
        feed.next_within(Duration::from_millis(500)).await.is_none(),
        "nothing more"
    );
    // Resuming from snapshot_end gives exactly the changes streamed after it.
    let mut resumed = Sse::open(
        server.port,
        &changes_path(&t, "items", "&snapshot=true"),
        &[("Last-Event-ID", &end)],
    )
    .await
    .expect("resume from the snapshot's end");
    let again = resumed.take(changes.len(), "change").await;
    let key = |e: &Event| (e.id.clone(), e.data.clone());
    assert_eq!(
        again.iter().map(key).collect::<Vec<_>>(),
        changes.iter().map(key).collect::<Vec<_>>()
    );
    assert!(resumed
        .next_within(Duration::from_millis(500))
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_applies_to_the_stream_the_replay_and_the_snapshot() {
    let (db, sql) = database().await;
    let role = name(&db, "member");
    exec(
        &sql,
        &[
            "CREATE TABLE docs (id bigint PRIMARY KEY, owner text NOT NULL, body text)".to_string(),
            "ALTER TABLE docs ENABLE ROW LEVEL SECURITY".to_string(),
            "ALTER TABLE docs REPLICA IDENTITY FULL".to_string(),
            "INSERT INTO docs VALUES (1, 'alice', 'a1'), (2, 'bob', 'b1')".to_string(),
        ],
    )
    .await;
    reader_role(&sql, &role, &["docs"]).await;
    exec(
        &sql,
        &[format!(
            "CREATE POLICY own ON docs FOR SELECT TO {role} USING (owner = current_setting('request.jwt.claim.sub', true))"
        )],
    )
    .await;
    let server = serve(&db, "rls", &[]).await;
    let alice = tok(&role, "alice");
    let mut feed = Sse::open(
        server.port,
        &changes_path(&alice, "docs", "&snapshot=true"),
        &[],
    )
    .await
    .expect("opens");
    let first = feed.next().await;
    assert_eq!(first.event, "snapshot");
    assert_eq!(
        first.data["record"],
        json!({"id": 1, "owner": "alice", "body": "a1"})
    );
    let end = feed.next().await;
    assert_eq!(
        end.event, "snapshot_end",
        "bob's row is not in alice's snapshot: {end:?}"
    );
    for (id, owner) in [(3, "bob"), (4, "alice"), (5, "bob"), (6, "alice")] {
        sql.execute(
            "INSERT INTO docs VALUES ($1, $2, 'x')",
            &[&(id as i64), &owner],
        )
        .await
        .expect("insert");
    }
    let got = feed.take(2, "change").await;
    assert_eq!(ids_of(&got), [4, 6], "only alice's rows");
    assert!(feed.next_within(Duration::from_millis(500)).await.is_none());
    drop(feed);
    // A replay is judged the same way.
    let mut replay = Sse::open(
        server.port,
        &changes_path(&alice, "docs", ""),
        &[("Last-Event-ID", end.id.as_deref().expect("id"))],
    )
    .await
    .expect("opens");
    assert_eq!(ids_of(&replay.take(2, "change").await), [4, 6]);
    assert!(replay
        .next_within(Duration::from_millis(500))
        .await
        .is_none());
    // Long-poll too.
    let r = server
        .request(
            "GET",
            &changes_path(
                &alice,
                "docs",
                &format!("&offset={}", end.id.as_deref().unwrap_or("")),
            ),
            &[],
            b"",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    let ids: Vec<i64> = r.json()["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| c["record"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, [4, 6]);
    // A role without SELECT on the table is refused outright.
    let outsider = name(&db, "outsider");
    exec(&sql, &[format!("CREATE ROLE {outsider} NOLOGIN")]).await;
    let (status, body) = Sse::open(
        server.port,
        &changes_path(&tok(&outsider, "x"), "docs", ""),
        &[],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_answers_at_once_or_empty_after_the_wait() {
    let (db, sql) = database().await;
    let role = name(&db, "reader");
    exec(
        &sql,
        &[
            "CREATE TABLE items (id bigint PRIMARY KEY, v text)".to_string(),
            "INSERT INTO items VALUES (1, 'seed')".to_string(),
        ],
    )
    .await;
    reader_role(&sql, &role, &["items"]).await;
    let server = serve(&db, "poll", &[]).await;
    let t = tok(&role, "u1");
    let get = |path: String| {
        let server = &server;
        async move {
            let r = server
                .request("GET", &path, &[], b"")
                .await
                .expect("answer");
            assert_eq!(r.status, 200, "{path}: {r:?}");
            r.json()
        }
    };
    // A snapshot gives the rows and the position to continue from.
    let snap = get(changes_path(&t, "items", "&snapshot=true")).await;
    assert_eq!(snap["rows"], json!([{"id": 1, "v": "seed"}]));
    let start = snap["position"].as_str().expect("position").to_string();
    assert_eq!(start.len(), 24);
    // Nothing yet: an empty answer after the wait, the same position.
    let started = Instant::now();
    let empty = get(changes_path(
        &t,
        "items",
        &format!("&offset={start}&timeout_ms=700"),
    ))
    .await;
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(empty["changes"], json!([]));
    let pos = empty["position"].as_str().expect("position").to_string();
    assert!(pos >= start);
    // Changes exist: answered at once, in order, each with its position.
    insert(&sql, "items", 2..=3).await;
    let mut got: Vec<Value> = Vec::new();
    let mut offset = pos.clone();
    let deadline = Instant::now() + WAIT;
    while got.len() < 2 && Instant::now() < deadline {
        let r = get(changes_path(
            &t,
            "items",
            &format!("&offset={offset}&live=true"),
        ))
        .await;
        offset = r["position"].as_str().expect("position").to_string();
        got.extend(r["changes"].as_array().expect("changes").iter().cloned());
    }
    let ids: Vec<i64> = got
        .iter()
        .map(|c| c["record"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, [2, 3]);
    assert_eq!(
        got[1]["position"],
        offset.as_str(),
        "the answer's position is its last change"
    );
    assert_eq!(got[0]["type"], "INSERT");
    assert_eq!(got[0]["table"], "items");
    // Asking again from the first change's position gives the second only.
    let first = got[0]["position"].as_str().expect("position");
    let again = get(changes_path(&t, "items", &format!("&offset={first}"))).await;
    assert_eq!(again["changes"].as_array().map(Vec::len), Some(1));
    assert_eq!(again["changes"][0]["record"]["id"], 3);
    // A waiting poll is answered by a commit.
    let waiting = {
        let path = changes_path(&t, "items", &format!("&offset={offset}&live=true"));
        let port = server.port;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("send");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.expect("read");
            support::server::parse_http_response(&buf).json()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    insert(&sql, "items", 4..=4).await;
    let answered = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("answered before the long-poll wait ends")
        .expect("task");
    assert_eq!(answered["changes"][0]["record"]["id"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_topics_stream_as_server_sent_events() {
    let (db, sql) = database().await;
    let role = name(&db, "caster");
    exec(&sql, &[format!("CREATE ROLE {role} NOLOGIN")]).await;
    let server = serve(&db, "bcast", &[]).await;
    let t = tok(&role, "u1");
    let mut feed = Sse::open(
        server.port,
        &format!("/api/broadcast?topic=room&apikey={t}"),
        &[],
    )
    .await
    .expect("opens");
    let resp = server
        .rest_broadcast(
            &t,
            &json!({"messages": [
                {"topic": "room", "event": "moved", "payload": {"x": 1}},
                {"topic": "elsewhere", "event": "moved", "payload": {"x": 2}},
                {"topic": "room", "event": "left", "payload": {"x": 3}}
            ]}),
        )
        .await;
    assert_eq!(resp.status, 202, "{resp:?}");
    let got = feed.take(2, "broadcast").await;
    assert_eq!(got[0].data, json!({"event": "moved", "payload": {"x": 1}}));
    assert_eq!(got[1].data, json!({"event": "left", "payload": {"x": 3}}));
    // A private topic needs read permission from realtime.messages' policies.
    let (status, body) = Sse::open(
        server.port,
        &format!("/api/broadcast?topic=vault&private=true&apikey={t}"),
        &[],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(status, 403, "{body}");
    // With read and write policies for the topic, the private stream opens and delivers.
    exec(
        &sql,
        &[
            format!("CREATE POLICY vault_read ON realtime.messages FOR SELECT TO {role} USING (realtime.topic() = 'vault')"),
            format!("CREATE POLICY vault_write ON realtime.messages FOR INSERT TO {role} WITH CHECK (realtime.topic() = 'vault')"),
        ],
    )
    .await;
    let mut vault = Sse::open(
        server.port,
        &format!("/api/broadcast?topic=vault&private=true&apikey={t}"),
        &[],
    )
    .await
    .expect("a reader of the private topic gets its stream");
    let resp = server
        .rest_broadcast(
            &t,
            &json!({"messages": [
                {"topic": "vault", "event": "public-twin", "payload": {"n": 0}},
                {"topic": "vault", "event": "secret", "payload": {"n": 1}, "private": true}
            ]}),
        )
        .await;
    assert_eq!(resp.status, 202, "{resp:?}");
    let got = vault.take(1, "broadcast").await;
    assert_eq!(
        got[0].data,
        json!({"event": "secret", "payload": {"n": 1}}),
        "the public topic of the same name is another topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_gets_retry_first_and_a_keepalive_comment() {
    let (db, sql) = database().await;
    let role = name(&db, "reader");
    exec(
        &sql,
        &["CREATE TABLE items (id bigint PRIMARY KEY, v text)".to_string()],
    )
    .await;
    reader_role(&sql, &role, &["items"]).await;
    let server = serve(&db, "quiet", &[]).await;
    let mut feed = Sse::open(
        server.port,
        &changes_path(&tok(&role, "u1"), "items", ""),
        &[],
    )
    .await
    .expect("opens");
    assert!(feed.wait_text("retry: ", WAIT).await, "retry: first");
    assert!(feed.text.starts_with("retry: "), "{:?}", feed.text);
    // Nothing happens on the table: a comment line comes within the 15 s interval (plus
    // slack for a loaded machine), keeping proxies from closing the stream.
    assert!(
        feed.wait_text(": keepalive\n\n", Duration::from_secs(25))
            .await,
        "a keepalive comment; got {:?}",
        feed.text
    );
    // The stream is still live afterwards.
    insert(&sql, "items", 1..=1).await;
    feed.text.clear();
    assert_eq!(ids_of(&feed.take(1, "change").await), [1]);
}
