//! Reads the agent's progress endpoint (`GET /progress` on its pod IP): one HTTP/1.1 request,
//! the answer capped at 256 KiB, everything within a short deadline. Three lines of HTTP need
//! no client library.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sendense_contract::progress::{PROGRESS_PATH, ProgressReport};

/// How long one read of the progress may take; the next reconcile tries again.
const DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: no HTTP header in the answer")]
    NoHeader { addr: String },
    #[error("{addr} answered {status}")]
    Status { addr: String, status: String },
    #[error("{addr}: progress JSON: {source}")]
    Json {
        addr: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no answer from {addr} within {DEADLINE:?}")]
    Timeout { addr: String },
}

/// Reads the agent's progress at `addr` (`ip:port`).
pub async fn fetch(addr: &str) -> Result<ProgressReport, ProgressError> {
    match tokio::time::timeout(DEADLINE, request(addr)).await {
        Ok(r) => r,
        Err(_) => Err(ProgressError::Timeout { addr: addr.into() }),
    }
}

async fn request(addr: &str) -> Result<ProgressReport, ProgressError> {
    let io = |source| ProgressError::Io {
        addr: addr.into(),
        source,
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    s.write_all(
        format!("GET {PROGRESS_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(io)?;
    let mut buf = Vec::new();
    (&mut s)
        .take(256 * 1024)
        .read_to_end(&mut buf)
        .await
        .map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ProgressError::NoHeader { addr: addr.into() })?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(ProgressError::Status {
            addr: addr.into(),
            status: head.lines().next().unwrap_or_default().to_owned(),
        });
    }
    serde_json::from_str(body).map_err(|source| ProgressError::Json {
        addr: addr.into(),
        source,
    })
}
