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

/// True when a pod being deleted is still there a minute past its deletion time (which is its
/// grace period's end): its kubelet does not answer, as when its node is gone.
pub fn kubelet_gone(pod: &Pod, now: k8s_openapi::jiff::Timestamp) -> bool {
    pod.metadata
        .deletion_timestamp
        .as_ref()
        .is_some_and(|t| now.as_second() - t.0.as_second() > 60)
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

/// For a pod whose containers serve until it is deleted (the hub): the first container that
/// ended all the same, whatever its exit code (a qemu-nbd killed by its startup probe may exit
/// 0 on the SIGTERM), with its reason.
pub fn server_ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    status.container_statuses.iter().flatten().find_map(|cs| {
        let t = cs.state.as_ref()?.terminated.as_ref()?;
        Some(format!(
            "container {} ended (exit code {}{}) while it should serve",
            cs.name,
            t.exit_code,
            t.reason
                .as_deref()
                .map(|r| format!(", {r}"))
                .unwrap_or_default()
        ))
    })
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

/// Why the scheduler cannot place the pod, while it cannot (its `PodScheduled` condition is
/// False for `Unschedulable`): the scheduler's message.
pub fn unschedulable(pod: &Pod) -> Option<String> {
    let c = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    (c.status != TRUE && c.reason.as_deref() == Some("Unschedulable")).then(|| {
        c.message
            .clone()
            .unwrap_or_else(|| "no node can take it".into())
    })
}

/// Why a container of the pod does not start yet, when its state says so (an image that cannot
/// be pulled, a missing Secret or ConfigMap, a crash loop): "container hub-2000:
/// ImagePullBackOff: ...".
pub fn waiting_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|cs| {
            let w = cs.state.as_ref()?.waiting.as_ref()?;
            let reason = w.reason.as_deref()?;
            if matches!(reason, "ContainerCreating" | "PodInitializing") {
                return None;
            }
            let msg = w.message.as_deref().unwrap_or("").trim();
            Some(format!(
                "container {}: {reason}{}{}",
                cs.name,
                if msg.is_empty() { "" } else { ": " },
                msg.chars().take(400).collect::<String>()
            ))
        })
}

/// The pod's own status message (`status.message`), if any.
pub fn message(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serving_container_that_ended_is_named_whatever_its_code() {
        let pod = |state: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "x-hub"},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "nbd-2000", "image": "i", "imageID": "", "ready": true,
                     "restartCount": 0, "state": {"running": {}}},
                    {"name": "nbd-2001", "image": "i", "imageID": "", "ready": false,
                     "restartCount": 0, "state": state}]}
            }))
            .unwrap()
        };
        assert_eq!(server_ended(&pod(serde_json::json!({"running": {}}))), None);
        assert_eq!(
            server_ended(&pod(
                serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed"}})
            ))
            .as_deref(),
            Some("container nbd-2001 ended (exit code 0, Completed) while it should serve")
        );
        assert_eq!(server_ended(&Pod::default()), None);
    }

    #[test]
    fn a_pod_terminating_a_minute_past_its_deletion_time_has_lost_its_kubelet() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-agent", "deletionTimestamp": "2026-11-26T10:00:00Z"}
        }))
        .unwrap();
        let at = |s: &str| s.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert!(!kubelet_gone(&pod, at("2026-11-26T10:01:00Z")));
        assert!(kubelet_gone(&pod, at("2026-11-26T10:01:01Z")));
        assert!(!kubelet_gone(&Pod::default(), at("2030-01-01T00:00:00Z")));
    }

    #[test]
    fn an_unschedulable_pod_says_why_and_a_waiting_container_too() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-hub"},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient memory."}]}
        }))
        .unwrap();
        assert_eq!(
            unschedulable(&pod).as_deref(),
            Some("0/1 nodes are available: 1 Insufficient memory.")
        );
        assert_eq!(waiting_problem(&pod), None);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x-hub"},
            "status": {"phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {"name": "a", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"waiting": {"reason": "ContainerCreating"}}},
                    {"name": "hub-2000", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                     "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}
        }))
        .unwrap();
        assert_eq!(unschedulable(&pod), None);
        assert_eq!(
            waiting_problem(&pod).as_deref(),
            Some("container hub-2000: ImagePullBackOff: Back-off pulling image")
        );
    }

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
