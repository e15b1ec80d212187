//! What the watches see during a phase: when each job and its first pod appeared (one clock),
//! which BackupJobs run and hold which ports, failures and retries, and one hub and one agent pod
//! as the operator made them; and the timings computed from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use sendense_crds::BackupJob;
use sendense_crds::backup_job::Phase;

/// What the watches saw, by job name, on one clock.
#[derive(Default)]
pub struct Seen {
    pub created: HashMap<String, Instant>,
    pub first_pod: HashMap<String, Instant>,
    /// Pods of each job, by name (a pod recreated under the same name counts once).
    pub pods: HashMap<String, std::collections::BTreeSet<String>>,
    /// BackupJobs: when each was first seen Running (holding a slot) and when it ended.
    pub running: HashMap<String, Instant>,
    pub ended: HashMap<String, Instant>,
    /// Ports held by BackupJobs that have not ended: port -> job.
    pub ports: HashMap<i32, String>,
    pub twice: Vec<String>,
    pub failed: Vec<String>,
    /// Failed attempts that were retried: job -> the Retrying condition's message.
    pub retried: BTreeMap<String, String>,
    /// One hub and one agent pod as the operator created them (the batch Jobs' templates).
    pub hub: Option<Pod>,
    pub agent: Option<Pod>,
}

pub type Shared = Arc<Mutex<Seen>>;

/// Runs `f` on every object the watch applies (listed or changed), with the time it was seen.
fn observe<K, F>(
    api: Api<K>,
    config: watcher::Config,
    seen: Shared,
    mut f: F,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: FnMut(K, Instant, &mut Seen) + Send + 'static,
{
    tokio::spawn(async move {
        let mut objects = watcher::watcher(api, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(Ok(o)) = objects.next().await {
            let now = Instant::now();
            f(o, now, &mut seen.lock().unwrap());
        }
    })
}

pub fn watch_backup_jobs(api: Api<BackupJob>, seen: Shared) -> tokio::task::JoinHandle<()> {
    observe(api, watcher::Config::default(), seen, |j, now, s| {
        let name = j.name_any();
        s.created.entry(name.clone()).or_insert(now);
        let Some(st) = j.status.as_ref() else {
            return;
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
    })
}

pub fn watch_batch_jobs(api: Api<Job>, seen: Shared) -> tokio::task::JoinHandle<()> {
    observe(api, watcher::Config::default(), seen, |j, now, s| {
        s.created.entry(j.name_any()).or_insert(now);
        let st = j.status.clone().unwrap_or_default();
        if st.succeeded.unwrap_or(0) + st.failed.unwrap_or(0) > 0 {
            s.ended.entry(j.name_any()).or_insert(now);
        }
    })
}

/// Pods, attributed to their job by `label` (sendense.io/backupjob, or batch's job-name).
pub fn watch_pods(api: Api<Pod>, label: &'static str, seen: Shared) -> tokio::task::JoinHandle<()> {
    let config = watcher::Config::default().labels(label);
    observe(api, config, seen, move |p, now, s| {
        let Some(job) = p.labels().get(label).cloned() else {
            return;
        };
        s.first_pod.entry(job.clone()).or_insert(now);
        s.pods.entry(job.clone()).or_default().insert(p.name_any());
        let name = p.name_any();
        if name == format!("{job}-hub") && s.hub.is_none() {
            s.hub = Some(p);
        } else if name == format!("{job}-agent") && s.agent.is_none() {
            s.agent = Some(p);
        }
    })
}

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Seconds from each job's creation to its first pod, less the time every slot of the
/// SourceNode was held by other jobs (`slots`: None for batch Jobs, which do not queue).
pub fn create_to_pod(s: &Seen, names: &[String], slots: Option<usize>) -> Vec<f64> {
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

/// Create -> first pod of each BackupJob from the moment a slot was free for it: the k-th job
/// to get its first pod (in the order they got them) could start once the job created, and,
/// when `slots` jobs had started before it, once the (k - slots)-th job ended (the slot it
/// took). So each job is charged its own hand-over only, whatever order the queue chose.
pub fn from_free_slot(s: &Seen, names: &[String], slots: usize) -> Vec<f64> {
    let mut started: Vec<(Instant, Instant)> = names
        .iter()
        .filter_map(|n| Some((*s.first_pod.get(n)?, *s.created.get(n)?)))
        .collect();
    started.sort();
    let mut ends: Vec<Instant> = names
        .iter()
        .filter_map(|n| s.ended.get(n).copied())
        .collect();
    ends.sort();
    started
        .iter()
        .enumerate()
        .map(|(k, (pod, created))| {
            let free = match k.checked_sub(slots) {
                Some(j) => ends.get(j).map_or(*created, |e| (*e).max(*created)),
                None => *created,
            };
            pod.saturating_duration_since(free).as_secs_f64()
        })
        .collect()
}

/// How long within [from, to] at least `slots` jobs other than `me` were running.
pub fn busy(s: &Seen, me: &str, from: Instant, to: Instant, slots: usize) -> Duration {
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
