//! deploy/ stays in step with the server: the Grafana dashboard charts every metric
//! metrics.rs defines (and nothing else), and the compose and Prometheus files point at
//! each other.

use std::collections::BTreeSet;

const METRICS_RS: &str = include_str!("../src/metrics.rs");
const DASHBOARD: &str = include_str!("../../../deploy/grafana/dashboards/walcast.json");
const PROMETHEUS: &str = include_str!("../../../deploy/prometheus.yml");
const COMPOSE: &str = include_str!("../../../deploy/docker-compose.yml");
const DATASOURCE: &str =
    include_str!("../../../deploy/grafana/provisioning/datasources/prometheus.yml");

/// Every `walcast_…` word in `text`; histogram series suffixes folded into their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("walcast_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).map(str::to_string))
                .unwrap_or(n)
        })
        .collect()
}

#[test]
fn the_dashboard_charts_exactly_the_metrics_the_server_exports() {
    let defined: BTreeSet<String> = METRICS_RS
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const"))
        .flat_map(metric_names)
        .collect();
    assert!(defined.len() >= 20, "{defined:?}");
    let charted = metric_names(DASHBOARD);
    let missing: Vec<_> = defined.difference(&charted).collect();
    let unknown: Vec<_> = charted.difference(&defined).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "not on the dashboard: {missing:?}; on the dashboard but not exported: {unknown:?} \
         (edit deploy/grafana/make-dashboard.py and run it)"
    );
    let json: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    assert_eq!(json["uid"], "walcast-overview");
}

#[test]
fn prometheus_scrapes_the_compose_service_and_grafana_reads_prometheus() {
    assert!(PROMETHEUS.contains(r#"targets: ["walcast:4000"]"#));
    assert!(PROMETHEUS.contains("metrics_path: /metrics"));
    assert!(COMPOSE.contains("\n  walcast:\n"));
    assert!(COMPOSE.contains(r#"- "4000:4000""#));
    assert!(COMPOSE.contains(r#""wal_level=logical""#));
    assert!(COMPOSE.contains("image: postgres:17"));
    assert!(DATASOURCE.contains("url: http://prometheus:9090"));
    assert!(DATASOURCE.contains("uid: walcast-prometheus"));
    assert!(DASHBOARD.contains(r#""uid": "walcast-prometheus""#));
}

const CLUSTER_COMPOSE: &str = include_str!("../../../deploy/docker-compose.cluster.yml");
const CLUSTER_NGINX: &str = include_str!("../../../deploy/nginx-cluster.conf");

#[test]
fn the_cluster_compose_runs_three_nodes_over_one_redis_behind_nginx() {
    for node in ["walcast-1", "walcast-2", "walcast-3"] {
        assert!(
            CLUSTER_COMPOSE.contains(&format!("\n  {node}:\n")),
            "{node} service"
        );
        assert!(CLUSTER_COMPOSE.contains(&format!("NODE_ID: {node}")));
        assert!(
            CLUSTER_NGINX.contains(&format!("server {node}:4000")),
            "nginx proxies {node}"
        );
    }
    assert!(CLUSTER_COMPOSE.contains("REDIS_URL: redis://redis:6379"));
    assert!(CLUSTER_COMPOSE.contains("\n  redis:\n"));
    assert!(CLUSTER_COMPOSE.contains(r#""wal_level=logical""#));
    assert!(CLUSTER_COMPOSE.contains("./nginx-cluster.conf:/etc/nginx/nginx.conf:ro"));
    // WebSockets need the upgrade headers passed through.
    assert!(CLUSTER_NGINX.contains("proxy_set_header Upgrade $http_upgrade;"));
    assert!(CLUSTER_NGINX.contains("proxy_set_header Connection $connection_upgrade;"));
}
