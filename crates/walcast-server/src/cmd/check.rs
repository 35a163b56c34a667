//! `walcast check`: diagnose a database before (or while) walcast streams from it.
//!
//! Each finding is one line: `ok`, `warn` or `error`, what was found, and for problems the
//! SQL that fixes it. The exit status is non-zero when an `error` would stop walcast from
//! streaming. Identifiers in the suggested SQL are quoted by Postgres itself (`format('%I')`).
//!
//! With `--redis-url` it also reports the cluster (see [`crate::cluster::inspect`]): Redis's
//! round trip, the live nodes, which node holds the streamer lease and since when, whether
//! it streams, and the change stream's length and last entry. Unreachable Redis is an error.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use walcast_replication::ReplicationConfig;

use crate::authz::rls;
use crate::authz::shape::{self, ShapeColumn};
use crate::cli::{CheckArgs, ClusterArgs};
use crate::cluster::inspect::{inspect, ClusterView};
use crate::cluster::Cluster;
use crate::db::sql;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Error,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub message: String,
    pub fix: Option<String>,
}

impl Finding {
    fn new(level: Level, message: impl Into<String>, fix: Option<String>) -> Finding {
        Finding {
            level,
            message: message.into(),
            fix,
        }
    }
}

/// Run every check against the database.
pub async fn diagnose(
    client: &tokio_postgres::Client,
    publication: &str,
    slot: &str,
) -> Result<Vec<Finding>> {
    let mut out = Vec::new();

    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level == "logical" {
        out.push(Finding::new(Level::Ok, "wal_level is logical", None));
    } else {
        out.push(Finding::new(
            Level::Error,
            format!("wal_level is '{wal_level}'; logical replication needs 'logical'"),
            Some("ALTER SYSTEM SET wal_level = logical; -- then restart Postgres".into()),
        ));
    }

    let row = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_catalog.pg_stat_replication)::int,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
    let (max_slots, used_slots, max_senders, used_senders, slot_exists): (
        i32,
        i32,
        i32,
        i32,
        bool,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let slots_needed = if slot_exists { 0 } else { 1 };
    if max_slots - used_slots >= slots_needed {
        out.push(Finding::new(
            Level::Ok,
            format!("replication slots: {used_slots} of {max_slots} used"),
            None,
        ));
    } else {
        out.push(Finding::new(
            Level::Error,
            format!("replication slots: all {max_slots} in use, none left for walcast"),
            Some(format!(
                "ALTER SYSTEM SET max_replication_slots = {}; -- then restart Postgres",
                max_slots + 4
            )),
        ));
    }
    if used_senders < max_senders {
        out.push(Finding::new(
            Level::Ok,
            format!("WAL senders: {used_senders} of {max_senders} busy"),
            None,
        ));
    } else {
        out.push(Finding::new(
            Level::Error,
            format!("WAL senders: all {max_senders} busy"),
            Some(format!(
                "ALTER SYSTEM SET max_wal_senders = {}; -- then restart Postgres",
                max_senders + 4
            )),
        ));
    }

    let publication_row = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete
             FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    let fix_pub: String = client
        .query_one(
            "SELECT format('CREATE PUBLICATION %I FOR ALL TABLES;', $1::text)",
            &[&publication],
        )
        .await?
        .get(0);
    match publication_row {
        None => out.push(Finding::new(
            Level::Warn,
            format!(
                "publication \"{publication}\" does not exist (walcast creates it when its role may)"
            ),
            Some(format!(
                "{fix_pub} -- or FOR TABLE with the tables clients may subscribe to"
            )),
        )),
        Some(r) => {
            let all: bool = r.get(0);
            let (ins, upd, del): (bool, bool, bool) = (r.get(1), r.get(2), r.get(3));
            out.push(Finding::new(
                Level::Ok,
                format!(
                    "publication \"{publication}\" exists ({})",
                    if all { "all tables" } else { "listed tables" }
                ),
                None,
            ));
            if !(ins && upd && del) {
                out.push(Finding::new(
                    Level::Warn,
                    format!("publication \"{publication}\" does not publish every INSERT, UPDATE and DELETE"),
                    Some(
                        client
                            .query_one(
                                "SELECT format('ALTER PUBLICATION %I SET (publish = ''insert, update, delete'');', $1::text)",
                                &[&publication],
                            )
                            .await?
                            .get(0),
                    ),
                ));
            }
        }
    }

    // Tables in the publication: replica identity, primary key, row-level security.
    let tables = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, c.relrowsecurity,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    format('%I.%I', n.nspname, c.relname)
             FROM pg_catalog.pg_publication_tables pt
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1
             ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    for t in &tables {
        let (schema, name, ident, rls, pk, quoted): (String, String, String, bool, bool, String) =
            (t.get(0), t.get(1), t.get(2), t.get(3), t.get(4), t.get(5));
        let full_fix = format!("ALTER TABLE {quoted} REPLICA IDENTITY FULL;");
        match (ident.as_str(), pk) {
            ("f", _) => out.push(Finding::new(
                Level::Ok,
                format!("{schema}.{name}: REPLICA IDENTITY FULL (UPDATE and DELETE carry the whole old row)"),
                None,
            )),
            ("d", true) | ("i", _) => out.push(Finding::new(
                Level::Ok,
                format!(
                    "{schema}.{name}: replica identity {} (old_record holds the key only; unchanged TOASTed columns are missing from UPDATE)",
                    if ident == "d" { "DEFAULT (primary key)" } else { "USING INDEX" }
                ),
                None,
            )),
            ("d", false) => out.push(Finding::new(
                Level::Error,
                format!("{schema}.{name}: no primary key and REPLICA IDENTITY DEFAULT: UPDATE and DELETE on it fail on the source while it is published, and its changes cannot be identified"),
                Some(format!("ALTER TABLE {quoted} ADD PRIMARY KEY (...); -- or: {full_fix}")),
            )),
            _ => out.push(Finding::new(
                Level::Warn,
                format!("{schema}.{name}: REPLICA IDENTITY NOTHING: UPDATE and DELETE on it fail on the source while it is published"),
                Some(full_fix.clone()),
            )),
        }
        if !rls {
            out.push(Finding::new(
                Level::Warn,
                format!("{schema}.{name}: row-level security is disabled: every role with SELECT on it sees every row"),
                Some(format!(
                    "ALTER TABLE {quoted} ENABLE ROW LEVEL SECURITY; -- and CREATE POLICY … FOR SELECT"
                )),
            ));
        } else {
            if ident != "f" {
                out.push(Finding::new(
                    Level::Warn,
                    format!("{schema}.{name}: row-level security is on but the old row is not logged: its DELETEs cannot be authorized and are not delivered"),
                    Some(full_fix),
                ));
            }
            out.push(policy_cost(client, &schema, &name, publication).await?);
        }
    }

    // The slot: lag and WAL retention.
    let slot_row = client
        .query_opt(
            "SELECT plugin::text, active, wal_status::text,
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::int8,
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::int8,
                    format('SELECT pg_drop_replication_slot(%L);', slot_name)
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    match slot_row {
        None => out.push(Finding::new(
            Level::Ok,
            format!("slot \"{slot}\" does not exist yet (walcast creates it)"),
            None,
        )),
        Some(r) => {
            let plugin: Option<String> = r.get(0);
            let active: bool = r.get(1);
            let wal_status: Option<String> = r.get(2);
            let lag: Option<i64> = r.get(3);
            let retained: Option<i64> = r.get(4);
            let drop_sql: String = r.get(5);
            if plugin.as_deref() != Some("pgoutput") {
                out.push(Finding::new(
                    Level::Error,
                    format!("slot \"{slot}\" uses plugin {plugin:?}, walcast needs pgoutput"),
                    Some(drop_sql.clone()),
                ));
            }
            match wal_status.as_deref() {
                Some("lost") => out.push(Finding::new(
                    Level::Error,
                    format!(
                        "slot \"{slot}\" is invalidated (wal_status lost): its changes are gone"
                    ),
                    Some(format!(
                        "{drop_sql} -- walcast then creates a new slot; clients must refetch"
                    )),
                )),
                Some("unreserved") => out.push(Finding::new(
                    Level::Warn,
                    format!("slot \"{slot}\" is about to lose WAL (wal_status unreserved)"),
                    None,
                )),
                _ => {}
            }
            out.push(Finding::new(
                Level::Ok,
                format!(
                    "slot \"{slot}\": {}, {} behind, {} of WAL retained, wal_status {}",
                    if active { "in use" } else { "idle" },
                    bytes(lag.unwrap_or(0)),
                    bytes(retained.unwrap_or(0)),
                    wal_status.as_deref().unwrap_or("unknown")
                ),
                None,
            ));
        }
    }
    Ok(out)
}

/// How the table's SELECT policies are evaluated: in process (rows routed by the claims'
/// values, cost independent of the number of users) or per user (one policy statement per
/// claims group per batch), naming each policy that keeps it per user and why.
async fn policy_cost(
    client: &tokio_postgres::Client,
    schema: &str,
    name: &str,
    publication: &str,
) -> Result<Finding> {
    // Deparsed as the server's compiler sees them (authz/rls.rs): with search_path =
    // pg_catalog, so every name outside pg_catalog comes out qualified.
    // One step after the other: a query given as text is parsed in a round trip of its own,
    // so pipelined beside the COMMIT it would run after it, outside the search_path.
    client
        .batch_execute("BEGIN READ ONLY; SET LOCAL search_path = pg_catalog")
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&schema, &name];
    let policies = client
        .query(
            "SELECT p.polname::text, p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid)
         FROM pg_catalog.pg_policy p
         JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND p.polcmd IN ('r', '*')
           AND p.polqual IS NOT NULL
         ORDER BY 1",
            &params,
        )
        .await;
    let columns = client
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                coalesce((SELECT co.collisdeterministic FROM pg_catalog.pg_collation co
                          WHERE co.oid = a.attcollation), true)
         FROM pg_catalog.pg_attribute a
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
            &params,
        )
        .await;
    client.batch_execute("COMMIT").await?;
    let (policies, columns) = (policies?, columns?);
    let columns: Vec<(String, String, bool)> = columns
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let shape_columns = ShapeColumn::of_catalog(&columns);
    let policies: Vec<(String, bool, String)> = policies
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if !policies.iter().any(|(_, permissive, _)| *permissive) {
        return Ok(Finding::new(
            Level::Ok,
            format!("{schema}.{name}: no permissive SELECT policy: no subscriber gets its rows"),
            None,
        ));
    }
    let quals: Vec<&str> = policies.iter().map(|(_, _, q)| q.as_str()).collect();
    let mut functions = rls::explain_inlined(client, &shape::called_functions(&quals)).await?;
    let member_names = shape::member_tables(&quals);
    functions.tables =
        rls::explain_member_tables(client, &member_names, publication, &functions).await?;
    functions.outer = Some(name.to_owned());
    let all: Vec<(bool, &str)> = policies.iter().map(|(_, p, q)| (*p, q.as_str())).collect();
    if let Some(shape) = shape::recognize_with(&all, &shape_columns, &functions) {
        let what = if shape.has_sets() {
            "compare columns with claims and with memberships the stream follows (sub-selects of a table published in full)"
        } else {
            "compare columns with claims"
        };
        return Ok(Finding::new(
            Level::Ok,
            format!("{schema}.{name}: its SELECT policies {what}: decided in process, whatever the number of users"),
            None,
        ));
    }
    let mut why = String::new();
    for (policy, _, qual) in &policies {
        if let Some(reason) = shape::why_per_user(qual, &shape_columns, &functions) {
            let _ = write!(why, "; policy \"{policy}\" {reason}");
        }
    }
    Ok(Finding::new(
        Level::Warn,
        format!("{schema}.{name}: rows are authorized per user (one policy query per distinct token per batch; slower as users grow){why}"),
        Some("-- where you can, write SELECT policies as column = claim comparisons, e.g. USING (owner = auth.uid()) or USING (tenant = (auth.jwt() ->> 'tenant')::int)".into()),
    ))
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n.max(0) as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Render findings as the CLI prints them.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok   ",
            Level::Warn => "warn ",
            Level::Error => "error",
        };
        let _ = writeln!(out, "{tag} {}", f.message);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "      fix: {fix}");
        }
    }
    out
}

