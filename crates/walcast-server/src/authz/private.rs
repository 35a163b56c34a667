//! Private channels (`config.private: true`): read and write permissions from the row-level
//! security policies on `realtime.messages` (see `sql/realtime.sql`).
//!
//! ```text
//!  join (and each new access_token) ─▶ read_perms ─▶ ReadBatcher ─▶ ChannelPerms, cached on the channel
//!    BEGIN                                          (one transaction for ≤ READ_BATCH_MAX checks)
//!      INSERT every check's probe rows (topic, 'broadcast' [, 'presence'])  ← as walcast's own user
//!      per check: SAVEPOINT
//!        set_config: realtime.topic, request.jwt.claims, request.jwt.claim.sub / .role,
//!                    role (all LOCAL: the check runs as the token's role)
//!        SELECT id FROM realtime.messages WHERE id IN (its probes) ← the SELECT policies decide
//!      ROLLBACK TO SAVEPOINT                                      ← settings, role gone
//!    ROLLBACK                                                     ← probes never persist
//!  first broadcast / track ─▶ can_write: same session setup, then as the role
//!      INSERT (topic, extension) ─▶ ok = allowed, insufficient_privilege = denied; ROLLBACK
//! ```
//!
//! Invariants: default deny (an error is never a grant); each check has its own transaction
//! (a write check) or its own savepoint (a read check, batched) on a connection nobody else
//! uses meanwhile, so role, claims and whatever a policy function sets never leak from one
//! check to another; read checks are never cached across joins (each join asks Postgres); the role is a quoted identifier, everything else a bound parameter; roles
//! with BYPASSRLS (or superusers) pass without probing.

use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use walcast_core::hub::Identity;

use crate::authz::rls::{claim_str, quote_ident, AuthzError, CHECK_TIMEOUT};
use crate::db::sql::ExclusivePool;
use crate::metrics;
use crate::state::AppState;

/// What a private channel's token may do, as evaluated at join (or at the last
/// `access_token`). Write results are filled in lazily by the caller (first broadcast or
/// track) and reset with the rest on a new token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelPerms {
    pub broadcast_read: bool,
    /// `None` until evaluated: at join when presence is enabled, else at the first track.
    pub presence_read: Option<bool>,
    /// `None` until checked with [`can_write`].
    pub broadcast_write: Option<bool>,
    pub presence_write: Option<bool>,
}

impl ChannelPerms {
    /// Joining needs one of the two reads.
    pub fn may_join(&self) -> bool {
        self.broadcast_read || self.presence_read == Some(true)
    }
}

/// The feature a write check is for (`realtime.messages.extension`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    Broadcast,
    Presence,
}

impl Extension {
    pub fn as_str(self) -> &'static str {
        match self {
            Extension::Broadcast => "broadcast",
            Extension::Presence => "presence",
        }
    }
}

/// The identity checks run as: the token's role and its whole claims object.
pub fn identity_of(claims: &crate::auth::Claims) -> Identity {
    Identity {
        role: Arc::from(claims.role.as_str()),
        claims: Arc::from(claims.claims_json().as_str()),
    }
}

/// The join error for a private channel the token may not read (Supabase's text).
pub fn unauthorized_read(sub_topic: &str) -> String {
    format!(
        "Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}"
    )
}

/// The pool the checks run on.
fn pool(state: &AppState) -> &Arc<ExclusivePool> {
    &state.authz
}

fn pg_err(e: tokio_postgres::Error) -> AuthzError {
    AuthzError::from_pg(&e)
}

