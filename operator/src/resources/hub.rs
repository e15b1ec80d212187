//! The hub of one BackupJob: a Pod whose one container creates each disk's QCOW2 (layered on
//! the parent for incrementals), serves each file with qemu-nbd on the job's allocated port,
//! then, asked by the operator once the agent has succeeded, stops
//! serving and commits the files as a restore point (in place of a commit pod: one pod less
//! per job for the kubelet and the API server). No Service: the agent dials the pod's IP (the hub lives as long as one
//! attempt, and a Service would only add endpoint updates for every change of the pod).

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, ExecAction,
    ObjectFieldSelector, Pod, PodSpec, Probe, SecretVolumeSource, Volume, VolumeMount,
};
use sendense_crds::BackupJob;

use crate::nbd_tls;

use super::layout::{REPOSITORY_MOUNT, agent_container, mounted, volume_pod_spec};
use super::{PodSettings, TERMINATION_LOG, harden, hub_name, labels, owned_meta};
use sendense_contract::cli::{AGENT_BINARY, HubServeArgs, NbdPingArgs, ServeDisk};

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

/// The annotation the operator writes the commit request into (the attempt's manifest, JSON,
/// without digests) once the agent has succeeded; the hub reads it from a downward API file.
pub const COMMIT_ANNOTATION: &str = "sendense.io/commit";
/// Where the hub's container sees the annotation.
const COMMIT_DIR: &str = "/etc/sendense/commit";
const COMMIT_FILE: &str = "request";

/// The hub's one container: `hub serve` creates the disks' files, runs one qemu-nbd per disk on
/// the disk's port and commits the attempt when the commit request appears, its result (or why
/// it stopped) as the termination message. One container, no init container: each costs the
/// kubelet its own Events, status writes and probes.
fn serve(disks: &[HubDisk], tls: &HubTls, images: &PodSettings) -> Container {
    let args = HubServeArgs {
        disks: disks
            .iter()
            .map(|d| ServeDisk {
                key: d.key,
                port: d.port as u16,
                file: mounted(&d.file),
                size: d.size,
                backing: d.backing.as_deref().map(mounted),
            })
            .collect(),
        // The exports are bound to the pod IP, not 0.0.0.0.
        bind: "$(POD_IP)".into(),
        shared: NBD_SHARED,
        tls_dir: nbd_tls::TLS_DIR.into(),
        client_identity: tls.client_identity.clone(),
        root: REPOSITORY_MOUNT.into(),
        commit_request: format!("{COMMIT_DIR}/{COMMIT_FILE}").into(),
        result_file: Some(TERMINATION_LOG.into()),
    };
    // The probe is a TLS client like the agent: a handshake with the attempt's certificate
    // with every export on the pod IP proves they are served as the agent will see them.
    let mut ping = vec![AGENT_BINARY.to_owned()];
    ping.extend(
        NbdPingArgs {
            urls: disks
                .iter()
                .map(|d| {
                    format!(
                        "nbds://127.0.0.1:{}/?tls-hostname={}",
                        d.port, tls.server_name
                    )
                })
                .collect(),
            timeout: 4,
            tls_dir: Some(nbd_tls::TLS_DIR.into()),
            host_env: Some("POD_IP".into()),
        }
        .to_args(),
    );
    let mut c = agent_container("serve".into(), args.to_args(), images);
    c.termination_message_policy = Some("FallbackToLogsOnError".into());
    c.ports = Some(
        disks
            .iter()
            .map(|d| ContainerPort {
                name: Some(format!("nbd-{}", d.key)),
                container_port: d.port,
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect(),
    );
    // Ready only when an NBD handshake completes, not merely when the port listens. A startup
    // probe, not a readiness probe: it runs until the first handshake and not every 2 s for
    // the life of the copy (each exec forks in the container; under load the late ones were
    // Unhealthy Events, pod status writes and volume re-reads by the kubelet). Without a
    // readiness probe the container is ready once it has started. Exports not served within
    // STARTUP_SECONDS get the container killed, which fails the hub and the attempt, named;
    // a qemu-nbd that dies later fails it too.
    c.startup_probe = Some(Probe {
        exec: Some(ExecAction {
            command: Some(ping),
        }),
        period_seconds: Some(STARTUP_PERIOD),
        timeout_seconds: Some(5),
        failure_threshold: Some(STARTUP_SECONDS / STARTUP_PERIOD),
        ..Default::default()
    });
    c.env.get_or_insert_with(Vec::new).push(super::pod_ip_env());
    c.volume_mounts.get_or_insert_with(Vec::new).extend([
        VolumeMount {
            name: "nbd-tls".into(),
            mount_path: nbd_tls::TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "commit".into(),
            mount_path: COMMIT_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ]);
    c
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
    // The commit request: empty until the operator annotates the pod.
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "commit".into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: COMMIT_FILE.into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{COMMIT_ANNOTATION}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            default_mode: Some(0o444),
        }),
        ..Default::default()
    });
    harden(Pod {
        metadata: owned_meta(job, hub_name(job), labels(job, "hub")),
        spec: Some(PodSpec {
            containers: vec![serve(disks, tls, images)],
            // A hub that stops serving before the commit fails the attempt; the next attempt
            // gets a new hub.
            termination_grace_period_seconds: Some(10),
            ..spec
        }),
        status: None,
    })
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
