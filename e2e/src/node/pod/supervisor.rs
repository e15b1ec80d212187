//! Running a pod's containers: init containers one after another, then every container at
//! once, each under a supervisor that starts its process in a process group of its own, follows
//! its probes, restarts it per the restart policy with the kubelet's doubling back-off, and
//! leaves no process of the group behind.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, PodSpec};
use tracing::info;

use super::lifecycle::{StopOrder, terminate};
use super::prepare::{Planned, Prepared};
use super::state::{ContainerSlot, PodState};
use crate::node::process::{self, ProcessSpec};
use crate::node::status::{self, PodPhase, now};
use crate::node::termination::TerminationLog;

/// The pod's `restartPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// The pod's policy; Always when unset, as the API defaults it.
    pub(super) fn of(spec: &PodSpec) -> Self {
        match spec.restart_policy.as_deref() {
            None | Some("Always") => RestartPolicy::Always,
            Some("OnFailure") => RestartPolicy::OnFailure,
            // The API server admits only the three; anything else never restarts.
            Some(_) => RestartPolicy::Never,
        }
    }

    /// The policy of the pod's init containers: they restart on failure unless the pod never
    /// restarts anything (then a failed init container fails the pod).
    fn for_init(self) -> Self {
        match self {
            RestartPolicy::Never => RestartPolicy::Never,
            RestartPolicy::Always | RestartPolicy::OnFailure => RestartPolicy::OnFailure,
        }
    }

    fn restarts_after(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// Init containers in order, then all containers; returns when the pod has ended (its phase
/// written) or was told to stop.
pub(super) async fn run_containers(
    state: &Arc<PodState>,
    spec: &PodSpec,
    prepared: &Prepared,
    policy: RestartPolicy,
    grace: Duration,
    restart_backoff: Duration,
    stop: &StopOrder,
) {
    let supervisor = |container: &Container, planned: &Planned, slot| Supervisor {
        state: state.clone(),
        container: container.clone(),
        spec: planned.process.clone(),
        termination: planned.termination.clone(),
        slot,
        grace,
        restart_backoff,
    };
    // Init containers, one after another; each must exit 0.
    let init_containers = spec.init_containers.iter().flatten().zip(&prepared.init);
    for (i, (c, planned)) in init_containers.enumerate() {
        let sup = supervisor(c, planned, ContainerSlot::Init(i));
        let exit_code = sup.run_with_restarts(policy.for_init(), stop.clone()).await;
        if stop.given() {
            return;
        }
        if exit_code != 0 {
            state.update(|st| st.phase = PodPhase::Failed).await;
            return;
        }
    }

    state
        .update(|st| {
            st.phase = PodPhase::Running;
            for cs in st.containers.iter_mut() {
                *cs = status::waiting(&cs.name, &cs.image, "ContainerCreating", None);
            }
        })
        .await;
    let mut tasks = Vec::new();
    for (i, (c, planned)) in spec.containers.iter().zip(&prepared.containers).enumerate() {
        let sup = supervisor(c, planned, ContainerSlot::App(i));
        tasks.push(tokio::spawn(sup.run_with_restarts(policy, stop.clone())));
    }
    let results = futures::future::join_all(tasks).await;
    if stop.given() {
        return;
    }
    // A supervisor that panicked counts as a failed container.
    let failed = results
        .iter()
        .any(|r| r.as_ref().map_or(true, |code| *code != 0));
    info!(pod = %state.name, failed, "all containers ended");
    let phase = if failed {
        PodPhase::Failed
    } else {
        PodPhase::Succeeded
    };
    state.update(|st| st.phase = phase).await;
}

/// Runs one container: the process, its probes, its restarts.
pub(super) struct Supervisor {
    pub(super) state: Arc<PodState>,
    pub(super) container: Container,
    pub(super) spec: ProcessSpec,
    /// Emptied before every run, read when the process ends.
    termination: TerminationLog,
    pub(super) slot: ContainerSlot,
    /// How long the process gets between SIGTERM and SIGKILL when a probe kills it.
    grace: Duration,
    /// First restart delay (see `backoff`).
    restart_backoff: Duration,
}

/// Kills the process group when dropped, whatever path leaves the supervisor.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if process::group_alive(self.0) {
            process::signal_group(self.0, libc::SIGKILL);
        }
    }
}

impl Supervisor {
    /// Changes this container's status.
    pub(super) async fn set(&self, f: impl FnOnce(&mut ContainerStatus)) {
        self.state.update_container(self.slot, f).await;
    }

