//! Authorization of postgres_changes deliveries: table and column privileges, and row-level
//! security evaluated against the row image from the WAL.
//!
//! ```text
//!  pump: a transaction's changes (≤ BATCH_MAX at a time), each with its routed identities
//!    │
//!    ├─ per (role, table): TablePolicy (cached; dropped on the table's Relation message, TTL)
//!    │     SELECT on any column?     no ─▶ Deny
//!    │     column mask               has_column_privilege per column
//!    │     RLS applies?              off / BYPASSRLS / superuser / owner without FORCE ─▶ All
//!    │     SELECT policies           none permissive ─▶ Nothing; else one compiled predicate
//!    │
//!    ├─ per (table, identity) group: the images to check, as one JSON array of text values
//!    │     one statement per group, groups in parallel on the ExclusivePool:
//!    │       BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL ROLE "<role>"; SET LOCAL statement_timeout
//!    │       pg_current_snapshot(): must see every judged transaction, else all again shortly
//!    │       set_config('request.jwt.claims' | '.claim.sub' | '.claim.role', $n, true)
//!    │       SELECT ord FROM (<images cast to the column types>) AS "<table>" WHERE <policies>
//!    │       ROLLBACK
//!    │
//!    └─ per change, per identity: Access (Deny | Allow{columns, old_record}) ─▶ hub.deliver
//! ```
//!
//! Invariants:
//! - Default deny. No SELECT privilege, no permissive policy, an image that lacks a column the
//!   policies read, a DELETE without a full old row (REPLICA IDENTITY not FULL), a check that
//!   could not run: all deliver nothing.
//! - The WAL image is judged, not the table's current state: the row as it was committed is
//!   what the subscriber receives, so that is what the policies see. Policies that query
//!   other tables see those tables as they are when the check runs, and never before the
//!   commit of the row being judged: the walsender sends a transaction once its commit is
//!   flushed, a moment before other sessions can see it, so the policies (compiled) and
//!   the checks (run) use a snapshot that is verified to see the judged transactions
//!   (tests `a_policy_change_decoded_before_it_is_visible_still_applies`,
//!   `a_membership_removed_with_the_row_keeps_the_row_from_the_former_member`).
//! - Batching: one statement per (batch, table, role + claims), never one per row per
//!   subscriber. Subscribers with equal role and claims share the result.
//! - Isolation: each group runs in its own transaction with its own role and claims (set with
//!   `LOCAL`, discarded by the ROLLBACK: nothing carries over to the next group, the Supabase
//!   #2008 class of leak). A group whose check fails only denies (and stops) that identity.
//! - Nothing from a client or a token is pasted into SQL: the role is a quoted identifier,
//!   claims and row values are bound parameters. The policy expressions are spliced in, and
//!   they come from `pg_policy`, written by the database owner.
//! - UPDATE: the new row decides delivery; the old row (REPLICA IDENTITY FULL) is checked too
//!   and, when the identity may not see it, `old_record` shrinks to the key columns.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use walcast_core::change::{Change, ChangeKind, Table, Value};
use walcast_core::hub::{Access, Identity, Visibility};
use walcast_pgoutput::ReplicaIdentity;

use super::shape::{self, Derived, Shape, ShapeColumn, TermValue};
use crate::db::sql::ExclusivePool;

/// Longest one authorization statement may run.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a compiled policy set is reused without a Relation message invalidating it.
/// CREATE/ALTER/DROP POLICY, ENABLE/FORCE ROW LEVEL SECURITY and GRANT/REVOKE on the table
/// invalidate its relcache, so pgoutput sends its Relation message again before its next
/// change and the pump forgets the compiled policy at exactly that point (test
/// `a_policy_change_applies_from_its_commit`). This limit bounds what touches no table:
/// role membership (`GRANT role TO role`) and role attributes (`BYPASSRLS`, `SUPERUSER`).
pub const POLICY_TTL: Duration = Duration::from_secs(10);

/// Why an authorization step did not produce an answer, by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthzError {
    /// The check could not run (no connection, server shutting down, out of resources):
    /// deliver nothing this time and keep the subscription; the next batch tries again.
    #[error("authorization unavailable: {0}")]
    Unavailable(String),
    /// The check ran and failed for this identity (a policy raised, timed out, or the
    /// role or claims are unusable): deliver nothing and stop the identity's bindings.
    #[error("authorization check failed ({code}): {message}")]
    Failed { code: String, message: String },
}

impl AuthzError {
    pub fn from_pg(e: &tokio_postgres::Error) -> AuthzError {
        match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // Connection, resource and operator-intervention classes are about the
                // server, not about this identity (57014, statement timeout, is the policy's).
                let server_side = code.starts_with("08")
                    || code.starts_with("53")
                    || (code.starts_with("57") && *db.code() != SqlState::QUERY_CANCELED);
                if server_side {
                    AuthzError::Unavailable(db.message().to_string())
                } else {
                    AuthzError::Failed {
                        code: code.to_string(),
                        message: db.message().to_string(),
                    }
                }
            }
            None => AuthzError::Unavailable(e.to_string()),
        }
    }
}

/// One SELECT policy as the catalog gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyExpr {
    pub permissive: bool,
    /// `pg_get_expr(polqual, polrelid)`, deparsed with `search_path = pg_catalog`.
    pub qual: String,
}

/// The row predicate of a set of policies, as Postgres combines them for a SELECT: the
/// permissive ones OR'd, the restrictive ones AND'd onto that. `None` when no permissive
/// policy applies, which means no row is visible.
pub fn combine(policies: &[PolicyExpr]) -> Option<String> {
    let permissive: Vec<&str> = policies
        .iter()
        .filter(|p| p.permissive)
        .map(|p| p.qual.as_str())
        .collect();
    if permissive.is_empty() {
        return None;
    }
    let mut out = String::from("(");
    for (i, q) in permissive.iter().enumerate() {
        if i > 0 {
            out.push_str(" OR ");
        }
        let _ = write!(out, "({q})");
    }
    out.push(')');
    for p in policies.iter().filter(|p| !p.permissive) {
        let _ = write!(out, " AND ({})", p.qual);
    }
    Some(out)
}

/// `"name"` with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// A column as the check statement rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckColumn {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, schema-qualified.
    pub type_sql: String,
    /// Index in the change's columns, or `None` for a column the stream does not carry
    /// (generated columns before Postgres 18): it is always NULL in the check.
    pub source: Option<usize>,
}

