//! BackupJobs end to end on the real test bed: the local control plane, its real node running
//! hub and agent pods as containers of the agent image, the vCenter simulator with CBT, real
//! qemu-nbd. All
//! input goes in through `kubectl apply`; every restore point is read back through its QCOW2
//! chain and compared with the simulator's checksum of the disk at the backup.
//!
//! The scenarios run one at a time: each starts and kills its own operator and simulator, and
//! two at once on 2 cores would make their bounded waits a matter of load.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use sendense_crds::backup_job::{CopyKind, Phase};
use sendense_crds::{BackupJob, Repository, SourceNode};
use sendense_e2e::{client, kubectl_ok, wait_until};

mod support;
use support::faults::patch_repository;
use support::{Bed, EMPTY_DATASTORE, LAB_DATASTORE, SERIAL, disk_file, events_of, record_pods};

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
    // Each job produced a RestorePoint; the incremental is layered on the full's.
    assert_eq!(is.chain_parent, fs.restore_point);
    let rps = bed.restore_points().await?;
    for (job, sums) in [(&fs, &full_sums), (&is, &incr_sums)] {
        let name = job
            .restore_point
            .clone()
            .context("no restore point named")?;
        let rp = rps
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
            .with_context(|| format!("RestorePoint {name} missing"))?;
        for (n, key) in [2000, 2001].into_iter().enumerate() {
            let d = rp
                .spec
                .disks
                .iter()
                .find(|d| d.device_key == key)
                .context("disk")?;
            // The digest the commit read back is the simulator's of the disk at the backup.
            assert_eq!(d.sha256, sums[n], "{name} disk {key}");
        }
        assert!(
            rp.spec.verified
                && rp
                    .spec
                    .disks
                    .iter()
                    .all(|d| d.bytes_verified.is_some_and(|b| b > 0)),
            "every chunk read back after the flush: {:?}",
            rp.spec
        );
        assert!(
            bed.repo_dir.join(&rp.spec.manifest).is_file(),
            "the manifest is on the volume"
        );
    }
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
        m.contains(&format!(
            "sendense_backups_total{{namespace=\"{}\",result=\"succeeded\",vm=\"cbt-vm-0\"}} 2",
            bed.ns.name
        )),
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
    // Five at once: above the default limit of four backups per SourceNode.
    support::faults::patch_source_node(&bed, r#"{"limits": {"maxConcurrentJobs": 5}}"#)?;
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
        "one hub (which also commits) and one agent pod per job: {seen:?}"
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

#[tokio::test]
async fn jobs_that_cannot_run_say_why_and_start_no_pods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10500, 10520)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let pods = record_pods(&bed.ns.name);
    let ns = &bed.ns.name;
    let manifest = format!(
        r#"{}---
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
        bed.source_node_yaml("no-secret", "late-credentials", LAB_DATASTORE)
    );
    bed.apply("broken", &manifest)?;
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

    // A pod the API server refuses (here a ResourceQuota allowing no pod) is a condition
    // naming the quota, with a Warning Event; lifting the quota lets the job run.
    bed.apply(
        "quota",
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: no-pods-allowed}\nspec: {hard: {pods: \"0\"}}\n",
    )?;
    // The quota controller fills in its usage before admission enforces it.
    wait_until("the quota's status", Duration::from_secs(30), || {
        let hard = kubectl_ok(&[
            "get",
            "resourcequota",
            "no-pods-allowed",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.hard.pods}",
        ])?;
        if hard.trim() == "0" {
            Ok(())
        } else {
            bail!("status.hard.pods is {hard:?}")
        }
    })?;
    bed.apply(
        "quota-job",
        &Bed::job_yaml("over-quota", "cbt-vm-0", "auto", ""),
    )?;
    let m = bed
        .running_false("over-quota", "HubPodRejected", Phase::Running)
        .await?;
    assert!(
        m.contains("no-pods-allowed") && m.contains("over-quota-hub"),
        "{m}"
    );
    let ev = events_of(ns, "over-quota").await?;
    assert!(
        ev.contains(&("Warning".into(), "HubPodRejected".into())),
        "events {ev:?}"
    );
    assert!(bed.pods_of_jobs().await?.is_empty());
    kubectl_ok(&["delete", "resourcequota", "no-pods-allowed", "-n", ns])?;
    let j = bed
        .finished("over-quota", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    bed.no_pods_remain().await?;
    bed.verify(&disk_file(&j, 2000), &bed.checksum("cbt-vm-0", 2000))?;
    Ok(())
}

