//! `nbd-ping`: a hub container's readiness probe. Connecting and negotiating must both finish
//! within `--timeout`.

use std::time::Duration;

use anyhow::Result;
use sendense_contract::cli::NbdPingArgs;

use super::Outcome;
use crate::nbd::{Address, ConnectOptions, NbdClient, NbdUrl, TlsClient};

pub async fn run(args: NbdPingArgs) -> Result<Outcome> {
    let mut url: NbdUrl = args.url.parse()?;
    if let Some(var) = &args.host_env {
        let host = std::env::var(var)
            .map_err(|_| anyhow::anyhow!("--host-env {var}: the variable is not set"))?;
        match &mut url.address {
            Address::Tcp { host: h, .. } => *h = host,
            Address::Unix(_) => anyhow::bail!("--host-env applies to nbd:// and nbds:// URLs"),
        }
    }
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
    let client = NbdClient::connect(&url, &opts).await?;
    println!(
        "{}",
        serde_json::json!({"size": client.size(), "multi_conn": client.can_multi_conn()})
    );
    client.disconnect().await;
    Ok(Outcome::Succeeded)
}
