//! Every metric walcast exports: names in one place, labels from small fixed sets (never a
//! topic, user or table name). The Prometheus recorder is installed by `serve`; without it
//! these calls are no-ops.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const SOCKETS_CONNECTED: &str = "walcast_sockets_connected";
pub const CHANNELS_JOINED: &str = "walcast_channels_joined";
pub const JOINS: &str = "walcast_joins_total";
pub const JOIN_ERRORS: &str = "walcast_join_errors_total";
pub const FRAMES_IN: &str = "walcast_frames_in_total";
pub const FRAMES_OUT: &str = "walcast_frames_out_total";
pub const BYTES_IN: &str = "walcast_bytes_in_total";
pub const BYTES_OUT: &str = "walcast_bytes_out_total";
pub const CHANGES_DECODED: &str = "walcast_changes_decoded_total";
pub const CHANGES_DELIVERED: &str = "walcast_changes_delivered_total";
pub const DELIVERIES_DROPPED: &str = "walcast_deliveries_dropped_total";
pub const SLOW_CLIENT_DISCONNECTS: &str = "walcast_slow_client_disconnects_total";
pub const REPLICATION_RECONNECTS: &str = "walcast_replication_reconnects_total";
pub const UPGRADE_REFUSED: &str = "walcast_upgrades_refused_total";
pub const AUTHZ_CHECKS: &str = "walcast_authz_checks_total";
pub const AUTHZ_STOPPED: &str = "walcast_authz_stopped_channels_total";
pub const AUTHZ_IDENTITIES_ROUTED: &str = "walcast_authz_identities_routed_total";
pub const AUTHZ_DERIVATIONS_BATCHED: &str = "walcast_authz_derivations_batched_total";
pub const COMMIT_TO_SEND: &str = "walcast_commit_to_send_seconds";
pub const REPLICATION_LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const SLOT_RETAINED_BYTES: &str = "walcast_slot_wal_retained_bytes";
pub const SLOT_USABLE: &str = "walcast_slot_usable";
pub const REPLICATION_STREAMING: &str = "walcast_replication_streaming";
pub const AUTHZ_CHECK_SECONDS: &str = "walcast_authz_check_seconds";
pub const CHANNELS_CLOSED: &str = "walcast_channels_closed_total";
pub const BROADCASTS: &str = "walcast_broadcasts_total";
pub const BROADCAST_DELIVERIES: &str = "walcast_broadcast_deliveries_total";
pub const PRESENCE_EVENTS: &str = "walcast_presence_events_total";
pub const BROADCASTS_STORED: &str = "walcast_broadcasts_stored_total";
pub const BROADCASTS_REPLAYED: &str = "walcast_broadcasts_replayed_total";
pub const PENDING_EVICTED: &str = "walcast_pending_connections_closed_total";
pub const SESSIONS_PARKED_TOTAL: &str = "walcast_session_channels_parked_total";
pub const SESSIONS_PARKED: &str = "walcast_session_channels_parked";
pub const SESSIONS_RESUMED: &str = "walcast_session_channels_resumed_total";
pub const SESSIONS_EXPIRED: &str = "walcast_session_channels_expired_total";
pub const SESSIONS_RESYNC: &str = "walcast_session_resyncs_total";
pub const SESSION_BUFFERED_BYTES: &str = "walcast_session_buffered_bytes";
pub const SESSION_REPLAYED: &str = "walcast_session_replayed_deliveries_total";
pub const FEEDS_OPEN: &str = "walcast_feeds_open";
pub const FEEDS_OPENED: &str = "walcast_feed_opened_total";
pub const FEEDS_REFUSED: &str = "walcast_feed_refused_total";
pub const FEED_EVENTS: &str = "walcast_feed_events_total";
pub const FEED_REPLAYED: &str = "walcast_feed_replayed_changes_total";
pub const FEED_OVERFLOWS: &str = "walcast_feed_overflows_total";
pub const FEED_HISTORY_BYTES: &str = "walcast_feed_history_bytes";

