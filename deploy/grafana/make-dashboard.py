#!/usr/bin/env python3
"""Writes dashboards/walcast.json, the Grafana dashboard for walcast's metrics.

Metric names come from crates/walcast-server/src/metrics.rs; edit the panels here and run
`python3 deploy/grafana/make-dashboard.py` rather than editing the JSON by hand.
"""
import json
import os

DS = {"type": "prometheus", "uid": "walcast-prometheus"}
panels = []
_next_id = [0]
_y = [0]


def nid():
    _next_id[0] += 1
    return _next_id[0]


def sel(extra=""):
    return '{job="$job", instance=~"$instance"' + (", " + extra if extra else "") + "}"


J = sel()
Q = sel('quantile=~"0.5|0.9|0.99"')


def row(title):
    panels.append({"type": "row", "id": nid(), "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


def stat(x, w, title, expr, unit="short", desc=""):
    return {"type": "stat", "id": nid(), "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": 4, "w": w, "x": x, "y": _y[0]},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"},
            "targets": [{"refId": "A", "datasource": DS, "expr": expr, "legendFormat": "__auto"}]}


def ts(x, w, title, targets, unit="short", desc=""):
    return {"type": "timeseries", "id": nid(), "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": 8, "w": w, "x": x, "y": _y[0]},
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10, "lineWidth": 1}},
                            "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
                        for i, (e, l) in enumerate(targets)]}


def line(*ps, h=8):
    panels.extend(ps)
    _y[0] += h


def rate(metric, by=None):
    inner = f"rate({metric}{J}[$__rate_interval])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


row("Overview")
line(stat(0, 4, "Sockets", f"sum(walcast_sockets_connected{J})"),
     stat(4, 4, "Channels", f"sum(walcast_channels_joined{J})"),
     stat(8, 4, "Changes / s", rate("walcast_changes_decoded_total"), "ops"),
     stat(12, 4, "Replication lag", f"max(walcast_replication_lag_seconds{J})", "s"),
     stat(16, 4, "WAL retained by slot", f"max(walcast_slot_wal_retained_bytes{J})", "bytes"),
     stat(20, 4, "Streaming", f"max(walcast_replication_streaming{J})", "bool_yes_no",
          "1 while the replication stream is running (what /readyz reports)"), h=4)

row("Clients")
line(ts(0, 8, "Connected sockets", [(f"sum by (instance) (walcast_sockets_connected{J})", "{{instance}}")]),
     ts(8, 8, "Joined channels by kind", [(f"sum by (kind) (walcast_channels_joined{J})", "{{kind}}")]),
     ts(16, 8, "Joins and join errors / s", [
         (rate("walcast_joins_total"), "joins"),
         (rate("walcast_join_errors_total", "reason"), "error: {{reason}}")], "ops"))
line(ts(0, 8, "WebSocket upgrades refused / s", [
         (rate("walcast_upgrades_refused_total", "reason"), "{{reason}}")], "ops"),
     ts(8, 8, "Pending connections closed for newcomers / s", [
         (rate("walcast_pending_connections_closed_total"), "closed")], "ops",
        desc="Connections that had not become WebSockets, closed at --max-pending-connections"),
     ts(16, 8, "Slow-client disconnects", [
         (f"sum(increase(walcast_slow_client_disconnects_total{J}[$__rate_interval]))", "disconnects")],
        desc="Sockets closed because their send queue overflowed"))

row("Traffic")
line(ts(0, 12, "Frames / s", [
         (rate("walcast_frames_in_total", "kind"), "in {{kind}}"),
         (rate("walcast_frames_out_total", "kind"), "out {{kind}}")], "ops"),
     ts(12, 12, "Bytes / s", [
         (rate("walcast_bytes_in_total"), "in"),
         (rate("walcast_bytes_out_total"), "out")], "Bps"))

row("Changes")
line(ts(0, 8, "Changes decoded / s by kind", [
         (rate("walcast_changes_decoded_total", "kind"), "{{kind}}")], "ops"),
     ts(8, 8, "Changes delivered / s", [
         (rate("walcast_changes_delivered_total"), "delivered")], "ops",
        "postgres_changes frames queued to sockets"),
     ts(16, 8, "Deliveries dropped / s by reason", [
         (rate("walcast_deliveries_dropped_total", "reason"), "{{reason}}")], "ops"))
