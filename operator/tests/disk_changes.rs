//! Disks that change between backups, end to end on the real test bed (the local control
//! plane, its real node running hub and agent pods, the vCenter simulator with CBT, real
//! qemu-nbd): CBT pages listing their areas out of order, a disk grown and a disk added between
//! two backups. Each ends in restore points read back through their QCOW2 chains and compared
//! with the simulator's checksums of the disks at the backup (no guest write happens between a
//! job's snapshot and the checksum taken once it succeeded).
//!
//! The scenarios run one at a time, like those of backup_job.rs.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use sendense_crds::backup_job::{CopyKind, DiskStatus, Phase};
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};

mod support;
use support::{Bed, SERIAL, disk_file};

const VM: &str = "cbt-vm-0";
const MIB: i64 = 1 << 20;
/// The simulator's CBT block size (its default).
const BLOCK: i64 = 64 << 10;

/// Runs BackupJob `name` in `mode` to success; the job.
async fn backup(bed: &Bed, name: &str, mode: &str) -> Result<BackupJob> {
    bed.apply(name, &Bed::job_yaml(name, VM, mode, ""))?;
    bed.finished(name, Phase::Succeeded, Duration::from_secs(240))
        .await
}

/// The simulator's checksum of each disk now.
fn checksums(bed: &Bed, keys: &[i32]) -> BTreeMap<i32, String> {
    keys.iter()
        .map(|k| (*k, bed.sim.checksum(VM, *k)))
        .collect()
}

fn disk(job: &BackupJob, key: i32) -> DiskStatus {
    job.status
        .as_ref()
        .and_then(|s| s.disks.iter().find(|d| d.device_key == key))
        .cloned()
        .unwrap_or_else(|| panic!("job {:?} has no disk {key}", job.metadata.name))
}

/// The job's RestorePoint lists exactly the disks of `sums`, each with the digest the simulator
/// gave, and every one reads back through its chain to that digest.
async fn restores(
    bed: &Bed,
    job: &BackupJob,
    sums: &BTreeMap<i32, String>,
) -> Result<RestorePoint> {
    let name = job
        .status
        .as_ref()
        .and_then(|s| s.restore_point.clone())
        .context("the job names no restore point")?;
    let rp = bed
        .restore_points()
        .await?
        .into_iter()
        .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
        .with_context(|| format!("RestorePoint {name} missing"))?;
    let listed: BTreeMap<i32, String> = rp
        .spec
        .disks
        .iter()
        .map(|d| (d.device_key, d.sha256.clone()))
        .collect();
    assert_eq!(
        &listed, sums,
        "{name}: the disks and digests it lists are the simulator's"
    );
    for key in sums.keys() {
        bed.verify(&disk_file(job, *key), &sums[key])?;
    }
    Ok(rp)
}

/// A guest write of generated data into disk `key`: `args` are vcsim-cbt fill's flags.
fn fill(bed: &Bed, key: i32, args: &str) {
    let key = key.to_string();
    let mut all = vec!["fill", "-vm", VM, "-disk", &key];
    all.extend(args.split_whitespace());
    bed.guest(&all);
}

#[tokio::test]
async fn cbt_pages_listing_their_areas_out_of_order_lose_no_change() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // At most 8 areas a page: the writes below take several pages of each disk.
    let bed = Bed::start_with_simulator_flags(1, (11000, 11020), &["-page-size", "8"]).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    fill(&bed, 2000, "-pattern random -seed 1 -count 64 -size 64K");
    fill(
        &bed,
        2001,
        "-pattern sequential -seed 2 -count 4 -size 1M -offset 2M",
    );
    let full = backup(&bed, "before", "full").await?;
    let full_sums = checksums(&bed, &[2000, 2001]);

    // Scattered writes, one block each, ten blocks apart: 40 areas on disk 2000 (six pages
    // with the zeroed megabyte, one more area) and 24 on disk 2001 (three pages).
    fill(
        &bed,
        2000,
        "-pattern fragmented -seed 3 -count 40 -size 4K -offset 100K -stride 640K",
    );
    fill(
        &bed,
        2001,
        "-pattern fragmented -seed 4 -count 24 -size 8K -offset 0 -stride 640K",
    );
    bed.guest(&[
        "zero", "-vm", VM, "-disk", "2000", "-offset", "30M", "-length", "1M",
    ]);
    bed.sim.unsorted_pages(VM, true);
    let incr = backup(&bed, "after", "auto").await?;
    let incr_sums = checksums(&bed, &[2000, 2001]);
    bed.no_pods_remain().await?;

    for key in [2000, 2001] {
        let d = disk(&incr, key);
        assert_eq!(d.copy, Some(CopyKind::Incremental), "{d:?}");
        assert_eq!(d.backing_file, disk(&full, key).file);
    }
    // What users rely on: both restore points read back as the disks were.
    restores(&bed, &full, &full_sums).await?;
    restores(&bed, &incr, &incr_sums).await?;
    // Every changed block, as the pages listed them, out of order: none lost.
    for (key, areas) in [(2000, 40 * BLOCK + MIB), (2001, 24 * BLOCK)] {
        assert_eq!(disk(&incr, key).bytes_to_copy, Some(areas), "disk {key}");
    }
    assert_ne!(full_sums, incr_sums, "the guest's writes changed the disks");
    assert_eq!(bed.snapshots(VM), 0, "no snapshot left");
    Ok(())
}

