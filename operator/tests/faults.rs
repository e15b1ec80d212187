//! Faults in the middle of a backup, on the real test bed (local control plane, real node,
//! vCenter simulator, real qemu-nbd): each case ends in a restore point that reads back as the
//! simulator's disk at its snapshot, or in a clean failure, and either way with no snapshot left
//! on the VM, no file on the repository volume outside committed restore points, and no pod or
//! Service of the job left.
//!
//! A fault is injected mid-copy, not by luck of timing: the SourceNode's bandwidth cap
//! (`spec.limits.maxBandwidthMbps`) makes the first attempt copy slowly, the test waits until
//! its status shows bytes copied, then injects the fault and lifts the cap.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use sendense_crds::backup_job::Phase;
use sendense_e2e::{client, kubectl_ok};

mod support;
use support::faults::*;
use support::{Bed, SERIAL, events_of};

#[tokio::test]
async fn an_agent_force_deleted_mid_copy_fails_its_attempt_and_the_next_one_commits() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10600, 10620)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply(
        "lost",
        &Bed::job_yaml("lost", VM, "full", "  retryLimit: 1\n"),
    )?;
    mid_copy(&bed, "lost").await?;
    cap_bandwidth(&bed, None)?;
    kubectl_ok(&[
        "delete",
        "pod",
        "-n",
        &bed.ns.name,
        "lost-agent",
        "--force",
        "--grace-period=0",
    ])?;
    let j = bed
        .finished("lost", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    let st = j.status.clone().expect("status");
    assert_eq!(st.attempts, Some(2), "the lost attempt is not resumed");
    let rp = bed
        .restore_points()
        .await?
        .into_iter()
        .find(|r| Some(&r.spec.job.uid) == j.metadata.uid.as_ref())
        .context("restore point")?;
    assert_eq!(rp.spec.job.attempt, 2, "written by the second attempt");
    let ev = events_of(&bed.ns.name, "lost").await?;
    assert!(
        ev.contains(&("Warning".into(), "Retrying".into())),
        "{ev:?}"
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "lost").await?;
    Ok(())
}

#[tokio::test]
async fn a_frozen_agent_fails_at_the_progress_deadline_and_the_next_attempt_commits() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10630, 10650)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply(
        "frozen",
        &Bed::job_yaml(
            "frozen",
            VM,
            "full",
            "  retryLimit: 1\n  progressDeadlineSeconds: 30\n",
        ),
    )?;
    mid_copy(&bed, "frozen").await?;
    let pids = agent_pids("frozen")?;
    assert!(!pids.is_empty(), "the agent process of job frozen");
    signal(&pids, "-STOP");
    cap_bandwidth(&bed, None)?;
    // Frozen, it answers nothing and copies nothing: the attempt fails at the deadline and the
    // next one starts afresh (the frozen process is killed with its pod).
    let message = running_reason(&bed, "frozen", "Retrying", Duration::from_secs(120)).await;
    signal(&pids, "-CONT");
    let message = message?;
    assert!(
        message.contains("ProgressDeadlineExceeded")
            && message.contains("spec.progressDeadlineSeconds: 30"),
        "{message}"
    );
    let j = bed
        .finished("frozen", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    assert_eq!(j.status.as_ref().and_then(|s| s.attempts), Some(2));
    verified(&bed, &j).await?;
    nothing_left(&bed, "frozen").await?;
    Ok(())
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_at_once_and_removes_its_snapshot() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10660, 10680)).await?;
    write_data(&bed);
    // 32 MiB at 2 Mbit/s take two minutes: past the one-minute deadline.
    cap_bandwidth(&bed, Some(2))?;
    bed.apply(
        "late",
        &Bed::job_yaml(
            "late",
            VM,
            "full",
            "  retryLimit: 3\n  activeDeadlineSeconds: 60\n",
        ),
    )?;
    mid_copy(&bed, "late").await?;
    let j = bed
        .finished("late", Phase::Failed, Duration::from_secs(240))
        .await?;
    let st = j.status.clone().expect("status");
    assert_eq!(st.attempts, Some(1), "no retry after the deadline");
    let failed = condition(&st, "Failed")?;
    assert_eq!(failed.reason, "DeadlineExceeded", "{failed:?}");
    assert!(
        failed.message.contains("spec.activeDeadlineSeconds (60 s)")
            && failed.message.contains("not retried"),
        "{}",
        failed.message
    );
    let snap = condition(&st, "SnapshotRemoved")?;
    assert_eq!(snap.status, "True", "{snap:?}");
    assert!(bed.restore_points().await?.is_empty());
    nothing_left(&bed, "late").await?;
    Ok(())
}

