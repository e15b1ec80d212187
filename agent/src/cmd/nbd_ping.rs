//! `nbd-ping`: a hub container's readiness probe. Connecting and negotiating must both finish
//! within `--timeout`. A server not listening yet (connection refused, or its Unix socket not
//! made yet: qemu-nbd starting) is
//! tried again within that deadline, so a hub that comes up within it is Ready at its first
//! probe instead of failing probes (each a kubelet Event and pod sync) until the next period.

use std::time::Duration;

use anyhow::Result;
use sendense_contract::cli::NbdPingArgs;

use super::Outcome;
use crate::nbd::{Address, ConnectOptions, NbdClient, NbdError, NbdUrl, TlsClient};

/// Pause before connecting again to a server that refused the connection.
const RETRY_REFUSED: Duration = Duration::from_millis(200);

pub async fn run(args: NbdPingArgs) -> Result<Outcome> {
    let timeout = Duration::from_secs(args.timeout);
    let tls = args
        .tls_dir
        .as_deref()
        .map(TlsClient::from_dir)
        .transpose()?;
    let opts = ConnectOptions {
        connect_timeout: timeout,
        connections: 1,
        tls,
        ..ConnectOptions::with_request_timeout(timeout)
    };
    // One deadline for all of them.
    let deadline = tokio::time::Instant::now() + timeout;
    for u in &args.urls {
        let mut url: NbdUrl = u.parse()?;
        if let Some(var) = &args.host_env {
            let host = std::env::var(var)
                .map_err(|_| anyhow::anyhow!("--host-env {var}: the variable is not set"))?;
            match &mut url.address {
                Address::Tcp { host: h, .. } => *h = host,
                Address::Unix(_) => anyhow::bail!("--host-env applies to nbd:// and nbds:// URLs"),
            }
        }
        let client = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let opts = ConnectOptions {
                connect_timeout: left,
                ..opts.clone()
            };
            match NbdClient::connect(&url, &opts).await {
                // Refused (TCP, or a Unix socket without its server), or a socket not made yet.
                Err(NbdError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) && left > RETRY_REFUSED =>
                {
                    tokio::time::sleep(RETRY_REFUSED).await;
                }
                r => break r?,
            }
        };
        println!(
            "{}",
            serde_json::json!({"url": u, "size": client.size(), "multi_conn": client.can_multi_conn()})
        );
        client.disconnect().await;
    }
    Ok(Outcome::Succeeded)
}
