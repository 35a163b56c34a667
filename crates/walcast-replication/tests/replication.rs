//! Integration tests against real Postgres clusters (walcast-testkit): authentication, TLS,
//! slot and publication management, streaming, feedback and reconnects.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use walcast_pgoutput::{Decoder, LogicalMessage};
use walcast_replication::{
    connect, Lsn, PublicationStatus, ReplicationConfig, ReplicationError, ReplicationStream,
    Replicator, SlotStatus, StreamEvent, XLogData,
};
use walcast_testkit::{ClusterOptions, PgCluster, TestDb};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Generous bound for anything that waits on the server; only there so a bug hangs no CI.
const PATIENCE: Duration = Duration::from_secs(60);

/// Replication settings for a test database: slot and publication named after it.
fn config(db: &TestDb) -> ReplicationConfig {
    ReplicationConfig::from_url(db.url())
        .expect("testkit urls parse")
        .with_slot(db.name())
        .with_publication(format!("pub_{}", db.name()))
}

/// Polls `check` until it holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn confirmed_flush(admin: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = admin
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot query");
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|s| s.parse().expect("server lsn parses"))
}

async fn lsn_of(admin: &tokio_postgres::Client, sql: &str) -> Lsn {
    let text: String = admin.query_one(sql, &[]).await.expect("lsn query").get(0);
    text.parse().expect("server lsn parses")
}

