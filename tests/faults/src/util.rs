//! Small shared pieces: clocks, ports, paths, knobs, tokens.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Wall clock in ms since the epoch: the same clock the Node subscribers stamp their lines
/// with, so a commit time and a receive time can be subtracted.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A free TCP port on 127.0.0.1 (bind :0, read, close).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The workspace root (two levels above this package).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        }
        None => repo_root().join("target"),
    }
}

/// An unsigned knob from the environment (documented in tests/faults/README.md).
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// `knob` in seconds.
pub fn knob_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(knob(name, default))
}

/// An HS256 token for `role` with `sub`, valid for an hour.
pub fn token(secret: &str, role: &str, sub: &str) -> Result<String> {
    let now = now_ms() / 1000;
    let claims = serde_json::json!({ "role": role, "sub": sub, "iat": now, "exp": now + 3600 });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Sleep to let load run (never used as an assertion).
pub async fn let_run(d: Duration) {
    tokio::time::sleep(d).await;
}
