//! sendense-operator: reconciles Sendense's resources. Runs in-cluster or from a kubeconfig
//! ($KUBECONFIG); all namespaces, or only $SENDENSE_WATCH_NAMESPACE. So far it runs the
//! SourceNode (vCenter probes), Repository (volume probes) and BackupJob (backups) controllers.
//! Environment: SENDENSE_AGENT_IMAGE (image of hub, agent and probe pods),
//! SENDENSE_PROBE_INTERVAL_SECONDS, SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS,
//! SENDENSE_METRICS_ADDR, SENDENSE_HUB_SERVICE_ACCOUNT and SENDENSE_AGENT_SERVICE_ACCOUNT (the
//! ServiceAccounts of hub-side and agent pods, created by the operator where needed; default
//! sendense-hub and sendense-agent; empty: the namespace's default account).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use sendense_crds::{BackupJob, Repository, SourceNode};
use sendense_operator::hub::PodSettings;
use sendense_operator::metrics::Metrics;
use sendense_operator::source_node::{self, Context, MANAGER};
use sendense_operator::{backup_job, repository};

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
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("HOSTNAME").ok(),
        },
    );
    // Unset: Sendense's own accounts; set to "": the namespace's default account.
    let account = |var: &str, default: &str| match std::env::var(var) {
        Ok(s) if s.is_empty() => None,
        Ok(s) => Some(s),
        Err(_) => Some(default.to_owned()),
    };
    let images = PodSettings {
        agent: std::env::var("SENDENSE_AGENT_IMAGE").unwrap_or_else(|_| {
            format!(
                "ghcr.io/sendense/sendense-agent:{}",
                env!("CARGO_PKG_VERSION")
            )
        }),
        hub_service_account: account("SENDENSE_HUB_SERVICE_ACCOUNT", "sendense-hub"),
        agent_service_account: account("SENDENSE_AGENT_SERVICE_ACCOUNT", "sendense-agent"),
    };
    let sn_ctx = Arc::new(Context {
        client: client.clone(),
        recorder: recorder.clone(),
        probe_timeout: Duration::from_secs(15),
        probe_interval,
        metrics: metrics.clone(),
    });
    let repo_ctx = Arc::new(repository::Context {
        client: client.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        images: images.clone(),
        probe_interval: seconds("SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS", 300),
    });
    let job_ctx = Arc::new(backup_job::Context {
        client: client.clone(),
        recorder,
        metrics: metrics.clone(),
        images,
        vcenter_timeout: Duration::from_secs(30),
        allocation: tokio::sync::Mutex::new(()),
    });
    tracing::info!("sendense-operator started");
    // SENDENSE_WATCH_NAMESPACE limits the operator to one namespace (a namespaced install).
    let namespace = std::env::var("SENDENSE_WATCH_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sendense-operator");

    let sources = Controller::new(
        scoped::<SourceNode>(&client, &namespace),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(source_node::reconcile, source_node::error_policy, sn_ctx)
    .for_each(|_| async {});

    let repos = Controller::new(
        scoped::<Repository>(&client, &namespace),
        watcher::Config::default(),
    );
    let repo_store = repos.store();
    let repos = repos
        .owns(scoped::<Pod>(&client, &namespace), owned.clone())
        .watches(
            scoped::<BackupJob>(&client, &namespace),
            watcher::Config::default(),
            |job| {
                let ns = job.metadata.namespace.clone().unwrap_or_default();
                Some(ObjectRef::<Repository>::new(&job.spec.repository_ref.name).within(&ns))
            },
        )
        .shutdown_on_signal()
        .run(repository::reconcile, repository::error_policy, repo_ctx)
        .for_each(|_| async {});

    let jobs = Controller::new(
        scoped::<BackupJob>(&client, &namespace),
        watcher::Config::default(),
    );
    let job_store = jobs.store();
    let by_source = job_store.clone();
    let by_repo = job_store.clone();
    let jobs = jobs
        .owns(scoped::<Pod>(&client, &namespace), owned.clone())
        .owns(scoped::<Service>(&client, &namespace), owned)
        .watches(
            scoped::<SourceNode>(&client, &namespace),
            watcher::Config::default(),
            move |sn| {
                backup_job::jobs_referring(
                    &by_source.state(),
                    sn.metadata.namespace.as_deref(),
                    sn.metadata.name.as_deref(),
                    None,
                )
            },
        )
        .watches(
            scoped::<Repository>(&client, &namespace),
            watcher::Config::default(),
            move |repo| {
                backup_job::jobs_referring(
                    &by_repo.state(),
                    repo.metadata.namespace.as_deref(),
                    None,
                    repo.metadata.name.as_deref(),
                )
            },
        )
        .shutdown_on_signal()
        .run(backup_job::reconcile, backup_job::error_policy, job_ctx)
        .for_each(|_| async {});

    let gauges = tokio::spawn(refresh_gauges(metrics, job_store, repo_store));
    ready.store(true, Ordering::Relaxed);
    tokio::join!(sources, repos, jobs);
    gauges.abort();
    tracing::info!("sendense-operator stopped");
    Ok(())
}

