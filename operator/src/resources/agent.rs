//! The agent pod of one BackupJob: `sendense-agent backup` against the SourceNode's vCenter,
//! with the credentials Secret mounted as files (never in arguments, logs or status), the
//! datastores mounted for the nfs transport, and the hub's exports as targets.

use crate::nbd_tls;
use crate::source_policy::NotAllowed;
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, KeyToPath, Pod, PodSpec, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use sendense_crds::source_node::{DatastoreReader, TransportType, VddkMode as CrdVddkMode};
use sendense_crds::{BackupJob, SourceNode};

use super::{PodSettings, TERMINATION_LOG, agent_name, harden, labels, owned_meta};
use sendense_contract::cli::{
    BackupArgs, BaseChangeId, DatastoreMount, DiskTarget, Transport, VddkMode,
};

pub const CREDENTIALS_DIR: &str = "/etc/sendense/credentials";
pub const CA_DIR: &str = "/etc/sendense/vcenter-ca";
pub const DATASTORES_DIR: &str = "/datastores";
/// Seconds the agent gets after SIGTERM to stop copying and remove its snapshot.
pub const AGENT_GRACE_SECONDS: i64 = 120;
/// Port of the agent's progress endpoint (on its pod IP).
pub const PROGRESS_PORT: u16 = 9090;

/// A read-only mount of volume `name` at `path`.
fn read_only(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn key_to_path(key: &str, path: &str) -> KeyToPath {
    KeyToPath {
        key: key.into(),
        path: path.into(),
        ..Default::default()
    }
}

/// Seconds left of the job's `spec.activeDeadlineSeconds` at `now`, counted from the start of
/// its first attempt (at least 1); the whole deadline before it started; None without one.
pub fn seconds_left(job: &BackupJob, now: k8s_openapi::jiff::Timestamp) -> Option<i64> {
    let limit = job.spec.active_deadline_seconds?;
    let Some(started) = job.status.as_ref().and_then(|s| s.start_time.as_ref()) else {
        return Some(limit);
    };
    Some((limit - (now.as_second() - started.0.as_second())).max(1))
}

/// The agent pod: `targets`, each disk's hub export; `base_change_ids`, the change ID each
/// incremental disk starts from. Refused when the SourceNode asks for a datastore volume or a
/// toleration the operator's settings do not allow (crate::source_policy).
pub fn agent_pod(
    job: &BackupJob,
    source: &SourceNode,
    targets: Vec<DiskTarget>,
    base_change_ids: Vec<BaseChangeId>,
    images: &PodSettings,
) -> Result<Pod, NotAllowed> {
    let vc = &source.spec.vcenter;
    let mut args = BackupArgs::new(&vc.url, &source.spec.datacenter, job.name_any());
    // The CRD's CEL rule requires exactly one of vm.name and vm.instanceUuid.
    args.vm = job.spec.vm.name.clone();
    if args.vm.is_none() {
        args.vm_uuid = job.spec.vm.instance_uuid.clone();
    }
    args.credentials_dir = Some(CREDENTIALS_DIR.into());
    args.targets = targets;
    args.base_change_ids = base_change_ids;
    args.result_file = Some(TERMINATION_LOG.into());
    // Progress for the operator, on the pod's own IP.
    args.status_addr = Some(format!("$(POD_IP):{PROGRESS_PORT}"));
    args.quiesce = job.spec.quiesce;
    args.job_uid = job.uid();
    args.skip_verify = !job.spec.verify;
    args.max_bandwidth_mbps = source
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.max_bandwidth_mbps)
        .and_then(|m| u32::try_from(m).ok());
    // What is left of the job's deadline (retries included) when the pod is made.
    let deadline = seconds_left(job, k8s_openapi::jiff::Timestamp::now());
    args.deadline_seconds = deadline.and_then(|d| u64::try_from(d).ok());

    let access = vcenter_access(source, images, false)?;
    let mut volumes = access.volumes;
    let mut mounts = access.mounts;
    args.thumbprint = access.thumbprint;
    args.ca_file = access.ca_file;
    args.insecure_skip_verify = access.insecure_skip_verify;
    args.transport = access.transport;
    args.datastores = access.datastores;
    if let Some(modes) = access.vddk_modes {
        args.vddk_modes = modes;
    }
    // The attempt's client certificate and the CA that signed the hub's (not the hub's key).
    volumes.push(Volume {
        name: "nbd-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(nbd_tls::secret_name(job)),
            items: Some(
                [
                    nbd_tls::CA_CERT_FILE,
                    nbd_tls::CLIENT_CERT_FILE,
                    nbd_tls::CLIENT_KEY_FILE,
                ]
                .iter()
                .map(|f| key_to_path(f, f))
                .collect(),
            ),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    });
    mounts.push(read_only("nbd-tls", nbd_tls::TLS_DIR));
    args.tls_dir = Some(nbd_tls::TLS_DIR.into());

    let placement = source.spec.placement.clone().unwrap_or_default();
    let pod = harden(Pod {
        metadata: owned_meta(job, agent_name(job), labels(job, "agent")),
        spec: Some(PodSpec {
            containers: vec![super::progress_container(
                "agent",
                args.to_args(),
                mounts,
                images.agent_resources.clone(),
                images,
            )],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            service_account_name: images.agent_service_account.clone(),
            automount_service_account_token: Some(false),
            active_deadline_seconds: deadline.map(|d| d + AGENT_GRACE_SECONDS),
            termination_grace_period_seconds: Some(AGENT_GRACE_SECONDS),
            node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
            tolerations: (!placement.tolerations.is_empty()).then_some(placement.tolerations),
            ..Default::default()
        }),
        status: None,
    });
    let reader = source
        .spec
        .transport
        .nfs
        .as_ref()
        .and_then(|n| n.read_as.as_ref());
    Ok(match reader {
        Some(r) => read_as(pod, r),
        None => pod,
    })
}

