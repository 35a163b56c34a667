//! `walcast demo` as a user runs it: the binary, its banner, the demo endpoints (tokens, and
//! writes that the table's policies decide), Ctrl-C, and the cluster directory afterwards.
//! The page itself is exercised in a browser by tests/browser.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

const WALCAST: &str = env!("CARGO_BIN_EXE_walcast");

#[test]
fn without_postgres_binaries_the_demo_says_how_to_install_them() {
    let out = Command::new(WALCAST)
        .args(["demo", "--pg-bin", "/nonexistent/walcast-pg-bin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with(
            "walcast: walcast demo needs the PostgreSQL server binaries (initdb, pg_ctl) and found none: install them (Debian/Ubuntu: `sudo apt-get install postgresql`"
        ),
        "{stderr}"
    );
    assert!(lines[0].ends_with("(/nonexistent/walcast-pg-bin has no initdb/pg_ctl)"));
}

#[test]
fn a_taken_port_is_reported_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(WALCAST)
        .args(["demo", "--port", &port.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.trim_end().ends_with(&format!(
            "cannot listen on 127.0.0.1:{port}: Address already in use (os error 98); \
             pass --port (or PORT) to pick another port"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("starting a throwaway Postgres"),
        "no cluster for a demo that cannot listen: {stderr}"
    );
}

/// A port below the ephemeral range, so that no outgoing connection can take it first.
fn free_port() -> u16 {
    let pid = std::process::id() as u16;
    (0..500)
        .map(|i| 10_000 + (pid.wrapping_mul(7).wrapping_add(i * 37)) % 20_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("some port in 10000..30000 is free")
}

struct Demo {
    child: Child,
    port: u16,
    database_url: String,
    cluster_dir: std::path::PathBuf,
}

impl Demo {
    fn start() -> Demo {
        let port = free_port();
        let mut child = Command::new(WALCAST)
            .args(["demo", "--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The banner comes once the server answers; read until its last line.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        for line in stdout.lines() {
            let line = line.unwrap();
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Ctrl-C stops everything") {
                break;
            }
        }
        let word_after = |label: &str| {
            banner
                .lines()
                .find_map(|l| l.trim_start().strip_prefix(label))
                .map(|rest| rest.split_whitespace().next().unwrap().to_string())
                .unwrap_or_else(|| panic!("no {label:?} line in the banner:\n{banner}"))
        };
        assert_eq!(word_after("open"), format!("http://localhost:{port}/"));
        Demo {
            database_url: word_after("SQL       psql"),
            cluster_dir: word_after("postgres").into(),
            child,
            port,
        }
    }

    /// One HTTP/1.1 request with `Connection: close`; returns the status and the body as JSON.
    fn request(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{auth}\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            status,
            serde_json::from_str(body).unwrap_or(Value::String(body.into())),
        )
    }

    fn token(&self, user: &str) -> (String, String) {
        let (status, body) = self.request("GET", &format!("/demo/token?user={user}"), None, "");
        assert_eq!(status, 200, "{body}");
        (
            body["token"].as_str().unwrap().to_string(),
            body["user_id"].as_str().unwrap().to_string(),
        )
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn psql(url: &str, sql: &str) -> String {
    let bin = walcast_pgcluster::find_bin_dir().expect("the demo found Postgres binaries");
    let out = Command::new(bin.join("psql"))
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn demo_serves_the_page_hands_out_tokens_applies_policies_and_cleans_up_on_ctrl_c() {
    let mut demo = Demo::start();
    assert!(demo.cluster_dir.join("data").exists());

    let (status, page) = demo.request("GET", "/", None, "");
    assert_eq!(status, 200);
    assert!(page
        .as_str()
        .unwrap()
        .contains("<title>walcast demo</title>"));

    let (status, body) = demo.request("GET", "/demo/token?user=", None, "");
    assert_eq!(status, 400);
    assert_eq!(body["error"], "user must be 1 to 32 printable characters");

    let (alice, alice_id) = demo.token("alice");
    let (_, alice_again) = demo.token("alice");
    assert_eq!(alice_id, alice_again, "one id per demo user");
    let (bob, _) = demo.token("bob");

    let (status, body) = demo.request("GET", "/demo/todos", None, "");
    assert_eq!(status, 401);
    assert_eq!(body["error"], "missing bearer token");

    // Inserts run as the token's user: owner and name come from the claims.
    let (status, row) = demo.request(
        "POST",
        "/demo/todos",
        Some(&alice),
        r#"{"title":"alice's secret","private":true}"#,
    );
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["owner"], alice_id.as_str());
    assert_eq!(row["owner_name"], "alice");
    let id = row["id"].as_i64().unwrap();

    // The policies decide what bob sees and may change.
    let titles = |token: &str| -> Vec<String> {
        let (status, rows) = demo.request("GET", "/demo/todos", Some(token), "");
        assert_eq!(status, 200, "{rows}");
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["title"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(titles(&alice).contains(&"alice's secret".to_string()));
    assert!(!titles(&bob).contains(&"alice's secret".to_string()));
    assert_eq!(titles(&bob).len(), 2, "bob sees the two seeded todos");
    let (status, _) = demo.request(
        "PATCH",
        &format!("/demo/todos/{id}"),
        Some(&bob),
        r#"{"done":true}"#,
    );
    assert_eq!(status, 404);
    let (status, _) = demo.request("DELETE", &format!("/demo/todos/{id}"), Some(&bob), "");
    assert_eq!(status, 404);
    let (status, row) = demo.request(
        "PATCH",
        &format!("/demo/todos/{id}"),
        Some(&alice),
        r#"{"done":true}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(row["done"], true);
    assert_eq!(
        psql(
            &demo.database_url,
            &format!("select done, private, owner_name from todos where id = {id}")
        ),
        "t|t|alice"
    );

    // Ctrl-C: the process exits cleanly and takes the cluster with it.
    let status = Command::new("kill")
        .args(["-INT", &demo.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = demo.child.wait().unwrap();
    assert!(exit.success(), "walcast demo exited with {exit}");
    assert!(
        !demo.cluster_dir.exists(),
        "{} should be gone",
        demo.cluster_dir.display()
    );
}
