//! Every object the operator creates, built purely from the resource it serves and the
//! decisions recorded in its status: no API calls here, so each builder is unit-tested as is.
//! Names are deterministic (the job's or repository's name plus a suffix), so a restarted
//! operator finds what an earlier process created.

mod agent;
mod cleanup;
pub(crate) mod hardening;
mod hub;
mod layout;
mod network_policy;
mod repository;
mod restore;
mod restore_vsphere;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use sendense_crds::{BackupJob, Repository};

use crate::source_policy::SourcePolicy;

pub use agent::{
    AGENT_GRACE_SECONDS, CA_DIR, CREDENTIALS_DIR, DATASTORES_DIR, PROGRESS_PORT, VCenterAccess,
    agent_pod, read_as, seconds_left, vcenter_access,
};
pub use cleanup::cleanup_pod;
pub use hardening::harden;
pub use hub::{COMMIT_ANNOTATION, HubDisk, HubTls, NBD_SHARED, hub_pod};
pub use layout::{
    REPOSITORY_MOUNT, attempt_dir, attempt_uid, claim_name, dir_of, disk_file, for_attempt,
    namespace_prefix,
};
pub use network_policy::{OperatorPeer, agent_policy, hub_policy, restore_policy};
pub use repository::{PRUNE_POINT, probe_pod, prune_name, prune_pod, templated_claim};
pub use restore::{
    DEVICES_DIR, DISK_IMAGE, DiskToRestore, FILES_TARGET, NewClaim, RESTORE_JOB_LABEL, TARGETS_DIR,
    block_claim_bytes, default_claim_name, files_directory, files_pod, filesystem_claim_bytes,
    kubevirt_vm, restore_claim, restore_labels, restore_pod, restore_pod_name, volume_mode_str,
};
pub use restore_vsphere::{PointDisks, vsphere_pod};

/// `POD_IP`, the pod's own IP from the downward API (the agent's progress endpoint and the
/// hub's exports are bound to it).
fn pod_ip_env() -> k8s_openapi::api::core::v1::EnvVar {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};
    EnvVar {
        name: "POD_IP".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.podIP".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container running `sendense-agent <args>` that serves its progress on the pod IP (the
/// backup's agent, a restore): the image, `POD_IP` and the log filter in its environment, the
/// progress port, its result as the termination message.
fn progress_container(
    name: &str,
    args: Vec<String>,
    mounts: Vec<k8s_openapi::api::core::v1::VolumeMount>,
    resources: Option<ResourceRequirements>,
    images: &PodSettings,
) -> k8s_openapi::api::core::v1::Container {
    use k8s_openapi::api::core::v1::{Container, ContainerPort};
    Container {
        name: name.into(),
        image: Some(images.agent.clone()),
        image_pull_policy: Some(images.pull_policy()),
        resources,
        command: Some(vec![sendense_contract::cli::AGENT_BINARY.into()]),
        args: Some(args),
        volume_mounts: Some(mounts),
        env: Some(
            std::iter::once(pod_ip_env())
                .chain(images.log_env())
                .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("progress".into()),
            container_port: i32::from(PROGRESS_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// Label carrying the attempt a job's pod belongs to; pods of an earlier attempt are removed
/// before the next attempt starts.
pub const ATTEMPT_LABEL: &str = "sendense.io/attempt";
/// Where a container's result goes: Kubernetes keeps it as the termination message.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The value of `app.kubernetes.io/managed-by` on everything the operator creates (the
/// controllers watch their pods by it).
pub const MANAGED_BY: &str = "sendense-operator";

/// What every pod the operator creates shares: the image (sendense-agent and qemu-utils) and
/// the ServiceAccounts hub-side pods (hub, repository probe, cleanup) and agent pods run as.
/// None of them talks to the Kubernetes API, so their tokens are not mounted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodSettings {
    pub agent: String,
    /// imagePullPolicy of every container ("IfNotPresent" when empty).
    pub pull_policy: String,
    /// Resources of each hub-side container (hub, probe, cleanup).
    pub hub_resources: Option<ResourceRequirements>,
    /// Resources of the agent container.
    pub agent_resources: Option<ResourceRequirements>,
    pub hub_service_account: Option<String>,
    pub agent_service_account: Option<String>,
    /// What SourceNodes may ask for: the agent's datastore volumes and tolerations.
    pub source_policy: SourcePolicy,
    /// Set: each job gets NetworkPolicies (its hub's ports from its agents only, its agent's
    /// progress port from these operator pods only).
    pub network_policy: Option<OperatorPeer>,
    /// `RUST_LOG` of the sendense-agent containers; None: theirs.
    pub log_filter: Option<String>,
}

impl PodSettings {
    /// `RUST_LOG` for a sendense-agent container, when one is set.
    fn log_env(&self) -> Option<k8s_openapi::api::core::v1::EnvVar> {
        self.log_filter
            .as_ref()
            .map(|f| k8s_openapi::api::core::v1::EnvVar {
                name: "RUST_LOG".into(),
                value: Some(f.clone()),
                ..Default::default()
            })
    }

    /// The imagePullPolicy of the pods' containers.
    fn pull_policy(&self) -> String {
        if self.pull_policy.is_empty() {
            "IfNotPresent".into()
        } else {
            self.pull_policy.clone()
        }
    }
}

/// Labels of everything Sendense creates, plus `extra`.
fn sendense_labels(
    extra: impl IntoIterator<Item = (&'static str, String)>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sendense".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
    ]);
    labels.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
    labels
}

/// Labels every object of a job carries; the hub's selector uses them.
pub fn labels(job: &BackupJob, component: &str) -> BTreeMap<String, String> {
    sendense_labels([
        ("app.kubernetes.io/component", component.to_owned()),
        ("sendense.io/backupjob", job.name_any()),
    ])
}

/// Labels of a repository's probe pod and templated claim.
pub fn repository_labels(repo: &Repository) -> BTreeMap<String, String> {
    sendense_labels([
        ("app.kubernetes.io/component", "repository-probe".to_owned()),
        ("sendense.io/repository", repo.name_any()),
    ])
}

/// Metadata of an object `owner` controls (deleted with it).
pub(crate) fn owned_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: owner.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Deterministic name of a job's hub pod.
pub fn hub_name(job: &BackupJob) -> String {
    format!("{}-hub", job.name_any())
}

/// Deterministic name of a job's agent pod.
pub fn agent_name(job: &BackupJob) -> String {
    format!("{}-agent", job.name_any())
}

/// Deterministic name of the pod removing a failed job's partial files.
pub fn cleanup_name(job: &BackupJob) -> String {
    format!("{}-cleanup", job.name_any())
}

/// Deterministic name of the pod earlier versions committed a job's restore point with (the
/// hub commits now); one such pod left over by an upgrade goes with the job's other pods.
pub fn commit_name(job: &BackupJob) -> String {
    format!("{}-commit", job.name_any())
}

/// Deterministic name of a repository's probe pod.
pub fn probe_name(repo: &Repository) -> String {
    format!("{}-probe", repo.name_any())
}

/// The ServiceAccount hub-side or agent pods run as: no token, no bindings; it exists so those
/// pods do not share the namespace's default identity.
pub fn service_account(namespace: &str, name: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(sendense_labels([])),
            ..Default::default()
        },
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "command_lines_tests.rs"]
mod command_lines_tests;
