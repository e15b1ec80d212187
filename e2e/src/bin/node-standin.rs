//! node-standin: registers Node objects on a Kubernetes control plane and runs the containers of
//! the pods bound to them as local processes (no kubelet, no container runtime). See e2e/README.md.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use sendense_e2e::node::{self, Config};

#[derive(Parser, Debug)]
#[command(about = "Runs pods bound to stand-in nodes as local processes")]
struct Args {
    /// Node names to register (repeat or comma-separate).
    #[arg(long = "node", value_delimiter = ',', default_value = "standin-0")]
    nodes: Vec<String>,
    /// Extra node labels, key=value (repeat or comma-separate).
    #[arg(long = "label", value_delimiter = ',')]
    labels: Vec<String>,
    /// Kubeconfig of the control plane.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory for pod volumes and container logs.
    #[arg(long, default_value = "/var/tmp/sendense-node-standin")]
    root: PathBuf,
    /// Extra directories searched for container commands, before the host's PATH.
    #[arg(long = "path", value_delimiter = ':')]
    path: Vec<PathBuf>,
    #[arg(long, default_value = "4")]
    cpu: String,
    #[arg(long, default_value = "16Gi")]
    memory: String,
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// First restart back-off in milliseconds (doubles up to 5 minutes).
    #[arg(long, default_value_t = 10_000)]
    restart_backoff_ms: u64,
    /// Keep the Node objects when exiting.
    #[arg(long)]
    keep_nodes: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let host = config.cluster_url.host().unwrap_or("127.0.0.1").to_owned();
    let port = config.cluster_url.port_u16().unwrap_or(443);
    let client = kube::Client::try_from(config)?;

    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--label {l}: expected key=value"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let mut search_path = args.path.clone();
    if let Some(p) = std::env::var_os("PATH") {
        search_path.extend(std::env::split_paths(&p));
    }
    let config = Config {
        nodes: args.nodes,
        labels,
        root: args.root,
        search_path,
        cpu: args.cpu,
        memory: args.memory,
        max_pods: args.max_pods,
        restart_backoff: Duration::from_millis(args.restart_backoff_ms),
        apiserver_host: host,
        apiserver_port: port,
        delete_nodes_on_exit: !args.keep_nodes,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    node::run(client, config, shutdown).await
}
