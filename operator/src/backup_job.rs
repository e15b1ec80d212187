//! The BackupJob controller: the data flow of one backup, as a state machine whose state lives
//! only in the job's status and in its pods (deterministic names, labelled with the attempt), so
//! an operator restart resumes where the last one stopped.
//!
//! Pending: resolve the SourceNode and Repository, look the VM up in vCenter, choose the chain
//! parent and full/incremental per disk, allocate ports (serialized, read fresh from the API)
//! and record all of it in status -> Running: hub Service and Pod; once the hub is Ready, the
//! agent Pod; progress polled from the agent -> Succeeded (changeIds recorded, pods removed) or
//! a failed attempt (pods removed, retried up to spec.retryLimit) -> Failed (snapshot removal
//! confirmed in vCenter, partial QCOW2 files removed by a short cleanup pod).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Api, Client, Resource, ResourceExt};
use sendense_crds::backup_job::{CopyKind, DiskStatus, Phase, SnapshotStatus};
use sendense_crds::common::human_bytes;
use sendense_crds::conditions::{self, FALSE, TRUE};
use sendense_crds::{BackupJob, BackupJobStatus, Repository, SourceNode};
use sendense_vsphere::{VSphereError, VmSelector};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::{agent_name, agent_pod};
use crate::chain::{self, DiskPlan};
use crate::hub::{HubDisk, PodSettings, REPOSITORY_MOUNT, hub_name, hub_pod, hub_service, labels};
use crate::metrics::Metrics;
use crate::ports;
use crate::source_node::{self, MANAGER};

/// Label carrying the attempt a pod belongs to; pods of an earlier attempt are removed first.
pub const ATTEMPT_LABEL: &str = "sendense.io/attempt";
/// Port of the agent's progress endpoint (on its pod IP).
pub const PROGRESS_PORT: u16 = 9090;
/// Conditions of a BackupJob.
pub const RUNNING: &str = "Running";
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";
pub const SNAPSHOT_REMOVED: &str = "SnapshotRemoved";
pub const FILES_REMOVED: &str = "PartialFilesRemoved";

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
    /// Deadline of each vCenter call the operator makes (VM lookup, snapshot confirmation).
    pub vcenter_timeout: Duration,
    /// Serializes port allocation in this process. Across processes and restarts the truth is
    /// the jobs' status, read fresh from the API server under this lock and written before it
    /// is released.
    pub allocation: tokio::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
        }
    }
}

/// The agent's JSON result (its termination message), the fields the operator reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AgentResult {
    pub ok: bool,
    pub vm: Option<String>,
    pub snapshot: Option<AgentSnapshot>,
    pub disks: Vec<AgentDisk>,
    pub error: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AgentSnapshot {
    pub id: String,
    pub name: String,
    pub removed: bool,
    pub removal_error: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AgentDisk {
    pub key: i32,
    pub copy: String,
    pub reason: String,
    pub change_id_used: String,
    pub change_id_reached: Option<String>,
    pub bytes_to_copy: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub error: Option<String>,
}

/// The agent's live progress (`GET /progress`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct AgentProgress {
    pub stage: String,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
    pub disks: Vec<DiskProgress>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskProgress {
    pub key: i32,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Replaces characters a path component should not carry.
fn path_component(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match out.as_str() {
        "" | "." | ".." => "_".into(),
        _ => out,
    }
}

/// Where a disk's QCOW2 of this job lives, relative to the repository volume's root:
/// the repository's layout with `{namespace}`, `{vm}` and `{deviceKey}` filled in, then
/// `<job>.qcow2`.
pub fn disk_file(layout: &str, namespace: &str, vm: &str, key: i32, job: &str) -> String {
    let dir = layout
        .replace("{namespace}", &path_component(namespace))
        .replace("{vm}", &path_component(vm))
        .replace("{deviceKey}", &key.to_string());
    let dir: Vec<&str> = dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
        .collect();
    format!("{}/{}.qcow2", dir.join("/"), path_component(job))
}

/// The claim a repository's data lives on.
pub fn claim_name(repo: &Repository) -> String {
    match &repo.spec.storage.persistent_volume_claim {
        Some(c) => c.claim_name.clone(),
        None => format!("{}-data", repo.name_any()),
    }
}

/// The hub's disks as recorded in status.
pub fn hub_disks(status: &BackupJobStatus) -> Vec<HubDisk> {
    status
        .disks
        .iter()
        .map(|d| HubDisk {
            key: d.device_key,
            port: d.port.unwrap_or_default(),
            file: d.file.clone().unwrap_or_default(),
            size: d.capacity_bytes.unwrap_or_default().max(0) as u64,
            backing: d.backing_file.clone(),
        })
        .collect()
}

/// Targets of the agent: each disk's export on the hub pod.
pub fn targets(status: &BackupJobStatus, hub_ip: &str) -> BTreeMap<i32, String> {
    status
        .disks
        .iter()
        .map(|d| {
            (
                d.device_key,
                format!("nbd://{hub_ip}:{}/", d.port.unwrap_or_default()),
            )
        })
        .collect()
}

/// Change IDs the incremental disks start from.
pub fn base_change_ids(status: &BackupJobStatus) -> BTreeMap<i32, String> {
    status
        .disks
        .iter()
        .filter(|d| d.copy == Some(CopyKind::Incremental))
        .filter_map(|d| d.change_id_used.clone().map(|c| (d.device_key, c)))
        .collect()
}

/// "42% (1.2 GiB of 2.8 GiB)".
pub fn progress_text(copied: u64, total: u64) -> String {
    let pct = (copied.min(total) * 100).checked_div(total).unwrap_or(100);
    format!("{pct}% ({} of {})", human_bytes(copied), human_bytes(total))
}

/// Pause before attempt `attempt` (2, 3, ...): 10 s, 20 s, 40 s, ... at most 5 minutes.
pub fn retry_backoff(attempt: i32) -> Duration {
    let exp = (attempt - 2).clamp(0, 5) as u32;
    Duration::from_secs((10u64 << exp).min(300))
}

/// The attempt a pod was created for.
fn attempt_of(pod: &Pod) -> Option<i32> {
    pod.labels().get(ATTEMPT_LABEL)?.parse().ok()
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == TRUE))
}

/// Why a pod failed, when it did: the pod's phase Failed, or any container (init containers
/// included) that terminated with a non-zero code.
pub fn pod_failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            let msg = t.message.as_deref().unwrap_or("").trim();
            return Some(format!(
                "container {} exited with code {}{}{}",
                cs.name,
                t.exit_code,
                if msg.is_empty() { "" } else { ": " },
                msg.chars().take(600).collect::<String>()
            ));
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "pod failed: {} {}",
            status.reason.as_deref().unwrap_or(""),
            status.message.as_deref().unwrap_or("")
        ));
    }
    None
}

/// The termination message of a pod's first container.
pub fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|cs| cs.state.as_ref()?.terminated.as_ref()?.message.clone())
}