/// The statement that returns the ordinals of the images `predicate` accepts.
///
/// `$1` is the images' ordinals (`int8[]`); then one `text[]` per column the stream carries,
/// in `columns` order, each holding that column's text value per image (NULL when the image
/// has none). `ROWS FROM (unnest, …)` zips them back into rows, and each text goes through the column type's
/// input function (an explicit cast from text), exactly as Postgres parsed it. Arrays bind in
/// binary: no JSON to build on our side or to parse on the server's. The rebuilt row is named
/// like the table, because deparsed policies qualify its columns with the table name inside
/// sub-queries.
pub fn check_sql(table: &str, columns: &[CheckColumn], predicate: &str) -> String {
    let mut ord = String::from("walcast_ord");
    while columns.iter().any(|c| c.name == ord) {
        ord.push('_');
    }
    let alias = quote_ident(table);
    let ord_q = quote_ident(&ord);
    let mut sql = format!("SELECT {alias}.{ord_q} FROM (SELECT w.o AS {ord_q}");
    let mut arrays = String::from("pg_catalog.unnest($1::pg_catalog.int8[])");
    let mut names = String::from("o");
    let mut param = 1;
    for c in columns {
        match c.source {
            Some(_) => {
                param += 1;
                let _ = write!(
                    sql,
                    ", w.c{param}::{} AS {}",
                    c.type_sql,
                    quote_ident(&c.name)
                );
                let _ = write!(arrays, ", pg_catalog.unnest(${param}::pg_catalog.text[])");
                let _ = write!(names, ", c{param}");
            }
            None => {
                let _ = write!(sql, ", NULL::{} AS {}", c.type_sql, quote_ident(&c.name));
            }
        }
    }
    // The predicate is catalog text from pg_policy (written by the table's owner), never
    // anything a client sent.
    let _ = write!(
        sql,
        " FROM ROWS FROM ({arrays}) AS w({names})) AS {alias} WHERE {predicate}"
    );
    sql
}

/// What rows of a table an identity's role may see.
#[derive(Debug, Clone)]
pub enum RowRule {
    /// Every row (no RLS for this role).
    All,
    /// No row (RLS on, no permissive SELECT policy).
    Nothing,
    /// Rows the compiled policies accept.
    Check(Arc<RowCheck>),
}

#[derive(Debug)]
pub struct RowCheck {
    pub sql: String,
    /// Per column of the change: whether a policy reads it (an image without it is denied).
    pub reads: Vec<bool>,
    /// The change column behind each `text[]` parameter of `sql` ($2, $3, …).
    pub sources: Vec<usize>,
}

impl RowCheck {
    /// Parameter types of `sql`, for preparing it.
    fn param_types(&self) -> Vec<Type> {
        let mut types = Vec::with_capacity(1 + self.sources.len());
        types.push(Type::INT8_ARRAY);
        types.resize(1 + self.sources.len(), Type::TEXT_ARRAY);
        types
    }
}

/// A role's access to one table, compiled against the table as the stream describes it.
#[derive(Debug, Clone)]
pub struct TablePolicy {
    /// SELECT on the table or on at least one column.
    pub select: bool,
    /// Columns it may SELECT, `None` when all.
    pub columns: Option<Arc<[bool]>>,
    pub rows: RowRule,
    /// With a checked rule: the policies recognized as comparisons of columns with values
    /// derived from the claims alone, decided in process (see [`super::shape`]).
    pub shape: Option<Arc<Shape>>,
}

impl TablePolicy {
    /// Nothing: no SELECT, no row.
    pub const DENY: TablePolicy = TablePolicy {
        select: false,
        columns: None,
        rows: RowRule::Nothing,
        shape: None,
    };
}

const ACCESS_SQL: &str = "\
SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity,
       r.rolsuper OR r.rolbypassrls,
       pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE'),
       pg_catalog.has_any_column_privilege(r.oid, c.oid, 'SELECT'),
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT a.attnum::int4 FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT pg_catalog.has_column_privilege(r.oid, c.oid, a.attnum, 'SELECT')
             FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT COALESCE(co.collisdeterministic, true)
             FROM pg_catalog.pg_attribute a
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT')
FROM pg_catalog.pg_class c, pg_catalog.pg_roles r
WHERE c.oid = $2 AND r.rolname = $1";

// Policies that apply to a SELECT by the role: FOR SELECT or FOR ALL, to PUBLIC or to a role
// whose privileges it has (Postgres uses the same membership test).
const POLICIES_SQL: &str = "\
SELECT p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid),
       ARRAY(SELECT DISTINCT d.refobjsubid::int4 FROM pg_catalog.pg_depend d
             WHERE d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = p.oid
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refobjid = p.polrelid AND d.refobjsubid > 0)
FROM pg_catalog.pg_policy p
WHERE p.polrelid = $2 AND p.polcmd IN ('r', '*') AND p.polqual IS NOT NULL
  AND (0::pg_catalog.oid = ANY (p.polroles)
       OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) pr
                  WHERE pr <> 0 AND pg_catalog.pg_has_role($1::pg_catalog.name, pr, 'USAGE')))
ORDER BY p.polname";

/// The snapshot the catalog is read in, to compare with the change's transaction.
const SNAPSHOT_SQL: &str = "SELECT pg_catalog.pg_current_snapshot()::text";

/// Read the role's privileges and the table's policies, and compile them for `table` (the
/// stream's current description of it), as of no earlier than the commit of transaction
/// `xid` (the change being judged).
///
/// Why the wait: the walsender may send a transaction as soon as its commit record is
/// flushed, a moment before the committing backend makes it visible to other snapshots. A
/// policy read in that moment is the one from before the DDL the stream has just passed (the
/// Relation message that made the pump forget the old one), and the rows right after an
/// `ALTER POLICY` would be judged by the policy it replaced. So the catalog is read in one
/// REPEATABLE READ snapshot, and read again, after a short pause, while that snapshot does
/// not see `xid` yet.
pub async fn compile(
    pool: &ExclusivePool,
    role: &str,
    table: &Table,
    xid: u32,
) -> Result<TablePolicy, AuthzError> {
    compile_for(pool, role, table, xid, None).await
}

/// [`compile`], recognizing membership policies on tables `publication` streams in full
/// (without a publication, none: their changes could not be followed).
pub async fn compile_for(
    pool: &ExclusivePool,
    role: &str,
    table: &Table,
    xid: u32,
    publication: Option<&str>,
) -> Result<TablePolicy, AuthzError> {
    until_visible(|| compile_once(pool, role, table, xid, publication)).await
}

