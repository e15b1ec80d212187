//! sendense-agent: the data mover. Subcommands:
//! - `backup`: back up a VM (one snapshot, every disk's changed areas to its hub export);
//! - `hub prepare`: create one disk's QCOW2 (layered on its parent for an incremental);
//! - `hub remove`: remove the files a failed backup left;
//! - `repo probe`: prove a repository directory writable and measure it;
//! - `verify`: check a restore point (a QCOW2 chain, read through qemu-nbd) against a checksum;
//! - `checksum`: print the SHA-256 of an NBD export.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sendense_agent::backup::{BackupPlan, LiveProgress};
use sendense_agent::copy::{ChangedArea, CopyKind, CopyOptions, Progress, copy_areas};
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdUrl};
use sendense_agent::{backup, hub, qemu_nbd, repo, status, verify};
use sendense_contract::cli::{
    BackupArgs, HubPrepareArgs, HubRemoveArgs, NbdPingArgs, RepoProbeArgs, Transport,
};
use sendense_contract::probe::ProbeResult;
use sendense_contract::progress::Stage;
use sendense_contract::result::{BackupResult, TERMINATION_MESSAGE_LIMIT, compact_json};
use sendense_contract::{AgentReason, ProbeReason};
use sendense_vsphere::{VCenterConfig, VSphere};

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
    /// Work on a repository volume.
    Repo {
        #[command(subcommand)]
        command: RepoCmd,
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
    NbdPing(NbdPingArgs),
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
    Prepare(HubPrepareArgs),
    /// Remove the files a failed backup left (a missing file is fine), and each file's
    /// directory if that left it empty. Paths with `..` are refused.
    Remove(HubRemoveArgs),
}

#[derive(Subcommand, Debug)]
enum RepoCmd {
    /// Prove DIR writable (write, fsync, read back, delete a 4 KiB file) and measure it:
    /// capacity, used and available bytes, number and allocated bytes of its *.qcow2 files.
    /// Exits 1 when the probe fails.
    Probe(RepoProbeArgs),
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

/// Why a backup could not start: a condition reason and the error.
type EarlyFailure = (AgentReason, anyhow::Error);

fn early_result(reason: AgentReason, err: &anyhow::Error) -> BackupResult {
    BackupResult::early_failure(reason, format!("{err:#}"))
}

/// The plan and vCenter settings from the arguments and credentials.
fn backup_plan(args: &BackupArgs) -> Result<(BackupPlan, VCenterConfig), EarlyFailure> {
    use sendense_agent::source::{self, VddkSettings};
    use sendense_vsphere::{Tls, VmSelector};
    use std::collections::BTreeMap;

    let invalid = |e: anyhow::Error| (AgentReason::InvalidArguments, e);
    let tls = match (&args.thumbprint, &args.ca_file, args.insecure_skip_verify) {
        (Some(t), None, false) => Tls::Thumbprint(t.clone()),
        (None, Some(f), false) => Tls::CaPem(
            std::fs::read(f)
                .with_context(|| format!("reading --ca-file {}", f.display()))
                .map_err(invalid)?,
        ),
        (None, None, true) => Tls::Insecure,
        _ => {
            return Err(invalid(anyhow::anyhow!(
                "give exactly one of --thumbprint, --ca-file or --insecure-skip-verify"
            )));
        }
    };
    let parse = || -> Result<_> {
        let mut targets = BTreeMap::new();
        for t in &args.targets {
            targets.insert(
                t.key,
                t.url
                    .parse::<NbdUrl>()
                    .with_context(|| format!("--targets {t}"))?,
            );
        }
        let mut base_change_ids = BTreeMap::new();
        for b in &args.base_change_ids {
            if !targets.contains_key(&b.key) {
                anyhow::bail!(
                    "--base-change-ids names disk {}, which has no --targets entry",
                    b.key
                );
            }
            base_change_ids.insert(b.key, b.change_id.clone());
        }
        let vm = match (&args.vm, &args.vm_uuid) {
            (Some(n), _) => VmSelector::Name(n.clone()),
            (None, Some(u)) => VmSelector::InstanceUuid(u.clone()),
            (None, None) => anyhow::bail!("give --vm or --vm-uuid"),
        };
        Ok((targets, base_change_ids, vm))
    };
    let (targets, base_change_ids, vm) = parse().map_err(invalid)?;
    let transport = match args.transport {
        Transport::Nfs => source::Transport::Nfs {
            datastores: args
                .datastores
                .iter()
                .map(|d| (d.name.clone(), d.dir.clone()))
                .collect(),
        },
        Transport::Vddk => {
            let host = url::Url::parse(&args.vcenter)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .context("--vcenter: not a URL")
                .map_err(invalid)?;
            let dir = args
                .credentials_dir
                .clone()
                .context(
                    "the vddk transport reads the password from a file: give --credentials-dir",
                )
                .map_err(invalid)?;
            source::Transport::Vddk(VddkSettings {
                server: host,
                username: String::new(),
                password_file: dir.join("password"),
                thumbprint: args
                    .thumbprint
                    .clone()
                    .context("the vddk transport needs --thumbprint")
                    .map_err(invalid)?,
                modes: args
                    .vddk_modes
                    .iter()
                    .map(|m| {
                        clap::ValueEnum::to_possible_value(m)
                            .map(|p| p.get_name().to_owned())
                            .unwrap_or_default()
                    })
                    .collect(),
                libdir: args.vddk_libdir.clone(),
            })
        }
    };
    let mut plan = BackupPlan {
        datacenter: args.datacenter.clone(),
        vm,
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
    let (username, password) =
        credentials(args).map_err(|e| (AgentReason::CredentialsUnavailable, e))?;
    if let source::Transport::Vddk(v) = &mut plan.transport {
        v.username = username.clone();
    }
    let mut cfg = VCenterConfig::new(args.vcenter.clone(), username, password, tls);
    cfg.call_timeout = Duration::from_secs(args.request_timeout);
    Ok((plan, cfg))
}

/// Resolves when the backup must stop: SIGTERM, Ctrl-C, or `deadline` after its first poll.
async fn stop_signal(deadline: Option<Duration>) -> String {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
}

/// Every outcome of a backup as a result, early failures (arguments, credentials, the status
/// listener, connecting to vCenter) included; the flag says whether the backup proper ran.
async fn backup_outcome(args: &BackupArgs, live: &Arc<LiveProgress>) -> (BackupResult, bool) {
    let fail = |(reason, e): EarlyFailure| (early_result(reason, &e), false);
    let (plan, cfg) = match backup_plan(args) {
        Ok(p) => p,
        Err(f) => return fail(f),
    };
    // Bound before vCenter is contacted, so a bad address fails at once.
    let listener = match &args.status_addr {
        None => None,
        Some(addr) => match status::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                return fail((
                    AgentReason::StatusListenFailed,
                    anyhow::anyhow!("--status-addr {addr}: cannot listen: {e}"),
                ));
            }
        },
    };
    let serve = async {
        match listener {
            Some(l) => status::serve(l, live.clone()).await,
            None => std::future::pending().await,
        }
    };
    let work = async {
        let stop = stop_signal(args.deadline_seconds.map(Duration::from_secs));
        tokio::pin!(stop);
        let connected = tokio::select! {
            r = VSphere::connect(cfg) => r,
            why = &mut stop => {
                return fail((AgentReason::Stopped, anyhow::anyhow!("stopped while connecting to vCenter: {why}")));
            }
        };
        let vs = match connected {
            Ok(vs) => vs,
            Err(e) => {
                let reason = backup::vsphere_reason(&e, AgentReason::Unreachable);
                return fail((
                    reason,
                    anyhow::Error::new(e).context("connecting to vCenter"),
                ));
            }
        };
        let result = backup::run(&vs, &plan, live, stop).await;
        vs.logout().await;
        (result, true)
    };
    let outcome = tokio::select! {
        r = work => r,
        _ = serve => fail((AgentReason::StatusListenFailed, anyhow::anyhow!("the status endpoint ended"))),
        _ = report_progress(live) => fail((AgentReason::Internal, anyhow::anyhow!("the progress reporter ended"))),
    };
    live.set_stage(Stage::Done);
    outcome
}

