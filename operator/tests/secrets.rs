//! Secrets stay secret: after a failed login (a wrong password), a Secret whose keys are swapped
//! (the password used as the user name) and a successful backup (NBD over TLS), no user name,
//! password or private key shows on any surface a user or an administrator can read: the
//! namespace's objects and their status (Secrets aside), its Events, the operator's log at
//! trace level, every pod's spec (command, args, env values) and status (termination
//! messages), and every container's log, the sendense-agent ones at trace level.
//!
//! The credentials are random per run, so a match cannot be an accident; the grep is shown to
//! find them (and a private key) in the Secrets themselves, and every collector to have
//! collected what it should, so a broken collector cannot pass silently.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Seek as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use sendense_crds::SourceNode;
use sendense_crds::backup_job::Phase;
use sendense_e2e::{client, kubectl_ok};

mod support;
use support::{Bed, LAB_DATASTORE, SERIAL, pod_logs_dir};

/// 24 random hex digits.
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `text` as a Secret's data shows it (base64).
fn base64(text: &str) -> Result<String> {
    let v = serde_json::to_value(k8s_openapi::ByteString(text.as_bytes().to_vec()))?;
    v.as_str().map(str::to_owned).context("base64")
}

/// What must never show, by name.
struct Needles(Vec<(String, String)>);

impl Needles {
    fn new(credentials: &[(&str, &str)]) -> Result<Self> {
        let mut all = Vec::new();
        for (name, value) in credentials {
            all.push((name.to_string(), value.to_string()));
            all.push((format!("{name} (base64)"), base64(value)?));
        }
        all.push(("a private key".into(), "PRIVATE KEY".into()));
        Ok(Self(all))
    }

    /// Every line of every surface holding a needle: "surface: what: line".
    fn find(&self, surfaces: &[(String, String)]) -> Vec<String> {
        let mut found = Vec::new();
        for (surface, text) in surfaces {
            for line in text.lines() {
                for (what, needle) in &self.0 {
                    if line.contains(needle.as_str()) {
                        let line: String = line.chars().take(400).collect();
                        found.push(format!("{surface}: {what}: {line}"));
                    }
                }
            }
        }
        found
    }
}

/// A container log file of the namespace, kept open from the moment it appeared: the kubelet
/// deletes it with its pod, which the operator deletes as soon as the pod has done its work;
/// an open file keeps its content readable.
struct OpenLog {
    /// Relative to the pod logs directory: `<ns>_<pod>_<uid>/<container>/<restart>.log`.
    path: PathBuf,
    file: std::fs::File,
}

