//! Retention end to end on the real test bed, driven by a BackupSchedule on a clock the test
//! moves (`SENDENSE_TEST_CLOCK_FILE`): ten nightly runs on chosen days across two ISO weeks and
//! a month boundary, the guest writing before each. The schedule's retention (keepLast 2,
//! keepDaily 3, keepWeekly 2, keepMonthly 2) first runs as a dry run, whose preview must name
//! exactly the points GFS drops, then for real: the operator merges those points out of their
//! chains with `repo prune` pods, one of them deleted by force mid-merge (a seeded moment) and
//! finished by the next pod. The Repository's `maxChainLength: 4` turns one run into a full, so
//! two chains are pruned. In the end exactly the points GFS names are left, each reads back
//! byte-identically to the simulator's checksum at its snapshot, and the volume holds less.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use kube::Api;
use kube::api::ListParams;
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};

mod support;
use support::faults::patch_repository;
use support::{Bed, SERIAL};

const VM: &str = "cbt-vm-0";
const SCHEDULE: &str = "nightly";
/// The nights the test runs the schedule on (01:00 UTC): ISO weeks 2027-W03 to W06, January
/// and February.
const NIGHTS: [&str; 10] = [
    "2027-01-22", // Fri W03
    "2027-01-25", // Mon W04
    "2027-01-27", // Wed W04
    "2027-01-31", // Sun W04, last of January
    "2027-02-01", // Mon W05
    "2027-02-02", // Tue W05
    "2027-02-04", // Thu W05
    "2027-02-08", // Mon W06
    "2027-02-09", // Tue W06
    "2027-02-10", // Wed W06
];
/// What keepLast 2, keepDaily 3, keepWeekly 2, keepMonthly 2 keep of all ten (worked by hand):
/// last 02-10 02-09; daily + 02-08; weekly W06 02-10, W05 02-04; monthly Feb 02-10, Jan 01-31.
const KEPT: [&str; 5] = [
    "2027-01-31",
    "2027-02-04",
    "2027-02-08",
    "2027-02-09",
    "2027-02-10",
];
/// The dry run's preview after the seventh night: of 01-22 .. 02-04, GFS drops these three.
const PREVIEW_AFTER_SEVEN: [&str; 3] = ["2027-01-22", "2027-01-25", "2027-01-27"];

fn at(night: &str) -> String {
    format!("{night}T01:00:00Z")
}

fn schedule_yaml(dry_run: bool) -> String {
    format!(
        r#"apiVersion: sendense.io/v1alpha1
kind: BackupSchedule
metadata: {{name: {SCHEDULE}}}
spec:
  schedule: "0 1 * * *"
  timeZone: UTC
  startingDeadlineSeconds: 600
  sourceNodeRef: {{name: vc}}
  repositoryRef: {{name: primary}}
  vms: {{namePattern: "{VM}"}}
  successfulJobsHistoryLimit: 20
  retention: {{keepLast: 2, keepDaily: 3, keepWeekly: 2, keepMonthly: 2, dryRun: {dry_run}}}
"#
    )
}

fn write(bed: &Bed, seed: u32) {
    for disk in ["2000", "2001"] {
        bed.guest(&[
            "fill",
            "-vm",
            VM,
            "-disk",
            disk,
            "-pattern",
            "random",
            "-seed",
            &(seed * 10 + disk.len() as u32).to_string(),
            "-count",
            "40",
            "-size",
            "64K",
        ]);
    }
}

/// The simulator's checksums of the VM's two disks now.
fn checksums(bed: &Bed) -> Vec<(i32, String)> {
    vec![
        (2000, bed.checksum(VM, 2000)),
        (2001, bed.checksum(VM, 2001)),
    ]
}