/// Feed transports (label `transport`).
pub const FEED_TRANSPORTS: [&str; 3] = ["sse", "longpoll", "broadcast"];
/// Why a feed was refused (label `reason`).
pub const FEED_REFUSALS: [&str; 11] = [
    "bad_request",
    "unauthorized",
    "privileged_role",
    "forbidden",
    "max_connections",
    "rate",
    "resync",
    "unavailable",
    "overflow",
    "shutting_down",
    "member_limit",
];
/// Feed event kinds (label `kind`).
pub const FEED_EVENT_KINDS: [&str; 3] = ["change", "snapshot", "broadcast"];

/// Label values of the labelled series, so each exists (at 0) from start-up: dashboards
/// and `absent()` alerts then work on an idle server.
const JWT_LABELS: [&str; 6] = [
    "missing",
    "malformed",
    "signer",
    "signature",
    "expired",
    "claims",
];
const JOIN_ERROR_REASONS: [&str; 13] = [
    "restarting",
    "topic",
    "too_many_channels",
    "too_many_bindings",
    "join_rate",
    "member_limit",
    "unauthorized",
    "unavailable",
    "privileged_role",
    "internal",
    "unknown",
    "changes_wait_timeout",
    "changes_refused",
];
const UPGRADE_REFUSALS: [&str; 5] = [
    "vsn",
    "origin",
    "max_connections",
    "privileged_role",
    "session_id",
];
const CHANNEL_CLOSE_REASONS: [&str; 8] = [
    "events_rate",
    "token_expired",
    "presence_rate",
    "presence_size",
    "token",
    "revoked",
    "authz",
    "replication_not_ready",
];
const CHANGE_KINDS: [&str; 4] = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"];
const ORIGINS: [&str; 3] = ["client", "http", "database"];
const RESYNC_REASONS: [&str; 7] = [
    "expired",
    "overflow",
    "changed",
    "dropped",
    // Cluster mode (`crate::cluster::sessions`).
    "moved",
    "trimmed",
    "takeover_failed",
];

/// Create every series at 0 (see [`JOIN_ERROR_REASONS`] and friends).
fn zero_every_series() {
    for name in [
        SOCKETS_CONNECTED,
        REPLICATION_LAG_BYTES,
        REPLICATION_LAG_SECONDS,
        SLOT_RETAINED_BYTES,
        SLOT_USABLE,
        REPLICATION_STREAMING,
        SESSIONS_PARKED,
        SESSION_BUFFERED_BYTES,
    ] {
        gauge!(name).set(0.0);
    }
    for reason in RESYNC_REASONS {
        counter!(SESSIONS_RESYNC, "reason" => reason).absolute(0);
    }
    for kind in ["postgres_changes", "plain"] {
        gauge!(CHANNELS_JOINED, "kind" => kind).set(0.0);
    }
    for name in [
        JOINS,
        BYTES_IN,
        BYTES_OUT,
        CHANGES_DELIVERED,
        SLOW_CLIENT_DISCONNECTS,
        REPLICATION_RECONNECTS,
        AUTHZ_STOPPED,
        PENDING_EVICTED,
        SESSIONS_PARKED_TOTAL,
        SESSIONS_RESUMED,
        SESSIONS_EXPIRED,
        SESSION_REPLAYED,
    ] {
        counter!(name).absolute(0);
    }
    for reason in JOIN_ERROR_REASONS.iter().chain(&JWT_LABELS) {
        counter!(JOIN_ERRORS, "reason" => *reason).absolute(0);
    }
    for reason in UPGRADE_REFUSALS.iter().chain(&JWT_LABELS) {
        counter!(UPGRADE_REFUSED, "reason" => *reason).absolute(0);
    }
    for reason in CHANNEL_CLOSE_REASONS {
        counter!(CHANNELS_CLOSED, "reason" => reason).absolute(0);
    }
    for kind in ["text", "binary"] {
        counter!(FRAMES_IN, "kind" => kind).absolute(0);
        counter!(FRAMES_OUT, "kind" => kind).absolute(0);
    }
    for kind in CHANGE_KINDS {
        counter!(CHANGES_DECODED, "kind" => kind).absolute(0);
    }
    for reason in ["unauthorized", "slow_client"] {
        counter!(DELIVERIES_DROPPED, "reason" => reason).absolute(0);
    }
    for outcome in ["ok", "failed", "unavailable"] {
        counter!(AUTHZ_CHECKS, "outcome" => outcome).absolute(0);
    }
    for origin in ORIGINS {
        counter!(BROADCASTS, "origin" => origin).absolute(0);
        counter!(BROADCAST_DELIVERIES, "origin" => origin).absolute(0);
    }
    for event in ["track", "untrack"] {
        counter!(PRESENCE_EVENTS, "event" => event).absolute(0);
    }
    for origin in ["client", "http"] {
        for outcome in ["stored", "denied", "failed"] {
            counter!(BROADCASTS_STORED, "origin" => origin, "outcome" => outcome).absolute(0);
        }
    }
    counter!(BROADCASTS_REPLAYED).absolute(0);
    counter!(AUTHZ_IDENTITIES_ROUTED).absolute(0);
    counter!(AUTHZ_DERIVATIONS_BATCHED).absolute(0);
    // Registering the histograms makes them render (with no samples) before the first one.
    let _ = histogram!(COMMIT_TO_SEND);
    let _ = histogram!(AUTHZ_CHECK_SECONDS);
}

