//! A minimal HTTP/1.1 GET over a fresh TCP connection (no client library needed for /readyz
//! and /metrics on 127.0.0.1).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on 127.0.0.1:port; the status code and the body. Errors when there is no
/// answer within `timeout`.
pub async fn get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .context("connecting")?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        parse(&buf)
    })
    .await
    .context("no HTTP answer in time")?
}

fn parse(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("truncated HTTP answer: {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of an unlabelled Prometheus sample `name` (summing labelled series of it).
pub fn metric(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.rsplit_once(' ') {
            Some(kv) => kv,
            None => continue,
        };
        let base = key.split('{').next().unwrap_or(key);
        if base == name {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::{metric, parse};

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\n\r\nnot ready\n";
        assert_eq!(parse(plain).unwrap(), (503, "not ready\n".to_string()));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nrea\r\n3\r\ndy\n\r\n0\r\n\r\n";
        assert_eq!(parse(chunked).unwrap(), (200, "ready\n".to_string()));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn metric_sums_labelled_series_and_skips_comments() {
        let page = "# HELP walcast_x x\n# TYPE walcast_x counter\nwalcast_x{kind=\"a\"} 2\n\
                    walcast_x{kind=\"b\"} 3\nwalcast_xy 7\nwalcast_streaming 1\n";
        assert_eq!(metric(page, "walcast_x"), Some(5.0));
        assert_eq!(metric(page, "walcast_streaming"), Some(1.0));
        assert_eq!(metric(page, "walcast_missing"), None);
    }
}
