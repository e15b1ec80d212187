//! The hub of one BackupJob: a Pod whose init containers prepare each disk's QCOW2 (layered on
//! the parent for incrementals) and whose containers serve each file with qemu-nbd on the job's
//! allocated port, plus a Service in front of it.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, Pod, PodSpec, Probe, Service, ServicePort, ServiceSpec,
};
use sendense_crds::BackupJob;

use super::layout::{agent_container, mount, mounted, volume_pod_spec};
use super::{PodSettings, harden, hub_name, labels, owned_meta};
use sendense_contract::cli::{AGENT_BINARY, HubPrepareArgs, NbdPingArgs};

/// Clients qemu-nbd serves at once: the agent opens several connections per disk, and with
/// qemu-nbd's default of 1 the second one waits forever.
pub const NBD_SHARED: u32 = 8;

/// One disk as the hub serves it. Paths are relative to the repository volume's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDisk {
    pub key: i32,
    pub port: i32,
    pub file: String,
    pub size: u64,
    pub backing: Option<String>,
}

fn prepare(d: &HubDisk, images: &PodSettings) -> Container {
    let args = HubPrepareArgs {
        file: mounted(&d.file),
        size: d.size,
        backing: d.backing.as_deref().map(mounted),
    };
    agent_container(format!("prepare-{}", d.key), args.to_args(), images)
}

fn serve(d: &HubDisk, images: &PodSettings) -> Container {
    let mut ping = vec![AGENT_BINARY.to_owned()];
    ping.extend(
        NbdPingArgs {
            url: format!("nbd://127.0.0.1:{}/", d.port),
            timeout: 4,
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
            "--bind=0.0.0.0".into(),
            format!("--port={}", d.port),
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
        // Ready only when an NBD handshake completes, not merely when the port listens.
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(ping),
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        volume_mounts: Some(vec![mount()]),
        ..Default::default()
    }
}

/// The hub pod: `claim` is the repository's PersistentVolumeClaim.
pub fn hub_pod(job: &BackupJob, claim: &str, disks: &[HubDisk], images: &PodSettings) -> Pod {
    harden(Pod {
        metadata: owned_meta(job, hub_name(job), labels(job, "hub")),
        spec: Some(PodSpec {
            init_containers: Some(disks.iter().map(|d| prepare(d, images)).collect()),
            containers: disks.iter().map(|d| serve(d, images)).collect(),
            // A hub container that dies fails the attempt; the operator starts a new hub.
            termination_grace_period_seconds: Some(10),
            ..volume_pod_spec(claim, images)
        }),
        status: None,
    })
}

/// The Service in front of the hub: one port per disk.
pub fn hub_service(job: &BackupJob, disks: &[HubDisk]) -> Service {
    Service {
        metadata: owned_meta(job, hub_name(job), labels(job, "hub")),
        spec: Some(ServiceSpec {
            selector: Some(labels(job, "hub")),
            ports: Some(
                disks
                    .iter()
                    .map(|d| ServicePort {
                        name: Some(format!("nbd-{}", d.key)),
                        port: d.port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