#[tokio::test]
async fn a_job_failing_every_attempt_ends_failed_and_leaves_nothing_behind() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10550, 10570)).await?;
    // A datastore mount without the VM's disk files: every attempt's copy fails after the
    // snapshot exists, the worst place to fail.
    let manifest = format!(
        r#"{}---
apiVersion: sendense.io/v1alpha1
kind: BackupJob
metadata: {{name: doomed}}
spec: {{vm: {{name: cbt-vm-0}}, sourceNodeRef: {{name: wrong-datastore}}, repositoryRef: {{name: primary}}, retryLimit: 1}}
"#,
        bed.source_node_yaml("wrong-datastore", "vcenter-credentials", EMPTY_DATASTORE)
    );
    bed.apply("failing", &manifest)?;
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
        let dir = f.parent().context("dir")?;
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
    assert!(
        bed.restore_points().await?.is_empty(),
        "a failed job commits nothing"
    );
    bed.no_pods_remain().await?;
    let m = bed.metrics().await?;
    assert!(
        m.contains(&format!(
            "sendense_backups_total{{namespace=\"{}\",result=\"failed\",vm=\"cbt-vm-0\"}} 1",
            bed.ns.name
        )),
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

#[tokio::test]
async fn a_datastore_of_another_user_is_read_as_the_source_node_says() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // The datastore's disk files are 0600 and owned by 4242, as an export squashing every
    // client to anonuid 4242 would present them; the agent image's user is 65532.
    let owner = 4242;
    let bed = Bed::start_with_datastore_owner(1, (10700, 10720), owner).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let vm = "cbt-vm-0";
    bed.guest(&[
        "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "7", "-count", "64",
        "-size", "64K",
    ]);

    // As 65532 the agent cannot open the files: the job fails, naming the field to set.
    bed.apply(
        "denied",
        &Bed::job_yaml("denied", vm, "full", "  retryLimit: 0\n"),
    )?;
    let j = bed
        .finished("denied", Phase::Failed, Duration::from_secs(180))
        .await?;
    let failed = j
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .context("no Failed condition")?;
    for want in [
        "transport.nfs.readAs",
        "uid 65532",
        &format!("owned by uid {owner} gid {owner}, mode 0"),
    ] {
        assert!(failed.message.contains(want), "{want:?} not in {failed:?}");
    }
    assert_eq!(bed.snapshots(vm), 0, "no snapshot left");

    // Reading as the owner: the backup succeeds and restores byte-identical.
    let patch = format!(
        r#"{{"spec":{{"transport":{{"nfs":{{"readAs":{{"user":{owner},"group":{owner}}}}}}}}}}}"#
    );
    kubectl_ok(&[
        "patch",
        "sourcenode",
        "vc",
        "-n",
        &bed.ns.name,
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    bed.apply("allowed", &Bed::job_yaml("allowed", vm, "full", ""))?;
    let j = bed
        .finished("allowed", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    bed.verify(&disk_file(&j, 2000), &bed.checksum(vm, 2000))?;
    bed.verify(&disk_file(&j, 2001), &bed.checksum(vm, 2001))?;
    bed.no_pods_remain().await?;
    Ok(())
}

#[tokio::test]
async fn restore_points_outlive_their_jobs_their_names_and_their_namespace() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10730, 10750)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let vm = "cbt-vm-0";
    let write = |seed: &str| {
        bed.guest(&[
            "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", seed, "-count",
            "32", "-size", "64K",
        ])
    };
    let backup = |name: &'static str, mode: &'static str| {
        let bed = &bed;
        async move {
            bed.apply(name, &Bed::job_yaml(name, vm, mode, ""))?;
            bed.finished(name, Phase::Succeeded, Duration::from_secs(240))
                .await
        }
    };
    write("1");
    let b1 = backup("b1", "full").await?;
    write("2");
    let b2 = backup("b2", "auto").await?;
    let rp = |j: &BackupJob| {
        j.status
            .clone()
            .and_then(|s| s.restore_point)
            .unwrap_or_default()
    };
    let (rp1, rp2) = (rp(&b1), rp(&b2));
    assert_eq!(
        b2.status.clone().and_then(|s| s.chain_parent),
        Some(rp1.clone())
    );

    // Both jobs deleted, the name b1 used again for a new full backup: a new restore point in
    // a directory of its own; the old ones and their files stay as they were.
    kubectl_ok(&[
        "delete",
        "backupjob",
        "b1",
        "b2",
        "-n",
        &bed.ns.name,
        "--wait=true",
    ])?;
    write("3");
    let b1_again = backup("b1", "full").await?;
    let rp3 = rp(&b1_again);
    assert!(
        ![rp1.as_str(), rp2.as_str()].contains(&rp3.as_str()),
        "{rp3}"
    );
    assert_ne!(disk_file(&b1_again, 2000), disk_file(&b1, 2000));
    // The next auto backup continues from the newest restore point, whatever made it.
    write("4");
    let b3 = backup("b3", "auto").await?;
    assert_eq!(
        b3.status.clone().and_then(|s| s.chain_parent),
        Some(rp3.clone())
    );
    let rp4 = rp(&b3);

    // Every restore point still restores to the digest recorded when it was committed.
    let rps = bed.restore_points().await?;
    let names: BTreeSet<String> = rps.iter().filter_map(|r| r.metadata.name.clone()).collect();
    assert_eq!(names, BTreeSet::from([rp1, rp2, rp3, rp4]));
    for r in &rps {
        for d in &r.spec.disks {
            bed.verify(&d.file, &d.sha256)?;
        }
    }
    // The last one is also the disk now.
    let last = rps
        .iter()
        .find(|r| r.metadata.name == b3.status.clone().and_then(|s| s.restore_point))
        .context("b3's restore point")?;
    for d in &last.spec.disks {
        assert_eq!(d.sha256, bed.checksum(vm, d.device_key));
    }
    bed.no_pods_remain().await?;
    assert_eq!(bed.snapshots(vm), 0);

    // The whole namespace deleted; a new one with a new Repository on the same volume: the
    // repository's manifests give back the same restore points, and the next backup continues
    // the chain from the newest of them.
    let before: Vec<_> = rps
        .iter()
        .map(|r| (r.metadata.name.clone(), r.spec.disks.clone()))
        .collect();
    let bed = bed.in_a_new_namespace((10760, 10780)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let found = loop {
        let found = bed.restore_points().await?;
        if found.len() == before.len() {
            break found;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the new Repository listed {} restore points, not {}{}",
                found.len(),
                before.len(),
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut after: Vec<_> = found
        .iter()
        .map(|r| (r.metadata.name.clone(), r.spec.disks.clone()))
        .collect();
    let mut before = before;
    before.sort_by(|a, b| a.0.cmp(&b.0));
    after.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        after, before,
        "the same restore points, the same files and digests"
    );
    assert!(
        found
            .iter()
            .all(|r| r.spec.repository_ref.name == "primary")
    );
    bed.guest(&[
        "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "5", "-count", "32",
        "-size", "64K",
    ]);
    bed.apply("b5", &Bed::job_yaml("b5", vm, "incremental", ""))?;
    let b5 = bed
        .finished("b5", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    let st = b5.status.clone().context("status")?;
    assert_eq!(st.chain_parent.as_deref(), last.metadata.name.as_deref());
    assert!(
        st.disks
            .iter()
            .all(|d| d.copy == Some(CopyKind::Incremental)),
        "{st:?}"
    );
    for key in [2000, 2001] {
        bed.verify(&disk_file(&b5, key), &bed.checksum(vm, key))?;
    }
    Ok(())
}

#[tokio::test]
async fn deleting_a_restore_point_object_deletes_no_data_and_the_next_probe_lists_it_again()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (10900, 10920)).await?;
    let vm = "cbt-vm-0";
    bed.guest(&[
        "fill", "-vm", vm, "-disk", "2000", "-pattern", "random", "-seed", "5", "-count", "50",
        "-size", "64K",
    ]);
    bed.apply("kept", &Bed::job_yaml("kept", vm, "full", ""))?;
    let j = bed
        .finished("kept", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    let name = j
        .status
        .as_ref()
        .and_then(|s| s.restore_point.clone())
        .context("restore point")?;
    let before = bed
        .restore_points()
        .await?
        .into_iter()
        .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
        .context("RestorePoint")?;
    kubectl_ok(&["delete", "restorepoint", "-n", &bed.ns.name, &name])?;
    assert!(bed.restore_points().await?.is_empty());
    // Nothing on the volume changed.
    assert!(bed.repo_dir.join(&before.spec.manifest).is_file());
    for d in &before.spec.disks {
        bed.verify(&d.file, &d.sha256)?;
    }
    // The next probe of the Repository (here: brought forward by a change of its spec) lists
    // it again, as it was.
    patch_repository(
        &bed,
        r#"{"hub": {"portRange": {"low": 10900, "high": 10921}}}"#,
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let back = loop {
        let found = bed
            .restore_points()
            .await?
            .into_iter()
            .find(|r| r.metadata.name.as_deref() == Some(name.as_str()));
        if let Some(rp) = found {
            break rp;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "RestorePoint {name} never listed again{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(back.spec, before.spec, "the same restore point");
    Ok(())
}
