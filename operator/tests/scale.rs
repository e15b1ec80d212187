//! The operator at scale (issue 16, "Operator scale"): N BackupJobs created at once against the
//! real API server and the real node, then N `batch/v1` Jobs made of the same pod templates (the
//! hub's and the agent's, as the operator created them), measured the same way in the same run:
//!
//! - create -> first pod: from the watch event of the job to the watch event of its first pod
//!   (milliseconds, one clock). A BackupJob waits while all of the SourceNode's
//!   `maxConcurrentJobs` slots are taken by other jobs; that time is not the operator's latency
//!   and is left out (both figures are printed).
//! - API requests per job: deltas of the API server's `apiserver_request_total` over each phase
//!   (everything: operator, controllers, scheduler, kubelet), raw and less the background rate
//!   measured while nothing ran.
//! - reconciles per job (the operator's `sendense_reconcile_runs_total`), the most frequent
//!   requests, no port held by two running jobs at once, nothing left behind.
//!
//! It is a benchmark: `make bench-operator` runs it (`#[ignore]`: not in `make test`). The
//! ratios are printed with their targets, not asserted; what must hold whatever the load is
//! asserted (every job succeeds, no port twice, no leak).
//!
//! Environment: SENDENSE_SCALE_JOBS (300), SENDENSE_SCALE_CONCURRENCY (25, the SourceNode's
//! maxConcurrentJobs), SENDENSE_SCALE_TIMEOUT_SECONDS (3600), SENDENSE_SCALE_REPORT (a file the
//! table is also written to).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, Repository, SourceNode};
use sendense_e2e::{client, kubectl_ok};

mod support;
use support::{Bed, SERIAL};

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(default),
    }
}

/// What the watches saw, by job name, on one clock.
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    first_pod: HashMap<String, Instant>,
    /// Pods of each job, by name (a pod recreated under the same name counts once).
    pods: HashMap<String, std::collections::BTreeSet<String>>,
    /// BackupJobs: when each was first seen Running (holding a slot) and when it ended.
    running: HashMap<String, Instant>,
    ended: HashMap<String, Instant>,
    /// Ports held by BackupJobs that have not ended: port -> job.
    ports: HashMap<i32, String>,
    twice: Vec<String>,
    failed: Vec<String>,
    /// Failed attempts that were retried: job -> the Retrying condition's message.
    retried: BTreeMap<String, String>,
    /// One hub and one agent pod as the operator created them (the batch Jobs' templates).
    hub: Option<Pod>,
    agent: Option<Pod>,
}

type Shared = Arc<Mutex<Seen>>;

fn watch_backup_jobs(api: Api<BackupJob>, seen: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(Ok(ev)) = events.next().await {
            let (watcher::Event::Apply(j) | watcher::Event::InitApply(j)) = ev else {
                continue;
            };
            let now = Instant::now();
            let name = j.name_any();
            let mut s = seen.lock().unwrap();
            s.created.entry(name.clone()).or_insert(now);
            let Some(st) = j.status.as_ref() else {
                continue;
            };
            if let Some(c) = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Running" && c.reason == "Retrying")
            {
                s.retried.insert(name.clone(), c.message.clone());
            }
            match st.phase {
                Some(Phase::Running) | Some(Phase::Pending) | None => {
                    if st.phase == Some(Phase::Running) && !s.running.contains_key(&name) {
                        s.running.insert(name.clone(), now);
                    }
                    // A job holds the ports its status names until it ends (ports.rs).
                    s.ports.retain(|_, j| j != &name);
                    for port in st.disks.iter().filter_map(|d| d.port) {
                        match s.ports.get(&port) {
                            Some(other) if other != &name => {
                                let t = format!("port {port}: {other} and {name}");
                                s.twice.push(t);
                            }
                            _ => {
                                s.ports.insert(port, name.clone());
                            }
                        }
                    }
                }
                Some(Phase::Succeeded | Phase::Failed) => {
                    if !s.ended.contains_key(&name) {
                        s.ended.insert(name.clone(), now);
                        if st.phase == Some(Phase::Failed) {
                            let why = st
                                .conditions
                                .iter()
                                .map(|c| format!("{}={} {}", c.type_, c.reason, c.message))
                                .collect::<Vec<_>>()
                                .join("; ");
                            s.failed.push(format!("{name}: {why}"));
                        }
                    }
                    s.ports.retain(|_, j| j != &name);
                }
            }
        }
    })
}

