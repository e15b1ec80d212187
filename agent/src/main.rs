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
    /// Back up a VM: one snapshot, every target disk's changed areas copied, snapshot removed.
    /// Credentials: SENDENSE_VCENTER_USERNAME / SENDENSE_VCENTER_PASSWORD, or --credentials-dir
    /// with files `username` and `password` (a mounted Secret); never command-line arguments.
    Backup(Box<BackupArgs>),
    /// Complete an NBD handshake with an export and disconnect (a readiness probe for hub
    /// containers: a listening socket alone does not prove qemu-nbd serves the export).
    NbdPing {
        /// nbd://host:port/export or nbd+unix:///export?socket=/path
        url: String,
        /// Seconds allowed for connecting and negotiating.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Print the SHA-256 of an NBD export's whole contents.
    Checksum {
        /// nbd://host:port/export or nbd+unix:///export?socket=/path
        url: String,
        #[arg(long, default_value_t = 120)]
        request_timeout: u64,
    },
}

#[derive(clap::Args, Debug)]
struct BackupArgs {
    /// vCenter SDK URL, e.g. https://vcenter.example.com/sdk
    #[arg(long)]
    vcenter: String,
    #[arg(long)]
    datacenter: String,
    /// VM inventory name (or use --vm-uuid).
    #[arg(long, conflicts_with = "vm_uuid", required_unless_present = "vm_uuid")]
    vm: Option<String>,
    /// VM instance UUID.
    #[arg(long)]
    vm_uuid: Option<String>,
    /// Hub export per disk: 2000:nbd://host:port/export,2001:...
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Change ID of the previous backup per disk: 2000:<changeId>,... (absent: full copy)
    #[arg(long, value_delimiter = ',')]
    base_change_ids: Vec<String>,
    /// nfs (read flat files from mounted datastores) or vddk
    #[arg(long, default_value = "nfs")]
    transport: String,
    /// Mounted datastore for the nfs transport: NAME=DIR (repeatable)
    #[arg(long = "datastore")]
    datastores: Vec<String>,
    #[arg(long, default_value = "/opt/vmware-vix-disklib-distrib")]
    vddk_libdir: PathBuf,
    #[arg(long, default_value = "nbdssl", value_delimiter = ',')]
    vddk_modes: Vec<String>,
    /// Pinned certificate fingerprint (SHA-256 or SHA-1, colon-separated hex).
    #[arg(long)]
    thumbprint: Option<String>,
    /// PEM CA bundle that signed the vCenter certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Skip certificate verification (labs only).
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Directory with `username` and `password` files.
    #[arg(long)]
    credentials_dir: Option<PathBuf>,
    /// Name of this backup (BackupJob name): the snapshot is named <prefix><job>.
    #[arg(long)]
    job: String,
    #[arg(long, default_value = "sendense-")]
    snapshot_prefix: String,
    #[arg(long)]
    quiesce: bool,
    #[arg(long, default_value_t = 2 << 20)]
    request_size: u32,
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds allowed for each NBD and vSphere request.
    #[arg(long, default_value_t = 120)]
    request_timeout: u64,
    /// Seconds the whole backup may take; then it stops and removes its snapshot.
    #[arg(long)]
    deadline_seconds: Option<u64>,
    /// Also hash each disk as read from the snapshot (a full read), for verify.
    #[arg(long)]
    checksum: bool,
    /// Also write the JSON result here.
    #[arg(long)]
    result_file: Option<PathBuf>,
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

fn key_value(s: &str, sep: char, what: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once(sep)
        .with_context(|| format!("{what} {s:?}: expected KEY{sep}VALUE"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn credentials(args: &BackupArgs) -> Result<(String, String)> {
    if let Some(dir) = &args.credentials_dir {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .with_context(|| format!("reading {}/{f}", dir.display()))
        };
        return Ok((read("username")?, read("password")?));
    }
    let user = std::env::var("SENDENSE_VCENTER_USERNAME")
        .context("no vCenter credentials: set SENDENSE_VCENTER_USERNAME and SENDENSE_VCENTER_PASSWORD, or --credentials-dir")?;
    let pass = std::env::var("SENDENSE_VCENTER_PASSWORD")
        .context("SENDENSE_VCENTER_PASSWORD is not set")?;
    Ok((user, pass))
}

async fn backup_command(args: BackupArgs) -> Result<bool> {
    use sendense_agent::backup::{self, BackupPlan, LiveProgress};
    use sendense_agent::source::{Transport, VddkSettings};
    use sendense_agent::vsphere::{Tls, VCenterConfig, VSphere, VmSelector};
    use std::collections::BTreeMap;

    let tls = match (&args.thumbprint, &args.ca_file, args.insecure_skip_verify) {
        (Some(t), None, false) => Tls::Thumbprint(t.clone()),
        (None, Some(f), false) => Tls::CaPem(
            std::fs::read(f).with_context(|| format!("reading --ca-file {}", f.display()))?,
        ),
        (None, None, true) => Tls::Insecure,
        _ => anyhow::bail!("give exactly one of --thumbprint, --ca-file or --insecure-skip-verify"),
    };
    let mut targets = BTreeMap::new();
    for t in &args.targets {
        let (k, v) = key_value(t, ':', "--targets")?;
        let key: i32 = k
            .parse()
            .with_context(|| format!("--targets {t:?}: device key"))?;
        targets.insert(key, v.parse::<NbdUrl>()?);
    }
    let mut base_change_ids = BTreeMap::new();
    for b in &args.base_change_ids {
        let (k, v) = key_value(b, ':', "--base-change-ids")?;
        let key: i32 = k
            .parse()
            .with_context(|| format!("--base-change-ids {b:?}: device key"))?;
        if !targets.contains_key(&key) {
            anyhow::bail!("--base-change-ids names disk {key}, which has no --targets entry");
        }
        base_change_ids.insert(key, v);
    }
    let (username, password) = credentials(&args)?;
    let transport = match args.transport.as_str() {
        "nfs" => {
            let mut datastores = BTreeMap::new();
            for d in &args.datastores {
                let (k, v) = key_value(d, '=', "--datastore")?;
                datastores.insert(k, PathBuf::from(v));
            }
            Transport::Nfs { datastores }
        }
        "vddk" => {
            let host = url::Url::parse(&args.vcenter)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .context("--vcenter: not a URL")?;
            let dir = args.credentials_dir.clone().context(
                "the vddk transport reads the password from a file: give --credentials-dir",
            )?;
            Transport::Vddk(VddkSettings {
                server: host,
                username: username.clone(),
                password_file: dir.join("password"),
                thumbprint: args
                    .thumbprint
                    .clone()
                    .context("the vddk transport needs --thumbprint")?,
                modes: args.vddk_modes.clone(),
                libdir: args.vddk_libdir.clone(),
            })
        }
        other => anyhow::bail!("--transport {other}: expected nfs or vddk"),
    };
    let timeout = Duration::from_secs(args.request_timeout);
    let mut cfg = VCenterConfig::new(args.vcenter.clone(), username, password, tls);
    cfg.call_timeout = timeout;
    let plan = BackupPlan {
        datacenter: args.datacenter.clone(),
        vm: match (&args.vm, &args.vm_uuid) {
            (Some(n), _) => VmSelector::Name(n.clone()),
            (None, Some(u)) => VmSelector::InstanceUuid(u.clone()),
            (None, None) => anyhow::bail!("give --vm or --vm-uuid"),
        },
        targets,
        base_change_ids,
        transport,
        snapshot_prefix: args.snapshot_prefix.clone(),
        job: args.job.clone(),
        quiesce: args.quiesce,
        copy: CopyOptions {
            request_size: args.request_size,
            max_in_flight: args.in_flight,
            ..Default::default()
        },
        connect: ConnectOptions {
            connections: args.connections,
            ..options(args.request_timeout)
        },
        checksum: args.checksum,
    };

    let vs = VSphere::connect(cfg)
        .await
        .context("connecting to vCenter")?;
    let live = LiveProgress::default();
    let deadline = args.deadline_seconds.map(Duration::from_secs);
    let stop = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return "no SIGTERM handler".to_string(),
            };
        let past_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM".to_string(),
            _ = tokio::signal::ctrl_c() => "interrupted".to_string(),
            _ = past_deadline => format!("deadline of {}s passed", deadline.map_or(0, |d| d.as_secs())),
        }
    };
    let reporter = report_progress(&live);
    let result = tokio::select! {
        r = backup::run(&vs, &plan, &live, stop) => r,
        _ = reporter => unreachable_reporter(),
    };
    vs.logout().await;
    let text = serde_json::to_string(&result)?;
    if let Some(f) = &args.result_file {
        std::fs::write(f, &text).with_context(|| format!("writing {}", f.display()))?;
    }
    println!("{text}");
    if let Some(e) = &result.error {
        eprintln!("sendense-agent: backup failed: {e}");
    }
    Ok(result.ok)
}