/// Register descriptions (shown as `# HELP` lines) and create every series at 0.
pub fn describe() {
    zero_every_series();
    describe_feeds();
    describe_cluster_stream();
    describe_gauge!(SOCKETS_CONNECTED, "WebSocket connections currently open");
    describe_gauge!(CHANNELS_JOINED, "Channels currently joined, by kind");
    describe_counter!(JOINS, "Successful channel joins");
    describe_counter!(
        BROADCASTS_STORED,
        "Persisted sends (persist: true) by origin and outcome"
    );
    describe_counter!(
        BROADCASTS_REPLAYED,
        "Stored broadcasts replayed to joining channels"
    );
    describe_counter!(JOIN_ERRORS, "Refused channel joins, by reason");
    describe_counter!(FRAMES_IN, "Frames received from clients, by kind");
    describe_counter!(FRAMES_OUT, "Frames written to clients, by kind");
    describe_counter!(BYTES_IN, "Bytes received from clients");
    describe_counter!(BYTES_OUT, "Bytes written to clients");
    describe_counter!(CHANGES_DECODED, "Row changes decoded from the WAL, by kind");
    describe_counter!(
        CHANGES_DELIVERED,
        "postgres_changes frames queued to sockets"
    );
    describe_counter!(DELIVERIES_DROPPED, "Deliveries not made, by reason");
    describe_counter!(
        SLOW_CLIENT_DISCONNECTS,
        "Sockets closed because their send queue overflowed"
    );
    describe_counter!(
        REPLICATION_RECONNECTS,
        "Replication connections re-established"
    );
    describe_counter!(UPGRADE_REFUSED, "WebSocket upgrades refused, by reason");
    describe_counter!(
        AUTHZ_CHECKS,
        "Row-level security checks (one per table x identity group x batch), by outcome"
    );
    describe_counter!(
        AUTHZ_STOPPED,
        "Channels whose postgres_changes were stopped because their authorization failed"
    );
    describe_counter!(
        AUTHZ_DERIVATIONS_BATCHED,
        "Identities whose claims values (for policies decided in process) were computed in a batch of many, in one round trip"
    );
    describe_counter!(
        AUTHZ_IDENTITIES_ROUTED,
        "Identities changes were routed to before authorization (value gates route a row only to the identities whose value it carries)"
    );
    describe_histogram!(
        COMMIT_TO_SEND,
        "From a change's commit time to its frames being queued"
    );
    describe_counter!(
        SESSIONS_PARKED_TOTAL,
        "Session channels kept after their socket went away (session resume)"
    );
    describe_gauge!(SESSIONS_PARKED, "Session channels parked now");
    describe_counter!(SESSIONS_RESUMED, "Session channels taken over by a rejoin");
    describe_counter!(
        SESSIONS_EXPIRED,
        "Parked session channels dropped at the end of the resume window"
    );
    describe_counter!(
        SESSIONS_RESYNC,
        "Rejoins told ResyncRequired instead of resumed, by reason"
    );
    describe_gauge!(
        SESSION_BUFFERED_BYTES,
        "Bytes kept for replay by session channels"
    );
    describe_counter!(
        SESSION_REPLAYED,
        "Deliveries replayed to resumed session channels"
    );
}

