//! The agent's command line: the parser `main` runs, public so that tests parse with it. The
//! subcommands the operator runs take the contract's argument structs (built there with
//! `to_args()`); the others define theirs beside their code in [`crate::cmd`].

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use sendense_contract::cli::{
    AGENT_BINARY, BackupArgs, HubPrepareArgs, HubRemoveArgs, HubServeArgs, NbdPingArgs,
    RepoCommitArgs, RepoProbeArgs, RepoPruneArgs, RestoreArgs,
};
use sendense_contract::manifest::CommitResult;
use sendense_contract::probe::ProbeResult;
use sendense_contract::prune::{PruneRefusal, PruneResult};
use sendense_contract::restore::{FilesResult, RestoreResult};
use sendense_contract::result::{BackupResult, TERMINATION_MESSAGE_LIMIT, compact_json};
use sendense_contract::{AgentReason, ProbeReason};

use crate::cmd::checksum::ChecksumArgs;
use crate::cmd::copy::CopyArgs;
use crate::cmd::verify::VerifyArgs;
use crate::cmd::write_result_file;

#[derive(Parser, Debug)]
#[command(name = AGENT_BINARY, about = "Sendense's data mover", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Threads that run the agent's work (default: one per disk the command copies, at most
    /// the CPUs the process may use). One thread runs a disk's copy at the least CPU per
    /// request (no hand-off between threads for each reply); disks copied at once go faster
    /// with a thread each (both measured in `make bench`).
    #[arg(long, global = true, env = "SENDENSE_AGENT_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
}

