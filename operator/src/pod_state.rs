//! Reading a pod's state the way every controller needs it: its phase, whether it is Ready and
//! where, why it failed, and what its container said when it ended (the termination message
//! the agent writes its JSON result to).

use k8s_openapi::api::core::v1::Pod;
use sendense_crds::conditions::TRUE;

/// A pod's phase (`status.phase`); a pod without one is still Pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn of(pod: &Pod) -> Self {
        match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            None | Some("Pending") => Self::Pending,
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some(_) => Self::Unknown,
        }
    }

    /// Succeeded or Failed: its containers will not run again.
    pub fn ended(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
        }
    }
}

/// True when the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == TRUE))
}

/// The pod's IP, once it has one.
pub fn ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

/// True once the pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Why a pod failed, when it did: the pod's phase Failed, or any container (init containers
/// included) that terminated with a non-zero code.
pub fn failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref())
            && t.exit_code != 0
        {
            let msg = t.message.as_deref().unwrap_or("").trim();
            return Some(format!(
                "container {} exited with code {}{}{}",
                cs.name,
                t.exit_code,
                if msg.is_empty() { "" } else { ": " },
                msg.chars().take(600).collect::<String>()
            ));
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "pod failed: {} {}",
            status.reason.as_deref().unwrap_or(""),
            status.message.as_deref().unwrap_or("")
        ));
    }
    None
}

/// The termination message of a pod's first container that has one.
pub fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|cs| cs.state.as_ref()?.terminated.as_ref()?.message.clone())
}

/// The pod's own status message (`status.message`), if any.
pub fn message(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_failures_name_the_container_and_its_message() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-hub"},
            "status": {"phase": "Failed", "initContainerStatuses": [
                {"name": "prepare-2000", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 1, "message": "backing file missing"}}}
            ]}
        }))
        .expect("pod");
        let why = failure(&pod).expect("failed");
        assert!(
            why.contains("prepare-2000") && why.contains("backing file missing"),
            "{why}"
        );
        let ok: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "y"}, "status": {"phase": "Running"}
        }))
        .expect("pod");
        assert!(failure(&ok).is_none());
    }
}