/// The next XLogData, skipping keepalives.
async fn next_xlog(stream: &mut ReplicationStream) -> XLogData {
    let wait = async {
        loop {
            match stream.recv().await {
                Some(Ok(StreamEvent::XLogData(x))) => return x,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("stream failed: {e}"),
                None => panic!("stream ended"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("xlogdata within the patience bound")
}

/// Markers like `m00042` found in the text of an XLogData message.
fn markers(x: &XLogData, out: &mut BTreeSet<u32>) {
    let d = &x.data;
    for i in 0..d.len().saturating_sub(5) {
        if d[i] == b'm' && d[i + 1..i + 6].iter().all(u8::is_ascii_digit) {
            if let Ok(n) = std::str::from_utf8(&d[i + 1..i + 6]).unwrap_or("x").parse() {
                out.insert(n);
            }
        }
    }
}

async fn setup_table(admin: &tokio_postgres::Client, publication: &str) {
    admin
        .batch_execute(&format!(
            "CREATE TABLE items (id serial PRIMARY KEY, label text NOT NULL);
             CREATE TABLE noise (id serial PRIMARY KEY, v text);
             CREATE PUBLICATION \"{publication}\" FOR TABLE items;"
        ))
        .await
        .expect("schema");
}

async fn insert_marker(admin: &tokio_postgres::Client, n: u32) {
    admin
        .execute(
            "INSERT INTO items (label) VALUES ($1)",
            &[&format!("m{n:05}")],
        )
        .await
        .expect("insert");
}

async fn start_stream(cfg: &ReplicationConfig) -> ReplicationStream {
    let mut client = connect(cfg).await.expect("connect");
    client.check_wal_level().await.expect("wal_level");
    client.ensure_publication().await.expect("publication");
    client.ensure_slot().await.expect("slot");
    client.start(Lsn(0)).await.expect("start")
}

#[tokio::test]
async fn identify_system_over_trust() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let mut client = connect(&config(&db)).await?;
    assert_eq!(client.auth_method(), "trust");
    let id = client.identify_system().await?;
    let system_id: String = admin
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(id.system_id, system_id);
    assert_eq!(id.timeline, 1);
    assert!(id.xlogpos > Lsn(0));
    assert_eq!(id.dbname.as_deref(), Some(db.name()));
    assert!(client.backend_pid() > 0);
    assert_eq!(client.parameter("TimeZone"), Some("UTC"));
    assert_eq!(client.parameter("DateStyle"), Some("ISO, MDY"));
    assert_eq!(client.parameter("client_encoding"), Some("UTF8"));
    client.check_wal_level().await?;
    let rows = client.simple_query("SHOW bytea_output").await?;
    assert_eq!(rows[0].values()[0].as_deref(), Some("hex"));
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn creates_publication_and_slot_once() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db);
    let mut client = connect(&cfg).await?;
    assert_eq!(
        client.ensure_publication().await?,
        PublicationStatus::Created
    );
    assert_eq!(
        client.ensure_publication().await?,
        PublicationStatus::Existing
    );
    let all: bool = admin
        .query_one(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await?
        .get(0);
    assert!(all);

    let created = client.ensure_slot().await?;
    let SlotStatus::Created { consistent_point } = created else {
        panic!("expected a new slot, got {created:?}");
    };
    assert!(consistent_point > Lsn(0));
    let row = admin
        .query_one(
            "SELECT plugin, temporary, active FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "pgoutput");
    assert!(!row.get::<_, bool>(1));
    assert!(!row.get::<_, bool>(2));
    client.close().await;

    let mut again = connect(&cfg).await?;
    match again.ensure_slot().await? {
        SlotStatus::Existing { confirmed_flush } => {
            assert_eq!(confirmed_flush, Some(consistent_point))
        }
        other => panic!("expected the existing slot, got {other:?}"),
    }
    again.close().await;
    Ok(())
}

#[tokio::test]
async fn missing_publication_without_rights_names_the_sql() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let role = format!("norights_{}", db.name());
    admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN REPLICATION"))
        .await?;
    let cfg = ReplicationConfig::from_url(&db.url_as(&role, None))?
        .with_slot(db.name())
        .with_publication("walcast \"odd\" name");
    let expected_sql = "CREATE PUBLICATION \"walcast \"\"odd\"\" name\" FOR ALL TABLES;";

    let mut client = connect(&cfg).await?;
    let err = client.ensure_publication().await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::PublicationMissing { .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains(expected_sql), "{msg}");
    assert!(msg.contains("may not create it"), "{msg}");

    let mut forbidden = connect(&cfg.clone().with_create_publication(false)).await?;
    let err = forbidden.ensure_publication().await.unwrap_err();
    assert!(err.to_string().contains(expected_sql), "{err}");
    assert!(err.to_string().contains("not allowed"), "{err}");
    client.close().await;
    forbidden.close().await;
    Ok(())
}

#[tokio::test]
async fn streams_begin_insert_commit_and_confirms_after_hand_on() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db).with_status_interval(Duration::from_secs(1));
    setup_table(&admin, &cfg.publication).await;
    let mut stream = start_stream(&cfg).await;

    insert_marker(&admin, 1).await;
    let mut decoder = Decoder::new();
    let mut kinds = Vec::new();
    let mut seen = BTreeSet::new();
    let commit_end = loop {
        let x = next_xlog(&mut stream).await;
        markers(&x, &mut seen);
        let msg = decoder.decode(&x.data)?;
        kinds.push(msg.kind());
        if let LogicalMessage::Commit(c) = msg {
            break c.end_lsn;
        }
    };
    assert_eq!(kinds, ["begin", "relation", "insert", "commit"]);
    assert_eq!(seen, BTreeSet::from([1]));

    // Received but not handed on: flush must not have moved past the commit.
    assert!(stream.sent_flush() < commit_end);
    assert!(stream.in_transaction());
    stream.mark_handed_on();
    assert_eq!(stream.handed_on(), commit_end);
    assert!(!stream.in_transaction());
    eventually("confirmed_flush_lsn to reach the commit end", || async {
        confirmed_flush(&admin, &cfg.slot)
            .await
            .is_some_and(|l| l >= commit_end)
    })
    .await;

    let confirmed = stream.shutdown().await?;
    assert!(confirmed >= commit_end);
    eventually("the slot to be released", || async {
        !admin
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.slot],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(true)
    })
    .await;
    assert!(confirmed_flush(&admin, &cfg.slot).await >= Some(confirmed));
    Ok(())
}

/// Read XLogData until the commit of one transaction; its end LSN.
async fn next_commit(stream: &mut ReplicationStream, decoder: &mut Decoder) -> Lsn {
    loop {
        let x = next_xlog(stream).await;
        if let Ok(LogicalMessage::Commit(c)) = decoder.decode(&x.data) {
            return c.end_lsn;
        }
    }
}

