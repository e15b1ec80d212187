//! Pruning, one restore point at a time per repository: the oldest point the rules do not keep
//! (and that is not `dryRun`) is merged out of its chain by a pod running `repo prune`, which
//! journals in the point's manifest first and can be run again after any kill.
//!
//! The point's RestorePoint is annotated `sendense.io/pruning` before anything else: a backup of
//! the VM plans no new chain link while a point of its VM carries it, and a restore of one of
//! its points waits. The pod starts only when no job of the VM has not ended (a backup reading
//! or extending the chain, a restore reading it); the jobs created after the annotation see it.
//! When the pod has finished, the pruned point's RestorePoint and those of its children go (the
//! children's manifests changed: parent, backing file) and the probe, run at once, makes the
//! children's again from the volume. A pod that failed after journalling is run again (it
//! resumes); one refused before writing anything releases the point.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use sendense_contract::prune::PruneResult;
use sendense_crds::repository::RetentionStatus;
use sendense_crds::{BackupJob, Repository, RestoreJob, RestorePoint};

use crate::children::{
    ApiError, Verb, apply, delete_if_present, ensure_service_account, get, list,
};
use crate::pod_state::{self, PodPhase};
use crate::repository::Context;
use crate::resources::{PRUNE_POINT, prune_name, prune_pod};
use sendense_crds::backup_job::Phase;

/// Annotation of a RestorePoint being merged out of its chain.
pub const PRUNING: &str = "sendense.io/pruning";

/// True when `p` is being pruned.
pub fn being_pruned(p: &RestorePoint) -> bool {
    p.annotations().contains_key(PRUNING)
}

/// What this reconcile's step came to.
pub enum Step {
    /// Nothing to prune.
    Idle,
    /// Look again after this long.
    Again(Duration),
    /// A prune pod runs: look again after this long.
    Running(Duration),
    /// A point was pruned: probe the volume now (the children's RestorePoints are made again).
    Pruned,
}

fn vm_of<'a>(points: &'a [RestorePoint], uuid: &str) -> impl Iterator<Item = &'a RestorePoint> {
    points
        .iter()
        .filter(move |p| p.spec.vm.instance_uuid.eq_ignore_ascii_case(uuid))
}

async fn annotate(client: &kube::Client, ns: &str, name: &str, on: bool) -> Result<(), ApiError> {
    let api: Api<RestorePoint> = Api::namespaced(client.clone(), ns);
    let value = if on {
        serde_json::json!(k8s_openapi::jiff::Timestamp::now().to_string())
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"annotations": {PRUNING: value}}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ApiError::new::<RestorePoint>(Verb::Apply, ns, name, e)),
    }
}

/// The jobs that keep the VM's chain busy: any BackupJob or RestoreJob of it not ended.
async fn busy(
    ctx: &Context,
    ns: &str,
    points: &[RestorePoint],
    rp: &RestorePoint,
) -> Result<Option<String>, ApiError> {
    let uuid = &rp.spec.vm.instance_uuid;
    let ended = |p: Option<Phase>| matches!(p, Some(Phase::Succeeded | Phase::Failed));
    for j in list::<BackupJob>(&ctx.client, ns).await? {
        let st = j.status.as_ref();
        let of_vm = j
            .spec
            .vm
            .instance_uuid
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
            || j.spec.vm.name.as_deref() == Some(rp.spec.vm.name.as_str())
            || st
                .and_then(|s| s.vm_instance_uuid.as_deref())
                .is_some_and(|u| u.eq_ignore_ascii_case(uuid));
        if of_vm && !ended(st.and_then(|s| s.phase)) {
            return Ok(Some(format!("BackupJob {}", j.name_any())));
        }
    }
    let mine: Vec<String> = vm_of(points, uuid).map(|p| p.name_any()).collect();
    for j in list::<RestoreJob>(&ctx.client, ns).await? {
        if mine.contains(&j.spec.restore_point_ref.name)
            && !ended(j.status.as_ref().and_then(|s| s.phase))
        {
            return Ok(Some(format!("RestoreJob {}", j.name_any())));
        }
    }
    Ok(None)
}