/// Parses the agent's result from its termination message.
pub fn parse_result(message: &str) -> Option<AgentResult> {
    serde_json::from_str(message.trim()).ok()
}

/// The status of a job whose agent reported success.
pub fn succeeded_status(
    mut st: BackupJobStatus,
    result: &AgentResult,
    generation: Option<i64>,
    at: Time,
) -> BackupJobStatus {
    let mut total = 0u64;
    let mut written = 0u64;
    for d in st.disks.iter_mut() {
        if let Some(r) = result.disks.iter().find(|r| r.key == d.device_key) {
            d.change_id_reached = r.change_id_reached.clone();
            if !r.change_id_used.is_empty() {
                d.change_id_used = Some(r.change_id_used.clone());
            }
            d.bytes_to_copy = Some(r.bytes_to_copy as i64);
            d.bytes_copied = Some(r.bytes_to_copy as i64);
            d.copy = match r.copy.as_str() {
                "incremental" => Some(CopyKind::Incremental),
                "full" => Some(CopyKind::Full),
                _ => d.copy,
            };
            if !r.reason.is_empty() {
                d.copy_reason = Some(r.reason.clone());
            }
            total += r.bytes_to_copy;
            written += r.bytes_written;
        }
    }
    st.phase = Some(Phase::Succeeded);
    st.completion_time = Some(at.clone());
    st.bytes_to_copy = Some(total as i64);
    st.bytes_copied = Some(total as i64);
    st.progress = Some("100%".into());
    st.size = Some(human_bytes(written));
    if let Some(s) = &result.snapshot {
        st.snapshot = Some(SnapshotStatus {
            id: Some(s.id.clone()),
            name: Some(s.name.clone()),
            removed: s.removed,
        });
    }
    let disks = st.disks.len();
    let incremental = st
        .disks
        .iter()
        .filter(|d| d.copy == Some(CopyKind::Incremental))
        .count();
    let summary = format!(
        "backed up {disks} disk(s) ({incremental} incremental): {} read from the snapshot, {} written",
        human_bytes(total),
        human_bytes(written)
    );
    let set = |st: &mut BackupJobStatus, t: &str, s: &str, r: &str, m: String| {
        conditions::set_condition(
            &mut st.conditions,
            conditions::condition(t, s, r, m, generation, at.clone()),
        );
    };
    set(&mut st, RUNNING, FALSE, "Completed", summary.clone());
    set(&mut st, COMPLETE, TRUE, "BackupSucceeded", summary);
    set(
        &mut st,
        SNAPSHOT_REMOVED,
        TRUE,
        "Removed",
        "the backup's snapshot was removed".into(),
    );
    st
}

/// Reads the agent's progress endpoint, with a short deadline.
pub async fn fetch_progress(addr: &str) -> Result<AgentProgress, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET /progress HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        (&mut s)
            .take(256 * 1024)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("no HTTP header in the answer")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(format!(
                "answered {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        serde_json::from_str(body).map_err(|e| format!("progress JSON: {e}"))
    };
    match tokio::time::timeout(Duration::from_secs(2), fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer from {addr} within 2s")),
    }
}

/// Status changes of one reconcile, written at the end only if anything changed.
struct Update<'a> {
    job: &'a BackupJob,
    st: BackupJobStatus,
}

impl<'a> Update<'a> {
    fn new(job: &'a BackupJob) -> Self {
        let mut st = job.status.clone().unwrap_or_default();
        st.observed_generation = job.metadata.generation;
        Self { job, st }
    }

    fn cond(&mut self, type_: &str, status: &str, reason: &str, message: impl Into<String>) {
        conditions::set_condition(
            &mut self.st.conditions,
            conditions::condition(
                type_,
                status,
                reason,
                message,
                self.job.metadata.generation,
                now(),
            ),
        );
    }

    /// Writes the status (server-side apply, the operator owns all of it) when it changed,
    /// and publishes an Event for every condition whose status or reason changed.
    async fn write(self, ctx: &Context) -> Result<(), Error> {
        let old = self.job.status.clone().unwrap_or_default();
        if old == self.st {
            return Ok(());
        }
        let ns = self.job.namespace().unwrap_or_default();
        let patch = serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1",
            "kind": "BackupJob",
            "status": self.st,
        });
        Api::<BackupJob>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &self.job.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        for c in &self.st.conditions {
            let before = conditions::find(&old.conditions, &c.type_);
            if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
                continue;
            }
            let warning = (c.type_ == FAILED && c.status == TRUE)
                || (c.type_ == SNAPSHOT_REMOVED && c.status == FALSE)
                || (c.type_ == FILES_REMOVED && c.status == FALSE && c.reason != "Pending")
                || (c.type_ == RUNNING
                    && c.status == FALSE
                    && !matches!(c.reason.as_str(), "Completed" | "Failed"));
            if c.type_ == RUNNING
                && c.status == FALSE
                && matches!(c.reason.as_str(), "Failed" | "Completed")
            {
                continue; // the Failed or Complete condition's Event says it
            }
            crate::events::publish(
                &ctx.recorder,
                &self.job.object_ref(&()),
                warning,
                &c.reason,
                &c.message,
                "Backup",
            )
            .await;
        }
        Ok(())
    }
}

/// The job waits (phase Pending) for something outside it; says what in the Running condition.
async fn wait(
    job: &BackupJob,
    ctx: &Context,
    reason: &str,
    message: String,
    retry: Duration,
) -> Result<Action, Error> {
    let mut u = Update::new(job);
    u.st.phase = Some(Phase::Pending);
    u.cond(RUNNING, FALSE, reason, message);
    u.write(ctx).await?;
    Ok(Action::requeue(retry))
}

pub async fn reconcile(job: Arc<BackupJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("backupjob");
    match job.status.as_ref().and_then(|s| s.phase) {
        Some(Phase::Succeeded | Phase::Failed) => finished(&job, &ctx).await,
        _ if job
            .status
            .as_ref()
            .is_some_and(|s| !s.disks.is_empty() && s.disks.iter().all(|d| d.port.is_some())) =>
        {
            run(&job, &ctx).await
        }
        _ => plan(&job, &ctx).await,
    }
}

pub fn error_policy(job: Arc<BackupJob>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), "reconcile failed: {err}");
    ctx.metrics
        .reconcile_failures
        .with_label_values(&["backupjob", err.metric_label()])
        .inc();
    Action::requeue(Duration::from_secs(10))
}

