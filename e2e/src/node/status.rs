//! Pod status as a kubelet writes it: phase, conditions (moving lastTransitionTime only on a
//! change), container statuses, pod and host IPs, start time.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

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
    phase: &str,
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
        phase: Some(phase.to_owned()),
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
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
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
