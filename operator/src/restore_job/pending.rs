//! Pending: the restore point, its Repository, the disks and the claims checked (then the
//! missing claims created), and the plan into status.

use super::*;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use sendense_crds::backup_job::Phase;
use sendense_crds::restore_job::{RestoredDiskStatus, VolumeMode};
use sendense_crds::{Repository, RestoreJob, RestorePoint, SourceNode};

use crate::children::{create_if_missing, get};
use crate::resources::{
    NewClaim, block_claim_bytes, default_claim_name, filesystem_claim_bytes, restore_claim,
};
use crate::status::now;

pub fn quantity_bytes(q: &str) -> Option<i64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let bytes = (value * mult).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < i64::MAX as f64).then_some(bytes as i64)
}

/// A claim's size: its capacity once bound, else what it asks for.
pub(super) fn claim_bytes(c: &PersistentVolumeClaim) -> Option<i64> {
    let from = |m: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >| {
        m.and_then(|m| m.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
    };
    from(c.status.as_ref().and_then(|s| s.capacity.as_ref())).or_else(|| {
        from(
            c.spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref()),
        )
    })
}

pub(super) fn claim_mode(c: &PersistentVolumeClaim) -> VolumeMode {
    match c.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) {
        Some("Block") => VolumeMode::Block,
        _ => VolumeMode::Filesystem,
    }
}

