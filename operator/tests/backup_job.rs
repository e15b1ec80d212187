//! BackupJobs end to end on the real test bed: the local control plane, the node stand-in
//! running hub and agent pods as processes, the vCenter simulator with CBT, real qemu-nbd. All
//! input goes in through `kubectl apply`; every restore point is read back through its QCOW2
//! chain and compared with the simulator's checksum of the disk at the backup.
//!
//! The scenarios share the machine's network (the stand-in runs pods on the host), so they run
//! one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Api;
use kube::runtime::watcher;
use sendense_crds::backup_job::{CopyKind, Phase};
use sendense_crds::{BackupJob, Repository, SourceNode};
use sendense_e2e::standin::StandIn;
use sendense_e2e::vcsim::Simulator;
use sendense_e2e::{TestNamespace, client, install_crds, kubeconfig, kubectl_ok};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sendense-operator"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

fn sibling(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first (cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}

struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(ns: &str, metrics_port: u16, log: &Path) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_sendense-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("SENDENSE_WATCH_NAMESPACE", ns)
            .env("SENDENSE_PROBE_INTERVAL_SECONDS", "5")
            .env("SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS", "3600")
            .env("SENDENSE_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("SENDENSE_AGENT_IMAGE", "sendense-agent:e2e")
            .env("RUST_LOG", "info,sendense_operator=debug")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deletes a cluster-scoped PersistentVolume when the test ends.
struct Pv(String);
impl Drop for Pv {
    fn drop(&mut self) {
        let _ = sendense_e2e::kubectl(&["delete", "pv", &self.0, "--wait=false"]);
    }
}

/// One scenario's world: simulator, stand-in node, namespace, repository directory, operator.
struct Bed {
    sim: Simulator,
    standin: StandIn,
    ns: TestNamespace,
    repo_dir: PathBuf,
    work: PathBuf,
    operator: Option<Operator>,
    metrics_port: u16,
    _pv: Pv,
}

impl Bed {
    async fn start(vms: usize, ports: (i32, i32)) -> Result<Self> {
        install_crds()?;
        let sim = Simulator::start(&["-vms", &vms.to_string(), "-disk-size", "32MiB,16MiB"]);
        let standin = StandIn::start(&sibling("node-standin")?, &[bin_dir()], &[]).await?;
        let ns = TestNamespace::create("backup")?;
        let work = sim.dir.join("e2e");
        let repo_dir = work.join("repository");
        std::fs::create_dir_all(&repo_dir)?;
        let pv = Pv(format!("{}-repo", ns.name));
        let datastore = sim.info["datastores"]["LocalDS_0"]
            .as_str()
            .context("datastore dir")?
            .to_owned();
        let manifest = format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: vcenter-credentials, namespace: {ns}}}
stringData: {{username: "{user}", password: "{password}"}}
---
apiVersion: sendense.io/v1alpha1
kind: SourceNode
metadata: {{name: vc, namespace: {ns}}}
spec:
  vcenter:
    url: "{url}"
    credentialsSecretRef: {{name: vcenter-credentials}}
    tls: {{thumbprint: "{tp}"}}
  datacenter: DC0
  transport:
    type: nfs
    nfs:
      datastores: [{{name: LocalDS_0, hostPath: {{path: "{datastore}"}}}}]
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: 2Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {{path: "{repo}"}}
  claimRef: {{namespace: {ns}, name: backups}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: backups, namespace: {ns}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: {pv}
  resources: {{requests: {{storage: 2Gi}}}}
---
apiVersion: sendense.io/v1alpha1
kind: Repository
metadata: {{name: primary, namespace: {ns}}}
spec:
  storage: {{persistentVolumeClaim: {{claimName: backups}}}}
  hub: {{portRange: {{low: {low}, high: {high}}}}}
"#,
            ns = ns.name,
            user = sim.s("username"),
            password = sim.s("password"),
            url = sim.s("url"),
            tp = sim.s("thumbprint"),
            pv = pv.0,
            repo = repo_dir.display(),
            low = ports.0,
            high = ports.1,
        );
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut bed = Bed {
            sim,
            standin,
            ns,
            repo_dir,
            work,
            operator: None,
            metrics_port,
            _pv: pv,
        };
        bed.apply("setup", &manifest)?;
        bed.start_operator()?;
        Ok(bed)
    }

    fn start_operator(&mut self) -> Result<()> {
        self.operator = Some(Operator::start(
            &self.ns.name,
            self.metrics_port,
            &self.work.join("operator.log"),
        )?);
        Ok(())
    }

    fn stop_operator(&mut self) {
        self.operator = None;
    }

    fn apply(&self, name: &str, yaml: &str) -> Result<String> {
        let file = self.work.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        kubectl_ok(&[
            "apply",
            "-n",
            &self.ns.name,
            "-f",
            file.to_str().context("path")?,
        ])
    }

    fn job_yaml(name: &str, vm: &str, mode: &str, extra: &str) -> String {
        format!(
            "apiVersion: sendense.io/v1alpha1\nkind: BackupJob\nmetadata: {{name: {name}}}\nspec:\n  vm: {{name: {vm}}}\n  sourceNodeRef: {{name: vc}}\n  repositoryRef: {{name: primary}}\n  mode: {mode}\n{extra}"
        )
    }

    fn diagnostics(&self) -> String {
        format!(
            "\n=== operator log\n{}\n=== pod logs\n{}\n=== jobs\n{}",
            self.operator
                .as_ref()
                .map(|o| o.log_tail())
                .unwrap_or_default(),
            self.standin.logs(),
            kubectl_ok(&["get", "backupjobs", "-n", &self.ns.name, "-o", "yaml"])
                .unwrap_or_default()
        )
    }

    async fn jobs(&self) -> Result<Api<BackupJob>> {
        Ok(Api::namespaced(client().await?, &self.ns.name))
    }

    /// Waits for a job to reach a final phase; fails on the wrong one.
    async fn finished(&self, name: &str, want: Phase, within: Duration) -> Result<BackupJob> {
        let jobs = self.jobs().await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let j = jobs.get(name).await?;
            let phase = j.status.as_ref().and_then(|s| s.phase);
            if phase == Some(want) {
                return Ok(j);
            }
            if matches!(phase, Some(Phase::Succeeded | Phase::Failed)) {
                bail!(
                    "job {name} ended {phase:?}, expected {want:?}: {:?}{}",
                    j.status.as_ref().map(|s| &s.conditions),
                    self.diagnostics()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "job {name} not {want:?} within {within:?}: {:?}{}",
                    j.status.as_ref().map(|s| &s.conditions),
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits for the job's Running condition to carry `reason`; returns its message.
    async fn waiting(&self, name: &str, reason: &str) -> Result<String> {
        let jobs = self.jobs().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let j = jobs.get(name).await?;
            let c = j
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Running").cloned());
            if let Some(c) = &c
                && c.reason == reason
                && c.status == "False"
            {
                assert_eq!(
                    j.status.as_ref().and_then(|s| s.phase),
                    Some(Phase::Pending)
                );
                return Ok(c.message.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "job {name}: Running never became False/{reason}; last {c:?}{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn ready<K>(&self, name: &str) -> Result<()>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + HasConditions,
        <K as kube::Resource>::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(client().await?, &self.ns.name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let o = api.get(name).await?;
            if o.ready() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} never Ready: {o:?}{}", self.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn guest(&self, args: &[&str]) {
        self.sim.cli(args);
    }

    fn checksum(&self, vm: &str, disk: i32) -> String {
        self.sim
            .cli(&["checksum", "-vm", vm, "-disk", &disk.to_string()])["sha256"]
            .as_str()
            .expect("sha256")
            .to_owned()
    }

    fn snapshots(&self, vm: &str) -> usize {
        self.sim
            .cli(&["snapshots", "-vm", vm])
            .as_array()
            .map_or(0, |a| a.len())
    }

    /// Reads a restore point through its QCOW2 chain and compares it with `sha256`.
    fn verify(&self, file: &str, sha256: &str) -> Result<()> {
        let path = self.repo_dir.join(file);
        let out = Command::new(sibling("sendense-agent")?)
            .args(["verify", "--file"])
            .arg(&path)
            .args(["--sha256", sha256])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "restore point {} differs from the source: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    async fn pods_of_jobs(&self) -> Result<Vec<String>> {
        let pods: Api<Pod> = Api::namespaced(client().await?, &self.ns.name);
        Ok(pods
            .list(&kube::api::ListParams::default().labels("sendense.io/backupjob"))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect())
    }

    async fn no_pods_remain(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = self.pods_of_jobs().await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("pods remain: {left:?}{}", self.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn metrics(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
        Ok(body)
    }
}

trait HasConditions {
    fn ready(&self) -> bool;
}
impl HasConditions for SourceNode {
    fn ready(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| sendense_crds::conditions::is_true(&s.conditions, "Ready"))
    }
}
impl HasConditions for Repository {
    fn ready(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| sendense_crds::conditions::is_true(&s.conditions, "Ready"))
    }
}

/// Records every pod (name -> UIDs) the namespace ever had while the test runs.
fn record_pods(ns: &str) -> Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::<String, BTreeSet<String>>::new()));
    let out = seen.clone();
    let ns = ns.to_owned();
    tokio::spawn(async move {
        let Ok(c) = client().await else { return };
        let pods: Api<Pod> = Api::namespaced(c, &ns);
        let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            let list = match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
                _ => continue,
            };
            let mut s = out.lock().unwrap_or_else(|e| e.into_inner());
            for p in list {
                if let (Some(n), Some(u)) = (p.metadata.name, p.metadata.uid) {
                    s.entry(n).or_default().insert(u);
                }
            }
        }
    });
    seen
}

