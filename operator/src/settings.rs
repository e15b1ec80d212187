//! The operator's settings: one struct, from flags or the environment variables the Helm chart
//! and config/manager set. A value that does not parse (a mistyped number) stops the operator
//! at start with a message naming the variable, instead of falling back to a default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::resources::PodSettings;

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

    /// This operator's instance in the Events it publishes (the pod's name in a cluster).
    #[arg(long, env = "HOSTNAME")]
    pub instance: Option<String>,
}

fn account(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| name.to_owned())
}

impl Settings {
    /// What every pod the operator creates shares.
    pub fn pod_settings(&self) -> PodSettings {
        PodSettings {
            agent: self.agent_image.clone(),
            hub_service_account: account(&self.hub_service_account),
            agent_service_account: account(&self.agent_service_account),
        }
    }

    /// The namespace to watch, if only one.
    pub fn namespace(&self) -> Option<&str> {
        (!self.watch_namespace.is_empty()).then_some(self.watch_namespace.as_str())
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
        assert_eq!(s.namespace(), None);
    }

    #[test]
    fn a_mistyped_number_is_an_error_not_a_default() {
        let err = parse(&["--probe-interval-seconds", "5m"]).expect_err("not a number");
        assert!(err.to_string().contains("5m"), "{err}");
        assert!(parse(&["--metrics-addr", "localhost"]).is_err());
    }
}