/// Watches the namespace from before the operator starts: every version of every pod (spec,
/// and status with its termination messages) and every container log, as they appear.
struct Collector {
    ns: String,
    pods: Arc<Mutex<BTreeMap<String, Pod>>>,
    logs: Arc<Mutex<Vec<OpenLog>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How often the node's log directory is read: a container's log outlives the container by
/// at least the kubelet's status report and the operator's reaction to it (seconds).
const LOG_SCAN: Duration = Duration::from_millis(50);

impl Collector {
    async fn start(ns: &str) -> Result<Self> {
        let pods = Arc::new(Mutex::new(BTreeMap::<String, Pod>::new()));
        let seen = pods.clone();
        let api: Api<Pod> = Api::namespaced(client().await?, ns);
        let watch = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                let pod = match ev {
                    Ok(
                        watcher::Event::Apply(p)
                        | watcher::Event::InitApply(p)
                        | watcher::Event::Delete(p),
                    ) => p,
                    _ => continue,
                };
                if let Some(uid) = pod.metadata.uid.clone() {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(uid, pod);
                }
            }
        });

        let logs = Arc::new(Mutex::new(Vec::<OpenLog>::new()));
        let opened = logs.clone();
        let prefix = format!("{ns}_");
        let scan = tokio::spawn(async move {
            let root = pod_logs_dir();
            let mut inodes = BTreeSet::<(u64, u64)>::new();
            loop {
                let pod_dirs = std::fs::read_dir(&root).into_iter().flatten().flatten();
                for pod in pod_dirs.filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                {
                    for container in std::fs::read_dir(pod.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        for log in std::fs::read_dir(container.path())
                            .into_iter()
                            .flatten()
                            .flatten()
                        {
                            let path = log.path();
                            let Ok(file) = std::fs::File::open(&path) else {
                                continue;
                            };
                            let Ok(meta) = file.metadata() else { continue };
                            // A rotated log is a new file under the same name.
                            if inodes.insert((meta.dev(), meta.ino())) {
                                let path = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
                                opened
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(OpenLog { path, file });
                            }
                        }
                    }
                }
                tokio::time::sleep(LOG_SCAN).await;
            }
        });
        Ok(Self {
            ns: ns.to_owned(),
            pods,
            logs,
            tasks: vec![watch, scan],
        })
    }

    /// The log of every container that ran in the namespace so far, by path.
    fn container_logs(&self) -> Result<Vec<(String, String)>> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for l in logs.iter_mut() {
            let mut text = String::new();
            l.file.rewind()?;
            l.file.read_to_string(&mut text)?;
            out.push((format!("log {}", l.path.display()), text));
        }
        Ok(out)
    }

    /// Every container that was created has its log among the collected ones.
    fn check_every_log_collected(&self) -> Result<()> {
        let collected: BTreeSet<PathBuf> = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| l.path.clone())
            .collect();
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut missing = Vec::new();
        for (uid, pod) in pods.iter() {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.clone().unwrap_or_default();
            let containers = status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten());
            for c in containers.filter(|c| c.container_id.is_some()) {
                let path = PathBuf::from(format!("{}_{name}_{uid}", self.ns))
                    .join(&c.name)
                    .join(format!("{}.log", c.restart_count));
                if !collected.contains(&path) {
                    missing.push(path);
                }
            }
        }
        if !missing.is_empty() {
            bail!("the collector missed container logs: {missing:?} (collected: {collected:?})");
        }
        Ok(())
    }

    /// The termination messages of pod `name`'s containers, as last seen.
    fn termination_message(&self, name: &str) -> String {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.values()
            .filter(|p| p.metadata.name.as_deref() == Some(name))
            .flat_map(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
            })
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every pod as last seen (deleted ones too), spec and status.
    fn pod_records(&self) -> Result<Vec<(String, String)>> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.values()
            .map(|p| {
                Ok((
                    format!("pod {}", p.metadata.name.clone().unwrap_or_default()),
                    serde_json::to_string_pretty(p)?,
                ))
            })
            .collect()
    }
}

/// Every surface: the namespace's objects (Secrets aside) and Events, the operator's log and
/// metrics, every pod's spec and status, every container's log.
async fn surfaces(bed: &Bed, collector: &Collector) -> Result<Vec<(String, String)>> {
    let ns = bed.ns.name.as_str();
    let mut out = Vec::new();
    for kind in ["sourcenodes", "repositories", "backupjobs", "restorepoints"] {
        out.push((
            format!("{kind} (yaml)"),
            kubectl_ok(&["get", kind, "-n", ns, "-o", "yaml"])?,
        ));
    }
    // Whatever else lives in the namespace (pods, Services, Leases, ConfigMaps, claims...).
    let kinds = kubectl_ok(&[
        "api-resources",
        "--verbs=list",
        "--namespaced",
        "-o",
        "name",
    ])?;
    let others: Vec<&str> = kinds
        .lines()
        .map(str::trim)
        .filter(|k| !k.is_empty() && *k != "secrets")
        .collect();
    out.push((
        "every other object of the namespace (yaml)".into(),
        kubectl_ok(&["get", &others.join(","), "-n", ns, "-o", "yaml"])?,
    ));
    out.push((
        "events (yaml)".into(),
        kubectl_ok(&["get", "events", "-n", ns, "-o", "yaml"])?,
    ));
    out.push((
        "operator log".into(),
        std::fs::read_to_string(bed.work.join("operator.log"))?,
    ));
    out.push(("operator metrics".into(), bed.metrics().await?));
    out.extend(collector.pod_records()?);
    out.extend(collector.container_logs()?);
    Ok(out)
}

