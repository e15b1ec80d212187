//! Runs the operator: checks the CRDs are installed, serves the metrics and health endpoints,
//! and runs the four controllers (each watching what it reacts to) and the gauges refresher
//! until a signal stops them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::NamespaceResourceScope;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, BackupSchedule, Repository, RestoreJob, SourceNode};

use crate::children::MANAGER;
use crate::metrics::Metrics;
use crate::resources::MANAGED_BY;
use crate::settings::Settings;
use crate::{backup_job, repository, restore_job, source_node};

/// Deadline of each vCenter call during a SourceNode probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of each vCenter call a BackupJob makes (VM lookup, snapshot confirmation).
const VCENTER_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time between two reconciles of a Repository that its jobs ending trigger.
const JOBS_TO_REPOSITORY: Duration = Duration::from_secs(10);

/// A CRD the operator needs is missing: it says how to install it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the CRD {0} is not installed; install the CRDs first: kubectl apply --server-side -k config/crd (or install the Helm chart)"
)]
pub struct CrdMissing(pub &'static str);

async fn check_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "sourcenodes.sendense.io",
        "repositories.sendense.io",
        "backupjobs.sendense.io",
        "restorepoints.sendense.io",
        "restorejobs.sendense.io",
        "backupschedules.sendense.io",
    ] {
        if crds.get_opt(name).await?.is_none() {
            return Err(CrdMissing(name).into());
        }
    }
    Ok(())
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs until a signal stops the controllers.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    check_crds(&client).await?;
    let metrics = Metrics::new()?;
    let ready = Arc::new(AtomicBool::new(false));
    let addr = settings.metrics_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics and health endpoints to {addr}: {e}"))?;
    // The bound address, so a port of 0 (chosen by the kernel) is known to whoever reads the log.
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        ready.clone(),
    ));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: settings.instance.clone(),
        },
    );
    let images = settings.pod_settings();
    let sn_ctx = Arc::new(source_node::Context {
        client: client.clone(),
        recorder: recorder.clone(),
        probe_timeout: PROBE_TIMEOUT,
        probe_interval: settings.probe_interval(),
        metrics: metrics.clone(),
        policy: settings.source_policy(),
    });
    let repo_ctx = Arc::new(repository::Context {
        client: client.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        images: images.clone(),
        probe_interval: settings.repository_probe_interval(),
        orphan_min_idle: Duration::from_secs(settings.orphan_min_idle_seconds),
        watch_namespace: settings.namespace().map(str::to_owned),
    });
    let restore_ctx = Arc::new(restore_job::Context {
        client: client.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        images: images.clone(),
        vcenter_timeout: VCENTER_TIMEOUT,
        lease_namespace: settings.lease_namespace(),
    });
    let schedule_ctx = Arc::new(crate::schedule::controller::Context {
        client: client.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        vcenter_timeout: VCENTER_TIMEOUT,
        clock: crate::schedule::clock::Clock::from_env(),
    });
    tracing::info!("sendense-operator started");
    let namespace = settings.namespace();
    let all = watcher::Config::default;
    let owned = all().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));

    // The BackupJob controller's watches, cached for its reconciles (caches.rs): its pods
    // (which also trigger it), the SourceNodes, the Repositories, and the jobs themselves.
    let (pod_cache, pod_writer) = reflector::store::<Pod>();
    let job_pods = watcher(scoped::<Pod>(&client, namespace), owned.clone())
        .default_backoff()
        .reflect(pod_writer)
        .touched_objects();
    let (sn_cache, sn_writer) = reflector::store::<SourceNode>();
    // A SourceNode or Repository reaches its jobs when its spec or readiness changes, not at
    // each probe's status write (which would re-run every job of a busy SourceNode).
    let source_nodes = watcher(scoped::<SourceNode>(&client, namespace), all())
        .default_backoff()
        .reflect(sn_writer)
        .touched_objects()
        .predicate_filter(spec_or_readiness::<SourceNode>, Default::default());
    let (repo_cache, repo_writer) = reflector::store::<Repository>();
    let repositories = watcher(scoped::<Repository>(&client, namespace), all())
        .default_backoff()
        .reflect(repo_writer)
        .touched_objects()
        .predicate_filter(spec_or_readiness::<Repository>, Default::default());
    let jobs = Controller::new(scoped::<BackupJob>(&client, namespace), all());
    let job_store = jobs.store();
    let (caches, woken) =
        backup_job::Caches::new(pod_cache, sn_cache, repo_cache, job_store.clone());
    // The NBD CA's Secret, watched by name (list and watch on that one name): each attempt's
    // certificates are issued without reading it.
    let (nbd_ca, ca_writer) = reflector::store::<Secret>();
    let ca_watch = watcher(
        Api::<Secret>::namespaced(client.clone(), &settings.lease_namespace()),
        all().fields(&format!("metadata.name={}", settings.nbd_ca_secret)),
    )
    .default_backoff()
    .reflect(ca_writer)
    .for_each(|e| async move {
        if let Err(e) = e {
            tracing::warn!(error = %e, "watching the NBD CA Secret (it is read per attempt meanwhile)");
        }
    });
    let ca_watch = tokio::spawn(ca_watch);
    let job_ctx = Arc::new(backup_job::Context {
        client: client.clone(),
        recorder,
        metrics: metrics.clone(),
        images,
        vcenter_timeout: VCENTER_TIMEOUT,
        lease_namespace: settings.lease_namespace(),
        nbd_ca_secret: settings.nbd_ca_secret.clone(),
        nbd_ca: Some(nbd_ca),
        allocation: tokio::sync::Mutex::new(()),
        caches,
    });

    // A SourceNode is probed when it appears, when its spec changes and every probe interval
    // (its reconcile's requeue), not again at its own status write: each probe logs in to
    // vCenter, and its lastProbeTime made every probe's write trigger a second one.
    let (probed, probed_writer) = reflector::store::<SourceNode>();
    let sn_changes = watcher(scoped::<SourceNode>(&client, namespace), all())
        .default_backoff()
        .reflect(probed_writer)
        .touched_objects()
        .predicate_filter(kube::runtime::predicates::generation, Default::default());
    let sources = Controller::for_stream(sn_changes, probed)
        .shutdown_on_signal()
        .run(source_node::reconcile, source_node::error_policy, sn_ctx)
        .for_each(|_| async {});

    let repos = Controller::new(scoped::<Repository>(&client, namespace), all());
    let repo_store = repos.store();
    // A job reaches its Repository when it ended or is being deleted (restore points, orphaned
    // directories), not at each of its status writes; and at most once per JOBS_TO_REPOSITORY
    // (each reconcile reads the restore points, schedules and claim: with many jobs ending a
    // few seconds apart, one reconcile counts several of them).
    let ended_jobs = watcher(scoped::<BackupJob>(&client, namespace), all())
        .default_backoff()
        .touched_objects()
        .predicate_filter(ended_or_deleted, Default::default())
        .filter_map(|job| async move {
            let job = job.ok()?;
            if ended_or_deleted(&job) == Some(0) {
                return None;
            }
            let ns = job.metadata.namespace.clone().unwrap_or_default();
            Some(ObjectRef::<Repository>::new(&job.spec.repository_ref.name).within(&ns))
        });
    let repos = repos
        .owns(scoped::<Pod>(&client, namespace), owned.clone())
        .reconcile_on(crate::throttle::throttle(ended_jobs, JOBS_TO_REPOSITORY))
        // A schedule's retention (or the VMs it selects) changes its repository's verdict.
        .watches(scoped::<BackupSchedule>(&client, namespace), all(), |s| {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            Some(ObjectRef::<Repository>::new(&s.spec.repository_ref.name).within(&ns))
        })
        .shutdown_on_signal()
        .run(repository::reconcile, repository::error_policy, repo_ctx)
        .for_each(|_| async {});

    let restores = Controller::new(scoped::<RestoreJob>(&client, namespace), all())
        .owns(scoped::<Pod>(&client, namespace), owned.clone())
        .shutdown_on_signal()
        .run(
            restore_job::reconcile,
            restore_job::error_policy,
            restore_ctx,
        )
        .for_each(|_| async {});

    let schedules = Controller::new(scoped::<BackupSchedule>(&client, namespace), all())
        .owns(
            scoped::<BackupJob>(&client, namespace),
            all().labels(crate::schedule::plan::SCHEDULE_LABEL),
        )
        .shutdown_on_signal()
        .run(
            crate::schedule::controller::reconcile,
            crate::schedule::controller::error_policy,
            schedule_ctx,
        )
        .for_each(|_| async {});

    let by_source = job_store.clone();
    let by_repo = job_store.clone();
    let jobs = jobs
        .owns_stream(job_pods)
        .watches_stream(source_nodes, move |sn| {
            backup_job::jobs_referring(
                &by_source.state(),
                sn.metadata.namespace.as_deref(),
                sn.metadata.name.as_deref(),
                None,
            )
        })
        .watches_stream(repositories, move |repo| {
            backup_job::jobs_referring(
                &by_repo.state(),
                repo.metadata.namespace.as_deref(),
                None,
                repo.metadata.name.as_deref(),
            )
        })
        // Queued jobs whose slot freed (backup_job::wake_queue).
        .reconcile_on(woken)
        .shutdown_on_signal()
        .run(backup_job::reconcile, backup_job::error_policy, job_ctx)
        .for_each(|_| async {});

    let gauges = tokio::spawn(refresh_gauges(metrics, job_store, repo_store));
    ready.store(true, Ordering::Relaxed);
    tokio::join!(sources, repos, jobs, restores, schedules);
    gauges.abort();
    ca_watch.abort();
    tracing::info!("sendense-operator stopped");
    Ok(())
}

