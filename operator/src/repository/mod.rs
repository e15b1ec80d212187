//! The Repository controller: the claim exists (or is created from the template) and is Bound;
//! a short probe pod proves the volume writable and measures it; restore points are the
//! Succeeded BackupJobs stored in it. The outcome is the Ready condition, with a reason a person
//! can act on, and an Event when it changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::LogParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use sendense_contract::manifest::Manifest;
use sendense_contract::probe::{FoundManifest, FoundUncommitted, ProbeResult, UncommittedDir};

use sendense_crds::common::human_bytes;
use sendense_crds::conditions;
use sendense_crds::{BackupJob, Repository, RepositoryStatus, RestorePoint};

use crate::children::{
    ApiError, Verb, api, apply, create_if_missing, delete_if_present, ensure_service_account, get,
    list,
};
use crate::metrics::Metrics;
use crate::pod_state::{self, PodPhase};
use crate::resources::{
    PodSettings, attempt_uid, claim_name, namespace_prefix, probe_name, probe_pod, templated_claim,
};
use crate::restore_point::from_manifest;
use crate::status::{ConditionReason, StatusUpdate, now};

mod removals;
use removals::report_removals;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
    /// Time between probes of a Ready repository.
    pub probe_interval: Duration,
    /// How long an attempt directory of a BackupJob that no longer exists must be left
    /// unchanged before the probe removes it.
    pub orphan_min_idle: Duration,
    /// The one namespace watched (a namespaced install); `None`: every namespace.
    pub watch_namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading restore points and schedules: {0}")]
    RestorePoints(#[source] ApiError),
    #[error("checking the claim: {0}")]
    Claim(#[source] ApiError),
    #[error("running the probe pod: {0}")]
    Probe(#[source] ApiError),
    #[error("listing BackupJobs to find orphaned attempts: {0}")]
    Jobs(#[source] ApiError),
    #[error(transparent)]
    Status(ApiError),
}

impl Error {
    /// The `error` label of the failure metric: every step fails only on the API server.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::RestorePoints(_)
            | Error::Claim(_)
            | Error::Probe(_)
            | Error::Jobs(_)
            | Error::Status(_) => "kube_api",
        }
    }
}

/// The Ready condition of a Repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Writable,
    ClaimNotFound,
    ClaimNotBound,
    NotWritable,
    /// The API server refused the probe pod (a quota, Pod Security admission, a policy).
    ProbePodRejected,
}

impl ConditionReason for Ready {
    fn condition_type(&self) -> &'static str {
        "Ready"
    }
    fn is_true(&self) -> bool {
        matches!(self, Ready::Writable)
    }
    fn reason(&self) -> &str {
        match self {
            Ready::Writable => "Writable",
            Ready::ClaimNotFound => "ClaimNotFound",
            Ready::ClaimNotBound => "ClaimNotBound",
            Ready::NotWritable => "NotWritable",
            Ready::ProbePodRejected => "ProbePodRejected",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        Some(match self {
            Ready::Writable => EventType::Normal,
            _ => EventType::Warning,
        })
    }
}

/// Time left until the next probe is due; None when it is due now (never probed, the spec
/// changed since, or orphaned attempts wait to be removed).
fn due(status: &RepositoryStatus, interval: Duration, generation: Option<i64>) -> Option<Duration> {
    let last = status.last_probe_time.as_ref()?;
    if status.observed_generation != generation || !status.orphaned_attempts.is_empty() {
        return None;
    }
    let age = Timestamp::now().as_millisecond() - last.0.as_millisecond();
    let left = interval.as_millis() as i64 - age;
    (left > 0).then(|| Duration::from_millis(left as u64))
}

