//! Pod status as a kubelet writes it: phase, conditions (moving lastTransitionTime only on a
//! change), container statuses, pod and host IPs, start time.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// A pod's phase as this stand-in sets it; the API's fifth, `Unknown`, is a node that stopped
/// reporting, which the stand-in never writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    /// The phase as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
        }
    }

    /// The phase of a pod read from the API, if it is one of these four.
    pub fn of(pod: &Pod) -> Option<Self> {
        match pod.status.as_ref()?.phase.as_deref()? {
            "Pending" => Some(PodPhase::Pending),
            "Running" => Some(PodPhase::Running),
            "Succeeded" => Some(PodPhase::Succeeded),
            "Failed" => Some(PodPhase::Failed),
            _ => None,
        }
    }

    /// True once the pod has ended: nothing runs again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

pub fn now() -> Time {
    Time(Timestamp::try_from(SystemTime::now()).unwrap_or(Timestamp::UNIX_EPOCH))
}

pub fn waiting(name: &str, image: &str, reason: &str, message: Option<String>) -> ContainerStatus {
    ContainerStatus {
        name: name.to_owned(),
        image: image.to_owned(),
        image_id: String::new(),
        ready: false,
        restart_count: 0,
        started: Some(false),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.to_owned()),
                message,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn running_state(started_at: Time) -> ContainerState {
    ContainerState {
        running: Some(ContainerStateRunning {
            started_at: Some(started_at),
        }),
        ..Default::default()
    }
}

pub fn terminated_state(
    exit_code: i32,
    signal: Option<i32>,
    reason: &str,
    message: Option<String>,
    started_at: Option<Time>,
    container_id: Option<String>,
) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            signal,
            reason: Some(reason.to_owned()),
            message,
            started_at,
            finished_at: Some(now()),
            container_id,
        }),
        ..Default::default()
    }
}

/// Exit code as a container runtime reports it: 128+signal for a signalled process.
pub fn exit_code_of(status: &std::process::ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (255, None),
    }
}

/// Sets a pod condition, keeping lastTransitionTime unless the status changes.
pub fn set_condition(
    conditions: &mut Vec<PodCondition>,
    type_: &str,
    value: bool,
    reason: Option<&str>,
) {
    let status = if value { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => {
            c.reason = reason.map(str::to_owned);
        }
        Some(c) => {
            c.status = status;
            c.reason = reason.map(str::to_owned);
            c.last_transition_time = Some(now());
        }
        None => conditions.push(PodCondition {
            type_: type_.to_owned(),
            status,
            reason: reason.map(str::to_owned),
            last_transition_time: Some(now()),
            ..Default::default()
        }),
    }
}

/// The status document written to the API (strategic merge: conditions merge by type, so the
/// scheduler's PodScheduled stays).
#[allow(clippy::too_many_arguments)]
pub fn document(
    phase: PodPhase,
    reason: Option<&str>,
    message: Option<&str>,
    conditions: &[PodCondition],
    init: &[ContainerStatus],
    containers: &[ContainerStatus],
    pod_ip: &str,
    host_ip: &str,
    start_time: &Time,
) -> PodStatus {
    PodStatus {
        phase: Some(phase.as_str().to_owned()),
        reason: reason.map(str::to_owned),
        message: message.map(str::to_owned),
        conditions: Some(conditions.to_vec()),
        init_container_statuses: (!init.is_empty()).then(|| init.to_vec()),
        container_statuses: Some(containers.to_vec()),
        pod_ip: Some(pod_ip.to_owned()),
        pod_ips: Some(vec![PodIP {
            ip: pod_ip.to_owned(),
        }]),
        host_ip: Some(host_ip.to_owned()),
        host_ips: Some(vec![HostIP {
            ip: host_ip.to_owned(),
        }]),
        start_time: Some(start_time.clone()),
        ..Default::default()
    }
}

/// True once the pod has ended (Succeeded or Failed).
pub fn is_terminal(pod: &Pod) -> bool {
    PodPhase::of(pod).is_some_and(PodPhase::is_terminal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_transition_time_moves_only_on_change() {
        let mut conds = Vec::new();
        set_condition(&mut conds, "Ready", false, None);
        let first = conds[0].last_transition_time.clone();
        set_condition(&mut conds, "Ready", false, Some("ContainersNotReady"));
        assert_eq!(conds[0].last_transition_time, first);
        set_condition(&mut conds, "Ready", true, None);
        assert_ne!(conds[0].last_transition_time, first);
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn phases_read_back_as_written_and_only_the_ended_are_terminal() {
        for phase in [
            PodPhase::Pending,
            PodPhase::Running,
            PodPhase::Succeeded,
            PodPhase::Failed,
        ] {
            let pod = Pod {
                status: Some(PodStatus {
                    phase: Some(phase.as_str().to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            assert_eq!(PodPhase::of(&pod), Some(phase));
            assert_eq!(
                is_terminal(&pod),
                matches!(phase, PodPhase::Succeeded | PodPhase::Failed)
            );
        }
        assert_eq!(PodPhase::of(&Pod::default()), None);
    }

    #[test]
    fn signalled_exit_is_128_plus_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exit_code_of(&std::process::ExitStatus::from_raw(9)),
            (137, Some(9))
        );
        assert_eq!(
            exit_code_of(&std::process::ExitStatus::from_raw(3 << 8)),
            (3, None)
        );
    }
}
