//! A RestoreJob's objects: the claims it creates for the restored disks (never owned by the
//! job: deleting the RestoreJob keeps the disks), the restore pod (`sendense-agent restore` or
//! `files get`, the repository claim mounted read-only), and the KubeVirt VirtualMachine
//! rendered for the restored claims.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    Pod, PodSpec, Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use sendense_contract::cli::{
    DiskPath, DiskSha256, FilesGetArgs, RestoreArgs, RestoreTarget, RestoreTargetKind,
};
use sendense_crds::RestoreJob;
use sendense_crds::restore_job::{ClaimAccessMode, FilesFormat, FilesTarget, VolumeMode};

use super::hardening;
use super::{
    ATTEMPT_LABEL, MANAGED_BY, PROGRESS_PORT, PodSettings, REPOSITORY_MOUNT, TERMINATION_LOG,
    harden, owned_meta, sendense_labels,
};

/// Where a Filesystem-mode target claim of disk K is mounted: `/targets/K`, its image
/// `/targets/K/disk.img`.
pub const TARGETS_DIR: &str = "/targets";
/// The image file on a Filesystem-mode claim (the name KubeVirt's PVC disks use).
pub const DISK_IMAGE: &str = "disk.img";
/// Where a Block-mode target claim of disk K appears: `/dev/sendense/K`.
pub const DEVICES_DIR: &str = "/dev/sendense";
/// Where a files restore's claim is mounted.
pub const FILES_TARGET: &str = "/target";
/// Seconds the restore pod gets after SIGTERM.
const GRACE_SECONDS: i64 = 30;
/// Label naming the RestoreJob an object belongs to.
pub const RESTORE_JOB_LABEL: &str = "sendense.io/restorejob";

/// Deterministic name of a RestoreJob's pod.
pub fn restore_pod_name(job: &RestoreJob) -> String {
    format!("{}-restore", job.name_any())
}

/// The name of the claim Sendense creates for disk `key` when the spec names none.
pub fn default_claim_name(job: &RestoreJob, key: i32) -> String {
    format!("{}-disk-{key}", job.name_any())
}

/// Labels of a RestoreJob's objects.
pub fn restore_labels(job: &RestoreJob, component: &str) -> BTreeMap<String, String> {
    sendense_labels([
        ("app.kubernetes.io/component", component.to_owned()),
        (RESTORE_JOB_LABEL, job.name_any()),
    ])
}

/// Bytes a Filesystem-mode claim is asked for to hold a disk image of `capacity` bytes: the
/// file system's own metadata and the blocks an ext4 reserves for root (5% by default; the
/// restore pod does not run as root) come on top: 6% plus 64 MiB, rounded up to a MiB.
pub fn filesystem_claim_bytes(capacity: i64) -> i64 {
    const MIB: u64 = 1 << 20;
    let c = capacity.max(0) as u64;
    let want = c + c.div_ceil(100) * 6 + 64 * MIB;
    (want.div_ceil(MIB) * MIB) as i64
}

/// Bytes a Block-mode claim is asked for: the disk's capacity, rounded up to a MiB.
pub fn block_claim_bytes(capacity: i64) -> i64 {
    const MIB: u64 = 1 << 20;
    ((capacity.max(0) as u64).div_ceil(MIB) * MIB) as i64
}

/// What a claim Sendense creates for one disk looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct NewClaim {
    pub name: String,
    pub bytes: i64,
    pub mode: VolumeMode,
    pub access: ClaimAccessMode,
    pub storage_class: Option<String>,
}

