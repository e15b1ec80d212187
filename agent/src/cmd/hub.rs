//! `hub prepare`, `hub serve` and `hub remove`: the disks' QCOW2 files before a backup, serving
//! and committing them, the directories of attempts that did not commit after it.

use anyhow::Result;
use sendense_contract::cli::{HubPrepareArgs, HubRemoveArgs, HubServeArgs};

use super::{Outcome, print_json, write_result_file};
use crate::hub;

/// Each disk in order; the first that cannot be prepared stops it (its error names the file).
pub fn prepare(args: HubPrepareArgs) -> Result<Outcome> {
    let prepared = args
        .disks
        .iter()
        .map(|d| hub::prepare(&d.file, d.size, d.backing.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    print_json(&prepared)?;
    Ok(Outcome::Succeeded)
}

pub fn remove(args: HubRemoveArgs) -> Result<Outcome> {
    let removed = hub::remove(&args.dirs)?;
    print_json(&removed)?;
    Ok(Outcome::Succeeded)
}

/// The result file gets the commit's JSON, or (the hub stopped serving before a commit was
/// asked) the reason as one line of text.
pub async fn serve(args: HubServeArgs) -> Result<Outcome> {
    let (text, ok) = match crate::serve::run(&args).await {
        Ok(result) => {
            if let Some(e) = &result.error {
                eprintln!("sendense-agent: commit failed: {e}");
            }
            (serde_json::to_string(&result)?, result.ok)
        }
        Err(why) => {
            eprintln!("sendense-agent: the hub stopped serving: {why}");
            (why, false)
        }
    };
    if let Some(f) = &args.result_file {
        write_result_file(f, &text)?;
    }
    println!("{text}");
    Ok(Outcome::of(ok))
}