/// Run `attempt` until it answers (its snapshot saw the transactions it judges), pausing 1,
/// 2, 4 … 50 ms between attempts; after [`CHECK_TIMEOUT`] spent waiting the answer is
/// `Unavailable` (the caller tries again later and delivers nothing meanwhile).
///
/// Only the pauses count towards that limit, not the attempts: an attempt may itself take
/// up to [`CHECK_TIMEOUT`] (a slow policy runs into its statement timeout), and the gap
/// between a commit being streamed and being visible is milliseconds, so the attempt after
/// a slow one sees it. Counting the slow attempt made one slow policy report the whole
/// authorization pool unavailable, which let go of the stream (CI: `policy_sleeps`).
pub(crate) async fn until_visible<T, F, Fut>(mut attempt: F) -> Result<T, AuthzError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, AuthzError>>,
{
    let mut waited = Duration::ZERO;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(answer) = attempt().await? {
            return Ok(answer);
        }
        if waited >= CHECK_TIMEOUT {
            return Err(AuthzError::Unavailable(
                "the transactions to judge are committed in the stream but not yet visible".into(),
            ));
        }
        tracing::debug!(
            ?pause,
            "read before the judged transactions were visible; reading again"
        );
        tokio::time::sleep(pause).await;
        waited += pause;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One [`compile`] attempt: `None` when the snapshot does not see `xid` yet.
async fn compile_once(
    pool: &ExclusivePool,
    role: &str,
    table: &Table,
    xid: u32,
    publication: Option<&str>,
) -> Result<Option<TablePolicy>, AuthzError> {
    let mut lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    // Prepared first: a query given as text is parsed in a round trip of its own before it
    // runs, so pipelined beside the ROLLBACK below it would run after it, outside the
    // transaction and its search_path.
    let prepared = async {
        let snapshot = lease.prepare_cached(SNAPSHOT_SQL, &[]).await?;
        let access = lease.prepare_cached(ACCESS_SQL, &[]).await?;
        let policies = lease.prepare_cached(POLICIES_SQL, &[]).await?;
        Ok::<_, tokio_postgres::Error>((snapshot, access, policies))
    }
    .await;
    let (snapshot_sql, access_sql, policies_sql) = match prepared {
        Ok(p) => p,
        Err(err) => {
            let err = AuthzError::from_pg(&err);
            lease.discard();
            return Err(err);
        }
    };
    let client = lease.client();
    let relid = table.relation_id;
    // pg_catalog only: deparsed expressions and type names come out schema-qualified, so
    // they mean the same whatever search_path the check runs with.
    // One snapshot for the statements below (REPEATABLE READ), the one `snapshot` reports.
    let begin = client.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL search_path = pg_catalog",
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&role, &relid];
    let snapshot = client.query_one(&snapshot_sql, &[]);
    let access = client.query_opt(&access_sql, &params);
    let policies = client.query(&policies_sql, &params);
    let end = client.batch_execute("ROLLBACK");
    let (b, s, a, p, e) = tokio::join!(begin, snapshot, access, policies, end);
    if let Err(err) = b.as_ref().and(e.as_ref()) {
        let err = AuthzError::from_pg(err);
        lease.discard();
        return Err(err);
    }
    lease.done();
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
    let snapshot: String = s.and_then(|r| r.try_get(0)).map_err(get)?;
    let sees = crate::feed::snapshot::Xids::parse(&snapshot)
        .ok_or_else(|| AuthzError::Unavailable(format!("unreadable snapshot {snapshot:?}")))?;
    if !sees.sees(xid) {
        return Ok(None);
    }
    let row = a.map_err(|e| AuthzError::from_pg(&e))?;
    let functions = match &p {
        Ok(rows) => {
            let quals: Vec<String> = rows.iter().filter_map(|r| r.try_get(1).ok()).collect();
            let quals: Vec<&str> = quals.iter().map(String::as_str).collect();
            let mut functions = inline_functions(pool, &shape::called_functions(&quals)).await?;
            if let Some(publication) = publication {
                let names = shape::member_tables(&quals);
                functions.tables = member_tables(pool, &names, publication, &functions).await?;
            }
            functions
        }
        Err(_) => shape::Functions::default(),
    };
    from_catalog(role, table, row, p, &functions).map(Some)
}

/// The tables membership sub-selects read, as the catalog describes them (see
/// [`shape::MemberTable`]).
async fn member_tables(
    pool: &ExclusivePool,
    names: &[(String, String)],
    publication: &str,
    functions: &shape::Functions,
) -> Result<Vec<shape::MemberTable>, AuthzError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    match explain_member_tables(lease.client(), names, publication, functions).await {
        Ok(out) => {
            lease.done();
            Ok(out)
        }
        Err(err) => {
            let err = AuthzError::from_pg(&err);
            lease.discard();
            Err(err)
        }
    }
}

/// A membership table: whether its changes all reach the stream, its columns.
const MEMBER_TABLE_SQL: &str = "\
SELECT c.oid, c.relkind = 'r' AND NOT c.relhassubclass AND NOT c.relispartition,
       EXISTS (SELECT 1 FROM pg_catalog.pg_publication p
               WHERE p.pubname = $3 AND p.pubinsert AND p.pubupdate AND p.pubdelete
                 AND p.pubtruncate
                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr
                                 WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid
                                   AND pr.prqual IS NOT NULL)
                 AND (p.puballtables
                      OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr
                                 WHERE pr.prpubid = p.oid AND pr.prrelid = c.oid)
                      OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_namespace pn
                                 WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace))),
       c.relrowsecurity,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT COALESCE(co.collisdeterministic, true)
             FROM pg_catalog.pg_attribute a
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT pg_catalog.pg_get_expr(p.polqual, p.polrelid) FROM pg_catalog.pg_policy p
             WHERE p.polrelid = c.oid AND p.polcmd IN ('r', '*'))
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2";

/// [`member_tables`] on one connection (also `walcast check`'s). A table is fresh when its
/// changes all reach the stream and, if it has row-level security, every SELECT policy on
/// it (for any role) is claims-only: then a set derived from it changes only with a change
/// of it the stream shows. An error means the connection may be left inside a
/// transaction: do not use it again.
pub async fn explain_member_tables(
    client: &tokio_postgres::Client,
    names: &[(String, String)],
    publication: &str,
    functions: &shape::Functions,
) -> Result<Vec<shape::MemberTable>, tokio_postgres::Error> {
    let mut out = Vec::new();
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL search_path = pg_catalog",
        )
        .await?;
    for (schema, table) in names {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [schema, table, &publication];
        let row = match client.query_opt(MEMBER_TABLE_SQL, &params).await {
            Ok(Some(row)) => row,
            Ok(None) => continue,
            Err(err) => {
                // An older server without publication row filters or schemas: none.
                tracing::debug!(schema, table, error = %err, "membership table not readable");
                client.batch_execute("ROLLBACK").await?;
                return Ok(Vec::new());
            }
        };
        let relid: u32 = row.try_get(0)?;
        let plain: bool = row.try_get(1)?;
        let published: bool = row.try_get(2)?;
        let rls_on: bool = row.try_get(3)?;
        let names: Vec<String> = row.try_get(4)?;
        let types: Vec<String> = row.try_get(5)?;
        let deterministic: Vec<bool> = row.try_get(6)?;
        let quals: Vec<String> = row.try_get(7)?;
        let columns: Vec<(String, String, bool)> = names
            .into_iter()
            .zip(types)
            .zip(deterministic)
            .map(|((n, t), d)| (n, t, d))
            .collect();
        let shape_columns = ShapeColumn::of_catalog(&columns);
        // Its own policies: claims-only (no membership of their own: `functions` has no
        // tables), so they change only with the claims.
        let claims_only = !rls_on
            || quals.iter().all(|q| {
                shape::recognize_with(&[(true, q.as_str())], &shape_columns, functions).is_some()
            });
        let fresh = plain && published && claims_only;
        tracing::debug!(
            schema,
            table,
            plain,
            published,
            claims_only,
            "membership table"
        );
        out.push(shape::MemberTable {
            name: format!("{schema}.{table}"),
            relid,
            columns,
            fresh,
        });
    }
    client.batch_execute("ROLLBACK").await?;
    Ok(out)
}

