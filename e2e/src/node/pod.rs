//! One pod on the node: validate what it asks for, build its volumes and environment, run its
//! init containers in order and then its containers, probe them, restart them per the pod's
//! restartPolicy, write status back, and stop it (SIGTERM, grace period, SIGKILL) on deletion.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use super::PodError;
use super::env::{Sources, container_env, expand};
use super::probe::{self, Timing};
use super::process::{self, Mount, ProcessSpec};
use super::status::{self, now};
use super::termination::TerminationLog;
use super::volumes::{self, VolumePaths};

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

/// The pod's status as the worker knows it; every change is written to the API.
struct Shared {
    api: Api<Pod>,
    name: String,
    pod_ip: String,
    host_ip: String,
    start_time: Time,
    state: Mutex<State>,
}

struct State {
    phase: &'static str,
    reason: Option<String>,
    message: Option<String>,
    conditions: Vec<PodCondition>,
    init: Vec<ContainerStatus>,
    containers: Vec<ContainerStatus>,
}

impl Shared {
    async fn update(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.state.lock().await;
        f(&mut st);
        let initialized = st.init.iter().all(|c| {
            c.state
                .as_ref()
                .is_some_and(|s| s.terminated.as_ref().is_some_and(|t| t.exit_code == 0))
        });
        let all_ready = !st.containers.is_empty() && st.containers.iter().all(|c| c.ready);
        let started = st.phase != "Pending"
            || st
                .containers
                .iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
        let completed = matches!(st.phase, "Succeeded" | "Failed");
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
            warn!(pod = %self.name, phase = st.phase, "writing pod status: {e}");
        }
    }
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
    let spec = pod.spec.clone().unwrap_or_default();
    let image = |c: &Container| c.image.clone().unwrap_or_default();

    let shared = Arc::new(Shared {
        api: api.clone(),
        name: name.clone(),
        pod_ip: pod_ip.clone(),
        host_ip: ctx.host_ip.clone(),
        start_time: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(now),
        state: Mutex::new(State {
            phase: "Pending",
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
                .map(|c| status::waiting(&c.name, &image(c), "PodInitializing", None))
                .collect(),
            containers: spec
                .containers
                .iter()
                .map(|c| status::waiting(&c.name, &image(c), "PodInitializing", None))
                .collect(),
        }),
    });

    if status::is_terminal(&pod) {
        // Already ended (e.g. before a stand-in restart): only the final delete is left.
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    if pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
        })
    {
        shared
            .update(|st| {
                st.phase = "Failed";
                st.reason = Some("NodeRestarted".into());
                st.message =
                    Some("the node stand-in restarted; the pod's processes ended with it".into());
            })
            .await;
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    if let Some(why) = unsupported(&pod) {
        warn!(pod = %name, "cannot run: {why}");
        shared
            .update(|st| {
                st.phase = "Failed";
                st.reason = Some("UnsupportedByNodeStandIn".into());
                st.message = Some(why);
            })
            .await;
        finish_deletion(&api, &name, &uid, &mut updates).await;
        return;
    }
    shared.update(|_| {}).await;

    let pod_dir = ctx.root.join("pods").join(format!("{ns}_{name}_{uid}"));
    let sources = Sources {
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        config_maps: Api::namespaced(ctx.client.clone(), &ns),
    };
    // The pod as its containers see it: IPs known before anything starts.
    let mut pod_now = pod.clone();
    let st = pod_now.status.get_or_insert_with(Default::default);
    st.pod_ip = Some(pod_ip.clone());
    st.host_ip = Some(ctx.host_ip.clone());

    let restart_policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let grace =
        Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
    // One watcher turns "deleted / gone / shutting down" into a stop order every container
    // supervisor sees, carrying how long the processes get before SIGKILL.
    let (stop_tx, stop_rx) = watch::channel(None::<Duration>);
    let watcher = {
        let mut updates = updates.clone();
        tokio::spawn(async move {
            let stop = next_stop(&mut updates).await;
            let _ = stop_tx.send(Some(stop.kill_within(grace)));
        })
    };
    let stopped = |rx: &watch::Receiver<Option<Duration>>| rx.borrow().is_some();
    let wait_or_stop = |delay: Duration| {
        let mut rx = stop_rx.clone();
        async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = rx.wait_for(|s| s.is_some()) => true,
            }
        }
    };

    // Volumes and environments: missing Secrets and the like keep the pod waiting and retrying,
    // as on a real node, until it is deleted.
    let prepared = loop {
        match prepare(&ctx, &pod_now, &pod_dir, &sources).await {
            Ok(p) => break Some(p),
            Err(PodError::Unsupported(why)) => {
                shared
                    .update(|st| {
                        st.phase = "Failed";
                        st.reason = Some("UnsupportedByNodeStandIn".into());
                        st.message = Some(why);
                    })
                    .await;
                break None;
            }
            Err(e) => {
                let msg = e.to_string();
                shared
                    .update(|st| {
                        for c in st.init.iter_mut().chain(st.containers.iter_mut()) {
                            *c = status::waiting(
                                &c.name,
                                &c.image,
                                "CreateContainerConfigError",
                                Some(msg.clone()),
                            );
                        }
                    })
                    .await;
                if wait_or_stop(Duration::from_secs(2)).await {
                    break None;
                }
            }
        }
    };

    if let Some(prepared) = prepared {
        run_containers(
            &ctx,
            &shared,
            &spec,
            &prepared,
            &restart_policy,
            grace,
            &pod_ip,
            &stop_rx,
            stopped,
        )
        .await;
    }
    finish_deletion(&api, &name, &uid, &mut updates).await;
    watcher.abort();
}

