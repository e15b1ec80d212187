//! What the BackupJob controller reads from its watches rather than from the API server, and
//! what it remembers within this process, so that hundreds of jobs do not become a storm of
//! requests (issue 16): the jobs' pods, the SourceNodes and Repositories, the jobs themselves
//! (all fed by the controller's watches), the ServiceAccounts already ensured, each job's last progress poll,
//! and the ended jobs already cleaned up.
//!
//! A cache only ever saves a request: a pod the cache does not hold is read from the API server
//! before anything is created or concluded from its absence, a SourceNode or Repository is
//! taken from the cache only when it is there and Ready (a job never waits on the cache's word),
//! and the allocation of ports still reads the jobs fresh under the allocation lock. A
//! Repository or SourceNode a running attempt needs is taken from the cache when it is there
//! (its spec only); an attempt fails for its absence only on the API server's word. Jobs past
//! the queue's cache check and not yet planned hold their slot in this process's memory
//! (`admit`), so a burst of new jobs does not log in to vCenter and list the namespace once
//! for every job only to be queued by the fresh lists.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
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
    /// Per job: the resourceVersion its last status write by this process made.
    written: Mutex<HashMap<String, String>>,
    /// Jobs past the queue's cache check, by UID: the job and its SourceNode (`admit`).
    admitted: Mutex<HashMap<String, AdmittedJob>>,
}

/// An admitted job and its SourceNode.
type AdmittedJob = (ObjectRef<BackupJob>, ObjectRef<SourceNode>);

/// A job's place among the jobs admitted past the queue (`Caches::admit`): given up when
/// dropped, unless the job's plan was written (`planned`), in which case it is held until the
/// cache shows the plan.
pub struct Admission<'a> {
    caches: &'a Caches,
    uid: String,
    planned: bool,
}

impl Admission<'_> {
    /// The job's plan is written: its slot is held until the cache shows the job planned.
    pub fn planned(mut self) {
        self.planned = true;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.planned {
            self.caches.admitted.lock().expect("lock").remove(&self.uid);
        }
    }
}