/// Bytes allocated under `dir` (what the files really take on the volume).
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Sets the test clock to `night` at 01:00:05 and waits for the run's job to succeed; returns
/// the job.
async fn night(bed: &Bed, clock: &Path, night: &str) -> Result<BackupJob> {
    std::fs::write(clock, format!("{night}T01:00:05Z"))?;
    let jobs = bed.jobs().await?;
    let mine = ListParams::default().labels(&format!("sendense.io/schedule={SCHEDULE}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let run = jobs.list(&mine).await?.items.into_iter().find(|j| {
            j.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("sendense.io/scheduled-time"))
                == Some(&at(night))
        });
        if let Some(j) = &run {
            match j.status.as_ref().and_then(|s| s.phase) {
                Some(Phase::Succeeded) => return Ok(j.clone()),
                Some(Phase::Failed) => bail!(
                    "the run of {night} failed: {:?}{}",
                    j.status.as_ref().map(|s| &s.conditions),
                    bed.diagnostics()
                ),
                _ => {}
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the run of {night} did not succeed within 300 s: {:?}{}",
                run.and_then(|j| j.status),
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The night a restore point was filed under (its `spec.scheduled`).
fn night_of(p: &RestorePoint) -> String {
    p.spec
        .scheduled
        .as_ref()
        .map(|t| t.0.to_string()[..10].to_owned())
        .unwrap_or_default()
}

async fn repository(bed: &Bed) -> Result<Repository> {
    let api: Api<Repository> = Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    Ok(api.get("primary").await?)
}

/// A tiny deterministic generator (xorshift), seeded.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Waits until retention has nothing left to prune and `pruned` points were pruned in all.
/// When `kill_after_ms` is set, the first prune pod seen running is deleted by force that
/// long after it was seen (its replacement must finish the merge).
async fn pruned(bed: &Bed, want: i64, mut kill_after_ms: Option<u64>) -> Result<()> {
    let pod = "primary-prune";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    loop {
        if let Some(ms) = kill_after_ms {
            let phase = sendense_e2e::kubectl_ok(&[
                "get",
                "pod",
                "-n",
                &bed.ns.name,
                pod,
                "-o",
                "jsonpath={.status.phase}",
            ])
            .unwrap_or_default();
            if phase.trim() == "Running" {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                sendense_e2e::kubectl_ok(&[
                    "delete",
                    "pod",
                    "-n",
                    &bed.ns.name,
                    pod,
                    "--grace-period=0",
                    "--force",
                    "--ignore-not-found",
                ])?;
                println!("deleted prune pod {pod} by force {ms} ms after it was seen running");
                kill_after_ms = None;
            }
        }
        let r = repository(bed)
            .await?
            .status
            .and_then(|s| s.retention)
            .unwrap_or_default();
        let live: Vec<_> = r.prune.iter().filter(|c| !c.dry_run).collect();
        if r.pruned >= want && live.is_empty() && r.pruning.is_none() {
            assert_eq!(r.pruned, want, "{r:#?}");
            assert!(r.problems.is_empty(), "{r:#?}");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "retention did not prune {want} points: {r:#?}{}",
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn ten_scheduled_nights_keep_exactly_the_gfs_points_and_each_restores() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let seed: u64 = std::env::var("SENDENSE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("retention test seed: {seed} (SENDENSE_TEST_SEED={seed} repeats it)");
    let mut rng = seed | 1;

    let mut bed = Bed::start_without_operator(1, (11430, 11450)).await?;
    let clock: PathBuf = bed.work.join("clock");
    // Before the first night; the schedule's creation (today) lies before it, and the missed
    // run of 2027-01-21 is past startingDeadlineSeconds, so nothing runs yet.
    std::fs::write(&clock, "2027-01-22T00:59:00Z")?;
    let clock_env = clock.display().to_string();
    bed.start_operator_with(&[("SENDENSE_TEST_CLOCK_FILE", &clock_env)])?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    patch_repository(&bed, r#"{"maxChainLength": 4}"#)?;
    bed.apply(SCHEDULE, &schedule_yaml(true))?;

    // Seven nights under a dry run: nothing pruned, the preview names what GFS would drop.
    let mut sums: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    let mut jobs: BTreeMap<String, BackupJob> = BTreeMap::new();
    for (i, n) in NIGHTS.iter().enumerate().take(7) {
        write(&bed, i as u32 + 1);
        sums.insert(n.to_string(), checksums(&bed));
        jobs.insert(n.to_string(), night(&bed, &clock, n).await?);
    }
    // The fifth night's chain held four points: a new chain started with a full.
    let fifth = jobs["2027-02-01"].status.clone().context("status")?;
    assert!(
        fifth.disks.iter().all(|d| d
            .copy_reason
            .as_deref()
            .is_some_and(|r| r.contains("maxChainLength"))),
        "{:?}",
        fifth.disks
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let points = bed.restore_points().await?;
        let r = repository(&bed)
            .await?
            .status
            .and_then(|s| s.retention)
            .unwrap_or_default();
        let by_name: BTreeMap<String, String> = points
            .iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), night_of(p)))
            .collect();
        let mut previewed: Vec<String> = r
            .prune
            .iter()
            .filter(|c| c.dry_run && c.policy == format!("BackupSchedule {SCHEDULE}"))
            .filter_map(|c| by_name.get(&c.restore_point).cloned())
            .collect();
        previewed.sort();
        // The status must be of all seven points: a reconcile that ran before the seventh
        // point was listed previews the same three with older ranks.
        let described = r.kept as usize + r.prune.len();
        if points.len() == 7 && described == 7 && previewed == PREVIEW_AFTER_SEVEN {
            assert!(r.pruning.is_none() && r.pruned == 0, "{r:#?}");
            // Each says why it goes: the oldest, rule by rule.
            let oldest = &r.prune[0];
            assert_eq!(by_name[&oldest.restore_point], "2027-01-22", "{r:#?}");
            let newest_of_january = points
                .iter()
                .find(|p| night_of(p) == "2027-01-31")
                .and_then(|p| p.metadata.name.clone())
                .context("the point of 01-31")?;
            assert_eq!(
                oldest.reason,
                format!(
                    "keepLast 2: it is number 7; \
                     keepDaily 3: day 2027-01-22 is not among the 3 newest with a point; \
                     keepWeekly 2: week 2027-W03 is not among the 2 newest with a point; \
                     keepMonthly 2: {newest_of_january} is newer in month 2027-01"
                ),
                "{r:#?}"
            );
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the dry run's preview is not {PREVIEW_AFTER_SEVEN:?}: {previewed:?} of {by_name:?}, {r:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // For real: three points go, one merge killed by force at a seeded moment.
    let before = allocated(&bed.repo_dir);
    bed.apply(SCHEDULE, &schedule_yaml(false))?;
    pruned(&bed, 3, Some(next(&mut rng) % 1500)).await?;
    let after = allocated(&bed.repo_dir);
    assert!(
        after < before,
        "the volume holds fewer bytes: {before} before, {after} after"
    );

    // Three more nights with retention live: their prunes run between the backups.
    for (i, n) in NIGHTS.iter().enumerate().skip(7) {
        write(&bed, i as u32 + 1);
        sums.insert(n.to_string(), checksums(&bed));
        jobs.insert(n.to_string(), night(&bed, &clock, n).await?);
    }
    pruned(&bed, 5, None).await?;

    // Exactly the points GFS names, each reading back as the disks were at its snapshot.
    let points = bed.restore_points().await?;
    let mut kept: Vec<String> = points.iter().map(night_of).collect();
    kept.sort();
    assert_eq!(kept, KEPT, "the points left");
    for p in &points {
        let n = night_of(p);
        for d in &p.spec.disks {
            let want = &sums[&n]
                .iter()
                .find(|(k, _)| *k == d.device_key)
                .context("disk")?
                .1;
            assert_eq!(&d.sha256, want, "{n} disk {}", d.device_key);
            bed.verify(&d.file, want)?;
        }
    }
    let metrics = bed.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendense_retention_prunes_total")
                && l.contains("result=\"succeeded\"")
                && l.ends_with(" 5")),
        "{metrics}"
    );
    Ok(())
}
