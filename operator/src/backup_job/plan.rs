//! Step 2 of a pending job, pure: from what it refers to (the dereferenced struct) to a plan (the
//! disks, their chain parent and full-or-incremental with the reason, one port per disk, each
//! disk's file) or the reason it must wait. No API server, no vCenter: unit-tested as is.

use std::collections::BTreeMap;

use kube::ResourceExt;
use sendense_crds::backup_job::{CopyKind, DiskStatus, Phase};
use sendense_crds::{BackupJob, SourceNode};

use super::dereference::{Dereferenced, Disk};
use super::outcome::{Wait, WaitReason};
use crate::chain::{self, DiskPlan};
use crate::ports;
use crate::resources::{attempt_dir, disk_file};

/// Everything decided before any pod exists; recorded in status as one write.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub vm_name: String,
    pub vm_instance_uuid: String,
    pub vm_hardware: Option<sendense_crds::common::VmHardware>,
    /// The RestorePoint the incremental disks are layered on.
    pub chain_parent: Option<String>,
    /// One entry per disk: capacity, port, file, full or incremental and why.
    pub disks: Vec<DiskStatus>,
    /// Device key -> hub port.
    pub ports: BTreeMap<i32, i32>,
}

impl Plan {
    /// "2000:10100,2001:10101".
    pub fn ports_text(&self) -> String {
        self.ports
            .iter()
            .map(|(k, p)| format!("{k}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The disks `spec.disks` selects (all when it names none).
fn selected_disks(job: &BackupJob, vm: &str, disks: &[Disk]) -> Result<Vec<Disk>, Wait> {
    let Some(keys) = &job.spec.disks else {
        return non_empty(vm, disks.to_vec());
    };
    let missing: Vec<i32> = keys
        .iter()
        .filter(|k| !disks.iter().any(|d| d.key == **k))
        .copied()
        .collect();
    if !missing.is_empty() {
        let have: Vec<i32> = disks.iter().map(|d| d.key).collect();
        return Err(Wait::new(
            WaitReason::DiskNotFound,
            format!(
                "VM {vm} has no disk with device key {missing:?} (its disks: {have:?}): fix spec.disks"
            ),
        ));
    }
    non_empty(
        vm,
        disks
            .iter()
            .filter(|d| keys.contains(&d.key))
            .cloned()
            .collect(),
    )
}

fn non_empty(vm: &str, disks: Vec<Disk>) -> Result<Vec<Disk>, Wait> {
    if disks.is_empty() {
        return Err(Wait::new(
            WaitReason::NoDisks,
            format!("VM {vm} has no virtual disks to back up"),
        ));
    }
    Ok(disks)
}

/// Another job of the same SourceNode backing up the same VM right now.
fn busy_with<'a>(job: &BackupJob, refs: &'a Dereferenced) -> Option<&'a BackupJob> {
    let (vm, source_node) = (refs.vm_name.as_str(), refs.source_node.name_any());
    refs.jobs.iter().find(|j| {
        j.metadata.name != job.metadata.name
            && j.spec.source_node_ref.name == source_node
            && j.status.as_ref().is_some_and(|s| {
                matches!(s.phase, Some(Phase::Running)) && s.vm_name.as_deref() == Some(vm)
            })
    })
}

/// The datastore of a disk's backing file (`"[ds1] vm/vm.vmdk"` -> `ds1`).
fn datastore(d: &Disk) -> Option<String> {
    sendense_vsphere::parse_datastore_path(&d.file_name).map(|(ds, _)| ds)
}

/// The SourceNode's concurrency limits. Jobs of the same SourceNode that run (planned, not
/// ended) take the slots. For `maxConcurrentJobs`, first come first served: jobs waiting for
/// a slot (their Running reason says so) and created before this one are served before it,
/// so a steady stream of new jobs cannot starve an old one; a job waiting for another reason
/// (its VM busy, ...) holds no place in the queue.
fn limits(job: &BackupJob, refs: &Dereferenced, disks: &[Disk]) -> Result<(), Wait> {
    let jobs: Vec<&BackupJob> = refs.jobs.iter().collect();
    if let Some(wait) = slot_wait(job, &refs.source_node, &jobs, 0) {
        return Err(wait);
    }
    let limits = refs.source_node.spec.limits.as_ref();
    let source_node = refs.source_node.name_any();
    let running = running_on(job, &source_node, &jobs);
    let Some(per_ds) = limits.and_then(|l| l.max_concurrent_jobs_per_datastore) else {
        return Ok(());
    };
    let per_ds = per_ds.max(1) as usize;
    let mine: std::collections::BTreeSet<String> = disks.iter().filter_map(datastore).collect();
    // No queue order here: the datastores a queued job waits for are not known until it is
    // planned, and one job waiting for a busy datastore must not hold back another's.
    for ds in &mine {
        let on_it = running
            .iter()
            .filter(|j| {
                j.status.as_ref().is_some_and(|s| {
                    s.disks
                        .iter()
                        .any(|d| d.datastore.as_deref() == Some(ds.as_str()))
                })
            })
            .count();
        // A message that stays the same while the job waits (see `slot_wait`).
        if on_it >= per_ds {
            return Err(Wait::new(
                WaitReason::DatastoreLimit,
                format!(
                    "queued: at most {per_ds} backups read datastore {ds} at once and they are taken; this one starts when one ends (spec.limits.maxConcurrentJobsPerDatastore of SourceNode {source_node})"
                ),
            ));
        }
    }
    Ok(())
}

/// The other jobs of `source_node` that run (hold a slot).
fn running_on<'a>(
    job: &BackupJob,
    source_node: &str,
    jobs: &[&'a BackupJob],
) -> Vec<&'a BackupJob> {
    jobs.iter()
        .copied()
        .filter(|j| {
            j.metadata.name != job.metadata.name && j.spec.source_node_ref.name == source_node
        })
        .filter(|j| {
            j.status
                .as_ref()
                .is_some_and(|s| matches!(s.phase, Some(Phase::Running)))
        })
        .collect()
}

/// True for a job waiting in its SourceNode's queue (`maxConcurrentJobs`).
pub fn in_queue(j: &BackupJob) -> bool {
    j.metadata.deletion_timestamp.is_none()
        && j.status.as_ref().is_some_and(|s| {
            matches!(s.phase, None | Some(Phase::Pending))
                && s.conditions.iter().any(|c| {
                    c.type_ == "Running" && c.reason == WaitReason::SourceNodeLimit.as_str()
                })
        })
}

/// The SourceNode's `maxConcurrentJobs`, at least 1.
pub fn max_jobs(sn: &SourceNode) -> usize {
    sn.spec
        .limits
        .as_ref()
        .map_or(
            sendense_crds::source_node::DEFAULT_MAX_CONCURRENT_JOBS,
            |l| l.max_concurrent_jobs,
        )
        .max(1) as usize
}

/// `maxConcurrentJobs`: the job waits while the jobs of its SourceNode that run, and those
/// queued before it, fill the slots. First come first served (creation time, then name). The
/// message does not change while the job waits (no running names, no position): a status
/// write per change would re-run every queued job's reconcile (the queue's size is in the
/// `sendense_backupjobs_queued` metric).
/// `in_flight`: jobs that take a slot not yet seen in `jobs` (admitted by this process, their
/// plan not yet in the cache: `Caches::admit`); 0 for the fresh lists.
pub fn slot_wait(
    job: &BackupJob,
    sn: &SourceNode,
    jobs: &[&BackupJob],
    in_flight: usize,
) -> Option<Wait> {
    let source_node = sn.name_any();
    let limit = max_jobs(sn);
    let me = (job.metadata.creation_timestamp.clone(), job.name_any());
    let running = running_on(job, &source_node, jobs).len();
    let ahead = jobs
        .iter()
        .filter(|j| {
            j.metadata.name != job.metadata.name && j.spec.source_node_ref.name == source_node
        })
        .filter(|j| in_queue(j) && (j.metadata.creation_timestamp.clone(), j.name_any()) < me)
        .count();
    (running + ahead + in_flight >= limit).then(|| {
        Wait::new(
            WaitReason::SourceNodeLimit,
            format!(
                "queued: SourceNode {source_node} runs at most {limit} backups at once and they are taken; this one starts when a slot frees, first come first served (spec.limits.maxConcurrentJobs)"
            ),
        )
    })
}

/// One disk's status entry as planned.
fn disk_status(
    job: &BackupJob,
    refs: &Dereferenced,
    d: &Disk,
    port: Option<i32>,
    plan: Option<&DiskPlan>,
) -> DiskStatus {
    // The first attempt's directory; a retry moves to its own (status::retrying).
    let dir = attempt_dir(
        &refs.repository.spec.layout.directory,
        &job.namespace().unwrap_or_default(),
        &refs.vm_name,
        &job.name_any(),
        &job.uid().unwrap_or_default(),
        1,
    );
    let mut s = DiskStatus {
        device_key: d.key,
        label: Some(d.label.clone()),
        capacity_bytes: Some(d.capacity as i64),
        port,
        datastore: datastore(d),
        file: Some(disk_file(&dir, d.key)),
        ..Default::default()
    };
    match plan {
        Some(DiskPlan::Incremental {
            parent,
            parent_file,
            change_id,
        }) => {
            s.copy = Some(CopyKind::Incremental);
            s.copy_reason = Some(format!("changes since restore point {parent}"));
            s.backing_file = Some(parent_file.clone());
            s.change_id_used = Some(change_id.clone());
        }
        Some(DiskPlan::Full { reason }) => {
            s.copy = Some(CopyKind::Full);
            s.copy_reason = Some(reason.clone());
        }
        None => {}
    }
    s
}

/// Step 2: the plan, or why the job waits.
pub fn plan(job: &BackupJob, refs: &Dereferenced) -> Result<Plan, Wait> {
    let vm = refs.vm_name.as_str();
    let disks = selected_disks(job, vm, &refs.disks)?;
    if let Some(other) = busy_with(job, refs) {
        return Err(Wait::new(
            WaitReason::VmBusy,
            format!(
                "BackupJob {} is backing up VM {vm} now; this one starts when it ends",
                other.name_any()
            ),
        ));
    }
    if let Some(p) = refs.restore_points.iter().find(|p| {
        p.spec
            .vm
            .instance_uuid
            .eq_ignore_ascii_case(&refs.vm_instance_uuid)
            && crate::retention::prune::being_pruned(p)
    }) {
        return Err(Wait::new(
            WaitReason::VmBusy,
            format!(
                "retention is merging restore point {} out of VM {vm}'s chain; this backup starts when it is done",
                p.name_any()
            ),
        ));
    }
    limits(job, refs, &disks)?;
    let parent = chain::parent(job, &refs.vm_instance_uuid, &refs.restore_points);
    let capacities: BTreeMap<i32, u64> = disks.iter().map(|d| (d.key, d.capacity)).collect();
    let (length, _) = chain::chain_of(
        &refs.restore_points,
        &job.spec.repository_ref.name,
        &refs.vm_instance_uuid,
    );
    let max_length = refs.repository.spec.max_chain_length.max(1) as usize;
    let plans = chain::plan(job, parent, (length, max_length), &capacities)
        .map_err(|e| Wait::new(WaitReason::IncrementalNotPossible, e.to_string()))?;
    let keys: Vec<i32> = capacities.keys().copied().collect();
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let used = ports::in_use(&refs.jobs, &ns, &job.spec.repository_ref.name, Some(&name));
    let alloc = match ports::held(job, &keys) {
        Some(a) => a,
        None => ports::allocate(&refs.repository.spec.hub.port_range, &used, &keys)
            .map_err(|e| Wait::new(WaitReason::PortsExhausted, e.to_string()))?,
    };
    Ok(Plan {
        vm_name: vm.to_owned(),
        vm_instance_uuid: refs.vm_instance_uuid.clone(),
        vm_hardware: refs.vm_hardware.clone(),
        chain_parent: plans.values().find_map(|p| match p {
            DiskPlan::Incremental { parent, .. } => Some(parent.clone()),
            DiskPlan::Full { .. } => None,
        }),
        disks: disks
            .iter()
            .map(|d| disk_status(job, refs, d, alloc.get(&d.key).copied(), plans.get(&d.key)))
            .collect(),
        ports: alloc,
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