line(ts(0, 12, "Commit to send latency", [
         (f"max by (quantile) (walcast_commit_to_send_seconds{Q})", "p{{quantile}}"),
         (f"histogram_quantile(0.99, sum by (le) (rate(walcast_commit_to_send_seconds_bucket{J}[$__rate_interval])))",
          "p0.99 (buckets)")],
        "s", "From a change's commit time to its frames being queued "
             "(summary quantiles, or histogram buckets when configured)"),
     ts(12, 12, "Authorization checks / s by outcome", [
         (rate("walcast_authz_checks_total", "outcome"), "{{outcome}}"),
         (rate("walcast_authz_stopped_channels_total"), "channels stopped"),
         (rate("walcast_authz_identities_routed_total"), "identities routed"),
         (rate("walcast_authz_derivations_batched_total"), "identities derived in batches"),
         (rate("walcast_authz_derived_ahead_total"), "identities derived before their first row")], "ops",
        "Row-level security checks (one per table x identity group x batch)"))

row("Broadcast and presence")
line(ts(0, 8, "Broadcasts / s by origin", [
         (rate("walcast_broadcasts_total", "origin"), "{{origin}}")], "ops",
        "Broadcast messages accepted (from clients, the REST API or the database)"),
     ts(8, 8, "Broadcast deliveries / s by origin", [
         (rate("walcast_broadcast_deliveries_total", "origin"), "{{origin}}")], "ops",
        "Broadcast frames queued to subscribers"),
     ts(16, 8, "Presence events / s", [
         (rate("walcast_presence_events_total", "event"), "{{event}}")], "ops"))
line(ts(0, 12, "Channels closed by the server / s", [
         (rate("walcast_channels_closed_total", "reason"), "{{reason}}")], "ops",
        "Channels the server closed (rate limits, authorization), by reason"),
     ts(12, 12, "Authorization check latency", [
         (f"max by (quantile) (walcast_authz_check_seconds{Q})", "p{{quantile}}"),
         (f"histogram_quantile(0.99, sum by (le) (rate(walcast_authz_check_seconds_bucket{J}[$__rate_interval])))",
          "p0.99 (buckets)")], "s"))
line(ts(0, 12, "Persisted sends / s by origin and outcome", [
         (rate("walcast_broadcasts_stored_total", "origin, outcome"), "{{origin}} {{outcome}}")], "ops",
        "Sends with persist: stored, refused by the INSERT policies (denied), or failed"),
     ts(12, 12, "Stored broadcasts replayed / s", [
         (rate("walcast_broadcasts_replayed_total"), "replayed")], "ops",
        "Stored messages sent to channels joining with broadcast.replay"))

row("Replication")
line(ts(0, 8, "Replication lag (bytes)", [
         (f"max by (instance) (walcast_replication_lag_bytes{J})", "{{instance}}")], "bytes",
        "Server WAL end minus the confirmed flush position"),
     ts(8, 8, "Replication lag (seconds)", [
         (f"max by (instance) (walcast_replication_lag_seconds{J})", "{{instance}}")], "s",
        "Now minus the commit time of the last change handed to fan-out"),
     ts(16, 8, "WAL retained by the slot", [
         (f"max by (instance) (walcast_slot_wal_retained_bytes{J})", "{{instance}}")], "bytes"))
line(ts(0, 12, "Replication reconnects", [
         (f"sum(increase(walcast_replication_reconnects_total{J}[$__rate_interval]))", "reconnects")]),
     ts(12, 12, "Stream and slot state", [
         (f"max(walcast_replication_streaming{J})", "streaming"),
         (f"max(walcast_slot_usable{J})", "slot usable")], "bool"))

row("Cluster change stream")
line(ts(0, 12, "Role by node", [
         (f"max by (instance, role) (walcast_cluster_role{J})", "{{instance}}: {{role}}")], "bool",
        "1 on each node's role: one streamer (holds the lease, streams the slot), the rest follow"),
     ts(12, 12, "Transactions / s", [
         (rate("walcast_cluster_published_transactions_total"), "published"),
         (rate("walcast_cluster_followed_transactions_total"), "followed"),
         (rate("walcast_cluster_skipped_transactions_total"), "skipped (routed already)")], "ops"))
line(ts(0, 12, "postgres_changes flowing, by node", [
         (f"min by (instance) (walcast_cluster_changes_flowing{J})", "{{instance}}")], "bool",
        "1 while the node sees some node stream the slot; 0 after 2 x --failover-timeout-secs without one (its /readyz is 503)"),)