#[tokio::test]
async fn an_agent_that_cannot_be_scheduled_says_why_and_fails_at_the_progress_deadline()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10690, 10710)).await?;
    patch_source_node(
        &bed,
        r#"{"placement": {"nodeSelector": {"sendense.io/site": "nowhere"}}}"#,
    )?;
    bed.apply(
        "nowhere",
        &Bed::job_yaml(
            "nowhere",
            VM,
            "full",
            "  retryLimit: 0\n  progressDeadlineSeconds: 20\n",
        ),
    )?;
    let message = running_reason(
        &bed,
        "nowhere",
        "AgentPodUnschedulable",
        Duration::from_secs(120),
    )
    .await?;
    assert!(
        message.contains("cannot be scheduled") && message.contains("node"),
        "the scheduler's reason: {message}"
    );
    let j = bed
        .finished("nowhere", Phase::Failed, Duration::from_secs(120))
        .await?;
    let st = j.status.clone().expect("status");
    let failed = condition(&st, "Failed")?;
    assert_eq!(failed.reason, "ProgressDeadlineExceeded", "{failed:?}");
    assert!(
        failed.message.contains("cannot be scheduled"),
        "{}",
        failed.message
    );
    // The agent never ran; its Pending pod goes with the job's others.
    nothing_left(&bed, "nowhere").await?;
    Ok(())
}

