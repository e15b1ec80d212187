//! The hub of one BackupJob, built purely from the job and its decisions: a Pod whose init
//! containers prepare each disk's QCOW2 (layered on the parent for incrementals) and whose
//! containers serve each file with qemu-nbd on the job's allocated port, plus a Service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, PersistentVolumeClaimVolumeSource, Pod, PodSpec, Probe,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use sendense_crds::BackupJob;

/// Where the repository volume is mounted in hub containers.
pub const REPOSITORY_MOUNT: &str = "/repository";
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

/// What every pod the operator creates shares: the image (sendense-agent and qemu-utils) and
/// the ServiceAccounts hub-side pods (hub, repository probe, cleanup) and agent pods run as.
/// None of them talks to the Kubernetes API, so their tokens are not mounted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodSettings {
    pub agent: String,
    pub hub_service_account: Option<String>,
    pub agent_service_account: Option<String>,
}

/// Labels every object of a job carries; the hub's selector uses them.
pub fn labels(job: &BackupJob, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sendense".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "sendense-operator".into(),
        ),
        (
            "sendense.io/backupjob".into(),
            job.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

fn meta(job: &BackupJob, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: job.metadata.namespace.clone(),
        labels: Some(labels(job, component)),
        owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Deterministic name of a job's hub pod and Service.
pub fn hub_name(job: &BackupJob) -> String {
    format!("{}-hub", job.metadata.name.as_deref().unwrap_or_default())
}

fn repo_path(rel: &str) -> String {
    format!("{REPOSITORY_MOUNT}/{}", rel.trim_start_matches('/'))
}

/// The hub pod: `claim` is the repository's PersistentVolumeClaim.
pub fn hub_pod(job: &BackupJob, claim: &str, disks: &[HubDisk], images: &PodSettings) -> Pod {
    let mount = VolumeMount {
        name: "repository".into(),
        mount_path: REPOSITORY_MOUNT.into(),
        ..Default::default()
    };
    let init = disks
        .iter()
        .map(|d| {
            let mut command = vec![
                "sendense-agent".to_string(),
                "hub".into(),
                "prepare".into(),
                "--file".into(),
                repo_path(&d.file),
                "--size".into(),
                d.size.to_string(),
            ];
            if let Some(b) = &d.backing {
                command.extend(["--backing".into(), repo_path(b)]);
            }
            Container {
                name: format!("prepare-{}", d.key),
                image: Some(images.agent.clone()),
                command: Some(command),
                volume_mounts: Some(vec![mount.clone()]),
                ..Default::default()
            }
        })
        .collect();
    let serve = disks
        .iter()
        .map(|d| Container {
            name: format!("nbd-{}", d.key),
            image: Some(images.agent.clone()),
            command: Some(vec![
                "qemu-nbd".into(),
                "--format=qcow2".into(),
                "--persistent".into(),
                format!("--shared={NBD_SHARED}"),
                "--bind=0.0.0.0".into(),
                format!("--port={}", d.port),
                "--cache=writeback".into(),
                "--aio=threads".into(),
                repo_path(&d.file),
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
                    command: Some(vec![
                        "sendense-agent".into(),
                        "nbd-ping".into(),
                        format!("nbd://127.0.0.1:{}/", d.port),
                        "--timeout".into(),
                        "4".into(),
                    ]),
                }),
                period_seconds: Some(2),
                timeout_seconds: Some(5),
                failure_threshold: Some(3),
                ..Default::default()
            }),
            volume_mounts: Some(vec![mount.clone()]),
            ..Default::default()
        })
        .collect();
    harden(Pod {
        metadata: meta(job, hub_name(job), "hub"),
        spec: Some(PodSpec {
            init_containers: Some(init),
            containers: serve,
            // A hub container that dies fails the attempt; the operator starts a new hub.
            restart_policy: Some("Never".into()),
            service_account_name: images.hub_service_account.clone(),
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(10),
            volumes: Some(vec![Volume {
                name: "repository".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(false),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The Service in front of the hub: one port per disk.
pub fn hub_service(job: &BackupJob, disks: &[HubDisk]) -> Service {
    Service {
        metadata: meta(job, hub_name(job), "hub"),
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

/// The restrictions every pod the operator builds carries: no privilege escalation, no Linux
/// capabilities, the runtime's default seccomp profile. (They run as the image's user: the hub
/// must own files on the repository volume and the agent must read the datastores.)
pub fn harden(mut pod: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{
        Capabilities, PodSecurityContext, SeccompProfile, SecurityContext,
    };
    if let Some(spec) = pod.spec.as_mut() {
        spec.security_context
            .get_or_insert_with(PodSecurityContext::default)
            .seccomp_profile = Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        });
        for c in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
        {
            c.security_context = Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    pod
}

/// The ServiceAccount hub-side or agent pods run as: no token, no bindings; it exists so those
/// pods do not share the namespace's default identity.
pub fn service_account(namespace: &str, name: &str) -> k8s_openapi::api::core::v1::ServiceAccount {
    k8s_openapi::api::core::v1::ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "sendense".into()),
                (
                    "app.kubernetes.io/managed-by".into(),
                    "sendense-operator".into(),
                ),
            ])),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// Creates the ServiceAccount when it is missing (never changes an existing one).
pub async fn ensure_service_account(
    client: &kube::Client,
    namespace: &str,
    name: Option<&str>,
) -> Result<(), kube::Error> {
    let Some(name) = name else { return Ok(()) };
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client.clone(), namespace);
    if api.get_opt(name).await?.is_none() {
        api.patch(
            name,
            &kube::api::PatchParams::apply(crate::source_node::MANAGER),
            &kube::api::Patch::Apply(&service_account(namespace, name)),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> BackupJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "BackupJob",
            "metadata": {"name": "web-01-nightly", "namespace": "backups", "uid": "1234"},
            "spec": {"vm": {"name": "web-01"}, "sourceNodeRef": {"name": "vc"}, "repositoryRef": {"name": "primary"}}
        }))
        .expect("valid BackupJob")
    }

    fn disks() -> Vec<HubDisk> {
        vec![
            HubDisk {
                key: 2000,
                port: 10100,
                file: "backups/web-01/2000/web-01-nightly.qcow2".into(),
                size: 1 << 30,
                backing: Some("backups/web-01/2000/web-01-full.qcow2".into()),
            },
            HubDisk {
                key: 2001,
                port: 10101,
                file: "backups/web-01/2001/web-01-nightly.qcow2".into(),
                size: 1 << 29,
                backing: None,
            },
        ]
    }

    #[test]
    fn hub_pod_prepares_then_serves_each_disk_on_its_port() {
        let pod = hub_pod(
            &job(),
            "backups-data",
            &disks(),
            &PodSettings {
                agent: "sendense/agent:0.1".into(),
                ..Default::default()
            },
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("web-01-nightly-hub"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("backups"));
        let owner = &pod.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("BackupJob", "web-01-nightly", Some(true))
        );
        let spec = pod.spec.expect("spec");
        let init = spec.init_containers.expect("init containers");
        assert_eq!(init.len(), 2);
        assert_eq!(
            init[0].command.as_deref().expect("command"),
            [
                "sendense-agent",
                "hub",
                "prepare",
                "--file",
                "/repository/backups/web-01/2000/web-01-nightly.qcow2",
                "--size",
                "1073741824",
                "--backing",
                "/repository/backups/web-01/2000/web-01-full.qcow2"
            ]
        );
        assert!(
            !init[1]
                .command
                .as_deref()
                .expect("command")
                .contains(&"--backing".to_string()),
            "a full has no parent"
        );
        assert_eq!(spec.containers.len(), 2);
        let nbd = &spec.containers[1];
        let cmd = nbd.command.as_deref().expect("command");
        assert!(
            cmd.contains(&"--persistent".to_string()) && cmd.contains(&"--port=10101".to_string())
        );
        let shared: u32 = cmd
            .iter()
            .find_map(|a| a.strip_prefix("--shared="))
            .and_then(|n| n.parse().ok())
            .expect("--shared");
        assert!(
            shared > 1,
            "--shared must exceed 1 or the agent's second connection hangs"
        );
        assert_eq!(nbd.ports.as_ref().expect("ports")[0].container_port, 10101);
        let probe = nbd
            .readiness_probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .and_then(|e| e.command.clone())
            .expect("exec probe");
        assert_eq!(
            probe[..3],
            ["sendense-agent", "nbd-ping", "nbd://127.0.0.1:10101/"]
        );
        let claim = spec.volumes.expect("volumes")[0]
            .persistent_volume_claim
            .clone()
            .expect("pvc");
        assert_eq!(claim.claim_name, "backups-data");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn every_container_is_hardened_and_runs_without_an_api_token() {
        let pod = hub_pod(
            &job(),
            "data",
            &disks(),
            &PodSettings {
                agent: "a".into(),
                hub_service_account: Some("sendense-hub".into()),
                ..Default::default()
            },
        );
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("sendense-hub"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.security_context
                .and_then(|s| s.seccomp_profile)
                .map(|p| p.type_)
                .as_deref(),
            Some("RuntimeDefault")
        );
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let sc = c.security_context.clone().expect("security context");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(
                sc.capabilities.and_then(|c| c.drop),
                Some(vec!["ALL".to_string()])
            );
        }
    }

    #[test]
    fn service_selects_the_hub_and_exposes_every_port() {
        let svc = hub_service(&job(), &disks());
        let spec = svc.spec.expect("spec");
        assert_eq!(
            spec.selector
                .expect("selector")
                .get("sendense.io/backupjob")
                .map(String::as_str),
            Some("web-01-nightly")
        );
        let ports: Vec<i32> = spec.ports.expect("ports").iter().map(|p| p.port).collect();
        assert_eq!(ports, [10100, 10101]);
    }
}
