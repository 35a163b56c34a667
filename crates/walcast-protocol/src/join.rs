//! The `phx_join` payload.
//!
//! Parsing never fails: like the reference server, an invalid shape anywhere in the
//! payload falls back to that field's default and the join proceeds. Every fallback is
//! recorded in [`JoinPayload::warnings`] (field path and the JSON type found, never the
//! value, which could be a token) so the server can log `InvalidJoinPayload`.
//!
//! `config.postgres_changes` entries keep their raw text. The join reply must echo them
//! verbatim, in order, because clients compare reply entry `i` with their binding `i`
//! (see [`crate::outbound::join_reply_ok`]). The parsed fields beside the raw text are a
//! convenience for subscription setup; they never feed the echo.

use serde_json::value::RawValue;

use crate::lenient::{self, RawObject};

/// A parsed `phx_join` payload.
#[derive(Debug, Clone, Default)]
pub struct JoinPayload {
    /// Whether the payload had a `config` key at all. Pre-2022 clients join without one
    /// and encode the postgres subscription in the topic; servers may treat that as legacy.
    pub has_config: bool,
    /// `config`, with defaults for whatever was absent or invalid.
    pub config: JoinConfig,
    /// Channel token from `access_token` (or its legacy alias `user_token`). `None` means
    /// "use the connection token": absent, null, or an `sb_…` API key (not a JWT).
    pub access_token: Option<String>,
    /// One entry per ignored invalid field, e.g. `config.private: expected a boolean, got a number`.
    pub warnings: Vec<String>,
}

/// `config` of a join.
#[derive(Debug, Clone, Default)]
pub struct JoinConfig {
    /// `config.broadcast`.
    pub broadcast: BroadcastConfig,
    /// `config.presence`.
    pub presence: PresenceConfig,
    /// `config.postgres_changes`, in request order, null entries removed.
    pub postgres_changes: Vec<PostgresBinding>,
    /// `config.private`: RLS-authorized channel.
    pub private: bool,
    /// `config.postgres_changes_options`.
    pub postgres_changes_options: PostgresChangesOptions,
}

/// `config.postgres_changes_options`: how the join reply relates to the bindings going live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostgresChangesOptions {
    /// `wait`: hold the join reply until the postgres_changes bindings are live (or refuse
    /// the join when they cannot be in time).
    pub wait: bool,
    /// `timeout`: how long to hold it, in milliseconds; positive. Absent (or invalid) stays
    /// `None`: the default and the server's ceiling are server policy.
    pub timeout_ms: Option<u64>,
}

/// `config.broadcast`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BroadcastConfig {
    /// `self`: deliver the sender's own broadcasts back to it.
    pub self_broadcast: bool,
    /// `ack`: reply `ok` to each broadcast push.
    pub ack: bool,
    /// `replay`: stored broadcasts to send after the join reply.
    pub replay: Option<ReplayConfig>,
    /// `replication_ready`: announce readiness with a `system` message.
    pub replication_ready: bool,
}

/// `config.broadcast.replay`. Defaults and clamping are server policy, so absent stays `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayConfig {
    /// `since`: unix milliseconds.
    pub since: Option<i64>,
    /// `limit`: number of messages.
    pub limit: Option<i64>,
    /// `since` or `limit` was given but is not an integer (the server refuses the replay).
    pub invalid: bool,
}

/// `config.presence`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceConfig {
    /// `key`; empty means the server generates one per join.
    pub key: String,
    /// `enabled`: the client wants `presence_state`/`presence_diff`.
    pub enabled: bool,
}

/// One `config.postgres_changes` entry.
#[derive(Debug, Clone)]
pub struct PostgresBinding {
    /// The entry exactly as sent (always a JSON object). Echo this, not the parsed fields.
    pub raw: Box<RawValue>,
    /// `event`: `*`, `INSERT`, `UPDATE`, `DELETE`, any case, as sent.
    pub event: Option<String>,
    /// `schema`.
    pub schema: Option<String>,
    /// `table`.
    pub table: Option<String>,
    /// `filter`, unparsed (the grammar belongs to the subscription layer).
    pub filter: Option<String>,
    /// `select`: column names.
    pub select: Option<Vec<String>>,
}

impl JoinPayload {
    /// Parses a join payload (the `payload` of a `phx_join`); never fails.
    pub fn parse(payload: &RawValue) -> JoinPayload {
        parse(payload)
    }
}

/// Parses a join payload; never fails (see the module docs).
pub(crate) fn parse(payload: &RawValue) -> JoinPayload {
    let mut out = JoinPayload::default();
    let mut warn = Warnings(&mut out.warnings);
    let Some(obj) = RawObject::parse(payload) else {
        if !lenient::is_null(payload) {
            warn.expected("payload", "an object", lenient::kind(payload));
        }
        return out;
    };
    out.access_token = channel_token(&obj, &mut warn);
    if let Some(config) = obj.get("config") {
        out.has_config = true;
        out.config = parse_config(config, &mut warn);
    }
    out
}

fn channel_token(obj: &RawObject<'_>, warn: &mut Warnings<'_>) -> Option<String> {
    for key in ["access_token", "user_token"] {
        let Some(raw) = obj.get_non_null(key) else {
            continue;
        };
        match lenient::string(raw) {
            // Publishable/secret API keys are not JWTs; the connection token applies.
            Ok(token) if token.starts_with("sb_") => {}
            Ok(token) => return Some(token),
            Err(found) => warn.expected(key, "a string", found),
        }
    }
    None
}