fn watch_batch_jobs(api: Api<Job>, seen: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(Ok(ev)) = events.next().await {
            let (watcher::Event::Apply(j) | watcher::Event::InitApply(j)) = ev else {
                continue;
            };
            let now = Instant::now();
            let mut s = seen.lock().unwrap();
            s.created.entry(j.name_any()).or_insert(now);
            let st = j.status.clone().unwrap_or_default();
            if st.succeeded.unwrap_or(0) + st.failed.unwrap_or(0) > 0 {
                s.ended.entry(j.name_any()).or_insert(now);
            }
        }
    })
}

/// Pods, attributed to their job by `label` (sendense.io/backupjob, or batch's job-name).
fn watch_pods(api: Api<Pod>, label: &'static str, seen: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = watcher::Config::default().labels(label);
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(Ok(ev)) = events.next().await {
            let (watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev else {
                continue;
            };
            let now = Instant::now();
            let Some(job) = p.labels().get(label).cloned() else {
                continue;
            };
            let mut s = seen.lock().unwrap();
            s.first_pod.entry(job.clone()).or_insert(now);
            s.pods.entry(job.clone()).or_default().insert(p.name_any());
            let name = p.name_any();
            if name == format!("{job}-hub") && s.hub.is_none() {
                s.hub = Some(p);
            } else if name == format!("{job}-agent") && s.agent.is_none() {
                s.agent = Some(p);
            }
        }
    })
}

/// The API server's audit log (SENDENSE_SCALE_AUDIT_LOG, written when the control plane runs
/// with SENDENSE_APISERVER_AUDIT=1): requests completed within [from, to], by client, verb and
/// resource. Clients: the node's kubelet, the scheduler, the controller manager's controllers,
/// and kube-rs (the operator, plus the test's creates and watches; both use the admin
/// credentials).
fn audited(from: Timestamp, to: Timestamp) -> Option<BTreeMap<(String, String), f64>> {
    let path = std::env::var("SENDENSE_SCALE_AUDIT_LOG").ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = e["stageTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
        else {
            continue;
        };
        if t < from || t > to || e["stage"] != "ResponseComplete" {
            continue;
        }
        let user = e["user"]["username"].as_str().unwrap_or("");
        let agent = e["userAgent"].as_str().unwrap_or("");
        let client = if let Some(c) = user.strip_prefix("system:serviceaccount:kube-system:") {
            c.to_owned()
        } else if user.starts_with("system:node:") {
            "kubelet".to_owned()
        } else if user.starts_with("system:") {
            user.trim_start_matches("system:").to_owned()
        } else {
            agent.split(['/', ' ']).next().unwrap_or("").to_owned()
        };
        let r = &e["objectRef"];
        let mut resource = r["resource"].as_str().unwrap_or("").to_owned();
        if let Some(s) = r["subresource"].as_str() {
            resource = format!("{resource}/{s}");
        }
        let verb = e["verb"].as_str().unwrap_or("");
        *by.entry((client, format!("{verb} {resource}")))
            .or_insert(0.0) += 1.0;
    }
    Some(by)
}