/// What Postgres inlines each `schema.function()` call to, as `EXPLAIN VERBOSE` deparses it
/// with `search_path = pg_catalog` (so any name outside pg_catalog comes out qualified and
/// is not mistaken for a built-in). A call Postgres does not inline (not a one-expression
/// SQL function, SECURITY DEFINER, SET clauses, no EXECUTE privilege), or one that fails,
/// is left out: the policy calling it is evaluated per group.
async fn inline_functions(
    pool: &ExclusivePool,
    names: &[(String, String)],
) -> Result<shape::Functions, AuthzError> {
    if names.is_empty() {
        return Ok(shape::Functions::default());
    }
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    match explain_inlined(lease.client(), names).await {
        Ok(out) => {
            lease.done();
            Ok(out)
        }
        Err(err) => {
            let err = AuthzError::from_pg(&err);
            lease.discard();
            Err(err)
        }
    }
}

/// [`inline_functions`] on one connection (also `walcast check`'s). An error means the
/// connection may be left inside a transaction: do not use it again.
pub async fn explain_inlined(
    client: &tokio_postgres::Client,
    names: &[(String, String)],
) -> Result<shape::Functions, tokio_postgres::Error> {
    let mut out = shape::Functions::default();
    for (schema, function) in names {
        // Both parts are plain lower-case identifiers from a deparsed policy (see
        // `called_functions`), quoted all the same.
        let sql = format!(
            "BEGIN READ ONLY; SET LOCAL search_path = pg_catalog; \
             EXPLAIN (VERBOSE, COSTS OFF) SELECT {}.{}()",
            quote_ident(schema),
            quote_ident(function)
        );
        let explained = client.simple_query(&sql).await;
        client.batch_execute("ROLLBACK").await?;
        let messages = match explained {
            Ok(m) => m,
            Err(err) => {
                tracing::debug!(schema, function, error = %err, "a policy's function could not be explained");
                continue;
            }
        };
        let name = format!("{schema}.{function}");
        let call = format!("{name}()");
        let body = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r
                .get(0)
                .and_then(|line| line.trim_start().strip_prefix("Output: "))
                .map(str::to_owned),
            _ => None,
        });
        tracing::debug!(%call, ?body, "a policy's function as Postgres inlines it");
        if let Some(body) = body.filter(|b| b.trim() != call) {
            out.insert(&name, &body);
        }
    }
    Ok(out)
}

/// The [`TablePolicy`] from what the catalog said: the role's access row (`None`: the role
/// or the table is gone) and the table's SELECT policies for it.
fn from_catalog(
    role: &str,
    table: &Table,
    row: Option<tokio_postgres::Row>,
    p: Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>,
    functions: &shape::Functions,
) -> Result<TablePolicy, AuthzError> {
    let relid = table.relation_id;
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
    let Some(row) = row else {
        // The role or the table no longer exists.
        return Ok(TablePolicy::DENY);
    };
    let relname: String = row.try_get(0).map_err(get)?;
    let rls_on: bool = row.try_get(1).map_err(get)?;
    let forced: bool = row.try_get(2).map_err(get)?;
    let bypass: bool = row.try_get(3).map_err(get)?;
    let owner: bool = row.try_get(4).map_err(get)?;
    let select: bool = row.try_get(5).map_err(get)?;
    let names: Vec<String> = row.try_get(6).map_err(get)?;
    let types: Vec<String> = row.try_get(7).map_err(get)?;
    let attnums: Vec<i32> = row.try_get(8).map_err(get)?;
    let granted: Vec<bool> = row.try_get(9).map_err(get)?;
    let deterministic: Vec<bool> = row.try_get(10).map_err(get)?;
    let whole_table: bool = row.try_get(11).map_err(get)?;
    if !select {
        return Ok(TablePolicy::DENY);
    }
    let position = |name: &str| table.columns.iter().position(|c| &*c.name == name);
    // SELECT on the table covers every column it has or had, so the change's own columns
    // are all shown. Only column-level grants are matched by name, and a column the catalog
    // no longer has (dropped after the row was written, before this compilation: the
    // catalog is read as of now, not as of the row) is then hidden. Matching by name under
    // a table-level grant hid such a column from the rows written just before the DROP.
    let mask: Vec<bool> = table
        .columns
        .iter()
        .map(|c| {
            whole_table
                || names
                    .iter()
                    .position(|n| n == &*c.name)
                    .is_some_and(|k| granted.get(k).copied().unwrap_or(false))
        })
        .collect();
    tracing::debug!(role, relid, ?mask, ?names, ?granted, "compiled column mask");
    let columns = if mask.iter().all(|g| *g) {
        None
    } else {
        Some(Arc::from(mask))
    };
    if !rls_on || bypass || (owner && !forced) {
        return Ok(TablePolicy {
            select,
            columns,
            rows: RowRule::All,
            shape: None,
        });
    }
    let rows = p.map_err(|e| AuthzError::from_pg(&e))?;
    let mut exprs = Vec::with_capacity(rows.len());
    let mut reads = vec![false; table.columns.len()];
    let mut reads_unstreamed = false;
    for r in rows {
        let permissive: bool = r.try_get(0).map_err(get)?;
        let qual: String = r.try_get(1).map_err(get)?;
        let deps: Vec<i32> = r.try_get(2).map_err(get)?;
        for attnum in deps {
            let Some(k) = attnums.iter().position(|a| *a == attnum) else {
                continue;
            };
            match position(&names[k]) {
                Some(i) => reads[i] = true,
                None => reads_unstreamed = true,
            }
        }
        exprs.push(PolicyExpr { permissive, qual });
    }
    let Some(predicate) = combine(&exprs) else {
        return Ok(TablePolicy {
            select,
            columns,
            rows: RowRule::Nothing,
            shape: None,
        });
    };
    if reads_unstreamed {
        // A policy reads a column the WAL does not carry: no image can be judged.
        tracing::warn!(table = ?relname, "a policy reads a column the stream does not carry; denying");
        return Ok(TablePolicy {
            select,
            columns,
            rows: RowRule::Nothing,
            shape: None,
        });
    }
    let check_columns: Vec<CheckColumn> = names
        .iter()
        .zip(types)
        .map(|(n, t)| CheckColumn {
            name: n.clone(),
            type_sql: t,
            source: position(n),
        })
        .collect();
    let shape_columns: Vec<ShapeColumn<'_>> = names
        .iter()
        .zip(&check_columns)
        .zip(&deterministic)
        .map(|((n, c), d)| ShapeColumn {
            name: n,
            type_name: &c.type_sql,
            source: c.source,
            deterministic: *d,
        })
        .collect();
    let quals: Vec<(bool, &str)> = exprs
        .iter()
        .map(|e| (e.permissive, e.qual.as_str()))
        .collect();
    let mut functions = functions.clone();
    functions.outer = Some(relname.clone());
    let shape = shape::recognize_with(&quals, &shape_columns, &functions).map(Arc::new);
    tracing::debug!(table = ?relname, role, recognized = shape.is_some(), "compiled row policies");
    Ok(TablePolicy {
        select,
        columns,
        shape,
        rows: RowRule::Check(Arc::new(RowCheck {
            sql: check_sql(&relname, &check_columns, &predicate),
            reads,
            sources: check_columns.iter().filter_map(|c| c.source).collect(),
        })),
    })
}

