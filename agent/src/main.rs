//! sendense-agent: the data mover. Subcommands:
//! - `hub prepare`: create one disk's QCOW2 (layered on its parent for an incremental);
//! - `verify`: check a restore point (a QCOW2 chain, read through qemu-nbd) against a checksum;
//! - `checksum`: print the SHA-256 of an NBD export.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sendense_agent::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdUrl};
use sendense_agent::{hub, qemu_nbd, verify};

#[derive(Parser, Debug)]
#[command(name = "sendense-agent", about = "Sendense's data mover", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Work on the hub (the repository side).
    Hub {
        #[command(subcommand)]
        command: HubCmd,
    },
    /// Check a QCOW2 chain (read through qemu-nbd) against an expected SHA-256.
    Verify {
        /// Top file of the chain; its backing files are followed.
        #[arg(long)]
        file: PathBuf,
        /// Expected SHA-256 (hex) of the whole disk.
        #[arg(long)]
        sha256: String,
        /// Seconds allowed for each NBD request.
        #[arg(long, default_value_t = 120)]
        request_timeout: u64,
    },
    /// Copy areas of one NBD export to another (a whole disk by default), then flush.
    Copy {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        /// `full`: the target is a fresh image, zero areas are skipped. `incremental`: the target
        /// is an overlay, zero areas are written as zeros.
        #[arg(long, default_value = "full")]
        kind: String,
        /// Areas as start+length pairs in bytes, comma-separated; default the whole source.
        #[arg(long, value_delimiter = ',')]
        areas: Vec<String>,
        #[arg(long, default_value_t = 2 << 20)]
        request_size: u32,
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 120)]
        request_timeout: u64,
    },
    /// Print the SHA-256 of an NBD export's whole contents.
    Checksum {
        /// nbd://host:port/export or nbd+unix:///export?socket=/path
        url: String,
        #[arg(long, default_value_t = 120)]
        request_timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum HubCmd {
    /// Create one disk's QCOW2 for a backup (replacing a file left by an earlier attempt).
    Prepare {
        /// The QCOW2 file to create.
        #[arg(long)]
        file: PathBuf,
        /// Virtual size in bytes (the disk's capacity).
        #[arg(long)]
        size: u64,
        /// The previous backup of this disk (makes this an incremental overlay).
        #[arg(long)]
        backing: Option<PathBuf>,
    },
}

/// `start+length` in bytes.
fn parse_area(s: &str) -> Result<ChangedArea> {
    let (start, length) = s
        .split_once('+')
        .with_context(|| format!("area {s:?}: expected start+length"))?;
    Ok(ChangedArea {
        start: start
            .trim()
            .parse()
            .with_context(|| format!("area {s:?}: start"))?,
        length: length
            .trim()
            .parse()
            .with_context(|| format!("area {s:?}: length"))?,
    })
}

fn options(request_timeout: u64) -> ConnectOptions {
    ConnectOptions {
        request_timeout: Duration::from_secs(request_timeout),
        ..Default::default()
    }
}

async fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Cmd::Hub {
            command:
                HubCmd::Prepare {
                    file,
                    size,
                    backing,
                },
        } => {
            let prepared = hub::prepare(&file, size, backing.as_deref())?;
            println!("{}", serde_json::to_string(&prepared)?);
            Ok(true)
        }
        Cmd::Verify {
            file,
            sha256,
            request_timeout,
        } => {
            let server = qemu_nbd::ReadOnlyExport::start(&file).await?;
            let client = NbdClient::connect(&server.url(), &options(request_timeout)).await?;
            let actual = verify::sha256(&client, 2 << 20, 16).await?;
            let size = client.size();
            client.disconnect().await;
            let matches = actual.eq_ignore_ascii_case(sha256.trim());
            println!(
                "{}",
                serde_json::json!({"file": file, "size": size, "sha256": actual, "expected": sha256, "match": matches})
            );
            Ok(matches)
        }
        Cmd::Copy {
            source,
            target,
            kind,
            areas,
            request_size,
            in_flight,
            connections,
            request_timeout,
        } => {
            let kind = match kind.as_str() {
                "full" => CopyKind::Full,
                "incremental" => CopyKind::Incremental,
                other => anyhow::bail!("--kind {other}: expected full or incremental"),
            };
            let opts = ConnectOptions {
                connections,
                ..options(request_timeout)
            };
            let source = NbdClient::connect(&source.parse()?, &opts)
                .await
                .context("source")?;
            let target = NbdClient::connect(&target.parse()?, &opts)
                .await
                .context("target")?;
            let areas = if areas.is_empty() {
                vec![ChangedArea {
                    start: 0,
                    length: source.size(),
                }]
            } else {
                areas.iter().map(|a| parse_area(a)).collect::<Result<_>>()?
            };
            let progress = Progress::default();
            let started = std::time::Instant::now();
            let copy_opts = CopyOptions {
                request_size,
                max_in_flight: in_flight,
                ..Default::default()
            };
            let stats = copy_areas(&source, &target, areas, kind, &copy_opts, &progress).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "bytes": stats.total, "data": stats.data, "zeroed": stats.zeroed, "skipped": stats.skipped,
                    "seconds": secs, "connections": [source.connections(), target.connections()],
                })
            );
            source.disconnect().await;
            target.disconnect().await;
            Ok(true)
        }
        Cmd::Checksum {
            url,
            request_timeout,
        } => {
            let url: NbdUrl = url.parse()?;
            let client = NbdClient::connect(&url, &options(request_timeout)).await?;
            let sum = verify::sha256(&client, 2 << 20, 16)
                .await
                .context("reading the export")?;
            println!(
                "{}",
                serde_json::json!({"size": client.size(), "sha256": sum})
            );
            client.disconnect().await;
            Ok(true)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sendense-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
