//! The fault proxy against plain sockets (sync code, the test holding both ends) and against
//! a real Postgres through tokio-postgres (async code).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use walcast_testkit::{connect, FaultProxy, PgCluster};

/// How long "nothing arrives" is watched for: the one bounded wait these tests allow.
const QUIET: Duration = Duration::from_millis(300);
/// Safety net so a broken proxy fails a test instead of hanging it; never reached otherwise.
const HANG: Duration = Duration::from_secs(30);

/// An upstream whose accepted sockets the test holds, so it can talk from both ends.
fn upstream() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    (listener, addr)
}

/// An upstream that sends back whatever it receives.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut reader) = stream.try_clone() else {
                    return;
                };
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    addr
}

/// The next connection the proxy dials upstream, if one comes within `within`.
fn accept_within(listener: &TcpListener, within: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(HANG)).unwrap();
                return Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept failed: {e}"),
        }
    }
}

fn client(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr()).unwrap();
    stream.set_read_timeout(Some(HANG)).unwrap();
    stream
}

/// A client through the proxy and the upstream end of the same connection.
fn pair(proxy: &FaultProxy, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = client(proxy);
    let server = accept_within(listener, HANG).expect("the proxy never dialed upstream");
    (client, server)
}

fn read_n(stream: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

fn send(stream: &mut TcpStream, text: &str) {
    stream.write_all(text.as_bytes()).unwrap();
}

/// Watch `stream` for QUIET and assert that nothing, not even EOF, came.
fn nothing_arrives(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    stream.set_read_timeout(Some(HANG)).unwrap();
}

/// Assert that nothing is waiting to be read on `stream` right now.
fn nothing_buffered(stream: &mut TcpStream) {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0; 64];
    let got = stream.read(&mut buf);
    stream.set_nonblocking(false).unwrap();
    match got {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("expected nothing buffered, got {other:?}"),
    }
}

/// Assert that the peer closed `stream` with a reset (not a FIN, not silence).
fn is_reset(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected a connection reset, got {other:?}"),
    }
}

/// A new connection through a proxy that resets it at once. The reset can reach the kernel
/// before `connect` returns (a loaded machine schedules the proxy first), so either the
/// connect or the first read sees it.
fn connect_and_expect_reset(proxy: &FaultProxy) {
    match TcpStream::connect(proxy.addr()) {
        Ok(mut stream) => {
            stream.set_read_timeout(Some(HANG)).unwrap();
            is_reset(&mut stream);
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a connection reset, got {e:?}"),
    }
}

fn round_trip(stream: &mut TcpStream, text: &str) {
    send(stream, text);
    assert_eq!(read_n(stream, text.len()), text);
}

/// Wait for a condition on the proxy's counters (which the proxy reaches on its own time).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forwards_both_ways_and_counts_bytes() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut c = client(&proxy);
    round_trip(&mut c, "hello");
    round_trip(&mut c, "again!");
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.refused, 0);
    assert_eq!(stats.active, 1);
    assert_eq!(stats.to_upstream, 11);
    assert_eq!(stats.to_client, 11);
}

#[test]
fn pause_holds_bytes_both_ways_and_resume_delivers_them_in_order() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    let (mut c, mut s) = pair(&proxy, &listener);
    send(&mut c, "ping");
    assert_eq!(read_n(&mut s, 4), "ping");

    proxy.pause();
    let before = proxy.stats();
    send(&mut c, "one ");
    send(&mut c, "two ");
    send(&mut s, "uno ");
    send(&mut c, "three");
    send(&mut s, "dos");
    nothing_arrives(&mut s);
    nothing_buffered(&mut c);
    let during = proxy.stats();
    assert_eq!(during, before, "bytes moved while paused");
    assert_eq!(during.active, 1, "a pause is not a close");

    proxy.resume();
    assert_eq!(read_n(&mut s, 13), "one two three");
    assert_eq!(read_n(&mut c, 7), "uno dos");
    send(&mut s, "pong");
    assert_eq!(read_n(&mut c, 4), "pong");
}

#[test]
fn pause_holds_new_connections_without_dialing_upstream() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    proxy.pause();
    let mut c = client(&proxy);
    send(&mut c, "early");
    assert!(
        accept_within(&listener, QUIET).is_none(),
        "the proxy dialed upstream while paused"
    );
    nothing_buffered(&mut c);

    proxy.resume();
    let mut s = accept_within(&listener, HANG).expect("no upstream connection after resume");
    assert_eq!(read_n(&mut s, 5), "early");
    send(&mut s, "late");
    assert_eq!(read_n(&mut c, 4), "late");
}

#[test]
fn cut_resets_both_sides_and_new_connections_work() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    let (mut c, mut s) = pair(&proxy, &listener);
    send(&mut c, "before");
    assert_eq!(read_n(&mut s, 6), "before");

    proxy.cut();
    assert_eq!(proxy.active_connections(), 0);
    is_reset(&mut c);
    is_reset(&mut s);

    let (mut c, mut s) = pair(&proxy, &listener);
    send(&mut c, "after");
    assert_eq!(read_n(&mut s, 5), "after");
    send(&mut s, "ok");
    assert_eq!(read_n(&mut c, 2), "ok");
    assert_eq!(proxy.total_accepted(), 2);
}

