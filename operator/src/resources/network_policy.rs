//! The NetworkPolicies of one BackupJob (setting SENDENSE_NETWORK_POLICY, on in the chart): its
//! hub's NBD ports admit only the job's agent pods, and its agent's progress port only the
//! operator's pods. NetworkPolicies are namespaced and a policy cannot say "the same job as the
//! pod it selects", so there is one pair per job, owned by it and deleted with its pods. TLS
//! with per-attempt certificates already keeps other clients out of the exports; the policies
//! keep them from connecting at all (defence in depth), where the cluster's network plugin
//! enforces NetworkPolicies.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sendense_crds::{BackupJob, RestoreJob};

use super::agent::PROGRESS_PORT;
use super::hub::HubDisk;
use super::{agent_name, hub_name, labels, owned_meta, restore_labels, restore_pod_name};

/// Where the operator's pods are, for the agents' ingress rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperatorPeer {
    /// The operator's namespace.
    pub namespace: String,
    /// Labels selecting the operator's pods there.
    pub pod_labels: BTreeMap<String, String>,
}

/// The label every namespace carries with its own name (Kubernetes sets it).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn selector(labels: BTreeMap<String, String>) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    })
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        ..Default::default()
    }
}

fn ingress_only(
    job: &BackupJob,
    name: String,
    component: &str,
    rule: NetworkPolicyIngressRule,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: owned_meta(job, name, labels(job, component)),
        spec: Some(NetworkPolicySpec {
            pod_selector: selector(labels(job, component)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![rule]),
            ..Default::default()
        }),
    }
}

/// The hub's policy: its NBD ports, from the job's agent pods only.
pub fn hub_policy(job: &BackupJob, disks: &[HubDisk]) -> NetworkPolicy {
    ingress_only(
        job,
        hub_name(job),
        "hub",
        NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: selector(labels(job, "agent")),
                ..Default::default()
            }]),
            ports: Some(disks.iter().map(|d| tcp(d.port)).collect()),
        },
    )
}

/// The agent's policy: its progress port, from the operator's pods only.
pub fn agent_policy(job: &BackupJob, operator: &OperatorPeer) -> NetworkPolicy {
    ingress_only(job, agent_name(job), "agent", from_operator(operator))
}

/// A RestoreJob's policy: its pod's progress port from the operator's pods only, and no
/// egress at all (the pod reads the repository volume and writes its claims; its NBD traffic
/// stays on a Unix socket inside the pod): a restore cannot send a backup anywhere. A restore
/// into vSphere (`egress`) talks to vCenter (and, with VDDK, its hosts) like a backup's agent:
/// its egress is not restricted.
pub fn restore_policy(job: &RestoreJob, operator: &OperatorPeer, egress: bool) -> NetworkPolicy {
    let pods = restore_labels(job, "restore");
    NetworkPolicy {
        metadata: owned_meta(job, restore_pod_name(job), pods.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: selector(pods),
            policy_types: Some(if egress {
                vec!["Ingress".into()]
            } else {
                vec!["Ingress".into(), "Egress".into()]
            }),
            ingress: Some(vec![from_operator(operator)]),
            egress: (!egress).then(Vec::new),
        }),
    }
}

fn from_operator(operator: &OperatorPeer) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            namespace_selector: selector(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                operator.namespace.clone(),
            )])),
            pod_selector: selector(operator.pod_labels.clone()),
            ..Default::default()
        }]),
        ports: Some(vec![tcp(i32::from(PROGRESS_PORT))]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TestObject;

    #[test]
    fn the_hub_admits_its_agents_on_its_ports_and_the_agent_the_operator_on_progress() {
        let job = BackupJob::test();
        let disks = [2000, 2001].map(|key| HubDisk {
            key,
            port: 10100 + key - 2000,
            file: String::new(),
            size: 0,
            backing: None,
        });
        let hub = hub_policy(&job, &disks);
        let spec = hub.spec.expect("spec");
        assert_eq!(spec.pod_selector, selector(labels(&job, "hub")));
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        let rule = &spec.ingress.expect("ingress")[0];
        let from = rule.from.as_ref().expect("from");
        assert_eq!(from.len(), 1);
        assert_eq!(from[0].pod_selector, selector(labels(&job, "agent")));
        assert_eq!(from[0].namespace_selector, None, "the job's own namespace");
        let ports: Vec<_> = rule
            .ports
            .iter()
            .flatten()
            .map(|p| p.port.clone())
            .collect();
        assert_eq!(
            ports,
            [Some(IntOrString::Int(10100)), Some(IntOrString::Int(10101))]
        );
        assert_eq!(hub.metadata.name.as_deref(), Some("web-01-b2-hub"));
        assert!(
            hub.metadata.owner_references.is_some(),
            "deleted with the job"
        );

        let operator = OperatorPeer {
            namespace: "sendense-system".into(),
            pod_labels: BTreeMap::from([("app.kubernetes.io/component".into(), "operator".into())]),
        };
        let agent = agent_policy(&job, &operator).spec.expect("spec");
        assert_eq!(agent.pod_selector, selector(labels(&job, "agent")));
        let rule = &agent.ingress.expect("ingress")[0];
        let peer = &rule.from.as_ref().expect("from")[0];
        assert_eq!(
            peer.namespace_selector,
            selector(BTreeMap::from([(
                "kubernetes.io/metadata.name".into(),
                "sendense-system".into()
            )]))
        );
        assert_eq!(peer.pod_selector, selector(operator.pod_labels.clone()));
        assert_eq!(
            rule.ports.as_ref().expect("ports")[0].port,
            Some(IntOrString::Int(9090))
        );

        let rj = RestoreJob::test();
        let restore = restore_policy(&rj, &operator, false);
        assert_eq!(restore.metadata.name.as_deref(), Some("web-01-r1-restore"));
        assert!(restore.metadata.owner_references.is_some());
        let spec = restore.spec.expect("spec");
        assert_eq!(spec.pod_selector, selector(restore_labels(&rj, "restore")));
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_owned(), "Egress".to_owned()])
        );
        assert_eq!(spec.egress, Some(vec![]), "no egress at all");
        let rule = &spec.ingress.expect("ingress")[0];
        assert_eq!(
            rule.from.as_ref().expect("from")[0].pod_selector,
            selector(operator.pod_labels)
        );
        // The pod it protects carries the labels it selects.
        let pod = super::super::restore_pod(&rj, 1, "backups", &[], &Default::default());
        let pod_labels = pod.metadata.labels.expect("labels");
        for (k, v) in restore_labels(&rj, "restore") {
            assert_eq!(pod_labels.get(&k), Some(&v), "{k}");
        }
    }
}