fn parse_config(raw: &RawValue, warn: &mut Warnings<'_>) -> JoinConfig {
    let mut config = JoinConfig::default();
    if lenient::is_null(raw) {
        return config;
    }
    let Some(obj) = RawObject::parse(raw) else {
        warn.expected("config", "an object", lenient::kind(raw));
        return config;
    };
    if let Some(b) = section(&obj, "broadcast", warn) {
        let c = &mut config.broadcast;
        c.self_broadcast = flag(&b, "self", "config.broadcast.self", warn);
        c.ack = flag(&b, "ack", "config.broadcast.ack", warn);
        c.replication_ready = flag(
            &b,
            "replication_ready",
            "config.broadcast.replication_ready",
            warn,
        );
        c.replay = replay(&b, warn);
    }
    if let Some(p) = section(&obj, "presence", warn) {
        config.presence.enabled = flag(&p, "enabled", "config.presence.enabled", warn);
        if let Some(key) = p.get_non_null("key") {
            match lenient::string(key) {
                Ok(key) => config.presence.key = key,
                Err(found) => warn.expected("config.presence.key", "a string", found),
            }
        }
    }
    config.private = flag(&obj, "private", "config.private", warn);
    if let Some(o) = section(&obj, "postgres_changes_options", warn) {
        config.postgres_changes_options = postgres_changes_options(&o, warn);
    }
    if let Some(list) = obj.get_non_null("postgres_changes") {
        config.postgres_changes = bindings(list, warn);
    }
    config
}

/// A nested config object; null/absent → `None` silently, other types → `None` + warning.
fn section<'a>(obj: &RawObject<'a>, key: &str, warn: &mut Warnings<'_>) -> Option<RawObject<'a>> {
    let raw = obj.get_non_null(key)?;
    let parsed = RawObject::parse(raw);
    if parsed.is_none() {
        warn.expected(&format!("config.{key}"), "an object", lenient::kind(raw));
    }
    parsed
}

fn flag(obj: &RawObject<'_>, key: &str, path: &str, warn: &mut Warnings<'_>) -> bool {
    let Some(raw) = obj.get_non_null(key) else {
        return false;
    };
    lenient::boolish(raw).unwrap_or_else(|found| {
        warn.expected(path, "a boolean", found);
        false
    })
}

fn replay(b: &RawObject<'_>, warn: &mut Warnings<'_>) -> Option<ReplayConfig> {
    let raw = b.get_non_null("replay")?;
    let Some(r) = RawObject::parse(raw) else {
        warn.expected("config.broadcast.replay", "an object", lenient::kind(raw));
        return None;
    };
    let mut invalid = false;
    let mut int = |key: &str| {
        let raw = r.get_non_null(key)?;
        lenient::integer(raw)
            .map_err(|found| {
                invalid = true;
                warn.expected(
                    &format!("config.broadcast.replay.{key}"),
                    "an integer",
                    found,
                )
            })
            .ok()
    };
    let since = int("since");
    let limit = int("limit");
    Some(ReplayConfig {
        since,
        limit,
        invalid,
    })
}

fn postgres_changes_options(o: &RawObject<'_>, warn: &mut Warnings<'_>) -> PostgresChangesOptions {
    let wait = flag(o, "wait", "config.postgres_changes_options.wait", warn);
    let timeout_ms = o
        .get_non_null("timeout")
        .and_then(|raw| match lenient::integer(raw) {
            Ok(ms) if ms > 0 => u64::try_from(ms).ok(),
            Ok(_) => {
                warn.0.push(
                    "config.postgres_changes_options.timeout: expected a positive integer"
                        .to_owned(),
                );
                None
            }
            Err(found) => {
                warn.expected(
                    "config.postgres_changes_options.timeout",
                    "an integer",
                    found,
                );
                None
            }
        });
    PostgresChangesOptions { wait, timeout_ms }
}

fn bindings(list: &RawValue, warn: &mut Warnings<'_>) -> Vec<PostgresBinding> {
    let entries = match lenient::array(list) {
        Ok(entries) => entries,
        Err(found) => {
            warn.expected("config.postgres_changes", "an array", found);
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        if lenient::is_null(entry) {
            continue;
        }
        let Some(obj) = RawObject::parse(entry) else {
            warn.expected(
                &format!("config.postgres_changes[{i}]"),
                "an object",
                lenient::kind(entry),
            );
            continue;
        };
        let mut text = |key: &str| {
            let raw = obj.get_non_null(key)?;
            lenient::string(raw)
                .map_err(|found| {
                    warn.expected(
                        &format!("config.postgres_changes[{i}].{key}"),
                        "a string",
                        found,
                    )
                })
                .ok()
        };
        let event = text("event");
        let schema = text("schema");
        let table = text("table");
        let filter = text("filter");
        let select = obj.get_non_null("select").and_then(|raw| {
            let strings = lenient::array(raw).ok().and_then(|items| {
                items
                    .into_iter()
                    .map(|item| lenient::string(item).ok())
                    .collect::<Option<Vec<String>>>()
            });
            if strings.is_none() {
                warn.0.push(format!(
                    "config.postgres_changes[{i}].select: expected an array of strings, got {}",
                    lenient::kind(raw)
                ));
            }
            strings
        });
        out.push(PostgresBinding {
            raw: entry.to_owned(),
            event,
            schema,
            table,
            filter,
            select,
        });
    }
    out
}

struct Warnings<'a>(&'a mut Vec<String>);

impl Warnings<'_> {
    fn expected(&mut self, path: &str, want: &str, found: &str) {
        self.0.push(format!("{path}: expected {want}, got {found}"));
    }
}