/// The namespace's Events by (reporter, reason, object kind), counting repeats, most first.
fn events_by_reason(ns: &str, jobs: f64) -> Result<String> {
    let out = kubectl_ok(&["get", "events.events.k8s.io", "-n", ns, "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for e in list["items"].as_array().into_iter().flatten() {
        let who = e["reportingController"]
            .as_str()
            .or(e["deprecatedSource"]["component"].as_str())
            .unwrap_or("");
        let what = format!(
            "{who} {} ({})",
            e["reason"].as_str().unwrap_or(""),
            e["regarding"]["kind"].as_str().unwrap_or("")
        );
        let n = e["series"]["count"]
            .as_f64()
            .or(e["deprecatedCount"].as_f64())
            .unwrap_or(1.0)
            .max(1.0);
        *by.entry(what).or_default() += n;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(v.iter()
        .take(15)
        .map(|(w, n)| format!("    {w:<60} {:>6.2}/job", n / jobs))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Requests per job by client, then the client's most frequent requests.
fn by_client(m: &BTreeMap<(String, String), f64>, jobs: f64) -> String {
    let mut clients: BTreeMap<&str, f64> = BTreeMap::new();
    for ((c, _), n) in m {
        *clients.entry(c).or_default() += n;
    }
    let mut clients: Vec<_> = clients.into_iter().collect();
    clients.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out = String::new();
    for (c, n) in clients {
        out.push_str(&format!("    {c:<40} {:>8.1}/job\n", n / jobs));
        let mut reqs: Vec<_> = m.iter().filter(|((cc, _), _)| cc == c).collect();
        reqs.sort_by(|a, b| b.1.total_cmp(a.1));
        for ((_, r), n) in reqs.into_iter().take(8) {
            out.push_str(&format!("        {r:<40} {:>8.1}/job\n", n / jobs));
        }
    }
    out
}

/// `apiserver_request_total`, summed by (verb, resource), and its total.
fn api_requests() -> Result<BTreeMap<(String, String), f64>> {
    let text = kubectl_ok(&["get", "--raw", "/metrics"])?;
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *by.entry((label("verb"), label("resource"))).or_insert(0.0) += v;
    }
    Ok(by)
}

fn delta(
    after: &BTreeMap<(String, String), f64>,
    before: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn total(m: &BTreeMap<(String, String), f64>) -> f64 {
    m.values().sum()
}

fn top(m: &BTreeMap<(String, String), f64>, jobs: f64, n: usize) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .take(n)
        .map(|((verb, res), c)| format!("    {verb:<8} {res:<28} {:>8.1}/job", *c / jobs))
        .collect::<Vec<_>>()
        .join("\n")
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Seconds from each job's creation to its first pod, less the time every slot of the
/// SourceNode was held by other jobs (`slots`: None for batch Jobs, which do not queue).
fn create_to_pod(s: &Seen, names: &[String], slots: Option<usize>) -> Vec<f64> {
    names
        .iter()
        .filter_map(|n| {
            let (c, p) = (*s.created.get(n)?, *s.first_pod.get(n)?);
            let mut secs = p.saturating_duration_since(c).as_secs_f64();
            if let Some(slots) = slots {
                secs -= busy(s, n, c, p, slots).as_secs_f64();
            }
            Some(secs.max(0.0))
        })
        .collect()
}

/// How long within [from, to] at least `slots` jobs other than `me` were running.
fn busy(s: &Seen, me: &str, from: Instant, to: Instant, slots: usize) -> Duration {
    let mut edges: Vec<(Instant, i64)> = Vec::new();
    for (job, start) in &s.running {
        if job == me {
            continue;
        }
        edges.push((*start, 1));
        if let Some(end) = s.ended.get(job) {
            edges.push((*end, -1));
        }
    }
    edges.sort();
    let (mut held, mut since, mut busy) = (0i64, None::<Instant>, Duration::ZERO);
    for (t, d) in edges {
        let before = held >= slots as i64;
        held += d;
        let after = held >= slots as i64;
        if !before && after {
            since = Some(t);
        } else if before && !after {
            let start = since.take().unwrap_or(t).max(from);
            if t > start {
                busy += t.min(to).saturating_duration_since(start);
            }
        }
    }
    if let Some(start) = since {
        let start = start.max(from);
        if to > start {
            busy += to - start;
        }
    }
    busy
}

/// A sum of the operator's counter `name` with `label` (e.g. controller="backupjob").
fn counter(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The pod as a batch Job's template: its spec, a fresh label, never restarted, ended by the
/// kubelet after `deadline` seconds if it does not end by itself (a hub serves until stopped);
/// Secrets of the attempt, removed with it, are optional.
fn template_job(name: &str, pod: &Pod, deadline: i64) -> Result<Job> {
    let mut spec = serde_json::to_value(pod.spec.as_ref().context("pod spec")?)?;
    let obj = spec.as_object_mut().context("pod spec object")?;
    obj.remove("nodeName");
    obj.insert("restartPolicy".into(), "Never".into());
    obj.insert("activeDeadlineSeconds".into(), deadline.into());
    if let Some(vols) = obj.get_mut("volumes").and_then(|v| v.as_array_mut()) {
        for v in vols {
            if let Some(s) = v.get_mut("secret").and_then(|s| s.as_object_mut()) {
                s.insert("optional".into(), true.into());
            }
        }
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"labels": {"sendense-scale": "baseline"}}, "spec": spec},
        },
    }))?)
}

