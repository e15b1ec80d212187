//! `checksum`: the SHA-256 of an NBD export's whole contents.

use std::time::Duration;

use anyhow::{Context, Result};

use super::Outcome;
use crate::checksum;
use crate::nbd::{ConnectOptions, NbdClient, NbdUrl};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct ChecksumArgs {
    /// nbd://host:port/export or nbd+unix:///export?socket=/path
    pub url: NbdUrl,
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
}

pub async fn run(args: ChecksumArgs) -> Result<Outcome> {
    let opts = ConnectOptions::with_request_timeout(Duration::from_secs(args.request_timeout));
    let client = NbdClient::connect(&args.url, &opts).await?;
    let sum = checksum::sha256(&client, checksum::REQUEST_SIZE, checksum::IN_FLIGHT)
        .await
        .context("reading the export")?;
    println!(
        "{}",
        serde_json::json!({"size": client.size(), "sha256": sum})
    );
    client.disconnect().await;
    Ok(Outcome::Succeeded)
}