#[tokio::test]
async fn held_commits_are_confirmed_only_on_release() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db).with_status_interval(Duration::from_millis(200));
    setup_table(&admin, &cfg.publication).await;
    let mut stream = start_stream(&cfg).await;
    let mut decoder = Decoder::new();

    insert_marker(&admin, 1).await;
    insert_marker(&admin, 2).await;
    let first = next_commit(&mut stream, &mut decoder).await;
    // The consumer gathers the first transaction with the next one: receiving past the
    // first commit must not confirm it.
    stream.hold();
    let second = next_commit(&mut stream, &mut decoder).await;
    assert!(second > first);
    assert!(
        stream.handed_on() < first,
        "a held commit was declared handed on"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        confirmed_flush(&admin, &cfg.slot).await < Some(first),
        "a held commit reached the server"
    );
    // Both transactions handed on: releasing confirms the first; the next recv (or an
    // explicit mark) confirms the second, as without holding.
    stream.release();
    // At least the first commit; possibly a keepalive position received between the two
    // transactions (safe too: everything before it was handed on), never the second commit.
    let released = stream.handed_on();
    assert!(
        released >= first && released < second,
        "{released} after release; commits at {first} and {second}"
    );
    stream.mark_handed_on();
    assert_eq!(stream.handed_on(), second);
    eventually("confirmed_flush_lsn to reach the second commit", || async {
        confirmed_flush(&admin, &cfg.slot)
            .await
            .is_some_and(|l| l >= second)
    })
    .await;
    stream.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn idle_database_confirms_keepalive_position() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db).with_status_interval(Duration::from_secs(1));
    setup_table(&admin, &cfg.publication).await;
    let mut stream = start_stream(&cfg).await;
    let start = confirmed_flush(&admin, &cfg.slot)
        .await
        .expect("slot exists");

    // Writes only to a table outside the publication: pgoutput sends no transaction.
    for i in 0..5 {
        admin
            .execute("INSERT INTO noise (v) VALUES ($1)", &[&i.to_string()])
            .await?;
    }
    let target = lsn_of(&admin, "SELECT pg_current_wal_insert_lsn()::text").await;
    admin
        .execute("INSERT INTO noise (v) VALUES ('last')", &[])
        .await?;
    assert!(target > start);

    let pump = tokio::spawn(async move {
        let mut xlog = 0usize;
        while let Some(event) = stream.recv().await {
            match event {
                Ok(StreamEvent::XLogData(_)) => xlog += 1,
                Ok(_) => {}
                Err(e) => panic!("stream failed: {e}"),
            }
        }
        xlog
    });
    eventually(
        "confirmed_flush_lsn to pass the unpublished writes",
        || async {
            confirmed_flush(&admin, &cfg.slot)
                .await
                .is_some_and(|l| l >= target)
        },
    )
    .await;
    pump.abort();
    match pump.await {
        Ok(xlog) => panic!("pump ended on its own after {xlog} messages"),
        Err(e) => assert!(e.is_cancelled()),
    }
    Ok(())
}

