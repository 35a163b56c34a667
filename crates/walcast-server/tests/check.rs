//! `walcast check` against real databases.

mod support;

use walcast_testkit::{ClusterOptions, PgCluster};

fn check(url: &str) -> support::Finished {
    let child = support::walcast()
        .args(["check", "--database-url", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_output(child, std::time::Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_publication_tables_identity_rls_and_slot() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    // Before anything exists: only a warning about the publication, and its fix.
    let out = check(db.url());
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("ok    wal_level is logical"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("fix: CREATE PUBLICATION walcast FOR ALL TABLES;"),
        "{}",
        out.stdout
    );

    sql.batch_execute(
        "CREATE TABLE open_t (id int PRIMARY KEY, v text);
         CREATE TABLE \"Secret T\" (id int PRIMARY KEY, owner text);
         ALTER TABLE \"Secret T\" ENABLE ROW LEVEL SECURITY;
         CREATE TABLE full_t (v text);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         ALTER TABLE full_t ENABLE ROW LEVEL SECURITY;
         CREATE PUBLICATION walcast FOR TABLE open_t, \"Secret T\", full_t;",
    )
    .await
    .unwrap();
    sql.batch_execute("SELECT pg_create_logical_replication_slot('walcast', 'pgoutput')")
        .await
        .unwrap();
    let out = check(db.url());
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    assert!(
        s.contains("publication \"walcast\" exists (listed tables)"),
        "{s}"
    );
    assert!(
        s.contains("warn  public.open_t: row-level security is disabled"),
        "{s}"
    );
    assert!(
        s.contains("fix: ALTER TABLE public.open_t ENABLE ROW LEVEL SECURITY;"),
        "{s}"
    );
    // RLS without a logged old row: deletes cannot be authorized; the fix quotes the name.
    assert!(
        s.contains("public.Secret T: row-level security is on but the old row is not logged"),
        "{s}"
    );
    assert!(
        s.contains("fix: ALTER TABLE public.\"Secret T\" REPLICA IDENTITY FULL;"),
        "{s}"
    );
    assert!(s.contains("public.full_t: REPLICA IDENTITY FULL"), "{s}");
    assert!(s.contains("slot \"walcast\": idle"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_an_error_with_its_fix() {
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![("wal_level".into(), "replica".into())],
        ..Default::default()
    })
    .unwrap();
    let db = cluster.fresh_database().await.unwrap();
    let out = check(db.url());
    assert!(!out.status.success());
    assert!(
        out.stdout.contains("error wal_level is 'replica'"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("fix: ALTER SYSTEM SET wal_level = logical;"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("walcast: 1 problem(s) stop walcast from streaming"),
        "{}",
        out.stderr
    );
}

/// `walcast check` says which tables' policies are decided in process and names each policy
/// that keeps a table on per-user evaluation, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_policies_evaluated_per_user_and_why() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute(
        "CREATE SCHEMA auth;
         CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
           SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                           (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid $$;
         CREATE FUNCTION is_mine(o uuid) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
           BEGIN RETURN o = auth.uid(); END $$;
         CREATE TABLE notes (id int PRIMARY KEY, owner uuid);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON notes FOR SELECT USING (owner = auth.uid());
         CREATE TABLE members (room int, who uuid, PRIMARY KEY (room, who));
         CREATE TABLE msgs (id int PRIMARY KEY, room int, owner uuid);
         ALTER TABLE msgs REPLICA IDENTITY FULL;
         ALTER TABLE msgs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON msgs FOR SELECT USING (owner = auth.uid());
         CREATE POLICY in_room ON msgs FOR SELECT
           USING (room IN (SELECT m.room FROM members m WHERE m.who = auth.uid()));
         CREATE POLICY by_fn ON msgs FOR SELECT USING (is_mine(owner));
         CREATE POLICY not_eq ON msgs FOR SELECT USING (owner <> auth.uid());
         CREATE TABLE crew (room int, who uuid, PRIMARY KEY (room, who));
         CREATE TABLE chat (id int PRIMARY KEY, room int);
         ALTER TABLE chat REPLICA IDENTITY FULL;
         ALTER TABLE chat ENABLE ROW LEVEL SECURITY;
         CREATE POLICY in_room ON chat FOR SELECT
           USING (room IN (SELECT c.room FROM crew c WHERE c.who = auth.uid()));
         CREATE POLICY in_room_too ON chat FOR SELECT
           USING (EXISTS (SELECT 1 FROM crew c WHERE c.room = chat.room AND c.who = auth.uid()));
         CREATE PUBLICATION walcast FOR TABLE notes, msgs, chat, crew;",
    )
    .await
    .unwrap();
    let out = check(db.url());
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let s = &out.stdout;
    assert!(
        s.contains("ok    public.notes: its SELECT policies compare columns with claims: decided in process"),
        "{s}"
    );
    let line = s
        .lines()
        .find(|l| l.starts_with("warn  public.msgs: rows are authorized per user"))
        .unwrap_or_else(|| panic!("no per-user line for msgs: {s}"));
    assert!(
        line.contains("policy \"in_room\" reads another table, public.members, whose changes walcast cannot follow"),
        "{line}"
    );
    // A membership table published in full: decided in process.
    assert!(
        s.contains("ok    public.chat: its SELECT policies compare columns with claims and with memberships"),
        "{s}"
    );
    assert!(
        line.contains("policy \"by_fn\" calls public.is_mine()"),
        "{line}"
    );
    assert!(
        line.contains("policy \"not_eq\" is not a comparison"),
        "{line}"
    );
    assert!(!line.contains("policy \"own\""), "{line}");
}
