//! What the BackupJob controller reads from its watches rather than from the API server, and
//! what it remembers within this process, so that hundreds of jobs do not become a storm of
//! requests (issue 16): the jobs' pods, the SourceNodes and Repositories, the jobs themselves
//! (all fed by the controller's watches), the ServiceAccounts already ensured, each job's last progress poll,
//! and the ended jobs already cleaned up.
//!
//! A cache only ever saves a request: a pod the cache does not hold is read from the API server
//! before anything is created or concluded from its absence, a SourceNode or Repository is
//! taken from the cache only when it is there and Ready (a job never waits on the cache's word),
//! and the allocation of ports still reads the jobs fresh under the allocation lock.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use sendense_crds::{BackupJob, Repository, SourceNode};

/// Ended jobs remembered before what is remembered of deleted jobs is dropped.
const FORGET_ABOVE: usize = 4096;

/// How long an ensured ServiceAccount is taken to exist without asking again.
const ACCOUNT_TTL: Duration = Duration::from_secs(300);

/// The controller's caches and memory.
pub struct Caches {
    /// Pods the operator manages (its own watch; the controller is triggered by the same one).
    pub pods: Store<Pod>,
    pub source_nodes: Store<SourceNode>,
    pub repositories: Store<Repository>,
    /// The jobs, as the controller itself sees them.
    pub jobs: Store<BackupJob>,
    /// Jobs to reconcile now: queued jobs whose slot freed.
    pub wake: UnboundedSender<ObjectRef<BackupJob>>,
    accounts: Mutex<HashMap<(String, String), Instant>>,
    polled: Mutex<HashMap<String, Instant>>,
    cleaned: Mutex<HashSet<String>>,
    once: Mutex<HashSet<String>>,
}

impl Caches {
    pub fn new(
        pods: Store<Pod>,
        source_nodes: Store<SourceNode>,
        repositories: Store<Repository>,
        jobs: Store<BackupJob>,
    ) -> (Self, UnboundedReceiver<ObjectRef<BackupJob>>) {
        let (wake, woken) = unbounded();
        let caches = Self {
            pods,
            source_nodes,
            repositories,
            jobs,
            wake,
            accounts: Mutex::default(),
            polled: Mutex::default(),
            cleaned: Mutex::default(),
            once: Mutex::default(),
        };
        (caches, woken)
    }

    /// Empty caches, ready (the unit tests' API server is scripted: every read goes to it).
    pub fn empty() -> Self {
        Self::with_pods(Vec::new())
    }

    /// Ready caches holding these pods and nothing else (for the unit tests).
    pub fn with_pods(pods: Vec<Pod>) -> Self {
        Self::with_objects(pods, Vec::new(), Vec::new())
    }

    /// Ready caches holding these objects and nothing else (for the unit tests).
    pub fn with_objects(
        pods: Vec<Pod>,
        source_nodes: Vec<SourceNode>,
        repositories: Vec<Repository>,
    ) -> Self {
        Self::with_jobs(pods, source_nodes, repositories, Vec::new())
    }

    /// As `with_objects`, with these jobs in the controller's own cache.
    pub fn with_jobs(
        pods: Vec<Pod>,
        source_nodes: Vec<SourceNode>,
        repositories: Vec<Repository>,
        jobs: Vec<BackupJob>,
    ) -> Self {
        fn ready<K>(objects: Vec<K>) -> Store<K>
        where
            K: kube::Resource<DynamicType = ()> + Clone + 'static,
        {
            let (store, mut writer) = reflector::store::<K>();
            writer.apply_watcher_event(&watcher::Event::Init);
            for o in objects {
                writer.apply_watcher_event(&watcher::Event::InitApply(o));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
            store
        }
        Self::new(
            ready(pods),
            ready(source_nodes),
            ready(repositories),
            ready(jobs),
        )
        .0
    }

    /// True once the pods' watch has listed them all: only then does the cache's silence
    /// about a pod mean it does not exist. Never waited for: a reconcile must not wait on a
    /// watch that the controller feeds only between reconciles (at a restart with jobs under
    /// way, waiting held every job's reconcile for as long as it waited).
    pub fn pods_listed(&self) -> bool {
        use futures::FutureExt;
        matches!(self.pods.wait_until_ready().now_or_never(), Some(Ok(())))
    }

    /// A pod, if the cache holds it.
    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.pods
            .get(&ObjectRef::new(name).within(ns))
            .map(|p| p.as_ref().clone())
    }

    /// A pod the cache knows is not there (None: the cache does not know; ask the API server).
    pub fn absent(&self, ns: &str, name: &str) -> Option<bool> {
        match self.pod(ns, name) {
            Some(_) => Some(false),
            None if self.pods_listed() => Some(true),
            None => None,
        }
    }

