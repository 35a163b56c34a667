//! Command line: every flag also reads an environment variable (design.md, "Interfaces").

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "walcast",
    version,
    about = "Realtime server for Postgres: WAL changes, broadcast and presence over WebSocket, \
             speaking the Supabase Realtime protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the realtime server.
    // Boxed: the serve arguments are much larger than the other commands'.
    Serve(Box<ServeArgs>),
    /// Print decoded changes as JSON lines (a CDC debugging tool and the decode benchmark).
    Tail(TailArgs),
    /// Diagnose a database: wal_level, slots, publication, replica identity, RLS.
    Check(CheckArgs),
    /// Create or update the `realtime` schema objects (private channels) in the database.
    Migrate(MigrateArgs),
    /// Start a throwaway Postgres, a demo schema and the server on port 4000.
    Demo(DemoArgs),
}

/// Where to replicate from.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Source database (`postgres://user:password@host:port/db?sslmode=…`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Publication to stream.
    #[arg(long, env = "PUBLICATION", default_value = "walcast")]
    pub publication: String,

    /// Replication slot.
    #[arg(long, env = "SLOT_NAME", default_value = "walcast")]
    pub slot: String,

    /// Use a temporary slot (dropped on disconnect: no WAL retention, but changes made while
    /// walcast is down are lost).
    #[arg(long, env = "TEMPORARY_SLOT")]
    pub temporary_slot: bool,

    /// Never create the publication; fail with the SQL to run instead.
    #[arg(long, env = "NO_CREATE_PUBLICATION")]
    pub no_create_publication: bool,

    /// When the slot was dropped or invalidated while walcast streamed from it, create it
    /// again (changes made meanwhile are lost; postgres_changes channels are told to refetch).
    /// Without it walcast stops streaming and says why.
    #[arg(long, env = "RECREATE_SLOT")]
    pub recreate_slot: bool,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Exit once every change up to the WAL position at startup has been printed.
    #[arg(long)]
    pub exit_when_caught_up: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// HS256/384/512 secret for verifying JWTs.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// JWKS JSON, inline or `@path`, for RS*/ES*/EdDSA tokens.
    #[arg(long, env = "JWT_JWKS", hide_env_values = true)]
    pub jwt_jwks: Option<String>,

    /// HTTP + WebSocket port.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Listen address.
    #[arg(long, env = "BIND", default_value = "0.0.0.0")]
    pub bind: String,

    /// On SIGTERM: longest the shutdown (closing sockets, the last confirmation to Postgres)
    /// may take before the process exits anyway.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,

    /// Database broadcasts (`realtime.messages` rows) older than this are deleted.
    #[arg(long, env = "MESSAGES_RETENTION_SECS", default_value_t = 3 * 24 * 3600)]
    pub messages_retention_secs: u64,

    /// How often expired `realtime.messages` rows (past the retention or their stored
    /// send's ttl) are deleted.
    #[arg(long, env = "MESSAGES_SWEEP_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages_sweep_secs: u64,

    /// Require `Authorization: Bearer <token>` on /metrics.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// DELETEs on row-level-security tables without REPLICA IDENTITY FULL, which policies
    /// cannot judge: `drop` (deliver to nobody) or `primary-key` (the key alone to every
    /// subscriber whose role may SELECT the table, as Supabase does).
    #[arg(long, env = "RLS_DELETES", value_enum, default_value_t = crate::authz::rls::RlsDeletes::Drop)]
    pub rls_deletes: crate::authz::rls::RlsDeletes,

    /// Threads of the intake runtime, where a new socket runs until its first join is live,
    /// below the priority of established sockets (a reconnect storm then cannot delay their
    /// heartbeats and deliveries). 0: no intake runtime, every socket on the main one.
    /// Default: one per CPU.
    #[arg(long, env = "INTAKE_THREADS")]
    pub intake_threads: Option<usize>,

    /// Nice steps the intake threads run below the rest of the process (0 to 19).
    #[arg(long, env = "INTAKE_NICE", default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub intake_nice: i32,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Cluster mode: several nodes over one Redis (see `crate::cluster`).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Redis to run as a cluster node over (`redis://[user:password@]host:port[/db]`). Every
    /// node points at the same Postgres, slot and Redis. Without it walcast is one process.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// This node's name in the cluster (logs, metrics, presence ownership). Default: the host
    /// name, the process id and a random suffix, so that a restarted node is a new node.
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,

    /// How long the streamer's lease lives without renewal: within this a surviving node
    /// takes over the slot when the streamer dies or loses Redis.
    #[arg(long, env = "FAILOVER_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub failover_timeout_secs: u64,

    /// A node silent for this long is gone: its presences leave on every other node.
    #[arg(long, env = "PRESENCE_NODE_TIMEOUT_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub presence_node_timeout_secs: u64,
}

