//! `walcast serve`: the realtime server.
//!
//! ```text
//!  Replicator ─▶ Pump ─▶ Hub ─▶ socket queues ─▶ socket tasks ─▶ clients
//!                           ▲                        │ joins (catalog checks on SqlPool)
//!                           └────── subscribe ───────┘
//!  axum: /socket/websocket, /realtime/v1/websocket, /healthz, /readyz, /metrics
//! ```
//!
//! Shutdown (SIGTERM or Ctrl-C): stop accepting, refuse new joins, close every socket with
//! 1012, stop replication with a final status update, exit 0.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use walcast_core::hub::{Hub, HubConfig};
use walcast_core::pg_type::TypeRegistry;
use walcast_replication::Replicator;

use crate::auth::JwtVerifier;
use crate::authz::roles::TokenRoles;
use crate::cli::ServeArgs;
use crate::db::sql::SqlPool;
use crate::http::{router, HttpState};
use crate::state::{AppState, Limits};
use crate::wal::pump::Pump;
use crate::wal::source::replication_config;

/// Read `--jwt-jwks`: inline JSON or `@path`.
fn load_jwks(arg: Option<&str>) -> Result<Option<String>> {
    match arg {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => match s.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map(Some)
                .with_context(|| format!("invalid --jwt-jwks / JWT_JWKS: cannot read {path}")),
            None => Ok(Some(s.to_string())),
        },
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    run_with(args, axum::Router::new()).await
}