/// The row images of one group, column by column (the check's array parameters).
#[derive(Debug, Clone, Default)]
pub struct ImageBatch {
    count: usize,
    /// Per change column, its text value in each image (`None`: NULL or not in the image).
    columns: Vec<Vec<Option<Box<str>>>>,
}

impl ImageBatch {
    /// Add one image; returns its ordinal, or `None` when the image cannot be judged (it
    /// lacks a column the policies read), which the caller treats as denied.
    pub fn push(&mut self, row: &[Value], reads: &[bool]) -> Option<usize> {
        let judgeable = reads
            .iter()
            .enumerate()
            .all(|(i, r)| !*r || row.get(i).is_some_and(Value::is_known));
        if !judgeable {
            return None;
        }
        let ord = self.count;
        self.count += 1;
        if self.columns.len() < row.len() {
            self.columns.resize(row.len(), vec![None; ord]);
        }
        for (i, column) in self.columns.iter_mut().enumerate() {
            column.push(row.get(i).and_then(Value::text).map(Box::from));
        }
        Some(ord)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The check's parameters: the ordinals, then the `sources` columns' values.
    fn params(&self, sources: &[usize]) -> (Vec<i64>, Vec<Vec<Option<&str>>>) {
        let ords = (0..self.count as i64).collect();
        let columns = sources
            .iter()
            .map(|&i| match self.columns.get(i) {
                Some(values) => values.iter().map(|v| v.as_deref()).collect(),
                None => vec![None; self.count],
            })
            .collect();
        (ords, columns)
    }
}

/// `ords` and `columns` as a parameter list.
fn param_refs<'a>(
    ords: &'a Vec<i64>,
    columns: &'a [Vec<Option<&'a str>>],
) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        Vec::with_capacity(1 + columns.len());
    params.push(ords);
    for c in columns {
        params.push(c);
    }
    params
}

/// Sets the three claim settings for the rest of the transaction.
pub(crate) const SET_CLAIMS_SQL: &str =
    "SELECT pg_catalog.set_config('request.jwt.claims', $1, true), \
     pg_catalog.set_config('request.jwt.claim.sub', $2, true), \
     pg_catalog.set_config('request.jwt.claim.role', $3, true)";

/// The claim-setting statement and each check statement prepared on the lease's connection
/// (in the order of `checks`): after the first batch on a connection, a group costs a Bind
/// and an Execute, not a parse and a plan.
async fn prepare_checks(
    lease: &mut crate::db::sql::Lease<'_>,
    checks: &[&RowCheck],
) -> Result<(tokio_postgres::Statement, Vec<tokio_postgres::Statement>), AuthzError> {
    let set_claims = lease
        .prepare_cached(SET_CLAIMS_SQL, &[Type::TEXT, Type::TEXT, Type::TEXT])
        .await
        .map_err(|e| AuthzError::from_pg(&e))?;
    let mut statements = Vec::with_capacity(checks.len());
    for check in checks {
        statements.push(
            lease
                .prepare_cached(&check.sql, &check.param_types())
                .await
                .map_err(|e| AuthzError::from_pg(&e))?,
        );
    }
    Ok((set_claims, statements))
}

/// One claims group's share of a batched check: its identity (role + claims), the compiled
/// check of the table and the row images to judge.
pub struct GroupCheck {
    pub identity: Arc<Identity>,
    pub check: Arc<RowCheck>,
    pub images: ImageBatch,
}

/// The answer for one group: which images are visible (by ordinal), and how long the
/// group's statements took on the server (for spotting slow policies).
pub type GroupResult = (Result<Vec<bool>, AuthzError>, Duration);

/// Check claims groups that share one role in ONE transaction and one pipelined round trip:
/// `BEGIN; SET LOCAL ROLE …; SET LOCAL statement_timeout`, then per group
/// `SAVEPOINT; set claims; check; ROLLBACK TO SAVEPOINT`, then `ROLLBACK`.
///
/// The savepoints isolate the groups: whatever a policy function leaves behind while one
/// group is judged (a `set_config`, local or not, a temporary table, a changed role) is rolled
/// back before the next group, and a group whose check raises fails alone, the others go on.
/// The transaction, the role switch and the round trip are still paid once per batch, which
/// is what makes row-level security cheap with many distinct users.
///
/// A single group runs without a savepoint (its transaction is its isolation). Results are
/// in the order of `groups`.
///
/// `xids` are the transactions of the images: policies that read other tables must see
/// them as of those commits (a membership removed in the same transaction as a row must
/// keep that row from the former member), so the checks run in one REPEATABLE READ snapshot
/// that sees all of them, taken again after a short pause while it does not (see
/// [`compile`] for why a decoded transaction may not be visible yet).
pub async fn check_groups(
    pool: &ExclusivePool,
    groups: Vec<GroupCheck>,
    xids: &[u32],
) -> Vec<GroupResult> {
    let answer = until_visible(|| async { Ok(check_groups_once(pool, &groups, xids).await) });
    match answer.await {
        Ok(results) => results,
        Err(err) => groups
            .iter()
            .map(|_| (Err(err.clone()), Duration::ZERO))
            .collect(),
    }
}

