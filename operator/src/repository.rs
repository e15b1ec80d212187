//! The Repository controller: the claim exists (or is created from the template) and is Bound;
//! a short probe pod proves the volume writable and measures it; restore points are the
//! Succeeded BackupJobs stored in it. The outcome is the Ready condition, with a reason a person
//! can act on, and an Event when it changes.
//!
//! A claim created from `spec.storage.claimTemplate` carries no owner reference: deleting the
//! Repository object must never delete the backups on its volume.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    Pod, PodSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Api, Client, Resource, ResourceExt};
use sendense_crds::backup_job::Phase;
use sendense_crds::common::human_bytes;
use sendense_crds::conditions::{self, FALSE, TRUE};
use sendense_crds::repository::AccessMode;
use sendense_crds::{BackupJob, Repository, RepositoryStatus};
use serde::Deserialize;

use crate::backup_job::{claim_name, delete_if_present, termination_message};
use crate::hub::{PodSettings, REPOSITORY_MOUNT};
use crate::metrics::Metrics;
use crate::source_node::MANAGER;

const READY: &str = "Ready";

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub images: PodSettings,
    /// Time between probes of a Ready repository.
    pub probe_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// What `sendense-agent repo probe` reports.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProbeResult {
    pub ok: bool,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub qcow2_files: u64,
    pub qcow2_bytes: u64,
    pub error: Option<String>,
}

pub fn probe_name(repo: &Repository) -> String {
    format!("{}-probe", repo.name_any())
}

fn labels(repo: &Repository) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sendense".into()),
        (
            "app.kubernetes.io/component".into(),
            "repository-probe".into(),
        ),
        (
            "app.kubernetes.io/managed-by".into(),
            "sendense-operator".into(),
        ),
        ("sendense.io/repository".into(), repo.name_any()),
    ])
}