#[test]
fn cut_also_resets_connections_held_by_a_pause() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    let (mut c, mut s) = pair(&proxy, &listener);
    proxy.pause();
    let mut held = client(&proxy);
    wait_until("the held connection to be accepted", || {
        proxy.total_accepted() == 2
    });
    proxy.cut();
    assert_eq!(proxy.active_connections(), 0);
    is_reset(&mut c);
    is_reset(&mut s);
    is_reset(&mut held);
    // Still paused: cut does not change the flow switch.
    proxy.resume();
    let (mut c, mut s) = pair(&proxy, &listener);
    round_trip_via(&mut c, &mut s, "fresh");
}

fn round_trip_via(c: &mut TcpStream, s: &mut TcpStream, text: &str) {
    send(c, text);
    assert_eq!(read_n(s, text.len()), text);
    send(s, text);
    assert_eq!(read_n(c, text.len()), text);
}

#[test]
fn refuse_resets_new_connections_and_keeps_open_ones() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut open = client(&proxy);
    round_trip(&mut open, "open");

    proxy.refuse(true);
    connect_and_expect_reset(&proxy);
    round_trip(&mut open, "still open");
    assert_eq!(proxy.total_refused(), 1);
    assert_eq!(proxy.active_connections(), 1);

    proxy.refuse(false);
    let mut again = client(&proxy);
    round_trip(&mut again, "welcome back");
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 3);
    assert_eq!(stats.refused, 1);
}

#[test]
fn blackholed_connections_are_held_open_and_never_forwarded() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    let (mut c, mut s) = pair(&proxy, &listener);

    proxy.blackhole_new(true);
    let mut hole = client(&proxy);
    send(&mut hole, "lost");
    assert!(
        accept_within(&listener, QUIET).is_none(),
        "a blackholed connection reached upstream"
    );
    nothing_buffered(&mut hole);
    round_trip_via(&mut c, &mut s, "unaffected");
    wait_until("the blackholed connection to be accepted", || {
        proxy.total_accepted() == 2
    });
    assert_eq!(proxy.active_connections(), 2);

    proxy.blackhole_new(false);
    let (mut fresh, mut fresh_server) = pair(&proxy, &listener);
    // The upstream end reads the fresh client's bytes, not the blackholed ones.
    round_trip_via(&mut fresh, &mut fresh_server, "fresh");
    nothing_buffered(&mut hole);

    proxy.cut();
    is_reset(&mut hole);
}

#[test]
fn drop_resets_open_connections() {
    let (listener, addr) = upstream();
    let proxy = FaultProxy::start(addr).unwrap();
    let (mut c, mut s) = pair(&proxy, &listener);
    round_trip_via(&mut c, &mut s, "bye");
    drop(proxy);
    is_reset(&mut c);
    is_reset(&mut s);
}

#[test]
fn upstream_down_resets_the_client_and_the_proxy_keeps_going() {
    // Bind then drop: nothing listens on this port any more.
    let (listener, dead) = upstream();
    drop(listener);
    let proxy = FaultProxy::start(dead).unwrap();
    connect_and_expect_reset(&proxy);
    connect_and_expect_reset(&proxy);
    assert_eq!(proxy.total_accepted(), 2);
    assert_eq!(proxy.active_connections(), 0);
}

fn pg_upstream(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn postgres_through_the_proxy_fails_on_cut_and_reconnects() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let proxy = FaultProxy::start(pg_upstream(db.port())).unwrap();
    let url = proxy.url_for(db.url()).unwrap();
    assert_eq!(
        url,
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            proxy.port(),
            db.name()
        )
    );

    let client = connect(&url).await.unwrap();
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.name());

    proxy.cut();
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(err.as_db_error().is_none(), "not a server error: {err}");
    assert!(err.is_closed(), "expected a closed connection, got {err:?}");
    assert!(client.is_closed());

    let again = connect(&url).await.unwrap();
    let row = again.query_one("SELECT 7::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_query_stalls_while_paused_and_completes_after_resume() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let proxy = FaultProxy::start(pg_upstream(db.port())).unwrap();
    let client = connect(&proxy.url_for(db.url()).unwrap()).await.unwrap();
    client.query_one("SELECT 1", &[]).await.unwrap();

    proxy.pause();
    let sent_before = proxy.bytes_to_upstream();
    let query = tokio::spawn(async move {
        let row = client.query_one("SELECT 42::int4", &[]).await?;
        // The connection survives the stall: a second query on it works too.
        let again = client.query_one("SELECT 43::int4", &[]).await?;
        Ok::<_, tokio_postgres::Error>((row.get::<_, i32>(0), again.get::<_, i32>(0)))
    });
    tokio::time::sleep(QUIET).await;
    assert!(!query.is_finished(), "the query completed during a pause");
    assert_eq!(
        proxy.bytes_to_upstream(),
        sent_before,
        "the query left while paused"
    );

    proxy.resume();
    let answers = tokio::time::timeout(HANG, query)
        .await
        .expect("the query never completed after resume")
        .unwrap()
        .unwrap();
    assert_eq!(answers, (42, 43));
}