/// Init containers in order, then all containers; returns when the pod has ended or was told
/// to stop.
#[allow(clippy::too_many_arguments)]
async fn run_containers(
    ctx: &Arc<NodeContext>,
    shared: &Arc<Shared>,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    prepared: &Prepared,
    restart_policy: &str,
    grace: Duration,
    pod_ip: &str,
    stop_rx: &watch::Receiver<Option<Duration>>,
    stopped: impl Fn(&watch::Receiver<Option<Duration>>) -> bool,
) {
    // Init containers, one after another; each must exit 0. They restart on failure unless
    // the pod's policy is Never (then the pod fails).
    let init_policy = if restart_policy == "Never" {
        "Never"
    } else {
        "OnFailure"
    };
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let sup = Supervisor {
            shared: shared.clone(),
            ctx: ctx.clone(),
            container: c.clone(),
            spec: prepared.init[i].process.clone(),
            termination: prepared.init[i].termination.clone(),
            init: true,
            index: i,
            pod_ip: pod_ip.to_owned(),
            grace,
        };
        let exit_code = sup.run_with_restarts(init_policy, stop_rx.clone()).await;
        if stopped(stop_rx) {
            return;
        }
        if exit_code != 0 {
            shared.update(|st| st.phase = "Failed").await;
            return;
        }
    }

    shared
        .update(|st| {
            st.phase = "Running";
            for cs in st.containers.iter_mut() {
                *cs = status::waiting(&cs.name, &cs.image, "ContainerCreating", None);
            }
        })
        .await;
    let mut tasks = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let sup = Supervisor {
            shared: shared.clone(),
            ctx: ctx.clone(),
            container: c.clone(),
            spec: prepared.containers[i].process.clone(),
            termination: prepared.containers[i].termination.clone(),
            init: false,
            index: i,
            pod_ip: pod_ip.to_owned(),
            grace,
        };
        let policy = restart_policy.to_owned();
        let stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            sup.run_with_restarts(&policy, stop).await
        }));
    }
    let results = futures::future::join_all(tasks).await;
    if stopped(stop_rx) {
        return;
    }
    let failed = results
        .iter()
        .any(|r| r.as_ref().map_or(true, |code| *code != 0));
    info!(pod = %shared.name, failed, "all containers ended");
    shared
        .update(|st| st.phase = if failed { "Failed" } else { "Succeeded" })
        .await;
}

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