/// The probe pod: writes, reads back and removes a file on the volume, and measures it.
pub fn probe_pod(repo: &Repository, images: &PodSettings) -> Pod {
    crate::hub::harden(Pod {
        metadata: ObjectMeta {
            name: Some(probe_name(repo)),
            namespace: repo.metadata.namespace.clone(),
            labels: Some(labels(repo)),
            owner_references: repo.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "probe".into(),
                image: Some(images.agent.clone()),
                command: Some(vec![
                    "sendense-agent".into(),
                    "repo".into(),
                    "probe".into(),
                    "--dir".into(),
                    REPOSITORY_MOUNT.into(),
                    "--result-file".into(),
                    "/dev/termination-log".into(),
                ]),
                volume_mounts: Some(vec![VolumeMount {
                    name: "repository".into(),
                    mount_path: REPOSITORY_MOUNT.into(),
                    ..Default::default()
                }]),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Default::default()
            }],
            restart_policy: Some("Never".into()),
            service_account_name: images.hub_service_account.clone(),
            automount_service_account_token: Some(false),
            active_deadline_seconds: Some(300),
            termination_grace_period_seconds: Some(5),
            volumes: Some(vec![Volume {
                name: "repository".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name(repo),
                    read_only: Some(false),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The claim Sendense creates from `spec.storage.claimTemplate`.
pub fn templated_claim(repo: &Repository) -> Option<PersistentVolumeClaim> {
    let t = repo.spec.storage.claim_template.as_ref()?;
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(repo)),
            namespace: repo.metadata.namespace.clone(),
            labels: Some(labels(repo)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(
                t.access_modes
                    .iter()
                    .map(|m| {
                        match m {
                            AccessMode::ReadWriteOnce => "ReadWriteOnce",
                            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
                            AccessMode::ReadWriteMany => "ReadWriteMany",
                        }
                        .to_owned()
                    })
                    .collect(),
            ),
            storage_class_name: t.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(std::collections::BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(t.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

fn due(status: &RepositoryStatus, interval: Duration, generation: Option<i64>) -> Option<Duration> {
    let last = status.last_probe_time.as_ref()?;
    if status.observed_generation != generation {
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
    let claim = claim_name(&repo);
    let old = repo.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = repo.metadata.generation;
    let jobs = Api::<BackupJob>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await?;
    st.restore_points = Some(
        jobs.items
            .iter()
            .filter(|j| j.spec.repository_ref.name == name)
            .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded))
            .count() as i32,
    );
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(pvc) = templated_claim(&repo)
        && pvcs.get_opt(&claim).await?.is_none()
    {
        pvcs.patch(&claim, &PatchParams::apply(MANAGER), &Patch::Apply(&pvc))
            .await?;
    }
    let field = if repo.spec.storage.persistent_volume_claim.is_some() {
        "spec.storage.persistentVolumeClaim.claimName"
    } else {
        "spec.storage.claimTemplate"
    };
    let (outcome, requeue): (Result<String, (&str, String)>, Duration) = match pvcs
        .get_opt(&claim)
        .await?
    {
        None => (
            Err((
                "ClaimNotFound",
                format!("PersistentVolumeClaim {ns}/{claim} named by {field} does not exist"),
            )),
            Duration::from_secs(30),
        ),
        Some(pvc) if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") => (
            Err((
                "ClaimNotBound",
                format!(
                    "PersistentVolumeClaim {ns}/{claim} is {}, not Bound: check its StorageClass or create a matching PersistentVolume",
                    pvc.status
                        .as_ref()
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_else(|| "Pending".into())
                ),
            )),
            Duration::from_secs(15),
        ),
        Some(_) => {
            if let Some(left) = due(&old, ctx.probe_interval, repo.metadata.generation)
                && conditions::find(&old.conditions, READY).is_some()
            {
                // Not due: only restore points may have changed.
                if st != old {
                    write(&repo, &ctx, &old, st).await?;
                }
                return Ok(Action::requeue(left));
            }
            match probe(&repo, &ctx).await? {
                None => return Ok(Action::requeue(Duration::from_secs(2))),
                Some(Ok(p)) => {
                    st.capacity_bytes = Some(p.capacity_bytes as i64);
                    st.used_bytes = Some(p.used_bytes as i64);
                    st.used = Some(format!(
                        "{} of {}",
                        human_bytes(p.used_bytes),
                        human_bytes(p.capacity_bytes)
                    ));
                    ctx.metrics
                        .repository_capacity
                        .with_label_values(&[&ns, &name])
                        .set(p.capacity_bytes as i64);
                    ctx.metrics
                        .repository_used
                        .with_label_values(&[&ns, &name])
                        .set(p.used_bytes as i64);
                    st.last_probe_time = Some(Time(Timestamp::now()));
                    (
                        Ok(format!(
                            "claim {claim} is Bound and writable; {} used of {}, {} free; {} QCOW2 files",
                            human_bytes(p.used_bytes),
                            human_bytes(p.capacity_bytes),
                            human_bytes(p.available_bytes),
                            p.qcow2_files
                        )),
                        ctx.probe_interval,
                    )
                }
                Some(Err(m)) => {
                    st.last_probe_time = Some(Time(Timestamp::now()));
                    (Err(("NotWritable", m)), Duration::from_secs(60))
                }
            }
        }
    };
    let (status, reason, message) = match outcome {
        Ok(m) => (TRUE, "Writable", m),
        Err((r, m)) => (FALSE, r, m),
    };
    conditions::set_condition(
        &mut st.conditions,
        conditions::condition(
            READY,
            status,
            reason,
            message,
            repo.metadata.generation,
            Time(Timestamp::now()),
        ),
    );
    write(&repo, &ctx, &old, st).await?;
    Ok(Action::requeue(requeue))
}

/// Runs (or collects) the probe pod: None while it runs, then the outcome.
async fn probe(
    repo: &Repository,
    ctx: &Context,
) -> Result<Option<Result<ProbeResult, String>>, Error> {
    let ns = repo.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = probe_name(repo);
    let Some(pod) = pods.get_opt(&name).await? else {
        crate::hub::ensure_service_account(
            &ctx.client,
            &ns,
            ctx.images.hub_service_account.as_deref(),
        )
        .await?;
        let pod = probe_pod(repo, &ctx.images);
        pods.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await?;
        return Ok(None);
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let outcome = match phase.as_str() {
        "Succeeded" | "Failed" => {
            let msg = termination_message(&pod).unwrap_or_default();
            match serde_json::from_str::<ProbeResult>(msg.trim()) {
                Ok(p) if p.ok => Ok(p),
                Ok(p) => Err(p.error.unwrap_or_else(|| "the volume probe failed".into())),
                Err(_) if msg.trim().is_empty() => Err(format!(
                    "probe pod {name} ended ({phase}) without a result{}",
                    pod.status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
                Err(_) => Err(format!("probe pod {name}: {}", msg.trim())),
            }
        }
        _ => return Ok(None),
    };
    delete_if_present(&pods, &name).await?;
    Ok(Some(outcome))
}

async fn write(
    repo: &Repository,
    ctx: &Context,
    old: &RepositoryStatus,
    st: RepositoryStatus,
) -> Result<(), Error> {
    if *old == st {
        return Ok(());
    }
    let ns = repo.namespace().unwrap_or_default();
    let patch = serde_json::json!({
        "apiVersion": "sendense.io/v1alpha1",
        "kind": "Repository",
        "status": st,
    });
    Api::<Repository>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &repo.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    let before = conditions::find(&old.conditions, READY).map(|c| (&c.status, &c.reason));
    if let Some(c) = conditions::find(&st.conditions, READY)
        && before != Some((&c.status, &c.reason))
    {
        crate::events::publish(
            &ctx.recorder,
            &repo.object_ref(&()),
            c.status != TRUE,
            &c.reason,
            &c.message,
            "Probe",
        )
        .await;
    }
    Ok(())
}

pub fn error_policy(repo: Arc<Repository>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(repository = %repo.name_any(), "reconcile failed: {err}");
    ctx.metrics
        .reconcile_failures
        .with_label_values(&["repository", "kube_api"])
        .inc();
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(storage: serde_json::Value) -> Repository {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "Repository",
            "metadata": {"name": "primary", "namespace": "backups", "uid": "r-1"},
            "spec": {"storage": storage}
        }))
        .expect("valid Repository")
    }

    #[test]
    fn the_probe_pod_mounts_the_claim_and_reports_through_its_termination_message() {
        let r = repo(serde_json::json!({"persistentVolumeClaim": {"claimName": "backups-data"}}));
        let pod = probe_pod(
            &r,
            &PodSettings {
                agent: "agent:1".into(),
                ..Default::default()
            },
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let vol = &spec.volumes.expect("volumes")[0];
        assert_eq!(
            vol.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("backups-data")
        );
        let cmd = spec.containers[0].command.clone().expect("command");
        assert_eq!(&cmd[..3], ["sendense-agent", "repo", "probe"]);
        assert!(cmd.contains(&"/dev/termination-log".to_string()));
        assert_eq!(
            pod.metadata.owner_references.expect("owner")[0].name,
            "primary"
        );
    }

    #[test]
    fn a_templated_claim_has_no_owner_so_backups_outlive_the_repository_object() {
        let r = repo(
            serde_json::json!({"claimTemplate": {"size": "50Gi", "storageClassName": "fast"}}),
        );
        let pvc = templated_claim(&r).expect("claim");
        assert_eq!(pvc.metadata.name.as_deref(), Some("primary-data"));
        assert!(pvc.metadata.owner_references.is_none());
        let spec = pvc.spec.expect("spec");
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        assert_eq!(
            spec.resources.and_then(|r| r.requests).expect("requests")["storage"].0,
            "50Gi"
        );
        let existing = repo(serde_json::json!({"persistentVolumeClaim": {"claimName": "x"}}));
        assert!(templated_claim(&existing).is_none());
    }

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
    }
}
