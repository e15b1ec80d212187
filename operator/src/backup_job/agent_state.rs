//! Where a job's agent is, read from its pod: starting, copying (its progress address), or
//! ended with its result.

use k8s_openapi::api::core::v1::Pod;
use sendense_contract::result::BackupResult;

use super::outcome::{Failure, FailureReason};
use crate::pod_state::{self, PodPhase};

/// Where the agent is, read from its pod.
#[derive(Debug)]
pub enum AgentState {
    /// Not running yet (or its phase is unknown).
    Starting,
    /// Copying; its progress is served on this address.
    Running(Option<String>),
    Succeeded(BackupResult),
    Failed(Failure, Option<BackupResult>),
}

impl AgentState {
    /// The agent's state from its pod: its phase and, once it ended, its result.
    pub fn of(agent: &Pod) -> Self {
        let result = || {
            let msg = pod_state::termination_message(agent).unwrap_or_default();
            (BackupResult::parse(&msg), msg)
        };
        let reported = |r: &BackupResult, default: &str| {
            let reason = FailureReason::Agent(r.reason);
            Failure::new(reason, r.error.clone().unwrap_or_else(|| default.into()))
        };
        match PodPhase::of(agent) {
            PodPhase::Succeeded => match result() {
                (Some(r), _) if r.ok => Self::Succeeded(r),
                (Some(r), _) => Self::Failed(reported(&r, "the agent reported failure"), Some(r)),
                (None, msg) => Self::Failed(
                    Failure::new(
                        FailureReason::ResultMissing,
                        format!("the agent ended without a readable result: {msg:.300}"),
                    ),
                    None,
                ),
            },
            PodPhase::Failed => match result() {
                (Some(r), _) => Self::Failed(reported(&r, "the agent failed"), Some(r)),
                (None, _) => {
                    let why =
                        pod_state::failure(agent).unwrap_or_else(|| "the agent pod failed".into());
                    Self::Failed(Failure::new(FailureReason::Agent(None), why), None)
                }
            },
            PodPhase::Running => Self::Running(pod_state::ip(agent)),
            PodPhase::Pending | PodPhase::Unknown => Self::Starting,
        }
    }
}