/// Waits for the pod's deletion and removes the object (grace 0), as the kubelet does once its
/// containers are gone.
async fn finish_deletion(
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

fn backoff(base: Duration, restarts: i32) -> Duration {
    let factor = 1u32 << (restarts.clamp(1, 16) - 1) as u32;
    (base * factor).min(Duration::from_secs(300))
}

/// What the pod asks for that this stand-in cannot honour, if anything.
fn unsupported(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        return Some("readinessGates are not supported".into());
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Some("ephemeral containers are not supported".into());
    }
    for c in spec.init_containers.iter().flatten() {
        if c.restart_policy.is_some() {
            return Some(format!(
                "init container {}: sidecar containers (restartPolicy on an init container) are not supported",
                c.name
            ));
        }
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        if c.command.as_ref().is_none_or(|cmd| cmd.is_empty()) {
            return Some(format!(
                "container {}: no command; the node stand-in runs commands on the host and cannot run an image's entrypoint",
                c.name
            ));
        }
        for p in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            if let Some(why) = probe::unsupported(p) {
                return Some(format!("container {}: {why}", c.name));
            }
        }
        if let Some(l) = &c.lifecycle
            && (l.post_start.is_some() || l.pre_stop.is_some())
        {
            return Some(format!(
                "container {}: lifecycle hooks are not supported",
                c.name
            ));
        }
        for m in c.volume_mounts.iter().flatten() {
            if m.sub_path_expr.is_some() {
                return Some(format!(
                    "container {}: subPathExpr is not supported",
                    c.name
                ));
            }
        }
    }
    None
}

struct Prepared {
    init: Vec<Planned>,
    containers: Vec<Planned>,
}

/// One container ready to start: its process and its termination-message file.
struct Planned {
    process: ProcessSpec,
    termination: TerminationLog,
}

async fn prepare(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &std::path::Path,
    sources: &Sources,
) -> Result<Prepared, PodError> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| PodError::Unsupported("pod has no spec".into()))?;
    let vols = volumes::materialize(&ctx.client, pod, pod_dir).await?;
    let logs = pod_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| PodError::Io(format!("{}: {e}", logs.display())))?;
    let mut base = ctx.base_env.clone();
    base.push((
        "HOSTNAME".into(),
        pod.metadata.name.clone().unwrap_or_default(),
    ));
    let mut init = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        init.push(container_spec(ctx, pod, c, &vols, &logs, &base, sources).await?);
    }
    let mut containers = Vec::new();
    for c in &spec.containers {
        containers.push(container_spec(ctx, pod, c, &vols, &logs, &base, sources).await?);
    }
    Ok(Prepared { init, containers })
}

