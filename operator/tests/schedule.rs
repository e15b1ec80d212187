//! BackupSchedules end to end through `kubectl apply` on the real test bed (local control plane,
//! real node, the vCenter simulator, real qemu-nbd), on a clock the test moves
//! (`SENDENSE_TEST_CLOCK_FILE`): a nightly schedule selects the simulator's three VMs by a name
//! pattern and backs them up with at most the SourceNode's `maxConcurrentJobs` at once; a VM
//! created in the simulator afterwards is picked up by the next night; a night whose jobs queue
//! behind one slow backup loses the queued ones when its window closes; `suspend` stops new
//! runs. Every restore point made is read back through its chain and compared with the
//! simulator's checksum of the disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use kube::api::ListParams;
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupSchedule, Repository, RestorePoint, SourceNode};
use sendense_vsphere::{Hardware, NewVm};

mod support;
use support::faults::patch_source_node;
use support::{Bed, SERIAL, events_of};

const SCHEDULE: &str = "nightly";

fn schedule_yaml(suspend: bool) -> String {
    format!(
        r#"apiVersion: sendense.io/v1alpha1
kind: BackupSchedule
metadata: {{name: {SCHEDULE}}}
spec:
  schedule: "0 1 * * *"
  suspend: {suspend}
  windowMinutes: 30
  startingDeadlineSeconds: 600
  sourceNodeRef: {{name: vc}}
  repositoryRef: {{name: primary}}
  vms: {{namePattern: "cbt-vm-*"}}
  successfulJobsHistoryLimit: 20
"#
    )
}

/// The schedule's jobs of the run at `night` 01:00 UTC, sampled: (name, VM, phase).
async fn sample(bed: &Bed, night: &str) -> Result<Vec<(String, String, Option<Phase>)>> {
    let jobs = bed.jobs().await?;
    let at = format!("{night}T01:00:00Z");
    Ok(jobs
        .list(&ListParams::default().labels(&format!("sendense.io/schedule={SCHEDULE}")))
        .await?
        .items
        .into_iter()
        .filter(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("sendense.io/scheduled-time"))
                == Some(&at)
        })
        .map(|j| {
            let vm = j
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("sendense.io/vm-name").cloned())
                .unwrap_or_default();
            let phase = j.status.as_ref().and_then(|s| s.phase);
            (j.metadata.name.unwrap_or_default(), vm, phase)
        })
        .collect())
}

async fn schedule(bed: &Bed) -> Result<BackupSchedule> {
    let api: Api<BackupSchedule> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    Ok(api.get(SCHEDULE).await?)
}

/// Moves the test clock to `night` at 01:00:05 UTC (five seconds after the run).
fn set_clock(clock: &Path, night: &str, time: &str) -> Result<()> {
    std::fs::write(clock, format!("{night}T{time}Z"))?;
    Ok(())
}