/// Creates the objects 16 at a time (as a client creating many would).
async fn create_all<K>(api: &Api<K>, objects: Vec<K>) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|o| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &o).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn until<F: FnMut() -> Result<bool>>(what: &str, within: Duration, mut f: F) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Requests per second while nothing of the test runs (leases, node status, controllers).
async fn background_rate() -> Result<f64> {
    let before = api_requests()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let d = delta(&api_requests()?, &before);
    Ok(total(&d) / t.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: make bench-operator"]
async fn backup_jobs_at_scale_against_batch_jobs() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let n = env_num("SENDENSE_SCALE_JOBS", 300)? as usize;
    let slots = env_num("SENDENSE_SCALE_CONCURRENCY", 25)?
        .min(n as u64)
        .max(1) as usize;
    let within = Duration::from_secs(env_num("SENDENSE_SCALE_TIMEOUT_SECONDS", 3600)?);
    let low = 11000;
    let high = low + 2 * slots as i32 + 20;
    let vms = n.to_string();
    let mut bed = Bed::start_without_operator_with_simulator_flags(
        n,
        (low, high),
        &["-vms", &vms, "-disk-size", "1MiB,1MiB"],
    )
    .await?;
    // Requests small enough that `slots` hubs and agents fit the node's CPUs together (the
    // defaults reserve 150m a job): the benchmark is about the API, not the node's size.
    bed.start_operator_with(&[
        (
            "SENDENSE_HUB_RESOURCES",
            r#"{"requests":{"cpu":"5m","memory":"16Mi"}}"#,
        ),
        (
            "SENDENSE_AGENT_RESOURCES",
            r#"{"requests":{"cpu":"5m","memory":"16Mi"}}"#,
        ),
        ("RUST_LOG", "info"),
    ])?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    support::faults::patch_source_node(
        &bed,
        &format!(r#"{{"limits": {{"maxConcurrentJobs": {slots}}}}}"#),
    )?;
    let ns = bed.ns.name.clone();
    let c = client().await?;
    let seen: Shared = Arc::default();
    let watches = [
        watch_backup_jobs(Api::namespaced(c.clone(), &ns), seen.clone()),
        watch_pods(
            Api::namespaced(c.clone(), &ns),
            "sendense.io/backupjob",
            seen.clone(),
        ),
    ];
    // The patch above and the probes settle first.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_rate = background_rate().await?;

    // Phase 1: N BackupJobs at once.
    let names: Vec<String> = (0..n).map(|i| format!("scale-{i}")).collect();
    let jobs: Vec<BackupJob> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            serde_yaml::from_str(&Bed::job_yaml(name, &format!("cbt-vm-{i}"), "full", ""))
                .expect("job yaml")
        })
        .collect();
    let metrics_before = bed.metrics().await?;
    let before = api_requests()?;
    let t0 = Instant::now();
    let w0 = Timestamp::now();
    create_all(&Api::<BackupJob>::namespaced(c.clone(), &ns), jobs).await?;
    let all_ended = || {
        let s = seen.lock().unwrap();
        Ok(names.iter().all(|n| s.ended.contains_key(n)))
    };
    if let Err(e) = until("every BackupJob ended", within, all_ended).await {
        bail!("{e}{}", bed.diagnostics());
    }
    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let jobs_pods = ListParams::default().labels("sendense.io/backupjob");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !pods.list(&jobs_pods).await?.items.is_empty() {
        if Instant::now() > deadline {
            bail!("pods of ended jobs remain after 300 s{}", bed.diagnostics());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ops = delta(&api_requests()?, &before);
    let ops_secs = t0.elapsed().as_secs_f64();
    let ops_audit = audited(w0, Timestamp::now());
    let ops_events = events_by_reason(&ns, n as f64)?;
    let metrics_after = bed.metrics().await?;
    let reconciles = counter(
        &metrics_after,
        "sendense_reconcile_runs_total",
        "controller=\"backupjob\"",
    ) - counter(
        &metrics_before,
        "sendense_reconcile_runs_total",
        "controller=\"backupjob\"",
    );
    let all_reconciles = counter(&metrics_after, "sendense_reconcile_runs_total", "")
        - counter(&metrics_before, "sendense_reconcile_runs_total", "");
    let retried = seen.lock().unwrap().retried.clone();
    let (ops_latency, ops_raw, hub, agent, failed, twice, pods_per_job) = {
        let s = seen.lock().unwrap();
        let pods_per_job = names
            .iter()
            .filter_map(|n| s.pods.get(n))
            .map(|p| p.len())
            .sum::<usize>() as f64
            / n as f64;
        (
            create_to_pod(&s, &names, Some(slots)),
            create_to_pod(&s, &names, None),
            s.hub.clone(),
            s.agent.clone(),
            s.failed.clone(),
            s.twice.clone(),
            pods_per_job,
        )
    };
    for w in &watches {
        w.abort();
    }

    // Phase 2: N batch Jobs, half of the hub's pod, half of the agent's.
    let hub = hub.context("no hub pod was seen")?;
    let agent = agent.context("no agent pod was seen")?;
    let batch_names: Vec<String> = (0..n).map(|i| format!("batch-{i}")).collect();
    let batch_jobs = batch_names
        .iter()
        .enumerate()
        .map(|(i, name)| template_job(name, if i % 2 == 0 { &hub } else { &agent }, 10))
        .collect::<Result<Vec<_>>>()?;
    let seen_b: Shared = Arc::default();
    let watches = [
        watch_batch_jobs(Api::namespaced(c.clone(), &ns), seen_b.clone()),
        watch_pods(
            Api::namespaced(c.clone(), &ns),
            "batch.kubernetes.io/job-name",
            seen_b.clone(),
        ),
    ];
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = api_requests()?;
    let t1 = Instant::now();
    let w1 = Timestamp::now();
    let batch: Api<Job> = Api::namespaced(c.clone(), &ns);
    create_all(&batch, batch_jobs).await?;
    let batch_ended = || {
        let s = seen_b.lock().unwrap();
        Ok(batch_names.iter().all(|n| s.ended.contains_key(n)))
    };
    if let Err(e) = until("every batch Job ended", within, batch_ended).await {
        bail!("{e}{}", bed.diagnostics());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let batch_ops = delta(&api_requests()?, &before);
    let batch_secs = t1.elapsed().as_secs_f64();
    let batch_audit = audited(w1, Timestamp::now());
    let batch_latency = {
        let s = seen_b.lock().unwrap();
        create_to_pod(&s, &batch_names, None)
    };
    for w in &watches {
        w.abort();
    }
    kubectl_ok(&["delete", "jobs", "-n", &ns, "--all", "--wait=false"]).ok();

    // What the jobs left behind: pods and Services, the attempts' TLS Secrets, VM Leases, ports.
    let mut left = Vec::new();
    for (kinds, selector) in [
        ("pods,services", "sendense.io/backupjob"),
        ("secrets", "app.kubernetes.io/component=nbd-tls"),
    ] {
        let out = kubectl_ok(&["get", kinds, "-n", &ns, "-l", selector, "-o", "name"])?;
        left.extend(out.lines().map(str::to_owned));
    }
    let leases = kubectl_ok(&["get", "leases", "-n", &ns, "-o", "name"])?;
    left.extend(leases.lines().map(str::to_owned));
    let ports_in_use = seen.lock().unwrap().ports.len();
    let leftovers = left.join(" ");

    let fnum = n as f64;
    let per = |m: &BTreeMap<(String, String), f64>, secs: f64| {
        (
            total(m) / fnum,
            (total(m) - idle_rate * secs).max(0.0) / fnum,
        )
    };
    let (ops_req, ops_req_net) = per(&ops, ops_secs);
    let (batch_req, batch_req_net) = per(&batch_ops, batch_secs);
    let p = |v: &Vec<f64>, q| percentile(v.clone(), q);
    let (o50, o99, b50, b99) = (
        p(&ops_latency, 50.0),
        p(&ops_latency, 99.0),
        p(&batch_latency, 50.0),
        p(&batch_latency, 99.0),
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let req_ratio = ops_req_net / batch_req_net;
    let p99_ratio = o99 / b99;
    let report = format!(
        "\n== operator scale: {n} BackupJobs (maxConcurrentJobs {slots}) vs {n} batch/v1 Jobs of the same pod templates ==\n\
         background API requests while idle: {idle_rate:.1}/s (subtracted below as 'net')\n\
         | measure | BackupJobs | batch Jobs | ratio | target | |\n\
         |---|---|---|---|---|---|\n\
         | API requests per job, net | {ops_req_net:.1} | {batch_req_net:.1} | {req_ratio:.2}x | <= 3x | {} |\n\
         | API requests per job, raw | {ops_req:.1} | {batch_req:.1} | {:.2}x | | |\n\
         | create -> first pod p50 (s) | {o50:.2} | {b50:.2} | {:.2}x | | |\n\
         | create -> first pod p99 (s) | {o99:.2} | {b99:.2} | {p99_ratio:.2}x | <= 2x | {} |\n\
         | create -> first pod p99 incl. queueing (s) | {:.2} | {b99:.2} | | | |\n\
         | wall time of the phase (s) | {ops_secs:.1} | {batch_secs:.1} | | | |\n\
         | pods per job | {pods_per_job:.2} | 1 | | | |\n\
         | operator reconciles per BackupJob | {:.1} (all controllers {:.1}) | | | | |\n\
         BackupJobs' most frequent requests:\n{}\n\
         batch Jobs' most frequent requests:\n{}\n\
         ports held by two unfinished jobs at once: {}; failed jobs: {}; left behind: {}; ports in use at the end: {ports_in_use}\n",
        verdict(req_ratio <= 3.0),
        ops_req / batch_req,
        o50 / b50,
        verdict(p99_ratio <= 2.0),
        p(&ops_raw, 99.0),
        reconciles / fnum,
        all_reconciles / fnum,
        top(&ops, fnum, 20),
        top(&batch_ops, fnum, 12),
        twice.len(),
        failed.len(),
        if leftovers.is_empty() {
            "nothing"
        } else {
            &leftovers
        },
    );
    let mut report = report;
    report.push_str(&format!(
        "attempts retried: {}{}\n",
        retried.len(),
        retried
            .iter()
            .map(|(j, m)| format!("\n    {j}: {m}"))
            .collect::<String>()
    ));
    report.push_str(&format!(
        "Events of the BackupJobs' phase (repeats counted):\n{ops_events}\n"
    ));
    if let (Some(o), Some(b)) = (&ops_audit, &batch_audit) {
        report.push_str(&format!(
            "BackupJobs' requests by client (audit log):\n{}batch Jobs' requests by client (audit log):\n{}",
            by_client(o, fnum),
            by_client(b, fnum)
        ));
    }
    println!("{report}");
    if let Ok(path) = std::env::var("SENDENSE_SCALE_REPORT")
        && !path.is_empty()
    {
        std::fs::write(&path, &report)?;
    }
    assert!(failed.is_empty(), "jobs failed: {failed:#?}");
    assert!(twice.is_empty(), "ports held twice: {twice:#?}");
    assert!(leftovers.is_empty(), "left behind: {leftovers}");
    assert_eq!(ports_in_use, 0, "ports still held by ended jobs");
    Ok(())
}