#[tokio::test]
async fn the_same_vm_through_two_source_nodes_is_backed_up_once_at_a_time() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10720, 10740)).await?;
    // A second SourceNode for the same vCenter: same VM, another name.
    let nodes: Api<sendense_crds::SourceNode> = Api::namespaced(client().await?, &bed.ns.name);
    let mut other = nodes.get("vc").await?;
    other.metadata = kube::api::ObjectMeta {
        name: Some("vc-again".into()),
        ..Default::default()
    };
    other.status = None;
    nodes.create(&Default::default(), &other).await?;
    bed.ready::<sendense_crds::SourceNode>("vc-again").await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("first", &Bed::job_yaml("first", VM, "full", ""))?;
    mid_copy(&bed, "first").await?;
    bed.apply(
        "second",
        &Bed::job_yaml("second", VM, "auto", "").replace("name: vc}", "name: vc-again}"),
    )?;
    let message = running_reason(&bed, "second", "VMBusy", Duration::from_secs(60)).await?;
    assert!(
        message.contains(&format!("{}/first", bed.ns.name)),
        "names the job holding the VM: {message}"
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client().await?, &bed.ns.name);
    let held = leases
        .list(&kube::api::ListParams::default().labels("sendense.io/vm-lease"))
        .await?
        .items;
    assert_eq!(held.len(), 1, "one Lease for the VM: {held:?}");
    let holder = held[0]
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    assert!(
        holder.starts_with(&format!("{}/first/", bed.ns.name)),
        "{holder}"
    );
    cap_bandwidth(&bed, None)?;
    let first = bed
        .finished("first", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    verified(&bed, &first).await?;
    let second = bed
        .finished("second", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    let st = second.status.clone().expect("status");
    assert_eq!(
        st.chain_parent,
        first.status.as_ref().and_then(|s| s.restore_point.clone()),
        "the second backup continues the first's chain"
    );
    verified(&bed, &second).await?;
    nothing_left(&bed, "second").await?;
    let wait = tokio::time::Instant::now() + Duration::from_secs(30);
    while !leases
        .list(&kube::api::ListParams::default().labels("sendense.io/vm-lease"))
        .await?
        .items
        .is_empty()
    {
        if tokio::time::Instant::now() > wait {
            bail!("the VM's Lease outlived both jobs");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_hub_qemu_nbd_killed_mid_copy_fails_its_attempt_and_the_next_one_commits() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10750, 10770)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply(
        "hubkill",
        &Bed::job_yaml("hubkill", VM, "full", "  retryLimit: 1\n"),
    )?;
    let j = mid_copy(&bed, "hubkill").await?;
    let uid = j.metadata.uid.clone().context("uid")?;
    let pids = hub_qemu_nbd_pids("hubkill", &uid, 1)?;
    assert!(!pids.is_empty(), "the hub's qemu-nbd of attempt 1");
    cap_bandwidth(&bed, None)?;
    signal(&pids[..1], "-KILL");
    let j = bed
        .finished("hubkill", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    assert_eq!(j.status.as_ref().and_then(|s| s.attempts), Some(2));
    verified(&bed, &j).await?;
    nothing_left(&bed, "hubkill").await?;
    Ok(())
}

/// The hub's node gone mid-copy: its kubelet and the job's processes on it stop (SIGSTOP, as a
/// machine that lost power or network looks from the API server). The stalled attempt fails,
/// its pods stay Terminating because no kubelet confirms their deletion, and the operator
/// force-deletes them a minute past their grace period instead of waiting forever. The next
/// attempt's hub then has no node to go to, and says so. When a node is back, the next attempt
/// commits, and the first attempt's snapshot is gone.
#[tokio::test]
async fn the_hubs_node_gone_mid_copy_its_pods_are_force_deleted_and_a_later_attempt_commits()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11100, 11120)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply(
        "nodegone",
        &Bed::job_yaml(
            "nodegone",
            VM,
            "full",
            "  retryLimit: 3\n  progressDeadlineSeconds: 30\n",
        ),
    )?;
    let j = mid_copy(&bed, "nodegone").await?;
    let uid = j.metadata.uid.clone().context("uid")?;
    let kubelet = kubelet_pids()?;
    assert_eq!(kubelet.len(), 1, "the node's kubelet: {kubelet:?}");
    let mut pids = kubelet;
    pids.extend(agent_pids("nodegone")?);
    pids.extend(hub_qemu_nbd_pids("nodegone", &uid, 1)?);
    assert!(pids.len() >= 3, "kubelet, agent and hub qemu-nbd: {pids:?}");
    let node = Frozen::new(pids);
    cap_bandwidth(&bed, None)?;
    nodes_ready("Unknown", Duration::from_secs(120)).await?;
    // Attempt 2 starts only once attempt 1's pods are gone from the API; with the kubelet
    // stopped, only a forced deletion removes them.
    let message = running_reason(
        &bed,
        "nodegone",
        "HubPodUnschedulable",
        Duration::from_secs(420),
    )
    .await?;
    let st = bed
        .jobs()
        .await?
        .get("nodegone")
        .await?
        .status
        .unwrap_or_default();
    assert!(st.attempts.is_some_and(|a| a >= 2), "{:?}", st.attempts);
    assert!(
        message.contains("untolerated taint"),
        "the scheduler's message says why (the node's unreachable taint): {message}"
    );
    drop(node);
    nodes_ready("True", Duration::from_secs(120)).await?;
    let j = bed
        .finished("nodegone", Phase::Succeeded, Duration::from_secs(420))
        .await?;
    let rp = j.status.as_ref().and_then(|s| s.restore_point.clone());
    assert!(rp.is_some(), "a restore point");
    let ev = events_of(&bed.ns.name, "nodegone").await?;
    assert!(
        ev.contains(&("Warning".into(), "Retrying".into())),
        "{ev:?}"
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "nodegone").await?;
    Ok(())
}

#[tokio::test]
async fn the_operator_killed_mid_copy_and_restarted_finishes_the_same_attempt() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start(1, (10780, 10800)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("orphaned", &Bed::job_yaml("orphaned", VM, "full", ""))?;
    mid_copy(&bed, "orphaned").await?;
    // SIGKILL: no chance to write anything on the way out.
    bed.stop_operator();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cap_bandwidth(&bed, None)?;
    bed.start_operator()?;
    let j = bed
        .finished("orphaned", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    assert_eq!(
        j.status.as_ref().and_then(|s| s.attempts),
        Some(1),
        "the agent went on while the operator was away; the restarted operator takes it up"
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "orphaned").await?;
    Ok(())
}

/// The operator uninstalled while a job runs, the job's finalizer removed by hand and the job
/// deleted: nothing cleans its attempt up then. Reinstalled, the operator's repository probe
/// finds the directory of a BackupJob that no longer exists and, once nothing changed in it for
/// the orphan idle time, removes it; the directory of a job that still exists is kept however
/// old. The next backup of the VM removes the abandoned snapshot.
#[tokio::test]
async fn an_attempt_abandoned_with_the_operator_uninstalled_is_swept_from_the_volume() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start(1, (11130, 11150)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("abandoned", &Bed::job_yaml("abandoned", VM, "full", ""))?;
    let j = mid_copy(&bed, "abandoned").await?;
    let uid = j.metadata.uid.clone().context("uid")?;
    bed.stop_operator();
    cap_bandwidth(&bed, None)?;
    kubectl_ok(&[
        "patch",
        "backupjob",
        "abandoned",
        "-n",
        &bed.ns.name,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    kubectl_ok(&["delete", "backupjob", "abandoned", "-n", &bed.ns.name])?;
    // Its pods go with it (owner references); the agent's and hub's processes end.
    bed.no_pods_remain().await?;
    let vm_dir = bed.repo_dir.join(&bed.ns.name).join(VM);
    let abandoned = vm_dir.join(format!("abandoned-{uid}-a1"));
    assert!(
        abandoned.join("2000.qcow2").exists(),
        "the abandoned attempt's files"
    );
    // A job that still exists, with an old attempt directory of its own: never swept. (It
    // names a SourceNode that does not exist, so it never runs.)
    bed.apply(
        "alive",
        &Bed::job_yaml("alive", VM, "full", "").replace("{name: vc}", "{name: absent}"),
    )?;
    let alive_uid = bed
        .jobs()
        .await?
        .get("alive")
        .await?
        .metadata
        .uid
        .context("uid")?;
    let alive = vm_dir.join(format!("alive-{alive_uid}-a1"));
    std::fs::create_dir_all(&alive)?;
    std::fs::write(alive.join("2000.qcow2"), b"partial")?;
    // Owned as the hub's pods own what they write (this test runs as root).
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&vm_dir)?);
    let group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&vm_dir)?);
    for p in [alive.clone(), alive.join("2000.qcow2")] {
        std::os::unix::fs::chown(&p, Some(owner), Some(group))?;
    }
    // Both left unchanged for two hours, as far as the probe can tell.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for dir in [&abandoned, &alive] {
        for e in std::fs::read_dir(dir)? {
            std::fs::File::open(e?.path())?.set_modified(two_hours_ago)?;
        }
        std::fs::File::open(dir)?.set_modified(two_hours_ago)?;
    }
    bed.start_operator_with(&[("SENDENSE_REPOSITORY_PROBE_INTERVAL_SECONDS", "5")])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while abandoned.exists() {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{} was never swept{}",
                abandoned.display(),
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The probe pod removed it; the operator says so once it has read the pod's result.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ev = events_of(&bed.ns.name, "primary").await?;
        if ev.contains(&("Normal".into(), "OrphanedAttemptsRemoved".into())) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no OrphanedAttemptsRemoved Event: {ev:?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Several probes later, the living job's directory is still there.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(
        alive.join("2000.qcow2").exists(),
        "a job that exists keeps its directory"
    );
    // Once that job is gone too, its directory goes.
    kubectl_ok(&["delete", "backupjob", "alive", "-n", &bed.ns.name])?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while alive.exists() {
        if tokio::time::Instant::now() > deadline {
            bail!("{} was never swept{}", alive.display(), bed.diagnostics());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bed.apply("next", &Bed::job_yaml("next", VM, "full", ""))?;
    let j = bed
        .finished("next", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    verified(&bed, &j).await?;
    nothing_left(&bed, "next").await?;
    Ok(())
}

#[tokio::test]
async fn a_job_deleted_mid_copy_is_cancelled_and_leaves_nothing_behind() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10810, 10830)).await?;
    write_data(&bed);
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("cancelled", &Bed::job_yaml("cancelled", VM, "full", ""))?;
    let j = mid_copy(&bed, "cancelled").await?;
    assert!(
        j.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "sendense.io/cleanup"),
        "a running job carries the finalizer: {:?}",
        j.metadata.finalizers
    );
    assert_eq!(bed.snapshots(VM), 1, "its snapshot exists while it copies");
    kubectl_ok(&[
        "delete",
        "backupjob",
        "-n",
        &bed.ns.name,
        "cancelled",
        "--wait=false",
    ])?;
    let jobs = bed.jobs().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while jobs.get_opt("cancelled").await?.is_some() {
        if tokio::time::Instant::now() > deadline {
            bail!("the deleted job never went{}", bed.diagnostics());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(bed.snapshots(VM), 0, "no snapshot left on the VM");
    bed.no_pods_remain().await?;
    assert!(bed.restore_points().await?.is_empty());
    let files = files_under(&bed.repo_dir)?;
    assert!(files.is_empty(), "files left on the volume: {files:?}");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client().await?, &bed.ns.name);
    let left = leases
        .list(&kube::api::ListParams::default().labels("sendense.io/vm-lease"))
        .await?
        .items;
    assert!(left.is_empty(), "the VM's Lease is released: {left:?}");
    // The VM is free: the next backup runs.
    cap_bandwidth(&bed, None)?;
    bed.apply("after", &Bed::job_yaml("after", VM, "auto", ""))?;
    let after = bed
        .finished("after", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    verified(&bed, &after).await?;
    nothing_left(&bed, "after").await?;
    Ok(())
}

/// A tmpfs of `size` mounted over `dir` for as long as it lives.
struct SmallVolume(std::path::PathBuf);

impl SmallVolume {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=1777"),
                "sendense-full",
            ])
            .arg(dir)
            .status()?;
        if !st.success() {
            bail!("mount tmpfs on {}: {st}", dir.display());
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_repository_fails_the_job_cleanly() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10870, 10890)).await?;
    bed.ready::<sendense_crds::Repository>("primary").await?;
    // 32 MiB to write into 12 MiB.
    let _full = SmallVolume::mount(&bed.repo_dir, "12m")?;
    write_data(&bed);
    bed.apply(
        "nospace",
        &Bed::job_yaml("nospace", VM, "full", "  retryLimit: 2\n"),
    )?;
    let j = bed
        .finished("nospace", Phase::Failed, Duration::from_secs(240))
        .await?;
    let st = j.status.clone().expect("status");
    let failed = condition(&st, "Failed")?;
    assert_eq!(failed.reason, "RepositoryFull", "{failed:?}");
    assert!(
        failed.message.contains("no space left on device"),
        "says the repository is full: {failed:?}"
    );
    assert_eq!(
        st.attempts,
        Some(1),
        "not retried: another attempt cannot fit either"
    );
    let snap = condition(&st, "SnapshotRemoved")?;
    assert_eq!(snap.status, "True", "{snap:?}");
    nothing_left(&bed, "nospace").await?;
    Ok(())
}