/// One [`check_groups`] attempt: `None` when its snapshot does not see every one of `xids`.
async fn check_groups_once(
    pool: &ExclusivePool,
    groups: &[GroupCheck],
    xids: &[u32],
) -> Option<Vec<GroupResult>> {
    let Some(role) = groups.first().map(|g| g.identity.role.clone()) else {
        return Some(Vec::new());
    };
    debug_assert!(groups.iter().all(|g| g.identity.role == role));
    let all_fail = |err: AuthzError| {
        groups
            .iter()
            .map(|_| (Err(err.clone()), Duration::ZERO))
            .collect()
    };
    let mut lease = match pool.acquire().await {
        Ok(l) => l,
        Err(e) => return Some(all_fail(AuthzError::Unavailable(format!("{e:#}")))),
    };
    let checks: Vec<&RowCheck> = groups.iter().map(|g| &*g.check).collect();
    let prepared = async {
        let snapshot = lease
            .prepare_cached(SNAPSHOT_SQL, &[])
            .await
            .map_err(|e| AuthzError::from_pg(&e))?;
        let (set_claims, checks) = prepare_checks(&mut lease, &checks).await?;
        Ok::<_, AuthzError>((snapshot, set_claims, checks))
    }
    .await;
    let (snapshot_sql, set_claims, check_statements) = match prepared {
        Ok(p) => p,
        Err(err) => {
            // Preparing opens no transaction: only a connection problem makes it unusable.
            if matches!(err, AuthzError::Unavailable(_)) {
                lease.discard();
            } else {
                lease.done();
            }
            return Some(all_fail(err));
        }
    };
    let client = lease.client();
    // REPEATABLE READ: every group is judged in the one snapshot `snapshot` reports.
    let setup = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {}",
        quote_ident(&role),
        CHECK_TIMEOUT.as_millis()
    );
    let isolated = groups.len() > 1;
    struct Prepared<'a> {
        claims: &'a str,
        sub: String,
        ords: Vec<i64>,
        columns: Vec<Vec<Option<&'a str>>>,
    }
    let prepared: Vec<Prepared<'_>> = groups
        .iter()
        .map(|g| {
            let (ords, columns) = g.images.params(&g.check.sources);
            Prepared {
                claims: &g.identity.claims,
                sub: claim_str(&g.identity.claims, "sub"),
                ords,
                columns,
            }
        })
        .collect();
    let role_text: &str = &role;
    let begin = client.batch_execute(&setup);
    let snapshot = client.query_one(&snapshot_sql, &[]);
    // Pipelined: every statement is sent (in order) before any reply is awaited; join! polls
    // each group's statements in order, and join_all polls the groups in order.
    let mut statements = Vec::with_capacity(groups.len());
    let set_claims = &set_claims;
    for (p, check) in prepared.iter().zip(&check_statements) {
        statements.push(async move {
            let claims_text: &str = p.claims;
            let sub_text: &str = &p.sub;
            let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&claims_text, &sub_text, &role_text];
            let check_params = param_refs(&p.ords, &p.columns);
            let savepoint = async {
                if isolated {
                    client.batch_execute("SAVEPOINT walcast_group").await
                } else {
                    Ok(())
                }
            };
            let restore = async {
                if isolated {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT walcast_group")
                        .await
                } else {
                    Ok(())
                }
            };
            let (s, c, rows, r) = tokio::join!(
                savepoint,
                client.query(set_claims, &claim_params),
                client.query(check, &check_params),
                restore
            );
            (s.and(c).and(r), rows, Instant::now())
        });
    }
    let end = client.batch_execute("ROLLBACK");
    let started = Instant::now();
    let (b, snapshot, results, e) = tokio::join!(
        begin,
        snapshot,
        futures_util::future::join_all(statements),
        end
    );
    if let Err(err) = &e {
        // The session may still carry the role: never lend it again.
        let err = AuthzError::from_pg(err);
        lease.discard();
        return Some(all_fail(err));
    }
    lease.done();
    if let Err(err) = b {
        return Some(all_fail(AuthzError::from_pg(&err)));
    }
    let snapshot: String = match snapshot.and_then(|r| r.try_get(0)) {
        Ok(s) => s,
        Err(err) => return Some(all_fail(AuthzError::from_pg(&err))),
    };
    match crate::feed::snapshot::Xids::parse(&snapshot) {
        Some(sees) if xids.iter().all(|x| sees.sees(*x)) => {}
        Some(_) => return None,
        None => {
            return Some(all_fail(AuthzError::Unavailable(format!(
                "unreadable snapshot {snapshot:?}"
            ))))
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    let mut previous = started;
    for ((setup, rows, done), p) in results.into_iter().zip(&prepared) {
        let took = done.saturating_duration_since(previous);
        previous = done;
        // The check's own error says most about the policy; a failing savepoint or claims
        // statement (which makes the check fail with 25P02) comes next.
        let result = match (rows, setup) {
            (Ok(rows), Ok(())) => visible_ordinals(rows, p.ords.len()),
            (Err(e), _) if e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                Err(AuthzError::from_pg(&e))
            }
            (_, Err(e)) | (Err(e), Ok(())) => Err(AuthzError::from_pg(&e)),
        };
        out.push((result, took));
    }
    Some(out)
}

fn visible_ordinals(rows: Vec<tokio_postgres::Row>, count: usize) -> Result<Vec<bool>, AuthzError> {
    let mut visible = vec![false; count];
    for row in rows {
        let ord: i64 = row
            .try_get(0)
            .map_err(|e| AuthzError::Unavailable(e.to_string()))?;
        if let Some(v) = usize::try_from(ord).ok().and_then(|o| visible.get_mut(o)) {
            *v = true;
        }
    }
    Ok(visible)
}

/// A top-level string claim (`sub`), or "" when absent or not a string.
pub fn claim_str(claims: &str, name: &str) -> String {
    serde_json::from_str::<serde_json::Value>(claims)
        .ok()
        .and_then(|v| v.get(name).and_then(|s| s.as_str().map(str::to_string)))
        .unwrap_or_default()
}

/// What becomes of a DELETE on a table with row-level security whose old row carries only
/// the key (`REPLICA IDENTITY` other than FULL): the policies cannot judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RlsDeletes {
    /// Delivered to nobody (the safe default: a policy may hide the row).
    #[default]
    Drop,
    /// Delivered with the primary key alone to every subscriber whose role may SELECT the
    /// table, as Supabase does: that the key was deleted is disclosed to them.
    PrimaryKey,
}

/// The images of a change that authorization judges.
pub struct Images<'a> {
    /// The row that decides delivery (new row, or the old row of a DELETE).
    pub primary: Option<std::borrow::Cow<'a, [Value]>>,
    /// The full old row of an UPDATE (REPLICA IDENTITY FULL).
    pub old: Option<&'a [Value]>,
}

/// Which images of `change` can be judged. A DELETE needs the full old row; an UPDATE's
/// unchanged TOAST values are taken from the old row when it has them.
pub fn images(change: &Change) -> Images<'_> {
    let full = change.table.replica_identity == ReplicaIdentity::Full;
    match change.kind {
        ChangeKind::Insert => Images {
            primary: change.record.as_deref().map(std::borrow::Cow::Borrowed),
            old: None,
        },
        ChangeKind::Update => {
            let old = change.old_record.as_deref().filter(|_| full);
            let primary = change.record.as_deref().map(|rec| match old {
                Some(o) if rec.iter().any(|v| matches!(v, Value::UnchangedToast)) => {
                    let filled: Vec<Value> = rec
                        .iter()
                        .zip(o)
                        .map(|(n, o)| match n {
                            Value::UnchangedToast => o.clone(),
                            v => v.clone(),
                        })
                        .collect();
                    std::borrow::Cow::Owned(filled)
                }
                _ => std::borrow::Cow::Borrowed(rec),
            });
            Images { primary, old }
        }
        ChangeKind::Delete => Images {
            primary: change
                .old_record
                .as_deref()
                .filter(|_| full)
                .map(std::borrow::Cow::Borrowed),
            old: None,
        },
        ChangeKind::Truncate => Images {
            primary: None,
            old: None,
        },
    }
}