/// Pending: the references, the claims, and the plan into status.
pub(super) async fn start(job: &RestoreJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let mut u = Update::new(job);
    if u.status.start_time.is_none() {
        u.status.start_time = Some(now());
    }
    u.status.target_kind = Some(
        match target_kind(job) {
            "files" => "Files",
            "vsphere" => "Vsphere",
            _ => "Pvc",
        }
        .into(),
    );
    let rp_name = &job.spec.restore_point_ref.name;
    let Some(rp) = get::<RestorePoint>(&ctx.client, &ns, rp_name)
        .await
        .map_err(api_err(job))?
    else {
        let message = format!(
            "RestorePoint {rp_name} does not exist in namespace {ns} (`kubectl get restorepoints -n {ns}` lists them); nothing was written"
        );
        return fail(job, ctx, u, FailureReason::RestorePointNotFound, message).await;
    };
    u.status.vm_name = Some(rp.spec.vm.name.clone());
    if let Some(p) = crate::children::list::<RestorePoint>(&ctx.client, &ns)
        .await
        .map_err(api_err(job))?
        .iter()
        .find(|p| {
            p.spec
                .vm
                .instance_uuid
                .eq_ignore_ascii_case(&rp.spec.vm.instance_uuid)
                && crate::retention::prune::being_pruned(p)
        })
    {
        u.set(
            &Running::VmBusy,
            format!(
                "retention is merging restore point {} out of VM {}'s chain; this restore starts when it is done",
                p.name_any(),
                rp.spec.vm.name
            ),
        );
        ctx.write(u, job).await?;
        return Ok(requeue(15));
    }
    let repo_name = &rp.spec.repository_ref.name;
    u.status.repository = Some(repo_name.clone());
    if get::<Repository>(&ctx.client, &ns, repo_name)
        .await
        .map_err(api_err(job))?
        .is_none()
    {
        let message = format!(
            "Repository {repo_name}, which holds RestorePoint {rp_name}, does not exist in namespace {ns}; nothing was written"
        );
        return fail(job, ctx, u, FailureReason::RepositoryNotFound, message).await;
    }
    let have: Vec<i32> = rp.spec.disks.iter().map(|d| d.device_key).collect();
    let keys: Vec<i32> = match &job.spec.disks {
        Some(keys) => keys.clone(),
        None => have.clone(),
    };
    if let Some(k) = keys.iter().find(|k| !have.contains(k)) {
        let message = format!(
            "spec.disks: RestorePoint {rp_name} has no disk {k} (its disks: {have:?}); nothing was written"
        );
        return fail(job, ctx, u, FailureReason::DiskNotFound, message).await;
    }
    if let Some(pvc) = &job.spec.target.pvc
        && let Some(c) = pvc.claims.iter().find(|c| !keys.contains(&c.device_key))
    {
        let message = format!(
            "spec.target.pvc.claims: disk {} is not restored (restored: {keys:?}); nothing was written",
            c.device_key
        );
        return fail(job, ctx, u, FailureReason::DiskNotFound, message).await;
    }

    if let Some(vs) = &job.spec.target.vsphere {
        let sn_name = vsphere_source_node(vs, &rp);
        let Some(sn) = get::<SourceNode>(&ctx.client, &ns, &sn_name)
            .await
            .map_err(api_err(job))?
        else {
            let field = if vs.source_node_ref.is_some() {
                "spec.target.vsphere.sourceNodeRef"
            } else {
                "the restore point's SourceNode (set spec.target.vsphere.sourceNodeRef to another)"
            };
            let message = format!(
                "{field}: SourceNode {sn_name} does not exist in namespace {ns}; nothing was written"
            );
            return fail(job, ctx, u, FailureReason::SourceNodeNotFound, message).await;
        };
        if vs.new_vm.is_none() {
            match super::lease::take(job, ctx, &sn, &rp).await? {
                super::lease::Taken::Yes(lease) => u.status.vm_lease = Some(lease),
                super::lease::Taken::Wait(reason, message, again) => {
                    u.set(&reason, message);
                    ctx.write(u, job).await?;
                    return Ok(requeue(again));
                }
                super::lease::Taken::Fail(reason, message) => {
                    return fail(job, ctx, u, reason, message).await;
                }
            }
        }
        let planned: Vec<RestoredDiskStatus> = keys
            .iter()
            .filter_map(|k| rp.spec.disks.iter().find(|d| d.device_key == *k))
            .map(|d| RestoredDiskStatus {
                device_key: d.device_key,
                capacity_bytes: d.capacity_bytes,
                ..Default::default()
            })
            .collect();
        u.status.bytes_total = Some(planned.iter().map(|d| d.capacity_bytes).sum());
        u.status.bytes_done = Some(0);
        u.status.progress = Some("0%".into());
        u.status.disks = planned;
        u.status.vm = Some(sendense_crds::restore_job::RestoredVmStatus {
            name: match &vs.new_vm {
                Some(n) => n.name.clone(),
                None => rp.spec.vm.name.clone(),
            },
            instance_uuid: if vs.new_vm.is_some() {
                String::new()
            } else {
                rp.spec.vm.instance_uuid.clone()
            },
            created: vs.new_vm.is_some(),
            ..Default::default()
        });
        return started(job, ctx, u).await;
    }

    if let Some(files) = &job.spec.target.files {
        let claim = &files.claim_name;
        if get::<PersistentVolumeClaim>(&ctx.client, &ns, claim)
            .await
            .map_err(api_err(job))?
            .is_none()
        {
            let waited = super::lease::age_seconds(job);
            let message = format!(
                "spec.target.files.claimName: PersistentVolumeClaim {claim} does not exist in namespace {ns}; create it (the files are written to it)"
            );
            if waited > job.spec.progress_deadline_seconds {
                let message = format!(
                    "{message}; waited {waited} s (spec.progressDeadlineSeconds {}); nothing was written",
                    job.spec.progress_deadline_seconds
                );
                return fail(job, ctx, u, FailureReason::ClaimNotFound, message).await;
            }
            u.set(&Running::ClaimNotFound, message);
            ctx.write(u, job).await?;
            return Ok(requeue(5));
        }
        u.status.bytes_total = None;
        return started(job, ctx, u).await;
    }

    // A pvc target: every existing claim is checked before any claim is created.
    let pvc = job.spec.target.pvc.clone().unwrap_or_else(|| {
        // The CRD's CEL rule requires exactly one target; an object admitted before that rule
        // (or without it) is read as a pvc target with defaults.
        sendense_crds::restore_job::PvcTarget {
            claims: Vec::new(),
            storage_class_name: None,
            volume_mode: VolumeMode::Filesystem,
            access_mode: Default::default(),
            kube_virt: None,
        }
    });
    let mut planned = Vec::new();
    let mut missing = Vec::new();
    for key in &keys {
        let disk = rp
            .spec
            .disks
            .iter()
            .find(|d| d.device_key == *key)
            .expect("checked above");
        let name = pvc
            .claims
            .iter()
            .find(|c| c.device_key == *key)
            .map(|c| c.claim_name.clone())
            .unwrap_or_else(|| default_claim_name(job, *key));
        let existing = get::<PersistentVolumeClaim>(&ctx.client, &ns, &name)
            .await
            .map_err(api_err(job))?;
        let created_by_us = existing.as_ref().is_some_and(|c| {
            c.labels().get(crate::resources::RESTORE_JOB_LABEL) == Some(&job.name_any())
        });
        match existing {
            Some(c) => {
                let mode = claim_mode(&c);
                let size = claim_bytes(&c).unwrap_or(0);
                let need = match mode {
                    VolumeMode::Filesystem => disk.capacity_bytes,
                    VolumeMode::Block => disk.capacity_bytes,
                };
                if size < need {
                    let message = format!(
                        "PersistentVolumeClaim {name} holds {} ({size} bytes); disk {key} needs {} ({need} bytes){}: give a larger claim in spec.target.pvc.claims, or leave the disk out of it and Sendense creates one; nothing was written",
                        human_bytes(size),
                        human_bytes(need),
                        if mode == VolumeMode::Filesystem {
                            " as disk.img, plus the file system's own overhead"
                        } else {
                            ""
                        }
                    );
                    return fail(job, ctx, u, FailureReason::ClaimTooSmall, message).await;
                }
                planned.push(RestoredDiskStatus {
                    device_key: *key,
                    claim_name: name,
                    volume_mode: Some(mode),
                    created: created_by_us,
                    capacity_bytes: disk.capacity_bytes,
                    ..Default::default()
                });
            }
            None => {
                let bytes = match pvc.volume_mode {
                    VolumeMode::Filesystem => filesystem_claim_bytes(disk.capacity_bytes),
                    VolumeMode::Block => block_claim_bytes(disk.capacity_bytes),
                };
                missing.push((
                    *key,
                    NewClaim {
                        name: name.clone(),
                        bytes,
                        mode: pvc.volume_mode,
                        access: pvc.access_mode,
                        storage_class: pvc.storage_class_name.clone(),
                    },
                ));
                planned.push(RestoredDiskStatus {
                    device_key: *key,
                    claim_name: name,
                    volume_mode: Some(pvc.volume_mode),
                    created: true,
                    capacity_bytes: disk.capacity_bytes,
                    ..Default::default()
                });
            }
        }
    }
    for (key, c) in &missing {
        let claim = restore_claim(job, *key, c);
        if let Err(e) = create_if_missing(&ctx.client, &ns, &claim).await {
            if let Some(why) = e.refusal() {
                let message = format!(
                    "the API server refused PersistentVolumeClaim {}: {why}",
                    c.name
                );
                u.set(&Running::PodRejected, message);
                ctx.write(u, job).await?;
                return Ok(requeue(REFUSED_RETRY_SECONDS));
            }
            return Err(api_err(job)(e));
        }
    }
    u.status.bytes_total = Some(planned.iter().map(|d| d.capacity_bytes).sum());
    u.status.bytes_done = Some(0);
    u.status.progress = Some("0%".into());
    u.status.disks = planned;
    started(job, ctx, u).await
}

pub(super) async fn started(
    job: &RestoreJob,
    ctx: &Context,
    mut u: Update<'_>,
) -> Result<Action, Error> {
    u.status.phase = Some(Phase::Running);
    u.status.attempts = Some(1);
    u.set(
        &Running::Starting,
        format!(
            "restoring RestorePoint {} ({})",
            job.spec.restore_point_ref.name,
            match (&job.spec.target.files, &job.spec.target.vsphere) {
                (Some(f), _) => format!("files into PersistentVolumeClaim {}", f.claim_name),
                (None, Some(v)) => match &v.new_vm {
                    Some(n) => format!("disks into the new vSphere VM {}", n.name),
                    None => format!(
                        "disks into VM {} in place",
                        u.status.vm.as_ref().map(|v| v.name.as_str()).unwrap_or("?")
                    ),
                },
                (None, None) => {
                    let claims: Vec<String> = u
                        .status
                        .disks
                        .iter()
                        .map(|d| format!("disk {} -> {}", d.device_key, d.claim_name))
                        .collect();
                    claims.join(", ")
                }
            }
        ),
    );
    ctx.write(u, job).await?;
    Ok(requeue(1))
}