/// One step of pruning for `repo`; `st` is the retention status being written.
pub async fn step(
    repo: &Repository,
    ctx: &Context,
    points: &[RestorePoint],
    st: &mut RetentionStatus,
) -> Result<Step, ApiError> {
    let ns = repo.namespace().unwrap_or_default();
    let pod_name = prune_name(repo);
    // The counters exist at zero from retention's first step, so an alert sees the first
    // failure as an increase.
    for result in ["succeeded", "refused", "failed"] {
        ctx.metrics
            .prunes
            .with_label_values(&[&ns, &repo.name_any(), result]);
    }
    if let Some(pod) = get::<Pod>(&ctx.client, &ns, &pod_name).await? {
        let point = pod
            .annotations()
            .get(PRUNE_POINT)
            .cloned()
            .unwrap_or_default();
        st.pruning = Some(point.clone());
        let phase = PodPhase::of(&pod);
        if pod_state::is_terminating(&pod) || !phase.ended() {
            return Ok(Step::Running(Duration::from_secs(3)));
        }
        let msg = pod_state::termination_message(&pod).unwrap_or_default();
        let result = serde_json::from_str::<PruneResult>(msg.trim()).ok();
        delete_if_present::<Pod>(&ctx.client, &ns, &pod_name).await?;
        st.pruning = None;
        return Ok(match result {
            Some(r) if r.ok => {
                // The children's manifests changed: their objects are made again by the probe.
                let gone: Vec<&RestorePoint> = points
                    .iter()
                    .filter(|p| {
                        p.name_any() == point
                            || p.spec.parent.as_ref().is_some_and(|pa| pa.name == point)
                    })
                    .collect();
                for p in gone {
                    delete_if_present::<RestorePoint>(&ctx.client, &ns, &p.name_any()).await?;
                }
                // A probe that listed the volume before the merge must not be read: the next
                // probe is a new pod.
                delete_if_present::<Pod>(&ctx.client, &ns, &crate::resources::probe_name(repo))
                    .await?;
                st.pruned += 1;
                st.bytes_freed += r.bytes_freed.max(0);
                st.last_prune = Some(format!(
                    "pruned {point}: {} bytes moved into {} child point(s), {} bytes freed, in {:.1} s",
                    r.bytes_moved,
                    r.children.len(),
                    r.bytes_freed,
                    r.seconds
                ));
                ctx.metrics
                    .retention_bytes_freed
                    .with_label_values(&[&ns, &repo.name_any()])
                    .inc_by(r.bytes_freed.max(0) as u64);
                ctx.metrics
                    .prunes
                    .with_label_values(&[&ns, &repo.name_any(), "succeeded"])
                    .inc();
                Step::Pruned
            }
            Some(r) if r.nothing_written || r.refused.is_some() => {
                annotate(&ctx.client, &ns, &point, false).await?;
                st.last_prune = Some(format!(
                    "pruning {point} was refused, nothing written: {}",
                    r.error.unwrap_or_default()
                ));
                ctx.metrics
                    .prunes
                    .with_label_values(&[&ns, &repo.name_any(), "refused"])
                    .inc();
                Step::Again(Duration::from_secs(300))
            }
            other => {
                // Journalled (or unknown): the next pod resumes it; the point stays marked.
                st.last_prune = Some(format!(
                    "pruning {point} failed and is resumed: {}",
                    other
                        .and_then(|r| r.error)
                        .unwrap_or_else(|| format!("no result: {}", msg.trim()))
                ));
                ctx.metrics
                    .prunes
                    .with_label_values(&[&ns, &repo.name_any(), "failed"])
                    .inc();
                Step::Again(Duration::from_secs(30))
            }
        });
    }
    // A point already marked (an interrupted prune) goes first; else the oldest candidate.
    let mine = || {
        points
            .iter()
            .filter(|p| p.spec.repository_ref.name == repo.name_any())
    };
    let marked = mine().find(|p| being_pruned(p));
    let next = marked.or_else(|| {
        st.prune
            .iter()
            .find(|c| !c.dry_run)
            .and_then(|c| mine().find(|p| p.name_any() == c.restore_point))
    });
    let Some(rp) = next else {
        return Ok(Step::Idle);
    };
    let was_marked = being_pruned(rp);
    if !was_marked {
        annotate(&ctx.client, &ns, &rp.name_any(), true).await?;
    }
    if let Some(job) = busy(ctx, &ns, points, rp).await? {
        if !was_marked {
            annotate(&ctx.client, &ns, &rp.name_any(), false).await?;
        }
        st.last_prune = Some(format!(
            "pruning {} waits for {job}, which uses VM {}'s chain",
            rp.name_any(),
            rp.spec.vm.name
        ));
        return Ok(Step::Again(Duration::from_secs(15)));
    }
    let account = ctx.images.hub_service_account.as_deref();
    ensure_service_account(&ctx.client, &ns, account).await?;
    let pod = prune_pod(repo, &rp.name_any(), &rp.spec.directory, &ctx.images);
    apply(&ctx.client, &ns, &pod).await?;
    st.pruning = Some(rp.name_any());
    Ok(Step::Running(Duration::from_secs(3)))
}