#[tokio::test]
async fn slot_in_use_is_fatal() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db);
    setup_table(&admin, &cfg.publication).await;
    let stream = start_stream(&cfg).await;

    let mut second = connect(&cfg).await?;
    let err = second.ensure_slot().await.unwrap_err();
    match &err {
        ReplicationError::SlotInUse { slot, pid } => {
            assert_eq!(slot, &cfg.slot);
            assert_eq!(*pid, Some(stream.backend_pid()));
        }
        other => panic!("expected SlotInUse, got {other:?}"),
    }
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&cfg.slot));

    // Straight to START_REPLICATION: the server's 55006 maps to the same error.
    let err = match second.start(Lsn(0)).await {
        Ok(_) => panic!("a second stream on a busy slot started"),
        Err(e) => e,
    };
    assert!(
        matches!(err, ReplicationError::SlotInUse { pid: Some(p), .. } if p == stream.backend_pid()),
        "{err:?}"
    );
    assert!(!err.is_transient());

    // The Replicator gives up instead of retrying forever.
    let mut replicator = Replicator::new(cfg.clone());
    let first = tokio::time::timeout(PATIENCE, replicator.recv()).await?;
    assert!(matches!(
        first,
        Some(Err(ReplicationError::SlotInUse { .. }))
    ));
    assert!(replicator.recv().await.is_none());
    stream.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn reconnects_after_terminate_without_losing_commits() -> TestResult {
    let cluster = PgCluster::shared();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let app = format!("rt_{}", db.name());
    let cfg = ReplicationConfig::from_url(&format!("{}?application_name={app}", db.url()))?
        .with_slot(db.name())
        .with_publication(format!("pub_{}", db.name()))
        .with_status_interval(Duration::from_secs(1));
    setup_table(&admin, &cfg.publication).await;
    let mut replicator = Replicator::new(cfg.clone());

    let mut seen = BTreeSet::new();
    let mut reconnected = 0;
    let mut collect = |event: StreamEvent, seen: &mut BTreeSet<u32>| match event {
        StreamEvent::XLogData(x) => markers(&x, seen),
        StreamEvent::Reconnected { .. } => reconnected += 1,
        StreamEvent::Keepalive { .. }
        | StreamEvent::Disconnected { .. }
        | StreamEvent::SlotRecreated => {}
    };
    // Connects and starts streaming.
    let first = tokio::time::timeout(PATIENCE, replicator.recv()).await?;
    collect(first.expect("event")?, &mut seen);
    let first_pid = replicator.backend_pid().expect("streaming");

    for n in 1..=5 {
        insert_marker(&admin, n).await;
    }
    while seen.len() < 5 {
        let event = tokio::time::timeout(PATIENCE, replicator.recv()).await?;
        collect(event.expect("event")?, &mut seen);
    }

    let killed = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = $1",
            &[&app],
        )
        .await?;
    assert_eq!(killed, 1);
    for n in 6..=10 {
        insert_marker(&admin, n).await;
    }
    while seen.len() < 10 {
        let event = tokio::time::timeout(PATIENCE, replicator.recv()).await?;
        collect(event.expect("event")?, &mut seen);
    }
    assert_eq!(seen, (1..=10).collect::<BTreeSet<u32>>());
    assert_eq!(reconnected, 1);
    assert_ne!(replicator.backend_pid(), Some(first_pid));
    replicator.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn keeps_feedback_flowing_while_the_consumer_stalls() -> TestResult {
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![("wal_sender_timeout".into(), "2s".into())],
        ..Default::default()
    })?;
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db).with_channel_capacity(4);
    setup_table(&admin, &cfg.publication).await;
    let mut stream = start_stream(&cfg).await;
    let pid = stream.backend_pid();

    admin
        .batch_execute(
            "INSERT INTO items (label) SELECT 'm' || lpad(g::text, 5, '0') FROM generate_series(1, 300) g",
        )
        .await?;
    // Not pulling for more than twice wal_sender_timeout, with the channel full.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut seen = BTreeSet::new();
    loop {
        let x = next_xlog(&mut stream).await;
        markers(&x, &mut seen);
        if x.data.first() == Some(&b'C') {
            break;
        }
    }
    assert_eq!(seen, (1..=300).collect::<BTreeSet<u32>>());
    let alive: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE pid = $1",
            &[&pid],
        )
        .await?
        .get(0);
    assert_eq!(alive, 1, "the walsender timed us out");
    stream.shutdown().await?;
    Ok(())
}