fn ready_problem(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> String {
    match conditions::find(conds, "Ready") {
        Some(c) => format!("{}: {}", c.reason, c.message),
        None => "not probed yet".into(),
    }
}

/// A referenced SourceNode or Repository, when it exists and is Ready; else the reason
/// (`<Kind>NotFound`, `<Kind>NotReady`) and message the job waits with.
async fn ready_ref<K>(
    ctx: &Context,
    ns: &str,
    name: &str,
    field: &str,
    conditions_of: impl Fn(&K) -> Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
) -> Result<Result<K, (String, String)>, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&());
    let Some(obj) = Api::<K>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Err((
            format!("{kind}NotFound"),
            format!("{kind} {ns}/{name} named by {field} does not exist"),
        )));
    };
    let conds = conditions_of(&obj).unwrap_or_default();
    if !conditions::is_true(&conds, "Ready") {
        return Ok(Err((
            format!("{kind}NotReady"),
            format!("{kind} {name} is not Ready: {}", ready_problem(&conds)),
        )));
    }
    Ok(Ok(obj))
}

/// Pending: everything decided before any pod exists.
async fn plan(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let sn_name = &job.spec.source_node_ref.name;
    let repo_name = &job.spec.repository_ref.name;
    let sn = match ready_ref::<SourceNode>(ctx, &ns, sn_name, "spec.sourceNodeRef", |o| {
        o.status.as_ref().map(|s| s.conditions.clone())
    })
    .await?
    {
        Ok(o) => o,
        Err((reason, message)) => {
            return wait(job, ctx, &reason, message, Duration::from_secs(300)).await;
        }
    };
    let repo = match ready_ref::<Repository>(ctx, &ns, repo_name, "spec.repositoryRef", |o| {
        o.status.as_ref().map(|s| s.conditions.clone())
    })
    .await?
    {
        Ok(o) => o,
        Err((reason, message)) => {
            return wait(job, ctx, &reason, message, Duration::from_secs(300)).await;
        }
    };

    // The VM and its disks, from vCenter.
    let (vs, username) = match source_node::connect(&sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok(v) => v,
        Err(p) => {
            let retry = if p.transient { 30 } else { 300 };
            return wait(
                job,
                ctx,
                p.reason,
                format!("SourceNode {sn_name}: {}", p.message),
                Duration::from_secs(retry),
            )
            .await;
        }
    };
    let (selector, what) = match (&job.spec.vm.name, &job.spec.vm.instance_uuid) {
        (Some(n), _) => (VmSelector::Name(n.clone()), format!("VM {n:?}")),
        (None, Some(u)) => (
            VmSelector::InstanceUuid(u.clone()),
            format!("VM with instance UUID {u}"),
        ),
        (None, None) => unreachable_selector(),
    };
    let found = async {
        let vm = vs.find_vm(&sn.spec.datacenter, &selector).await?;
        let info = vs.vm_info(&vm).await?;
        Ok::<_, VSphereError>((vm, info))
    }
    .await;
    vs.logout().await;
    let (vm, info) = match found {
        Ok(v) => v,
        Err(VSphereError::NotFound(m)) => {
            return wait(
                job,
                ctx,
                "VMNotFound",
                format!(
                    "{what} was not found in datacenter {} of {} ({m}): check spec.vm",
                    sn.spec.datacenter, sn.spec.vcenter.url
                ),
                Duration::from_secs(300),
            )
            .await;
        }
        Err(e) => {
            let p = source_node::problem(&e, &username);
            return wait(
                job,
                ctx,
                p.reason,
                format!("looking up {what}: {}", p.message),
                Duration::from_secs(30),
            )
            .await;
        }
    };
    let disks: Vec<_> = match &job.spec.disks {
        None => info.disks.clone(),
        Some(keys) => {
            let missing: Vec<i32> = keys
                .iter()
                .filter(|k| !info.disks.iter().any(|d| d.key == **k))
                .copied()
                .collect();
            if !missing.is_empty() {
                let have: Vec<i32> = info.disks.iter().map(|d| d.key).collect();
                return wait(
                    job,
                    ctx,
                    "DiskNotFound",
                    format!(
                        "VM {} has no disk with device key {missing:?} (its disks: {have:?}): fix spec.disks",
                        vm.name
                    ),
                    Duration::from_secs(300),
                )
                .await;
            }
            info.disks
                .iter()
                .filter(|d| keys.contains(&d.key))
                .cloned()
                .collect()
        }
    };
    if disks.is_empty() {
        return wait(
            job,
            ctx,
            "NoDisks",
            format!("VM {} has no virtual disks to back up", vm.name),
            Duration::from_secs(300),
        )
        .await;
    }

    // Chain and ports: decided from a fresh list of jobs, under the allocation lock, and
    // recorded in status before the lock is released.
    let _lock = ctx.allocation.lock().await;
    let jobs = Api::<BackupJob>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await?
        .items;
    let busy = jobs.iter().find(|j| {
        j.metadata.name.as_deref() != Some(name.as_str())
            && j.spec.source_node_ref.name == *sn_name
            && j.status.as_ref().is_some_and(|s| {
                matches!(s.phase, Some(Phase::Running)) && s.vm_name.as_deref() == Some(&vm.name)
            })
    });
    if let Some(other) = busy {
        return wait(
            job,
            ctx,
            "VMBusy",
            format!(
                "BackupJob {} is backing up VM {} now; this one starts when it ends",
                other.name_any(),
                vm.name
            ),
            Duration::from_secs(10),
        )
        .await;
    }
    let parent = chain::parent(job, &jobs);
    let capacities: BTreeMap<i32, u64> = disks.iter().map(|d| (d.key, d.capacity)).collect();
    let plans = match chain::plan(job, parent, &capacities) {
        Ok(p) => p,
        Err(e) => {
            return wait(
                job,
                ctx,
                "IncrementalNotPossible",
                e.to_string(),
                Duration::from_secs(60),
            )
            .await;
        }
    };
    let keys: Vec<i32> = capacities.keys().copied().collect();
    let used = ports::in_use(&jobs, &ns, repo_name, Some(&name));
    let alloc = match ports::held(job, &keys) {
        Some(a) => a,
        None => match ports::allocate(&repo.spec.hub.port_range, &used, &keys) {
            Ok(a) => a,
            Err(e) => {
                return wait(
                    job,
                    ctx,
                    "PortsExhausted",
                    e.to_string(),
                    Duration::from_secs(15),
                )
                .await;
            }
        },
    };
    let mut u = Update::new(job);
    u.st.phase = Some(Phase::Running);
    u.st.vm_name = Some(vm.name.clone());
    u.st.attempts = Some(1);
    u.st.start_time = Some(now());
    u.st.chain_parent = plans.values().find_map(|p| match p {
        DiskPlan::Incremental { parent_job, .. } => Some(parent_job.clone()),
        DiskPlan::Full { .. } => None,
    });
    u.st.disks = disks
        .iter()
        .map(|d| {
            let mut s = DiskStatus {
                device_key: d.key,
                label: Some(d.label.clone()),
                capacity_bytes: Some(d.capacity as i64),
                port: alloc.get(&d.key).copied(),
                file: Some(disk_file(
                    &repo.spec.layout.directory,
                    &ns,
                    &vm.name,
                    d.key,
                    &name,
                )),
                ..Default::default()
            };
            match plans.get(&d.key) {
                Some(DiskPlan::Incremental {
                    parent_job,
                    parent_file,
                    change_id,
                }) => {
                    s.copy = Some(CopyKind::Incremental);
                    s.copy_reason = Some(format!("changes since backup {parent_job}"));
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
        })
        .collect();
    let ports_text: Vec<String> = alloc.iter().map(|(k, p)| format!("{k}:{p}")).collect();
    u.cond(
        RUNNING,
        TRUE,
        "HubStarting",
        format!(
            "attempt 1: starting the hub for {} disk(s) on ports {}",
            disks.len(),
            ports_text.join(",")
        ),
    );
    u.write(ctx).await?;
    ctx.metrics.backups_started.inc();
    ctx.metrics.known_vm(&ns, &vm.name);
    Ok(Action::requeue(Duration::from_secs(1)))
}

fn unreachable_selector() -> (VmSelector, String) {
    // The CRD's CEL rule requires exactly one of vm.name / vm.instanceUuid.
    (VmSelector::Name(String::new()), "VM (no selector)".into())
}

/// Deletes an object; true when it existed.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn apply_pod(ctx: &Context, ns: &str, mut pod: Pod, attempt: i32) -> Result<(), Error> {
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(ATTEMPT_LABEL.into(), attempt.to_string());
    let name = pod.name_any();
    Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await?;
    Ok(())
}

/// Running: hub, then agent, then the agent's outcome.
async fn run(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let st = job.status.clone().unwrap_or_default();
    let attempt = st.attempts.unwrap_or(1);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let hub = pods.get_opt(&hub_name(job)).await?;
    let agent = pods.get_opt(&agent_name(job)).await?;
    // Pods of an earlier attempt go first; the new attempt starts when they are gone.
    let mut stale = false;
    for p in [&hub, &agent].into_iter().flatten() {
        if attempt_of(p) != Some(attempt) || p.metadata.deletion_timestamp.is_some() {
            stale = true;
            if p.metadata.deletion_timestamp.is_none() {
                delete_if_present(&pods, &p.name_any()).await?;
            }
        }
    }
    if stale {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // A retry waits out its back-off, counted from the failure of the previous attempt.
    if let Some(c) = conditions::find(&st.conditions, RUNNING)
        && c.reason == "Retrying"
    {
        let since = Timestamp::now().as_millisecond() - c.last_transition_time.0.as_millisecond();
        let left = retry_backoff(attempt).as_millis() as i64 - since;
        if left > 0 {
            return Ok(Action::requeue(Duration::from_millis(left as u64)));
        }
    }

    let Some(hub) = hub else {
        let repo_name = &job.spec.repository_ref.name;
        let Some(repo) = Api::<Repository>::namespaced(ctx.client.clone(), &ns)
            .get_opt(repo_name)
            .await?
        else {
            return attempt_failed(
                job,
                ctx,
                "RepositoryNotFound",
                format!("Repository {repo_name} no longer exists"),
                None,
            )
            .await;
        };
        crate::hub::ensure_service_account(
            &ctx.client,
            &ns,
            ctx.images.hub_service_account.as_deref(),
        )
        .await?;
        let disks = hub_disks(&st);
        let svc = hub_service(job, &disks);
        Api::<Service>::namespaced(ctx.client.clone(), &ns)
            .patch(
                &svc.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await?;
        apply_pod(
            ctx,
            &ns,
            hub_pod(job, &claim_name(&repo), &disks, &ctx.images),
            attempt,
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    };
    if let Some(why) = pod_failure(&hub) {
        return attempt_failed(
            job,
            ctx,
            "HubFailed",
            format!("hub pod {}: {why}", hub.name_any()),
            None,
        )
        .await;
    }
    let hub_ip = hub.status.as_ref().and_then(|s| s.pod_ip.clone());
    let (true, Some(hub_ip)) = (pod_ready(&hub), hub_ip) else {
        let mut u = Update::new(job);
        u.cond(
            RUNNING,
            TRUE,
            "HubStarting",
            format!(
                "attempt {attempt}: waiting for hub pod {} to serve its NBD exports",
                hub.name_any()
            ),
        );
        u.write(ctx).await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    };

    let Some(agent) = agent else {
        let sn_name = &job.spec.source_node_ref.name;
        let Some(sn) = Api::<SourceNode>::namespaced(ctx.client.clone(), &ns)
            .get_opt(sn_name)
            .await?
        else {
            return attempt_failed(
                job,
                ctx,
                "SourceNodeNotFound",
                format!("SourceNode {sn_name} no longer exists"),
                None,
            )
            .await;
        };
        crate::hub::ensure_service_account(
            &ctx.client,
            &ns,
            ctx.images.agent_service_account.as_deref(),
        )
        .await?;
        let pod = agent_pod(
            job,
            &sn,
            &targets(&st, &hub_ip),
            &base_change_ids(&st),
            &ctx.images,
        );
        apply_pod(ctx, &ns, pod, attempt).await?;
        let mut u = Update::new(job);
        u.cond(
            RUNNING,
            TRUE,
            "AgentStarting",
            format!("attempt {attempt}: hub ready at {hub_ip}; starting the agent"),
        );
        u.write(ctx).await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    };

    match pod_phase(&agent) {
        "Succeeded" => {
            let msg = termination_message(&agent).unwrap_or_default();
            match parse_result(&msg) {
                Some(r) if r.ok => succeeded(job, ctx, &r).await,
                Some(r) => {
                    let reason = r.reason.clone().unwrap_or_else(|| "AgentFailed".into());
                    let m = r
                        .error
                        .clone()
                        .unwrap_or_else(|| "the agent reported failure".into());
                    attempt_failed(job, ctx, &reason, m, Some(&r)).await
                }
                None => {
                    attempt_failed(
                        job,
                        ctx,
                        "ResultMissing",
                        format!("the agent ended without a readable result: {msg:.300}"),
                        None,
                    )
                    .await
                }
            }
        }
        "Failed" => {
            let msg = termination_message(&agent).unwrap_or_default();
            match parse_result(&msg) {
                Some(r) => {
                    let reason = r.reason.clone().unwrap_or_else(|| "AgentFailed".into());
                    let m = r.error.clone().unwrap_or_else(|| "the agent failed".into());
                    attempt_failed(job, ctx, &reason, m, Some(&r)).await
                }
                None => {
                    let why = pod_failure(&agent).unwrap_or_else(|| "the agent pod failed".into());
                    attempt_failed(job, ctx, "AgentFailed", why, None).await
                }
            }
        }
        "Running" => {
            let ip = agent.status.as_ref().and_then(|s| s.pod_ip.clone());
            if let Some(ip) = ip {
                match fetch_progress(&format!("{ip}:{PROGRESS_PORT}")).await {
                    Ok(p) => record_progress(job, ctx, attempt, &p).await?,
                    Err(e) => tracing::debug!(job = %job.name_any(), "progress: {e}"),
                }
            }
            Ok(Action::requeue(Duration::from_secs(3)))
        }
        _ => Ok(Action::requeue(Duration::from_secs(3))),
    }
}

async fn record_progress(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    p: &AgentProgress,
) -> Result<(), Error> {
    let mut u = Update::new(job);
    u.st.bytes_to_copy = Some(p.bytes_to_copy as i64);
    u.st.bytes_copied = Some(p.bytes_copied as i64);
    for d in u.st.disks.iter_mut() {
        if let Some(dp) = p.disks.iter().find(|x| x.key == d.device_key) {
            d.bytes_to_copy = Some(dp.bytes_to_copy as i64);
            d.bytes_copied = Some(dp.bytes_copied as i64);
        }
    }
    let stage = if p.stage.is_empty() {
        "copying"
    } else {
        &p.stage
    };
    // Before the copy starts there is nothing to count yet: say what the agent is doing.
    let message = if p.bytes_to_copy == 0 && matches!(stage, "connecting" | "snapshot") {
        format!("attempt {attempt}: {stage}")
    } else {
        let text = progress_text(p.bytes_copied, p.bytes_to_copy);
        u.st.progress = Some(text.split(' ').next().unwrap_or_default().to_owned());
        format!("attempt {attempt}: {stage}: {text}")
    };
    u.cond(RUNNING, TRUE, "Copying", message);
    u.write(ctx).await
}

async fn delete_job_pods(job: &BackupJob, ctx: &Context) -> Result<(), Error> {
    let ns = job.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    delete_if_present(&pods, &agent_name(job)).await?;
    delete_if_present(&pods, &hub_name(job)).await?;
    Ok(())
}

async fn succeeded(job: &BackupJob, ctx: &Context, r: &AgentResult) -> Result<Action, Error> {
    let st = job.status.clone().unwrap_or_default();
    let new = succeeded_status(st, r, job.metadata.generation, now());
    let started = new
        .start_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now);
    let seconds = (Timestamp::now().as_millisecond() - started.as_millisecond()) as f64 / 1000.0;
    let vm = new.vm_name.clone().unwrap_or_default();
    let ns = job.namespace().unwrap_or_default();
    for d in r.disks.iter() {
        ctx.metrics
            .bytes_copied
            .with_label_values(&[&ns, &vm, &d.key.to_string()])
            .inc_by(d.bytes_to_copy);
    }
    let mut u = Update::new(job);
    u.st = new;
    u.st.observed_generation = job.metadata.generation;
    u.write(ctx).await?;
    ctx.metrics
        .backups
        .with_label_values(&[&ns, &vm, "succeeded"])
        .inc();
    ctx.metrics.backup_duration.observe(seconds.max(0.0));
    ctx.metrics
        .last_success
        .with_label_values(&[&ns, &vm])
        .set(Timestamp::now().as_second());
    let copied: u64 = r.disks.iter().map(|d| d.bytes_to_copy).sum();
    ctx.metrics
        .last_throughput
        .with_label_values(&[&ns, &vm])
        .set(copied as f64 / seconds.max(0.001));
    delete_job_pods(job, ctx).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// One attempt failed: its pods go; the next attempt starts, or the job fails.
async fn attempt_failed(
    job: &BackupJob,
    ctx: &Context,
    reason: &str,
    message: String,
    result: Option<&AgentResult>,
) -> Result<Action, Error> {
    let st = job.status.clone().unwrap_or_default();
    let attempt = st.attempts.unwrap_or(1);
    let attempts_allowed = job.spec.retry_limit.max(0) + 1;
    delete_job_pods(job, ctx).await?;
    let mut u = Update::new(job);
    if let Some(s) = result.and_then(|r| r.snapshot.as_ref()) {
        u.st.snapshot = Some(SnapshotStatus {
            id: Some(s.id.clone()),
            name: Some(s.name.clone()),
            removed: s.removed,
        });
    }
    if attempt < attempts_allowed {
        u.st.attempts = Some(attempt + 1);
        u.st.bytes_copied = None;
        u.st.progress = None;
        u.cond(
            RUNNING,
            FALSE,
            "Retrying",
            format!(
                "attempt {attempt} of {attempts_allowed} failed ({reason}): {message}; attempt {} starts in {}s",
                attempt + 1,
                retry_backoff(attempt + 1).as_secs()
            ),
        );
        u.write(ctx).await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    // The last attempt: confirm no snapshot of this job is left in vCenter.
    let (removed, snap_reason, snap_msg) = confirm_snapshot_removed(job, ctx, result).await;
    if let Some(s) = u.st.snapshot.as_mut() {
        s.removed = removed;
    }
    u.st.phase = Some(Phase::Failed);
    u.st.completion_time = Some(now());
    u.cond(
        FAILED,
        TRUE,
        reason,
        format!("failed after {attempt} attempt(s): {message}"),
    );
    u.cond(RUNNING, FALSE, "Failed", format!("{reason}: {message}"));
    u.cond(
        SNAPSHOT_REMOVED,
        if removed { TRUE } else { FALSE },
        snap_reason,
        snap_msg,
    );
    u.cond(
        FILES_REMOVED,
        FALSE,
        "Pending",
        "removing this job's partial QCOW2 files from the repository",
    );
    u.write(ctx).await?;
    let ns = job.namespace().unwrap_or_default();
    let vm = metric_vm(job);
    ctx.metrics
        .backups
        .with_label_values(&[&ns, &vm, "failed"])
        .inc();
    if !removed {
        ctx.metrics
            .snapshot_cleanup_failures
            .with_label_values(&[&ns, &vm])
            .inc();
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The VM's name for metrics: as vCenter reported it, else as the spec names it.
fn metric_vm(job: &BackupJob) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.vm_name.clone())
        .or_else(|| job.spec.vm.name.clone())
        .or_else(|| job.spec.vm.instance_uuid.clone())
        .unwrap_or_default()
}

/// After the last attempt: is a snapshot of this job left on the VM? Removes it if so.
async fn confirm_snapshot_removed(
    job: &BackupJob,
    ctx: &Context,
    result: Option<&AgentResult>,
) -> (bool, &'static str, String) {
    let wanted = format!("sendense-{}", job.name_any());
    if let Some(s) = result.and_then(|r| r.snapshot.as_ref())
        && s.removed
    {
        return (
            true,
            "Removed",
            format!("the agent removed snapshot {} ({})", s.name, s.id),
        );
    }
    let ns = job.namespace().unwrap_or_default();
    let sn = match Api::<SourceNode>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&job.spec.source_node_ref.name)
        .await
    {
        Ok(Some(sn)) => sn,
        _ => {
            return (
                false,
                "Unverified",
                format!(
                    "could not check vCenter for snapshot {wanted}: SourceNode {} unavailable",
                    job.spec.source_node_ref.name
                ),
            );
        }
    };
    let vs = match source_node::connect(&sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok((vs, _)) => vs,
        Err(p) => {
            return (
                false,
                "Unverified",
                format!(
                    "could not check vCenter for snapshot {wanted}: {}",
                    p.message
                ),
            );
        }
    };
    let selector = match (&job.spec.vm.name, &job.spec.vm.instance_uuid) {
        (_, Some(u)) => VmSelector::InstanceUuid(u.clone()),
        (Some(n), None) => VmSelector::Name(n.clone()),
        (None, None) => unreachable_selector().0,
    };
    let outcome = async {
        let vm = match vs.find_vm(&sn.spec.datacenter, &selector).await {
            Ok(vm) => vm,
            Err(VSphereError::NotFound(_)) => {
                return Ok::<_, VSphereError>((true, "NoSnapshot", "the VM does not exist".into()));
            }
            Err(e) => return Err(e),
        };
        let info = vs.vm_info(&vm).await?;
        let left: Vec<_> = info.snapshots.iter().filter(|s| s.name == wanted).collect();
        if left.is_empty() {
            return Ok((
                true,
                "NoSnapshot",
                format!("vCenter shows no snapshot {wanted} on VM {}", vm.name),
            ));
        }
        for s in &left {
            vs.remove_snapshot(s).await?;
        }
        Ok((
            true,
            "RemovedByOperator",
            format!(
                "the operator removed {} leftover snapshot(s) {wanted} from VM {}",
                left.len(),
                vm.name
            ),
        ))
    }
    .await;
    vs.logout().await;
    match outcome {
        Ok((removed, reason, msg)) => (removed, reason, msg),
        Err(e) => (
            false,
            "SnapshotRemovalFailed",
            format!("snapshot {wanted} may be left on the VM: {e}; remove it in vCenter"),
        ),
    }
}

fn cleanup_name(job: &BackupJob) -> String {
    format!("{}-cleanup", job.name_any())
}

/// The pod removing a failed job's partial files from the repository.
pub fn cleanup_pod(job: &BackupJob, claim: &str, files: &[String], images: &PodSettings) -> Pod {
    let mut command = vec!["sendense-agent".to_string(), "hub".into(), "remove".into()];
    for f in files {
        command.extend([
            "--file".into(),
            format!("{REPOSITORY_MOUNT}/{}", f.trim_start_matches('/')),
        ]);
    }
    let mut pod = hub_pod(job, claim, &[], images);
    pod.metadata.name = Some(cleanup_name(job));
    pod.metadata.labels = Some(labels(job, "cleanup"));
    if let Some(spec) = pod.spec.as_mut() {
        spec.init_containers = None;
        spec.containers = vec![k8s_openapi::api::core::v1::Container {
            name: "remove".into(),
            image: Some(images.agent.clone()),
            command: Some(command),
            volume_mounts: Some(vec![k8s_openapi::api::core::v1::VolumeMount {
                name: "repository".into(),
                mount_path: REPOSITORY_MOUNT.into(),
                ..Default::default()
            }]),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Default::default()
        }];
    }
    crate::hub::harden(pod)
}

/// Succeeded or Failed: no pod of the job remains; a failed job's partial files are removed.
async fn finished(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    delete_job_pods(job, ctx).await?;
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    delete_if_present(&svcs, &hub_name(job)).await?;
    let st = job.status.clone().unwrap_or_default();
    let pending_cleanup = conditions::find(&st.conditions, FILES_REMOVED)
        .is_some_and(|c| c.status == FALSE && c.reason == "Pending");
    if st.phase != Some(Phase::Failed) || !pending_cleanup {
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let files: Vec<String> = st.disks.iter().filter_map(|d| d.file.clone()).collect();
    match pods.get_opt(&cleanup_name(job)).await? {
        None => {
            let Some(repo) = Api::<Repository>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&job.spec.repository_ref.name)
                .await?
            else {
                let mut u = Update::new(job);
                u.cond(
                    FILES_REMOVED,
                    FALSE,
                    "RepositoryNotFound",
                    format!(
                        "Repository {} is gone; partial files {files:?} were not removed",
                        job.spec.repository_ref.name
                    ),
                );
                u.write(ctx).await?;
                return Ok(Action::await_change());
            };
            crate::hub::ensure_service_account(
                &ctx.client,
                &ns,
                ctx.images.hub_service_account.as_deref(),
            )
            .await?;
            let pod = cleanup_pod(job, &claim_name(&repo), &files, &ctx.images);
            Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                .patch(
                    &cleanup_name(job),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&pod),
                )
                .await?;
            Ok(Action::requeue(Duration::from_secs(3)))
        }
        Some(p) if p.metadata.deletion_timestamp.is_some() => {
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Some(p) => match pod_phase(&p) {
            "Succeeded" => {
                let mut u = Update::new(job);
                u.cond(
                    FILES_REMOVED,
                    TRUE,
                    "Removed",
                    format!("removed partial files {files:?}"),
                );
                u.write(ctx).await?;
                delete_if_present(&pods, &cleanup_name(job)).await?;
                Ok(Action::await_change())
            }
            "Failed" => {
                let why = pod_failure(&p).unwrap_or_else(|| "the cleanup pod failed".into());
                let mut u = Update::new(job);
                u.cond(
                    FILES_REMOVED,
                    FALSE,
                    "RemovalFailed",
                    format!("partial files {files:?} may remain: {why}"),
                );
                u.write(ctx).await?;
                delete_if_present(&pods, &cleanup_name(job)).await?;
                Ok(Action::await_change())
            }
            _ => Ok(Action::requeue(Duration::from_secs(3))),
        },
    }
}

/// BackupJobs that refer to a SourceNode or Repository, for `.watches()`.
pub fn jobs_referring(
    jobs: &[Arc<BackupJob>],
    namespace: Option<&str>,
    source_node: Option<&str>,
    repository: Option<&str>,
) -> Vec<kube::runtime::reflector::ObjectRef<BackupJob>> {
    jobs.iter()
        .filter(|j| j.metadata.namespace.as_deref() == namespace)
        .filter(|j| {
            !matches!(
                j.status.as_ref().and_then(|s| s.phase),
                Some(Phase::Succeeded)
            )
        })
        .filter(|j| {
            source_node.is_some_and(|s| j.spec.source_node_ref.name == s)
                || repository.is_some_and(|r| j.spec.repository_ref.name == r)
        })
        .map(|j| kube::runtime::reflector::ObjectRef::from_obj(j.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: serde_json::Value) -> BackupJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "BackupJob",
            "metadata": {"name": "web-01-b2", "namespace": "backups", "uid": "u-2", "generation": 1},
            "spec": {"vm": {"name": "web-01"}, "sourceNodeRef": {"name": "vc"}, "repositoryRef": {"name": "primary"}},
            "status": status
        }))
        .expect("valid BackupJob")
    }

    #[test]
    fn disk_files_follow_the_layout_and_stay_inside_the_volume() {
        assert_eq!(
            disk_file(
                "{namespace}/{vm}/{deviceKey}",
                "backups",
                "web 01/x",
                2000,
                "b1"
            ),
            "backups/web_01_x/2000/b1.qcow2"
        );
        assert_eq!(
            disk_file("vms/{vm}/{deviceKey}/", "ns", "..", 2001, "j"),
            "vms/_/2001/j.qcow2"
        );
    }

    #[test]
    fn targets_and_base_change_ids_come_from_status() {
        let j = job(serde_json::json!({"phase": "Running", "disks": [
            {"deviceKey": 2000, "port": 10100, "copy": "Incremental", "changeIdUsed": "52 a/4"},
            {"deviceKey": 2001, "port": 10101, "copy": "Full", "changeIdUsed": "*"}
        ]}));
        let st = j.status.expect("status");
        let t = targets(&st, "10.1.2.3");
        assert_eq!(t[&2000], "nbd://10.1.2.3:10100/");
        assert_eq!(t[&2001], "nbd://10.1.2.3:10101/");
        let b = base_change_ids(&st);
        assert_eq!(b.len(), 1);
        assert_eq!(b[&2000], "52 a/4");
        let hub = hub_disks(&st);
        assert_eq!(hub[1].port, 10101);
    }

    #[test]
    fn progress_reads_as_percent_and_sizes() {
        assert_eq!(progress_text(0, 0), "100% (0 B of 0 B)");
        assert_eq!(
            progress_text(512 << 20, 2 << 30),
            "25% (512.0 MiB of 2.0 GiB)"
        );
    }

    #[test]
    fn a_successful_result_records_change_ids_sizes_and_conditions() {
        let j = job(
            serde_json::json!({"phase": "Running", "attempts": 1, "disks": [
                {"deviceKey": 2000, "port": 10100, "copy": "Incremental", "changeIdUsed": "u/3", "file": "a.qcow2"},
                {"deviceKey": 2001, "port": 10101, "copy": "Incremental", "changeIdUsed": "u/3", "file": "b.qcow2"}
            ]}),
        );
        let r = parse_result(
            r#"{"ok":true,"snapshot":{"id":"snapshot-9","name":"sendense-web-01-b2","removed":true},
            "disks":[{"key":2000,"copy":"incremental","reason":"changes since u/3","change_id_used":"u/3","change_id_reached":"u/5","bytes_to_copy":1048576,"bytes_written":524288},
                     {"key":2001,"copy":"full","reason":"changeId u/3 is not valid any more","change_id_used":"*","change_id_reached":"v/1","bytes_to_copy":4096,"bytes_written":4096}]}"#,
        )
        .expect("parses");
        let st = succeeded_status(j.status.clone().expect("status"), &r, Some(1), now());
        assert_eq!(st.phase, Some(Phase::Succeeded));
        assert_eq!(st.disks[0].change_id_reached.as_deref(), Some("u/5"));
        assert_eq!(st.disks[1].copy, Some(CopyKind::Full));
        assert!(
            st.disks[1]
                .copy_reason
                .as_deref()
                .unwrap_or("")
                .contains("not valid")
        );
        assert_eq!(st.bytes_copied, Some(1048576 + 4096));
        assert_eq!(st.size.as_deref(), Some("516.0 KiB"));
        assert!(conditions::is_true(&st.conditions, COMPLETE));
        assert!(conditions::is_true(&st.conditions, SNAPSHOT_REMOVED));
        assert_eq!(st.snapshot.as_ref().map(|s| s.removed), Some(true));
    }

    #[test]
    fn retries_back_off() {
        assert_eq!(retry_backoff(2), Duration::from_secs(10));
        assert_eq!(retry_backoff(3), Duration::from_secs(20));
        assert_eq!(retry_backoff(9), Duration::from_secs(300));
    }

    #[test]
    fn garbage_is_not_a_result() {
        assert!(parse_result("panicked at main.rs").is_none());
        assert!(parse_result("").is_none());
    }

    #[test]
    fn pod_failures_name_the_container_and_its_message() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-hub"},
            "status": {"phase": "Failed", "initContainerStatuses": [
                {"name": "prepare-2000", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 1, "message": "backing file missing"}}}
            ]}
        }))
        .expect("pod");
        let why = pod_failure(&pod).expect("failed");
        assert!(
            why.contains("prepare-2000") && why.contains("backing file missing"),
            "{why}"
        );
        let ok: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "y"}, "status": {"phase": "Running"}
        }))
        .expect("pod");
        assert!(pod_failure(&ok).is_none());
    }

    #[test]
    fn the_cleanup_pod_removes_only_this_jobs_files() {
        let j = job(serde_json::json!({}));
        let images = PodSettings {
            agent: "agent:1".into(),
            ..Default::default()
        };
        let pod = cleanup_pod(&j, "data", &["ns/vm/2000/web-01-b2.qcow2".into()], &images);
        let spec = pod.spec.expect("spec");
        assert!(spec.init_containers.is_none());
        let cmd = spec.containers[0].command.clone().expect("command");
        assert_eq!(
            cmd,
            vec![
                "sendense-agent",
                "hub",
                "remove",
                "--file",
                "/repository/ns/vm/2000/web-01-b2.qcow2"
            ]
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("web-01-b2-cleanup"));
    }

    /// The API calls of the main reconcile paths, against a scripted API server: each test
    /// states the requests in order and what the server answers.
    mod api {
        use super::*;
        use http::{Request, Response};
        use kube::client::Body;
        use kube::runtime::events::Reporter;
        use serde_json::{Value, json};

        type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

        fn context() -> (Arc<Context>, Handle) {
            let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(svc, "default");
            let ctx = Context {
                client: client.clone(),
                recorder: Recorder::new(
                    client,
                    Reporter {
                        controller: "test".into(),
                        instance: None,
                    },
                ),
                metrics: Metrics::new().expect("metrics"),
                images: PodSettings {
                    agent: "agent:1".into(),
                    ..Default::default()
                },
                vcenter_timeout: Duration::from_secs(5),
                allocation: tokio::sync::Mutex::new(()),
            };
            (Arc::new(ctx), handle)
        }

        /// Expects `method path` next, answers `status` with `body`; returns the request body.
        async fn expect(
            handle: &mut Handle,
            method: &str,
            path: &str,
            status: u16,
            body: Value,
        ) -> Value {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
                .expect("the client is gone");
            assert_eq!(
                (req.method().as_str(), req.uri().path()),
                (method, path),
                "unexpected request"
            );
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            let sent = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON request body")
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
            sent
        }

        fn not_found() -> Value {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
        }

        const JOBS: &str = "/apis/sendense.io/v1alpha1/namespaces/backups/backupjobs";
        const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/backups/events";

        fn cond<'a>(status: &'a Value, t: &str) -> &'a Value {
            status["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == t))
                .unwrap_or_else(|| panic!("no {t} condition in {status}"))
        }

        #[tokio::test]
        async fn a_missing_source_node_makes_the_job_wait_with_a_reason_and_an_event() {
            let (ctx, mut h) = context();
            let j = job(json!({}));
            let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
            expect(
                &mut h,
                "GET",
                "/apis/sendense.io/v1alpha1/namespaces/backups/sourcenodes/vc",
                404,
                not_found(),
            )
            .await;
            let patch = expect(
                &mut h,
                "PATCH",
                &format!("{JOBS}/web-01-b2/status"),
                200,
                serde_json::to_value(&j).expect("json"),
            )
            .await;
            assert_eq!(patch["status"]["phase"], "Pending");
            let c = cond(&patch, RUNNING);
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&json!("False"), &json!("SourceNodeNotFound"))
            );
            assert!(
                c["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("spec.sourceNodeRef")
            );
            let ev = expect(&mut h, "POST", EVENTS, 201, json!({})).await;
            assert_eq!(
                (&ev["type"], &ev["reason"]),
                (&json!("Warning"), &json!("SourceNodeNotFound"))
            );
            let action = run.await.expect("joined").expect("reconciled");
            assert_eq!(action, Action::requeue(Duration::from_secs(300)));
        }

        #[tokio::test]
        async fn a_planned_job_without_pods_gets_its_hub_service_and_pod() {
            let (ctx, mut h) = context();
            let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
                {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "backups/web-01/2000/web-01-b2.qcow2", "copy": "Full"}
            ]}));
            let run = tokio::spawn(reconcile(Arc::new(j), ctx));
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/backups/pods/web-01-b2-hub",
                404,
                not_found(),
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/backups/pods/web-01-b2-agent",
                404,
                not_found(),
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/apis/sendense.io/v1alpha1/namespaces/backups/repositories/primary",
                200,
                json!({"apiVersion": "sendense.io/v1alpha1", "kind": "Repository",
                       "metadata": {"name": "primary", "namespace": "backups"},
                       "spec": {"storage": {"persistentVolumeClaim": {"claimName": "vault"}}}}),
            )
            .await;
            let svc = expect(
                &mut h,
                "PATCH",
                "/api/v1/namespaces/backups/services/web-01-b2-hub",
                200,
                json!({"metadata": {"name": "web-01-b2-hub"}}),
            )
            .await;
            assert_eq!(svc["spec"]["ports"][0]["port"], 10100);
            let pod = expect(
                &mut h,
                "PATCH",
                "/api/v1/namespaces/backups/pods/web-01-b2-hub",
                200,
                json!({"metadata": {"name": "web-01-b2-hub"}}),
            )
            .await;
            assert_eq!(pod["metadata"]["labels"][ATTEMPT_LABEL], "1");
            assert_eq!(
                pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
                "vault"
            );
            assert_eq!(pod["metadata"]["ownerReferences"][0]["name"], "web-01-b2");
            let action = run.await.expect("joined").expect("reconciled");
            assert_eq!(action, Action::requeue(Duration::from_secs(3)));
        }

        #[tokio::test]
        async fn a_successful_agent_is_recorded_then_the_pods_go() {
            let (ctx, mut h) = context();
            let j = job(json!({"phase": "Running", "attempts": 1, "disks": [
                {"deviceKey": 2000, "port": 10100, "capacityBytes": 1048576, "file": "f.qcow2", "copy": "Full"}
            ], "conditions": [{"type": "Running", "status": "True", "reason": "Copying", "message": "50%", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}));
            let run = tokio::spawn(reconcile(Arc::new(j.clone()), ctx));
            let hub = json!({"metadata": {"name": "web-01-b2-hub", "labels": {ATTEMPT_LABEL: "1"}},
                "status": {"phase": "Running", "podIP": "10.0.0.5", "conditions": [{"type": "Ready", "status": "True"}]}});
            let result = json!({"ok": true, "snapshot": {"id": "snapshot-1", "name": "sendense-web-01-b2", "removed": true},
                "disks": [{"key": 2000, "copy": "full", "reason": "first", "change_id_used": "*", "change_id_reached": "u/1", "bytes_to_copy": 4096, "bytes_written": 4096}]});
            let agent = json!({"metadata": {"name": "web-01-b2-agent", "labels": {ATTEMPT_LABEL: "1"}},
                "status": {"phase": "Succeeded", "containerStatuses": [{"name": "agent", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "message": result.to_string()}}}]}});
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/backups/pods/web-01-b2-hub",
                200,
                hub,
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/backups/pods/web-01-b2-agent",
                200,
                agent,
            )
            .await;
            let patch = expect(
                &mut h,
                "PATCH",
                &format!("{JOBS}/web-01-b2/status"),
                200,
                serde_json::to_value(&j).expect("json"),
            )
            .await;
            assert_eq!(patch["status"]["phase"], "Succeeded");
            assert_eq!(patch["status"]["disks"][0]["changeIdReached"], "u/1");
            assert_eq!(cond(&patch, COMPLETE)["status"], "True");
            // One Event per changed condition: Complete and SnapshotRemoved (Running's end is
            // said by Complete).
            for reason in ["BackupSucceeded", "Removed"] {
                let ev = expect(&mut h, "POST", EVENTS, 201, json!({})).await;
                assert_eq!(
                    (&ev["type"], &ev["reason"]),
                    (&json!("Normal"), &json!(reason))
                );
            }
            expect(
                &mut h,
                "DELETE",
                "/api/v1/namespaces/backups/pods/web-01-b2-agent",
                200,
                json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-agent"}}),
            )
            .await;
            expect(
                &mut h,
                "DELETE",
                "/api/v1/namespaces/backups/pods/web-01-b2-hub",
                200,
                json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-01-b2-hub"}}),
            )
            .await;
            run.await.expect("joined").expect("reconciled");
        }

        #[tokio::test]
        async fn a_finished_job_only_makes_sure_its_pods_and_service_are_gone() {
            let (ctx, mut h) = context();
            let j =
                job(json!({"phase": "Succeeded", "disks": [{"deviceKey": 2000, "port": 10100}]}));
            let run = tokio::spawn(reconcile(Arc::new(j), ctx));
            expect(
                &mut h,
                "DELETE",
                "/api/v1/namespaces/backups/pods/web-01-b2-agent",
                404,
                not_found(),
            )
            .await;
            expect(
                &mut h,
                "DELETE",
                "/api/v1/namespaces/backups/pods/web-01-b2-hub",
                404,
                not_found(),
            )
            .await;
            expect(
                &mut h,
                "DELETE",
                "/api/v1/namespaces/backups/services/web-01-b2-hub",
                404,
                not_found(),
            )
            .await;
            let action = run.await.expect("joined").expect("reconciled");
            assert_eq!(action, Action::await_change());
        }
    }
}
