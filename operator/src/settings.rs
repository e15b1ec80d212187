//! The operator's settings: one struct, from flags or the environment variables the Helm chart
//! and config/manager set. A value that does not parse (a mistyped number) stops the operator
//! at start with a message naming the variable, instead of falling back to a default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::ResourceRequirements;

use crate::resources::{OperatorPeer, PodSettings};
use crate::source_policy::{self, AllowedToleration, AllowedVolume, SourcePolicy};

#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "sendense-operator",
    version,
    about = "Reconciles Sendense's SourceNodes, Repositories and BackupJobs into hub and agent pods"
)]
pub struct Settings {
    /// Image of the hub, agent, repository-probe and cleanup pods (sendense-agent and
    /// qemu-utils).
    #[arg(long, env = "SENDENSE_AGENT_IMAGE", default_value = concat!("ghcr.io/sendense/sendense-agent:", env!("CARGO_PKG_VERSION")))]
    pub agent_image: String,

    /// Watch only this namespace (a namespaced install); empty or unset: all namespaces.
    #[arg(long, env = "SENDENSE_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,

    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "SENDENSE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// ServiceAccount of hub-side pods (hub, repository probe, cleanup), created where needed;
    /// empty: the namespace's default account.
    #[arg(
        long,
        env = "SENDENSE_HUB_SERVICE_ACCOUNT",
        default_value = "sendense-hub"
    )]
    pub hub_service_account: String,

    /// ServiceAccount of agent pods, created where needed; empty: the namespace's default account.
    #[arg(
        long,
        env = "SENDENSE_AGENT_SERVICE_ACCOUNT",
        default_value = "sendense-agent"
    )]
    pub agent_service_account: String,

    /// Seconds between probes of a reachable vCenter.
    #[arg(long, env = "SENDENSE_PROBE_INTERVAL_SECONDS", default_value_t = 300)]
    pub probe_interval_seconds: u64,

    /// Seconds between probes of a Ready repository volume.
    #[arg(
        long,
        env = "SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub repository_probe_interval_seconds: u64,

    /// Seconds an attempt directory of a BackupJob that no longer exists must be left unchanged
    /// before a repository probe removes it (above any job's progress deadline, when several
    /// clusters or namespaced installs share a volume).
    #[arg(
        long,
        env = "SENDENSE_ORPHAN_MIN_IDLE_SECONDS",
        default_value_t = sendense_contract::cli::DEFAULT_ORPHAN_MIN_IDLE_SECONDS
    )]
    pub orphan_min_idle_seconds: u64,

    /// imagePullPolicy of the pods the operator creates.
    #[arg(
        long,
        env = "SENDENSE_AGENT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = ["Always", "IfNotPresent", "Never"]
    )]
    pub agent_image_pull_policy: String,

    /// Resources (JSON of a container's `resources`: requests and limits) of each container of
    /// hub-side pods (a qemu-nbd per disk, the file preparation, the repository probe, the
    /// cleanup); empty: none. A namespace whose ResourceQuota covers cpu or memory admits only
    /// pods that set them.
    #[arg(
        long,
        env = "SENDENSE_HUB_RESOURCES",
        default_value = DEFAULT_HUB_RESOURCES,
        value_parser = parse_resources
    )]
    pub hub_resources: Resources,

    /// Resources (JSON, as for the hub) of the agent container, the data mover.
    #[arg(
        long,
        env = "SENDENSE_AGENT_RESOURCES",
        default_value = DEFAULT_AGENT_RESOURCES,
        value_parser = parse_resources
    )]
    pub agent_resources: Resources,

    /// `RUST_LOG` of the sendense-agent processes in the pods the operator creates (agent,
    /// file preparation, commit, repository probe, cleanup), e.g. `debug`; empty: theirs
    /// (`info`). No level logs a credential.
    #[arg(long, env = "SENDENSE_POD_LOG", default_value = "")]
    pub pod_log: String,

    /// Namespace of the Leases that let one backup per VM run at a time, cluster-wide, and of
    /// the NBD CA's Secret (the operator's own namespace in a cluster; the chart sets it).
    /// Empty: the watched namespace, else `default`.
    #[arg(long, env = "SENDENSE_LEASE_NAMESPACE", default_value = "")]
    pub lease_namespace: String,

    /// The Secret holding the CA that issues each attempt's NBD certificates (`ca.crt`,
    /// `ca.key`), in the lease namespace; created at first use, replaced when deleted or in
    /// its last 30 days.
    #[arg(
        long,
        env = "SENDENSE_NBD_CA_SECRET",
        default_value = "sendense-nbd-ca"
    )]
    pub nbd_ca_secret: String,

    /// Volumes SourceNodes may mount as datastores by name (`transport.nfs.datastores[].volume`),
    /// as a JSON list of `{"name", "namespaces" (empty: all), "nfs" or "hostPath"}`. A
    /// SourceNode cannot name a node directory or an NFS export itself.
    #[arg(
        long,
        env = "SENDENSE_DATASTORE_VOLUMES",
        default_value = "",
        value_parser = parse_datastore_volumes
    )]
    pub datastore_volumes: DatastoreVolumes,

    /// Taints SourceNodes may ask their agent pods to tolerate, as a JSON list of `{"key",
    /// "effect" (unset: any), "namespaces" (empty: all)}`. Empty: none.
    #[arg(
        long,
        env = "SENDENSE_ALLOWED_TOLERATIONS",
        default_value = "",
        value_parser = parse_allowed_tolerations
    )]
    pub allowed_tolerations: AllowedTolerations,

    /// Give each job NetworkPolicies: its hub's NBD ports admit only its agent pods, its
    /// agent's progress port only the operator's pods (those labelled
    /// SENDENSE_OPERATOR_POD_LABELS in SENDENSE_OPERATOR_NAMESPACE). The chart turns it on; off for an
    /// operator that runs outside the cluster (it would be cut off from its agents).
    #[arg(long, env = "SENDENSE_NETWORK_POLICY", default_value_t = false, action = clap::ArgAction::Set)]
    pub network_policy: bool,

    /// The namespace the operator's pods run in, for the agents' NetworkPolicy (the chart sets
    /// it); empty: the lease namespace.
    #[arg(long, env = "SENDENSE_OPERATOR_NAMESPACE", default_value = "")]
    pub operator_namespace: String,

    /// Labels of the operator's pods, as `key=value,key=value` (the chart's selector labels),
    /// for the agents' NetworkPolicy.
    #[arg(
        long,
        env = "SENDENSE_OPERATOR_POD_LABELS",
        default_value = "app.kubernetes.io/name=sendense,app.kubernetes.io/component=operator",
        value_parser = parse_labels
    )]
    pub operator_pod_labels: Labels,

    /// This operator's instance in the Events it publishes (the pod's name in a cluster).
    #[arg(long, env = "HOSTNAME")]
    pub instance: Option<String>,
}