#[tokio::test]
async fn a_disk_resized_after_the_plan_is_planned_again_and_copied_in_full() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10930, 10950)).await?;
    let ns = bed.ns.name.clone();
    write_data(&bed);
    bed.apply("base", &Bed::job_yaml("base", VM, "full", ""))?;
    bed.finished("base", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    // A quota of one pod: the next job's hub runs, its agent is refused, so the job waits
    // between its plan and its snapshot.
    bed.apply(
        "quota",
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: one-pod}\nspec: {hard: {pods: \"1\"}}\n",
    )?;
    sendense_e2e::wait_until("the quota's status", Duration::from_secs(30), || {
        let hard = kubectl_ok(&[
            "get",
            "resourcequota",
            "one-pod",
            "-n",
            &ns,
            "-o",
            "jsonpath={.status.hard.pods}",
        ])?;
        if hard.trim() == "1" {
            Ok(())
        } else {
            bail!("status.hard.pods is {hard:?}")
        }
    })?;
    bed.apply(
        "grown",
        &Bed::job_yaml("grown", VM, "auto", "  retryLimit: 2\n"),
    )?;
    running_reason(&bed, "grown", "AgentPodRejected", Duration::from_secs(120)).await?;
    let planned = bed.jobs().await?.get("grown").await?;
    let disk = |j: &sendense_crds::BackupJob, key: i32| {
        j.status
            .as_ref()
            .and_then(|s| s.disks.iter().find(|d| d.device_key == key).cloned())
            .expect("disk in status")
    };
    assert_eq!(
        disk(&planned, 2001).copy,
        Some(sendense_crds::backup_job::CopyKind::Incremental)
    );
    // The disk grows after the plan, and gets new data in its new tail.
    bed.guest(&["resize", "-vm", VM, "-disk", "2001", "-capacity", "96M"]);
    bed.guest(&[
        "fill",
        "-vm",
        VM,
        "-disk",
        "2001",
        "-pattern",
        "sequential",
        "-seed",
        "31",
        "-count",
        "4",
        "-size",
        "1M",
        "-offset",
        "80M",
    ]);
    kubectl_ok(&["delete", "resourcequota", "one-pod", "-n", &ns])?;
    let j = bed
        .finished("grown", Phase::Succeeded, Duration::from_secs(300))
        .await?;
    let st = j.status.clone().expect("status");
    assert_eq!(
        st.attempts,
        Some(2),
        "the resized attempt, then the new plan's"
    );
    let d = disk(&j, 2001);
    assert_eq!(
        (d.copy, d.capacity_bytes),
        (
            Some(sendense_crds::backup_job::CopyKind::Full),
            Some(96 << 20)
        ),
        "{d:?}"
    );
    assert_eq!(
        disk(&j, 2000).copy,
        Some(sendense_crds::backup_job::CopyKind::Incremental)
    );
    let ev = events_of(&ns, "grown").await?;
    assert!(
        ev.contains(&("Warning".into(), "Retrying".into())),
        "{ev:?}"
    );
    verified(&bed, &j).await?;
    nothing_left(&bed, "grown").await?;
    Ok(())
}