pub fn describe_feeds() {
    for t in FEED_TRANSPORTS {
        gauge!(FEEDS_OPEN, "transport" => t).increment(0.0);
        counter!(FEEDS_OPENED, "transport" => t).increment(0);
    }
    for r in FEED_REFUSALS {
        counter!(FEEDS_REFUSED, "reason" => r).increment(0);
    }
    for k in FEED_EVENT_KINDS {
        counter!(FEED_EVENTS, "kind" => k).increment(0);
    }
    counter!(FEED_REPLAYED).increment(0);
    counter!(FEED_OVERFLOWS).increment(0);
    describe_gauge!(
        FEEDS_OPEN,
        "Change and broadcast feeds (SSE, long-poll) open now, by transport"
    );
    describe_counter!(FEEDS_OPENED, "Feeds opened, by transport");
    describe_counter!(FEEDS_REFUSED, "Feed requests refused, by reason");
    describe_counter!(FEED_EVENTS, "Events sent on feeds, by kind");
    describe_counter!(FEED_REPLAYED, "Changes replayed to feeds from the history");
    describe_counter!(
        FEED_OVERFLOWS,
        "Feeds ended because their outbox overflowed"
    );
    describe_gauge!(
        FEED_HISTORY_BYTES,
        "Bytes held by the change history feeds resume from"
    );
}

/// `transport`: one of [`FEED_TRANSPORTS`].
pub fn feed_opened(transport: &'static str) {
    counter!(FEEDS_OPENED, "transport" => transport).increment(1);
    gauge!(FEEDS_OPEN, "transport" => transport).increment(1.0);
}

pub fn feed_closed(transport: &'static str) {
    gauge!(FEEDS_OPEN, "transport" => transport).decrement(1.0);
}

/// `reason`: one of [`FEED_REFUSALS`].
pub fn feed_refused(reason: &'static str) {
    counter!(FEEDS_REFUSED, "reason" => reason).increment(1);
}

/// `kind`: one of [`FEED_EVENT_KINDS`].
pub fn feed_events(kind: &'static str, n: u64) {
    if n > 0 {
        counter!(FEED_EVENTS, "kind" => kind).increment(n);
    }
}

pub fn feed_replayed(n: usize) {
    counter!(FEED_REPLAYED).increment(n as u64);
}

pub fn feed_overflowed() {
    counter!(FEED_OVERFLOWS).increment(1);
}

pub fn feed_history_bytes(bytes: usize) {
    gauge!(FEED_HISTORY_BYTES).set(bytes as f64);
}

pub fn session_parked() {
    counter!(SESSIONS_PARKED_TOTAL).increment(1);
}

pub fn sessions_parked_now(delta: f64) {
    gauge!(SESSIONS_PARKED).increment(delta);
}

pub fn session_resumed(replayed: usize) {
    counter!(SESSIONS_RESUMED).increment(1);
    counter!(SESSION_REPLAYED).increment(replayed as u64);
}

pub fn session_expired() {
    counter!(SESSIONS_EXPIRED).increment(1);
}

/// `reason`: one of [`RESYNC_REASONS`].
pub fn session_resync(reason: &'static str) {
    counter!(SESSIONS_RESYNC, "reason" => reason).increment(1);
}

pub fn resume_buffered_bytes(delta: f64) {
    gauge!(SESSION_BUFFERED_BYTES).increment(delta);
}

pub fn socket_opened() {
    gauge!(SOCKETS_CONNECTED).increment(1.0);
}

pub fn socket_closed() {
    gauge!(SOCKETS_CONNECTED).decrement(1.0);
}

