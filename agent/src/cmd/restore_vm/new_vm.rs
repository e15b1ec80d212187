//! A new VM: created with the restore point's disk layout, then filled.

use super::*;

/// The annotation line that marks a VM made by the restore tagged `tag`.
pub(super) fn marker(tag: &str) -> String {
    format!("sendense.io/restore: {tag}")
}

pub(super) async fn into_new_vm(
    args: &RestoreVmArgs,
    vs: &VSphere,
    reader: &DiskReader,
    sources: &[Source],
    name: &str,
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let vm = match create(args, vs, sources, name).await {
        Ok(vm) => vm,
        Err(e) => return failure(e, true, started),
    };
    let outcome = async {
        let disks = vs
            .vm_info(&vm)
            .await
            .context("reading the new VM's disks")?
            .disks;
        let mut disks: Vec<VmDisk> = disks;
        disks.sort_by_key(|d| d.key);
        if disks.len() != sources.len() {
            anyhow::bail!(
                "the new VM has {} disks, {} were asked for",
                disks.len(),
                sources.len()
            );
        }
        // The new disks are the restored ones in device-key order.
        let pairs: Vec<(&Source, VmDisk, Plan)> = sources
            .iter()
            .zip(disks)
            .map(|(s, d)| {
                (
                    s,
                    d,
                    Plan {
                        areas: None,
                        full_reason: Some("a new VM".into()),
                    },
                )
            })
            .collect();
        Ok(write_disks(args, reader, &vm, &pairs, true, started, live).await)
    }
    .await;
    let mut result = match outcome {
        Ok(r) => r,
        Err(e) => failure(e, false, started),
    };
    if !result.ok {
        // A half-restored VM is worse than none: the next attempt creates it again.
        match vs.destroy_vm(&vm).await {
            Ok(()) => tracing::info!(vm = %vm.name, "destroyed the VM of the failed restore"),
            Err(e) => {
                let error = result.error.take().unwrap_or_default();
                result.error = Some(format!(
                    "{error}; destroying the new VM {} ({}) failed too: {e}",
                    vm.name, vm.moref
                ));
            }
        }
    }
    result.vm = Some(RestoredVm {
        name: vm.name.clone(),
        moref: vm.moref.clone(),
        instance_uuid: vm.instance_uuid.clone(),
        created: true,
        cbt_reset: false,
    });
    result
}

/// Creates the VM; a leftover of a failed attempt of the same restore is destroyed first.
async fn create(
    args: &RestoreVmArgs,
    vs: &VSphere,
    sources: &[Source],
    name: &str,
) -> Result<VmRef> {
    match vs
        .find_vm(&args.datacenter, &VmSelector::Name(name.to_owned()))
        .await
    {
        Ok(existing) => {
            let state = vs.vm_state(&existing).await?;
            let ours = args
                .tag
                .as_deref()
                .is_some_and(|t| state.annotation.lines().any(|l| l == marker(t)));
            if !ours || state.power_state != PowerState::PoweredOff {
                return Err(refused(
                    Refusal::VmExists,
                    format!(
                        "a VM named {name:?} exists in datacenter {:?}: choose another name for the new VM, or restore in place",
                        args.datacenter
                    ),
                ));
            }
            tracing::info!(
                vm = name,
                "destroying the VM a failed attempt of this restore left"
            );
            vs.destroy_vm(&existing)
                .await
                .context("destroying the VM a failed attempt left")?;
        }
        Err(VSphereError::NotFound(_)) => {}
        Err(e) => return Err(anyhow!(e).context(format!("looking for a VM named {name:?}"))),
    }
    let spec = NewVm {
        name: name.to_owned(),
        folder: args.folder.clone(),
        resource_pool: args.resource_pool.clone(),
        datastore: args.target_datastore.clone().unwrap_or_default(),
        hardware: Hardware {
            num_cpus: args.cpus,
            memory_mib: args.memory_mib,
            guest_id: args.guest_id.clone(),
            firmware: args.firmware.clone(),
        },
        disks: sources.iter().map(|s| s.capacity).collect(),
        annotation: args.tag.as_deref().map(marker).unwrap_or_default(),
        change_tracking: false,
    };
    vs.create_vm(&args.datacenter, &spec)
        .await
        .map_err(|e| not_found(e, Refusal::PlacementNotFound, "creating the VM"))
}