/// What a pod needs to reach a SourceNode's vCenter and datastores: the credentials Secret
/// (files, never arguments), the CA, the datastores (read-only for backups; `writable` for a
/// restore into vSphere), and the transport's settings.
pub struct VCenterAccess {
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
    pub thumbprint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub insecure_skip_verify: bool,
    pub transport: Transport,
    pub datastores: Vec<DatastoreMount>,
    /// None: the agent's default.
    pub vddk_modes: Option<Vec<VddkMode>>,
}

pub fn vcenter_access(
    source: &SourceNode,
    images: &PodSettings,
    writable: bool,
) -> Result<VCenterAccess, NotAllowed> {
    let vc = &source.spec.vcenter;
    let creds = &vc.credentials_secret_ref;
    let mut access = VCenterAccess {
        volumes: vec![Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(creds.name.clone()),
                items: Some(vec![
                    key_to_path(&creds.username_key, "username"),
                    key_to_path(&creds.password_key, "password"),
                ]),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        }],
        mounts: vec![read_only("credentials", CREDENTIALS_DIR)],
        thumbprint: None,
        ca_file: None,
        insecure_skip_verify: false,
        transport: Transport::Nfs,
        datastores: Vec::new(),
        vddk_modes: None,
    };
    let tls = &vc.tls;
    if let Some(t) = &tls.thumbprint {
        access.thumbprint = Some(t.clone());
    } else if let Some(ca) = &tls.ca_config_map_ref {
        access.volumes.push(Volume {
            name: "vcenter-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![key_to_path(&ca.key, "ca.crt")]),
                ..Default::default()
            }),
            ..Default::default()
        });
        access.mounts.push(read_only("vcenter-ca", CA_DIR));
        access.ca_file = Some(format!("{CA_DIR}/ca.crt").into());
    } else if tls.insecure_skip_verify == Some(true) {
        access.insecure_skip_verify = true;
    }
    let transport = &source.spec.transport;
    match transport.type_ {
        TransportType::Nfs => {
            access.transport = Transport::Nfs;
            let datastores = if writable {
                images.source_policy.writable_datastores(source)?
            } else {
                images.source_policy.datastores(source)?
            };
            for (i, ds) in datastores.into_iter().enumerate() {
                let name = format!("datastore-{i}");
                let path = format!("{DATASTORES_DIR}/{i}");
                access.volumes.push(Volume {
                    name: name.clone(),
                    ..ds.volume
                });
                access.mounts.push(VolumeMount {
                    name: name.clone(),
                    mount_path: path.clone(),
                    read_only: Some(!writable),
                    ..Default::default()
                });
                access.datastores.push(DatastoreMount {
                    name: ds.name,
                    dir: path.into(),
                });
            }
        }
        TransportType::Vddk => {
            access.transport = Transport::Vddk;
            let modes: Vec<VddkMode> = transport
                .vddk
                .iter()
                .flat_map(|v| v.modes.iter())
                .map(|m| match m {
                    CrdVddkMode::Nbdssl => VddkMode::Nbdssl,
                    CrdVddkMode::Nbd => VddkMode::Nbd,
                    CrdVddkMode::Hotadd => VddkMode::Hotadd,
                    CrdVddkMode::San => VddkMode::San,
                })
                .collect();
            access.vddk_modes = (!modes.is_empty()).then_some(modes);
        }
    }
    images.source_policy.placement(source)?;
    Ok(access)
}

/// The agent as the user and groups the SourceNode reads its datastores as
/// (`transport.nfs.readAs`). The repository is not the agent's to write (the hub writes it), so
/// `fsGroup` stays; root (`user: 0`) lifts `runAsNonRoot`, and such a pod needs a namespace
/// that allows it (Pod Security `baseline`).
pub fn read_as(mut pod: Pod, reader: &DatastoreReader) -> Pod {
    if let Some(psc) = pod.spec.as_mut().and_then(|s| s.security_context.as_mut()) {
        if let Some(user) = reader.user {
            psc.run_as_user = Some(user);
            if user == 0 {
                psc.run_as_non_root = Some(false);
            }
        }
        if let Some(group) = reader.group {
            psc.run_as_group = Some(group);
        }
        if !reader.supplemental_groups.is_empty() {
            psc.supplemental_groups = Some(reader.supplemental_groups.clone());
        }
    }
    pod
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
