//! `BackupSchedule`: BackupJobs made at cron times, one per VM a selection names at each run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::backup_job::BackupMode;
use crate::common::LocalObjectRef;
use crate::repository::Retention;

/// Longest BackupSchedule name: it prefixes the names of its BackupJobs.
pub const MAX_NAME_LENGTH: usize = 20;

/// Backups that run themselves: at each time of `schedule` (in `timeZone`), the VMs `vms`
/// selects in the SourceNode's vCenter (looked up at that run, so new VMs are picked up) each
/// get a BackupJob into the Repository. The SourceNode's limits queue them; jobs of a run that
/// have not started when its `window` closes are removed and wait for the next run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "sendense.io",
    version = "v1alpha1",
    kind = "BackupSchedule",
    namespaced,
    status = "BackupScheduleStatus",
    shortname = "bs",
    category = "sendense",
    doc = "BackupJobs made at cron times for the VMware VMs a selection names at each run.",
    validation = Rule::new("size(self.metadata.name) <= 20")
        .message("metadata.name must be at most 20 characters: it prefixes the names of the schedule's BackupJobs"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS label: lowercase letters, digits and '-', starting with a letter, e.g. nightly"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "VMs", type_ = "integer", json_path = ".status.selectedVms"),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.activeJobs"),
    printcolumn(name = "Last Run", type_ = "date", json_path = ".status.lastScheduleTime"),
    printcolumn(name = "Next Run", type_ = "string", json_path = ".status.nextScheduleTime"),
    printcolumn(
        name = "Failing",
        type_ = "string",
        priority = 1,
        json_path = ".status.failingVms"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleSpec {
    /// When to run: a cron expression with five fields (minute hour day-of-month month
    /// day-of-week, e.g. `30 2 * * *`), six with a leading seconds field, or `@hourly`,
    /// `@daily`, `@weekly`, `@monthly`, `@yearly`.
    #[schemars(length(min = 1, max = 200))]
    pub schedule: String,
    /// The IANA time zone the schedule is read in (e.g. `Europe/Berlin`); `UTC` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// Make no new runs while true (a run missed meanwhile is not made up for when it is set
    /// back to false). Jobs already made go on.
    #[serde(default)]
    pub suspend: bool,
    /// The SourceNode (vCenter) whose VMs are selected, in this namespace.
    pub source_node_ref: LocalObjectRef,
    /// The Repository the backups go to, in this namespace.
    pub repository_ref: LocalObjectRef,
    /// Which VMs, evaluated at every run.
    pub vms: VmSelection,
    /// The BackupJobs' mode (`auto`: incremental when a usable previous backup exists);
    /// `fullEvery` turns some runs of a VM into full ones.
    #[serde(default)]
    pub mode: BackupMode,
    /// A periodic full backup, per VM: after this many backups in its chain since the last
    /// full, or when the last full is this many days old (whichever comes first). Bounds how
    /// long a chain grows, and so how long a restore of its newest point takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_every: Option<FullEvery>,
    /// How long after its scheduled time a run's job may still start. A job still waiting
    /// (queued by the SourceNode's limits, its VM busy) when the window closes is removed;
    /// the VM is backed up at the next run. Unset: no window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10080))]
    pub window_minutes: Option<i32>,
    /// What a run does for a VM whose previous job of this schedule has not ended: `Forbid`
    /// skips the VM this run (status says so), `Replace` cancels the previous job and makes a
    /// new one, `Allow` makes a new one that waits for the VM (one backup per VM at a time).
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A run missed (the operator was down) is made up for once, when the operator is back,
    /// if it is at most this many seconds late; older missed runs are skipped. Unset: the
    /// latest missed run is always made up for, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<i64>,
    /// Succeeded BackupJobs kept per VM (their restore points are kept regardless).
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_jobs_history_limit: i32,
    /// Failed BackupJobs kept per VM.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_jobs_history_limit: i32,
    /// Retention for the restore points of the VMs of this schedule, instead of the
    /// Repository's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Settings of every BackupJob the schedule makes.
    #[serde(default)]
    pub job: JobSettings,
}

fn default_successful_history() -> i32 {
    3
}

fn default_failed_history() -> i32 {
    1
}

/// VMs by any combination of these; a VM must match every criterion set. Templates are never
/// selected.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.names) || has(self.namePattern) || has(self.folder) || has(self.attribute)")
    .message("select VMs by at least one of names, namePattern, folder or attribute"))]