#[tokio::test]
async fn a_disk_grown_between_backups_is_copied_whole_and_the_other_incrementally() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11030, 11050)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    fill(&bed, 2000, "-pattern random -seed 1 -count 32 -size 64K");
    fill(&bed, 2001, "-pattern random -seed 2 -count 32 -size 64K");
    let full = backup(&bed, "before", "full").await?;
    let full_sums = checksums(&bed, &[2000, 2001]);

    // Disk 2001 grows from 16 to 24 MiB (vSphere refuses that with a snapshot: the job's is
    // gone); the guest writes across its old end and into the new tail, and into disk 2000.
    bed.sim.resize(VM, 2001, "24M");
    fill(
        &bed,
        2001,
        "-pattern sequential -seed 3 -count 2 -size 1M -offset 15M",
    );
    fill(
        &bed,
        2001,
        "-pattern random -seed 4 -count 16 -size 4K -offset 20M",
    );
    fill(&bed, 2000, "-pattern fragmented -seed 5 -count 16 -size 4K");
    let grown = backup(&bed, "grown", "auto").await?;
    let grown_sums = checksums(&bed, &[2000, 2001]);

    let st = grown.status.clone().context("status")?;
    assert_eq!(
        st.chain_parent,
        full.status.clone().and_then(|s| s.restore_point)
    );
    let d2000 = disk(&grown, 2000);
    assert_eq!(d2000.copy, Some(CopyKind::Incremental), "{d2000:?}");
    assert_eq!(d2000.backing_file, disk(&full, 2000).file);
    let d2001 = disk(&grown, 2001);
    assert_eq!(d2001.copy, Some(CopyKind::Full), "{d2001:?}");
    assert_eq!(d2001.capacity_bytes, Some(24 * MIB));
    assert_eq!(
        d2001.backing_file, None,
        "a full copy into a file of its own"
    );
    let reason = d2001.copy_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("resized") && reason.contains(&(24 * MIB).to_string()),
        "the reason says the disk grew: {reason:?}"
    );
    let rp = restores(&bed, &grown, &grown_sums).await?;
    let capacity = |key: i32| {
        rp.spec
            .disks
            .iter()
            .find(|d| d.device_key == key)
            .map(|d| d.capacity_bytes)
    };
    assert_eq!(
        (capacity(2000), capacity(2001)),
        (Some(32 * MIB), Some(24 * MIB))
    );
    // The restore point before the resize still restores as it was.
    restores(&bed, &full, &full_sums).await?;

    // The grown disk's chain goes on from its full copy.
    fill(
        &bed,
        2001,
        "-pattern random -seed 6 -count 8 -size 4K -offset 16M",
    );
    let next = backup(&bed, "next", "auto").await?;
    for key in [2000, 2001] {
        let d = disk(&next, key);
        assert_eq!(d.copy, Some(CopyKind::Incremental), "{d:?}");
        assert_eq!(d.backing_file, disk(&grown, key).file);
    }
    restores(&bed, &next, &checksums(&bed, &[2000, 2001])).await?;
    bed.no_pods_remain().await?;
    assert_eq!(bed.snapshots(VM), 0, "no snapshot left");
    Ok(())
}

#[tokio::test]
async fn a_disk_added_between_backups_is_copied_whole_and_listed_in_the_restore_point() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11060, 11080)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;
    fill(&bed, 2000, "-pattern random -seed 1 -count 32 -size 64K");
    let full = backup(&bed, "before", "full").await?;
    let full_sums = checksums(&bed, &[2000, 2001]);

    let added = bed.sim.add_disk(VM, "8M");
    assert_eq!(added, 2002, "the next device key");
    fill(&bed, added, "-pattern random -seed 2 -count 24 -size 64K");
    fill(&bed, 2000, "-pattern fragmented -seed 3 -count 16 -size 4K");
    let more = backup(&bed, "more", "auto").await?;
    let more_sums = checksums(&bed, &[2000, 2001, added]);

    let st = more.status.clone().context("status")?;
    let parent = full.status.clone().and_then(|s| s.restore_point);
    assert_eq!(st.chain_parent, parent);
    for key in [2000, 2001] {
        let d = disk(&more, key);
        assert_eq!(d.copy, Some(CopyKind::Incremental), "{d:?}");
        assert_eq!(d.backing_file, disk(&full, key).file);
    }
    let new = disk(&more, added);
    assert_eq!(new.copy, Some(CopyKind::Full), "{new:?}");
    assert_eq!(new.backing_file, None);
    assert_eq!(new.capacity_bytes, Some(8 * MIB));
    let reason = new.copy_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("2002") && reason.contains("not in restore point"),
        "the reason says the disk is new: {reason:?}"
    );
    // The restore point lists all three disks (restores checks the list).
    restores(&bed, &more, &more_sums).await?;
    restores(&bed, &full, &full_sums).await?;

    // The added disk's chain goes on from its full copy.
    fill(&bed, added, "-pattern fragmented -seed 4 -count 8 -size 4K");
    let next = backup(&bed, "next", "auto").await?;
    for key in [2000, 2001, added] {
        let d = disk(&next, key);
        assert_eq!(d.copy, Some(CopyKind::Incremental), "{d:?}");
        assert_eq!(d.backing_file, disk(&more, key).file);
    }
    restores(&bed, &next, &checksums(&bed, &[2000, 2001, added])).await?;
    bed.no_pods_remain().await?;
    assert_eq!(bed.snapshots(VM), 0, "no snapshot left");
    Ok(())
}
