//! A repository's objects: the probe pod that proves the volume writable and measures it, and
//! the claim created from `spec.storage.claimTemplate`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use sendense_crds::Repository;
use sendense_crds::repository::AccessMode;

use super::layout::{REPOSITORY_MOUNT, agent_container, volume_pod_spec};
use super::{
    PodSettings, TERMINATION_LOG, claim_name, harden, owned_meta, probe_name, repository_labels,
};
use sendense_contract::cli::RepoProbeArgs;

/// The probe pod: removes the orphaned attempt directories named in the repository's status
/// (each only if still left unchanged for `orphan_min_idle_seconds`), writes, reads back and
/// removes a file on the volume, and measures it; its result is its termination message.
pub fn probe_pod(repo: &Repository, images: &PodSettings, orphan_min_idle_seconds: u64) -> Pod {
    // The manifests go to the pod's log, which the operator reads: the restore points on the
    // volume, also those a lost cluster made, and the attempt directories without one.
    let args = RepoProbeArgs {
        dir: REPOSITORY_MOUNT.into(),
        list_manifests: true,
        result_file: Some(TERMINATION_LOG.into()),
        remove_orphans: repo
            .status
            .as_ref()
            .map(|s| s.orphaned_attempts.clone())
            .unwrap_or_default(),
        orphan_min_idle_seconds,
    };
    let mut probe = agent_container("probe".into(), args.to_args(), images);
    probe.termination_message_policy = Some("FallbackToLogsOnError".into());
    harden(Pod {
        metadata: owned_meta(repo, probe_name(repo), repository_labels(repo)),
        spec: Some(PodSpec {
            containers: vec![probe],
            active_deadline_seconds: Some(300),
            termination_grace_period_seconds: Some(5),
            ..volume_pod_spec(&claim_name(repo), images)
        }),
        status: None,
    })
}

/// The prune pod's name: one prune at a time per repository.
pub fn prune_name(repo: &Repository) -> String {
    format!("{}-prune", repo.name_any())
}

/// Annotation of the prune pod: the RestorePoint it merges out of its chain.
pub const PRUNE_POINT: &str = "sendense.io/prune-point";

/// The pod that merges restore point `point` (its directory `dir`) out of its chain
/// (`repo prune`, journalled and resumable: a pod killed midway is simply run again); its result
/// is its termination message. No deadline beyond qemu-img's own, which `repo prune` sets by
/// disk size.
pub fn prune_pod(repo: &Repository, point: &str, dir: &str, images: &PodSettings) -> Pod {
    let mut args = sendense_contract::cli::RepoPruneArgs::new(REPOSITORY_MOUNT, dir);
    args.result_file = Some(TERMINATION_LOG.into());
    let mut c = agent_container("prune".into(), args.to_args(), images);
    c.termination_message_policy = Some("FallbackToLogsOnError".into());
    let mut meta = owned_meta(repo, prune_name(repo), repository_labels(repo));
    meta.annotations = Some([(PRUNE_POINT.to_owned(), point.to_owned())].into());
    harden(Pod {
        metadata: meta,
        spec: Some(PodSpec {
            containers: vec![c],
            termination_grace_period_seconds: Some(30),
            ..volume_pod_spec(&claim_name(repo), images)
        }),
        status: None,
    })
}

/// The claim Sendense creates from `spec.storage.claimTemplate`. It carries no owner
/// reference: deleting the Repository object must never delete the backups on its volume.
pub fn templated_claim(repo: &Repository) -> Option<PersistentVolumeClaim> {
    let t = repo.spec.storage.claim_template.as_ref()?;
    let access_modes = t.access_modes.iter().map(|m| {
        match m {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
            AccessMode::ReadWriteMany => "ReadWriteMany",
        }
        .to_owned()
    });
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(repo)),
            namespace: repo.metadata.namespace.clone(),
            labels: Some(repository_labels(repo)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access_modes.collect()),
            storage_class_name: t.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
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

#[cfg(test)]
#[path = "repository_tests.rs"]
mod tests;