/// A claim for a restored disk, labelled with the job but not owned by it.
pub fn restore_claim(job: &RestoreJob, key: i32, c: &NewClaim) -> PersistentVolumeClaim {
    let mut labels = restore_labels(job, "restored-disk");
    labels.insert("sendense.io/device-key".into(), key.to_string());
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(c.name.clone()),
            namespace: job.namespace(),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![
                match c.access {
                    ClaimAccessMode::ReadWriteOnce => "ReadWriteOnce",
                    ClaimAccessMode::ReadWriteOncePod => "ReadWriteOncePod",
                    ClaimAccessMode::ReadWriteMany => "ReadWriteMany",
                }
                .into(),
            ]),
            storage_class_name: c.storage_class.clone(),
            volume_mode: Some(volume_mode_str(c.mode).into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(c.bytes.to_string()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

pub fn volume_mode_str(mode: VolumeMode) -> &'static str {
    match mode {
        VolumeMode::Filesystem => "Filesystem",
        VolumeMode::Block => "Block",
    }
}

/// One disk of a `pvc` restore, as planned in the job's status.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskToRestore {
    pub key: i32,
    /// Its top QCOW2 file, relative to the repository volume's root.
    pub file: String,
    /// SHA-256 of the disk at the restore point (its manifest's).
    pub sha256: String,
    pub claim: String,
    pub mode: VolumeMode,
}

/// The read-only repository volume and its mount.
pub(super) fn repository_volume(claim: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "repository".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                read_only: Some(true),
            }),
            ..Default::default()
        },
        VolumeMount {
            name: "repository".into(),
            mount_path: REPOSITORY_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        },
    )
}

fn claim_volume(name: &str, claim: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: Some(false),
        }),
        ..Default::default()
    }
}

pub(super) fn mounted(relative: &str) -> std::path::PathBuf {
    format!("{REPOSITORY_MOUNT}/{}", relative.trim_start_matches('/')).into()
}

/// The restore pod of a `pvc` target: every disk restored at once, each target read back and
/// compared with the restore point's SHA-256.
pub fn restore_pod(
    job: &RestoreJob,
    attempt: i32,
    repository_claim: &str,
    disks: &[DiskToRestore],
    images: &PodSettings,
) -> Pod {
    let (repo_volume, repo_mount) = repository_volume(repository_claim);
    let mut volumes = vec![repo_volume];
    let mut mounts = vec![repo_mount];
    let mut devices = Vec::new();
    let mut args = RestoreArgs::new(Vec::new(), Vec::new());
    for d in disks {
        let volume = format!("target-{}", d.key);
        volumes.push(claim_volume(&volume, &d.claim));
        args.sources.push(DiskPath {
            key: d.key,
            path: mounted(&d.file),
        });
        let kind = match d.mode {
            VolumeMode::Filesystem => {
                let dir = format!("{TARGETS_DIR}/{}", d.key);
                mounts.push(VolumeMount {
                    name: volume,
                    mount_path: dir.clone(),
                    ..Default::default()
                });
                RestoreTargetKind::File(format!("{dir}/{DISK_IMAGE}").into())
            }
            VolumeMode::Block => {
                let path = format!("{DEVICES_DIR}/{}", d.key);
                devices.push(VolumeDevice {
                    name: volume,
                    device_path: path.clone(),
                });
                RestoreTargetKind::Device(path.into())
            }
        };
        args.targets.push(RestoreTarget { key: d.key, kind });
        args.expect_sha256.push(DiskSha256 {
            key: d.key,
            sha256: d.sha256.to_ascii_lowercase(),
        });
    }
    args.result_file = Some(TERMINATION_LOG.into());
    args.status_addr = Some(format!("$(POD_IP):{PROGRESS_PORT}"));
    let mut container = container(args.to_args(), mounts, images);
    let block = !devices.is_empty();
    container.volume_devices = block.then_some(devices);
    let mut pod = pod(job, attempt, container, volumes, images);
    if block {
        // fsGroup does not reach a block device: the container runtime gives a device to the
        // container's user and group when it is set to (containerd's and CRI-O's
        // `device_ownership_from_security_context`, which KubeVirt's CDI needs as well), so they
        // are named here rather than left to the image.
        for c in pod.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
            let sc = c.security_context.get_or_insert_with(Default::default);
            sc.run_as_user = Some(hardening::FS_GROUP);
            sc.run_as_group = Some(hardening::FS_GROUP);
        }
    }
    pod
}