/// Roles for each password method on one cluster (wal_level=replica, to check that too).
#[tokio::test]
async fn password_methods_and_failures() -> TestResult {
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![
            ("wal_level".into(), "replica".into()),
            ("password_encryption".into(), "md5".into()),
        ],
        hba: vec![
            "local all all trust".into(),
            "host all postgres 127.0.0.1/32 trust".into(),
            "host all pw_user 127.0.0.1/32 password".into(),
            "host all md5_user 127.0.0.1/32 md5".into(),
            "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
        ],
        ssl: false,
    })?;
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    admin
        .batch_execute(
            "CREATE ROLE pw_user LOGIN REPLICATION PASSWORD 'pw secret';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram secret';",
        )
        .await?;
    let stored: String = admin
        .query_one(
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(stored, "md5");

    for (user, password, method) in [
        ("pw_user", "pw%20secret", "password"),
        ("md5_user", "md5%20secret", "md5"),
        ("scram_user", "scram%20secret", "SCRAM-SHA-256"),
    ] {
        let cfg = ReplicationConfig::from_url(&db.url_as(user, Some(password)))?;
        let mut client = connect(&cfg).await?;
        assert_eq!(client.auth_method(), method);
        assert!(!client.is_tls());
        let id = client.identify_system().await?;
        assert_eq!(id.dbname.as_deref(), Some(db.name()), "{user}");
        let err = client.check_wal_level().await.unwrap_err();
        assert!(matches!(&err, ReplicationError::WalLevel(l) if l == "replica"));
        assert!(!err.is_transient());
        assert!(
            err.to_string()
                .contains("ALTER SYSTEM SET wal_level = logical"),
            "{err}"
        );
        client.close().await;
    }

    for user in ["pw_user", "md5_user", "scram_user"] {
        let cfg = ReplicationConfig::from_url(&db.url_as(user, Some("wrong")))?;
        let err = connect(&cfg).await.err().expect("wrong password rejected");
        assert!(
            matches!(&err, ReplicationError::AuthFailed { user: u, .. } if u == user),
            "{err:?}"
        );
        assert!(!err.is_transient());
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("authentication failed for user \"{user}\"")),
            "{msg}"
        );
        assert!(!msg.contains("wrong"), "password leaked into: {msg}");
    }

    let cfg = ReplicationConfig::from_url(&db.url_as("md5_user", None))?;
    let err = connect(&cfg).await.err().expect("password required");
    assert!(
        matches!(err, ReplicationError::PasswordRequired(_)),
        "{err:?}"
    );
    assert!(!err.is_transient());

    let cfg = ReplicationConfig::from_url(&format!(
        "postgres://postgres@127.0.0.1:{}/no_such_db",
        cluster.port()
    ))?;
    let err = connect(&cfg).await.err().expect("missing database");
    assert!(
        matches!(&err, ReplicationError::DatabaseMissing(d) if d == "no_such_db"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    Ok(())
}

#[tokio::test]
async fn tls_modes() -> TestResult {
    let cluster = PgCluster::start(ClusterOptions {
        ssl: true,
        hba: vec![
            "local all all trust".into(),
            "hostnossl all postgres 127.0.0.1/32 trust".into(),
            "hostssl all all 127.0.0.1/32 scram-sha-256".into(),
        ],
        ..Default::default()
    })?;
    let cert = cluster
        .ssl_cert_path()
        .expect("ssl cluster has a certificate")
        .to_path_buf();
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    admin
        .batch_execute("CREATE ROLE tls_user LOGIN REPLICATION PASSWORD 'tls secret'")
        .await?;
    let port = cluster.port();
    let name = db.name();

    let cases = [
        format!("postgres://tls_user:tls%20secret@127.0.0.1:{port}/{name}?sslmode=require"),
        format!("postgres://tls_user:tls%20secret@127.0.0.1:{port}/{name}"),
        format!(
            "postgres://tls_user:tls%20secret@localhost:{port}/{name}?sslmode=verify-full&sslrootcert={}",
            cert.display()
        ),
        format!(
            "postgres://tls_user:tls%20secret@127.0.0.1:{port}/{name}?sslmode=verify-ca&sslrootcert={}",
            cert.display()
        ),
    ];
    for url in &cases {
        let cfg = ReplicationConfig::from_url(url)?;
        let mut client = connect(&cfg).await.unwrap_or_else(|e| panic!("{cfg}: {e}"));
        let id = client.identify_system().await?;
        assert_eq!(id.dbname.as_deref(), Some(name));
        assert!(client.is_tls());
        // The server offers -PLUS over TLS; binding to its certificate must verify.
        assert_eq!(client.auth_method(), "SCRAM-SHA-256-PLUS");
        let ssl: bool = admin
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = $1",
                &[&client.backend_pid()],
            )
            .await?
            .get(0);
        assert!(ssl, "{cfg} is not encrypted");
        client.close().await;
    }

    // The cluster's self-signed certificate is not in the webpki roots.
    let cfg = ReplicationConfig::from_url(&format!(
        "postgres://tls_user:tls%20secret@localhost:{port}/{name}?sslmode=verify-full"
    ))?;
    let err = connect(&cfg).await.err().expect("untrusted certificate");
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
    assert!(!err.is_transient());

    // Trusted certificate, wrong host name: verify-full refuses, verify-ca accepts.
    let wrong_name = |mode: &str| {
        ReplicationConfig::from_url(&format!(
            "postgres://tls_user:tls%20secret@db.invalid:{port}/{name}?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
            cert.display()
        ))
    };
    let err = connect(&wrong_name("verify-full")?)
        .await
        .err()
        .expect("verify-full accepted a certificate for another host");
    assert!(
        matches!(&err, ReplicationError::Tls(m) if m.contains("NotValidForName") || m.contains("not valid for name")),
        "{err:?}"
    );
    connect(&wrong_name("verify-ca")?).await?.close().await;

    // Without TLS the hba has no line for tls_user.
    let cfg = ReplicationConfig::from_url(&format!(
        "postgres://tls_user:tls%20secret@127.0.0.1:{port}/{name}?sslmode=disable"
    ))?;
    let err = connect(&cfg).await.err().expect("no hba line without tls");
    assert!(
        matches!(err, ReplicationError::AuthFailed { .. }),
        "{err:?}"
    );
    Ok(())
}