/// How long `walcast check` waits for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// The cluster on `--redis-url`: Redis, the live nodes, the streamer, the change stream.
/// Unreachable Redis is an `error` (nodes cannot cluster); no node streaming while nodes are
/// live is a `warn` (postgres_changes do not flow, but walcast runs).
pub async fn diagnose_cluster(args: &CheckArgs) -> Vec<Finding> {
    let cluster_args = ClusterArgs {
        redis_url: args.redis_url.clone(),
        node_id: Some("walcast-check".into()),
        failover_timeout_secs: 5,
        presence_node_timeout_secs: args.presence_node_timeout_secs,
    };
    let cluster = match Cluster::from_args(&cluster_args, &args.slot) {
        Ok(Some(c)) => c,
        Ok(None) => return Vec::new(),
        Err(e) => return vec![Finding::new(Level::Error, e.to_string(), None)],
    };
    let addr = cluster.client().get_connection_info().addr().to_string();
    match inspect(&cluster, REDIS_TIMEOUT).await {
        Ok(view) => cluster_findings(
            &view,
            &addr,
            &args.slot,
            Duration::from_secs(args.presence_node_timeout_secs),
        ),
        Err(e) => vec![Finding::new(
            Level::Error,
            format!("redis at {addr} is unreachable: {e}"),
            Some("start Redis, or point --redis-url / REDIS_URL at the Redis the nodes use".into()),
        )],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Render what [`inspect`] read as findings.
pub fn cluster_findings(
    view: &ClusterView,
    addr: &str,
    slot: &str,
    node_timeout: Duration,
) -> Vec<Finding> {
    let mut out = vec![Finding::new(
        Level::Ok,
        format!("redis at {addr} answers (round trip {})", ms(view.rtt)),
        None,
    )];
    let live = view.live(node_timeout);
    let names: Vec<String> = live
        .iter()
        .map(|(n, at)| format!("{n} (seen {} ago)", secs(view.ago(*at))))
        .collect();
    if live.is_empty() {
        out.push(Finding::new(
            Level::Ok,
            format!(
                "cluster \"{slot}\": no live node (none heartbeated within {})",
                secs(node_timeout)
            ),
            None,
        ));
    } else {
        out.push(Finding::new(
            Level::Ok,
            format!(
                "cluster \"{slot}\": {} live node(s): {}",
                live.len(),
                names.join(", ")
            ),
            None,
        ));
    }
    let since = |node: &str| match &view.lease_since {
        Some((n, at)) if n == node => format!(" since {} ago", secs(view.ago(*at))),
        _ => String::new(),
    };
    match (&view.lease, &view.streaming) {
        (Some((node, left)), Some((marked, _))) if marked == node => out.push(Finding::new(
            Level::Ok,
            format!("streamer: {node} holds the lease{} (renewal due within {}) and streams the slot", since(node), secs(*left)),
            None,
        )),
        (Some((node, left)), _) => out.push(Finding::new(
            Level::Warn,
            format!("streamer: {node} holds the lease{} (renewal due within {}) but has not streamed the slot recently: postgres_changes are not flowing", since(node), secs(*left)),
            Some("see that node's log and /readyz: it cannot reach the database".into()),
        )),
        (None, _) if live.is_empty() => out.push(Finding::new(
            Level::Ok,
            "streamer: none (no node is running)",
            None,
        )),
        (None, _) => out.push(Finding::new(
            Level::Warn,
            "streamer: no node holds the lease: postgres_changes are not flowing",
            Some("see the nodes' logs and /readyz: none can stream the slot".into()),
        )),
    }
    match &view.last_entry {
        Some((at, end)) => out.push(Finding::new(
            Level::Ok,
            format!(
                "change stream: {} entries, the last one (commit end {end}) published {} ago",
                view.stream_len,
                secs(view.ago(*at))
            ),
            None,
        )),
        None => out.push(Finding::new(
            Level::Ok,
            format!("change stream: {} entries", view.stream_len),
            None,
        )),
    }
    out
}

pub async fn run(args: CheckArgs) -> Result<()> {
    let cfg = ReplicationConfig::from_url(&args.database_url)
        .map_err(|e| anyhow::anyhow!("invalid --database-url / DATABASE_URL: {e}"))?;
    let client = sql::connect(&cfg, "walcast check").await?;
    let mut findings = diagnose(&client, &args.publication, &args.slot).await?;
    findings.extend(diagnose_cluster(&args).await);
    print!("{}", render(&findings));
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    if errors > 0 {
        anyhow::bail!("{errors} problem(s) stop walcast from streaming; see the fixes above");
    }
    Ok(())
}