impl Cli {
    /// `--threads`, else one per disk of the command, at most the CPUs available (which
    /// honours a container's CPU limit).
    pub fn threads(&self) -> usize {
        if let Some(n) = self.threads {
            return usize::from(n);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.command.disks().clamp(1, cpus)
    }

    /// The runtime for `threads`: a current-thread runtime for 1, else a multi-threaded one
    /// with that many workers.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let threads = self.threads();
        let mut b = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        b.enable_all().build()
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Work on the hub (the repository side).
    Hub {
        #[command(subcommand)]
        command: HubCommand,
    },
    /// Work on a repository volume.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Check a QCOW2 chain (read through qemu-nbd) against an expected SHA-256.
    Verify(VerifyArgs),
    /// Copy areas of one NBD export to another (a whole disk by default), then flush.
    Copy(CopyArgs),
    /// Back up a VM: one snapshot, every target disk's changed areas copied, snapshot removed.
    /// Credentials: SENDENSE_VCENTER_USERNAME / SENDENSE_VCENTER_PASSWORD, or --credentials-dir
    /// with files `username` and `password` (a mounted Secret); never command-line arguments.
    Backup(Box<BackupArgs>),
    /// Complete an NBD handshake with each export and disconnect (the hub's startup probe: a
    /// listening socket alone does not prove qemu-nbd serves the export).
    NbdPing(NbdPingArgs),
    /// Print the SHA-256 of an NBD export's whole contents.
    Checksum(ChecksumArgs),
    /// Restore disks of a restore point (QCOW2 chains, read-only) onto raw image files, block
    /// devices or NBD exports; nothing is written until every source and target is checked.
    Restore(RestoreArgs),
    /// Restore disks of a restore point into vSphere: a new VM created with the disks' layout,
    /// or a powered-off VM's disks overwritten in place (only the blocks changed since the
    /// restore point while CBT allows). Credentials as for `backup`.
    RestoreVm(Box<sendense_contract::cli::RestoreVmArgs>),
    /// The guest file systems of a restore point (partition tables; ext4, XFS, NTFS) read in
    /// user space: list volumes and paths, extract files into a directory or a tar archive.
    Files {
        #[command(subcommand)]
        command: crate::cmd::files::FilesCommand,
    },
}

impl Command {
    /// The disks the command moves data for at once (1 for the others).
    pub fn disks(&self) -> usize {
        match self {
            Command::Copy(a) => a.source.len(),
            Command::Backup(a) => a.targets.len(),
            Command::Restore(a) => a.sources.len(),
            Command::RestoreVm(a) => a.sources.len(),
            _ => 1,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum HubCommand {
    /// Create one disk's QCOW2 for a backup (never over an existing file).
    Prepare(HubPrepareArgs),
    /// Serve each disk's QCOW2 with its own qemu-nbd (TLS only) until one ends (the hub fails)
    /// or the commit request appears in --commit-request: then every qemu-nbd stops and the
    /// attempt is committed as `repo commit` would. Exits 0 only when it is committed.
    Serve(HubServeArgs),
    /// Remove the directories of attempts that did not commit (a missing one is fine); a
    /// committed restore point's directory, foreign files and paths with `..` are refused.
    Remove(HubRemoveArgs),
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Prove DIR writable (write, fsync, read back, delete a 4 KiB file) and measure it:
    /// capacity, used and available bytes, number and allocated bytes of its *.qcow2 files.
    /// Exits 1 when the probe fails.
    Probe(RepoProbeArgs),
    /// Make an attempt's directory a committed restore point: read each disk back through its
    /// chain (SHA-256), flush, write restorepoint.json atomically. Exits 1 when it cannot.
    Commit(RepoCommitArgs),
    /// Remove a restore point from its chain (retention): its children's files are made
    /// independent of its files (per disk the cheaper of a commit down into it or a rebase
    /// onto its parent), read back against their SHA-256, their manifests pointed past it,
    /// then it is deleted. Journalled in its manifest first: run again after a crash, it
    /// finishes the job. --dry-run reports the plan. Exits 1 when it refuses or fails.
    Prune(RepoPruneArgs),
}

/// A command line clap rejects still gets its `--result-file` (the operator reads the reason
/// there): `InvalidArguments` for `backup`, a failed probe for `repo probe`. `args` are the
/// words after the binary name.
pub fn report_usage_error(e: &clap::Error, args: &[OsString]) {
    let Some((file, text)) = usage_error_result(e, args) else {
        return;
    };
    if let Err(e) = write_result_file(&file, &text) {
        eprintln!("sendense-agent: {e:#}");
    }
}

/// The subcommands whose result file the operator reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answering {
    Backup,
    RepoProbe,
    RepoCommit,
    RepoPrune,
    HubServe,
    Restore,
    FilesGet,
}

/// Where a rejected command line's result goes, and what it says; `None` when it has no
/// result file (or asked for help or the version).
pub fn usage_error_result(e: &clap::Error, args: &[OsString]) -> Option<(PathBuf, String)> {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    // The words clap refused, so read as words: the subcommand, and `--result-file F` or
    // `--result-file=F` anywhere after it.
    let answering = match args.first().map(|a| a.as_bytes()) {
        Some(b"backup") => Answering::Backup,
        Some(b"restore") | Some(b"restore-vm") => Answering::Restore,
        Some(b"files") if args.get(1).is_some_and(|a| a.as_bytes() == b"get") => {
            Answering::FilesGet
        }
        Some(b"repo") if args.get(1).is_some_and(|a| a.as_bytes() == b"commit") => {
            Answering::RepoCommit
        }
        Some(b"repo") if args.get(1).is_some_and(|a| a.as_bytes() == b"prune") => {
            Answering::RepoPrune
        }
        Some(b"repo") => Answering::RepoProbe,
        Some(b"hub") if args.get(1).is_some_and(|a| a.as_bytes() == b"serve") => {
            Answering::HubServe
        }
        _ => return None,
    };
    let file = args.iter().enumerate().find_map(|(i, a)| {
        match a.as_bytes().strip_prefix(b"--result-file") {
            Some(b"") => args.get(i + 1).map(PathBuf::from),
            Some(v) => v
                .strip_prefix(b"=")
                .map(|f| PathBuf::from(OsStr::from_bytes(f))),
            None => None,
        }
    })?;
    let message = one_line(e);
    let text = match answering {
        Answering::Backup => compact_json(
            &BackupResult::early_failure(AgentReason::InvalidArguments, message),
            TERMINATION_MESSAGE_LIMIT,
        ),
        Answering::RepoProbe => {
            serde_json::to_string(&ProbeResult::failed(ProbeReason::InvalidArguments, message))
                .unwrap_or_default()
        }
        Answering::RepoCommit => {
            serde_json::to_string(&CommitResult::failed(message)).unwrap_or_default()
        }
        Answering::HubServe => format!("invalid arguments: {message}"),
        Answering::RepoPrune => serde_json::to_string(&PruneResult::refused(
            "",
            PruneRefusal::BadArguments,
            message,
        ))
        .unwrap_or_default(),
        Answering::Restore => RestoreResult {
            error: Some(format!("invalid arguments: {message}")),
            nothing_written: true,
            ..Default::default()
        }
        .compact_json(TERMINATION_MESSAGE_LIMIT),
        Answering::FilesGet => FilesResult {
            error: Some(format!("invalid arguments: {message}")),
            nothing_written: true,
            ..Default::default()
        }
        .compact_json(TERMINATION_MESSAGE_LIMIT),
    };
    Some((file, text))
}

/// The error without its usage and help lines, on one line.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let message = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    message.trim_start_matches("error: ").to_string()
}

#[cfg(test)]
mod tests;