async fn container_spec(
    ctx: &NodeContext,
    pod: &Pod,
    c: &Container,
    vols: &VolumePaths,
    logs: &std::path::Path,
    base: &[(String, String)],
    sources: &Sources,
) -> Result<Planned, PodError> {
    let env = container_env(pod, c, base, sources).await?;
    let lookup = env.iter().cloned().collect();
    let mut argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| expand(a, &lookup))
        .collect();
    if argv.is_empty() {
        return Err(PodError::Unsupported(format!(
            "container {}: no command",
            c.name
        )));
    }
    let name = argv.remove(0);
    let program = process::resolve_program(&name, &ctx.search_path).ok_or_else(|| {
        PodError::Config(format!(
            "container {}: executable {name:?} not found on the node's search path",
            c.name
        ))
    })?;
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let host = vols.get(&m.name).ok_or_else(|| {
            PodError::Config(format!(
                "container {}: volume {} is not defined",
                c.name, m.name
            ))
        })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if sub.split('/').any(|p| p == "..") || sub.starts_with('/') => {
                return Err(PodError::Config(format!(
                    "container {}: subPath {sub} escapes the volume",
                    c.name
                )));
            }
            Some(sub) => host.join(sub),
            None => host.clone(),
        };
        mounts.push(Mount {
            host,
            target: PathBuf::from(&m.mount_path),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    // After the volumes, as the kubelet adds it, so a path inside a volume is honoured.
    let termination = TerminationLog::of(c, logs).map_err(PodError::Unsupported)?;
    mounts.push(termination.mount());
    let sc = c.security_context.as_ref();
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .map(|u| u as u32);
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .map(|g| g as u32);
    let process = ProcessSpec {
        program,
        args: argv,
        env,
        working_dir: c.working_dir.as_ref().map(PathBuf::from),
        mounts,
        uid,
        gid,
        log: Some(logs.join(format!("{}.log", c.name))),
    };
    Ok(Planned {
        process,
        termination,
    })
}

/// Runs one container: the process, its probes, its restarts.
struct Supervisor {
    shared: Arc<Shared>,
    ctx: Arc<NodeContext>,
    container: Container,
    spec: ProcessSpec,
    /// Emptied before every run, read when the process ends.
    termination: TerminationLog,
    init: bool,
    index: usize,
    pod_ip: String,
    grace: Duration,
}

struct Outcome {
    exit_code: i32,
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
    async fn set(&self, f: impl FnOnce(&mut ContainerStatus)) {
        let (init, i) = (self.init, self.index);
        self.shared
            .update(|st| {
                f(if init {
                    &mut st.init[i]
                } else {
                    &mut st.containers[i]
                })
            })
            .await;
    }

    async fn run_with_restarts(self, policy: &str, stop: watch::Receiver<Option<Duration>>) -> i32 {
        let mut restarts = 0;
        loop {
            let outcome = self.run_once(restarts, stop.clone()).await;
            if stop.borrow().is_some() {
                return outcome.exit_code;
            }
            let again = match policy {
                "Always" => true,
                "OnFailure" => outcome.exit_code != 0,
                _ => false,
            };
            if !again {
                return outcome.exit_code;
            }
            restarts += 1;
            let delay = backoff(self.ctx.restart_backoff, restarts);
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
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| s.is_some()) => return outcome.exit_code,
            }
        }
    }

    async fn run_once(
        &self,
        restarts: i32,
        mut stop: watch::Receiver<Option<Duration>>,
    ) -> Outcome {
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
                return Outcome { exit_code: 128 };
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
            cs.ready = !self.init && !has_startup && !has_readiness;
        })
        .await;

        let probes = self.probe_loop();
        tokio::pin!(probes);
        let (exit, reason) = tokio::select! {
            r = child.wait() => (r, None),
            why = &mut probes => {
                // Liveness or startup failure: stop it with the grace period, then report.
                (self.terminate(&mut child, pid, self.grace).await, Some(why))
            }
            within = async { stop.wait_for(|s| s.is_some()).await.map(|w| *w) } => {
                let within = within.ok().flatten().unwrap_or(Duration::ZERO);
                (self.terminate(&mut child, pid, within).await, None)
            }
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
        Outcome { exit_code: code }
    }

    /// SIGTERM to the process group, SIGKILL after `within`.
    async fn terminate(
        &self,
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

    /// Runs startup, then readiness and liveness probes; returns only when the container must be
    /// killed (startup or liveness failed failureThreshold times).
    async fn probe_loop(&self) -> String {
        let c = &self.container;
        let exec_base = ProcessSpec {
            log: None,
            ..self.spec.clone()
        };
        if let Some(p) = &c.startup_probe {
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let mut failures = 0;
            loop {
                match probe::attempt(p, c, &self.pod_ip, &exec_base).await {
                    Ok(()) => break,
                    Err(e) => {
                        failures += 1;
                        if failures >= t.failure_threshold {
                            return format!("startup probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(t.period).await;
            }
            let ready_now = c.readiness_probe.is_none() && !self.init;
            self.set(|cs| {
                cs.started = Some(true);
                cs.ready = ready_now;
            })
            .await;
        }
        let readiness = async {
            let Some(p) = &c.readiness_probe else {
                return std::future::pending::<()>().await;
            };
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let (mut ok, mut bad, mut ready) = (0, 0, false);
            loop {
                match probe::attempt(p, c, &self.pod_ip, &exec_base).await {
                    Ok(()) => {
                        ok += 1;
                        bad = 0;
                    }
                    Err(_) => {
                        bad += 1;
                        ok = 0;
                    }
                }
                let now_ready = if ready {
                    bad < t.failure_threshold
                } else {
                    ok >= t.success_threshold
                };
                if now_ready != ready {
                    ready = now_ready;
                    self.set(|cs| cs.ready = now_ready).await;
                }
                tokio::time::sleep(t.period).await;
            }
        };
        let liveness = async {
            let Some(p) = &c.liveness_probe else {
                return std::future::pending::<String>().await;
            };
            let t = Timing::of(p);
            tokio::time::sleep(t.initial_delay).await;
            let mut bad = 0;
            loop {
                match probe::attempt(p, c, &self.pod_ip, &exec_base).await {
                    Ok(()) => bad = 0,
                    Err(e) => {
                        bad += 1;
                        if bad >= t.failure_threshold {
                            return format!("liveness probe failed: {e}");
                        }
                    }
                }
                tokio::time::sleep(t.period).await;
            }
        };
        // The readiness loop never ends; only a liveness failure returns.
        tokio::select! {
            _ = readiness => String::new(),
            why = liveness => why,
        }
    }
}