pub async fn reconcile(repo: Arc<Repository>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("repository");
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    // Read fresh, not from the watch cache: the status carries retention's counters and a
    // pending probe, which a reconcile started from a copy older than the last write would undo.
    let Some(repo) = get::<Repository>(&ctx.client, &ns, &name)
        .await
        .map_err(Error::RestorePoints)?
    else {
        return Ok(Action::await_change());
    };
    let repo = Arc::new(repo);
    let claim = claim_name(&repo);
    let mut update = StatusUpdate::new(repo.as_ref());
    let points = list::<RestorePoint>(&ctx.client, &ns)
        .await
        .map_err(Error::RestorePoints)?;
    update.status.restore_points = Some(crate::retention::count(&points, &name));
    let previous = repo.status.as_ref().and_then(|s| s.retention.as_ref());
    update.status.retention = crate::retention::status(&ctx.client, &repo, &points, previous)
        .await
        .map_err(Error::RestorePoints)?;
    if let Some(pvc) = templated_claim(&repo) {
        create_if_missing(&ctx.client, &ns, &pvc)
            .await
            .map_err(Error::Claim)?;
    }
    let field = if repo.spec.storage.persistent_volume_claim.is_some() {
        "spec.storage.persistentVolumeClaim.claimName"
    } else {
        "spec.storage.claimTemplate"
    };
    let pvc = get::<PersistentVolumeClaim>(&ctx.client, &ns, &claim)
        .await
        .map_err(Error::Claim)?;
    let pvc_phase = pvc
        .as_ref()
        .map(|p| p.status.as_ref().and_then(|s| s.phase.clone()));
    let mut sooner = None;
    let requeue = match pvc_phase {
        None => {
            update.set(
                &Ready::ClaimNotFound,
                format!("PersistentVolumeClaim {ns}/{claim} named by {field} does not exist"),
            );
            Duration::from_secs(30)
        }
        Some(phase) if phase.as_deref() != Some("Bound") => {
            update.set(
                &Ready::ClaimNotBound,
                format!(
                    "PersistentVolumeClaim {ns}/{claim} is {}, not Bound: check its StorageClass or create a matching PersistentVolume",
                    phase.as_deref().unwrap_or("Pending")
                ),
            );
            Duration::from_secs(15)
        }
        Some(_) => {
            let pruning = crate::retention::step(&repo, &ctx, &points, &mut update.status)
                .await
                .map_err(Error::RestorePoints)?;
            sooner = pruning.again;
            if pruning.probe_now {
                // Until the probe is measured, it stays due.
                update.status.last_probe_time = None;
            }
            let old = update.old();
            // No probe while a prune pod changes the volume; one at once after it. A probe pod
            // under way is always read.
            let probing = get::<Pod>(&ctx.client, &ns, &probe_name(&repo))
                .await
                .map_err(Error::Probe)?
                .is_some();
            let skip = if pruning.running {
                pruning.again
            } else if !pruning.probe_now
                && !probing
                && let Some(left) = due(old, ctx.probe_interval, repo.metadata.generation)
                && conditions::find(&old.conditions, "Ready").is_some()
            {
                Some(pruning.again.map_or(left, |a| a.min(left)))
            } else {
                None
            };
            if let Some(wait) = skip {
                // Not due: only restore points (and the retention) may have changed.
                update
                    .write(&ctx.client, &ctx.recorder)
                    .await
                    .map_err(Error::Status)?;
                return Ok(Action::requeue(wait));
            }
            match probe(&repo, &ctx).await.map_err(Error::Probe)? {
                Probe::Running => {
                    // A prune's outcome, recorded in this reconcile, is kept.
                    update
                        .write(&ctx.client, &ctx.recorder)
                        .await
                        .map_err(Error::Status)?;
                    return Ok(Action::requeue(Duration::from_secs(2)));
                }
                Probe::Measured(p, manifests, uncommitted) => {
                    record_measurement(&mut update, &p, &ctx.metrics, &claim);
                    rediscover(&repo, &ctx, &manifests).await?;
                    let points = list::<RestorePoint>(&ctx.client, &ns)
                        .await
                        .map_err(Error::RestorePoints)?;
                    update.status.restore_points = Some(crate::retention::count(&points, &name));
                    let previous = update.status.retention.clone();
                    update.status.retention =
                        crate::retention::status(&ctx.client, &repo, &points, previous.as_ref())
                            .await
                            .map_err(Error::RestorePoints)?;
                    report_removals(&repo, &ctx, &p).await;
                    let orphaned = orphaned_attempts(&repo, &ctx, &uncommitted, &p).await?;
                    let removal_due = !orphaned.is_empty();
                    update.status.orphaned_attempts = orphaned;
                    if removal_due {
                        Duration::from_secs(2)
                    } else {
                        ctx.probe_interval
                    }
                }
                Probe::NotWritable(m) => {
                    update.status.last_probe_time = Some(now());
                    update.set(&Ready::NotWritable, m);
                    Duration::from_secs(60)
                }
                Probe::Refused(m) => {
                    update.set(&Ready::ProbePodRejected, m);
                    Duration::from_secs(60)
                }
            }
        }
    };
    update
        .write(&ctx.client, &ctx.recorder)
        .await
        .map_err(Error::Status)?;
    Ok(Action::requeue(
        sooner.map_or(requeue, |s: Duration| s.min(requeue)),
    ))
}