/// Cached [`TablePolicy`] per (role, relation), each for the table shape it was compiled
/// against: a change decoded with another shape (before or after DDL) misses and gets its
/// own compilation, so a column index never refers to the wrong column.
#[derive(Default)]
pub struct PolicyCache {
    entries: HashMap<(Arc<str>, u32), CachedPolicy>,
    /// Per identity (by its interned address, the `Arc` kept so the address is not reused):
    /// the claims-only expressions of recognized shapes computed for it, by expression text.
    /// They depend on nothing but the identity's role and claims, so they outlive policy
    /// recompilations.
    derived: HashMap<usize, IdentityDerived>,
    /// (role, relation) of the policies inserted since [`PolicyCache::take_compiled`]: the
    /// pump derives the values of that role's identities as soon as a shape is known.
    compiled: Vec<(Arc<str>, u32)>,
    /// Per relation: how many of its changes (rows, truncates, Relation messages) the
    /// stream has passed, and the transaction of the last row change. Membership sets are
    /// valid for the count they were derived at (see [`super::shape::MemberTable`]).
    changes: HashMap<u32, (u64, Option<u32>)>,
    /// Per identity (as `derived`): membership sets by cache key.
    sets: HashMap<usize, IdentitySets>,
    /// Tables some cached policy of which has a membership term.
    set_tables: std::collections::HashSet<u32>,
    /// The publication streamed: membership tables must be published in it in full.
    publication: Option<Arc<str>>,
}

/// A membership set derived for one identity, as of a count of its table's changes.
#[derive(Debug, Clone)]
pub struct CachedSet {
    pub key: Arc<str>,
    pub relid: u32,
    /// The table's change count it was derived at (its snapshot saw the last such change).
    pub epoch: u64,
    pub at: Instant,
    /// `None`: the sub-select raised (per-group checks decide).
    pub values: Option<Arc<shape::MemberSet>>,
}

type IdentitySets = (Arc<Identity>, Vec<CachedSet>);

/// An identity (kept so its address stays its own) and its derived values by expression.
type IdentityDerived = (Arc<Identity>, Vec<(Arc<str>, Derived)>);

/// Identities whose derived values are kept, at most (then all are computed again).
const DERIVED_MAX: usize = 100_000;

/// A compiled policy, the table shape it was compiled for, and when.
type CachedPolicy = (Arc<Table>, Arc<TablePolicy>, Instant);

impl PolicyCache {
    pub fn get(&self, role: &Arc<str>, table: &Arc<Table>) -> Option<Arc<TablePolicy>> {
        self.get_timed(role, table).map(|(p, _)| p)
    }

    /// [`PolicyCache::get`], with when the policy was compiled.
    pub fn get_timed(
        &self,
        role: &Arc<str>,
        table: &Arc<Table>,
    ) -> Option<(Arc<TablePolicy>, Instant)> {
        let (shape, p, at) = self.entries.get(&(role.clone(), table.relation_id))?;
        (Arc::ptr_eq(shape, table) && at.elapsed() < POLICY_TTL).then(|| (p.clone(), *at))
    }

    pub fn insert(&mut self, role: Arc<str>, table: &Arc<Table>, policy: Arc<TablePolicy>) {
        if self.compiled.len() < DERIVED_MAX {
            self.compiled.push((role.clone(), table.relation_id));
        }
        if policy.shape.as_ref().is_some_and(|s| s.has_sets()) {
            self.set_tables.insert(table.relation_id);
        }
        self.entries.insert(
            (role, table.relation_id),
            (table.clone(), policy, Instant::now()),
        );
    }

    /// The table changed (its Relation message arrived): recompile on next use.
    pub fn forget_table(&mut self, relid: u32) {
        self.entries.retain(|(_, r), _| *r != relid);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.derived.clear();
        self.compiled.clear();
        self.sets.clear();
        self.changes.clear();
    }

    /// The (role, relation) of every policy inserted since the last call.
    pub fn take_compiled(&mut self) -> Vec<(Arc<str>, u32)> {
        std::mem::take(&mut self.compiled)
    }

    /// The unexpired policies of `role`, each with the table shape it was compiled for and
    /// when (the caller checks the shape is the relation's current one).
    pub fn policies_of(&self, role: &str) -> Vec<(Arc<Table>, Arc<TablePolicy>, Instant)> {
        self.entries
            .iter()
            .filter(|((r, _), (_, _, at))| &**r == role && at.elapsed() < POLICY_TTL)
            .map(|(_, (table, p, at))| (table.clone(), p.clone(), *at))
            .collect()
    }

    /// Stream membership tables from this publication (see [`compile_for`]).
    pub fn set_publication(&mut self, publication: &str) {
        self.publication = Some(publication.into());
    }

    pub fn publication(&self) -> Option<Arc<str>> {
        self.publication.clone()
    }

    /// The stream passed a change of `relid` (in transaction `xid`, if a row change): the
    /// membership sets derived from it so far no longer apply from this point on.
    pub fn note_change(&mut self, relid: u32, xid: Option<u32>) {
        let e = self.changes.entry(relid).or_insert((0, None));
        e.0 += 1;
        if xid.is_some() {
            e.1 = xid;
        }
    }

    /// How many changes of `relid` the stream has passed, and the last one's transaction.
    pub fn changes_of(&self, relid: u32) -> (u64, Option<u32>) {
        self.changes.get(&relid).copied().unwrap_or((0, None))
    }

    /// Whether some cached policy of `relid` has a membership term.
    pub fn has_set_policy(&self, relid: u32) -> bool {
        !self.set_tables.is_empty() && self.set_tables.contains(&relid)
    }

