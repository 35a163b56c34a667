use std::path::PathBuf;

use walcast_pgcluster::{ClusterOptions, PgCluster};

#[test]
fn cluster_accepts_connections_and_is_removed_on_drop() {
    let cluster = PgCluster::start(ClusterOptions::default()).unwrap();
    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("data").join("postmaster.pid").exists());
    assert!(cluster
        .url("postgres")
        .ends_with(&format!(":{}/postgres", cluster.port())));
    let out = std::process::Command::new(cluster.bin_dir().join("psql"))
        .arg(cluster.url("postgres"))
        .args(["-XAtc", "SHOW wal_level"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "logical");
    drop(cluster);
    assert!(!dir.exists(), "cluster directory should be gone");
}

#[test]
fn explicit_bin_dir_without_binaries_is_refused() {
    let err = PgCluster::start_with_bin_dir(
        PathBuf::from("/nonexistent/walcast-pg-bin"),
        ClusterOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/nonexistent/walcast-pg-bin holds no initdb and pg_ctl"
    );
}

#[test]
fn cluster_stops_starts_and_restarts_on_its_port() {
    use walcast_pgcluster::StopMode;
    let cluster = PgCluster::start(ClusterOptions::default()).unwrap();
    let psql = |sql: &str| {
        std::process::Command::new(cluster.bin_dir().join("psql"))
            .arg(cluster.url("postgres"))
            .args(["-XAtc", sql])
            .output()
            .unwrap()
    };
    assert!(psql("SELECT 1").status.success());
    cluster.pg_stop(StopMode::Fast).unwrap();
    assert!(
        !psql("SELECT 1").status.success(),
        "stopped cluster answered"
    );
    cluster.pg_start().unwrap();
    assert!(psql("SELECT 1").status.success());
    cluster.pg_restart(StopMode::Immediate).unwrap();
    let out = psql("SELECT 1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