/// Watches the jobs of the run at `night` until every VM in `vms` has a succeeded one; fails
/// when more than `limit` ran at once or a job failed. Returns the names of the jobs seen.
async fn until_backed_up(
    bed: &Bed,
    night: &str,
    vms: &[&str],
    limit: usize,
) -> Result<BTreeSet<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    let mut seen = BTreeSet::new();
    loop {
        let jobs = sample(bed, night).await?;
        let running = jobs
            .iter()
            .filter(|(_, _, p)| *p == Some(Phase::Running))
            .count();
        if running > limit {
            bail!("{running} jobs ran at once, the limit is {limit}: {jobs:?}");
        }
        if let Some(failed) = jobs.iter().find(|(_, _, p)| *p == Some(Phase::Failed)) {
            bail!("job {failed:?} failed{}", bed.diagnostics());
        }
        seen.extend(jobs.iter().map(|(n, _, _)| n.clone()));
        let done: BTreeSet<&str> = jobs
            .iter()
            .filter(|(_, _, p)| *p == Some(Phase::Succeeded))
            .map(|(_, vm, _)| vm.as_str())
            .collect();
        if vms.iter().all(|v| done.contains(v)) {
            return Ok(seen);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "not every VM of {vms:?} was backed up on {night}: {jobs:?}\n{:#?}{}",
                schedule(bed).await?.status,
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_schedule_backs_up_the_vms_its_pattern_selects_within_the_limits() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start_without_operator(3, (11400, 11420)).await?;
    let clock: PathBuf = bed.work.join("clock");
    set_clock(&clock, "2027-03-01", "00:59:00")?;
    let clock_env = clock.display().to_string();
    bed.start_operator_with(&[("SENDENSE_TEST_CLOCK_FILE", &clock_env)])?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    patch_source_node(&bed, r#"{"limits": {"maxConcurrentJobs": 2}}"#)?;
    for (vm, seed) in [("cbt-vm-0", "1"), ("cbt-vm-1", "2"), ("cbt-vm-2", "3")] {
        bed.guest(&[
            "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", seed, "-count",
            "64", "-size", "64K",
        ]);
    }
    let mut before = std::collections::BTreeMap::new();
    for vm in ["cbt-vm-0", "cbt-vm-1", "cbt-vm-2"] {
        for key in [2000, 2001] {
            before.insert((vm.to_string(), key), bed.checksum(vm, key));
        }
    }
    bed.apply(SCHEDULE, &schedule_yaml(false))?;

    // The first night: three jobs, at most two at once; the third waits, and says so.
    set_clock(&clock, "2027-03-01", "01:00:05")?;
    let first =
        until_backed_up(&bed, "2027-03-01", &["cbt-vm-0", "cbt-vm-1", "cbt-vm-2"], 2).await?;
    let mut queued = false;
    for job in &first {
        let events = events_of(&bed.ns.name, job).await?;
        queued |= events.iter().any(|(_, reason)| reason == "SourceNodeLimit");
    }
    assert!(
        queued,
        "a job waited for a slot (SourceNodeLimit): {first:?}"
    );
    let s = schedule(&bed).await?;
    let st = s.status.clone().context("status")?;
    assert!(st.next_schedule_time.is_some(), "{st:?}");
    assert!(st.last_schedule_time.is_some(), "{st:?}");
    let ready = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("Ready")?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Scheduled"),
        "{ready:?}"
    );

    // A VM created now is picked up by a later run.
    let vc = bed.vcenter().await?;
    let new_vm = vc
        .create_vm(
            "DC0",
            &NewVm {
                name: "cbt-vm-new".into(),
                folder: None,
                resource_pool: None,
                datastore: "LocalDS_0".into(),
                hardware: Hardware {
                    num_cpus: 1,
                    memory_mib: 256,
                    guest_id: "otherGuest64".into(),
                    firmware: None,
                },
                disks: vec![16 << 20],
                annotation: String::new(),
                change_tracking: true,
            },
        )
        .await?;
    let key = vc.vm_info(&new_vm).await?.disks[0].key.to_string();
    vc.logout().await;
    bed.guest(&[
        "fill",
        "-vm",
        "cbt-vm-new",
        "-disk",
        &key,
        "-pattern",
        "random",
        "-seed",
        "9",
        "-count",
        "16",
        "-size",
        "64K",
    ]);
    set_clock(&clock, "2027-03-02", "01:00:05")?;
    until_backed_up(
        &bed,
        "2027-03-02",
        &["cbt-vm-0", "cbt-vm-1", "cbt-vm-2", "cbt-vm-new"],
        2,
    )
    .await?;
    // The schedule's status follows its jobs: every VM with a success and no failure.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = schedule(&bed).await?.status.context("status")?;
        let good: BTreeSet<String> = st
            .vms
            .iter()
            .filter(|v| v.last_success_time.is_some() && v.consecutive_failures == 0)
            .map(|v| v.name.clone())
            .collect();
        if ["cbt-vm-0", "cbt-vm-1", "cbt-vm-2", "cbt-vm-new"]
            .iter()
            .all(|v| good.contains(*v))
            && st.failing_vms.is_empty()
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("status.vms does not show four VMs backed up: {st:#?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Each VM's next backup is due when the next night's 30-minute window closes, and the
    // metric the alert reads says the same.
    let st = schedule(&bed).await?.status.context("status")?;
    for v in &st.vms {
        assert_eq!(
            v.backup_due.as_ref().map(|t| t.0.to_string()).as_deref(),
            Some("2027-03-03T01:30:00Z"),
            "{v:?}"
        );
    }
    let metrics = bed.metrics().await?;
    let due: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("sendense_schedule_backup_due_timestamp_seconds{"))
        .collect();
    assert_eq!(due.len(), 4, "{due:?}");
    assert!(due.iter().all(|l| l.ends_with(" 1804037400")), "{due:?}");

    // The third night the VMs queue behind one slow backup (one slot, 16 Mbit/s): when the
    // night's 30-minute window closes, the jobs still queued are removed and say why; the
    // running one finishes.
    patch_source_node(
        &bed,
        r#"{"limits": {"maxConcurrentJobs": 1, "maxBandwidthMbps": 16}}"#,
    )?;
    for vm in ["cbt-vm-0", "cbt-vm-1", "cbt-vm-2"] {
        bed.guest(&[
            "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "7", "-count", "96",
            "-size", "64K",
        ]);
    }
    set_clock(&clock, "2027-03-03", "01:00:05")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let running = loop {
        let jobs = sample(&bed, "2027-03-03").await?;
        let running: Vec<_> = jobs
            .iter()
            .filter(|(_, _, p)| *p == Some(Phase::Running))
            .collect();
        let queued = jobs
            .iter()
            .filter(|(_, _, p)| matches!(p, None | Some(Phase::Pending)))
            .count();
        if jobs.len() == 4 && running.len() == 1 && queued == 3 {
            break running[0].clone();
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the third night did not queue three jobs behind one: {jobs:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    set_clock(&clock, "2027-03-03", "01:30:01")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = sample(&bed, "2027-03-03").await?;
        let st = schedule(&bed).await?.status.context("status")?;
        let closed: BTreeSet<&str> = st
            .vms
            .iter()
            .filter(|v| v.last_result.as_deref() == Some("WindowClosed"))
            .map(|v| v.name.as_str())
            .collect();
        if jobs.len() == 1 && closed.len() == 3 && !closed.contains(running.1.as_str()) {
            assert_eq!(jobs[0].0, running.0, "the running job stays");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the window did not close on the queued jobs: {jobs:?} {st:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = events_of(&bed.ns.name, SCHEDULE).await?;
    // (The recorder folds repeated Events of one object into one, counted.)
    assert!(
        events.iter().any(|(_, r)| r == "WindowClosed"),
        "{events:?}"
    );
    bed.finished(&running.0, Phase::Succeeded, Duration::from_secs(240))
        .await?;
    patch_source_node(
        &bed,
        r#"{"limits": {"maxConcurrentJobs": 2, "maxBandwidthMbps": null}}"#,
    )?;

    // Suspended: no new runs. Jobs of a run already made may still end.
    let mut suspended = schedule_yaml(true);
    suspended.push('\n');
    bed.apply(SCHEDULE, &suspended)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = schedule(&bed).await?;
        let reason = s
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.reason.clone());
        if reason.as_deref() == Some("Suspended") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the schedule never said Suspended: {:?}", s.status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Two nights pass (the controller reads the test clock every second).
    set_clock(&clock, "2027-03-05", "01:00:05")?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    for night in ["2027-03-04", "2027-03-05"] {
        let jobs = sample(&bed, night).await?;
        assert!(jobs.is_empty(), "no run while suspended: {jobs:?}");
    }
    let st = schedule(&bed).await?.status.context("status")?;
    assert!(
        st.vms.iter().all(|v| v.backup_due.is_none()),
        "nothing is due while suspended: {:?}",
        st.vms
    );

    // Every restore point the schedule made reads back through its chain as committed and holds
    // the disks as they were at its night: the first two nights' as written before the first
    // night, the third night's (and the new VM's) as they are now.
    let points: Api<RestorePoint> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let points = points.list(&Default::default()).await?.items;
    assert_eq!(points.len(), 3 + 4 + 1, "three, four and one points");
    for p in &points {
        let night = p.spec.scheduled.as_ref().context("filed")?.0.to_string();
        for d in &p.spec.disks {
            let key = (p.spec.vm.name.clone(), d.device_key);
            let want = match before.get(&key) {
                Some(sum) if !night.starts_with("2027-03-03") => sum.clone(),
                _ => bed.checksum(&p.spec.vm.name, d.device_key),
            };
            assert_eq!(d.sha256, want, "{} disk {} of {night}", key.0, key.1);
            bed.verify(&d.file, &d.sha256)?;
        }
    }
    Ok(())
}