/// Collects every surface and fails on any needle found; returns the surfaces.
async fn grep_every_surface(
    bed: &Bed,
    collector: &Collector,
    needles: &Needles,
    after: &str,
) -> Result<Vec<(String, String)>> {
    collector.check_every_log_collected()?;
    let all = surfaces(bed, collector).await?;
    let found = needles.find(&all);
    if !found.is_empty() {
        bail!(
            "after {after}, a credential or key shows on {} line(s):\n{}",
            found.len(),
            found.join("\n")
        );
    }
    eprintln!(
        "after {after}: {} surfaces, {} bytes, clean",
        all.len(),
        all.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
    Ok(all)
}

/// The text of the surfaces whose name starts with `prefix`.
fn text_of(all: &[(String, String)], prefix: &str) -> String {
    all.iter()
        .filter(|(s, _)| s.starts_with(prefix))
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits for the SourceNode's Ready condition to be False with `reason`.
async fn not_ready(bed: &Bed, name: &str, reason: &str) -> Result<String> {
    let api: Api<SourceNode> = Api::namespaced(client().await?, &bed.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let sn = api.get(name).await?;
        let ready = sn
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
        if let Some(c) = &ready
            && c.status == "False"
            && c.reason == reason
        {
            return Ok(c.message.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "SourceNode {name} never Ready=False/{reason}: {ready:?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn job_yaml(name: &str, source: &str, vm: &str) -> String {
    format!(
        "apiVersion: sendense.io/v1alpha1\nkind: BackupJob\nmetadata: {{name: {name}}}\nspec:\n  vm: {{name: {vm}}}\n  sourceNodeRef: {{name: {source}}}\n  repositoryRef: {{name: primary}}\n  mode: full\n"
    )
}

fn secret_yaml(name: &str, username: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {{username: \"{username}\", password: \"{password}\"}}\n"
    )
}

#[tokio::test]
async fn no_credential_or_key_shows_after_a_failed_login_a_swapped_secret_and_a_backup()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (user, password, wrong) = (random_hex()?, random_hex()?, random_hex()?);
    let needles = Needles::new(&[
        ("the user name", &user),
        ("the password", &password),
        ("the wrong password", &wrong),
    ])?;
    let mut bed = Bed::start_without_operator_with_simulator_flags(
        1,
        (11300, 11320),
        &["-username", &user, "-password", &password],
    )
    .await?;
    assert_eq!(bed.sim.s("username"), user, "the simulator's user");
    let collector = Collector::start(&bed.ns.name).await?;
    bed.start_operator_with(&[("RUST_LOG", "trace"), ("SENDENSE_POD_LOG", "trace")])?;
    bed.ready::<SourceNode>("vc").await?;
    let vm = "cbt-vm-0";

    // (a) A wrong password: the SourceNode says the login failed, a job waits for it.
    bed.apply(
        "wrong-password",
        &format!(
            "{}---\n{}---\n{}",
            secret_yaml("wrong-password", &user, &wrong),
            bed.source_node_yaml("wrong-password", "wrong-password", LAB_DATASTORE),
            job_yaml("wrong-password", "wrong-password", vm)
        ),
    )?;
    let why = not_ready(&bed, "wrong-password", "LoginFailed").await?;
    assert!(why.contains("rejected"), "{why}");
    bed.waiting("wrong-password", "SourceNodeNotReady").await?;
    grep_every_surface(&bed, &collector, &needles, "a wrong password").await?;

    // (b) The Secret's keys swapped in the SourceNode: the password goes out as the user name.
    let swapped = bed
        .source_node_yaml("swapped", "swapped", LAB_DATASTORE)
        .replace(
            "credentialsSecretRef: {name: swapped}",
            "credentialsSecretRef: {name: swapped, usernameKey: password, passwordKey: username}",
        );
    assert!(swapped.contains("usernameKey: password"), "{swapped}");
    bed.apply(
        "swapped",
        &format!(
            "{}---\n{}---\n{}",
            secret_yaml("swapped", &user, &password),
            swapped,
            job_yaml("swapped", "swapped", vm)
        ),
    )?;
    let why = not_ready(&bed, "swapped", "LoginFailed").await?;
    assert!(why.contains("rejected"), "{why}");
    bed.waiting("swapped", "SourceNodeNotReady").await?;
    grep_every_surface(&bed, &collector, &needles, "a swapped-key Secret").await?;

    // (c) A full backup over NBD with TLS: hub (serving, then committing) and agent pods; the
    // repository probe ran.
    bed.ready::<sendense_crds::Repository>("primary").await?;
    bed.apply("full-backup", &job_yaml("full-backup", "vc", vm))?;
    bed.finished("full-backup", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    bed.no_pods_remain().await?;
    let all = grep_every_surface(&bed, &collector, &needles, "a successful backup").await?;

    // The collectors collected: the grep ran over real text, not empty surfaces.
    let operator = text_of(&all, "operator log");
    assert!(
        operator.contains("TRACE"),
        "the operator ran at trace level"
    );
    assert!(
        operator.contains("full-backup"),
        "the operator's log names the job"
    );
    let pods = text_of(&all, "pod ");
    for (what, want) in [
        ("the agent's spec", "--credentials-dir"),
        ("the hub's spec", "--commit-request"),
        ("a pod log level", "\"RUST_LOG\""),
    ] {
        assert!(pods.contains(want), "{what} ({want}) is not among the pods");
    }
    for component in ["agent", "hub", "repository-probe"] {
        assert!(
            pods.contains(&format!("\"app.kubernetes.io/component\": \"{component}\"")),
            "no {component} pod was recorded"
        );
    }
    let result = collector.termination_message("full-backup-agent");
    assert!(
        result.contains("changeId") || result.contains("change_id"),
        "the agent's termination message (its result) was recorded: {result:?}"
    );
    let logs = text_of(&all, "log ");
    assert!(
        all.iter()
            .any(|(s, t)| s.contains("full-backup-agent") && t.contains("TRACE")),
        "no agent log at trace level among {:?}",
        all.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    assert!(logs.contains(vm), "the container logs name the VM");
    let events = text_of(&all, "events");
    assert!(
        events.contains("wrong-password")
            && events.contains("swapped")
            && events.contains("full-backup"),
        "Events of all three scenarios"
    );
    let objects = text_of(&all, "sourcenodes");
    assert!(objects.contains("LoginFailed"), "{objects}");

    // The grep finds what it looks for where it must be: in the Secrets, raw and decoded.
    let raw = kubectl_ok(&[
        "get",
        "secrets",
        "vcenter-credentials",
        "wrong-password",
        "sendense-nbd-ca",
        "-n",
        &bed.ns.name,
        "-o",
        "json",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&raw)?;
    let mut decoded = String::new();
    for item in list["items"].as_array().context("items")? {
        let data: BTreeMap<String, k8s_openapi::ByteString> =
            serde_json::from_value(item["data"].clone())?;
        for v in data.values() {
            decoded += &String::from_utf8_lossy(&v.0);
            decoded += "\n";
        }
    }
    let found = needles.find(&[
        ("Secrets".into(), raw),
        ("Secrets, decoded".into(), decoded),
    ]);
    for want in [
        "Secrets: the user name (base64)",
        "Secrets: the password (base64)",
        "Secrets: the wrong password (base64)",
        "Secrets, decoded: the user name: ",
        "Secrets, decoded: the password: ",
        "Secrets, decoded: the wrong password: ",
        "Secrets, decoded: a private key: ",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(want)),
            "the grep does not find {want:?} in the Secrets"
        );
    }
    Ok(())
}