/// `BEGIN` plus the session settings every check uses (claims, topic, timeout).
async fn begin(
    client: &tokio_postgres::Client,
    identity: &Identity,
    sub_topic: &str,
) -> Result<(), AuthzError> {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            CHECK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(pg_err)?;
    let sub = claim_str(&identity.claims, "sub");
    let claims: &str = &identity.claims;
    let role: &str = &identity.role;
    let sub: &str = &sub;
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&sub_topic, Type::TEXT),
        (&claims, Type::TEXT),
        (&sub, Type::TEXT),
        (&role, Type::TEXT),
    ];
    client
        .query_typed(
            "SELECT pg_catalog.set_config('realtime.topic', $1, true), \
                    pg_catalog.set_config('request.jwt.claims', $2, true), \
                    pg_catalog.set_config('request.jwt.claim.sub', $3, true), \
                    pg_catalog.set_config('request.jwt.claim.role', $4, true)",
            &params,
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

async fn bypasses_rls(client: &tokio_postgres::Client, role: &str) -> Result<bool, AuthzError> {
    let params: [(&(dyn ToSql + Sync), Type); 1] = [(&role, Type::TEXT)];
    let rows = client
        .query_typed(
            "SELECT rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = $1",
            &params,
        )
        .await
        .map_err(pg_err)?;
    match rows.first() {
        Some(r) => r.try_get(0).map_err(pg_err),
        None => Ok(false),
    }
}

/// Run `body` in a rolled-back transaction on a leased connection; a connection whose
/// ROLLBACK failed is discarded (it may still carry the role).
async fn in_rolled_back_tx<T>(
    state: &AppState,
    f: impl for<'c> FnOnce(
        &'c tokio_postgres::Client,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, AuthzError>> + Send + 'c>,
    >,
) -> Result<T, AuthzError> {
    let lease = pool(state)
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let result = f(lease.client()).await;
    if lease.client().batch_execute("ROLLBACK").await.is_ok() {
        lease.done();
    }
    result
}

/// Read permissions of `identity` on the private channel `sub_topic` (the topic without
/// `realtime:`); presence is probed only when the channel uses it. Evaluated in a batch with
/// whatever other read checks are waiting ([`ReadBatcher`]).
pub async fn read_perms(
    state: &AppState,
    identity: &Identity,
    sub_topic: &str,
    presence: bool,
) -> Result<ChannelPerms, AuthzError> {
    state
        .private_reads
        .read(identity, sub_topic, presence)
        .await
}

/// Most read checks evaluated in one round trip.
pub const READ_BATCH_MAX: usize = 128;
/// Read batches running at once: each holds one connection of the authorization pool, which
/// the pump's row checks share, so joins never take all of it.
const READ_BATCHES_PARALLEL: usize = 2;

/// One pending read check.
struct ReadRequest {
    check: ReadCheck,
    reply: tokio::sync::oneshot::Sender<Result<ChannelPerms, AuthzError>>,
}

/// What one read check needs: who, which channel, whether presence is probed.
#[derive(Debug, Clone)]
pub struct ReadCheck {
    pub identity: Identity,
    pub sub_topic: String,
    pub presence: bool,
}

/// Collects concurrent read checks into batches of up to [`READ_BATCH_MAX`], at most
/// [`READ_BATCHES_PARALLEL`] in flight: a check arriving while both are busy waits for the
/// next batch with everyone else who arrives meanwhile; a lone check goes at once.
///
/// Batches run in tasks of their own, so a join whose socket goes away never cancels a
/// batch half-way (its answer is simply not delivered).
pub struct ReadBatcher {
    pool: Arc<ExclusivePool>,
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<ReadRequest>>,
}

impl ReadBatcher {
    pub fn new(pool: Arc<ExclusivePool>) -> ReadBatcher {
        ReadBatcher {
            pool,
            queue: std::sync::OnceLock::new(),
        }
    }

    /// Queue a check and wait for its answer.
    pub async fn read(
        &self,
        identity: &Identity,
        sub_topic: &str,
        presence: bool,
    ) -> Result<ChannelPerms, AuthzError> {
        // Started on first use, on the serving runtime (a first join may come from the
        // intake runtime, whose threads run last).
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            crate::realtime::intake::spawn_serving(gather(self.pool.clone(), rx));
            tx
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = ReadRequest {
            check: ReadCheck {
                identity: identity.clone(),
                sub_topic: sub_topic.to_string(),
                presence,
            },
            reply,
        };
        if queue.send(request).is_err() {
            return Err(AuthzError::Unavailable(
                "the private channel checks stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(AuthzError::Unavailable(
                "the private channel check was dropped".into(),
            ))
        })
    }
}

/// The batcher's loop: take what is queued, run it, answer each caller.
async fn gather(
    pool: Arc<ExclusivePool>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<ReadRequest>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(READ_BATCHES_PARALLEL));
    while let Some(first) = queue.recv().await {
        // A free slot first: what arrives while waiting for it joins this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < READ_BATCH_MAX {
            match queue.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Callers that went away (socket closed) need no answer.
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let checks: Vec<ReadCheck> = batch.iter().map(|r| r.check.clone()).collect();
            let results = read_batch(&pool, &checks).await;
            for (request, result) in batch.into_iter().zip(results) {
                let _ = request.reply.send(result);
            }
            drop(permit);
        });
    }
}

