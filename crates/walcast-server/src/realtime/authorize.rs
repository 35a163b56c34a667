//! The database work a [`crate::realtime::session::Session`] asks for, run by its driver:
//! authorizing a join (or a new token), and a private channel's first write.
//!
//! ```text
//!  Authorize: token role allowed? ─▶ private: read policies on realtime.messages
//!             ─▶ replay asked: broadcast read? valid {since, limit}? ─▶ stored messages
//!             ─▶ postgres_changes entries checked under the role (catalog, privileges, filters)
//!  Write:     INSERT policies for the extension (+ presence read, when a first track enables it)
//!  Store:     a persisted send's row, INSERTed as the channel's identity (its policies decide)
//! ```
//!
//! Default deny: a check that cannot run refuses (a join error, or no write), never grants.

use walcast_core::hub::Identity;

use crate::authz::private::{self, read_perms, unauthorized_read, Extension};
use crate::authz::rls::AuthzError;
use crate::authz::roles::refusal_message;
use crate::metrics;
use crate::realtime::changes::build_bindings;
use crate::realtime::session::{AuthorizeRequest, Authorized, Outcome, Refusal, WorkKind};
use crate::realtime::stored::StoreRefused;
use crate::realtime::stored::{self, Replay, StoredMessage, REPLAY_FAILED, REPLAY_INVALID};
use crate::state::AppState;
use walcast_protocol::{PayloadEncoding, ReplayConfig};

/// The text Supabase uses when the project database cannot be reached.
pub const DB_UNAVAILABLE: &str = "Realtime was unable to connect to the project database";

/// Run one piece of session work to its outcome.
pub async fn run(state: &AppState, kind: WorkKind) -> Outcome {
    match kind {
        WorkKind::Authorize(req) => Outcome::Authorize(authorize(state, req).await),
        WorkKind::Write {
            identity,
            name,
            ext,
            presence_read,
        } => {
            let allowed = match private::can_write(state, &identity, &name, ext).await {
                Ok(allowed) => allowed,
                Err(e) => {
                    tracing::warn!(error = ?e.to_string(), topic = ?name, extension = ext.as_str(),
                        "private write check failed; refusing");
                    false
                }
            };
            let presence_read = if presence_read {
                Some(match read_perms(state, &identity, &name, true).await {
                    Ok(p) => p.presence_read == Some(true),
                    Err(e) => {
                        tracing::warn!(error = ?e.to_string(), topic = ?name, "presence read check failed; refusing");
                        false
                    }
                })
            } else {
                None
            };
            if ext == Extension::Presence && !allowed {
                metrics::delivery_dropped("unauthorized");
            }
            Outcome::Write {
                allowed,
                presence_read,
            }
        }
        WorkKind::Store {
            identity,
            name,
            event,
            encoding,
            payload,
            ttl_secs,
        } => {
            let (json, binary) = match encoding {
                PayloadEncoding::Json => (std::str::from_utf8(&payload).ok(), None),
                PayloadEncoding::Binary => (None, Some(&payload[..])),
            };
            let msg = private::ToStore {
                sub_topic: &name,
                event: &event,
                json,
                binary,
                ttl_secs,
            };
            Outcome::Stored(store(state, &identity, &msg).await)
        }
    }
}

/// Store a persisted send; the refusal kinds the session answers with.
pub async fn store(
    state: &AppState,
    identity: &Identity,
    msg: &private::ToStore<'_>,
) -> Result<String, StoreRefused> {
    if msg.json.is_none() && msg.binary.is_none() {
        return Err(StoreRefused::Failed);
    }
    match private::store(state, identity, msg).await {
        Ok(id) => Ok(id),
        Err(private::StoreError::Denied) => Err(StoreRefused::Denied),
        Err(private::StoreError::Failed(e)) => {
            tracing::warn!(error = ?e.to_string(), topic = ?msg.sub_topic, "UnableToPersistMessage: cannot store a persisted broadcast");
            Err(StoreRefused::Failed)
        }
    }
}

async fn authorize(state: &AppState, req: AuthorizeRequest) -> Result<Authorized, Refusal> {
    let role = &req.identity.role;
    let needs_db = req.private || !req.entries.is_empty();
    match state.token_roles.privilege(&state.sql, role).await {
        Ok(Some(why)) => return Err(Refusal::new("privileged_role", refusal_message(role, why))),
        Ok(None) => {}
        Err(e) if needs_db => {
            tracing::warn!(error = ?format!("{e:#}"), "cannot read the token role's attributes");
            return Err(Refusal::new("unavailable", DB_UNAVAILABLE));
        }
        // A public broadcast/presence channel touches no database: what the role could do
        // there, any token can do.
        Err(_) => {}
    }
    let perms = if req.private {
        Some(private_perms(state, &req.identity, &req.name, req.presence).await?)
    } else {
        None
    };
    let replayed = match (&req.replay, &perms) {
        (Some(config), Some(p)) => replay(state, &req.name, config, p).await?,
        _ => Vec::new(),
    };
    let changes = if req.entries.is_empty() {
        Default::default()
    } else {
        build_bindings(state, role, &req.entries).await
    };
    if let Some((key, topic)) = &req.session {
        // A session another node kept is taken over here, so the join resumes it.
        crate::cluster::sessions::take_over(state, key, topic).await;
    }
    Ok(Authorized {
        perms,
        changes,
        replayed,
    })
}

/// The stored messages a private join asked to replay, in Supabase's order of checks:
/// broadcast read, then the parameters, then the query.
async fn replay(
    state: &AppState,
    name: &str,
    config: &ReplayConfig,
    perms: &private::ChannelPerms,
) -> Result<Vec<StoredMessage>, Refusal> {
    if !perms.broadcast_read {
        return Err(Refusal::new("unauthorized", unauthorized_read(name)));
    }
    let Some(replay) = Replay::from_config(config) else {
        return Err(Refusal::new("replay", REPLAY_INVALID));
    };
    stored::replay(&state.sql, name, replay).await.map_err(|e| {
        tracing::warn!(error = ?format!("{e:#}"), topic = ?name, "cannot read stored messages to replay");
        Refusal::new("replay", REPLAY_FAILED)
    })
}

/// Read permissions of a private channel, or the refusal.
async fn private_perms(
    state: &AppState,
    identity: &Identity,
    name: &str,
    presence: bool,
) -> Result<private::ChannelPerms, Refusal> {
    match read_perms(state, identity, name, presence).await {
        Ok(p) if p.may_join() => Ok(p),
        Ok(_) => Err(Refusal::new("unauthorized", unauthorized_read(name))),
        Err(AuthzError::Failed { code, message }) => {
            tracing::debug!(%code, message = ?message, topic = ?name, "private channel read check failed");
            Err(Refusal::new("unauthorized", unauthorized_read(name)))
        }
        Err(AuthzError::Unavailable(e)) => {
            tracing::warn!(error = ?e.to_string(), topic = ?name, "private channel check unavailable");
            Err(Refusal::new("unavailable", DB_UNAVAILABLE))
        }
    }
}
