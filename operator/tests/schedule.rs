//! BackupSchedules end to end through `kubectl apply` on the real test bed (local control plane,
//! real node, the vCenter simulator, real qemu-nbd): a schedule every 30 seconds selects the
//! simulator's three VMs by a name pattern and backs them up with at most the SourceNode's
//! `maxConcurrentJobs` at once; a VM created in the simulator afterwards is picked up by a later
//! run; `suspend` stops new runs. Every restore point made is read back through its chain and
//! compared with the simulator's checksum of the disk.

use std::collections::BTreeSet;
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

const SCHEDULE: &str = "every-30s";

fn schedule_yaml(suspend: bool) -> String {
    format!(
        r#"apiVersion: sendense.io/v1alpha1
kind: BackupSchedule
metadata: {{name: {SCHEDULE}}}
spec:
  schedule: "*/30 * * * * *"
  suspend: {suspend}
  sourceNodeRef: {{name: vc}}
  repositoryRef: {{name: primary}}
  vms: {{namePattern: "cbt-vm-*"}}
  successfulJobsHistoryLimit: 20
"#
    )
}

/// The schedule's jobs, sampled: (name, VM, phase).
async fn sample(bed: &Bed) -> Result<Vec<(String, String, Option<Phase>)>> {
    let jobs = bed.jobs().await?;
    Ok(jobs
        .list(&ListParams::default().labels(&format!("sendense.io/schedule={SCHEDULE}")))
        .await?
        .items
        .into_iter()
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

/// Watches the schedule's jobs until every VM in `vms` has a succeeded job; fails when more than
/// `limit` ran at once or a job failed. Returns the names of the jobs seen.
async fn until_backed_up(bed: &Bed, vms: &[&str], limit: usize) -> Result<BTreeSet<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    let mut seen = BTreeSet::new();
    loop {
        let jobs = sample(bed).await?;
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
                "not every VM of {vms:?} was backed up: {jobs:?}\n{:#?}{}",
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
    let bed = Bed::start(3, (11400, 11420)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    patch_source_node(&bed, r#"{"limits": {"maxConcurrentJobs": 2}}"#)?;
    for (vm, seed) in [("cbt-vm-0", "1"), ("cbt-vm-1", "2"), ("cbt-vm-2", "3")] {
        bed.guest(&[
            "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", seed, "-count",
            "64", "-size", "64K",
        ]);
    }
    bed.apply(SCHEDULE, &schedule_yaml(false))?;

    // The first run: three jobs, at most two at once; the third waits, and says so.
    let first = until_backed_up(&bed, &["cbt-vm-0", "cbt-vm-1", "cbt-vm-2"], 2).await?;
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
    until_backed_up(&bed, &["cbt-vm-new"], 2).await?;
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
    let before: BTreeSet<String> = sample(&bed).await?.into_iter().map(|j| j.0).collect();
    // Two scheduled times pass.
    tokio::time::sleep(Duration::from_secs(65)).await;
    let after: BTreeSet<String> = sample(&bed).await?.into_iter().map(|j| j.0).collect();
    assert_eq!(before, after, "no run while suspended");

    // Every restore point the schedule made reads back through its chain as committed. The
    // first three VMs' disks have not changed since the data was written before the schedule
    // existed, so each of their points holds the simulator's disk as it is now. (The new VM
    // may have been backed up between its creation and its data.)
    let points: Api<RestorePoint> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let points = points.list(&Default::default()).await?.items;
    assert!(points.len() >= 4, "{} restore points", points.len());
    for p in &points {
        for d in &p.spec.disks {
            if p.spec.vm.name != "cbt-vm-new" {
                assert_eq!(
                    d.sha256,
                    bed.checksum(&p.spec.vm.name, d.device_key),
                    "{} disk {}",
                    p.spec.vm.name,
                    d.device_key
                );
            }
            bed.verify(&d.file, &d.sha256)?;
        }
    }
    Ok(())
}