/// The chart's defaults (values.yaml `podResources`).
pub const DEFAULT_HUB_RESOURCES: &str =
    r#"{"requests":{"cpu":"50m","memory":"64Mi"},"limits":{"memory":"512Mi"}}"#;
pub const DEFAULT_AGENT_RESOURCES: &str =
    r#"{"requests":{"cpu":"100m","memory":"128Mi"},"limits":{"memory":"1Gi"}}"#;

/// A container's resources, as set by the operator's settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources(pub Option<ResourceRequirements>);

impl Eq for Resources {}

/// A Kubernetes quantity: "100m", "1.5", "64Mi", "1G", "2e3".
fn is_quantity(q: &str) -> bool {
    let digits_end = q
        .trim_start_matches(['+', '-'])
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| i + (q.len() - q.trim_start_matches(['+', '-']).len()))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(digits_end);
    let number = number.trim_start_matches(['+', '-']);
    let number_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().all(|c| c.is_ascii_digit() || c == '.');
    let exponent = suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.trim_start_matches(['+', '-']))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok
        && (exponent
            || matches!(
                suffix,
                "" | "n"
                    | "u"
                    | "m"
                    | "k"
                    | "M"
                    | "G"
                    | "T"
                    | "P"
                    | "E"
                    | "Ki"
                    | "Mi"
                    | "Gi"
                    | "Ti"
                    | "Pi"
                    | "Ei"
            ))
}

fn parse_resources(s: &str) -> Result<Resources, String> {
    if s.trim().is_empty() {
        return Ok(Resources(None));
    }
    let r: ResourceRequirements = serde_json::from_str(s).map_err(|e| {
        format!("not a container's resources as JSON ({e}); example: {DEFAULT_AGENT_RESOURCES}")
    })?;
    for (part, map) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (name, q) in map.iter().flatten() {
            if !is_quantity(&q.0) {
                return Err(format!(
                    "{part}.{name}: {:?} is not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)",
                    q.0
                ));
            }
        }
    }
    Ok(Resources(Some(r)))
}

/// The datastore volumes SourceNodes may name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DatastoreVolumes(pub Vec<AllowedVolume>);

impl Eq for DatastoreVolumes {}

/// The taints SourceNodes may tolerate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedTolerations(pub Vec<AllowedToleration>);

fn parse_datastore_volumes(s: &str) -> Result<DatastoreVolumes, String> {
    source_policy::parse_volumes(s).map(DatastoreVolumes)
}

fn parse_allowed_tolerations(s: &str) -> Result<AllowedTolerations, String> {
    source_policy::parse_tolerations(s).map(AllowedTolerations)
}

/// Labels selecting pods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(pub std::collections::BTreeMap<String, String>);

fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = std::collections::BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                format!("{pair:?} is not key=value (e.g. app.kubernetes.io/component=operator)")
            })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    if out.is_empty() {
        return Err(
            "no labels: the agents' NetworkPolicy would admit every pod of the namespace".into(),
        );
    }
    Ok(Labels(out))
}

fn non_empty(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_owned())
}