/// `kind`: "postgres_changes" or "plain".
pub fn channel_joined(kind: &'static str) {
    counter!(JOINS).increment(1);
    gauge!(CHANNELS_JOINED, "kind" => kind).increment(1.0);
}

pub fn channel_left(kind: &'static str) {
    gauge!(CHANNELS_JOINED, "kind" => kind).decrement(1.0);
}

/// `reason`: a fixed label (see the join code).
pub fn join_error(reason: &'static str) {
    counter!(JOIN_ERRORS, "reason" => reason).increment(1);
}

/// Text or binary WebSocket frame (the `kind` label of the frame counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Text,
    Binary,
}

/// The per-frame counters, registered once: they are bumped for every frame in and every
/// batch out, and a registry look-up per call (key hashing, a map probe) was about 2 % of
/// the server's CPU in the broadcast fan-out profile. Registered on first use, which is
/// after `serve` installed the recorder.
struct FrameCounters {
    in_text: metrics::Counter,
    in_binary: metrics::Counter,
    out_text: metrics::Counter,
    out_binary: metrics::Counter,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
}

fn frame_counters() -> &'static FrameCounters {
    static COUNTERS: std::sync::OnceLock<FrameCounters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| FrameCounters {
        in_text: counter!(FRAMES_IN, "kind" => "text"),
        in_binary: counter!(FRAMES_IN, "kind" => "binary"),
        out_text: counter!(FRAMES_OUT, "kind" => "text"),
        out_binary: counter!(FRAMES_OUT, "kind" => "binary"),
        bytes_in: counter!(BYTES_IN),
        bytes_out: counter!(BYTES_OUT),
    })
}

pub fn frame_in(kind: FrameKind, bytes: usize) {
    let c = frame_counters();
    match kind {
        FrameKind::Text => c.in_text.increment(1),
        FrameKind::Binary => c.in_binary.increment(1),
    }
    c.bytes_in.increment(bytes as u64);
}

/// One write batch: its text and binary frames and their bytes.
pub fn frames_out(text: u64, binary: u64, bytes: u64) {
    let c = frame_counters();
    if text > 0 {
        c.out_text.increment(text);
    }
    if binary > 0 {
        c.out_binary.increment(binary);
    }
    c.bytes_out.increment(bytes);
}

/// `kind`: INSERT, UPDATE, DELETE, TRUNCATE.
pub fn change_decoded(kind: &'static str) {
    counter!(CHANGES_DECODED, "kind" => kind).increment(1);
}

pub fn changes_delivered(n: u64) {
    counter!(CHANGES_DELIVERED).increment(n);
}

/// `reason`: "unauthorized", "slow_client".
pub fn delivery_dropped(reason: &'static str) {
    counter!(DELIVERIES_DROPPED, "reason" => reason).increment(1);
}

pub fn delivery_dropped_n(reason: &'static str, n: u64) {
    counter!(DELIVERIES_DROPPED, "reason" => reason).increment(n);
}

pub fn slow_client_disconnect() {
    counter!(SLOW_CLIENT_DISCONNECTS).increment(1);
}

pub fn replication_reconnected() {
    counter!(REPLICATION_RECONNECTS).increment(1);
}

/// `reason`: the JWT error label, or "vsn".
pub fn upgrade_refused(reason: &'static str) {
    counter!(UPGRADE_REFUSED, "reason" => reason).increment(1);
}

pub fn commit_to_send(seconds: f64) {
    histogram!(COMMIT_TO_SEND).record(seconds);
}

pub fn slot_state(lag_bytes: i64, retained_bytes: i64, usable: bool) {
    gauge!(REPLICATION_LAG_BYTES).set(lag_bytes as f64);
    gauge!(SLOT_RETAINED_BYTES).set(retained_bytes as f64);
    gauge!(SLOT_USABLE).set(if usable { 1.0 } else { 0.0 });
}

pub fn replication_lag_seconds(seconds: f64) {
    gauge!(REPLICATION_LAG_SECONDS).set(seconds.max(0.0));
}

pub fn replication_streaming(on: bool) {
    gauge!(REPLICATION_STREAMING).set(if on { 1.0 } else { 0.0 });
}