    /// Runs the container until it ends for good under `policy` or the pod stops; returns the
    /// last run's exit code.
    async fn run_with_restarts(self, policy: RestartPolicy, stop: StopOrder) -> i32 {
        let mut restarts = 0;
        loop {
            let exit_code = self.run_once(restarts, &stop).await;
            if stop.given() || !policy.restarts_after(exit_code) {
                return exit_code;
            }
            restarts += 1;
            let delay = backoff(self.restart_backoff, restarts);
            self.set(|cs| {
                cs.restart_count = restarts;
                cs.last_state = cs.state.take();
                cs.state = status::waiting(
                    &cs.name,
                    &cs.image,
                    "CrashLoopBackOff",
                    Some(format!("back-off {delay:?} restarting failed container")),
                )
                .state;
                cs.ready = false;
                cs.started = Some(false);
            })
            .await;
            if stop.sleep(delay).await {
                return exit_code;
            }
        }
    }

    /// One run of the process, from start to exit (or kill); returns its exit code.
    async fn run_once(&self, restarts: i32, stop: &StopOrder) -> i32 {
        // This run's output starts where the (appended) log ends now.
        let log_start = self
            .spec
            .log
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let spawned = self
            .termination
            .reset()
            .map_err(|e| {
                format!(
                    "preparing the termination-message file {}: {e}",
                    self.termination.host.display()
                )
            })
            .and_then(|()| {
                process::spawn(&self.spec)
                    .map_err(|e| format!("starting {}: {e}", self.spec.program.display()))
            });
        let mut child = match spawned {
            Ok(c) => c,
            Err(msg) => {
                self.set(|cs| {
                    cs.restart_count = restarts;
                    cs.state = Some(status::terminated_state(
                        128,
                        None,
                        "StartError",
                        Some(msg),
                        None,
                        None,
                    ));
                })
                .await;
                return 128;
            }
        };
        let pid = child.id().unwrap_or(0);
        let _guard = GroupGuard(pid);
        let started_at = now();
        let container_id = format!("standin://{pid}");
        let has_startup = self.container.startup_probe.is_some();
        let has_readiness = self.container.readiness_probe.is_some();
        self.set(|cs| {
            cs.restart_count = restarts;
            cs.container_id = Some(container_id.clone());
            cs.state = Some(status::running_state(started_at.clone()));
            cs.started = Some(!has_startup);
            cs.ready = !self.slot.is_init() && !has_startup && !has_readiness;
        })
        .await;

        let probes = self.probe_loop();
        tokio::pin!(probes);
        let (exit, reason) = tokio::select! {
            r = child.wait() => (r, None),
            why = &mut probes => {
                // Liveness or startup failure: stop it with the grace period, then report.
                (terminate(&mut child, pid, self.grace).await, Some(why))
            }
            within = stop.wait() => (terminate(&mut child, pid, within).await, None),
        };
        let (code, signal, message) = match exit {
            Ok(s) => {
                let (c, sig) = status::exit_code_of(&s);
                (c, sig, reason)
            }
            Err(e) => (255, None, Some(format!("waiting for the process: {e}"))),
        };
        // What the container left at its terminationMessagePath (or its output, per policy);
        // a restart moves this state, message included, to lastState.
        let message = self
            .termination
            .message(message, code, self.spec.log.as_deref(), log_start);
        let term_reason = if code == 0 { "Completed" } else { "Error" };
        self.set(|cs| {
            cs.ready = false;
            cs.state = Some(status::terminated_state(
                code,
                signal,
                term_reason,
                message,
                Some(started_at),
                Some(container_id),
            ));
        })
        .await;
        code
    }
}

/// The delay before restart number `restarts` (from 1): `base`, doubling each time, at most
/// five minutes, as the kubelet's CrashLoopBackOff.
fn backoff(base: Duration, restarts: i32) -> Duration {
    let factor = 1u32 << (restarts.clamp(1, 16) - 1) as u32;
    (base * factor).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_up_to_five_minutes() {
        let base = Duration::from_secs(10);
        let delays: Vec<u64> = (1..=7).map(|n| backoff(base, n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(base, 1000), Duration::from_secs(300));
    }

    #[test]
    fn init_containers_restart_on_failure_unless_the_pod_never_restarts() {
        let spec = |policy: Option<&str>| PodSpec {
            restart_policy: policy.map(str::to_owned),
            ..Default::default()
        };
        assert_eq!(RestartPolicy::of(&spec(None)), RestartPolicy::Always);
        assert_eq!(
            RestartPolicy::of(&spec(Some("Always"))).for_init(),
            RestartPolicy::OnFailure
        );
        let never = RestartPolicy::of(&spec(Some("Never")));
        assert_eq!(never.for_init(), RestartPolicy::Never);
        assert!(!never.restarts_after(1));
        let on_failure = RestartPolicy::of(&spec(Some("OnFailure")));
        assert!(on_failure.restarts_after(1) && !on_failure.restarts_after(0));
        assert!(RestartPolicy::Always.restarts_after(0));
    }
}
