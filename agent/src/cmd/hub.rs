//! `hub prepare` and `hub remove`: the disks' QCOW2 files before a backup, the directories of
//! attempts that did not commit after it.

use anyhow::Result;
use sendense_contract::cli::{HubPrepareArgs, HubRemoveArgs};

use super::{Outcome, print_json};
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