pub struct VmSelection {
    /// VM names (inventory names in the SourceNode's datacenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    pub names: Option<Vec<String>>,
    /// A shell-style pattern of VM names: `*`, `?`, `[abc]`, `[a-z]`, `[!x]` (e.g. `web-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name_pattern: Option<String>,
    /// A VM folder, as a path below the datacenter's VM folder (`prod/web`; `""` is the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub folder: Option<String>,
    /// With `folder`: also the VMs in its subfolders.
    #[serde(default)]
    pub include_subfolders: bool,
    /// A vCenter custom attribute the VM carries with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<AttributeSelector>,
}

/// A custom attribute and its value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttributeSelector {
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    #[schemars(length(max = 1024))]
    pub value: String,
}

/// When a VM's run is a full backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backups) || has(self.days)")
    .message("set backups, days or both"))]
pub struct FullEvery {
    /// A full after this many backups of the chain (the full included): 7 makes every
    /// seventh backup full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub backups: Option<i32>,
    /// A full when the chain's full is this many days old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub days: Option<i32>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ConcurrencyPolicy {
    #[default]
    Forbid,
    Replace,
    Allow,
}

/// The settings of the BackupJobs a schedule makes (see BackupJob's spec).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub retry_limit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 20, max = 86400))]
    pub progress_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2592000))]
    pub active_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
}

/// What the schedule did and will do.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleStatus {
    /// `Ready`: the schedule is valid and its SourceNode usable (reasons `InvalidSchedule`,
    /// `InvalidTimeZone`, `SourceNodeNotFound`, `VCenter...`, `Suspended`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The scheduled time of the latest run made (or skipped as missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next run (RFC 3339, in the schedule's zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// When a backup of this schedule last succeeded (any VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// VMs the latest run selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_vms: Option<i32>,
    /// The schedule's BackupJobs that have not ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_jobs: Option<i32>,
    /// Names of the VMs whose latest backup failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_vms: Vec<String>,
    /// Per VM: its latest job and backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["instanceUuid".into()]))]
    pub vms: Vec<ScheduledVm>,
    /// What the latest run did: how many jobs it made, and each VM it skipped and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One VM of a schedule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledVm {
    pub instance_uuid: String,
    pub name: String,
    /// Its newest BackupJob of this schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<String>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, or `WindowClosed` (removed unstarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_point: Option<String>,
    /// Failed backups in a row (0 after a success).
    #[serde(default)]
    pub consecutive_failures: i32,
    /// The job whose end `consecutiveFailures` last counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_job: Option<String>,
    /// The scheduled time of the first run that selected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_run: Option<Time>,
    /// The scheduled time of the latest run that selected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_selected_run: Option<Time>,
    /// The scheduled time of the run whose backup of it last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_run: Option<Time>,
    /// By when its next successful backup is due: the first run after its last successful one
    /// (or the first run that selected it) plus `windowMinutes`, or, without a window, the run
    /// after that one. Past it the alert SendenseBackupMissed fires. Unset while the schedule
    /// is suspended or when the latest run did not select the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_due: Option<Time>,
}

/// What one run did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub scheduled_time: Option<Time>,
    /// BackupJobs made.
    pub jobs_created: i32,
    /// VMs not backed up by this run, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedVm>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedVm {
    pub name: String,
    pub reason: String,
}