/// A fake walsender that authenticates (trust), answers START_REPLICATION with 'W' and then
/// never says anything again, reporting the status updates it reads.
async fn silent_walsender(
    listener: tokio::net::TcpListener,
    updates: tokio::sync::mpsc::UnboundedSender<walcast_pgoutput::StandbyStatusUpdate>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut sock, _) = listener.accept().await?;
    let len = sock.read_i32().await?;
    let mut startup = vec![0; usize::try_from(len - 4).unwrap_or(0)];
    sock.read_exact(&mut startup).await?;
    // AuthenticationOk, ReadyForQuery(idle).
    sock.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
        .await?;
    loop {
        let tag = sock.read_u8().await?;
        let len = sock.read_i32().await?;
        let mut body = vec![0; usize::try_from(len - 4).unwrap_or(0)];
        sock.read_exact(&mut body).await?;
        match tag {
            // CopyBothResponse: binary, no columns.
            b'Q' => sock.write_all(&[b'W', 0, 0, 0, 7, 1, 0, 0]).await?,
            b'd' => {
                let update = walcast_pgoutput::StandbyStatusUpdate::parse(&body)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let _ = updates.send(update);
            }
            _ => return Ok(()),
        }
    }
}

#[tokio::test]
async fn silent_server_is_detected_after_pings() -> TestResult {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, mut updates) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(silent_walsender(listener, tx));

    let cfg = ReplicationConfig::from_url(&format!(
        "postgres://walcast@127.0.0.1:{port}/db?sslmode=disable"
    ))?
    .with_status_interval(Duration::from_millis(200))
    .with_server_timeout(Duration::from_secs(1));
    let client = connect(&cfg).await?;
    let mut stream = client.start(Lsn(0x10)).await?;
    let event = tokio::time::timeout(PATIENCE, stream.recv())
        .await?
        .expect("an error, not the end");
    let err = event.expect_err("the server said nothing");
    assert!(
        matches!(err, ReplicationError::ServerSilent(d) if d == Duration::from_secs(1)),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(stream.recv().await.is_none());

    let mut seen = Vec::new();
    while let Ok(update) = updates.try_recv() {
        seen.push(update);
    }
    // The first update says where we stand; later ones ask the quiet server for a reply.
    let first = seen.first().expect("status updates were sent");
    assert_eq!(first.flush, Lsn(0x10));
    assert!(first.write >= first.flush);
    assert!(seen.iter().any(|u| u.reply_requested), "{seen:?}");
    server.abort();
    Ok(())
}

/// A confirm ceiling holds the slot back (a restarted consumer can read again what it may
/// still need), yet it never keeps Postgres from a fast shutdown: the walsender waits for
/// the client to confirm everything it sent before it exits, and the stream answers that
/// wait without moving the slot.
#[tokio::test]
async fn a_confirm_ceiling_holds_the_slot_back_without_blocking_a_fast_shutdown() -> TestResult {
    let cluster = std::sync::Arc::new(PgCluster::start(ClusterOptions::default())?);
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    let cfg = config(&db).with_status_interval(Duration::from_millis(200));
    setup_table(&admin, &cfg.publication).await;
    let mut stream = start_stream(&cfg).await;
    let mut decoder = Decoder::new();

    insert_marker(&admin, 1).await;
    let first = next_commit(&mut stream, &mut decoder).await;
    cfg.confirm_ceiling.set(Some(first));
    insert_marker(&admin, 2).await;
    insert_marker(&admin, 3).await;
    next_commit(&mut stream, &mut decoder).await;
    let third = next_commit(&mut stream, &mut decoder).await;
    stream.mark_handed_on();
    assert_eq!(stream.handed_on(), third);
    eventually("the slot to confirm the first commit", || async {
        confirmed_flush(&admin, &cfg.slot).await == Some(first)
    })
    .await;
    // Several status updates later it still has not moved past the ceiling.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(confirmed_flush(&admin, &cfg.slot).await, Some(first));

    // The consumer keeps reading while Postgres shuts down.
    let reader = tokio::spawn(async move {
        while let Some(event) = stream.recv().await {
            if event.is_err() {
                break;
            }
        }
    });
    drop(admin);
    let stopping = cluster.clone();
    let stopped = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || stopping.pg_stop(walcast_testkit::StopMode::Fast)),
    )
    .await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "a fast shutdown must finish while the ceiling holds confirmations back: {stopped:?}"
    );
    reader.abort();
    cluster.pg_start()?;
    let admin = db.connect().await?;
    // Postgres may restart the slot from the position it last saved, which can be earlier:
    // never later than the ceiling.
    let after = confirmed_flush(&admin, &cfg.slot).await;
    assert!(
        after.is_some_and(|l| l <= first),
        "the slot kept the WAL after the ceiling: {after:?} > {first}"
    );
    Ok(())
}
