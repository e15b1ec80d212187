//! `hub prepare` and `hub remove`: one disk's QCOW2 before a backup, the directories of
//! attempts that did not commit after it.

use anyhow::Result;
use sendense_contract::cli::{HubPrepareArgs, HubRemoveArgs};

use super::{Outcome, print_json};
use crate::hub;

pub fn prepare(args: HubPrepareArgs) -> Result<Outcome> {
    let prepared = hub::prepare(&args.file, args.size, args.backing.as_deref())?;
    print_json(&prepared)?;
    Ok(Outcome::Succeeded)
}

pub fn remove(args: HubRemoveArgs) -> Result<Outcome> {
    let removed = hub::remove(&args.dirs)?;
    print_json(&removed)?;
    Ok(Outcome::Succeeded)
}
