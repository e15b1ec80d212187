//! Stopping a pod as the kubelet does: a deletion (or the object vanishing, or the stand-in
//! shutting down) becomes one stop order every container sees; each container's process group
//! gets SIGTERM, then SIGKILL once the grace period is over; last, the object is deleted with
//! grace 0.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Preconditions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::PodUpdate;
use crate::node::process;

/// Why a pod stops.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    /// deletionTimestamp set: graceful, with the pod's (or the delete's) grace period.
    Deleting(Option<Duration>),
    /// Object gone or node shutting down: kill now.
    Now,
}

impl Stop {
    fn is_deleting(self) -> bool {
        matches!(self, Stop::Deleting(_))
    }

    fn kill_within(self, default: Duration) -> Duration {
        match self {
            Stop::Deleting(g) => g.unwrap_or(default),
            Stop::Now => Duration::ZERO,
        }
    }
}

/// Waits until the pod must stop.
async fn next_stop(updates: &mut watch::Receiver<PodUpdate>) -> Stop {
    loop {
        let current = updates.borrow_and_update().clone();
        match current {
            PodUpdate::Object(p) if p.metadata.deletion_timestamp.is_some() => {
                return Stop::Deleting(
                    p.metadata
                        .deletion_grace_period_seconds
                        .map(|s| Duration::from_secs(s.max(0) as u64)),
                );
            }
            PodUpdate::Object(_) => {}
            PodUpdate::Gone | PodUpdate::Shutdown => return Stop::Now,
        }
        if updates.changed().await.is_err() {
            return Stop::Now;
        }
    }
}

/// The order to stop, as every container supervisor of the pod sees it: None until given, then
/// how long the processes get before SIGKILL. The sender going away counts as an order to stop
/// at once.
#[derive(Clone)]
pub(super) struct StopOrder(watch::Receiver<Option<Duration>>);

impl StopOrder {
    /// Follows the pod's updates and gives the order when it is deleted (with its grace period,
    /// `grace` unless the delete said otherwise), gone or the stand-in shuts down. The task is
    /// the caller's to abort once the pod is done.
    pub(super) fn follow(
        updates: &watch::Receiver<PodUpdate>,
        grace: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = watch::channel(None::<Duration>);
        let mut updates = updates.clone();
        let task = tokio::spawn(async move {
            let stop = next_stop(&mut updates).await;
            let _ = tx.send(Some(stop.kill_within(grace)));
        });
        (Self(rx), task)
    }

    /// True once the order is given.
    pub(super) fn given(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Waits for the order; returns how long the processes get before SIGKILL.
    pub(super) async fn wait(&self) -> Duration {
        let mut rx = self.0.clone();
        rx.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|within| *within)
            .unwrap_or(Duration::ZERO)
    }

    /// Sleeps `delay`; true if the order came first.
    pub(super) async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.wait() => true,
        }
    }
}

/// SIGTERM to the process group led by `pid`, SIGKILL after `within` (or at once, if the leader
/// is gone and others linger).
pub(super) async fn terminate(
    child: &mut tokio::process::Child,
    pid: u32,
    within: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    process::signal_group(pid, libc::SIGTERM);
    match tokio::time::timeout(within, child.wait()).await {
        Ok(r) => {
            if process::group_alive(pid) {
                process::signal_group(pid, libc::SIGKILL);
            }
            r
        }
        Err(_) => {
            process::signal_group(pid, libc::SIGKILL);
            child.wait().await
        }
    }
}

/// Waits for the pod's deletion and removes the object (grace 0), as the kubelet does once its
/// containers are gone.
pub(super) async fn finish_deletion(
    api: &Api<Pod>,
    name: &str,
    uid: &str,
    updates: &mut watch::Receiver<PodUpdate>,
) {
    if next_stop(updates).await.is_deleting() {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => info!(pod = %name, "deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => warn!(pod = %name, "final delete: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deletion_keeps_its_grace_and_anything_else_kills_at_once() {
        let pod_grace = Duration::from_secs(30);
        assert_eq!(Stop::Deleting(None).kill_within(pod_grace), pod_grace);
        assert_eq!(
            Stop::Deleting(Some(Duration::from_secs(2))).kill_within(pod_grace),
            Duration::from_secs(2)
        );
        assert_eq!(Stop::Now.kill_within(pod_grace), Duration::ZERO);
        assert!(!Stop::Now.is_deleting());
    }
}