fn disk_file(j: &BackupJob, key: i32) -> String {
    j.status
        .as_ref()
        .and_then(|s| s.disks.iter().find(|d| d.device_key == key))
        .and_then(|d| d.file.clone())
        .unwrap_or_else(|| panic!("job {:?} has no file for disk {key}", j.metadata.name))
}

#[tokio::test]
async fn a_full_then_an_incremental_backup_restore_byte_identical() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10300, 10320)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let vm = "cbt-vm-0";

    bed.guest(&[
        "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "1", "-count", "200",
        "-size", "64K",
    ]);
    bed.guest(&[
        "fill",
        "-vm",
        vm,
        "-disk",
        "2001",
        "-pattern",
        "sequential",
        "-seed",
        "2",
        "-count",
        "8",
        "-size",
        "1M",
        "-offset",
        "4M",
    ]);
    bed.apply("full", &Bed::job_yaml("web-full", vm, "full", ""))?;
    let full = bed
        .finished("web-full", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    let full_sums = [bed.checksum(vm, 2000), bed.checksum(vm, 2001)];

    bed.guest(&[
        "fill",
        "-vm",
        vm,
        "-disk",
        "2000",
        "-pattern",
        "fragmented",
        "-seed",
        "3",
        "-count",
        "100",
        "-size",
        "4K",
        "-offset",
        "1M",
    ]);
    bed.guest(&[
        "zero", "-vm", vm, "-disk", "2001", "-offset", "5M", "-length", "2M",
    ]);
    bed.apply("incr", &Bed::job_yaml("web-incr", vm, "auto", ""))?;
    let incr = bed
        .finished("web-incr", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    let incr_sums = [bed.checksum(vm, 2000), bed.checksum(vm, 2001)];
    bed.no_pods_remain().await?;

    let fs = full.status.clone().expect("status");
    let is = incr.status.clone().expect("status");
    assert!(
        fs.disks.iter().all(|d| d.copy == Some(CopyKind::Full)),
        "{fs:?}"
    );
    assert!(
        is.disks
            .iter()
            .all(|d| d.copy == Some(CopyKind::Incremental)),
        "{is:?}"
    );
    assert_eq!(is.chain_parent.as_deref(), Some("web-full"));
    for (f, i) in fs.disks.iter().zip(is.disks.iter()) {
        assert_eq!(
            i.backing_file, f.file,
            "the incremental is layered on the full"
        );
        assert_eq!(
            i.change_id_used, f.change_id_reached,
            "it starts where the full ended"
        );
        assert!(i.change_id_reached.is_some() && i.change_id_reached != f.change_id_reached);
    }
    assert!(
        is.bytes_copied.unwrap_or(0) < fs.bytes_copied.unwrap_or(0),
        "the incremental copies less: {:?} vs {:?}",
        is.bytes_copied,
        fs.bytes_copied
    );
    assert!(fs.snapshot.as_ref().is_some_and(|s| s.removed));
    for (n, key) in [2000, 2001].into_iter().enumerate() {
        bed.verify(&disk_file(&full, key), &full_sums[n])?;
        bed.verify(&disk_file(&incr, key), &incr_sums[n])?;
    }
    assert_ne!(full_sums, incr_sums, "the guest's writes changed the disks");

    let table = kubectl_ok(&["get", "backupjobs", "-n", &bed.ns.name])?;
    for line in ["web-full", "web-incr"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(line))
            .with_context(|| format!("{line} in\n{table}"))?;
        assert!(
            row.contains("Succeeded") && row.contains("100%") && row.contains("iB"),
            "{row}"
        );
    }
    bed.no_pods_remain().await?;
    assert_eq!(bed.snapshots(vm), 0, "no snapshot left on the VM");
    let repos: Api<Repository> = Api::namespaced(client().await?, &bed.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while repos
        .get("primary")
        .await?
        .status
        .and_then(|s| s.restore_points)
        != Some(2)
    {
        if tokio::time::Instant::now() > deadline {
            bail!("Repository never counted 2 restore points");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = bed.metrics().await?;
    assert!(
        m.contains("sendense_backups_total{result=\"succeeded\"} 2"),
        "{m}"
    );
    assert!(m.contains("sendense_backup_bytes_copied_total{"), "{m}");
    Ok(())
}

#[tokio::test]
async fn five_jobs_at_once_survive_an_operator_restart() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start(5, (10400, 10420)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let pods = record_pods(&bed.ns.name);
    let vms: Vec<String> = (0..5).map(|i| format!("cbt-vm-{i}")).collect();
    let mut manifest = String::new();
    for (i, vm) in vms.iter().enumerate() {
        bed.guest(&[
            "fill",
            "-vm",
            vm,
            "-disk",
            "2000",
            "-pattern",
            "random",
            "-seed",
            &(10 + i).to_string(),
            "-count",
            "50",
            "-size",
            "64K",
        ]);
        manifest.push_str(&Bed::job_yaml(&format!("job-{i}"), vm, "auto", ""));
        manifest.push_str("---\n");
    }
    bed.apply("five", &manifest)?;

    // Restart the operator while the jobs are under way.
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let running = jobs
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running))
            .count();
        if running >= 3 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("jobs never started running{}", bed.diagnostics());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bed.stop_operator();
    tokio::time::sleep(Duration::from_secs(2)).await;
    bed.start_operator()?;

    let mut all_ports = Vec::new();
    let mut done = Vec::new();
    for i in 0..vms.len() {
        let j = bed
            .finished(
                &format!("job-{i}"),
                Phase::Succeeded,
                Duration::from_secs(300),
            )
            .await?;
        let st = j.status.clone().expect("status");
        assert_eq!(st.attempts, Some(1), "job-{i} needed no retry");
        all_ports.extend(st.disks.iter().filter_map(|d| d.port));
        done.push(j);
    }
    let distinct: BTreeSet<i32> = all_ports.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        10,
        "ten disks, ten distinct ports: {all_ports:?}"
    );
    assert!(distinct.iter().all(|p| (10400..=10420).contains(p)));
    // The hubs are gone (their qemu-nbd no longer holds the files): read every restore point.
    bed.no_pods_remain().await?;
    for (j, vm) in done.iter().zip(&vms) {
        for key in [2000, 2001] {
            bed.verify(&disk_file(j, key), &bed.checksum(vm, key))?;
        }
        assert_eq!(bed.snapshots(vm), 0);
    }
    let seen = pods.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let jobs_pods: Vec<_> = seen.iter().filter(|(n, _)| n.starts_with("job-")).collect();
    assert_eq!(
        jobs_pods.len(),
        10,
        "one hub and one agent per job: {seen:?}"
    );
    for (name, uids) in jobs_pods {
        assert_eq!(
            uids.len(),
            1,
            "pod {name} was created more than once: {uids:?}"
        );
    }
    Ok(())
}