/// The restore pod of a `files` target: `files get` from the restore point's directory into
/// the claim.
pub fn files_pod(
    job: &RestoreJob,
    attempt: i32,
    repository_claim: &str,
    restore_point_dir: &str,
    target: &FilesTarget,
    images: &PodSettings,
) -> Pod {
    let (repo_volume, repo_mount) = repository_volume(repository_claim);
    let volumes = vec![repo_volume, claim_volume("target", &target.claim_name)];
    let mounts = vec![
        repo_mount,
        VolumeMount {
            name: "target".into(),
            mount_path: FILES_TARGET.into(),
            ..Default::default()
        },
    ];
    let dir = files_directory(job, target);
    let args = FilesGetArgs {
        restore_point: Some(mounted(restore_point_dir)),
        image: None,
        disks: job.spec.disks.clone().unwrap_or_default(),
        volumes: target.volume.iter().cloned().collect(),
        to: (target.format == FilesFormat::Directory)
            .then(|| format!("{FILES_TARGET}/{dir}").into()),
        tar: (target.format == FilesFormat::Tar)
            .then(|| format!("{FILES_TARGET}/{dir}.tar").into()),
        request_timeout: sendense_contract::cli::DEFAULT_REQUEST_TIMEOUT_SECONDS,
        result_file: Some(TERMINATION_LOG.into()),
        patterns: target.paths.clone(),
    };
    let c = container(args.to_args(), mounts, images);
    pod(job, attempt, c, volumes, images)
}

/// Where a files restore writes on its claim (relative to the claim's root): the spec's
/// `directory`, or the job's name; with `Tar`, `<that>.tar`.
pub fn files_directory(job: &RestoreJob, target: &FilesTarget) -> String {
    target
        .directory
        .clone()
        .unwrap_or_else(|| job.name_any())
        .trim_end_matches('/')
        .to_owned()
}

fn container(args: Vec<String>, mounts: Vec<VolumeMount>, images: &PodSettings) -> Container {
    super::progress_container(
        "restore",
        args,
        mounts,
        images.hub_resources.clone(),
        images,
    )
}

pub(super) fn pod(
    job: &RestoreJob,
    attempt: i32,
    container: Container,
    volumes: Vec<Volume>,
    images: &PodSettings,
) -> Pod {
    let mut labels = restore_labels(job, "restore");
    labels.insert(ATTEMPT_LABEL.into(), attempt.to_string());
    harden(Pod {
        metadata: owned_meta(job, restore_pod_name(job), labels),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            // It reads a volume and writes claims; it talks to no API: the hub-side identity.
            service_account_name: images.hub_service_account.clone(),
            automount_service_account_token: Some(false),
            active_deadline_seconds: job.spec.active_deadline_seconds,
            termination_grace_period_seconds: Some(GRACE_SECONDS),
            ..Default::default()
        }),
        status: None,
    })
}

/// A KubeVirt VirtualMachine (YAML) booting from the restored claims: the disks in device-key
/// order, the first one boots; `runStrategy: Halted`, so applying it starts nothing until the
/// user does.
pub fn kubevirt_vm(
    job: &RestoreJob,
    name: &str,
    memory: &str,
    cpus: i32,
    claims: &[(i32, String)],
) -> String {
    let mut sorted = claims.to_vec();
    sorted.sort();
    let disks: Vec<serde_json::Value> = sorted
        .iter()
        .enumerate()
        .map(|(i, (key, _))| {
            let mut d =
                serde_json::json!({"name": format!("disk-{key}"), "disk": {"bus": "virtio"}});
            if i == 0 {
                d["bootOrder"] = 1.into();
            }
            d
        })
        .collect();
    let volumes: Vec<serde_json::Value> = sorted
        .iter()
        .map(|(key, claim)| {
            serde_json::json!({"name": format!("disk-{key}"), "persistentVolumeClaim": {"claimName": claim}})
        })
        .collect();
    let vm = serde_json::json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": job.namespace(),
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, RESTORE_JOB_LABEL: job.name_any()},
        },
        "spec": {
            "runStrategy": "Halted",
            "template": {"spec": {
                "domain": {
                    "cpu": {"cores": cpus},
                    "memory": {"guest": memory},
                    "devices": {"disks": disks},
                },
                "volumes": volumes,
            }},
        },
    });
    serde_yaml::to_string(&vm).unwrap_or_default()
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
