//! `nbd-ping`: a hub container's readiness probe. Connecting and negotiating must both finish
//! within `--timeout`.

use std::time::Duration;

use anyhow::Result;
use sendense_contract::cli::NbdPingArgs;

use super::Outcome;
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};

pub async fn run(args: NbdPingArgs) -> Result<Outcome> {
    let url: NbdUrl = args.url.parse()?;
    let timeout = Duration::from_secs(args.timeout);
    let opts = ConnectOptions {
        connect_timeout: timeout,
        connections: 1,
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
