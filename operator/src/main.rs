//! sendense-operator: reconciles Sendense's resources. Runs in-cluster or from a kubeconfig
//! ($KUBECONFIG); all namespaces, or only $SENDENSE_WATCH_NAMESPACE. So far it runs the
//! SourceNode controller (vCenter probes); BackupJob and Repository controllers follow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use sendense_crds::SourceNode;
use sendense_operator::metrics::Metrics;
use sendense_operator::source_node::{self, Context, MANAGER};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let client = Client::try_default().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "sourcenodes.sendense.io",
        "repositories.sendense.io",
        "backupjobs.sendense.io",
    ] {
        if crds.get_opt(name).await?.is_none() {
            eprintln!(
                "sendense-operator: the CRD {name} is not installed; install the CRDs first: \
                 kubectl apply --server-side -k config/crd (or install the Helm chart)"
            );
            std::process::exit(1);
        }
    }
    let probe_interval = std::env::var("SENDENSE_PROBE_INTERVAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let addr = std::env::var("SENDENSE_METRICS_ADDR").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics and health endpoints to {addr}: {e}"))?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(sendense_operator::metrics::serve(
        listener,
        metrics.clone(),
        ready.clone(),
    ));
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("HOSTNAME").ok(),
            },
        ),
        probe_timeout: Duration::from_secs(15),
        probe_interval,
        metrics,
    });
    tracing::info!("sendense-operator started");
    // SENDENSE_WATCH_NAMESPACE limits the operator to one namespace (a namespaced install).
    let nodes: Api<SourceNode> = match std::env::var("SENDENSE_WATCH_NAMESPACE") {
        Ok(ns) if !ns.is_empty() => Api::namespaced(client, &ns),
        _ => Api::all(client),
    };
    ready.store(true, Ordering::Relaxed);
    Controller::new(nodes, watcher::Config::default())
        .shutdown_on_signal()
        .run(source_node::reconcile, source_node::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
    tracing::info!("sendense-operator stopped");
    Ok(())
}