fn seconds(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Jobs by phase and ports in use, from the controllers' caches, every 10 s.
async fn refresh_gauges(
    metrics: Metrics,
    jobs: kube::runtime::reflector::Store<BackupJob>,
    repos: kube::runtime::reflector::Store<Repository>,
) {
    use sendense_crds::backup_job::Phase;
    use std::collections::BTreeMap;
    loop {
        let mut by_phase: BTreeMap<(String, &str), i64> = BTreeMap::new();
        let mut ports: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut last_success: BTreeMap<(String, String), i64> = BTreeMap::new();
        for j in jobs.state() {
            let ns = j.metadata.namespace.clone().unwrap_or_default();
            let phase = match j.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Running) => "Running",
                Some(Phase::Succeeded) => "Succeeded",
                Some(Phase::Failed) => "Failed",
                Some(Phase::Pending) | None => "Pending",
            };
            *by_phase.entry((ns.clone(), phase)).or_default() += 1;
            if let Some(vm) = j.status.as_ref().and_then(|s| s.vm_name.as_deref()) {
                metrics.known_vm(&ns, vm);
            }
            // Derived from the jobs, so it survives operator restarts and a VM whose jobs are
            // all deleted stops being watched for missed backups.
            if phase == "Succeeded"
                && let Some(st) = j.status.as_ref()
                && let (Some(vm), Some(done)) = (&st.vm_name, &st.completion_time)
            {
                let t = last_success.entry((ns.clone(), vm.clone())).or_default();
                *t = (*t).max(done.0.as_second());
            }
            if phase == "Running" {
                let held = j
                    .status
                    .as_ref()
                    .map(|s| s.disks.iter().filter(|d| d.port.is_some()).count())
                    .unwrap_or_default();
                *ports
                    .entry((ns, j.spec.repository_ref.name.clone()))
                    .or_default() += held as i64;
            }
        }
        metrics.last_success.reset();
        for ((ns, vm), t) in last_success {
            metrics.last_success.with_label_values(&[&ns, &vm]).set(t);
        }
        metrics.jobs.reset();
        for ((ns, phase), n) in by_phase {
            metrics.jobs.with_label_values(&[&ns, phase]).set(n);
        }
        metrics.ports_in_use.reset();
        metrics.ports_range.reset();
        for r in repos.state() {
            let ns = r.metadata.namespace.clone().unwrap_or_default();
            let name = r.metadata.name.clone().unwrap_or_default();
            let range = &r.spec.hub.port_range;
            metrics
                .ports_range
                .with_label_values(&[&ns, &name])
                .set((range.high - range.low + 1) as i64);
            let used = ports.get(&(ns.clone(), name.clone())).copied().unwrap_or(0);
            metrics
                .ports_in_use
                .with_label_values(&[&ns, &name])
                .set(used);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