/// Limits and timeouts (Supabase's defaults where it has one).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Channels one socket may join.
    #[arg(long, env = "MAX_CHANNELS_PER_CLIENT", default_value_t = 100)]
    pub max_channels_per_client: usize,

    /// Frames queued for one socket before it counts as too slow and is disconnected.
    #[arg(long, env = "SOCKET_SEND_QUEUE", default_value_t = 4096)]
    pub socket_send_queue: usize,

    /// Bytes queued for one socket before it counts as too slow and is disconnected.
    #[arg(long, env = "SOCKET_SEND_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub socket_send_queue_bytes: usize,

    /// Close a socket (4008) whose writes make no progress for this many seconds.
    #[arg(long, env = "WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,

    /// A change whose payload exceeds this many bytes is sent trimmed, with an error.
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = 1_048_576)]
    pub max_record_bytes: usize,

    /// Largest WebSocket message or frame accepted from a client, in bytes.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 5_000_000)]
    pub max_frame_bytes: usize,

    /// Longest a connection may stay open without a request in progress before it became a
    /// WebSocket (idle, trickling its headers, or sending anything else); then it is closed.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// Connections held open while not yet WebSockets (nor serving a request); past it the
    /// oldest such connection is closed to admit the new one.
    #[arg(long, env = "MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    pub max_pending_connections: usize,

    /// Close a socket that sent nothing (not even a heartbeat) for this many seconds.
    #[arg(long, env = "IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Delay before a join error reply, damping rejoin storms (must stay well under the
    /// clients' 10 s join timeout).
    #[arg(long, env = "CHANNEL_ERROR_BACKOFF_MS", default_value_t = 1000)]
    pub channel_error_backoff_ms: u64,

    /// Delay before refusing a WebSocket upgrade, damping reconnect storms.
    #[arg(long, env = "CONNECT_ERROR_BACKOFF_MS", default_value_t = 1000)]
    pub connect_error_backoff_ms: u64,

    /// WebSocket connections held at once; further upgrades get 429 "Too many connected users".
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: u64,

    /// Channel joins per second across the server (a ceiling far above one client's share);
    /// joins past it are refused.
    #[arg(long, env = "MAX_JOINS_PER_SECOND", default_value_t = 2_500)]
    pub max_joins_per_second: u32,

    /// Channel joins per second one client (token `sub`, else address) may make over all
    /// its sockets; past it the socket is disconnected.
    #[arg(long, env = "MAX_JOINS_PER_SECOND_PER_CLIENT", default_value_t = 250)]
    pub max_joins_per_second_per_client: u32,

    /// Channel joins per second one socket may make; past it the socket is disconnected.
    #[arg(long, env = "MAX_JOINS_PER_SECOND_PER_SOCKET", default_value_t = 100)]
    pub max_joins_per_second_per_socket: u32,

    /// Channels (sockets) one topic may hold; 0 = no cap. Joins past it are refused.
    #[arg(long, env = "MAX_MEMBERS_PER_CHANNEL", default_value_t = 0)]
    pub max_members_per_channel: usize,

    /// Broadcast and presence pushes one channel may send per second; past it the channel is
    /// closed with "Too many messages per second".
    #[arg(long, env = "MAX_EVENTS_PER_SECOND", default_value_t = 1_000)]
    pub max_events_per_second: u32,

    /// Comma-separated browser origins allowed to open WebSockets (e.g.
    /// `https://app.example.com`); unset allows any. Requests without an Origin header
    /// (servers, mobile apps) are not affected.
    #[arg(long, env = "ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// Largest broadcast or presence payload, in KB (Supabase's `max_payload_size_in_kb`).
    #[arg(long, env = "MAX_PAYLOAD_SIZE_KB", default_value_t = 3000)]
    pub max_payload_size_kb: usize,

    /// Presence calls (track/untrack) one channel may make per window.
    #[arg(long, env = "CLIENT_PRESENCE_MAX_CALLS", default_value_t = 5)]
    pub client_presence_max_calls: u32,

    /// The presence call window, in milliseconds.
    #[arg(long, env = "CLIENT_PRESENCE_WINDOW_MS", default_value_t = 30_000)]
    pub client_presence_window_ms: u64,

    /// Messages per second the REST broadcast endpoints accept from all callers together.
    #[arg(long, env = "MAX_HTTP_BROADCASTS_PER_SECOND", default_value_t = 10_000)]
    pub max_http_broadcasts_per_second: u32,

    /// Messages per second the REST broadcast endpoints accept from one client (token
    /// `sub`, else address); also the largest batch.
    #[arg(
        long,
        env = "MAX_HTTP_BROADCASTS_PER_SECOND_PER_CLIENT",
        default_value_t = 1000
    )]
    pub max_http_broadcasts_per_second_per_client: u32,

    /// Largest presence payload one channel may track, in bytes.
    #[arg(long, env = "MAX_PRESENCE_PAYLOAD_BYTES", default_value_t = 65_536)]
    pub max_presence_payload_bytes: usize,

    /// Largest presence state of one channel (all its members' payloads), in bytes.
    #[arg(long, env = "MAX_PRESENCE_STATE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_presence_state_bytes: usize,

    /// Comma-separated token roles allowed although privileged (superuser, REPLICATION, or a
    /// predefined `pg_*` role); such tokens are refused by default.
    #[arg(long, env = "ALLOWED_TOKEN_ROLES")]
    pub allowed_token_roles: Option<String>,

    /// Refuse public channels: every join must set `config.private` (Supabase's per-project
    /// "private channels only" setting, `PrivateOnly: …`).
    #[arg(long, env = "PRIVATE_ONLY")]
    pub private_only: bool,

    /// Presence on every channel, whether or not its join enabled it (Supabase's per-project
    /// `presence_enabled`): members get `presence_state` at join without a `track` first.
    #[arg(long, env = "PRESENCE_ENABLED")]
    pub presence_enabled: bool,

    /// Longest a join with `config.postgres_changes_options.wait` is held for its bindings to
    /// go live, in milliseconds: the client's `timeout` (15000 when absent) is capped by it,
    /// and past it the join is refused with `PostgresChangesSubscribeTimeout` (Supabase's
    /// default cap: 20 s).
    #[arg(long, env = "POSTGRES_CHANGES_WAIT_MAX_MS", default_value_t = 20_000)]
    pub postgres_changes_wait_max_ms: u64,

    /// How long a channel joined with `config.broadcast.replication_ready` waits for the
    /// replication stream before it is closed with `Replication connection was not
    /// established in time`, in milliseconds (Supabase: one minute).
    #[arg(long, env = "REPLICATION_READY_TIMEOUT_MS", default_value_t = 60_000)]
    pub replication_ready_timeout_ms: u64,

    /// How long a channel of a socket opened with `session_id` outlives the socket, buffering
    /// what it matches for the rejoin (session resume), in seconds.
    #[arg(long, env = "RESUME_WINDOW_SECS", default_value_t = 120)]
    pub resume_window_secs: u64,

    /// Bytes one session may buffer for its rejoin; past it the rejoin is told to resync.
    #[arg(long, env = "RESUME_BUFFER_BYTES", default_value_t = 1_048_576)]
    pub resume_buffer_bytes: usize,

    /// Bytes all sessions together may buffer for their rejoins.
    #[arg(long, env = "RESUME_TOTAL_BYTES", default_value_t = 256 * 1_048_576)]
    pub resume_total_bytes: usize,

    /// Bytes of recent changes kept for change feeds (SSE, long-poll) to resume from; a
    /// Last-Event-ID or offset older than what is kept gets 409 ResyncRequired.
    #[arg(long, env = "HISTORY_BYTES", default_value_t = crate::feed::DEFAULT_HISTORY_BYTES)]
    pub history_bytes: usize,
}

