//! The pure half of a schedule's run: which VMs it selects, each job's name and mode, what the
//! schedule's jobs say about each VM, which finished jobs go past the history limits, which
//! unstarted ones the window has closed on. No API server, no vCenter: unit-tested as is.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use sendense_crds::backup_job::{BackupJobSpec, BackupMode, Phase, VmSelector};
use sendense_crds::backup_schedule::{ScheduledVm, VmSelection};
use sendense_crds::{BackupJob, BackupSchedule, RestorePoint};
use sendense_vsphere::{VmListing, glob_match};

/// Label of a schedule's BackupJobs: the schedule's name.
pub const SCHEDULE_LABEL: &str = "sendense.io/schedule";
/// Label of a schedule's BackupJobs: the VM's instance UUID.
pub const VM_LABEL: &str = "sendense.io/vm-instance-uuid";
/// Annotation of a schedule's BackupJobs: the run's scheduled time (RFC 3339).
pub const SCHEDULED_AT: &str = "sendense.io/scheduled-time";

/// True when the VM matches every criterion the selection sets (templates never do).
pub fn selected(sel: &VmSelection, vm: &VmListing) -> bool {
    if vm.template {
        return false;
    }
    if let Some(names) = &sel.names
        && !names.contains(&vm.vm.name)
    {
        return false;
    }
    if let Some(p) = &sel.name_pattern
        && !glob_match(p, &vm.vm.name)
    {
        return false;
    }
    if let Some(f) = &sel.folder {
        let f = f.trim_matches('/');
        let inside = vm.folder == f
            || (sel.include_subfolders
                && (f.is_empty() || vm.folder.starts_with(&format!("{f}/"))));
        if !inside {
            return false;
        }
    }
    if let Some(a) = &sel.attribute
        && vm.attributes.get(&a.name) != Some(&a.value)
    {
        return false;
    }
    true
}

/// A DNS-label piece of a VM name: lowercase letters, digits and '-', at most `max` long.
fn slug(name: &str, max: usize) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    s.truncate(max);
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "vm".into() } else { s }
}

/// FNV-1a, 32 bits: a stable short hash (not for security).
fn hash8(s: &str) -> String {
    let mut h: u32 = 0x811c9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x01000193);
    }
    format!("{h:08x}")
}

/// The BackupJob of one VM at one run: `<schedule>-<vm>-<uuid hash>-<run>`, at most 52
/// characters, the same on every try (a run interrupted midway makes the rest, not twice).
pub fn job_name(schedule: &str, vm_name: &str, instance_uuid: &str, at: Timestamp) -> String {
    // Seconds since 2020 in base 36: 6 characters until 2090.
    let mut n = (at.as_second() - 1_577_836_800).max(0) as u64;
    let mut run = Vec::new();
    loop {
        run.push(std::char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    let run: String = run.into_iter().rev().collect();
    let head = slug(schedule, 20);
    let fixed = head.len() + 1 + 1 + 8 + 1 + run.len();
    let vm = slug(vm_name, 52usize.saturating_sub(fixed).max(1));
    format!(
        "{head}-{vm}-{}-{run}",
        hash8(&instance_uuid.to_ascii_lowercase())
    )
}

/// The mode of a VM's job at this run: the schedule's, or `full` when `fullEvery` says the
/// chain is long or old enough. The reason is given for a full.
pub fn mode_for(
    s: &BackupSchedule,
    points: &[RestorePoint],
    instance_uuid: &str,
    now: Timestamp,
) -> (BackupMode, Option<String>) {
    let mode = s.spec.mode;
    let Some(every) = &s.spec.full_every else {
        return (mode, None);
    };
    if mode == BackupMode::Full {
        return (mode, None);
    }
    let (len, full_at) = crate::chain::chain_of(points, &s.spec.repository_ref.name, instance_uuid);
    if len == 0 {
        return (mode, None);
    }
    if let Some(b) = every.backups
        && len >= b.max(1) as usize
    {
        return (
            BackupMode::Full,
            Some(format!(
                "fullEvery.backups {b}: the chain holds {len} backups"
            )),
        );
    }
    if let Some(d) = every.days {
        match full_at {
            Some(t) if (now.as_second() - t.as_second()) < i64::from(d) * 86_400 => {}
            Some(t) => {
                return (
                    BackupMode::Full,
                    Some(format!("fullEvery.days {d}: the chain's full is from {t}")),
                );
            }
            None => {
                return (
                    BackupMode::Full,
                    Some(format!(
                        "fullEvery.days {d}: the chain's full is not in the repository"
                    )),
                );
            }
        }
    }
    (mode, None)
}

fn phase(j: &BackupJob) -> Option<Phase> {
    j.status.as_ref().and_then(|s| s.phase)
}

pub fn ended(j: &BackupJob) -> bool {
    matches!(phase(j), Some(Phase::Succeeded | Phase::Failed))
}

/// Not started: no plan made (Pending, or not looked at yet).
pub fn unstarted(j: &BackupJob) -> bool {
    matches!(phase(j), None | Some(Phase::Pending))
}

/// The run a job belongs to.
pub fn scheduled_at(j: &BackupJob) -> Option<Timestamp> {
    j.annotations()
        .get(SCHEDULED_AT)
        .and_then(|t| t.parse().ok())
}

fn vm_uuid(j: &BackupJob) -> String {
    j.labels().get(VM_LABEL).cloned().unwrap_or_default()
}

/// Jobs by VM (instance UUID), newest run first.
pub fn by_vm(jobs: &[BackupJob]) -> BTreeMap<String, Vec<&BackupJob>> {
    let mut m: BTreeMap<String, Vec<&BackupJob>> = BTreeMap::new();
    for j in jobs {
        m.entry(vm_uuid(j)).or_default().push(j);
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| {
            scheduled_at(b)
                .cmp(&scheduled_at(a))
                .then_with(|| b.name_any().cmp(&a.name_any()))
        });
    }
    m
}

/// Unstarted jobs whose run's window has closed by `now`.
pub fn window_closed<'a>(
    s: &BackupSchedule,
    jobs: &'a [BackupJob],
    now: Timestamp,
) -> Vec<&'a BackupJob> {
    let Some(minutes) = s.spec.window_minutes else {
        return Vec::new();
    };
    jobs.iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none() && unstarted(j))
        .filter(|j| {
            scheduled_at(j)
                .is_some_and(|t| now.as_second() >= t.as_second() + i64::from(minutes) * 60)
        })
        .collect()
}

