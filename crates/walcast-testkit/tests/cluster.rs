use walcast_testkit::{ClusterOptions, PgCluster};

#[tokio::test]
async fn shared_cluster_has_logical_wal_and_fresh_databases() {
    let cluster = PgCluster::shared();
    let a = cluster.fresh_database().await.unwrap();
    let b = cluster.fresh_database().await.unwrap();
    assert_ne!(a.name(), b.name());
    let client = a.connect().await.unwrap();
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), a.name());
}

#[tokio::test]
async fn dedicated_cluster_applies_settings_and_is_removed_on_drop() {
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![("wal_sender_timeout".into(), "3s".into())],
        ..Default::default()
    })
    .unwrap();
    let log = cluster.log_path();
    let db = cluster.fresh_database().await.unwrap();
    let client = db.connect().await.unwrap();
    let row = client
        .query_one("SHOW wal_sender_timeout", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "3s");
    drop(client);
    drop(cluster);
    assert!(!log.exists(), "cluster directory should be gone");
}