row("Session resume")
line(ts(0, 8, "Session channels parked", [
         (f"sum(walcast_session_channels_parked{J})", "parked now"),
         (rate("walcast_session_channels_parked_total"), "parked / s")],
        desc="Channels of sockets with a session_id kept after their socket went away"),
     ts(8, 8, "Resumes and resyncs / s", [
         (rate("walcast_session_channels_resumed_total"), "resumed"),
         (rate("walcast_session_channels_expired_total"), "expired"),
         (rate("walcast_session_resyncs_total", "reason"), "resync: {{reason}}")], "ops"),
     ts(16, 8, "Session buffers", [
         (f"sum(walcast_session_buffered_bytes{J})", "buffered bytes")], "bytes",
        "Bytes kept for replay; replayed deliveries below"))
line(ts(0, 24, "Replayed deliveries / s", [
         (rate("walcast_session_replayed_deliveries_total"), "replayed")], "ops"), h=6)

row("Change feeds (SSE, long-poll)")
line(ts(0, 8, "Feeds open", [
         (f"sum by (transport) (walcast_feeds_open{J})", "{{transport}}"),
         (rate("walcast_feed_opened_total", "transport"), "opened / s: {{transport}}")],
        desc="GET /api/changes (sse, longpoll) and GET /api/broadcast (broadcast) feeds"),
     ts(8, 8, "Feed events / s", [
         (rate("walcast_feed_events_total", "kind"), "{{kind}}"),
         (rate("walcast_feed_replayed_changes_total"), "replayed from history")], "ops"),
     ts(16, 8, "Feeds refused and overflowed / s", [
         (rate("walcast_feed_refused_total", "reason"), "refused: {{reason}}"),
         (rate("walcast_feed_overflows_total"), "overflowed")], "ops",
        "Refusals (409 resync, 400, 401, 403, 429, ...) and streams ended for a slow reader"))
line(ts(0, 24, "Change history", [
         (f"max by (instance) (walcast_feed_history_bytes{J})", "{{instance}}")], "bytes",
        "Bytes of recent changes kept for feeds to resume from (--history-bytes)"), h=6)

row("Joins: catalog cache and private checks")
line(ts(0, 12, "Catalog cache lookups / s", [
         (rate("walcast_catalog_cache_lookups_total", "kind, outcome"), "{{kind}} {{outcome}}")], "ops",
        "What joins read from the catalog: hit (cached, or shared with a query in flight) or miss (queried)"),
     ts(12, 12, "Private read checks / s", [
         (rate("walcast_private_read_checks_total"), "checks"),
         (rate("walcast_private_read_batches_total"), "round trips")], "ops",
        "Private-channel read checks and the batched round trips that answered them"))


row("Cluster (Redis)")
line(ts(0, 8, "Redis link and cluster size", [
         (f"min(walcast_cluster_redis_up{J})", "Redis up (min over nodes)"),
         (f"max(walcast_cluster_nodes{J})", "live nodes")],
        desc="Cluster mode: 1 while each node's Redis link answers; nodes heartbeating"),
     ts(8, 8, "Redis round trip", [
         (f"max by (instance) (walcast_cluster_redis_rtt_seconds{J})", "{{instance}}")], "s"),
     ts(16, 8, "Messages between nodes / s", [
         (rate("walcast_cluster_messages_total", "kind, direction"), "{{kind}} {{direction}}")], "ops",
        "Broadcasts, presence states and sync requests published, received and dropped"))

row("Sessions across nodes")
line(ts(0, 12, "Sessions taken over / s", [
         (rate("walcast_cluster_sessions_taken_over_total", "from"), "from {{from}}")], "ops",
        "Cluster mode: sessions resumed on another node than the one that kept them (alive: handed over; records: that node was gone)"),
     ts(12, 12, "Replayed from the change stream / s", [
         (rate("walcast_cluster_session_replayed_deliveries_total"), "replayed")], "ops",
        "Deliveries a taken-over session missed, replayed from the cluster's Redis stream"))

def variable(name, query, all_=False):
    v = {"name": name, "label": name, "type": "query", "datasource": DS,
         "query": {"query": query, "refId": name}, "definition": query, "refresh": 1,
         "includeAll": all_, "multi": all_}
    if all_:
        v["allValue"] = ".*"
        v["current"] = {"text": "All", "value": "$__all"}
    return v


dashboard = {
    "uid": "walcast-overview",
    "title": "walcast",
    "description": "walcast realtime server: clients, traffic, changes, replication",
    "tags": ["walcast", "postgres", "realtime"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        variable("job", "label_values(walcast_sockets_connected, job)"),
        variable("instance", 'label_values(walcast_sockets_connected{job="$job"}, instance)', True),
    ]},
    "panels": panels,
}

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboards", "walcast.json")
with open(out, "w") as f:
    f.write(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out} ({len(panels)} panels)")