/// One authorization step: `ok`, `failed` (the identity's check raised) or `unavailable`.
pub fn authz_check(outcome: &'static str) {
    counter!(AUTHZ_CHECKS, "outcome" => outcome).increment(1);
}

/// Identities a change was routed to before authorization (each is then decided for it):
/// with value gates, only those whose value the row carries, whatever the number of users.
pub fn authz_identities_routed(n: u64) {
    counter!(AUTHZ_IDENTITIES_ROUTED).increment(n);
}

/// Identities whose claims values were computed together, in one round trip.
pub fn authz_derivations_batched(n: u64) {
    counter!(AUTHZ_DERIVATIONS_BATCHED).increment(n);
}

pub fn authz_stopped(channels: u64) {
    counter!(AUTHZ_STOPPED).increment(channels);
}

/// `origin`: "client", "http", "database".
pub fn broadcast(origin: &'static str, delivered: u64) {
    counter!(BROADCASTS, "origin" => origin).increment(1);
    counter!(BROADCAST_DELIVERIES, "origin" => origin).increment(delivered);
}

/// A persisted send: `origin` "client" or "http", `outcome` "stored", "denied", "failed".
pub fn broadcast_stored(origin: &'static str, outcome: &'static str) {
    counter!(BROADCASTS_STORED, "origin" => origin, "outcome" => outcome).increment(1);
}

/// Stored messages replayed to one joining channel.
pub fn replayed(n: usize) {
    counter!(BROADCASTS_REPLAYED).increment(n as u64);
}

/// `event`: "track", "untrack".
pub fn presence_event(event: &'static str) {
    counter!(PRESENCE_EVENTS, "event" => event).increment(1);
}

/// `reason`: "events_rate", "token_expired", "presence_rate", "authz".
pub fn channel_closed(reason: &'static str) {
    counter!(CHANNELS_CLOSED, "reason" => reason).increment(1);
}

/// A pending (not yet upgraded) connection was closed to admit a newer one.
pub fn pending_evicted() {
    counter!(PENDING_EVICTED).increment(1);
}

pub fn authz_check_seconds(seconds: f64) {
    histogram!(AUTHZ_CHECK_SECONDS).record(seconds);
}

// Joins: the catalog cache and batched private-channel read checks (db::catalog_cache,
// authz::private). Kept in one block so other branches' additions merge cleanly.

pub const CATALOG_CACHE: &str = "walcast_catalog_cache_lookups_total";
pub const PRIVATE_READ_BATCHES: &str = "walcast_private_read_batches_total";
pub const PRIVATE_READ_CHECKS: &str = "walcast_private_read_checks_total";
/// `kind` label values of [`CATALOG_CACHE`].
const CATALOG_KINDS: [&str; 3] = ["role", "table", "table_access"];

/// Describe the join series and create them at 0 (`serve` calls it after [`describe`]).
pub fn describe_joins() {
    describe_counter!(
        CATALOG_CACHE,
        "Catalog look-ups made by joins, by kind and outcome (hit: answered from the cache or shared with a query in flight; miss: queried)"
    );
    describe_counter!(
        PRIVATE_READ_BATCHES,
        "Round trips that evaluated private-channel read checks"
    );
    describe_counter!(
        PRIVATE_READ_CHECKS,
        "Private-channel read checks evaluated (one per join or token refresh)"
    );
    for kind in CATALOG_KINDS {
        for outcome in ["hit", "miss"] {
            counter!(CATALOG_CACHE, "kind" => kind, "outcome" => outcome).absolute(0);
        }
    }
    counter!(PRIVATE_READ_BATCHES).absolute(0);
    counter!(PRIVATE_READ_CHECKS).absolute(0);
}

/// `kind`: one of [`CATALOG_KINDS`]; `outcome`: "hit" or "miss".
pub fn catalog_cache(kind: &'static str, outcome: &'static str) {
    counter!(CATALOG_CACHE, "kind" => kind, "outcome" => outcome).increment(1);
}

/// One private read batch of `checks` checks.
pub fn private_read_batch(checks: usize) {
    counter!(PRIVATE_READ_BATCHES).increment(1);
    counter!(PRIVATE_READ_CHECKS).increment(checks as u64);
}

