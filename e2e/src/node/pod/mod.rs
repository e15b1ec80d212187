//! One pod on the node, from bind to final delete: [`run`] checks what the pod asks for
//! (`admission`), builds its volumes and environment (`prepare`), runs its init containers in
//! order and then its containers with probes and restarts (`supervisor`, `probing`), writes
//! its status back (`state`), and stops it (SIGTERM, grace period, SIGKILL) on deletion
//! (`lifecycle`).

mod admission;
mod lifecycle;
mod prepare;
mod probing;
mod state;
mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::warn;

use super::status;
use admission::UNSUPPORTED;
use lifecycle::{StopOrder, finish_deletion};
use state::PodState;
use supervisor::RestartPolicy;

/// What every pod on the node shares.
pub struct NodeContext {
    pub client: Client,
    pub node_name: String,
    pub host_ip: String,
    /// Pod directories (emptyDir volumes, logs) live under here.
    pub root: PathBuf,
    /// Where commands are looked up (the host's PATH plus the project's build output).
    pub search_path: Vec<PathBuf>,
    /// Environment every container starts from (PATH, HOME, in-cluster API address).
    pub base_env: Vec<(String, String)>,
    /// First restart delay; doubles up to five minutes, as the kubelet's CrashLoopBackOff.
    pub restart_backoff: Duration,
}

/// Messages from the node to a pod worker.
#[derive(Clone, Debug)]
pub enum PodUpdate {
    /// The latest object from the API.
    Object(Box<Pod>),
    /// The object is gone from the API: kill at once.
    Gone,
    /// The node stand-in is shutting down: kill, leave the object.
    Shutdown,
}

/// Runs one pod until it is deleted (or the stand-in shuts down).
pub async fn run(
    ctx: Arc<NodeContext>,
    pod: Pod,
    pod_ip: String,
    mut updates: watch::Receiver<PodUpdate>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let state = Arc::new(PodState::new(
        api.clone(),
        &pod,
        pod_ip,
        ctx.host_ip.clone(),
    ));

    if status::is_terminal(&pod) {
        // Already ended (e.g. before a stand-in restart): only the final delete is left.
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    if ran_before(&pod) {
        state
            .fail(
                "NodeRestarted",
                "the node stand-in restarted; the pod's processes ended with it".into(),
            )
            .await;
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    if let Some(why) = admission::unsupported(&pod) {
        warn!(pod = %name, "cannot run: {why}");
        state.fail(UNSUPPORTED, why).await;
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    // The first write: Pending, every container waiting in PodInitializing.
    state.update(|_| {}).await;

    let spec = pod.spec.clone().unwrap_or_default();
    let policy = RestartPolicy::of(&spec);
    let grace =
        Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
    let (stop, watcher) = StopOrder::follow(&updates, grace);
    if let Some(prepared) = prepare::until_ready(&ctx, &state, &pod, &stop).await {
        supervisor::run_containers(
            &state,
            &spec,
            &prepared,
            policy,
            grace,
            ctx.restart_backoff,
            &stop,
        )
        .await;
    }
    finish_deletion(&api, &name, &uid, &mut updates).await;
    watcher.abort();
}

/// True if a container of the pod already ran or runs: a stand-in before this one started it,
/// and its processes died with that stand-in.
fn ran_before(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
        })
}