impl Settings {
    /// What every pod the operator creates shares.
    pub fn pod_settings(&self) -> PodSettings {
        PodSettings {
            agent: self.agent_image.clone(),
            pull_policy: self.agent_image_pull_policy.clone(),
            hub_resources: self.hub_resources.0.clone(),
            agent_resources: self.agent_resources.0.clone(),
            hub_service_account: non_empty(&self.hub_service_account),
            agent_service_account: non_empty(&self.agent_service_account),
            log_filter: non_empty(&self.pod_log),
            source_policy: self.source_policy(),
            network_policy: self.network_policy.then(|| OperatorPeer {
                namespace: if self.operator_namespace.is_empty() {
                    self.lease_namespace()
                } else {
                    self.operator_namespace.clone()
                },
                pod_labels: self.operator_pod_labels.0.clone(),
            }),
        }
    }

    /// What SourceNodes may ask of the operator.
    pub fn source_policy(&self) -> SourcePolicy {
        SourcePolicy {
            volumes: self.datastore_volumes.0.clone(),
            tolerations: self.allowed_tolerations.0.clone(),
        }
    }

    /// The namespace to watch, if only one.
    pub fn namespace(&self) -> Option<&str> {
        (!self.watch_namespace.is_empty()).then_some(self.watch_namespace.as_str())
    }

    /// Where the VM Leases live.
    pub fn lease_namespace(&self) -> String {
        [self.lease_namespace.as_str(), self.watch_namespace.as_str()]
            .into_iter()
            .find(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned()
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_secs(self.probe_interval_seconds)
    }

    pub fn repository_probe_interval(&self) -> Duration {
        Duration::from_secs(self.repository_probe_interval_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        Settings::try_parse_from(std::iter::once("sendense-operator").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_chart_and_an_empty_account_means_the_default_one() {
        let s = parse(&["--hub-service-account", ""]).expect("defaults");
        assert_eq!(s.probe_interval(), Duration::from_secs(300));
        assert_eq!(s.metrics_addr.to_string(), "0.0.0.0:8080");
        let pods = s.pod_settings();
        assert_eq!(pods.hub_service_account, None);
        assert_eq!(
            pods.agent_service_account.as_deref(),
            Some("sendense-agent")
        );
        assert!(pods.agent.starts_with("ghcr.io/sendense/sendense-agent:"));
        assert_eq!(pods.log_filter, None);
        assert_eq!(s.namespace(), None);
    }

    #[test]
    fn pod_resources_default_to_the_charts_and_bad_ones_name_the_field() {
        let s = parse(&[]).expect("defaults");
        let hub = s.pod_settings().hub_resources.expect("hub resources");
        let limit = hub.limits.expect("limits");
        assert_eq!(limit.get("memory").map(|q| q.0.as_str()), Some("512Mi"));
        assert_eq!(s.pod_settings().pull_policy, "IfNotPresent");
        assert_eq!(
            parse(&["--agent-resources", ""])
                .expect("none")
                .agent_resources,
            Resources(None)
        );
        let err = parse(&["--agent-resources", r#"{"limits":{"memory":"1 GB"}}"#])
            .expect_err("bad quantity");
        assert!(err.to_string().contains("limits.memory"), "{err}");
        assert!(parse(&["--hub-resources", "cpu=1"]).is_err());
        assert!(parse(&["--agent-image-pull-policy", "always"]).is_err());
        for q in ["100m", "0.5", "128Mi", "1Gi", "2e3", "1", "+1.5k"] {
            assert!(is_quantity(q), "{q}");
        }
        for q in ["", "1 GB", "Mi", "1.2.3", "1Q", "e3", "."] {
            assert!(!is_quantity(q), "{q}");
        }
    }

    #[test]
    fn network_policies_are_off_unless_set_and_name_the_operators_pods() {
        assert_eq!(
            parse(&[]).expect("defaults").pod_settings().network_policy,
            None
        );
        let s = parse(&[
            "--network-policy",
            "true",
            "--lease-namespace",
            "sendense-system",
            "--operator-pod-labels",
            "app.kubernetes.io/instance=sendense, app.kubernetes.io/component=operator",
        ])
        .expect("settings");
        let peer = s.pod_settings().network_policy.expect("on");
        assert_eq!(peer.namespace, "sendense-system");
        assert_eq!(
            peer.pod_labels
                .get("app.kubernetes.io/instance")
                .map(String::as_str),
            Some("sendense")
        );
        assert_eq!(peer.pod_labels.len(), 2);
        assert!(parse(&["--operator-pod-labels", "operator"]).is_err());
        assert!(parse(&["--operator-pod-labels", ""]).is_err());
        assert!(parse(&["--network-policy", "yes"]).is_err());
    }

    #[test]
    fn a_mistyped_number_is_an_error_not_a_default() {
        let err = parse(&["--probe-interval-seconds", "5m"]).expect_err("not a number");
        assert!(err.to_string().contains("5m"), "{err}");
        assert!(parse(&["--metrics-addr", "localhost"]).is_err());
    }
}
