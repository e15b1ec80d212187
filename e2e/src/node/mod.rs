//! The node stand-in: registers Node objects on the control plane, keeps their Leases and
//! Ready condition fresh, and runs the containers of pods bound to them as local processes,
//! writing real pod status back. It knows nothing about Sendense.

pub mod env;
pub mod pod;
pub mod probe;
pub mod process;
pub mod status;
pub mod termination;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use pod::{NodeContext, PodUpdate};

/// Why a pod cannot (yet) run.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The pod asks for something the stand-in cannot honour: the pod fails with this reason.
    #[error("{0}")]
    Unsupported(String),
    /// A referenced object is missing or incomplete: the pod waits and retries.
    #[error("{0}")]
    Config(String),
    #[error("API: {0}")]
    Api(#[source] kube::Error),
    #[error("{0}")]
    Io(String),
}

/// How the stand-in presents its nodes and runs pods.
#[derive(Clone, Debug)]
pub struct Config {
    pub nodes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub root: PathBuf,
    pub search_path: Vec<PathBuf>,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    pub restart_backoff: Duration,
    /// Address pods reach the API server on (KUBERNETES_SERVICE_HOST/PORT).
    pub apiserver_host: String,
    pub apiserver_port: u16,
    pub delete_nodes_on_exit: bool,
}

const KUBELET_VERSION: &str = "v1.34.4-sendense-node-standin";
const HOST_IP: &str = "127.0.0.1";

/// Pod IPs: distinct loopback addresses (127.10.x.y), all reachable from every pod.
struct PodIps(AtomicU32);

impl PodIps {
    fn next(&self) -> String {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        format!("127.10.{}.{}", (n / 250) % 256, n % 250 + 2)
    }
}

/// Runs until `shutdown` resolves; then kills every container and (optionally) removes the nodes.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut base_env = vec![
        (
            "PATH".to_string(),
            std::env::join_paths(&config.search_path)?
                .to_string_lossy()
                .into_owned(),
        ),
        ("HOME".to_string(), "/root".to_string()),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            config.apiserver_host.clone(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".to_string(),
            config.apiserver_port.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
            config.apiserver_port.to_string(),
        ),
    ];
    base_env.sort();
    let ips = Arc::new(PodIps(AtomicU32::new(0)));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for node in &config.nodes {
        register(&client, node, &config).await?;
        info!(node = %node, "registered");
        let ctx = Arc::new(NodeContext {
            client: client.clone(),
            node_name: node.clone(),
            host_ip: HOST_IP.into(),
            root: config.root.join(node),
            search_path: config.search_path.clone(),
            base_env: base_env.clone(),
            restart_backoff: config.restart_backoff,
        });
        tasks.push(tokio::spawn(heartbeat(
            client.clone(),
            node.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(run_pods(
            ctx,
            ips.clone(),
            shutdown_rx.clone(),
        )));
    }
    shutdown.await;
    info!("shutting down: stopping every container");
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    if config.delete_nodes_on_exit {
        let nodes: Api<Node> = Api::all(client.clone());
        for node in &config.nodes {
            if let Err(e) = nodes.delete(node, &DeleteParams::default()).await {
                warn!(node = %node, "deleting node: {e}");
            }
        }
    }
    Ok(())
}

fn node_object(name: &str, config: &Config) -> anyhow::Result<Node> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        (
            "kubernetes.io/arch".to_string(),
            std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
        ),
    ]);
    labels.extend(config.labels.clone());
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
    }))?)
}

fn node_status(name: &str, config: &Config) -> serde_json::Value {
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity(config.cpu.clone())),
        ("memory".to_string(), Quantity(config.memory.clone())),
        ("pods".to_string(), Quantity(config.max_pods.to_string())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    let now = status::now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    serde_json::json!({
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                cond("Ready", "True", "KubeletReady", "node stand-in is posting ready status"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "node stand-in has sufficient memory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "node stand-in has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "node stand-in has sufficient PID available"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": name, "systemUUID": name, "bootID": std::process::id().to_string(),
                "kernelVersion": "", "osImage": "sendense node stand-in", "containerRuntimeVersion": "standin://1",
                "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
        }
    })
}