impl LimitArgs {
    /// The session resume bounds these flags describe.
    pub fn session_limits(&self) -> crate::realtime::resume::SessionLimits {
        crate::realtime::resume::SessionLimits {
            window: std::time::Duration::from_secs(self.resume_window_secs.max(1)),
            session_bytes: self.resume_buffer_bytes.max(1),
            total_bytes: self.resume_total_bytes.max(1),
            // As many parked channels as there may be connections: a server that holds that
            // many sockets holds their channels too.
            max_parked: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        }
    }

    /// The broadcast and presence limits these flags describe.
    pub fn broadcast_limits(&self) -> crate::realtime::broadcast::BroadcastLimits {
        crate::realtime::broadcast::BroadcastLimits {
            max_payload_bytes: self.max_payload_size_kb.saturating_mul(1024),
            presence_max_calls: self.client_presence_max_calls,
            presence_window: std::time::Duration::from_millis(self.client_presence_window_ms),
            max_presence_payload_bytes: self.max_presence_payload_bytes,
            max_presence_state_bytes: self.max_presence_state_bytes,
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Database to diagnose.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Publication walcast streams.
    #[arg(long, env = "PUBLICATION", default_value = "walcast")]
    pub publication: String,

    /// Replication slot walcast uses.
    #[arg(long, env = "SLOT_NAME", default_value = "walcast")]
    pub slot: String,

    /// Also report the cluster on this Redis (cluster mode): Redis's round trip, the live
    /// nodes, the streamer and the change stream.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Nodes silent for longer than this are not counted live (as `walcast serve` does).
    #[arg(long, env = "PRESENCE_NODE_TIMEOUT_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub presence_node_timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database to create the objects in.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// HTTP + WebSocket port.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Directory holding the Postgres server binaries (initdb, pg_ctl); found automatically
    /// when unset.
    #[arg(long, env = "PG_BIN")]
    pub pg_bin: Option<PathBuf>,
}