/// Not planned yet: the cache shows the job without a phase or Pending.
fn unplanned(job: &BackupJob) -> bool {
    use sendense_crds::backup_job::Phase;
    matches!(
        job.status.as_ref().and_then(|s| s.phase),
        None | Some(Phase::Pending)
    )
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
            written: Mutex::default(),
            admitted: Mutex::default(),
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

    /// A SourceNode, if the cache holds it.
    pub fn source_node(&self, ns: &str, name: &str) -> Option<Arc<SourceNode>> {
        self.source_nodes.get(&ObjectRef::new(name).within(ns))
    }

    /// A Repository, if the cache holds it.
    pub fn repository(&self, ns: &str, name: &str) -> Option<Arc<Repository>> {
        self.repositories.get(&ObjectRef::new(name).within(ns))
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

    /// Admits `job` (of SourceNode `sn`) past the queue unless the slots are taken: `wait` is
    /// asked with the number of other jobs of `sn` this process admitted whose plan the cache
    /// does not show yet (each of those holds a slot the cache cannot see). Checked and noted
    /// under one lock, so concurrent reconciles of a burst of new jobs do not all pass.
    pub fn admit<W>(
        &self,
        job: &BackupJob,
        sn: &SourceNode,
        wait: impl FnOnce(usize) -> Option<W>,
    ) -> Result<Admission<'_>, W> {
        let uid = job.uid().unwrap_or_else(|| job.name_any());
        let sn_ref = ObjectRef::from_obj(sn);
        let mut admitted = self.admitted.lock().expect("lock");
        // Planned (the cache shows it) or gone: no longer held here.
        admitted.retain(|u, (j, _)| {
            self.jobs
                .get(j)
                .is_some_and(|j| j.uid().as_deref() == Some(u.as_str()) && unplanned(&j))
        });
        let others = admitted
            .iter()
            .filter(|(u, (_, s))| *u != &uid && *s == sn_ref)
            .count();
        if let Some(w) = wait(others) {
            return Err(w);
        }
        admitted.insert(uid.clone(), (ObjectRef::from_obj(job), sn_ref));
        Ok(Admission {
            caches: self,
            uid,
            planned: false,
        })
    }

    /// Notes the resourceVersion this process's status write of the job made.
    pub fn wrote(&self, job: &BackupJob, version: String) {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        self.written.lock().expect("lock").insert(key, version);
    }

    /// True when this copy of the job is the one this process's last status write of it made:
    /// nothing this process wrote since is missing from it (what `run::stale` asks the API
    /// server otherwise).
    pub fn is_own_last_write(&self, job: &BackupJob) -> bool {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        let written = self.written.lock().expect("lock");
        job.resource_version()
            .is_some_and(|v| written.get(&key) == Some(&v))
    }

    pub fn mark_cleaned(&self, job: &BackupJob) {
        let key = job.uid().unwrap_or_else(|| job.name_any());
        self.polled.lock().expect("lock").remove(&key);
        self.written.lock().expect("lock").remove(&key);
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
        self.written.lock().expect("lock").retain(|k, _| of_live(k));
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
        // The version this process's last status write made, and only that, is its own.
        let mut at = job.clone();
        at.metadata.resource_version = Some("7".into());
        assert!(!c.is_own_last_write(&at));
        c.wrote(&at, "7".into());
        assert!(c.is_own_last_write(&at));
        c.wrote(&at, "8".into());
        assert!(!c.is_own_last_write(&at));
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

    /// A job of the fixture's SourceNode, with its own name and UID.
    fn job(name: &str, status: serde_json::Value) -> BackupJob {
        let mut j = BackupJob::test().named(name).with_status(status);
        j.metadata.uid = Some(format!("uid-{name}"));
        j
    }

    #[test]
    fn admitted_jobs_hold_their_slots_until_the_cache_shows_them_planned() {
        let sn = SourceNode::test();
        let new = json!({});
        let running = json!({"phase": "Running"});
        let jobs = vec![
            job("a", new.clone()),
            job("b", new.clone()),
            job("c", new.clone()),
            job("d", running),
        ];
        let c = Caches::with_jobs(Vec::new(), vec![sn.clone()], Vec::new(), jobs.clone());
        // Two slots (the closure stands for plan::slot_wait on an otherwise empty cache).
        let two = |n: usize| (n >= 2).then_some(n);
        let a = c.admit(&jobs[0], &sn, two).expect("a passes");
        let b = c.admit(&jobs[1], &sn, two).expect("b passes beside a");
        assert_eq!(
            c.admit(&jobs[2], &sn, two).err(),
            Some(2),
            "a and b hold both"
        );
        // A job asking again does not count itself.
        drop(
            c.admit(&jobs[0], &sn, |n| (n >= 2).then_some(n))
                .expect("a again"),
        );
        // `a` again dropped its place: b alone holds one.
        assert_eq!(c.admit(&jobs[2], &sn, Some).err(), Some(1));
        drop(a);
        // b waits for something else (its place goes); c passes and its plan is written.
        drop(b);
        let c_adm = c.admit(&jobs[2], &sn, two).expect("c passes");
        c_adm.planned();
        // Its plan is not in the cache (Pending there): it still holds its slot.
        assert_eq!(c.admit(&jobs[0], &sn, Some).err(), Some(1));
        // A job the cache shows planned holds none here (the cache counts it).
        let d = c.admit(&jobs[3], &sn, two).expect("d");
        d.planned();
        assert_eq!(c.admit(&jobs[0], &sn, Some).err(), Some(1), "c only");
        // Another SourceNode's jobs are not counted.
        let other = SourceNode::test().named("other");
        assert_eq!(c.admit(&jobs[1], &other, Some).err(), Some(0));
    }
}