/// The check's settings and its role (`set_config('role', …, true)` is `SET LOCAL ROLE` with
/// the name as a bound parameter), all undone by the savepoint's rollback.
const SET_SETTINGS_SQL: &str = "SELECT pg_catalog.set_config('realtime.topic', $1, true), \
     pg_catalog.set_config('request.jwt.claims', $2, true), \
     pg_catalog.set_config('request.jwt.claim.sub', $3, true), \
     pg_catalog.set_config('request.jwt.claim.role', $4, true), \
     pg_catalog.set_config('role', $4, true)";

const INSERT_PROBES_SQL: &str = "INSERT INTO realtime.messages (id, topic, extension, event, payload, private) \
     SELECT p.id::uuid, p.topic, p.ext, 'walcast_probe', '{}'::jsonb, true \
     FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[]), \
     pg_catalog.unnest($3::pg_catalog.text[])) AS p(id, topic, ext)";

const SELECT_PROBES_SQL: &str = "SELECT id::pg_catalog.text FROM realtime.messages \
     WHERE id = ANY ($1::pg_catalog.text[]::uuid[])";

const BYPASS_SQL: &str = "SELECT rolname::pg_catalog.text FROM pg_catalog.pg_roles \
     WHERE rolname::pg_catalog.text = ANY ($1::pg_catalog.text[]) AND (rolsuper OR rolbypassrls)";