// Cluster mode (`crate::cluster`): the Redis link, the registry and the bus.
pub const CLUSTER_REDIS_UP: &str = "walcast_cluster_redis_up";
pub const CLUSTER_REDIS_RTT: &str = "walcast_cluster_redis_rtt_seconds";
pub const CLUSTER_NODES: &str = "walcast_cluster_nodes";
pub const CLUSTER_MESSAGES: &str = "walcast_cluster_messages_total";

/// Kinds of bus messages (label `kind`) and what happened to them (label `direction`).
const CLUSTER_MESSAGE_KINDS: [&str; 4] = ["broadcast", "presence", "sync", "invalid"];
const CLUSTER_DIRECTIONS: [&str; 3] = ["out", "in", "dropped"];

/// Describe the cluster metrics and create their series (cluster mode only).
pub fn describe_cluster() {
    describe_gauge!(
        CLUSTER_REDIS_UP,
        "1 while this node's Redis link answers PING (cluster mode)"
    );
    describe_gauge!(CLUSTER_REDIS_RTT, "Round trip of the last Redis PING");
    describe_gauge!(
        CLUSTER_NODES,
        "Live cluster nodes (heartbeat within --presence-node-timeout-secs), this one included"
    );
    describe_counter!(
        CLUSTER_MESSAGES,
        "Messages between nodes over Redis, by kind and direction (out, in, dropped)"
    );
    gauge!(CLUSTER_REDIS_UP).set(0.0);
    gauge!(CLUSTER_REDIS_RTT).set(0.0);
    gauge!(CLUSTER_NODES).set(1.0);
    for kind in CLUSTER_MESSAGE_KINDS {
        for direction in CLUSTER_DIRECTIONS {
            counter!(CLUSTER_MESSAGES, "kind" => kind, "direction" => direction).absolute(0);
        }
    }
    counter!(BROADCASTS, "origin" => "cluster").absolute(0);
    counter!(BROADCAST_DELIVERIES, "origin" => "cluster").absolute(0);
}