/// Writes a result file in full (a termination message file may be a bind mount: no rename).
fn write_result_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing --result-file {}", path.display()))
}

/// Exit: 0 done, 1 the backup failed, 2 it could not start (the result says why in both).
async fn backup_command(args: BackupArgs) -> Result<bool> {
    let live = Arc::new(LiveProgress::default());
    let (result, started) = backup_outcome(&args, &live).await;
    let written = match &args.result_file {
        Some(f) => write_result_file(f, &compact_json(&result, TERMINATION_MESSAGE_LIMIT)),
        None => Ok(()),
    };
    println!("{}", serde_json::to_string(&result)?);
    written?;
    match (&result.error, started) {
        (Some(e), true) => eprintln!("sendense-agent: backup failed: {e}"),
        (Some(e), false) => anyhow::bail!("{e}"),
        (None, _) => {}
    }
    Ok(result.ok)
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
                HubCmd::Prepare(HubPrepareArgs {
                    file,
                    size,
                    backing,
                }),
        } => {
            let prepared = hub::prepare(&file, size, backing.as_deref())?;
            println!("{}", serde_json::to_string(&prepared)?);
            Ok(true)
        }
        Cmd::Hub {
            command: HubCmd::Remove(HubRemoveArgs { files }),
        } => {
            let removed = hub::remove(&files)?;
            println!("{}", serde_json::to_string(&removed)?);
            Ok(true)
        }
        Cmd::Repo {
            command: RepoCmd::Probe(RepoProbeArgs { dir, result_file }),
        } => {
            let probed = repo::probe(&dir);
            let text = serde_json::to_string(&probed)?;
            if let Some(f) = &result_file {
                write_result_file(f, &text)?;
            }
            println!("{text}");
            if let Some(e) = &probed.error {
                eprintln!("sendense-agent: repository probe failed: {e}");
            }
            Ok(probed.ok)
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
        Cmd::NbdPing(NbdPingArgs { url, timeout }) => {
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

/// A command line clap rejects still gets its --result-file (the operator reads the reason
/// there): `InvalidArguments` for `backup`, a failed probe for `repo probe`.
fn report_usage_error(e: &clap::Error) {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) =
        args.iter()
            .enumerate()
            .find_map(|(i, a)| match a.strip_prefix("--result-file") {
                Some("") => args.get(i + 1).cloned(),
                Some(v) => v.strip_prefix('=').map(str::to_owned),
                None => None,
            })
    else {
        return;
    };
    // The error without its usage and help lines, on one line.
    let rendered = e.render().to_string();
    let message = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.trim_start_matches("error: ").to_string();
    let text = match args.first().map(String::as_str) {
        Some("backup") => compact_json(
            &BackupResult::early_failure(AgentReason::InvalidArguments, message),
            TERMINATION_MESSAGE_LIMIT,
        ),
        Some("repo") => {
            serde_json::to_string(&ProbeResult::failed(ProbeReason::InvalidArguments, message))
                .unwrap_or_default()
        }
        _ => return,
    };
    if let Err(e) = write_result_file(Path::new(&file), &text) {
        eprintln!("sendense-agent: {e:#}");
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            report_usage_error(&e);
            e.exit()
        }
    };
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sendense-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