/// Evaluate read checks in ONE transaction and one pipelined round trip:
///
/// ```text
///  BEGIN; SET LOCAL statement_timeout
///  roles among them with BYPASSRLS or SUPERUSER        (they pass without probing)
///  INSERT every check's probe rows                      (as walcast's own user)
///  SAVEPOINT
///  per check: set_config(realtime.topic, request.jwt.claims, .claim.sub, .claim.role,
///                        role: all LOCAL)
///             SELECT its probes                         (the SELECT policies decide)
///             ROLLBACK TO SAVEPOINT; RELEASE; SAVEPOINT (settings, role, what policies did: gone)
///  ROLLBACK                                             (probes never persist)
/// ```
///
/// Three statements per check. The savepoint isolates the checks exactly as separate
/// transactions did: whatever a policy function leaves behind (a `set_config`, local or not,
/// a changed role, rows) is undone before the next check, and a check whose policy raises
/// fails alone. A check only asks for its own probe rows (random ids), so the others' rows
/// in the table change nothing. Results are in
/// the order of `checks`.
pub async fn read_batch(
    pool: &ExclusivePool,
    checks: &[ReadCheck],
) -> Vec<Result<ChannelPerms, AuthzError>> {
    metrics::private_read_batch(checks.len());
    let all_fail = |err: AuthzError| checks.iter().map(|_| Err(err.clone())).collect();
    let lease = match pool.acquire().await {
        Ok(l) => l,
        Err(e) => return all_fail(AuthzError::Unavailable(format!("{e:#}"))),
    };
    let client = lease.client();
    struct Probes {
        sub: String,
        ids: Vec<String>,
    }
    let probes: Vec<Probes> = checks
        .iter()
        .map(|c| Probes {
            sub: claim_str(&c.identity.claims, "sub"),
            ids: (0..if c.presence { 2 } else { 1 })
                .map(|_| uuid::Uuid::new_v4().to_string())
                .collect(),
        })
        .collect();
    // Every probe row of the batch, inserted at once as walcast's own user.
    let (mut all_ids, mut all_topics, mut all_exts) = (Vec::new(), Vec::new(), Vec::new());
    for (c, p) in checks.iter().zip(&probes) {
        for (k, id) in p.ids.iter().enumerate() {
            all_ids.push(id.as_str());
            all_topics.push(c.sub_topic.as_str());
            all_exts.push(if k == 0 {
                Extension::Broadcast.as_str()
            } else {
                Extension::Presence.as_str()
            });
        }
    }
    let mut roles: Vec<&str> = checks.iter().map(|c| &*c.identity.role).collect();
    roles.sort_unstable();
    roles.dedup();
    let setup = format!(
        "BEGIN; SET LOCAL statement_timeout = {}",
        CHECK_TIMEOUT.as_millis()
    );
    let begin = client.batch_execute(&setup);
    let bypass_params: [(&(dyn ToSql + Sync), Type); 1] = [(&roles, Type::TEXT_ARRAY)];
    let bypass = client.query_typed(BYPASS_SQL, &bypass_params);
    let insert_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&all_ids, Type::TEXT_ARRAY),
        (&all_topics, Type::TEXT_ARRAY),
        (&all_exts, Type::TEXT_ARRAY),
    ];
    let insert = client.query_typed(INSERT_PROBES_SQL, &insert_params);
    let first_savepoint = client.batch_execute("SAVEPOINT walcast_read");
    let last = checks.len().saturating_sub(1);
    // Pipelined: every statement is sent (in order) before any reply is awaited; join!
    // polls each check's statements in order, and join_all polls the checks in order.
    let per_check = checks
        .iter()
        .zip(&probes)
        .enumerate()
        .map(|(i, (c, p))| async move {
            let topic: &str = &c.sub_topic;
            let claims: &str = &c.identity.claims;
            let sub: &str = &p.sub;
            let role: &str = &c.identity.role;
            let settings: [(&(dyn ToSql + Sync), Type); 4] = [
                (&topic, Type::TEXT),
                (&claims, Type::TEXT),
                (&sub, Type::TEXT),
                (&role, Type::TEXT),
            ];
            let select: [(&(dyn ToSql + Sync), Type); 1] = [(&p.ids, Type::TEXT_ARRAY)];
            // Back to the state before this check, and a fresh savepoint for the next one.
            let restore = if i == last {
                "ROLLBACK TO SAVEPOINT walcast_read; RELEASE SAVEPOINT walcast_read"
            } else {
                "ROLLBACK TO SAVEPOINT walcast_read; RELEASE SAVEPOINT walcast_read; \
                 SAVEPOINT walcast_read"
            };
            let (set, rows, restored) = tokio::join!(
                client.query_typed(SET_SETTINGS_SQL, &settings),
                client.query_typed(SELECT_PROBES_SQL, &select),
                client.batch_execute(restore),
            );
            let setup = set.map(drop).and(restored);
            // The probe's own error says most about the policy; a failing step before it
            // (which makes the probe fail with 25P02) comes next.
            match (rows, setup) {
                (Ok(rows), Ok(())) => Ok(rows),
                (Err(e), _) if e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                    Err(pg_err(e))
                }
                (_, Err(e)) | (Err(e), Ok(())) => Err(pg_err(e)),
            }
        });
    let end = client.batch_execute("ROLLBACK");
    let (b, bypass, inserted, savepoint, results, e) = tokio::join!(
        begin,
        bypass,
        insert,
        first_savepoint,
        futures_util::future::join_all(per_check),
        end
    );
    if let Err(err) = &e {
        // The session may still carry a role: never lend it again.
        let err = pg_err_ref(err);
        lease.discard();
        return all_fail(err);
    }
    lease.done();
    if let Err(err) = b {
        return all_fail(pg_err(err));
    }
    let bypassing: Vec<String> = match bypass {
        Ok(rows) => rows.iter().filter_map(|r| r.try_get(0).ok()).collect(),
        Err(err) => return all_fail(pg_err(err)),
    };
    if let Err(err) = inserted.map(drop).and(savepoint) {
        return all_fail(pg_err(err));
    }
    checks
        .iter()
        .zip(probes)
        .zip(results)
        .map(|((c, p), result)| {
            if bypassing.iter().any(|r| **r == *c.identity.role) {
                return Ok(ChannelPerms {
                    broadcast_read: true,
                    presence_read: c.presence.then_some(true),
                    broadcast_write: Some(true),
                    presence_write: Some(true),
                });
            }
            let rows = result?;
            // Probe 0 is the broadcast row, probe 1 (when presence is probed) the presence row.
            let visible = |k: usize| {
                p.ids.get(k).is_some_and(|id| {
                    rows.iter()
                        .any(|r| r.try_get::<_, String>(0).is_ok_and(|v| &v == id))
                })
            };
            Ok(ChannelPerms {
                broadcast_read: visible(0),
                presence_read: c.presence.then(|| visible(1)),
                broadcast_write: None,
                presence_write: None,
            })
        })
        .collect()
}

