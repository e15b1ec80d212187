//! Getting a pod ready to start: its volumes on the host, and for each container the process to
//! run (command resolved, environment built, volumes bind-mounted, user and group) and its
//! termination-message file. A missing Secret or the like keeps the pod waiting and retrying,
//! as on a real node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::Api;

use super::NodeContext;
use super::admission::UNSUPPORTED;
use super::lifecycle::StopOrder;
use super::state::PodState;
use crate::node::PodError;
use crate::node::env::{Sources, container_env, expand};
use crate::node::process::{self, Mount, ProcessSpec};
use crate::node::status;
use crate::node::termination::TerminationLog;
use crate::node::volumes::{self, VolumePaths};

/// Every container of the pod, ready to start, in the order of the spec.
pub(super) struct Prepared {
    pub(super) init: Vec<Planned>,
    pub(super) containers: Vec<Planned>,
}

/// One container ready to start: its process and its termination-message file.
pub(super) struct Planned {
    pub(super) process: ProcessSpec,
    pub(super) termination: TerminationLog,
}

/// Prepares the pod, retrying every 2 s while something it refers to is missing (each
/// container waits in CreateContainerConfigError meanwhile). None if the pod cannot run (it is
/// then Failed) or was told to stop first.
pub(super) async fn until_ready(
    ctx: &NodeContext,
    state: &PodState,
    pod: &Pod,
    stop: &StopOrder,
) -> Option<Prepared> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pod_dir = ctx.root.join("pods").join(format!(
        "{ns}_{}_{}",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    ));
    let sources = Sources {
        secrets: Api::namespaced(ctx.client.clone(), ns),
        config_maps: Api::namespaced(ctx.client.clone(), ns),
    };
    // The pod as its containers see it: IPs known before anything starts.
    let mut pod = pod.clone();
    let st = pod.status.get_or_insert_with(Default::default);
    st.pod_ip = Some(state.pod_ip.clone());
    st.host_ip = Some(ctx.host_ip.clone());
    loop {
        match prepare(ctx, &pod, &pod_dir, &sources).await {
            Ok(p) => return Some(p),
            Err(PodError::Unsupported(why)) => {
                state.fail(UNSUPPORTED, why).await;
                return None;
            }
            Err(e) => {
                let msg = e.to_string();
                state
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
                if stop.sleep(Duration::from_secs(2)).await {
                    return None;
                }
            }
        }
    }
}

async fn prepare(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
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
    logs: &Path,
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
    let mut mounts = volume_mounts(c, vols)?;
    // After the volumes, as the kubelet adds it, so a path inside a volume is honoured.
    let termination = TerminationLog::of(c, logs).map_err(PodError::Unsupported)?;
    mounts.push(termination.mount());
    let sc = c.security_context.as_ref();
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    // The container's own securityContext wins over the pod's.
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

/// The container's volumeMounts as bind mounts of the pod's volumes on the host.
fn volume_mounts(c: &Container, vols: &VolumePaths) -> Result<Vec<Mount>, PodError> {
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
    Ok(mounts)
}