async fn events_of(ns: &str, object: &str) -> Result<Vec<(String, String)>> {
    let events: Api<Event> = Api::namespaced(client().await?, ns);
    Ok(events
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(object))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect())
}

#[tokio::test]
async fn jobs_that_cannot_run_say_why_and_start_no_pods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10500, 10520)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let pods = record_pods(&bed.ns.name);
    let ns = &bed.ns.name;
    bed.apply(
        "broken",
        &format!(
            r#"apiVersion: sendense.io/v1alpha1
kind: SourceNode
metadata: {{name: no-secret}}
spec:
  vcenter: {{url: "{url}", credentialsSecretRef: {{name: late-credentials}}, tls: {{thumbprint: "{tp}"}}}}
  datacenter: DC0
  transport: {{type: nfs, nfs: {{datastores: [{{name: LocalDS_0, hostPath: {{path: "{ds}"}}}}]}}}}
---
apiVersion: sendense.io/v1alpha1
kind: Repository
metadata: {{name: no-claim}}
spec: {{storage: {{persistentVolumeClaim: {{claimName: missing-claim}}}}}}
---
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {{name: needs-secret}}
spec: {{vm: {{name: cbt-vm-0}}, sourceNodeRef: {{name: no-secret}}, repositoryRef: {{name: primary}}}}
---
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {{name: unknown-vm}}
spec: {{vm: {{name: no-such-vm}}, sourceNodeRef: {{name: vc}}, repositoryRef: {{name: primary}}}}
---
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {{name: repo-not-ready}}
spec: {{vm: {{name: cbt-vm-0}}, sourceNodeRef: {{name: vc}}, repositoryRef: {{name: no-claim}}}}
"#,
            url = bed.sim.s("url"),
            tp = bed.sim.s("thumbprint"),
            ds = bed.sim.info["datastores"]["LocalDS_0"]
                .as_str()
                .context("datastore")?,
        ),
    )?;
    let m = bed.waiting("needs-secret", "SourceNodeNotReady").await?;
    assert!(
        m.contains("SecretNotFound") && m.contains("late-credentials"),
        "{m}"
    );
    let m = bed.waiting("unknown-vm", "VMNotFound").await?;
    assert!(m.contains("no-such-vm") && m.contains("spec.vm"), "{m}");
    let m = bed.waiting("repo-not-ready", "RepositoryNotReady").await?;
    assert!(
        m.contains("ClaimNotFound") && m.contains("missing-claim"),
        "{m}"
    );
    for (job, reason) in [
        ("needs-secret", "SourceNodeNotReady"),
        ("unknown-vm", "VMNotFound"),
        ("repo-not-ready", "RepositoryNotReady"),
    ] {
        let ev = events_of(ns, job).await?;
        assert!(
            ev.contains(&("Warning".into(), reason.into())),
            "{job}: events {ev:?}"
        );
    }
    // Nothing churns while they wait.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(bed.pods_of_jobs().await?.is_empty());
    for job in ["needs-secret", "unknown-vm", "repo-not-ready"] {
        let ev = events_of(ns, job).await?;
        let warnings = ev.iter().filter(|(t, _)| t == "Warning").count();
        assert_eq!(warnings, 1, "{job}: one Warning, not a storm: {ev:?}");
    }
    {
        let seen = pods.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            seen.keys().all(|n| n.ends_with("-probe")),
            "only the repository probe ran: {seen:?}"
        );
    }

    // Fixing the cause is enough: the Secret appears, the SourceNode turns Ready, the job runs.
    bed.apply(
        "secret",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: late-credentials}}\nstringData: {{username: \"{}\", password: \"{}\"}}\n",
            bed.sim.s("username"),
            bed.sim.s("password")
        ),
    )?;
    let j = bed
        .finished("needs-secret", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    bed.no_pods_remain().await?;
    bed.verify(&disk_file(&j, 2000), &bed.checksum("cbt-vm-0", 2000))?;
    Ok(())
}