/// What of a SourceNode or Repository its jobs react to: its spec (generation), its Ready
/// condition's status and reason, its deletion.
fn spec_or_readiness<K: crate::status::Reported>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.meta().generation.hash(&mut h);
    obj.meta().deletion_timestamp.is_some().hash(&mut h);
    let ready = obj
        .status()
        .and_then(|s| sendense_crds::conditions::find(K::conditions(s), "Ready"));
    ready.map(|c| (&c.status, &c.reason)).hash(&mut h);
    Some(h.finish())
}

/// What of a job its Repository reacts to: whether it ended, whether it is being deleted (0:
/// neither). Each change passes the filter once.
fn ended_or_deleted(job: &BackupJob) -> Option<u64> {
    let phase = job.status.as_ref().and_then(|s| s.phase);
    let ended = matches!(phase, Some(Phase::Succeeded | Phase::Failed));
    let deleting = job.metadata.deletion_timestamp.is_some();
    Some(u64::from(ended) | (u64::from(deleting) << 1))
}

/// Jobs by phase, last successes and ports in use, from the controllers' caches, every 10 s.
async fn refresh_gauges(metrics: Metrics, jobs: Store<BackupJob>, repos: Store<Repository>) {
    use std::collections::BTreeMap;
    loop {
        let mut by_phase: BTreeMap<(String, &str), i64> = BTreeMap::new();
        let mut queued: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        let mut ports: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut last_success: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut pending_snapshots: BTreeMap<(String, String), i64> = BTreeMap::new();
        for j in jobs.state() {
            let ns = j.metadata.namespace.clone().unwrap_or_default();
            let phase = match j.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Running) => "Running",
                Some(Phase::Succeeded) => "Succeeded",
                Some(Phase::Failed) => "Failed",
                Some(Phase::Pending) | None => "Pending",
            };
            *by_phase.entry((ns.clone(), phase)).or_default() += 1;
            if phase == "Pending"
                && let Some(c) = j
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Running"))
                && matches!(c.reason.as_str(), "SourceNodeLimit" | "DatastoreLimit")
            {
                *queued
                    .entry((
                        ns.clone(),
                        j.spec.source_node_ref.name.clone(),
                        c.reason.clone(),
                    ))
                    .or_default() += 1;
            }
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
            if backup_job::snapshot_pending_removal(&j) {
                let vm = j.status.as_ref().and_then(|s| s.vm_name.clone());
                *pending_snapshots
                    .entry((ns.clone(), vm.unwrap_or_default()))
                    .or_default() += 1;
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
        metrics.snapshots_pending_removal.reset();
        for ((ns, vm), n) in pending_snapshots {
            metrics
                .snapshots_pending_removal
                .with_label_values(&[&ns, &vm])
                .set(n);
        }
        metrics.queued.reset();
        for ((ns, sn, reason), n) in queued {
            metrics
                .queued
                .with_label_values(&[&ns, &sn, &reason])
                .set(n);
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