    /// True while the ServiceAccount is known to exist: ensured by this process within the
    /// last `ACCOUNT_TTL` (one deleted meanwhile is made again after that).
    pub fn account_known(&self, ns: &str, name: &str) -> bool {
        let key = (ns.to_owned(), name.to_owned());
        let accounts = self.accounts.lock().expect("lock");
        accounts
            .get(&key)
            .is_some_and(|t| t.elapsed() < ACCOUNT_TTL)
    }

    pub fn account_ensured(&self, ns: &str, name: &str) {
        let key = (ns.to_owned(), name.to_owned());
        self.accounts
            .lock()
            .expect("lock")
            .insert(key, Instant::now());
    }

    /// True when the job's agent was last asked for its progress at least `every` ago (and
    /// notes the poll): a status write or a pod event re-running the reconcile does not poll.
    pub fn poll_due(&self, job: &BackupJob, every: Duration) -> bool {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        let mut polled = self.polled.lock().expect("lock");
        let now = Instant::now();
        match polled.get(&key) {
            Some(t) if now.duration_since(*t) < every => false,
            _ => {
                polled.insert(key, now);
                true
            }
        }
    }

    /// True when this process has already removed the ended job's pods, Secret and
    /// Lease, and no pod of it has appeared since.
    pub fn cleaned(&self, job: &BackupJob, pod_names: &[String]) -> bool {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        let ns = job.namespace().unwrap_or_default();
        self.cleaned.lock().expect("lock").contains(&key)
            && pod_names.iter().all(|p| self.absent(&ns, p) == Some(true))
    }

    /// True the first time it is asked about `what` of this job in this process.
    pub fn first(&self, job: &BackupJob, what: &str) -> bool {
        let key = format!("{}/{what}", job.uid().unwrap_or_else(|| job.name_any()));
        self.once.lock().expect("lock").insert(key)
    }

    pub fn mark_cleaned(&self, job: &BackupJob) {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        self.polled.lock().expect("lock").remove(&key);
        let mut cleaned = self.cleaned.lock().expect("lock");
        cleaned.insert(key);
        if cleaned.len() > FORGET_ABOVE {
            drop(cleaned);
            self.forget_deleted_jobs();
        }
    }

    /// What is remembered of jobs that no longer exist goes (the memory stays bounded by the
    /// jobs that exist).
    fn forget_deleted_jobs(&self) {
        let live: HashSet<String> = self
            .jobs
            .state()
            .iter()
            .map(|j| j.uid().unwrap_or_else(|| j.name_any()))
            .collect();
        let of_live = |key: &str| live.contains(key.split('/').next().unwrap_or(key));
        self.cleaned.lock().expect("lock").retain(|k| of_live(k));
        self.once.lock().expect("lock").retain(|k| of_live(k));
        self.polled.lock().expect("lock").retain(|k, _| of_live(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Fixture, TestObject};
    use serde_json::json;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "backups"}}))
        .expect("pod")
    }

    #[test]
    fn what_is_remembered_saves_requests_only_until_something_changes() {
        let job = BackupJob::test().with_status(json!({"phase": "Succeeded"}));
        let c = Caches::with_pods(vec![pod("web-01-b2-hub")]);
        assert!(c.pod("backups", "web-01-b2-hub").is_some());
        assert!(c.pod("backups", "web-01-b2-agent").is_none());
        // A progress poll, then none until the pace allows.
        assert!(c.poll_due(&job, Duration::from_secs(60)));
        assert!(!c.poll_due(&job, Duration::from_secs(60)));
        assert!(c.poll_due(&job, Duration::ZERO));
        // Once per job and purpose.
        assert!(c.first(&job, "1/secret-removed"));
        assert!(!c.first(&job, "1/secret-removed"));
        assert!(c.first(&job, "2/secret-removed"));
        // Cleaned, unless one of its pods is (still, again) in the cache.
        let names = ["web-01-b2-agent".to_owned(), "web-01-b2-hub".to_owned()];
        assert!(!c.cleaned(&job, &names[..1]));
        c.mark_cleaned(&job);
        assert!(c.cleaned(&job, &names[..1]));
        assert!(!c.cleaned(&job, &names), "its hub is in the cache");
        assert_eq!(c.absent("backups", "web-01-b2-agent"), Some(true));
        assert_eq!(c.absent("backups", "web-01-b2-hub"), Some(false));
        // Before the pods' watch has listed them, the cache's silence means nothing.
        let (pods, _writer) = reflector::store::<Pod>();
        let (sns, _w) = reflector::store::<SourceNode>();
        let (repos, _wr) = reflector::store::<sendense_crds::Repository>();
        let (jobs, _wj) = reflector::store::<BackupJob>();
        let unlisted = Caches::new(pods, sns, repos, jobs).0;
        assert_eq!(unlisted.absent("backups", "web-01-b2-agent"), None);
        unlisted.mark_cleaned(&job);
        assert!(!unlisted.cleaned(&job, &names[..1]));
        // A ServiceAccount is taken to exist once ensured.
        assert!(!c.account_known("backups", "sendense-hub"));
        c.account_ensured("backups", "sendense-hub");
        assert!(c.account_known("backups", "sendense-hub"));
    }
}
