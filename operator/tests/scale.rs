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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, PostParams};
use sendense_crds::{BackupJob, Repository, SourceNode};
use sendense_e2e::{client, kubectl_ok};

mod support;
use support::{Bed, SERIAL};

#[path = "scale/requests.rs"]
mod requests;
#[path = "scale/watch.rs"]
mod watch;
use requests::{api_requests, audited, by_client, delta, events_by_reason, top, total};
use watch::{
    Shared, create_to_pod, from_free_slot, percentile, watch_backup_jobs, watch_batch_jobs,
    watch_pods,
};

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(default),
    }
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
    let (ops_latency, ops_busy, ops_raw, hub, agent, failed, twice, pods_per_job) = {
        let s = seen.lock().unwrap();
        let pods_per_job = names
            .iter()
            .filter_map(|n| s.pods.get(n))
            .map(|p| p.len())
            .sum::<usize>() as f64
            / n as f64;
        (
            from_free_slot(&s, &names, slots),
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
         | p99 less only the time all slots were held by others (s) | {:.2} | {b99:.2} | | | |\n\
         | create -> first pod p99 incl. queueing (s) | {:.2} | {b99:.2} | | | |\n\
         | wall time of the phase (s) | {ops_secs:.1} | {batch_secs:.1} | | | |\n\
         | pods per job | {pods_per_job:.2} | 1 | | | |\n\
         | API requests per pod, net (shown, no target) | {:.1} | {batch_req_net:.1} | {:.2}x | | |\n\
         | operator reconciles per BackupJob | {:.1} (all controllers {:.1}) | | | | |\n\
         BackupJobs' most frequent requests:\n{}\n\
         batch Jobs' most frequent requests:\n{}\n\
         ports held by two unfinished jobs at once: {}; failed jobs: {}; left behind: {}; ports in use at the end: {ports_in_use}\n",
        verdict(req_ratio <= 3.0),
        ops_req / batch_req,
        o50 / b50,
        verdict(p99_ratio <= 2.0),
        p(&ops_busy, 99.0),
        p(&ops_raw, 99.0),
        ops_req_net / pods_per_job,
        req_ratio / pods_per_job,
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
