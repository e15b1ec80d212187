//! The subcommands, one module each: a subcommand takes its parsed arguments, does its work,
//! prints its answer as JSON on stdout and says how it ended.

pub mod backup;
pub mod checksum;
pub mod copy;
pub mod files;
pub mod hub;
pub mod nbd_ping;
pub mod repo;
pub mod restore;
pub mod restore_vm;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::{Command, HubCommand, RepoCommand};

/// How a subcommand that ran to its end ended. Errors (exit 2) are `Err`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Succeeded,
    /// Exit 1: the backup failed, the probe failed, the checksum did not match.
    Failed,
}

impl Outcome {
    pub fn of(ok: bool) -> Self {
        if ok { Self::Succeeded } else { Self::Failed }
    }
}

/// Runs the subcommand.
pub async fn run(command: Command) -> Result<Outcome> {
    match command {
        Command::Hub {
            command: HubCommand::Prepare(args),
        } => hub::prepare(args),
        Command::Hub {
            command: HubCommand::Remove(args),
        } => hub::remove(args),
        Command::Hub {
            command: HubCommand::Serve(args),
        } => hub::serve(args).await,
        Command::Repo {
            command: RepoCommand::Probe(args),
        } => repo::probe(args),
        Command::Repo {
            command: RepoCommand::Commit(args),
        } => repo::commit(args).await,
        Command::Repo {
            command: RepoCommand::Prune(args),
        } => repo::prune(args).await,
        Command::Verify(args) => verify::run(args).await,
        Command::Copy(args) => copy::run(args).await,
        Command::Backup(args) => backup::run(*args).await,
        Command::NbdPing(args) => nbd_ping::run(args).await,
        Command::Checksum(args) => checksum::run(args).await,
        Command::Restore(args) => restore::run(args).await,
        Command::RestoreVm(args) => restore_vm::run(*args).await,
        Command::Files { command } => files::run(command).await,
    }
}

/// Input refused before anything was written, of a kind the operator acts on (a restore that
/// cannot work as asked is not retried).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub kind: sendense_contract::restore::Refusal,
    pub message: String,
}

/// An error refusing the input as `kind`.
pub fn refused(
    kind: sendense_contract::restore::Refusal,
    message: impl Into<String>,
) -> anyhow::Error {
    anyhow::Error::new(Refused {
        kind,
        message: message.into(),
    })
}

/// The kind of refusal anywhere in an error's chain.
pub fn refusal_of(e: &anyhow::Error) -> Option<sendense_contract::restore::Refusal> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Refused>())
        .map(|r| r.kind)
}

/// Writes a result file in full (a termination message file may be a bind mount: no rename).
pub fn write_result_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing --result-file {}", path.display()))
}

/// Prints `value` as one line of JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
