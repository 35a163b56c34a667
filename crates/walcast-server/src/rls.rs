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
//!    │       BEGIN; SET LOCAL ROLE "<role>"; SET LOCAL statement_timeout
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
//!   other tables see those tables as they are when the check runs.
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
use walcast_core::value::write_json_string;
use walcast_pgoutput::ReplicaIdentity;

use crate::sql::ExclusivePool;

/// Longest one authorization statement may run.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a compiled policy set is reused without a Relation message invalidating it.
/// (Policy changes do not produce a Relation message, so this bounds their staleness.)
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

/// The statement that returns the ordinals of the images `predicate` accepts. `$1` is a JSON
/// array of objects `{"o": ordinal, "c<i>": text or null}`; each text goes through the
/// column type's input function (an explicit cast from text), exactly as Postgres parsed it.
/// The rebuilt row is named like the table, because deparsed policies qualify its columns
/// with the table name inside sub-queries.
pub fn check_sql(table: &str, columns: &[CheckColumn], predicate: &str) -> String {
    let mut ord = String::from("walcast_ord");
    while columns.iter().any(|c| c.name == ord) {
        ord.push('_');
    }
    let alias = quote_ident(table);
    let ord_q = quote_ident(&ord);
    let mut sql = format!("SELECT {alias}.{ord_q} FROM (SELECT w.o AS {ord_q}");
    let mut defs = String::from("o pg_catalog.int8");
    for c in columns {
        match c.source {
            Some(i) => {
                let _ = write!(sql, ", w.c{i}::{} AS {}", c.type_sql, quote_ident(&c.name));
                let _ = write!(defs, ", c{i} pg_catalog.text");
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
        " FROM pg_catalog.json_to_recordset($1::pg_catalog.json) AS w({defs})) AS {alias} WHERE {predicate}"
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
}

/// A role's access to one table, compiled against the table as the stream describes it.
#[derive(Debug, Clone)]
pub struct TablePolicy {
    /// SELECT on the table or on at least one column.
    pub select: bool,
    /// Columns it may SELECT, `None` when all.
    pub columns: Option<Arc<[bool]>>,
    pub rows: RowRule,
}

impl TablePolicy {
    const DENY: TablePolicy = TablePolicy {
        select: false,
        columns: None,
        rows: RowRule::Nothing,
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
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
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

/// Read the role's privileges and the table's policies, and compile them for `table` (the
/// stream's current description of it).
pub async fn compile(
    pool: &ExclusivePool,
    role: &str,
    table: &Table,
) -> Result<TablePolicy, AuthzError> {
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let client = lease.client();
    let relid = table.relation_id;
    // pg_catalog only: deparsed expressions and type names come out schema-qualified, so
    // they mean the same whatever search_path the check runs with.
    let begin = client.batch_execute("BEGIN READ ONLY; SET LOCAL search_path = pg_catalog");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&role, &relid];
    let access = client.query_opt(ACCESS_SQL, &params);
    let policies = client.query(POLICIES_SQL, &params);
    let end = client.batch_execute("ROLLBACK");
    let (b, a, p, e) = tokio::join!(begin, access, policies, end);
    if let Err(err) = b.as_ref().and(e.as_ref()) {
        let err = AuthzError::from_pg(err);
        lease.discard();
        return Err(err);
    }
    let row = a.map_err(|e| AuthzError::from_pg(&e))?;
    let Some(row) = row else {
        // The role or the table no longer exists.
        return Ok(TablePolicy::DENY);
    };
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
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
    if !select {
        return Ok(TablePolicy::DENY);
    }
    let position = |name: &str| table.columns.iter().position(|c| &*c.name == name);
    let mask: Vec<bool> = table
        .columns
        .iter()
        .map(|c| {
            names
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
        });
    };
    if reads_unstreamed {
        // A policy reads a column the WAL does not carry: no image can be judged.
        tracing::warn!(table = %relname, "a policy reads a column the stream does not carry; denying");
        return Ok(TablePolicy {
            select,
            columns,
            rows: RowRule::Nothing,
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
    Ok(TablePolicy {
        select,
        columns,
        rows: RowRule::Check(Arc::new(RowCheck {
            sql: check_sql(&relname, &check_columns, &predicate),
            reads,
        })),
    })
}

/// Appends images to a group's JSON parameter.
#[derive(Debug, Clone, Default)]
pub struct ImageBatch {
    json: String,
    count: usize,
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
        self.json.push(if ord == 0 { '[' } else { ',' });
        let _ = write!(self.json, "{{\"o\":{ord}");
        for (i, v) in row.iter().enumerate() {
            match v {
                Value::Present { text, .. } => {
                    let _ = write!(self.json, ",\"c{i}\":");
                    write_json_string(text, &mut self.json);
                }
                Value::Null => {
                    let _ = write!(self.json, ",\"c{i}\":null");
                }
                Value::Missing | Value::UnchangedToast => {}
            }
        }
        self.json.push('}');
        Some(ord)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The JSON array without consuming the batch (it may be needed again for a retry).
    fn json_snapshot(&self) -> String {
        self.clone().finish()
    }

    fn finish(mut self) -> String {
        if self.count == 0 {
            self.json.push('[');
        }
        self.json.push(']');
        self.json
    }
}

/// Run one group's check: the ordinals of the images the identity may see.
pub async fn check_images(
    pool: &ExclusivePool,
    identity: &Identity,
    check: &RowCheck,
    images: ImageBatch,
) -> Result<Vec<bool>, AuthzError> {
    let count = images.count;
    let json = images.finish();
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let client = lease.client();
    let sub = claim_str(&identity.claims, "sub");
    let setup = format!(
        "BEGIN; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {}",
        quote_ident(&identity.role),
        CHECK_TIMEOUT.as_millis()
    );
    let claims_text: &str = &identity.claims;
    let role_text: &str = &identity.role;
    let sub_text: &str = &sub;
    let json_text: &str = &json;
    let claim_params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
        (&claims_text, Type::TEXT),
        (&sub_text, Type::TEXT),
        (&role_text, Type::TEXT),
    ];
    let check_params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
        [(&json_text, Type::TEXT)];
    let begin = client.batch_execute(&setup);
    let claims = client.query_typed(
        "SELECT pg_catalog.set_config('request.jwt.claims', $1, true), \
                pg_catalog.set_config('request.jwt.claim.sub', $2, true), \
                pg_catalog.set_config('request.jwt.claim.role', $3, true)",
        &claim_params,
    );
    let rows = client.query_typed(&check.sql, &check_params);
    let end = client.batch_execute("ROLLBACK");
    let (b, c, r, e) = tokio::join!(begin, claims, rows, end);
    if let Err(err) = &e {
        // The session may still carry the role: never lend it again.
        let err = AuthzError::from_pg(err);
        lease.discard();
        return Err(err);
    }
    b.map_err(|e| AuthzError::from_pg(&e))?;
    c.map_err(|e| AuthzError::from_pg(&e))?;
    let rows = r.map_err(|e| AuthzError::from_pg(&e))?;
    visible_ordinals(rows, count)
}

/// One claims group's share of a batched check: its identity (role + claims), the compiled
/// check of the table and the row images to judge.
pub struct GroupCheck {
    pub identity: Arc<Identity>,
    pub check: Arc<RowCheck>,
    pub images: ImageBatch,
}

/// Check several claims groups that share one role in ONE transaction and one round trip:
/// `BEGIN; SET LOCAL ROLE …;` then, per group, its claims (`set_config(…, true)`) and its
/// check statement, then `ROLLBACK`. This is the batching that makes row-level security cheap
/// with many distinct users: the transaction, the role switch and the network round trip are
/// paid once per role, not once per group.
///
/// A group whose check raises makes the rest of the transaction fail (25P02); those later
/// groups are then checked again one by one, so one failing identity never decides for
/// another. Results are in the order of `groups`.
pub async fn check_role_groups(
    pool: &ExclusivePool,
    groups: Vec<GroupCheck>,
) -> Vec<Result<Vec<bool>, AuthzError>> {
    if groups.len() <= 1 {
        let mut out = Vec::with_capacity(1);
        for g in groups {
            out.push(check_images(pool, &g.identity, &g.check, g.images).await);
        }
        return out;
    }
    let role = groups[0].identity.role.clone();
    debug_assert!(groups.iter().all(|g| g.identity.role == role));
    let lease = match pool.acquire().await {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("{e:#}");
            return groups
                .iter()
                .map(|_| Err(AuthzError::Unavailable(msg.clone())))
                .collect();
        }
    };
    let client = lease.client();
    let setup = format!(
        "BEGIN; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {}",
        quote_ident(&role),
        CHECK_TIMEOUT.as_millis()
    );
    struct Prepared {
        claims: String,
        sub: String,
        json: String,
        count: usize,
    }
    let prepared: Vec<Prepared> = groups
        .iter()
        .map(|g| Prepared {
            claims: g.identity.claims.to_string(),
            sub: claim_str(&g.identity.claims, "sub"),
            json: g.images.json_snapshot(),
            count: g.images.count,
        })
        .collect();
    let role_text: &str = &role;
    let begin = client.batch_execute(&setup);
    type Param<'a> = (&'a (dyn tokio_postgres::types::ToSql + Sync), Type);
    let claim_params: Vec<[Param<'_>; 3]> = prepared
        .iter()
        .map(|p| {
            [
                (
                    &p.claims as &(dyn tokio_postgres::types::ToSql + Sync),
                    Type::TEXT,
                ),
                (&p.sub, Type::TEXT),
                (&role_text, Type::TEXT),
            ]
        })
        .collect();
    let check_params: Vec<[Param<'_>; 1]> = prepared
        .iter()
        .map(|p| {
            [(
                &p.json as &(dyn tokio_postgres::types::ToSql + Sync),
                Type::TEXT,
            )]
        })
        .collect();
    // Pipelined: every statement is sent (in order) before any reply is awaited; join! polls
    // each pair's claims statement before its check.
    let mut statements = Vec::with_capacity(groups.len());
    for (i, g) in groups.iter().enumerate() {
        let claims = client.query_typed(
            "SELECT pg_catalog.set_config('request.jwt.claims', $1, true), \
                    pg_catalog.set_config('request.jwt.claim.sub', $2, true), \
                    pg_catalog.set_config('request.jwt.claim.role', $3, true)",
            &claim_params[i],
        );
        let rows = client.query_typed(&g.check.sql, &check_params[i]);
        statements.push(async move { tokio::join!(claims, rows) });
    }
    let end = client.batch_execute("ROLLBACK");
    let (b, results, e) = tokio::join!(begin, futures_util::future::join_all(statements), end);
    if let Err(err) = &e {
        // The session may still carry the role: never lend it again.
        let err = AuthzError::from_pg(err);
        lease.discard();
        return groups.iter().map(|_| Err(err.clone())).collect();
    }
    drop(lease);
    if let Err(err) = b {
        let err = AuthzError::from_pg(&err);
        return groups.iter().map(|_| Err(err.clone())).collect();
    }
    let mut out: Vec<Option<Result<Vec<bool>, AuthzError>>> = Vec::with_capacity(groups.len());
    let mut aborted = false;
    for ((claims, rows), p) in results.into_iter().zip(&prepared) {
        if aborted {
            // Decided again below, on its own.
            out.push(None);
            continue;
        }
        let result = claims
            .map_err(|e| AuthzError::from_pg(&e))
            .and_then(|_| rows.map_err(|e| AuthzError::from_pg(&e)))
            .and_then(|rows| visible_ordinals(rows, p.count));
        if result.is_err() {
            // Everything after this statement failed with 25P02, whatever its policy.
            aborted = true;
        }
        out.push(Some(result));
    }
    let mut finished = Vec::with_capacity(groups.len());
    for (g, r) in groups.into_iter().zip(out) {
        finished.push(match r {
            Some(r) => r,
            None => check_images(pool, &g.identity, &g.check, g.images).await,
        });
    }
    finished
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

/// Cached [`TablePolicy`] per (role, relation).
#[derive(Default)]
pub struct PolicyCache {
    entries: HashMap<(Arc<str>, u32), (Arc<TablePolicy>, Instant)>,
}

impl PolicyCache {
    pub fn get(&self, role: &Arc<str>, relid: u32) -> Option<Arc<TablePolicy>> {
        let (p, at) = self.entries.get(&(role.clone(), relid))?;
        (at.elapsed() < POLICY_TTL).then(|| p.clone())
    }

    pub fn insert(&mut self, role: Arc<str>, relid: u32, policy: Arc<TablePolicy>) {
        self.entries.insert((role, relid), (policy, Instant::now()));
    }

    /// The table changed (its Relation message arrived): recompile on next use.
    pub fn forget_table(&mut self, relid: u32) {
        self.entries.retain(|(_, r), _| *r != relid);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
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
             w.c0::bigint AS \"id\", w.c1::text AS \"walcast_ord\", NULL::integer AS \"gen\" \
             FROM pg_catalog.json_to_recordset($1::pg_catalog.json) AS w(o pg_catalog.int8, \
             c0 pg_catalog.text, c1 pg_catalog.text)) AS \"my\"\"docs\" WHERE ((id > 0))"
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
        let json: serde_json::Value = serde_json::from_str(&batch.finish()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"o": 0, "c0": "1", "c1": null, "c2": "a\"b"},
                               {"o": 1, "c0": "3", "c2": "y"}])
        );
        assert_eq!(ImageBatch::default().finish(), "[]");
    }

    #[test]
    fn claim_sub_is_read_from_the_claims() {
        assert_eq!(claim_str(r#"{"sub":"u1","role":"x"}"#, "sub"), "u1");
        assert_eq!(claim_str(r#"{"sub":5}"#, "sub"), "");
        assert_eq!(claim_str("not json", "sub"), "");
    }
}
