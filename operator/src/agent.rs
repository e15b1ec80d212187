//! The agent pod of one BackupJob: `sendense-agent backup` against the SourceNode's vCenter,
//! with the credentials Secret mounted as files (never in arguments, logs or status), the
//! datastores mounted for the nfs transport, and the hub's exports as targets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, Pod, PodSpec, SecretVolumeSource, Volume, VolumeMount,
};
use sendense_crds::source_node::{TransportType, VddkMode};
use sendense_crds::{BackupJob, SourceNode};

use crate::hub::{PodSettings, labels};

pub const CREDENTIALS_DIR: &str = "/etc/sendense/credentials";
pub const CA_DIR: &str = "/etc/sendense/vcenter-ca";
pub const DATASTORES_DIR: &str = "/datastores";
/// Seconds the agent gets after SIGTERM to stop copying and remove its snapshot.
pub const AGENT_GRACE_SECONDS: i64 = 120;

/// Deterministic name of a job's agent pod.
pub fn agent_name(job: &BackupJob) -> String {
    format!("{}-agent", job.metadata.name.as_deref().unwrap_or_default())
}

fn joined(map: &BTreeMap<i32, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The agent pod. `targets`: device key -> hub NBD URL; `base_change_ids`: device key ->
/// change ID of the parent backup (incremental disks only).
pub fn agent_pod(
    job: &BackupJob,
    source: &SourceNode,
    targets: &BTreeMap<i32, String>,
    base_change_ids: &BTreeMap<i32, String>,
    images: &PodSettings,
) -> Pod {
    let vc = &source.spec.vcenter;
    let mut args = vec![
        "backup".to_string(),
        "--vcenter".into(),
        vc.url.clone(),
        "--datacenter".into(),
        source.spec.datacenter.clone(),
        "--job".into(),
        job.metadata.name.clone().unwrap_or_default(),
        "--credentials-dir".into(),
        CREDENTIALS_DIR.into(),
        "--targets".into(),
        joined(targets),
        "--result-file".into(),
        "/dev/termination-log".into(),
        // Progress for the operator, on the pod's own IP.
        "--status-addr".into(),
        format!("$(POD_IP):{}", crate::backup_job::PROGRESS_PORT),
    ];
    match (&job.spec.vm.name, &job.spec.vm.instance_uuid) {
        (Some(name), _) => args.extend(["--vm".into(), name.clone()]),
        (None, Some(uuid)) => args.extend(["--vm-uuid".into(), uuid.clone()]),
        (None, None) => {}
    }
    if !base_change_ids.is_empty() {
        args.extend(["--base-change-ids".into(), joined(base_change_ids)]);
    }
    if job.spec.quiesce {
        args.push("--quiesce".into());
    }
    if let Some(d) = job.spec.active_deadline_seconds {
        args.extend(["--deadline-seconds".into(), d.to_string()]);
    }

    let creds = &vc.credentials_secret_ref;
    let mut volumes = vec![Volume {
        name: "credentials".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(creds.name.clone()),
            items: Some(vec![
                KeyToPath {
                    key: creds.username_key.clone(),
                    path: "username".into(),
                    ..Default::default()
                },
                KeyToPath {
                    key: creds.password_key.clone(),
                    path: "password".into(),
                    ..Default::default()
                },
            ]),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "credentials".into(),
        mount_path: CREDENTIALS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];

    let tls = &vc.tls;
    if let Some(t) = &tls.thumbprint {
        args.extend(["--thumbprint".into(), t.clone()]);
    } else if let Some(ca) = &tls.ca_config_map_ref {
        volumes.push(Volume {
            name: "vcenter-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: ca.name.clone(),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: "ca.crt".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "vcenter-ca".into(),
            mount_path: CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        args.extend(["--ca-file".into(), format!("{CA_DIR}/ca.crt")]);
    } else if tls.insecure_skip_verify == Some(true) {
        args.push("--insecure-skip-verify".into());
    }

    let transport = &source.spec.transport;
    match transport.type_ {
        TransportType::Nfs => {
            args.extend(["--transport".into(), "nfs".into()]);
            for (i, ds) in transport
                .nfs
                .iter()
                .flat_map(|n| n.datastores.iter())
                .enumerate()
            {
                let name = format!("datastore-{i}");
                let path = format!("{DATASTORES_DIR}/{i}");
                volumes.push(Volume {
                    name: name.clone(),
                    nfs: ds.nfs.clone(),
                    host_path: ds.host_path.clone(),
                    persistent_volume_claim: ds.persistent_volume_claim.clone(),
                    ..Default::default()
                });
                mounts.push(VolumeMount {
                    name,
                    mount_path: path.clone(),
                    read_only: Some(true),
                    ..Default::default()
                });
                args.extend(["--datastore".into(), format!("{}={path}", ds.name)]);
            }
        }
        TransportType::Vddk => {
            let modes: Vec<&str> = transport
                .vddk
                .iter()
                .flat_map(|v| v.modes.iter())
                .map(|m| match m {
                    VddkMode::Nbdssl => "nbdssl",
                    VddkMode::Nbd => "nbd",
                    VddkMode::Hotadd => "hotadd",
                    VddkMode::San => "san",
                })
                .collect();
            args.extend(["--transport".into(), "vddk".into()]);
            if !modes.is_empty() {
                args.extend(["--vddk-modes".into(), modes.join(",")]);
            }
        }
    }

    let placement = source.spec.placement.clone().unwrap_or_default();
    let mut meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: Some(agent_name(job)),
        namespace: job.metadata.namespace.clone(),
        labels: Some(labels(job, "agent")),
        ..Default::default()
    };
    meta.owner_references = kube::Resource::controller_owner_ref(job, &()).map(|o| vec![o]);
    crate::hub::harden(Pod {
        metadata: meta,
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "agent".into(),
                image: Some(images.agent.clone()),
                command: Some(vec!["sendense-agent".into()]),
                args: Some(args),
                volume_mounts: Some(mounts),
                env: Some(vec![EnvVar {
                    name: "POD_IP".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ports: Some(vec![ContainerPort {
                    name: Some("progress".into()),
                    container_port: crate::backup_job::PROGRESS_PORT as i32,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                ..Default::default()
            }],
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            service_account_name: images.agent_service_account.clone(),
            automount_service_account_token: Some(false),
            active_deadline_seconds: job
                .spec
                .active_deadline_seconds
                .map(|d| d + AGENT_GRACE_SECONDS),
            termination_grace_period_seconds: Some(AGENT_GRACE_SECONDS),
            node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
            tolerations: (!placement.tolerations.is_empty()).then_some(placement.tolerations),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> BackupJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "BackupJob",
            "metadata": {"name": "db-01-full", "namespace": "backups", "uid": "u-1"},
            "spec": {"vm": {"instanceUuid": "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"}, "sourceNodeRef": {"name": "vc"},
                     "repositoryRef": {"name": "primary"}, "mode": "full", "quiesce": true, "activeDeadlineSeconds": 3600}
        }))
        .expect("valid BackupJob")
    }

    fn source(tls: serde_json::Value, transport: serde_json::Value) -> SourceNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "SourceNode",
            "metadata": {"name": "vc", "namespace": "backups"},
            "spec": {
                "vcenter": {"url": "https://vc.example.com/sdk", "credentialsSecretRef": {"name": "vc-creds", "usernameKey": "user", "passwordKey": "pass"}, "tls": tls},
                "datacenter": "DC1", "transport": transport,
                "placement": {"nodeSelector": {"sendense.io/site": "lab"}}
            }
        }))
        .expect("valid SourceNode")
    }

    fn args(pod: &Pod) -> Vec<String> {
        pod.spec
            .as_ref()
            .and_then(|s| s.containers[0].args.clone())
            .unwrap_or_default()
    }

    fn value_after(args: &[String], flag: &str) -> Option<String> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    }

    #[test]
    fn nfs_agent_mounts_datastores_and_credentials_and_names_its_targets() {
        let src = source(
            serde_json::json!({"thumbprint": "AA:BB"}),
            serde_json::json!({"type": "nfs", "nfs": {"datastores": [{"name": "LocalDS 0", "hostPath": {"path": "/srv/ds0"}}]}}),
        );
        let targets = BTreeMap::from([
            (2000, "nbd://10.0.0.5:10100/".to_string()),
            (2001, "nbd://10.0.0.5:10101/".to_string()),
        ]);
        let bases = BTreeMap::from([(2000, "52 aa/3".to_string())]);
        let pod = agent_pod(
            &job(),
            &src,
            &targets,
            &bases,
            &PodSettings {
                agent: "img".into(),
                ..Default::default()
            },
        );
        let a = args(&pod);
        assert_eq!(
            value_after(&a, "--targets").as_deref(),
            Some("2000:nbd://10.0.0.5:10100/,2001:nbd://10.0.0.5:10101/")
        );
        assert_eq!(
            value_after(&a, "--base-change-ids").as_deref(),
            Some("2000:52 aa/3")
        );
        assert_eq!(
            value_after(&a, "--vm-uuid").as_deref(),
            Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a")
        );
        assert_eq!(value_after(&a, "--thumbprint").as_deref(), Some("AA:BB"));
        assert_eq!(
            value_after(&a, "--datastore").as_deref(),
            Some("LocalDS 0=/datastores/0")
        );
        assert_eq!(
            value_after(&a, "--deadline-seconds").as_deref(),
            Some("3600")
        );
        assert!(a.contains(&"--quiesce".to_string()));
        let spec = pod.spec.expect("spec");
        let vols = spec.volumes.expect("volumes");
        let creds = vols
            .iter()
            .find(|v| v.name == "credentials")
            .and_then(|v| v.secret.clone())
            .expect("secret volume");
        assert_eq!(creds.secret_name.as_deref(), Some("vc-creds"));
        let keys: Vec<(String, String)> = creds
            .items
            .expect("items")
            .into_iter()
            .map(|i| (i.key, i.path))
            .collect();
        assert_eq!(
            keys,
            [
                ("user".into(), "username".into()),
                ("pass".into(), "password".into())
            ]
        );
        assert_eq!(
            vols.iter()
                .find(|v| v.name == "datastore-0")
                .and_then(|v| v.host_path.clone())
                .map(|h| h.path)
                .as_deref(),
            Some("/srv/ds0")
        );
        let env = spec.containers[0].env.clone().unwrap_or_default();
        assert!(
            env.iter().all(|e| e.name == "POD_IP" && e.value.is_none()),
            "no credentials in the environment: {env:?}"
        );
        assert_eq!(
            spec.node_selector
                .expect("placement")
                .get("sendense.io/site")
                .map(String::as_str),
            Some("lab")
        );
        assert_eq!(
            spec.active_deadline_seconds,
            Some(3600 + AGENT_GRACE_SECONDS),
            "time to remove the snapshot after the deadline"
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn ca_bundle_and_vddk_transport() {
        let src = source(
            serde_json::json!({"caConfigMapRef": {"name": "vc-ca", "key": "bundle.pem"}}),
            serde_json::json!({"type": "vddk", "vddk": {"modes": ["hotadd", "nbdssl"]}}),
        );
        let pod = agent_pod(
            &job(),
            &src,
            &BTreeMap::from([(2000, "nbd://h:1/".to_string())]),
            &BTreeMap::new(),
            &PodSettings {
                agent: "img".into(),
                ..Default::default()
            },
        );
        let a = args(&pod);
        assert_eq!(
            value_after(&a, "--ca-file").as_deref(),
            Some("/etc/sendense/vcenter-ca/ca.crt")
        );
        assert_eq!(value_after(&a, "--transport").as_deref(), Some("vddk"));
        assert_eq!(
            value_after(&a, "--vddk-modes").as_deref(),
            Some("hotadd,nbdssl")
        );
        assert!(
            !a.contains(&"--base-change-ids".to_string()),
            "a full has no base"
        );
        let vols = pod.spec.expect("spec").volumes.expect("volumes");
        assert!(
            vols.iter()
                .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == "vc-ca"))
        );
    }
}