/// Finished jobs past the history limits, per VM, oldest first.
pub fn past_history<'a>(s: &BackupSchedule, jobs: &'a [BackupJob]) -> Vec<&'a BackupJob> {
    let mut out = Vec::new();
    for list in by_vm(jobs).values() {
        for (want, limit) in [
            (Phase::Succeeded, s.spec.successful_jobs_history_limit),
            (Phase::Failed, s.spec.failed_jobs_history_limit),
        ] {
            let done: Vec<&&BackupJob> = list.iter().filter(|j| phase(j) == Some(want)).collect();
            out.extend(done.iter().skip(limit.max(0) as usize).map(|j| **j));
        }
    }
    out
}

/// The per-VM status, from the previous one and the schedule's jobs.
pub fn vm_status(
    previous: &[ScheduledVm],
    jobs: &[BackupJob],
    names: &BTreeMap<String, String>,
) -> Vec<ScheduledVm> {
    let mut out: BTreeMap<String, ScheduledVm> = previous
        .iter()
        .map(|v| (v.instance_uuid.clone(), v.clone()))
        .collect();
    for (uuid, list) in by_vm(jobs) {
        if uuid.is_empty() {
            continue;
        }
        let v = out.entry(uuid.clone()).or_insert_with(|| ScheduledVm {
            instance_uuid: uuid.clone(),
            ..Default::default()
        });
        if let Some(n) = names.get(&uuid) {
            v.name = n.clone();
        }
        if let Some(first) = list.iter().filter_map(|j| scheduled_at(j)).min()
            && v.first_run.as_ref().is_none_or(|t| first < t.0)
        {
            v.first_run = Some(Time(first));
        }
        // Successes: the newest succeeded job's completion and restore point.
        for j in &list {
            if phase(j) == Some(Phase::Succeeded)
                && let Some(st) = j.status.as_ref()
            {
                let done = st.completion_time.clone();
                if done.as_ref().map(|t| t.0) > v.last_success_time.as_ref().map(|t| t.0) {
                    v.last_success_time = done;
                    v.last_restore_point = st.restore_point.clone();
                    if let Some(run) = scheduled_at(j) {
                        v.last_successful_run = Some(Time(run));
                    }
                }
                break;
            }
        }
        let Some(newest) = list.first() else { continue };
        if v.name.is_empty() {
            v.name = newest
                .status
                .as_ref()
                .and_then(|s| s.vm_name.clone())
                .unwrap_or_default();
        }
        // A run whose job the window removed stays the VM's latest until a later run's job.
        let closed = v.last_result.as_deref() == Some("WindowClosed")
            && scheduled_at(newest) <= v.last_selected_run.as_ref().map(|t| t.0);
        if closed {
            continue;
        }
        v.last_job = Some(newest.name_any());
        v.last_result = Some(
            match phase(newest) {
                Some(Phase::Succeeded) => "Succeeded",
                Some(Phase::Failed) => "Failed",
                Some(Phase::Running) => "Running",
                _ => "Pending",
            }
            .into(),
        );
        // Each ended job counted once: a failure adds one, a success resets.
        if ended(newest) && v.counted_job.as_deref() != Some(newest.name_any().as_str()) {
            v.counted_job = Some(newest.name_any());
            if phase(newest) == Some(Phase::Failed) {
                v.consecutive_failures += 1;
            } else {
                v.consecutive_failures = 0;
            }
        }
    }
    out.into_values().collect()
}

