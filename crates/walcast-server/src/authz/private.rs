//! Private channels (`config.private: true`): read and write permissions from the row-level
//! security policies on `realtime.messages` (see `sql/realtime.sql`).
//!
//! ```text
//!  join (and each new access_token) ─▶ read_perms ─▶ ChannelPerms, cached on the channel
//!    BEGIN
//!      set_config: realtime.topic, request.jwt.claims, request.jwt.claim.sub / .role (LOCAL)
//!      INSERT probe rows (topic, 'broadcast' [, 'presence'])   ← as walcast's own user
//!      SET LOCAL ROLE "<role>"
//!      SELECT id FROM realtime.messages WHERE id IN (probes)   ← the SELECT policies decide
//!    ROLLBACK                                                  ← probes never persist
//!  first broadcast / track ─▶ can_write: same session setup, then as the role
//!      INSERT (topic, extension) ─▶ ok = allowed, insufficient_privilege = denied; ROLLBACK
//! ```
//!
//! Invariants: default deny (an error is never a grant); each check has its own transaction
//! on a connection nobody else uses meanwhile, so role and claims never leak from one check
//! to another; the role is a quoted identifier, everything else a bound parameter; roles
//! with BYPASSRLS (or superusers) pass without probing.

use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use walcast_core::hub::Identity;

use crate::authz::rls::{claim_str, quote_ident, AuthzError, CHECK_TIMEOUT};
use crate::db::sql::ExclusivePool;
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
/// `realtime:`); presence is probed only when the channel uses it.
pub async fn read_perms(
    state: &AppState,
    identity: &Identity,
    sub_topic: &str,
    presence: bool,
) -> Result<ChannelPerms, AuthzError> {
    let identity = identity.clone();
    let sub_topic = sub_topic.to_string();
    in_rolled_back_tx(state, move |client| {
        Box::pin(async move {
            if bypasses_rls(client, &identity.role).await? {
                return Ok(ChannelPerms {
                    broadcast_read: true,
                    presence_read: presence.then_some(true),
                    broadcast_write: Some(true),
                    presence_write: Some(true),
                });
            }
            begin(client, &identity, &sub_topic).await?;
            let mut probes: Vec<(String, Extension)> =
                vec![(uuid::Uuid::new_v4().to_string(), Extension::Broadcast)];
            if presence {
                probes.push((uuid::Uuid::new_v4().to_string(), Extension::Presence));
            }
            for (id, ext) in &probes {
                let id: &str = id;
                let ext: &str = ext.as_str();
                let topic: &str = &sub_topic;
                let params: [(&(dyn ToSql + Sync), Type); 3] =
                    [(&id, Type::TEXT), (&topic, Type::TEXT), (&ext, Type::TEXT)];
                client
                    .query_typed(
                        "INSERT INTO realtime.messages (id, topic, extension, event, payload, private) \
                         VALUES ($1::pg_catalog.text::uuid, $2, $3, 'walcast_probe', '{}'::jsonb, true)",
                        &params,
                    )
                    .await
                    .map_err(pg_err)?;
            }
            client
                .batch_execute(&format!("SET LOCAL ROLE {}", quote_ident(&identity.role)))
                .await
                .map_err(pg_err)?;
            let ids: Vec<String> = probes.iter().map(|(id, _)| id.clone()).collect();
            let params: [(&(dyn ToSql + Sync), Type); 1] = [(&ids, Type::TEXT_ARRAY)];
            let rows = client
                .query_typed(
                    "SELECT id::pg_catalog.text FROM realtime.messages \
                     WHERE id = ANY ($1::pg_catalog.text[]::uuid[])",
                    &params,
                )
                .await
                .map_err(pg_err)?;
            let visible = |ext: Extension| {
                probes.iter().any(|(id, e)| {
                    *e == ext
                        && rows
                            .iter()
                            .any(|r| r.try_get::<_, String>(0).is_ok_and(|v| &v == id))
                })
            };
            Ok(ChannelPerms {
                broadcast_read: visible(Extension::Broadcast),
                presence_read: presence.then(|| visible(Extension::Presence)),
                broadcast_write: None,
                presence_write: None,
            })
        })
    })
    .await
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