fn unreachable_reporter() -> sendense_agent::backup::BackupResult {
    sendense_agent::backup::BackupResult {
        error: Some("progress reporter ended".into()),
        ..Default::default()
    }
}

/// Progress on stderr every 2 s: a bar on a terminal, a JSON line otherwise. Never ends.
async fn report_progress(live: &sendense_agent::backup::LiveProgress) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (done, total) = live.totals();
        if total == 0 {
            continue;
        }
        let pct = done as f64 * 100.0 / total as f64;
        if tty {
            let filled = (pct / 5.0) as usize;
            eprint!(
                "\r[{}{}] {pct:5.1}% {} / {} MiB",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20)),
                done >> 20,
                total >> 20
            );
        } else {
            eprintln!(
                "{}",
                serde_json::json!({"progress": {"bytes_done": done, "bytes_total": total, "percent": (pct * 10.0).round() / 10.0}})
            );
        }
    }
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
        Cmd::Backup(args) => backup_command(*args).await,
        Cmd::NbdPing { url, timeout } => {
            let url: NbdUrl = url.parse()?;
            let opts = ConnectOptions {
                connect_timeout: Duration::from_secs(timeout),
                connections: 1,
                ..options(timeout)
            };
            let client = NbdClient::connect(&url, &opts).await?;
            println!(
                "{}",
                serde_json::json!({"size": client.size(), "multi_conn": client.can_multi_conn()})
            );
            client.disconnect().await;
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