/// Records that the run `at` selected the VM (its entry made when new); returns the entry.
pub fn mark_selected<'a>(
    vms: &'a mut Vec<ScheduledVm>,
    uuid: &str,
    name: &str,
    at: Timestamp,
) -> &'a mut ScheduledVm {
    let i = match vms.iter().position(|x| x.instance_uuid == uuid) {
        Some(i) => i,
        None => {
            vms.push(ScheduledVm {
                instance_uuid: uuid.to_owned(),
                ..Default::default()
            });
            vms.len() - 1
        }
    };
    let v = &mut vms[i];
    v.name = name.to_owned();
    v.first_run.get_or_insert(Time(at));
    v.last_selected_run = Some(Time(at));
    v
}

/// When VM `v`'s next successful backup is due (see `ScheduledVm::backup_due`): None when
/// the schedule is suspended, has not run (`last_run`), or the latest run that listed the VMs
/// did not select this one.
pub fn backup_due(
    s: &BackupSchedule,
    cron: &super::cron::Cron,
    tz: &jiff::tz::TimeZone,
    v: &ScheduledVm,
    last_run: Option<Timestamp>,
) -> Option<Timestamp> {
    if s.spec.suspend || v.last_selected_run.is_none() || last_run.is_none() {
        return None;
    }
    let first = match &v.last_successful_run {
        Some(ok) => cron.next_after(ok.0, tz)?,
        None => v.first_run.as_ref()?.0,
    };
    match s.spec.window_minutes {
        Some(m) => first
            .checked_add(jiff::SignedDuration::from_mins(i64::from(m)))
            .ok(),
        None => cron.next_after(first, tz),
    }
}

/// The newest success of any VM.
pub fn last_success(vms: &[ScheduledVm]) -> Option<Time> {
    vms.iter()
        .filter_map(|v| v.last_success_time.clone())
        .max_by_key(|t| t.0)
}

/// The BackupJob of VM `v` at the run `at`, owned by the schedule.
pub fn new_job(
    s: &BackupSchedule,
    name: &str,
    v: &sendense_vsphere::VmListing,
    mode: BackupMode,
    why_full: Option<&str>,
    at: Timestamp,
) -> BackupJob {
    let uuid = v.vm.instance_uuid.to_ascii_lowercase();
    let settings = &s.spec.job;
    let mut job = BackupJob::new(
        name,
        BackupJobSpec {
            vm: VmSelector {
                name: None,
                instance_uuid: Some(uuid.clone()),
            },
            source_node_ref: s.spec.source_node_ref.clone(),
            repository_ref: s.spec.repository_ref.clone(),
            mode,
            disks: None,
            quiesce: settings.quiesce.unwrap_or(false),
            active_deadline_seconds: settings.active_deadline_seconds,
            progress_deadline_seconds: settings
                .progress_deadline_seconds
                .unwrap_or(sendense_crds::backup_job::DEFAULT_PROGRESS_DEADLINE_SECONDS),
            verify: settings.verify.unwrap_or(true),
            retry_limit: settings.retry_limit.unwrap_or(3),
        },
    );
    job.metadata.namespace = s.namespace();
    job.metadata.labels = Some(
        [
            (SCHEDULE_LABEL.to_owned(), s.name_any()),
            (VM_LABEL.to_owned(), uuid),
        ]
        .into(),
    );
    let mut annotations: BTreeMap<String, String> =
        [(SCHEDULED_AT.to_owned(), at.to_string())].into();
    annotations.insert("sendense.io/vm-name".into(), v.vm.name.clone());
    if let Some(w) = why_full {
        annotations.insert("sendense.io/full-reason".into(), w.to_owned());
    }
    job.metadata.annotations = Some(annotations);
    job.metadata.owner_references = s.controller_owner_ref(&()).map(|o| vec![o]);
    job
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
