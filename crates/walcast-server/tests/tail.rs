//! `walcast tail` against a real Postgres: the change model end to end.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{exec_each, peak_rss_kib, tail_caught_up, Tail};
use walcast_testkit::{ClusterOptions, PgCluster};

fn rows<'a>(lines: &'a [Value], table: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["table"] == table).collect()
}

/// First run creates the publication (FOR ALL TABLES) and the slot.
fn prime(url: &str, slot: &str) {
    let f = tail_caught_up(url, slot, &[]);
    assert!(f.status.success(), "priming tail failed: {}", f.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_under_default_and_full_identity_and_truncate() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute(
        "CREATE TABLE d (id int PRIMARY KEY, name text, n int);
         CREATE TABLE f (id int PRIMARY KEY, name text, n int);
         ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    prime(db.url(), "s1");
    exec_each(
        &sql,
        &[
            "INSERT INTO d VALUES (1, 'a', 10), (2, 'b', 20)",
            "UPDATE d SET n = 11 WHERE id = 1",
            "UPDATE d SET id = 3 WHERE id = 2",
            "DELETE FROM d WHERE id = 1",
            "INSERT INTO f VALUES (1, 'a', 10)",
            "UPDATE f SET n = 11 WHERE id = 1",
            "DELETE FROM f WHERE id = 1",
            "TRUNCATE d, f",
        ],
    )
    .await;
    let out = tail_caught_up(db.url(), "s1", &[]);
    assert!(out.status.success());
    let lines = out.json_lines();
    let d = rows(&lines, "d");
    let kinds: Vec<&str> = d.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE", "TRUNCATE"]
    );
    assert_eq!(d[0]["record"], json!({"id": 1, "name": "a", "n": 10}));
    assert!(d[0].get("old_record").is_none());
    // DEFAULT identity, key unchanged: old_record carries the key only.
    assert_eq!(d[2]["record"], json!({"id": 1, "name": "a", "n": 11}));
    assert_eq!(d[2]["old_record"], json!({"id": 1}));
    // Key changed: the old key is sent.
    assert_eq!(d[3]["record"], json!({"id": 3, "name": "b", "n": 20}));
    assert_eq!(d[3]["old_record"], json!({"id": 2}));
    assert_eq!(d[4]["old_record"], json!({"id": 1}));
    assert!(d[4].get("record").is_none());
    assert_eq!(d[0]["schema"], "public");
    assert_eq!(
        d[0]["columns"],
        json!([
            {"name": "id", "type": "int4", "oid": 23, "key": true},
            {"name": "name", "type": "text", "oid": 25},
            {"name": "n", "type": "int4", "oid": 23}
        ])
    );
    // Position: the two inserts share a commit; indexes count from 0 in the transaction.
    assert_eq!(d[0]["lsn"], d[1]["lsn"]);
    assert_eq!(d[0]["index"], 0);
    assert_eq!(d[1]["index"], 1);
    assert_ne!(d[1]["lsn"], d[2]["lsn"]);
    let f = rows(&lines, "f");
    let kinds: Vec<&str> = f.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]);
    assert_eq!(f[1]["old_record"], json!({"id": 1, "name": "a", "n": 10}));
    assert_eq!(f[2]["old_record"], json!({"id": 1, "name": "a", "n": 11}));
    // One TRUNCATE of two tables: same position.
    assert_eq!(d[5]["lsn"], f[3]["lsn"]);
    // commit_time is ISO 8601 UTC with microseconds.
    let t = d[0]["commit_time"].as_str().unwrap();
    assert!(
        t.len() == 27 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_matches_to_jsonb() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE TYPE pair AS (a int4, b text);
         CREATE TABLE t (
            id int PRIMARY KEY,
            b bool, i2 int2, i4 int4, i8 int8, o oid, num numeric, num2 numeric,
            f4 float4, f8 float8, f8nan float8, f8inf float8,
            tx text, vc varchar(10), bp char(5), nm name, ch \"char\",
            js json, jb jsonb, jbs jsonb, u uuid, by bytea,
            d date, dinf date, ts timestamp, tz timestamptz, tm time, ttz timetz, iv interval,
            mn money, ip inet, ci cidr, mac macaddr, bt bit(4), vb varbit, tv tsvector,
            x xml, pt point, bx box, r int4range, tr tstzrange,
            ai int4[], at text[], a2 int4[][], ajb jsonb[], abx box[],
            e mood, ae mood[], dm posint, cp pair, acp pair[], nul text
         );",
    )
    .await
    .unwrap();
    prime(db.url(), "types");
    sql.batch_execute(
        "INSERT INTO t VALUES (
            1, true, -32768, 2147483647, 9007199254740993, 4000000000, 1.50,
            12345678901234567890.123456789, 1.5, 1e+100, 'NaN', '-Infinity',
            'tab\there \"q\" é', 'short', 'ab', 'nm', 'c',
            '{ \"a\" : [1, 2.50] }', '{\"b\": {\"c\": null}}', '\"just a string\"',
            'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '\\x0102ff',
            '2024-05-06', 'infinity', '2024-05-06 07:08:09.123456', '2024-05-06 07:08:09.5+02',
            '07:08:09', '07:08:09+03', '1 year 2 mons 3 days 04:05:06',
            12.5, '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', B'101',
            'a fat cat', '<x>1</x>', '(1,2)', '((0,0),(1,1))', '[1,5)',
            '[2024-01-01 00:00:00+00,2024-02-01 00:00:00+00)',
            '{1,NULL,3}', '{\"a,b\",\"NULL\",NULL,\"c\\\"d\"}', '{{1,2},{3,4}}',
            ARRAY['{\"k\": 1}'::jsonb, '[true]'], '{(0,0),(1,1);(2,2),(3,3)}',
            'happy', '{sad,ok}', 7, ROW(1, 'x y'), ARRAY[ROW(2, NULL)::pair, ROW(3, '')::pair],
            NULL
         );",
    )
    .await
    .unwrap();
    let out = tail_caught_up(db.url(), "types", &[]);
    assert!(out.status.success());
    let lines = out.json_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let record = &lines[0]["record"];
    // Compare column by column with what Postgres's own to_jsonb says, as jsonb (so key
    // order and whitespace do not matter, but numeric scale does: jsonb keeps it).
    let reference = sql
        .query_one("SELECT to_jsonb(t)::text FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let reference: Value = serde_json::from_str(&reference).unwrap();
    let reference = reference.as_object().unwrap();
    let mut mismatches = Vec::new();
    for (col, want) in reference {
        let got = &record[col];
        let same: bool = sql
            .query_one(
                "SELECT $1::text::jsonb::text = $2::text::jsonb::text",
                &[&got.to_string(), &want.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        if !same {
            mismatches.push(format!("{col}: walcast {got} vs to_jsonb {want}"));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // Exact digits survive as JSON numbers (checked on the raw line, not via f64).
    let raw = &out.stdout;
    assert!(raw.contains("\"i8\":9007199254740993"), "{raw}");
    assert!(raw.contains("\"num\":1.50"), "{raw}");
    assert!(
        raw.contains("\"num2\":12345678901234567890.123456789"),
        "{raw}"
    );
    // Column type names are pg_type.typname, including user types and arrays.
    let types: Vec<(String, String)> = lines[0]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (name, ty) in [
        ("ai", "_int4"),
        ("e", "mood"),
        ("ae", "_mood"),
        ("dm", "posint"),
        ("cp", "pair"),
        ("tz", "timestamptz"),
    ] {
        assert!(
            types.contains(&(name.to_string(), ty.to_string())),
            "{name}: {types:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_marked_never_null() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, n int, doc text);
         ALTER TABLE big ALTER COLUMN doc SET STORAGE EXTERNAL;
         CREATE TABLE bigfull (id int PRIMARY KEY, n int, doc text);
         ALTER TABLE bigfull ALTER COLUMN doc SET STORAGE EXTERNAL;
         ALTER TABLE bigfull REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    prime(db.url(), "toast");
    sql.batch_execute(
        "INSERT INTO big VALUES (1, 0, repeat('x', 100000));
         UPDATE big SET n = 1 WHERE id = 1;
         INSERT INTO bigfull VALUES (1, 0, repeat('y', 100000));
         UPDATE bigfull SET n = 1 WHERE id = 1;",
    )
    .await
    .unwrap();
    let out = tail_caught_up(db.url(), "toast", &[]);
    let lines = out.json_lines();
    let big = rows(&lines, "big");
    assert_eq!(big[1]["kind"], "UPDATE");
    assert_eq!(
        big[1]["record"],
        json!({"id": 1, "n": 1}),
        "doc must be absent, not null"
    );
    assert_eq!(big[1]["unchanged_toast"], json!(["doc"]));
    let full = rows(&lines, "bigfull");
    // With REPLICA IDENTITY FULL the old row fills the value in.
    assert_eq!(full[1]["record"]["doc"].as_str().unwrap().len(), 100000);
    assert!(full[1].get("unchanged_toast").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_between_transactions_and_logical_messages() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute("CREATE TABLE ev (id int PRIMARY KEY, a text, b text)")
        .await
        .unwrap();
    prime(db.url(), "ddl");
    exec_each(
        &sql,
        &[
            "INSERT INTO ev VALUES (1, 'a', 'b')",
            "ALTER TABLE ev ADD COLUMN c int DEFAULT 7",
            "INSERT INTO ev VALUES (2, 'a', 'b', 8)",
            "ALTER TABLE ev DROP COLUMN a",
            "INSERT INTO ev VALUES (3, 'b', 9)",
            "ALTER TABLE ev RENAME COLUMN b TO bee",
            "UPDATE ev SET bee = 'B' WHERE id = 3",
            "SELECT pg_logical_emit_message(false, 'walcast-test', 'not in a txn')",
            "BEGIN",
            "INSERT INTO ev VALUES (4, 'x', 1)",
            "SELECT pg_logical_emit_message(true, 'walcast-test', 'in a txn')",
            "COMMIT",
            "BEGIN",
            "SELECT pg_logical_emit_message(true, 'walcast-test', 'rolled back')",
            "ROLLBACK",
        ],
    )
    .await;
    let out = tail_caught_up(db.url(), "ddl", &[]);
    let lines = out.json_lines();
    let ev = rows(&lines, "ev");
    assert_eq!(ev[0]["record"], json!({"id": 1, "a": "a", "b": "b"}));
    assert_eq!(
        ev[1]["record"],
        json!({"id": 2, "a": "a", "b": "b", "c": 8})
    );
    assert_eq!(ev[2]["record"], json!({"id": 3, "b": "b", "c": 9}));
    assert_eq!(ev[3]["record"], json!({"id": 3, "bee": "B", "c": 9}));
    assert_eq!(ev[4]["record"], json!({"id": 4, "bee": "x", "c": 1}));
    let msgs: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "MESSAGE").collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0]["content"], "not in a txn");
    assert_eq!(msgs[0]["transactional"], false);
    assert_eq!(msgs[1]["content"], "in a txn");
    assert_eq!(msgs[1]["prefix"], "walcast-test");
    assert_eq!(
        msgs[1]["lsn"], ev[4]["lsn"],
        "transactional message shares its commit"
    );
    assert_eq!(msgs[1]["index"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_row_transaction_streams_in_flat_memory() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute("CREATE TABLE wide (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    prime(db.url(), "bigtxn");
    // ~200 MB of row data in one transaction.
    sql.batch_execute(
        "INSERT INTO wide SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    let mut child = support::walcast()
        .args([
            "tail",
            "--exit-when-caught-up",
            "--database-url",
            db.url(),
            "--slot",
            "bigtxn",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut n = 0u64;
        let mut last_id = 0i64;
        let mut peak = 0u64;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["record"]["id"].as_i64().unwrap();
            assert_eq!(id, last_id + 1, "rows in order");
            last_id = id;
            n += 1;
            if n % 10_000 == 0 {
                peak = peak.max(peak_rss_kib(pid).unwrap_or(0));
            }
        }
        (n, peak)
    });
    let status = child.wait().unwrap();
    let (n, peak) = reader.join().unwrap();
    assert!(status.success());
    assert_eq!(n, 200_000);
    // The transaction is ~200 MB; a streaming consumer stays far below that.
    assert!(peak > 0 && peak < 64 * 1024, "peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_walsender_termination_without_loss() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute("CREATE TABLE k (id int PRIMARY KEY)")
        .await
        .unwrap();
    prime(db.url(), "kill");
    let mut tail = Tail::spawn(db.url(), "kill", &[]);
    sql.batch_execute("INSERT INTO k SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let first = tail.take(100, Duration::from_secs(30));
    assert_eq!(first[99]["record"]["id"], 100);
    for round in 0..3 {
        // After the previous kill, tail reconnects with a backoff: wait for its new walsender.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let killed = loop {
            let killed = sql
                .query(
                    "SELECT pg_terminate_backend(r.pid) FROM pg_stat_replication r
                     JOIN pg_stat_activity a ON a.pid = r.pid
                     WHERE a.datname = current_database() AND r.application_name = 'walcast tail'",
                    &[],
                )
                .await
                .unwrap();
            if !killed.is_empty() || std::time::Instant::now() > deadline {
                break killed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(killed.len(), 1, "one walsender to kill");
        let base = 100 + round * 50;
        for i in 1..=50 {
            sql.execute("INSERT INTO k VALUES ($1)", &[&(base + i)])
                .await
                .unwrap();
        }
    }
    // Read until every id arrived. Transactions not yet confirmed when the walsender died are
    // sent again; they repeat with the same position, so dedupe by position.
    let mut seen = std::collections::BTreeSet::new();
    let mut ids = Vec::new();
    let mut positions = std::collections::HashSet::new();
    while seen.len() < 150 {
        let line = tail.take(1, Duration::from_secs(60)).remove(0);
        let pos = (line["lsn"].to_string(), line["index"].to_string());
        let id = line["record"]["id"].as_i64().unwrap();
        if positions.insert(pos) {
            ids.push(id);
        } else {
            assert!(
                seen.contains(&id),
                "a repeated position must carry a row already seen"
            );
        }
        seen.insert(id);
    }
    assert_eq!(
        ids,
        (101..=250).collect::<Vec<i64>>(),
        "stderr:\n{}",
        tail.stderr()
    );
    assert!(tail.stderr().contains("reconnected"), "{}", tail.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_where_the_slot_was_confirmed() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute("CREATE TABLE r (id int PRIMARY KEY)")
        .await
        .unwrap();
    prime(db.url(), "restart");
    let mut tail = Tail::spawn(db.url(), "restart", &[]);
    sql.batch_execute("INSERT INTO r SELECT generate_series(1, 10)")
        .await
        .unwrap();
    tail.take(10, Duration::from_secs(30));
    assert!(tail.interrupt().success());
    // Written while tail is down: delivered on the next start, and nothing before it again.
    for i in 11..=20 {
        sql.execute("INSERT INTO r VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let out = tail_caught_up(db.url(), "restart", &[]);
    let ids: Vec<i64> = out
        .json_lines()
        .iter()
        .map(|l| l["record"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (11..=20).collect::<Vec<i64>>());
}

fn one_error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walcast: "))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one error line expected:\n{stderr}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_setups_fail_with_one_actionable_line() {
    // wal_level = replica.
    let replica = PgCluster::start(ClusterOptions {
        settings: vec![("wal_level".into(), "replica".into())],
        ..Default::default()
    })
    .unwrap();
    let db = replica.fresh_database().await.unwrap();
    let out = tail_caught_up(db.url(), "s", &[]);
    assert!(!out.status.success());
    let line = one_error_line(&out.stderr);
    assert!(
        line.contains("wal_level") && line.contains("logical"),
        "{line}"
    );

    // Wrong password.
    let secured = PgCluster::start(ClusterOptions {
        hba: vec![
            "local all all trust".into(),
            "host all postgres 127.0.0.1/32 trust".into(),
            "host all all 127.0.0.1/32 scram-sha-256".into(),
        ],
        ..Default::default()
    })
    .unwrap();
    let db = secured.fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute(
        "CREATE ROLE repl LOGIN REPLICATION PASSWORD 'right';
         CREATE TABLE p (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let out = tail_caught_up(&db.url_as("repl", Some("wrong")), "s", &[]);
    assert!(!out.status.success());
    let line = one_error_line(&out.stderr);
    assert!(line.contains("password"), "{line}");

    // Missing publication, and the role may not create one.
    let out = tail_caught_up(&db.url_as("repl", Some("right")), "s", &[]);
    assert!(!out.status.success());
    let line = one_error_line(&out.stderr);
    assert!(line.contains("CREATE PUBLICATION \"walcast\""), "{line}");

    // Slot in use by another consumer.
    sql.batch_execute("CREATE PUBLICATION walcast FOR ALL TABLES")
        .await
        .unwrap();
    let url = db.url().to_string();
    prime(&url, "busy");
    let mut first = Tail::spawn(&url, "busy", &[]);
    sql.batch_execute("INSERT INTO p VALUES (1)").await.unwrap();
    first.take(1, Duration::from_secs(30));
    let out = tail_caught_up(&url, "busy", &[]);
    assert!(!out.status.success());
    let line = one_error_line(&out.stderr);
    assert!(line.contains("\"busy\" is in use by process"), "{line}");
}
