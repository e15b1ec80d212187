//! `verify`: a restore point (a QCOW2 chain, read through a private read-only qemu-nbd)
//! checked against the checksum of the disk it was copied from. A mismatch exits 1, a chain
//! that cannot be read 2.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::Outcome;
use crate::checksum;
use crate::nbd::{ConnectOptions, NbdClient};
use crate::qemu_nbd::ReadOnlyExport;

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct VerifyArgs {
    /// Top file of the chain; its backing files are followed.
    #[arg(long)]
    pub file: PathBuf,
    /// Expected SHA-256 (hex) of the whole disk.
    #[arg(long)]
    pub sha256: String,
    /// Seconds allowed for each NBD request.
    #[arg(long, default_value_t = 120)]
    pub request_timeout: u64,
}

pub async fn run(args: VerifyArgs) -> Result<Outcome> {
    let server = ReadOnlyExport::start(&args.file).await?;
    let opts = ConnectOptions::with_request_timeout(Duration::from_secs(args.request_timeout));
    let client = NbdClient::connect(&server.url(), &opts).await?;
    let actual = checksum::sha256(&client, checksum::REQUEST_SIZE, checksum::IN_FLIGHT).await?;
    let size = client.size();
    client.disconnect().await;
    let matches = actual.eq_ignore_ascii_case(args.sha256.trim());
    println!(
        "{}",
        serde_json::json!({"file": args.file, "size": size, "sha256": actual, "expected": args.sha256, "match": matches})
    );
    Ok(Outcome::of(matches))
}