/// [`run`] with `extra` routes served beside walcast's own (how `walcast demo` adds its page).
pub async fn run_with(args: ServeArgs, extra: axum::Router) -> Result<()> {
    let jwks = load_jwks(args.jwt_jwks.as_deref())?;
    let jwt = JwtVerifier::new(args.jwt_secret.as_deref(), jwks.as_deref())
        .context("invalid --jwt-secret / --jwt-jwks (JWT_SECRET / JWT_JWKS)")?;
    let cfg = replication_config(&args.source, "walcast")?;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::metrics::describe();
    crate::metrics::describe_joins();
    crate::metrics::describe_derived_ahead();
    // The recorder keeps histogram samples until a scrape or an upkeep drains them: run the
    // upkeep on a timer, so a server nobody scrapes does not grow without bound.
    {
        let handle = prometheus.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }

    let sql = Arc::new(SqlPool::new(cfg.clone(), 4));
    // The realtime schema (private channels); a server without the privileges to create
    // it still serves everything else.
    match crate::db::sql::connect(&cfg, "walcast migrate").await {
        Ok(mut client) => match crate::db::migrate::run(&mut client).await {
            Ok(applied) if !applied.files.is_empty() => {
                tracing::info!(files = ?applied.files, "applied the realtime schema")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = ?format!("{e:#}"), "cannot apply the realtime schema (sql/); private channels will be refused until `walcast migrate` runs")
            }
        },
        Err(e) => {
            tracing::warn!(error = ?format!("{e:#}"), "cannot connect to apply the realtime schema")
        }
    }
    // A database that is away at start is waited for, like one that goes away later.
    if let Err(e) = sql.get().await {
        tracing::warn!(error = ?format!("{e:#}"), "the database is not reachable yet; serving broadcast and presence meanwhile");
    }

    let fd_budget = crate::http::listener::fd_budget(
        args.limits.max_connections,
        args.limits.max_pending_connections.max(1),
    );
    let limits = Limits {
        max_channels_per_client: args.limits.max_channels_per_client,
        socket_send_queue: args.limits.socket_send_queue,
        socket_send_queue_bytes: args.limits.socket_send_queue_bytes.max(1),
        write_timeout: Duration::from_secs(args.limits.write_timeout_secs.max(1)),
        max_frame_bytes: args.limits.max_frame_bytes,
        idle_timeout: Duration::from_secs(args.limits.idle_timeout_secs.max(1)),
        channel_error_backoff: Duration::from_millis(args.limits.channel_error_backoff_ms),
        connect_error_backoff: Duration::from_millis(args.limits.connect_error_backoff_ms),
        broadcast: args.limits.broadcast_limits(),
        max_connections: fd_budget.max_connections,
        max_joins_per_second: args.limits.max_joins_per_second.max(1),
        max_joins_per_second_per_client: args.limits.max_joins_per_second_per_client.max(1),
        max_joins_per_second_per_socket: args.limits.max_joins_per_second_per_socket.max(1),
        max_http_broadcasts_per_second: args.limits.max_http_broadcasts_per_second.max(1),
        max_http_broadcasts_per_second_per_client: args
            .limits
            .max_http_broadcasts_per_second_per_client
            .max(1),
        max_members_per_channel: args.limits.max_members_per_channel,
        max_events_per_second: args.limits.max_events_per_second.max(1),
        resume: args.limits.session_limits(),
        private_only: args.limits.private_only,
        presence_enabled: args.limits.presence_enabled,
        rls_deletes: args.rls_deletes,
        postgres_changes_wait_max: Duration::from_millis(args.limits.postgres_changes_wait_max_ms),
        replication_ready_timeout: Duration::from_millis(args.limits.replication_ready_timeout_ms),
        allowed_origins: args.limits.allowed_origins.as_deref().map(|list| {
            list.split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect()
        }),
    };
    match &limits.allowed_origins {
        None => tracing::info!(
            allowed_origins = "any",
            "WebSockets from any browser origin are accepted (set --allowed-origins to restrict)"
        ),
        Some(list) => tracing::info!(allowed_origins = ?list, "WebSocket origins restricted"),
    }
    let token_roles = TokenRoles::new(
        args.limits
            .allowed_token_roles
            .as_deref()
            .map(|l| {
                l.split(',')
                    .map(|r| r.trim().to_string())
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
    );
    let types = Arc::new(RwLock::new(TypeRegistry::new()));
    let hub = Arc::new(Hub::new(HubConfig {
        max_record_bytes: args.limits.max_record_bytes,
    }));
    // Channels joined from now on start after everything committed so far, even when the
    // stream first re-reads transactions an earlier run did not confirm.
    if let Ok(client) = sql.get().await {
        match crate::db::sql::wal_insert_lsn(&client).await {
            Ok(lsn) => hub.advance(walcast_core::Position::just_before(lsn)),
            Err(e) => tracing::debug!(error = ?format!("{e:#}"), "cannot read the WAL position"),
        }
    }
    let cluster = crate::cluster::Cluster::from_args(&args.cluster, &cfg.slot)?;
    if let Some(c) = &cluster {
        tracing::info!(node = %c.node_id(), "cluster mode: this node shares Redis with the others");
    }
    let replicator = Replicator::new(cfg.clone());
    // Cluster mode: the pump streams the slot only while this node holds the lease, and
    // follows the cluster's change stream otherwise (cluster::changes).
    let cluster_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streaming_flag = if cluster.is_some() {
        cluster_ready.clone()
    } else {
        replicator.streaming_flag()
    };
    let state = Arc::new(
        AppState::new(
            jwt,
            hub.clone(),
            sql.clone(),
            cfg.publication.clone(),
            limits,
            types.clone(),
            streaming_flag,
            token_roles,
        )
        .with_cluster(cluster)
        .with_cluster_node(),
    );

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut pump_shutdown = shutdown_rx.clone();
    let mut poller_shutdown = shutdown_rx.clone();
    tokio::spawn(crate::wal::slot_metrics::run(
        sql.clone(),
        cfg.slot.clone(),
        Duration::from_secs(5),
        async move {
            let _ = poller_shutdown.changed().await;
        },
    ));
    let mut retention_shutdown = shutdown_rx.clone();
    tokio::spawn(crate::db::retention::run(
        sql.clone(),
        Duration::from_secs(args.messages_retention_secs),
        Duration::from_secs(args.messages_sweep_secs),
        async move {
            let _ = retention_shutdown.changed().await;
        },
    ));
    // Session channels recorded by the last run come back parked before the stream starts,
    // and the slot keeps what they may need (see realtime::session_store).
    let ceiling = cfg.confirm_ceiling.clone();
    match tokio::time::timeout(
        Duration::from_secs(10),
        crate::realtime::session_store::restore(&state, &cfg.slot, &ceiling),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = ?format!("{e:#}"), "cannot restore the sessions of the last run; their rejoins start afresh")
        }
        Err(_) => tracing::warn!(
            "restoring the sessions of the last run took too long; their rejoins start afresh"
        ),
    }
    if let Some(cluster) = state.cluster.clone() {
        // Sessions resume on any node: answer other nodes taking ours over.
        crate::cluster::sessions::spawn_handover(state.clone(), cluster);
    }
    let (store_stop, store_stopped) = tokio::sync::oneshot::channel::<()>();
    let store = tokio::spawn(
        crate::realtime::session_store::SessionStore::new(state.clone(), ceiling).run(async {
            let _ = store_stopped.await;
        }),
    );
    {
        // Parked session channels end with their window.
        let state = state.clone();
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        crate::realtime::resume::expire(&state, std::time::Instant::now());
                    }
                    _ = stop.changed() => break,
                }
            }
        });
    }
    // Change feeds resume from the history the pump records, from what is committed now on.
    state.feeds.history.set_capacity(args.limits.history_bytes);
    state.feeds.set_rls_deletes(args.rls_deletes);
    if state.hub.routed_through() > walcast_core::Position::ZERO {
        state.feeds.history.begin(state.hub.routed_through());
    }
    let mut lease_task = None;
    // The lease is let go after the pump stopped streaming (see the end of this function).
    let (lease_stop, lease_stopped) = tokio::sync::watch::channel(false);
    let source = match state.cluster.clone() {
        Some(cluster) => {
            let give_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
            crate::metrics::describe_cluster_flow();
            let slot_up = crate::cluster::lease::SlotUp::default();
            // The lease and the change stream issue their commands through the node's one
            // Redis link (only the blocking read has a connection of its own).
            let link = state
                .cluster_node
                .as_ref()
                .map(|n| n.link.clone())
                .context("cluster mode without a running cluster node")?;
            let (lease, task) = crate::cluster::lease::spawn(
                cluster.clone(),
                link.clone(),
                give_up.clone(),
                slot_up.clone(),
                lease_stopped,
            );
            lease_task = Some(task);
            crate::wal::pump::Source::Cluster(Box::new(
                crate::cluster::changes::ClusterSource::new(
                    cluster,
                    link,
                    cfg.clone(),
                    lease,
                    give_up,
                    cluster_ready,
                    slot_up,
                ),
            ))
        }
        None => crate::wal::pump::Source::Slot(replicator),
    };
    let mut pump = tokio::spawn(
        Pump::with_source(source, types, hub, sql, state.authz.clone())
            .with_history(state.feeds.clone())
            .with_topics(state.topics.clone())
            .with_health(state.health.clone())
            .with_catalog(state.catalog.clone())
            .with_rls_deletes(args.rls_deletes)
            .with_publication(&state.publication)
            .run(async move {
                let _ = pump_shutdown.changed().await;
            }),
    );

    let addr = format!("{}:{}", args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, publication = %cfg.publication, slot = %cfg.slot, "walcast serving");
    // New sockets' first joins run below established sockets (see `realtime::intake`).
    let intake_threads = args.intake_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
    });
    let intake = match intake_threads {
        0 => None,
        n => Some(
            crate::realtime::intake::Intake::start(n, args.intake_nice)
                .context("starting the intake runtime")?,
        ),
    };
    let app = router(HttpState {
        app: state.clone(),
        shutdown: shutdown_rx.clone(),
        prometheus: Some(prometheus),
        metrics_token: args.metrics_token.as_deref().map(Arc::from),
        intake: intake.as_ref().and_then(|i| i.handle()),
    })
    .merge(extra);
    let mut http_shutdown = shutdown_rx.clone();
    let listener_config = crate::http::listener::ListenerConfig {
        handshake_timeout: Duration::from_secs(args.limits.handshake_timeout_secs.max(1)),
        max_pending: fd_budget.max_pending,
    };
    let server = tokio::spawn(async move {
        crate::http::listener::serve(listener, app, listener_config, async move {
            let _ = http_shutdown.changed().await;
        })
        .await
    });

    // Serve until told to stop. A pump that ends on its own stopped streaming for a definite
    // reason (it said so on /readyz and to the channels): broadcast and presence go on.
    let mut pump_done = false;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            res = &mut pump, if !pump_done => {
                pump_done = true;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = ?format!("{e:#}"), "streaming stopped; serving broadcast and presence"),
                    Err(e) => tracing::error!(error = ?e.to_string(), "the replication task failed; serving broadcast and presence"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    let limit = Duration::from_secs(args.shutdown_timeout_secs.max(1));
    let deadline = tokio::time::Instant::now() + limit;
    state.shutting_down.store(true, Ordering::Release);
    let _ = shutdown_tx.send(true);
    // Sockets send their 1012 close frames; the pump sends its last confirmation.
    while state.open_sockets() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Session channels have parked: record them for the next run.
    let _ = store_stop.send(());
    let _ = tokio::time::timeout_at(deadline, store).await;
    if !pump_done {
        match tokio::time::timeout_at(deadline, &mut pump).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = ?format!("{e:#}"), "replication ended with an error")
            }
            Ok(Err(e)) => tracing::warn!(error = ?e.to_string(), "the replication task failed"),
            Err(_) => tracing::warn!("replication did not stop within --shutdown-timeout-secs"),
        }
    }
    let _ = lease_stop.send(true);
    if let Some(task) = lease_task {
        let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), task).await;
    }
    let _ = tokio::time::timeout_at(deadline, server).await;
    if let Some(intake) = intake {
        intake.shutdown();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