pub fn cluster_redis_up(up: bool) {
    gauge!(CLUSTER_REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn cluster_redis_rtt(seconds: f64) {
    gauge!(CLUSTER_REDIS_RTT).set(seconds);
}

pub fn cluster_nodes(n: usize) {
    gauge!(CLUSTER_NODES).set(n as f64);
}

/// One bus message: `kind` of [`CLUSTER_MESSAGE_KINDS`], `direction` of [`CLUSTER_DIRECTIONS`].
pub fn cluster_message(kind: &'static str, direction: &'static str) {
    cluster_messages(kind, direction, 1);
}

pub fn cluster_messages(kind: &'static str, direction: &'static str, n: u64) {
    counter!(CLUSTER_MESSAGES, "kind" => kind, "direction" => direction).increment(n);
}

/// Cluster mode: this node's role, 1 on the series of its current role (`streamer` or
/// `follower`), 0 on the other; no series without `--redis-url`.
pub const CLUSTER_ROLE: &str = "walcast_cluster_role";
/// Transactions this node published to the cluster's change stream (as the streamer).
pub const CLUSTER_PUBLISHED: &str = "walcast_cluster_published_transactions_total";
/// Transactions this node read from the cluster's change stream (as a follower).
pub const CLUSTER_FOLLOWED: &str = "walcast_cluster_followed_transactions_total";
/// Transactions skipped because this node had routed them already (failover replay).
pub const CLUSTER_SKIPPED: &str = "walcast_cluster_skipped_transactions_total";

fn describe_cluster_stream() {
    describe_gauge!(
        CLUSTER_ROLE,
        "Cluster mode: 1 on this node's role (streamer: holds the lease and streams the slot; follower: reads the cluster's change stream)"
    );
    describe_counter!(
        CLUSTER_PUBLISHED,
        "Transactions published to the cluster's change stream by this node"
    );
    describe_counter!(
        CLUSTER_FOLLOWED,
        "Transactions read from the cluster's change stream by this node"
    );
    describe_counter!(
        CLUSTER_SKIPPED,
        "Transactions skipped because this node had routed them already"
    );
}

/// This node's cluster role.
pub fn cluster_role(streamer: bool) {
    gauge!(CLUSTER_ROLE, "role" => "streamer").set(if streamer { 1.0 } else { 0.0 });
    gauge!(CLUSTER_ROLE, "role" => "follower").set(if streamer { 0.0 } else { 1.0 });
}

pub fn cluster_published(n: u64) {
    counter!(CLUSTER_PUBLISHED).increment(n);
}

pub fn cluster_followed(n: u64) {
    counter!(CLUSTER_FOLLOWED).increment(n);
}

pub fn cluster_skipped(n: u64) {
    counter!(CLUSTER_SKIPPED).increment(n);
}

// Cluster mode: sessions resumed on another node than the one that kept them
// (`crate::cluster::sessions`).
/// Sessions this node took over from another node, by whether that node handed them over
/// (`alive`) or they came from its records (`records`: the node was gone).
pub const CLUSTER_SESSIONS_TAKEN_OVER: &str = "walcast_cluster_sessions_taken_over_total";
/// Deliveries replayed from the cluster's change stream to taken-over sessions.
pub const CLUSTER_SESSION_REPLAYED: &str = "walcast_cluster_session_replayed_deliveries_total";

/// Describe the session take-over metrics and create their series (cluster mode only).
pub fn describe_cluster_sessions() {
    describe_counter!(
        CLUSTER_SESSIONS_TAKEN_OVER,
        "Sessions taken over from another node (from: alive = handed over, records = that node was gone)"
    );
    describe_counter!(
        CLUSTER_SESSION_REPLAYED,
        "Deliveries replayed from the cluster's change stream to sessions taken over from another node"
    );
    for from in ["alive", "records"] {
        counter!(CLUSTER_SESSIONS_TAKEN_OVER, "from" => from).absolute(0);
    }
    counter!(CLUSTER_SESSION_REPLAYED).absolute(0);
}

pub fn session_taken_over(alive: bool) {
    let from = if alive { "alive" } else { "records" };
    counter!(CLUSTER_SESSIONS_TAKEN_OVER, "from" => from).increment(1);
}

pub fn session_replayed_from_stream(n: usize) {
    counter!(CLUSTER_SESSION_REPLAYED).increment(n as u64);
}

// Cluster mode: whether postgres_changes flow (issue #13, follower readiness).
/// 1 while some node of the cluster streams the slot, as this node last saw it.
pub const CLUSTER_CHANGES_FLOWING: &str = "walcast_cluster_changes_flowing";

/// Describe [`CLUSTER_CHANGES_FLOWING`] (cluster mode only).
pub fn describe_cluster_flow() {
    describe_gauge!(
        CLUSTER_CHANGES_FLOWING,
        "Cluster mode: 1 while some node streams the slot (the streamer: its replication connection is up; a follower: a streamer marked the slot within 2 x --failover-timeout-secs), 0 while postgres_changes do not flow"
    );
    gauge!(CLUSTER_CHANGES_FLOWING).set(0.0);
}

pub fn cluster_changes_flowing(flowing: bool) {
    gauge!(CLUSTER_CHANGES_FLOWING).set(if flowing { 1.0 } else { 0.0 });
}

// RLS at many users: claims values derived before an identity's first row (issue #15).
pub const AUTHZ_DERIVED_AHEAD: &str = "walcast_authz_derived_ahead_total";

/// Describe (and register at 0) [`AUTHZ_DERIVED_AHEAD`]; called by `serve`.
pub fn describe_derived_ahead() {
    describe_counter!(
        AUTHZ_DERIVED_AHEAD,
        "Identities whose claims values (for policies decided in process) were derived before their first row: when they joined, or when their role's table policy was compiled"
    );
    counter!(AUTHZ_DERIVED_AHEAD).absolute(0);
}

/// Identities derived ahead of their first row.
pub fn authz_derived_ahead(n: u64) {
    counter!(AUTHZ_DERIVED_AHEAD).increment(n);
}