/// Every restore point on the volume has its RestorePoint, in this Repository's namespace and
/// naming this Repository (the volume is the source of truth: a namespace or cluster that was
/// lost, pointed at the same volume again, gets its restore points back). Existing objects are
/// left as they are.
async fn rediscover(repo: &Repository, ctx: &Context, manifests: &[Manifest]) -> Result<(), Error> {
    let ns = repo.namespace().unwrap_or_default();
    for m in manifests {
        let mut m = m.clone();
        m.repository = repo.name_any();
        let rp = from_manifest(&m, &ns);
        create_if_missing(&ctx.client, &ns, &rp)
            .await
            .map_err(Error::RestorePoints)?;
    }
    Ok(())
}

/// A successful probe: capacity and usage in status and metrics, Ready=True.
fn record_measurement(
    update: &mut StatusUpdate<'_, Repository>,
    p: &ProbeResult,
    metrics: &Metrics,
    claim: &str,
) {
    let repo = update.object();
    let (ns, name) = (repo.namespace().unwrap_or_default(), repo.name_any());
    // A successful probe reports every measure; a missing one reads as 0.
    let capacity = p.capacity_bytes.unwrap_or_default();
    let used = p.used_bytes.unwrap_or_default();
    let st = &mut update.status;
    st.capacity_bytes = Some(capacity as i64);
    st.used_bytes = Some(used as i64);
    st.used = Some(format!(
        "{} of {}",
        human_bytes(used),
        human_bytes(capacity)
    ));
    st.last_probe_time = Some(now());
    metrics
        .repository_capacity
        .with_label_values(&[&ns, &name])
        .set(capacity as i64);
    metrics
        .repository_used
        .with_label_values(&[&ns, &name])
        .set(used as i64);
    update.set(
        &Ready::Writable,
        format!(
            "claim {claim} is Bound and writable; {} used of {}, {} free; {} QCOW2 files",
            human_bytes(used),
            human_bytes(capacity),
            human_bytes(p.available_bytes.unwrap_or_default()),
            p.qcow2_files.unwrap_or_default()
        ),
    );
}

/// Where a probe of the volume is.
enum Probe {
    /// The probe pod was created or still runs.
    Running,
    /// The volume's measures, the restore point manifests on it, and its attempt directories
    /// without one.
    Measured(Box<ProbeResult>, Vec<Manifest>, Vec<UncommittedDir>),
    /// The probe ran and failed: why.
    NotWritable(String),
    /// The API server refused to create the probe pod: its message.
    Refused(String),
}

/// Runs (or collects) the probe pod.
async fn probe(repo: &Repository, ctx: &Context) -> Result<Probe, ApiError> {
    let ns = repo.namespace().unwrap_or_default();
    let name = probe_name(repo);
    let Some(pod) = get::<Pod>(&ctx.client, &ns, &name).await? else {
        let created = async {
            let account = ctx.images.hub_service_account.as_deref();
            ensure_service_account(&ctx.client, &ns, account).await?;
            let pod = probe_pod(repo, &ctx.images, ctx.orphan_min_idle.as_secs());
            apply(&ctx.client, &ns, &pod).await
        }
        .await;
        return match created {
            Ok(()) => Ok(Probe::Running),
            Err(e) => match e.refusal() {
                Some(why) => Ok(Probe::Refused(format!(
                    "the API server refused {} {}, which probes the volume: {why}",
                    e.kind, e.name
                ))),
                None => Err(e),
            },
        };
    };
    let phase = PodPhase::of(&pod);
    if pod_state::is_terminating(&pod) || !phase.ended() {
        return Ok(Probe::Running);
    }
    let msg = pod_state::termination_message(&pod).unwrap_or_default();
    let outcome = match serde_json::from_str::<ProbeResult>(msg.trim()) {
        Ok(p) if p.ok => Ok(p),
        Ok(p) => Err(p.error.unwrap_or_else(|| "the volume probe failed".into())),
        Err(_) if msg.trim().is_empty() => Err(format!(
            "probe pod {name} ended ({}) without a result{}",
            phase.as_str(),
            pod_state::message(&pod)
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )),
        Err(_) => Err(format!("probe pod {name}: {}", msg.trim())),
    };
    let log = match &outcome {
        Ok(_) => api::<Pod>(&ctx.client, &ns)
            .logs(&name, &LogParams::default())
            .await
            .map_err(|e| ApiError::new::<Pod>(Verb::Read, &ns, &name, e))?,
        Err(_) => String::new(),
    };
    delete_if_present::<Pod>(&ctx.client, &ns, &name).await?;
    Ok(match outcome {
        Ok(p) => Probe::Measured(
            Box::new(p),
            FoundManifest::from_log(&log),
            FoundUncommitted::from_log(&log),
        ),
        Err(m) => Probe::NotWritable(m),
    })
}

