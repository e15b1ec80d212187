//! Helpers of the fault tests (faults.rs, random_kills.rs): data to copy, the bandwidth cap
//! that makes a copy slow enough to hit mid-way, the processes of a job on this machine, and
//! the checks every fault case ends with.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;
use sendense_crds::BackupJob;
use sendense_crds::backup_job::Phase;
use sendense_e2e::{client, kubectl_ok};

use super::Bed;

pub const VM: &str = "cbt-vm-0";

/// About 32 MiB of data over both disks: half a minute at 8 Mbit/s.
pub fn write_data(bed: &Bed) {
    for (disk, count, seed) in [("2000", "24", "11"), ("2001", "8", "12")] {
        bed.guest(&[
            "fill",
            "-vm",
            VM,
            "-disk",
            disk,
            "-pattern",
            "sequential",
            "-seed",
            seed,
            "-count",
            count,
            "-size",
            "1M",
            "-offset",
            "1M",
        ]);
    }
}

/// Merges `spec` (JSON) into the spec of the bed's SourceNode `vc`.
pub fn patch_source_node(bed: &Bed, spec: &str) -> Result<()> {
    patch_spec(bed, "sourcenode", "vc", spec)
}

/// Merges `spec` (JSON) into the spec of the bed's Repository `primary`.
pub fn patch_repository(bed: &Bed, spec: &str) -> Result<()> {
    patch_spec(bed, "repository", "primary", spec)
}

