//! The pod's status as its worker knows it: phase, reason, conditions and container statuses.
//! Every change goes through [`PodState::update`], which derives the conditions and writes the
//! whole status to the API.

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::Mutex;
use tracing::warn;

use crate::node::status::{self, PodPhase, now};

/// One pod's status, shared by its worker and the supervisors of its containers.
pub(super) struct PodState {
    api: Api<Pod>,
    pub(super) name: String,
    pub(super) pod_ip: String,
    host_ip: String,
    start_time: Time,
    status: Mutex<Status>,
}

/// The fields of the status the stand-in decides.
pub(super) struct Status {
    pub(super) phase: PodPhase,
    reason: Option<String>,
    message: Option<String>,
    conditions: Vec<PodCondition>,
    pub(super) init: Vec<ContainerStatus>,
    pub(super) containers: Vec<ContainerStatus>,
}

/// Which container of the pod a status belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ContainerSlot {
    /// The n-th init container.
    Init(usize),
    /// The n-th (regular) container.
    App(usize),
}

impl ContainerSlot {
    pub(super) fn is_init(self) -> bool {
        matches!(self, ContainerSlot::Init(_))
    }
}

impl Status {
    /// The status of the container in `slot`; both lists are built from the same spec as the
    /// supervisors, so there always is one.
    fn container_mut(&mut self, slot: ContainerSlot) -> Option<&mut ContainerStatus> {
        match slot {
            ContainerSlot::Init(i) => self.init.get_mut(i),
            ContainerSlot::App(i) => self.containers.get_mut(i),
        }
    }
}

impl PodState {
    /// A pod not started yet: Pending, every container waiting in PodInitializing; conditions
    /// already on the object (the scheduler's PodScheduled) are kept.
    pub(super) fn new(api: Api<Pod>, pod: &Pod, pod_ip: String, host_ip: String) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let initializing = |c: &Container| {
            status::waiting(
                &c.name,
                c.image.as_deref().unwrap_or_default(),
                "PodInitializing",
                None,
            )
        };
        Self {
            api,
            name: pod.metadata.name.clone().unwrap_or_default(),
            pod_ip,
            host_ip,
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.clone())
                .unwrap_or_else(now),
            status: Mutex::new(Status {
                phase: PodPhase::Pending,
                reason: None,
                message: None,
                conditions: pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default(),
                init: spec
                    .init_containers
                    .iter()
                    .flatten()
                    .map(initializing)
                    .collect(),
                containers: spec.containers.iter().map(initializing).collect(),
            }),
        }
    }

    /// Applies `f` and writes the resulting status.
    pub(super) async fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut st = self.status.lock().await;
        f(&mut st);
        derive_conditions(&mut st);
        let doc = status::document(
            st.phase,
            st.reason.as_deref(),
            st.message.as_deref(),
            &st.conditions,
            &st.init,
            &st.containers,
            &self.pod_ip,
            &self.host_ip,
            &self.start_time,
        );
        let patch = serde_json::json!({ "status": doc });
        // Written while holding the lock, so writes reach the API in the order they happened.
        if let Err(e) = self
            .api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            warn!(pod = %self.name, phase = st.phase.as_str(), "writing pod status: {e}");
        }
    }

    /// Ends the pod as Failed, saying why.
    pub(super) async fn fail(&self, reason: &str, message: String) {
        self.update(|st| {
            st.phase = PodPhase::Failed;
            st.reason = Some(reason.to_owned());
            st.message = Some(message);
        })
        .await;
    }

    /// Changes the status of one container.
    pub(super) async fn update_container(
        &self,
        slot: ContainerSlot,
        f: impl FnOnce(&mut ContainerStatus),
    ) {
        self.update(|st| {
            if let Some(cs) = st.container_mut(slot) {
                f(cs);
            }
        })
        .await;
    }
}

/// The pod conditions that follow from the phase and the container statuses, as the kubelet
/// derives them.
fn derive_conditions(st: &mut Status) {
    let initialized = st.init.iter().all(|c| {
        c.state
            .as_ref()
            .is_some_and(|s| s.terminated.as_ref().is_some_and(|t| t.exit_code == 0))
    });
    let all_ready = !st.containers.is_empty() && st.containers.iter().all(|c| c.ready);
    let started = st.phase != PodPhase::Pending
        || st
            .containers
            .iter()
            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    let completed = st.phase.is_terminal();
    status::set_condition(
        &mut st.conditions,
        "PodReadyToStartContainers",
        !completed || started,
        None,
    );
    status::set_condition(
        &mut st.conditions,
        "Initialized",
        initialized,
        (!initialized).then_some("ContainersNotInitialized"),
    );
    let ready = all_ready && !completed;
    let why = if completed {
        Some("PodCompleted")
    } else if ready {
        None
    } else {
        Some("ContainersNotReady")
    };
    status::set_condition(&mut st.conditions, "ContainersReady", ready, why);
    status::set_condition(&mut st.conditions, "Ready", ready, why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition<'a>(st: &'a Status, type_: &str) -> (&'a str, Option<&'a str>) {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition is set");
        (c.status.as_str(), c.reason.as_deref())
    }

    fn ready_container(name: &str) -> ContainerStatus {
        ContainerStatus {
            ready: true,
            state: Some(status::running_state(now())),
            ..status::waiting(name, "img", "PodInitializing", None)
        }
    }

    fn status_with(phase: PodPhase, containers: Vec<ContainerStatus>) -> Status {
        Status {
            phase,
            reason: None,
            message: None,
            conditions: Vec::new(),
            init: Vec::new(),
            containers,
        }
    }

    #[test]
    fn a_running_pod_is_ready_once_every_container_is() {
        let mut st = status_with(
            PodPhase::Running,
            vec![ready_container("a"), ready_container("b")],
        );
        derive_conditions(&mut st);
        assert_eq!(condition(&st, "Ready"), ("True", None));
        assert_eq!(condition(&st, "ContainersReady"), ("True", None));
        assert_eq!(condition(&st, "Initialized"), ("True", None));

        st.containers[1].ready = false;
        derive_conditions(&mut st);
        assert_eq!(
            condition(&st, "Ready"),
            ("False", Some("ContainersNotReady"))
        );
    }

    #[test]
    fn an_ended_pod_is_never_ready() {
        let mut st = status_with(PodPhase::Succeeded, vec![ready_container("a")]);
        derive_conditions(&mut st);
        assert_eq!(condition(&st, "Ready"), ("False", Some("PodCompleted")));
        assert_eq!(condition(&st, "PodReadyToStartContainers").0, "True");
    }

    #[test]
    fn a_pod_is_not_initialized_until_each_init_container_exited_0() {
        let mut st = status_with(PodPhase::Pending, Vec::new());
        st.init = vec![status::waiting("init", "img", "PodInitializing", None)];
        derive_conditions(&mut st);
        assert_eq!(
            condition(&st, "Initialized"),
            ("False", Some("ContainersNotInitialized"))
        );
        st.init[0].state = Some(status::terminated_state(
            0,
            None,
            "Completed",
            None,
            None,
            None,
        ));
        derive_conditions(&mut st);
        assert_eq!(condition(&st, "Initialized"), ("True", None));
    }
}
