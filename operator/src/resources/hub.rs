//! The hub of one BackupJob: a Pod whose init container prepares each disk's QCOW2 (layered on
//! the parent for incrementals) and whose containers serve each file with qemu-nbd on the job's
//! allocated port. No Service: the agent dials the pod's IP (the hub lives as long as one
//! attempt, and a Service would only add endpoint updates for every change of the pod).

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, Pod, PodSpec, Probe, SecretVolumeSource, Volume,
    VolumeMount,
};
use sendense_crds::BackupJob;

use crate::nbd_tls;

use super::layout::{agent_container, mount, mounted, volume_pod_spec};
use super::{PodSettings, harden, hub_name, labels, owned_meta};
use sendense_contract::cli::{AGENT_BINARY, HubPrepareArgs, NbdPingArgs, PrepareDisk};

/// Clients qemu-nbd serves at once: the agent opens several connections per disk, and with
/// qemu-nbd's default of 1 the second one waits forever.
pub const NBD_SHARED: u32 = 8;

/// How long a hub's qemu-nbd may take to answer its first NBD handshake, and how often it is
/// asked until then.
const STARTUP_SECONDS: i32 = 120;
const STARTUP_PERIOD: i32 = 2;

/// One disk as the hub serves it. Paths are relative to the repository volume's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDisk {
    pub key: i32,
    pub port: i32,
    pub file: String,
    pub size: u64,
    pub backing: Option<String>,
}

/// One init container prepares every disk (each container costs the kubelet its own Events,
/// status writes and volume checks; there is nothing to run in parallel).
fn prepare(disks: &[HubDisk], images: &PodSettings) -> Container {
    let args = HubPrepareArgs {
        disks: disks
            .iter()
            .map(|d| PrepareDisk {
                file: mounted(&d.file),
                size: d.size,
                backing: d.backing.as_deref().map(mounted),
            })
            .collect(),
    };
    agent_container("prepare".to_owned(), args.to_args(), images)
}

/// The hub's side of the attempt's TLS: the job's Secret and the one client identity its
/// qemu-nbd serves.
pub struct HubTls {
    pub secret: String,
    pub server_name: String,
    pub client_identity: String,
}

impl HubTls {
    pub fn of(job: &BackupJob, attempt: i32) -> Self {
        Self {
            secret: nbd_tls::secret_name(job),
            server_name: nbd_tls::server_name(job),
            client_identity: nbd_tls::client_identity(job, attempt),
        }
    }
}

fn serve(d: &HubDisk, tls: &HubTls, images: &PodSettings) -> Container {
    // The probe is a TLS client like the agent: a handshake with the attempt's certificate
    // on the pod IP proves the export is served as the agent will see it.
    let mut ping = vec![AGENT_BINARY.to_owned()];
    ping.extend(
        NbdPingArgs {
            url: format!(
                "nbds://127.0.0.1:{}/?tls-hostname={}",
                d.port, tls.server_name
            ),
            timeout: 4,
            tls_dir: Some(nbd_tls::TLS_DIR.into()),
            host_env: Some("POD_IP".into()),
        }
        .to_args(),
    );
    Container {
        name: format!("nbd-{}", d.key),
        image: Some(images.agent.clone()),
        image_pull_policy: Some(images.pull_policy()),
        resources: images.hub_resources.clone(),
        command: Some(vec![
            "qemu-nbd".into(),
            "--format=qcow2".into(),
            "--persistent".into(),
            format!("--shared={NBD_SHARED}"),
            "--bind=$(POD_IP)".into(),
            format!("--port={}", d.port),
            // TLS only, and only the attempt's agent certificate (plain NBD is refused).
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
                nbd_tls::TLS_DIR
            ),
            "--tls-creds=tls0".into(),
            "--object".into(),
            format!("authz-simple,id=authz0,identity={}", tls.client_identity),
            "--tls-authz=authz0".into(),
            "--cache=writeback".into(),
            "--aio=threads".into(),
            mounted(&d.file).display().to_string(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(format!("nbd-{}", d.key)),
            container_port: d.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Ready only when an NBD handshake completes, not merely when the port listens. A
        // startup probe, not a readiness probe: it runs until the first handshake and not every
        // 2 s for the life of the copy (each exec forks in the container; under load the late
        // ones were Unhealthy Events, pod status writes and volume re-reads by the kubelet).
        // Without a readiness probe the container is ready once it has started. A qemu-nbd that
        // does not serve within STARTUP_SECONDS is killed, which fails the hub and the attempt,
        // named; one that dies later fails it too.
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(ping),
            }),
            period_seconds: Some(STARTUP_PERIOD),
            timeout_seconds: Some(5),
            failure_threshold: Some(STARTUP_SECONDS / STARTUP_PERIOD),
            ..Default::default()
        }),
        // The exports are bound to the pod IP, not 0.0.0.0.
        env: Some(vec![super::pod_ip_env()]),
        volume_mounts: Some(vec![
            mount(),
            VolumeMount {
                name: "nbd-tls".into(),
                mount_path: nbd_tls::TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

/// The hub pod: `claim` is the repository's PersistentVolumeClaim; `tls`, the attempt's.
pub fn hub_pod(
    job: &BackupJob,
    claim: &str,
    disks: &[HubDisk],
    tls: &HubTls,
    images: &PodSettings,
) -> Pod {
    let mut spec = volume_pod_spec(claim, images);
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "nbd-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls.secret.clone()),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    });
    harden(Pod {
        metadata: owned_meta(job, hub_name(job), labels(job, "hub")),
        spec: Some(PodSpec {
            init_containers: Some(vec![prepare(disks, images)]),
            containers: disks.iter().map(|d| serve(d, tls, images)).collect(),
            // A hub container that dies fails the attempt; the operator starts a new hub.
            termination_grace_period_seconds: Some(10),
            ..spec
        }),
        status: None,
    })
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