async fn register(client: &Client, name: &str, config: &Config) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = node_object(name, config)?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let labels = serde_json::json!({"metadata": {"labels": node.metadata.labels}});
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&labels))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(&node_status(name, config)),
        )
        .await?;
    Ok(())
}

/// Renews the node's Lease every 10 s and its Ready condition every 30 s, as a kubelet does, so
/// the node lifecycle controller keeps it Ready and untainted.
async fn heartbeat(client: Client, node: String, mut shutdown: watch::Receiver<bool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut tick = 0u32;
    loop {
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(node.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(MicroTime(status::now().0)),
                ..Default::default()
            }),
        };
        if let Err(e) = leases
            .patch(
                &node,
                &PatchParams::apply("node-standin").force(),
                &Patch::Apply(&serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": node, "namespace": "kube-node-lease"},
                    "spec": lease.spec,
                })),
            )
            .await
        {
            warn!(node = %node, "renewing lease: {e}");
        }
        if tick.is_multiple_of(3) {
            let now = status::now();
            let patch = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                "reason": "KubeletReady", "message": "node stand-in is posting ready status", "lastHeartbeatTime": now}]}});
            if let Err(e) = nodes
                .patch_status(&node, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                warn!(node = %node, "posting node status: {e}");
            }
        }
        tick = tick.wrapping_add(1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Watches the pods bound to this node and runs one worker per pod.
async fn run_pods(ctx: Arc<NodeContext>, ips: Arc<PodIps>, mut shutdown: watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut events = watcher(pods, cfg).boxed();
    let mut workers: HashMap<String, (watch::Sender<PodUpdate>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    // Pods whose worker has ended; kept until the object is gone so late events for them
    // (the final updates before a delete) never start a second worker.
    let mut finished: std::collections::HashSet<String> = Default::default();
    let mut seen_in_relist: Option<Vec<String>> = None;
    loop {
        let event = tokio::select! {
            e = events.try_next() => e,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        workers.retain(|uid, (_, task)| {
            let running = !task.is_finished();
            if !running {
                finished.insert(uid.clone());
            }
            running
        });
        let event = match event {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                // The watcher re-lists by itself; back off a little so a dead API is not hammered.
                warn!(node = %ctx.node_name, "pod watch: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match event {
            watcher::Event::Init => seen_in_relist = Some(Vec::new()),
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if let Some(seen) = seen_in_relist.as_mut() {
                    seen.push(uid.clone());
                }
                match workers.get(&uid) {
                    Some((tx, _)) => {
                        let _ = tx.send(PodUpdate::Object(Box::new(p)));
                    }
                    None if finished.contains(&uid) => {}
                    None => {
                        let ip = p
                            .status
                            .as_ref()
                            .and_then(|s| s.pod_ip.clone())
                            .unwrap_or_else(|| ips.next());
                        let (tx, rx) = watch::channel(PodUpdate::Object(Box::new(p.clone())));
                        let task = tokio::spawn(pod::run(ctx.clone(), p, ip, rx));
                        workers.insert(uid, (tx, task));
                    }
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = seen_in_relist.take() {
                    finished.retain(|uid| seen.contains(uid));
                    for (uid, (tx, _)) in &workers {
                        if !seen.contains(uid) {
                            let _ = tx.send(PodUpdate::Gone);
                        }
                    }
                }
            }
            watcher::Event::Delete(p) => {
                finished.remove(p.metadata.uid.as_deref().unwrap_or_default());
                if let Some((tx, _)) = workers.get(p.metadata.uid.as_deref().unwrap_or_default()) {
                    let _ = tx.send(PodUpdate::Gone);
                }
            }
        }
    }
    for (tx, _) in workers.values() {
        let _ = tx.send(PodUpdate::Shutdown);
    }
    for (_, (_, task)) in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}
