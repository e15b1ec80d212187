//! The test bed of the operator's end-to-end tests: the vCenter simulator, the real node
//! (kubelet, containerd; e2e/cluster/node-up.sh) running every pod the operator creates as a
//! container of the agent image, a namespace with a SourceNode, a repository volume (a `local`
//! PersistentVolume on the node, owned by the pods through fsGroup) and a Repository, and
//! (optionally) the operator as a local process.
#![allow(dead_code)]

pub mod faults;
pub mod rbac;

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
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};
use sendense_e2e::real_node::RealNode;
use sendense_e2e::vcsim::{DATASTORE_USER, Simulator};
use sendense_e2e::{
    TestNamespace, bound_metrics_port, client, install_crds, kubeconfig, kubectl_ok,
};

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The datastore volume (allowed by the bed's operator settings) holding the simulator's disks.
pub const LAB_DATASTORE: &str = "lab-datastore";
/// An allowed datastore volume that is an empty directory: no disk file is found on it.
pub const EMPTY_DATASTORE: &str = "empty-datastore";

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sendense-operator"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

pub fn sibling(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first (cargo build --workspace)",
            p.display()
        );
    }
    Ok(p)
}

pub struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    /// Starts the operator; its metrics port is chosen by the kernel and read from its log.
    pub fn start(ns: &str, log: &Path, env: &[(&str, &str)]) -> Result<(Self, u16)> {
        let earlier = std::fs::metadata(log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_sendense-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("SENDENSE_WATCH_NAMESPACE", ns)
            .env("SENDENSE_PROBE_INTERVAL_SECONDS", "5")
            .env("SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS", "3600")
            .env("SENDENSE_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info,sendense_operator=debug")
            .envs(env.iter().copied())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let mut operator = Self {
            child,
            log: log.to_path_buf(),
        };
        let port = bound_metrics_port(&mut operator.child, log, earlier, Duration::from_secs(60))?;
        Ok((operator, port))
    }

    pub fn log_tail(&self) -> String {
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
pub struct Pv(pub String);
impl Drop for Pv {
    fn drop(&mut self) {
        let ds = format!("{}-ds", self.0);
        let _ = sendense_e2e::kubectl(&[
            "delete",
            "pv",
            &self.0,
            &ds,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// One scenario's world: simulator, real node, namespace, repository directory, operator.
pub struct Bed {
    pub sim: Simulator,
    pub node: RealNode,
    pub ns: TestNamespace,
    pub repo_dir: PathBuf,
    pub work: PathBuf,
    pub operator: Option<Operator>,
    pub metrics_port: u16,
    pv: Pv,
}

impl Bed {
    /// The bed with the operator running as a local process (admin kubeconfig).
    pub async fn start(vms: usize, ports: (i32, i32)) -> Result<Self> {
        let mut bed = Self::start_without_operator(vms, ports).await?;
        bed.start_operator()?;
        Ok(bed)
    }

    /// The bed alone. The agent image (ghcr.io/sendense/sendense-agent:<appVersion>, or
    /// $SENDENSE_AGENT_IMAGE) must be loaded into the node: e2e/run-tests.sh does.
    pub async fn start_without_operator(vms: usize, ports: (i32, i32)) -> Result<Self> {
        Self::start_in(vms, ports, false, DATASTORE_USER).await
    }

    /// The bed (operator running) with the datastore's files owned by `owner`, not by the agent
    /// image's user: the SourceNode must name who reads them (`transport.nfs.readAs`).
    pub async fn start_with_datastore_owner(
        vms: usize,
        ports: (i32, i32),
        owner: u32,
    ) -> Result<Self> {
        let mut bed = Self::start_in(vms, ports, false, owner).await?;
        bed.start_operator()?;
        Ok(bed)
    }

    /// The bed in a namespace that enforces the `restricted` Pod Security Standard: the
    /// datastore reaches the agent through a claim (a pod's hostPath volume is not admitted
    /// there; a PersistentVolume's is).
    pub async fn start_restricted(vms: usize, ports: (i32, i32)) -> Result<Self> {
        Self::start_in(vms, ports, true, DATASTORE_USER).await
    }

    /// The bed (operator running) with the simulator started with more flags, e.g.
    /// `["-page-size", "8"]` (e2e/vcsim-cbt/README.md lists them).
    pub async fn start_with_simulator_flags(
        vms: usize,
        ports: (i32, i32),
        flags: &[&str],
    ) -> Result<Self> {
        let mut bed = Self::start_in_with(vms, ports, false, DATASTORE_USER, flags).await?;
        bed.start_operator()?;
        Ok(bed)
    }

    /// The bed alone, with the simulator started with more flags (e.g. `["-username", U]`).
    pub async fn start_without_operator_with_simulator_flags(
        vms: usize,
        ports: (i32, i32),
        flags: &[&str],
    ) -> Result<Self> {
        Self::start_in_with(vms, ports, false, DATASTORE_USER, flags).await
    }

    async fn start_in(vms: usize, ports: (i32, i32), restricted: bool, owner: u32) -> Result<Self> {
        Self::start_in_with(vms, ports, restricted, owner, &[]).await
    }

    async fn start_in_with(
        vms: usize,
        ports: (i32, i32),
        restricted: bool,
        owner: u32,
        flags: &[&str],
    ) -> Result<Self> {
        install_crds()?;
        let node = RealNode::ready().await?.context(
            "the operator's end-to-end tests run on the real node (SENDENSE_NODE=0 skips the node)",
        )?;
        let host = node.internal_ip().context("the node has no InternalIP")?;
        let vms = vms.to_string();
        let mut args = vec!["-vms", &vms, "-disk-size", "32MiB,16MiB"];
        args.extend_from_slice(flags);
        let sim = Simulator::start_for_pods_owned_by(&host, owner, &args);
        let work = sim.dir.join("e2e");
        let repo_dir = work.join("repository");
        std::fs::create_dir_all(&repo_dir)?;
        Self::in_namespace(sim, node, repo_dir, work, ports, restricted).await
    }

    /// The bed's namespace deleted whole (its operator stopped, its PersistentVolume released),
    /// and a new namespace with a new SourceNode, claim and Repository on the same volume and
    /// simulator, its own operator started: a cluster that lost everything but its storage.
    pub async fn in_a_new_namespace(mut self, ports: (i32, i32)) -> Result<Self> {
        // A job holds the finalizer sendense.io/cleanup until the operator has finished it;
        // with the operator gone it would hold the namespace forever.
        let jobs = self.jobs().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let held: Vec<String> = jobs
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|j| {
                    j.metadata
                        .finalizers
                        .as_ref()
                        .is_some_and(|f| !f.is_empty())
                })
                .filter_map(|j| j.metadata.name)
                .collect();
            if held.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("jobs still hold finalizers: {held:?}{}", self.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.stop_operator();
        kubectl_ok(&[
            "delete",
            "namespace",
            &self.ns.name,
            "--wait=true",
            "--timeout=120s",
        ])?;
        kubectl_ok(&[
            "delete",
            "pv",
            &self.pv.0,
            &format!("{}-ds", self.pv.0),
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ])?;
        let Bed {
            sim,
            node,
            repo_dir,
            work,
            ..
        } = self;
        let mut bed = Self::in_namespace(sim, node, repo_dir, work, ports, false).await?;
        bed.start_operator()?;
        Ok(bed)
    }

    async fn in_namespace(
        sim: Simulator,
        node: RealNode,
        repo_dir: PathBuf,
        work: PathBuf,
        ports: (i32, i32),
        restricted: bool,
    ) -> Result<Self> {
        let ns = if restricted {
            TestNamespace::create_restricted("backup")?
        } else {
            TestNamespace::create("backup")?
        };
        let pv = Pv(format!("{}-repo", ns.name));
        let datastore = sim.info["datastores"]["LocalDS_0"]
            .as_str()
            .context("datastore dir")?
            .to_owned();
        let (datastore_source, datastore_claim) = if restricted {
            (
                "persistentVolumeClaim: {claimName: datastore, readOnly: true}".to_owned(),
                format!(
                    r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}-ds}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {{path: "{datastore}"}}
  claimRef: {{namespace: {ns}, name: datastore}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: datastore, namespace: {ns}}}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: {pv}-ds
  resources: {{requests: {{storage: 1Gi}}}}
"#,
                    pv = pv.0,
                    ns = ns.name,
                ),
            )
        } else {
            (
                // A node directory the operator's settings allow by name (the chart's
                // datastoreVolumes; start_operator_with sets them).
                format!("volume: {LAB_DATASTORE}"),
                String::new(),
            )
        };
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
      datastores: [{{name: LocalDS_0, {datastore_source}}}]
---
{datastore_claim}---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: 2Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  local: {{path: "{repo}"}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: ["{node}"]}}]
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
            datastore_source = datastore_source,
            datastore_claim = datastore_claim,
            repo = repo_dir.display(),
            node = node.name,
            low = ports.0,
            high = ports.1,
        );
        let bed = Bed {
            sim,
            node,
            ns,
            repo_dir,
            work,
            operator: None,
            metrics_port: 0,
            pv,
        };
        bed.apply("setup", &manifest)?;
        Ok(bed)
    }

    pub fn start_operator(&mut self) -> Result<()> {
        self.start_operator_with(&[])
    }

    /// The operator with these environment variables (settings) added. It allows this
    /// namespace's SourceNodes two datastore volumes: LAB_DATASTORE, the simulator's datastore
    /// directory, and EMPTY_DATASTORE, an empty directory.
    pub fn start_operator_with(&mut self, env: &[(&str, &str)]) -> Result<()> {
        let datastore = self.sim.info["datastores"]["LocalDS_0"]
            .as_str()
            .context("datastore dir")?;
        let empty = self.work.join(EMPTY_DATASTORE);
        std::fs::create_dir_all(&empty)?;
        let volumes = serde_json::json!([
            {"name": LAB_DATASTORE, "namespaces": [self.ns.name], "hostPath": {"path": datastore}, "writable": true},
            {"name": EMPTY_DATASTORE, "namespaces": [self.ns.name], "hostPath": {"path": empty}},
        ])
        .to_string();
        let mut env = env.to_vec();
        env.push(("SENDENSE_DATASTORE_VOLUMES", &volumes));
        // A restarted operator binds a new port.
        let log = self.work.join("operator.log");
        let (operator, port) = Operator::start(&self.ns.name, &log, &env)?;
        self.operator = Some(operator);
        self.metrics_port = port;
        Ok(())
    }

    pub fn stop_operator(&mut self) {
        self.operator = None;
    }

    pub fn apply(&self, name: &str, yaml: &str) -> Result<String> {
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

    pub fn job_yaml(name: &str, vm: &str, mode: &str, extra: &str) -> String {
        format!(
            "apiVersion: sendense.io/v1alpha1\nkind: BackupJob\nmetadata: {{name: {name}}}\nspec:\n  vm: {{name: {vm}}}\n  sourceNodeRef: {{name: vc}}\n  repositoryRef: {{name: primary}}\n  mode: {mode}\n{extra}"
        )
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "\n=== operator log\n{}\n=== pod logs\n{}\n=== jobs\n{}",
            self.operator
                .as_ref()
                .map(|o| o.log_tail())
                .unwrap_or_default(),
            self.pod_logs(),
            kubectl_ok(&["get", "backupjobs", "-n", &self.ns.name, "-o", "yaml"])
                .unwrap_or_default()
        )
    }

    /// The last lines of every container log of this namespace's pods the node still has
    /// (the kubelet's podLogsDir, beside the admin kubeconfig in the cluster's state directory).
    pub fn pod_logs(&self) -> String {
        let dir = pod_logs_dir();
        let mut out = String::new();
        let prefix = format!("{}_", self.ns.name);
        let mut pods: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        pods.sort();
        for pod in pods {
            for container in std::fs::read_dir(&pod).into_iter().flatten().flatten() {
                for log in std::fs::read_dir(container.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    out += &format!(
                        "--- {}\n{}\n",
                        log.path()
                            .strip_prefix(&dir)
                            .unwrap_or(&log.path())
                            .display(),
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    );
                }
            }
        }
        out
    }

    /// The namespace's RestorePoints.
    pub async fn restore_points(&self) -> Result<Vec<RestorePoint>> {
        let api: Api<RestorePoint> = Api::namespaced(client().await?, &self.ns.name);
        Ok(api.list(&Default::default()).await?.items)
    }

    pub async fn jobs(&self) -> Result<Api<BackupJob>> {
        Ok(Api::namespaced(client().await?, &self.ns.name))
    }

    /// Waits for a job to reach a final phase; fails on the wrong one.
    pub async fn finished(&self, name: &str, want: Phase, within: Duration) -> Result<BackupJob> {
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

    /// Waits for the job's Running condition to carry `reason` while the job is Pending;
    /// returns its message.
    pub async fn waiting(&self, name: &str, reason: &str) -> Result<String> {
        self.running_false(name, reason, Phase::Pending).await
    }

    /// Waits for the job's Running condition to be False with `reason`, and asserts the job's
    /// phase is then `phase`; returns the condition's message.
    pub async fn running_false(&self, name: &str, reason: &str, phase: Phase) -> Result<String> {
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
                assert_eq!(j.status.as_ref().and_then(|s| s.phase), Some(phase));
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

    pub async fn ready<K>(&self, name: &str) -> Result<()>
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

    pub fn guest(&self, args: &[&str]) {
        self.sim.cli(args);
    }

    /// A session with the bed's simulator, for what a test does in vCenter itself.
    pub async fn vcenter(&self) -> Result<sendense_vsphere::VSphere> {
        Ok(
            sendense_vsphere::VSphere::connect(sendense_vsphere::VCenterConfig::new(
                self.sim.s("url"),
                self.sim.s("username"),
                self.sim.s("password"),
                sendense_vsphere::Tls::Thumbprint(self.sim.s("thumbprint")),
            ))
            .await?,
        )
    }

    pub fn checksum(&self, vm: &str, disk: i32) -> String {
        self.sim
            .cli(&["checksum", "-vm", vm, "-disk", &disk.to_string()])["sha256"]
            .as_str()
            .expect("sha256")
            .to_owned()
    }

    pub fn snapshots(&self, vm: &str) -> usize {
        self.sim
            .cli(&["snapshots", "-vm", vm])
            .as_array()
            .map_or(0, |a| a.len())
    }

    /// Reads a restore point through its QCOW2 chain and compares it with `sha256`.
    pub fn verify(&self, file: &str, sha256: &str) -> Result<()> {
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

    pub async fn pods_of_jobs(&self) -> Result<Vec<String>> {
        let pods: Api<Pod> = Api::namespaced(client().await?, &self.ns.name);
        Ok(pods
            .list(&kube::api::ListParams::default().labels("sendense.io/backupjob"))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect())
    }

    pub async fn no_pods_remain(&self) -> Result<()> {
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

    pub async fn metrics(&self) -> Result<String> {
        scrape(self.metrics_port).await
    }

    /// A SourceNode for the simulator's vCenter, with its own credentials Secret name and
    /// datastore volume (LAB_DATASTORE or EMPTY_DATASTORE, for the nfs transport).
    pub fn source_node_yaml(&self, name: &str, secret: &str, volume: &str) -> String {
        format!(
            r#"apiVersion: sendense.io/v1alpha1
kind: SourceNode
metadata: {{name: {name}}}
spec:
  vcenter: {{url: "{url}", credentialsSecretRef: {{name: {secret}}}, tls: {{thumbprint: "{tp}"}}}}
  datacenter: DC0
  transport: {{type: nfs, nfs: {{datastores: [{{name: LocalDS_0, volume: {volume}}}]}}}}
"#,
            url = self.sim.s("url"),
            tp = self.sim.s("thumbprint"),
        )
    }
}

/// The node's container logs, `<namespace>_<pod>_<uid>/<container>/<restart>.log` (the
/// kubelet's podLogsDir, beside the admin kubeconfig in the cluster's state directory).
pub fn pod_logs_dir() -> PathBuf {
    kubeconfig()
        .parent()
        .map(|d| d.join("node/pod-logs"))
        .unwrap_or_default()
}

/// The body of an operator's /metrics on 127.0.0.1:`port`.
pub async fn scrape(port: u16) -> Result<String> {
    scrape_at(&format!("127.0.0.1:{port}")).await
}

/// GET /metrics from `addr` (host:port), within 5 s.
pub async fn scrape_at(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}"))??;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await??;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .context("no HTTP header in the /metrics answer")
}

pub trait HasConditions {
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
pub fn record_pods(ns: &str) -> Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> {
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

pub fn disk_file(j: &BackupJob, key: i32) -> String {
    j.status
        .as_ref()
        .and_then(|s| s.disks.iter().find(|d| d.device_key == key))
        .and_then(|d| d.file.clone())
        .unwrap_or_else(|| panic!("job {:?} has no file for disk {key}", j.metadata.name))
}

pub async fn events_of(ns: &str, object: &str) -> Result<Vec<(String, String)>> {
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