/// The attempt directories on the volume that the next probe removes: no restore point in
/// them, named after a BackupJob UID that no BackupJob this operator can see has (UIDs are
/// never reused, so such a job is gone for good), and left unchanged for the orphan idle time.
/// A namespaced install only judges the directories of its own namespace (the layout's part
/// up to `{namespace}`; none when the layout has no such part): other namespaces' jobs are
/// not visible to it. Directories the probe just failed to remove wait for the next probe.
async fn orphaned_attempts(
    repo: &Repository,
    ctx: &Context,
    found: &[UncommittedDir],
    p: &ProbeResult,
) -> Result<Vec<String>, Error> {
    let scope = match &ctx.watch_namespace {
        None => Some(String::new()),
        Some(ns) => namespace_prefix(&repo.spec.layout.directory, ns),
    };
    let Some(scope) = scope else {
        return Ok(Vec::new());
    };
    let candidates = candidates(found, &scope, ctx.orphan_min_idle, &p.kept_orphans);
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let jobs = match &ctx.watch_namespace {
        Some(ns) => list::<BackupJob>(&ctx.client, ns).await,
        None => Api::<BackupJob>::all(ctx.client.clone())
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .map_err(|e| ApiError::new::<BackupJob>(Verb::List, "", "*", e)),
    }
    .map_err(Error::Jobs)?;
    let live: BTreeSet<String> = jobs.into_iter().filter_map(|j| j.metadata.uid).collect();
    Ok(candidates
        .into_iter()
        .filter(|dir| attempt_uid(dir).is_some_and(|uid| !live.contains(uid)))
        .collect())
}

/// The uncommitted directories in `scope` (a prefix), idle long enough, and not among those the
/// probe just kept.
fn candidates(
    found: &[UncommittedDir],
    scope: &str,
    min_idle: Duration,
    kept: &[String],
) -> Vec<String> {
    found
        .iter()
        .filter(|u| u.dir.starts_with(scope) && u.idle_seconds >= min_idle.as_secs())
        .filter(|u| !kept.iter().any(|k| k.starts_with(&format!("{}: ", u.dir))))
        .map(|u| u.dir.clone())
        .collect()
}

pub fn error_policy(repo: Arc<Repository>, err: &Error, ctx: Arc<Context>) -> Action {
    let label = err.metric_label();
    ctx.metrics
        .failed_reconcile("repository", &repo.name_any(), err, label);
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn probes_repeat_only_after_the_interval_or_a_spec_change() {
        let mut st = RepositoryStatus {
            observed_generation: Some(1),
            last_probe_time: Some(Time(Timestamp::now())),
            ..Default::default()
        };
        assert!(due(&st, Duration::from_secs(300), Some(1)).is_some());
        assert!(due(&st, Duration::from_secs(300), Some(2)).is_none());
        st.last_probe_time = None;
        assert!(due(&st, Duration::from_secs(300), Some(1)).is_none());
        st.last_probe_time = Some(Time(Timestamp::now()));
        st.orphaned_attempts = vec!["ns/vm/j-u-a1".into()];
        assert!(
            due(&st, Duration::from_secs(300), Some(1)).is_none(),
            "orphans to remove: at once"
        );
    }

    #[test]
    fn orphan_candidates_are_in_scope_idle_and_not_just_refused() {
        let uid = "8f14e45f-ceea-4c8a-9b1c-3a0b5e0d1c2a";
        let dir = |d: &str, idle_seconds| UncommittedDir {
            dir: d.into(),
            idle_seconds,
            bytes: 1,
        };
        let found = [
            dir(&format!("prod/web/b1-{uid}-a1"), 4000),
            dir(&format!("prod/web/b1-{uid}-a2"), 10),
            dir(&format!("prod/db/b2-{uid}-a1"), 4000),
            dir(&format!("test/web/b3-{uid}-a1"), 4000),
        ];
        let hour = Duration::from_secs(3600);
        let kept = [format!("prod/db/b2-{uid}-a1: holds notes.txt")];
        assert_eq!(
            candidates(&found, "prod/", hour, &kept),
            [format!("prod/web/b1-{uid}-a1")]
        );
        assert_eq!(candidates(&found, "", hour, &[]).len(), 3);
    }
}