#[tokio::test]
async fn a_job_failing_every_attempt_ends_failed_and_leaves_nothing_behind() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10550, 10570)).await?;
    let empty = bed.work.join("empty-datastore");
    std::fs::create_dir_all(&empty)?;
    // A datastore mount without the VM's disk files: every attempt's copy fails after the
    // snapshot exists, the worst place to fail.
    bed.apply(
        "failing",
        &format!(
            r#"apiVersion: sendense.io/v1alpha1
kind: SourceNode
metadata: {{name: wrong-datastore}}
spec:
  vcenter: {{url: "{url}", credentialsSecretRef: {{name: vcenter-credentials}}, tls: {{thumbprint: "{tp}"}}}}
  datacenter: DC0
  transport: {{type: nfs, nfs: {{datastores: [{{name: LocalDS_0, hostPath: {{path: "{empty}"}}}}]}}}}
---
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {{name: doomed}}
spec: {{vm: {{name: cbt-vm-0}}, sourceNodeRef: {{name: wrong-datastore}}, repositoryRef: {{name: primary}}, retryLimit: 1}}
"#,
            url = bed.sim.s("url"),
            tp = bed.sim.s("thumbprint"),
            empty = empty.display(),
        ),
    )?;
    let j = bed
        .finished("doomed", Phase::Failed, Duration::from_secs(180))
        .await?;
    let st = j.status.clone().expect("status");
    assert_eq!(st.attempts, Some(2), "retryLimit 1: two attempts");
    let cond = |t: &str| {
        st.conditions
            .iter()
            .find(|c| c.type_ == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} condition: {:?}", st.conditions))
    };
    let failed = cond("Failed");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "CopyFailed")
    );
    assert!(
        failed.message.contains("after 2 attempt"),
        "{}",
        failed.message
    );
    assert_eq!(cond("SnapshotRemoved").status, "True");
    assert_eq!(bed.snapshots("cbt-vm-0"), 0, "no snapshot left");
    // The operator removes the partial QCOW2 files with a short cleanup pod.
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let st = jobs.get("doomed").await?.status.unwrap_or_default();
        let removed = st
            .conditions
            .iter()
            .find(|c| c.type_ == "PartialFilesRemoved")
            .cloned();
        if removed.as_ref().is_some_and(|c| c.status == "True") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "partial files never removed: {removed:?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for d in &st.disks {
        let f = bed.repo_dir.join(d.file.as_deref().unwrap_or_default());
        assert!(!f.exists(), "{} still exists", f.display());
    }
    bed.no_pods_remain().await?;
    let m = bed.metrics().await?;
    assert!(
        m.contains("sendense_backups_total{result=\"failed\"} 1"),
        "{m}"
    );
    let ev = events_of(&bed.ns.name, "doomed").await?;
    assert!(
        ev.contains(&("Warning".into(), "Retrying".into())),
        "{ev:?}"
    );
    assert!(
        ev.contains(&("Warning".into(), "CopyFailed".into())),
        "{ev:?}"
    );
    Ok(())
}