fn pg_err_ref(e: &tokio_postgres::Error) -> AuthzError {
    AuthzError::from_pg(e)
}

/// Whether `identity` may write (broadcast or track presence) on the private channel
/// `sub_topic`: the INSERT policies of `realtime.messages` accept the row.
pub async fn can_write(
    state: &AppState,
    identity: &Identity,
    sub_topic: &str,
    extension: Extension,
) -> Result<bool, AuthzError> {
    let identity = identity.clone();
    let sub_topic = sub_topic.to_string();
    in_rolled_back_tx(state, move |client| {
        Box::pin(async move {
            if bypasses_rls(client, &identity.role).await? {
                return Ok(true);
            }
            begin(client, &identity, &sub_topic).await?;
            client
                .batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&identity.role)))
                .await
                .map_err(pg_err)?;
            let id = uuid::Uuid::new_v4().to_string();
            let id: &str = &id;
            let ext: &str = extension.as_str();
            let topic: &str = &sub_topic;
            let params: [(&(dyn ToSql + Sync), Type); 3] =
                [(&id, Type::TEXT), (&topic, Type::TEXT), (&ext, Type::TEXT)];
            let inserted = client
                .query_typed(
                    "INSERT INTO realtime.messages (id, topic, extension, event, payload, private) \
                     VALUES ($1::pg_catalog.text::uuid, $2, $3, 'walcast_probe', '{}'::jsonb, true)",
                    &params,
                )
                .await;
            match inserted {
                Ok(_) => Ok(true),
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Ok(false),
                Err(e) => Err(pg_err(e)),
            }
        })
    })
    .await
}

/// A broadcast to keep in `realtime.messages` (a send with `persist`).
#[derive(Debug, Clone)]
pub struct ToStore<'a> {
    pub sub_topic: &'a str,
    pub event: &'a str,
    /// JSON text, or raw bytes for a binary broadcast.
    pub json: Option<&'a str>,
    pub binary: Option<&'a [u8]>,
    /// Seconds until the row may be deleted (`persist[ttl]`); `None`: the retention.
    pub ttl_secs: Option<i64>,
}

/// Why a message was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The INSERT policies refused the row.
    #[error("the INSERT policies of realtime.messages refused the message")]
    Denied,
    #[error(transparent)]
    Failed(#[from] AuthzError),
}

/// Store `msg` as a private broadcast row written AS `identity` (its role and claims, so the
/// INSERT policies of `realtime.messages` decide, as for `realtime.send`), marked
/// `skip_broadcast` because the caller delivers it live itself. Returns the row's id.
pub async fn store(
    state: &AppState,
    identity: &Identity,
    msg: &ToStore<'_>,
) -> Result<String, StoreError> {
    let lease = pool(state)
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let client = lease.client();
    let result = async {
        let bypass = bypasses_rls(client, &identity.role).await?;
        begin(client, identity, msg.sub_topic).await?;
        if !bypass {
            client
                .batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&identity.role)))
                .await
                .map_err(pg_err)?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let id_ref: &str = &id;
        let ttl = msg.ttl_secs.map(|t| t as f64);
        let params: [(&(dyn ToSql + Sync), Type); 6] = [
            (&id_ref, Type::TEXT),
            (&msg.sub_topic, Type::TEXT),
            (&msg.event, Type::TEXT),
            (&msg.json, Type::TEXT),
            (&msg.binary, Type::BYTEA),
            (&ttl, Type::FLOAT8),
        ];
        let inserted = client
            .query_typed(
                "INSERT INTO realtime.messages \
                   (id, topic, extension, event, payload, binary_payload, private, skip_broadcast, expires_at) \
                 VALUES ($1::pg_catalog.text::uuid, $2, 'broadcast', $3, $4::pg_catalog.text::jsonb, $5, true, true, \
                   pg_catalog.now() + pg_catalog.make_interval(secs => $6))",
                &params,
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(StoreError::Denied)
            }
            Err(e) => return Err(StoreError::Failed(pg_err(e))),
        }
        client.batch_execute("COMMIT").await.map_err(pg_err)?;
        Ok(id)
    }
    .await;
    // COMMIT ends the transaction (and its LOCAL role); after an error, roll back.
    let clean = match &result {
        Ok(_) => true,
        Err(_) => client.batch_execute("ROLLBACK").await.is_ok(),
    };
    if clean {
        lease.done();
    }
    result
}