    /// The derived value of each of `shape`'s terms for `identity` into `out`; whether all
    /// are known and usable. Membership terms count as unknown here (see
    /// [`PolicyCache::derived_values_at`]).
    pub fn derived_values<'a>(
        &'a self,
        identity: &Arc<Identity>,
        shape: &Shape,
        out: &mut Vec<TermValue<'a>>,
    ) -> bool {
        self.derived_values_with(identity, shape, |_| None, out)
    }

    /// [`PolicyCache::derived_values`], with membership sets when `with_sets`: a set counts
    /// only if derived as of its table's current change count (no change of the table
    /// passed since the change its snapshot saw) and younger than [`POLICY_TTL`]. Only a
    /// row whose whole transaction has been passed may be judged with one (the pump asks
    /// at the commit): a later change of the table in the same transaction applies to it.
    pub fn derived_values_at<'a>(
        &'a self,
        identity: &Arc<Identity>,
        shape: &Shape,
        with_sets: bool,
        out: &mut Vec<TermValue<'a>>,
    ) -> bool {
        if !with_sets || !shape.has_sets() {
            return self.derived_values(identity, shape, out);
        }
        let Some((_, sets)) = self.sets.get(&(Arc::as_ptr(identity) as usize)) else {
            return false;
        };
        self.derived_values_with(
            identity,
            shape,
            |t| {
                let relid = t.set?;
                let epoch = self.changes_of(relid).0;
                sets.iter()
                    .find(|s| {
                        s.relid == relid
                            && s.epoch == epoch
                            && *s.key == *t.key
                            && s.at.elapsed() < POLICY_TTL
                    })?
                    .values
                    .as_deref()
            },
            out,
        )
    }

    /// [`PolicyCache::derived_values`], membership sets from `sets`.
    pub fn derived_values_with<'a>(
        &'a self,
        identity: &Arc<Identity>,
        shape: &Shape,
        sets: impl Fn(&shape::Term) -> Option<&'a shape::MemberSet>,
        out: &mut Vec<TermValue<'a>>,
    ) -> bool {
        let known = self.derived.get(&(Arc::as_ptr(identity) as usize));
        shape.resolve_into(
            |e| {
                known?
                    .1
                    .iter()
                    .find(|(x, _)| Arc::ptr_eq(x, e) || **x == **e)
                    .map(|(_, d)| d)
            },
            sets,
            out,
        )
    }

    /// Remember membership sets derived for `identity`.
    pub fn insert_sets(&mut self, identity: &Arc<Identity>, sets: Vec<CachedSet>) {
        if self.sets.len() >= DERIVED_MAX {
            self.sets.clear();
        }
        let entry = self
            .sets
            .entry(Arc::as_ptr(identity) as usize)
            .or_insert_with(|| (identity.clone(), Vec::new()));
        for s in sets {
            entry.1.retain(|x| x.key != s.key);
            entry.1.push(s);
        }
    }

    /// The terms of `shape` not computed yet for `identity`: each one's cache key and the
    /// expression to evaluate.
    pub fn underived(&self, identity: &Arc<Identity>, shape: &Shape) -> Vec<(Arc<str>, Arc<str>)> {
        let known = self.derived.get(&(Arc::as_ptr(identity) as usize));
        let mut out: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        for t in shape.terms.iter().filter(|t| t.set.is_none()) {
            let have = known.is_some_and(|(_, k)| k.iter().any(|(x, _)| *x == t.key));
            if !have && !out.iter().any(|(k, _)| *k == t.key) {
                out.push((t.key.clone(), t.expr.clone()));
            }
        }
        out
    }

    /// Remember what the terms cached by `keys` are for `identity`.
    pub fn insert_derived(
        &mut self,
        identity: &Arc<Identity>,
        keys: Vec<Arc<str>>,
        values: Vec<Derived>,
    ) {
        if self.derived.len() >= DERIVED_MAX {
            self.derived.clear();
        }
        let entry = self
            .derived
            .entry(Arc::as_ptr(identity) as usize)
            .or_insert_with(|| (identity.clone(), Vec::new()));
        for (e, v) in keys.into_iter().zip(values) {
            if !entry.1.iter().any(|(x, _)| *x == e) {
                entry.1.push((e, v));
            }
        }
    }
}

/// The [`Access`] an identity gets for a change, given its table policy and (for RLS) the
/// results of the image checks.
pub fn access(policy: &TablePolicy, primary_visible: bool, old_visible: bool) -> Access {
    if !policy.select || !primary_visible {
        return Access::Deny;
    }
    Access::Allow(Visibility {
        columns: policy.columns.clone(),
        old_record: old_visible,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(permissive: bool, qual: &str) -> PolicyExpr {
        PolicyExpr {
            permissive,
            qual: qual.into(),
        }
    }

    /// A slow attempt (a policy running into its statement timeout) that raced the commit
    /// is followed by another attempt, not by `Unavailable`: only the pauses count.
    #[tokio::test]
    async fn a_slow_attempt_does_not_use_up_the_wait_for_visibility() {
        let mut attempts = 0;
        let answer = until_visible(|| {
            attempts += 1;
            let first = attempts == 1;
            async move {
                if first {
                    tokio::time::sleep(CHECK_TIMEOUT + Duration::from_millis(100)).await;
                    Ok(None)
                } else {
                    Ok(Some("judged"))
                }
            }
        })
        .await;
        assert_eq!(answer.ok(), Some("judged"));
        assert_eq!(attempts, 2);
    }

    #[tokio::test]
    async fn a_transaction_that_never_becomes_visible_is_unavailable() {
        let started = Instant::now();
        let answer: Result<(), AuthzError> = until_visible(|| async { Ok(None) }).await;
        assert!(matches!(answer, Err(AuthzError::Unavailable(_))));
        assert!(started.elapsed() >= CHECK_TIMEOUT);
    }

    #[test]
    fn permissive_or_restrictive_and_none_is_deny() {
        assert_eq!(combine(&[]), None);
        assert_eq!(combine(&[p(false, "a = 1")]), None);
        assert_eq!(combine(&[p(true, "a = 1")]).unwrap(), "((a = 1))");
        assert_eq!(
            combine(&[
                p(true, "a = 1"),
                p(false, "b"),
                p(true, "c OR d"),
                p(false, "e")
            ])
            .unwrap(),
            "((a = 1) OR (c OR d)) AND (b) AND (e)"
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("anon"), "\"anon\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }

    #[test]
    fn check_sql_rebuilds_the_row_under_the_table_name() {
        let cols = vec![
            CheckColumn {
                name: "id".into(),
                type_sql: "bigint".into(),
                source: Some(0),
            },
            CheckColumn {
                name: "walcast_ord".into(),
                type_sql: "text".into(),
                source: Some(1),
            },
            CheckColumn {
                name: "gen".into(),
                type_sql: "integer".into(),
                source: None,
            },
        ];
        let sql = check_sql("my\"docs", &cols, "((id > 0))");
        assert_eq!(
            sql,
            "SELECT \"my\"\"docs\".\"walcast_ord_\" FROM (SELECT w.o AS \"walcast_ord_\", \
             w.c2::bigint AS \"id\", w.c3::text AS \"walcast_ord\", NULL::integer AS \"gen\" \
             FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), \
             pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.text[])) \
             AS w(o, c2, c3)) AS \"my\"\"docs\" WHERE ((id > 0))"
        );
    }

    #[test]
    fn images_are_text_values_and_unjudgeable_ones_are_refused() {
        let v = |s: &str| Value::Present {
            text: s.into(),
            json: "0".into(),
        };
        let mut batch = ImageBatch::default();
        assert_eq!(
            batch.push(&[v("1"), Value::Null, v("a\"b")], &[true, false, false]),
            Some(0)
        );
        assert_eq!(
            batch.push(
                &[v("2"), Value::UnchangedToast, v("x")],
                &[false, true, false]
            ),
            None
        );
        assert_eq!(
            batch.push(&[v("3"), Value::Missing, v("y")], &[true, false, false]),
            Some(1)
        );
        // Columns 0 and 2 are checked ($2, $3); column 1 is not a parameter.
        let (ords, columns) = batch.params(&[0, 2]);
        assert_eq!(ords, vec![0, 1]);
        assert_eq!(
            columns,
            vec![vec![Some("1"), Some("3")], vec![Some("a\"b"), Some("y")]]
        );
        // A column past the images' width is all NULL.
        assert_eq!(batch.params(&[7]).1, vec![vec![None, None]]);
        assert!(ImageBatch::default().is_empty());
    }

    #[test]
    fn claim_sub_is_read_from_the_claims() {
        assert_eq!(claim_str(r#"{"sub":"u1","role":"x"}"#, "sub"), "u1");
        assert_eq!(claim_str(r#"{"sub":5}"#, "sub"), "");
        assert_eq!(claim_str("not json", "sub"), "");
    }
}