fn patch_spec(bed: &Bed, kind: &str, name: &str, spec: &str) -> Result<()> {
    kubectl_ok(&[
        "patch",
        "-n",
        &bed.ns.name,
        kind,
        name,
        "--type",
        "merge",
        "-p",
        &format!(r#"{{"spec": {spec}}}"#),
    ])?;
    Ok(())
}

pub fn cap_bandwidth(bed: &Bed, mbps: Option<u32>) -> Result<()> {
    let limits = match mbps {
        Some(m) => format!(r#"{{"maxBandwidthMbps": {m}}}"#),
        None => "null".into(),
    };
    patch_source_node(bed, &format!(r#"{{"limits": {limits}}}"#))
}

/// Waits until the job's first attempt has copied some bytes (and not all).
pub async fn mid_copy(bed: &Bed, name: &str) -> Result<BackupJob> {
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let j = jobs.get(name).await?;
        let st = j.status.clone().unwrap_or_default();
        let (copied, total) = (st.bytes_copied.unwrap_or(0), st.bytes_to_copy.unwrap_or(0));
        if st.attempts == Some(1) && copied > 0 && copied < total {
            return Ok(j);
        }
        if st.attempts.is_some_and(|a| a > 1)
            || matches!(st.phase, Some(Phase::Succeeded | Phase::Failed))
        {
            bail!(
                "job {name} left attempt 1 before the test saw it copy: {:?}{}",
                st.conditions,
                bed.diagnostics()
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "job {name} never copied: {:?}{}",
                st.conditions,
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The job's Running condition reaches `reason`; its message.
pub async fn running_reason(
    bed: &Bed,
    name: &str,
    reason: &str,
    within: Duration,
) -> Result<String> {
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let j = jobs.get(name).await?;
        let c = j
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Running").cloned());
        if let Some(c) = &c
            && c.reason == reason
        {
            return Ok(c.message.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "job {name}: Running never became {reason}; last {c:?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every file under `dir`, relative to it.
pub fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// After the job ended: its cleanup done, no snapshot on the VM, no pod or Service of it, and
/// every file on the volume inside a committed restore point's directory.
pub async fn nothing_left(bed: &Bed, name: &str) -> Result<()> {
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let st = jobs.get(name).await?.status.unwrap_or_default();
        let pending = st.conditions.iter().any(|c| {
            c.type_ == "PartialFilesRemoved"
                && matches!(c.reason.as_str(), "Pending" | "CleanupPodRejected")
        });
        if !pending {
            if let Some(c) = st
                .conditions
                .iter()
                .find(|c| c.type_ == "PartialFilesRemoved")
            {
                assert_eq!(c.status, "True", "cleanup: {c:?}");
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "cleanup never ended: {:?}{}",
                st.conditions,
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(bed.snapshots(VM), 0, "no snapshot left on the VM");
    bed.no_pods_remain().await?;
    let services: Api<Service> = Api::namespaced(client().await?, &bed.ns.name);
    let left: Vec<_> = services
        .list(&kube::api::ListParams::default().labels("sendense.io/backupjob"))
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(left.is_empty(), "Services left: {left:?}");
    let committed: BTreeSet<PathBuf> = bed
        .restore_points()
        .await?
        .iter()
        .map(|rp| PathBuf::from(&rp.spec.directory))
        .collect();
    for f in files_under(&bed.repo_dir)? {
        assert!(
            committed.iter().any(|d| f.starts_with(d)),
            "{} is outside every committed restore point ({committed:?})",
            f.display()
        );
    }
    Ok(())
}

/// The job's single restore point reads back as the simulator's disks now (nothing wrote
/// to the VM since the backup).
pub async fn verified(bed: &Bed, j: &BackupJob) -> Result<()> {
    let name = j
        .status
        .as_ref()
        .and_then(|s| s.restore_point.clone())
        .context("no restore point")?;
    let rps = bed.restore_points().await?;
    let rp = rps
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
        .with_context(|| format!("RestorePoint {name} missing"))?;
    for key in [2000, 2001] {
        let d = rp
            .spec
            .disks
            .iter()
            .find(|d| d.device_key == key)
            .context("disk")?;
        let sum = bed.checksum(VM, key);
        assert_eq!(d.sha256, sum, "{name} disk {key}: recorded digest");
        bed.verify(&d.file, &sum)?;
    }
    Ok(())
}

/// The pids of this machine's processes whose command line (argv) satisfies `pick` (the node
/// of the test bed runs here).
fn pids_where(pick: impl Fn(&[String]) -> bool) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if pick(&args) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The pids of the agent process of job `name`.
pub fn agent_pids(name: &str) -> Result<Vec<i32>> {
    pids_where(|args| {
        args.first().is_some_and(|a| a.ends_with("sendense-agent"))
            && args.get(1).is_some_and(|a| a == "backup")
            && args.windows(2).any(|w| w[0] == "--job" && w[1] == name)
    })
}

/// The pids of the hub's qemu-nbd processes serving the files of the job's attempt `attempt`.
pub fn hub_qemu_nbd_pids(name: &str, uid: &str, attempt: u64) -> Result<Vec<i32>> {
    let dir = format!("{name}-{uid}-a{attempt}/");
    pids_where(|args| {
        args.first().is_some_and(|a| a.ends_with("qemu-nbd"))
            && args.iter().any(|a| a.contains(&dir))
    })
}

/// The pid of the node's kubelet (e2e/cluster/node-up.sh starts it as `kubelet --config=...`).
pub fn kubelet_pids() -> Result<Vec<i32>> {
    pids_where(|args| {
        args.first().is_some_and(|a| a.ends_with("/kubelet"))
            && args.get(1).is_some_and(|a| a.starts_with("--config="))
    })
}

pub fn signal(pids: &[i32], sig: &str) {
    for p in pids {
        let _ = std::process::Command::new("kill")
            .args([sig, &p.to_string()])
            .status();
    }
}

/// Processes stopped (SIGSTOP) until this is dropped (SIGCONT), on every way out of a test.
pub struct Frozen(Vec<i32>);

impl Frozen {
    pub fn new(pids: Vec<i32>) -> Self {
        signal(&pids, "-STOP");
        Self(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(&self.0, "-CONT");
    }
}

/// Waits until the Ready condition of every Node is `status` ("True", "Unknown", ...).
pub async fn nodes_ready(status: &str, within: Duration) -> Result<()> {
    let nodes: Api<Node> = Api::all(client().await?);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen: Vec<String> = nodes
            .list(&Default::default())
            .await?
            .items
            .iter()
            .map(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status.clone())
                    .unwrap_or_default()
            })
            .collect();
        if !seen.is_empty() && seen.iter().all(|s| s == status) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("Nodes never became Ready={status}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The job status's condition of this type.
pub fn condition<'a>(
    st: &'a sendense_crds::backup_job::BackupJobStatus,
    type_: &str,
) -> Result<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .with_context(|| format!("no {type_} condition: {:?}", st.conditions))
}
