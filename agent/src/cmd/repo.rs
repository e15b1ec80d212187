//! `repo probe`, `repo commit` and `repo prune`: the result goes to stdout and, on every
//! outcome, to `--result-file`.

use anyhow::Result;
use sendense_contract::cli::{RepoCommitArgs, RepoProbeArgs, RepoPruneArgs};
use sendense_contract::manifest::CommitResult;
use sendense_contract::probe::{FoundManifest, FoundUncommitted};

use super::{Outcome, write_result_file};
use crate::repo;

pub fn probe(args: RepoProbeArgs) -> Result<Outcome> {
    let orphans = repo::Orphans {
        remove: &args.remove_orphans,
        min_idle: std::time::Duration::from_secs(args.orphan_min_idle_seconds),
    };
    let (probed, found) = repo::probe(&args.dir, args.list_manifests, &orphans);
    for m in found.manifests {
        println!("{}", serde_json::to_string(&FoundManifest::new(m))?);
    }
    for u in found.uncommitted {
        println!(
            "{}",
            serde_json::to_string(&FoundUncommitted { uncommitted: u })?
        );
    }
    let text = serde_json::to_string(&probed)?;
    if let Some(f) = &args.result_file {
        write_result_file(f, &text)?;
    }
    println!("{text}");
    if let Some(e) = &probed.error {
        eprintln!("sendense-agent: repository probe failed: {e}");
    }
    Ok(Outcome::of(probed.ok))
}

pub async fn commit(args: RepoCommitArgs) -> Result<Outcome> {
    let result = match crate::commit::commit(&args.root, &args.manifest).await {
        Ok(r) => r,
        Err(e) => CommitResult::failed(e.to_string()),
    };
    let text = serde_json::to_string(&result)?;
    if let Some(f) = &args.result_file {
        write_result_file(f, &text)?;
    }
    println!("{text}");
    if let Some(e) = &result.error {
        eprintln!("sendense-agent: commit failed: {e}");
    }
    Ok(Outcome::of(result.ok))
}

pub async fn prune(args: RepoPruneArgs) -> Result<Outcome> {
    let result = crate::prune::prune(&args).await;
    let text = serde_json::to_string(&result)?;
    if let Some(f) = &args.result_file {
        write_result_file(f, &text)?;
    }
    println!("{text}");
    if let Some(e) = &result.error {
        eprintln!("sendense-agent: prune of {} failed: {e}", args.point);
    }
    Ok(Outcome::of(result.ok))
}
