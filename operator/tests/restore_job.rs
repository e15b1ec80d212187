//! Restores, end to end through `kubectl apply` on the real test bed (the local control plane,
//! its real node, the vCenter simulator with CBT, real qemu-nbd): a 2-disk VM whose disk 2000
//! holds a real ext4 file system the guest stand-in writes (images made by `mke2fs -d`, each
//! change written as the blocks that differ), a full backup and two incrementals; then
//! RestoreJobs onto claims (the disks at a point, compared with the simulator's checksums at
//! that point, sparse) and of files (compared with the originals: content, mode, mtime), and
//! the bad input that must fail with a clear reason and write nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use kube::Api;
use sendense_crds::backup_job::Phase;
use sendense_crds::restore_job::VolumeMode;
use sendense_crds::{BackupJob, Repository, RestoreJob, RestorePoint, SourceNode};
use sendense_vsphere::VmSelector;

mod support;
use support::faults::{cap_bandwidth, mid_copy};
use support::{Bed, Pv, SERIAL, events_of};

const VM: &str = "cbt-vm-0";
const MIB: usize = 1 << 20;
/// The size of disk 2000 (the bed's simulator makes 32 MiB and 16 MiB disks).
const DISK_2000: usize = 32 * MIB;

/// Runs BackupJob `name` in `mode` to success.
async fn backup(bed: &Bed, name: &str, mode: &str) -> Result<BackupJob> {
    bed.apply(name, &Bed::job_yaml(name, VM, mode, ""))?;
    bed.finished(name, Phase::Succeeded, Duration::from_secs(240))
        .await
}

/// The RestorePoint a job committed.
async fn point_of(bed: &Bed, job: &BackupJob) -> Result<RestorePoint> {
    let name = job
        .status
        .as_ref()
        .and_then(|s| s.restore_point.clone())
        .context("the job names no restore point")?;
    bed.restore_points()
        .await?
        .into_iter()
        .find(|r| r.metadata.name.as_deref() == Some(name.as_str()))
        .with_context(|| format!("RestorePoint {name} missing"))
}

/// The guest's files at one moment: path -> (content, mode, mtime in seconds).
type Tree = BTreeMap<&'static str, (Vec<u8>, u32, i64)>;

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Version `v` of the guest's files.
fn tree(v: u64) -> Tree {
    let mut t = Tree::new();
    t.insert(
        "etc/hosts",
        (b"127.0.0.1 localhost\n".to_vec(), 0o644, 1_600_000_000),
    );
    t.insert(
        "etc/app.conf",
        (
            format!("version = {v}\n").into_bytes(),
            0o640,
            1_700_000_000 + v as i64,
        ),
    );
    t.insert(
        "home/alice/notes.txt",
        (
            format!("notes, edition {}\n", v.min(2))
                .repeat(200)
                .into_bytes(),
            0o600,
            1_650_000_000 + v.min(2) as i64,
        ),
    );
    t.insert(
        "home/alice/big.bin",
        (random(v / 3 + 1, MIB + 12345), 0o644, 1_690_000_000),
    );
    if v >= 2 {
        t.insert(
            "home/alice/new.txt",
            (b"added later\n".to_vec(), 0o664, 1_710_000_000),
        );
    }
    if v >= 3 {
        t.insert(
            "home/alice/big.bin",
            (random(99, MIB + 12345), 0o644, 1_720_000_000),
        );
    }
    t
}

/// An ext4 image of the whole disk holding `t` (deterministic: fixed UUID, hash seed and time,
/// so two versions differ only where their files do).
fn ext4_image(work: &Path, t: &Tree, v: u64) -> Result<Vec<u8>> {
    let dir = work.join(format!("guest-v{v}"));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, (data, mode, mtime)) in t {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
        run(Command::new("touch")
            .arg("-h")
            .arg("-d")
            .arg(format!("@{mtime}"))
            .arg(&p))?;
    }
    std::os::unix::fs::symlink("notes.txt", dir.join("home/alice/link"))?;
    let img = work.join(format!("guest-v{v}.img"));
    let _ = std::fs::remove_file(&img);
    run(Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "guest"])
        .args(["-U", "6b1f6a0e-8c55-4c1a-a7b0-2f6a5d1c9e01"])
        .args([
            "-E",
            "hash_seed=0e4f1b3a-9d2c-4e5f-8a7b-6c5d4e3f2a10,lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        ])
        .arg("-d")
        .arg(&dir)
        .arg(&img)
        .arg(format!("{}M", DISK_2000 / MIB)))?;
    Ok(std::fs::read(&img)?)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The guest writes `new` over `old` on disk 2000: only the 64 KiB pieces that differ, as a
/// file system's writes would change them.
fn guest_writes(bed: &Bed, old: Option<&[u8]>, new: &[u8]) -> Result<usize> {
    const PIECE: usize = 64 << 10;
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for start in (0..new.len()).step_by(PIECE) {
        let end = (start + PIECE).min(new.len());
        if old.is_some_and(|o| o[start..end] == new[start..end]) {
            continue;
        }
        match ranges.last_mut() {
            Some((_, e)) if *e == start => *e = end,
            _ => ranges.push((start, end)),
        }
    }
    let piece = bed.work.join("guest-write.bin");
    let mut written = 0;
    for (s, e) in &ranges {
        std::fs::write(&piece, &new[*s..*e])?;
        bed.guest(&[
            "write",
            "-vm",
            VM,
            "-disk",
            "2000",
            "-offset",
            &s.to_string(),
            "-file",
            piece.to_str().context("path")?,
        ]);
        written += e - s;
    }
    Ok(written)
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A `local` PersistentVolume on the node, pre-bound to claim `claim` of the bed's namespace;
/// its directory.
fn volume_for(bed: &Bed, claim: &str, size: &str) -> Result<(Pv, PathBuf)> {
    let name = format!("{}-{claim}", bed.ns.name);
    let dir = bed.work.join("volumes").join(claim);
    std::fs::create_dir_all(&dir)?;
    let yaml = format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {name}}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  volumeMode: Filesystem
  local: {{path: "{dir}"}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: ["{node}"]}}]
  claimRef: {{namespace: {ns}, name: {claim}}}
"#,
        dir = dir.display(),
        node = bed.node.name,
        ns = bed.ns.name,
    );
    bed.apply(&format!("pv-{claim}"), &yaml)?;
    Ok((Pv(name), dir))
}

/// A loop device over a file of `size` bytes of 0xEE (old data a restore must overwrite, zeros
/// included); detached when the test ends.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn new(file: &Path, size: usize) -> Result<Self> {
        std::fs::write(file, vec![0xEEu8; size])?;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()?;
        ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self {
            path: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A Block-mode `local` PersistentVolume on `device`, pre-bound to claim `claim`.
fn block_volume_for(bed: &Bed, claim: &str, device: &str) -> Result<Pv> {
    let name = format!("{}-{claim}", bed.ns.name);
    let yaml = format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {name}}}
spec:
  capacity: {{storage: 24Mi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  volumeMode: Block
  local: {{path: "{device}"}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: ["{node}"]}}]
  claimRef: {{namespace: {ns}, name: {claim}}}
"#,
        node = bed.node.name,
        ns = bed.ns.name,
    );
    bed.apply(&format!("pv-{claim}"), &yaml)?;
    Ok(Pv(name))
}

/// A claim of `size` in the bed's namespace (on its pre-bound volume).
fn claim(bed: &Bed, name: &str, size: &str) -> Result<()> {
    bed.apply(
        &format!("claim-{name}"),
        &format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: \"\"\n  volumeName: {ns}-{name}\n  resources: {{requests: {{storage: {size}}}}}\n",
            ns = bed.ns.name
        ),
    )?;
    Ok(())
}

async fn restore_jobs(bed: &Bed) -> Result<Api<RestoreJob>> {
    Ok(Api::namespaced(sendense_e2e::client().await?, &bed.ns.name))
}

/// Applies RestoreJob `name` with `spec` (YAML lines under `spec:`).
fn apply_restore(bed: &Bed, name: &str, spec: &str) -> Result<()> {
    bed.apply(
        name,
        &format!("apiVersion: sendense.io/v1alpha1\nkind: RestoreJob\nmetadata: {{name: {name}}}\nspec:\n{spec}"),
    )?;
    Ok(())
}

/// Waits for RestoreJob `name` to end in `want`.
async fn restore_ended(bed: &Bed, name: &str, want: Phase) -> Result<RestoreJob> {
    let api = restore_jobs(bed).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let j = api.get(name).await?;
        let phase = j.status.as_ref().and_then(|s| s.phase);
        if phase == Some(want) {
            return Ok(j);
        }
        if matches!(phase, Some(Phase::Succeeded | Phase::Failed))
            || tokio::time::Instant::now() > deadline
        {
            bail!(
                "RestoreJob {name}: {phase:?}, expected {want:?}: {:#?}{}\n=== restore jobs\n{}",
                j.status,
                bed.diagnostics(),
                sendense_e2e::kubectl_ok(&["get", "restorejobs", "-n", &bed.ns.name, "-o", "yaml"])
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until RestoreJob `name`'s Running condition has `reason`; its message.
async fn restore_running_reason(bed: &Bed, name: &str, reason: &str) -> Result<String> {
    let api = restore_jobs(bed).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let j = api.get(name).await?;
        let running = j
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Running").cloned());
        if let Some(c) = &running
            && c.reason == reason
        {
            return Ok(c.message.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "RestoreJob {name}: Running never became {reason}: {:#?}{}",
                j.status,
                bed.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The Failed condition's reason and message.
fn failed_with(j: &RestoreJob) -> (String, String) {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Failed"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Files under `dir` (relative paths), recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("under").to_owned());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn disks_onto_claims_and_files_from_ext4_restore_as_they_were() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start(1, (11330, 11350)).await?;
    bed.ready::<SourceNode>("vc").await?;
    bed.ready::<Repository>("primary").await?;

    // Version 1 of the guest's file system on disk 2000, data on disk 2001; a full backup.
    let mut image = ext4_image(&bed.work, &tree(1), 1)?;
    guest_writes(&bed, None, &image)?;
    bed.guest(&[
        "fill", "-vm", VM, "-disk", "2001", "-pattern", "random", "-seed", "7", "-count", "8",
        "-size", "256K", "-offset", "1M",
    ]);
    let full = backup(&bed, "full", "full").await?;
    // Version 2, an incremental (point 1); version 3, another (point 2).
    let v2 = ext4_image(&bed.work, &tree(2), 2)?;
    let changed = guest_writes(&bed, Some(&image), &v2)?;
    ensure!(
        changed < DISK_2000 / 2,
        "version 2 changed {changed} bytes of the image: the images are not deterministic"
    );
    image = v2;
    bed.guest(&[
        "fill", "-vm", VM, "-disk", "2001", "-pattern", "random", "-seed", "8", "-count", "2",
        "-size", "64K", "-offset", "5M",
    ]);
    let inc1 = backup(&bed, "inc1", "incremental").await?;
    let point1_sums = [bed.checksum(VM, 2000), bed.checksum(VM, 2001)];
    let v3 = ext4_image(&bed.work, &tree(3), 3)?;
    guest_writes(&bed, Some(&image), &v3)?;
    bed.guest(&[
        "zero", "-vm", VM, "-disk", "2001", "-offset", "1M", "-length", "512K",
    ]);
    let inc2 = backup(&bed, "inc2", "incremental").await?;
    let point2_sums = [bed.checksum(VM, 2000), bed.checksum(VM, 2001)];
    let _ = full;
    let point1 = point_of(&bed, &inc1).await?;
    let point2 = point_of(&bed, &inc2).await?;
    let p2 = point2.metadata.name.clone().context("name")?;
    let p1 = point1.metadata.name.clone().context("name")?;

    // (c) Both disks at point 2 onto claims Sendense creates (bound here to pre-made volumes).
    let (_pv0, dir0) = volume_for(&bed, "vm-disk-2000", "1Gi")?;
    let (_pv1, dir1) = volume_for(&bed, "vm-disk-2001", "1Gi")?;
    apply_restore(
        &bed,
        "vm",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  target:\n    pvc:\n      storageClassName: \"\"\n      kubeVirt: {{memory: 1Gi, cpus: 2}}\n"
        ),
    )?;
    let vm = restore_ended(&bed, "vm", Phase::Succeeded).await?;
    for (dir, key, sum) in [
        (&dir0, 2000, &point2_sums[0]),
        (&dir1, 2001, &point2_sums[1]),
    ] {
        let img = dir.join("disk.img");
        assert_eq!(
            &sha256_file(&img)?,
            sum,
            "disk {key}'s disk.img is the disk at point 2"
        );
        let m = std::fs::metadata(&img)?;
        assert_eq!(
            m.len(),
            if key == 2000 {
                DISK_2000 as u64
            } else {
                16 * MIB as u64
            }
        );
        assert!(
            m.blocks() * 512 < m.len(),
            "disk {key}'s disk.img is sparse: {} of {} bytes allocated",
            m.blocks() * 512,
            m.len()
        );
        assert!(
            !dir.join("disk.img.sendense-partial").exists(),
            "no partial file is left"
        );
    }
    let st = vm.status.clone().context("status")?;
    assert_eq!(st.progress.as_deref(), Some("100%"));
    assert_eq!(st.bytes_done, st.bytes_total);
    assert_eq!(st.disks.len(), 2);
    for d in &st.disks {
        assert!(d.created, "{d:?}");
        assert_eq!(d.verified, Some(true), "{d:?}");
        assert!(d.bytes_written.unwrap_or(0) < d.capacity_bytes, "{d:?}");
    }
    let kv = st
        .virtual_machine
        .clone()
        .context("a VirtualMachine is rendered")?;
    assert!(kv.contains("claimName: vm-disk-2000") && kv.contains("kind: VirtualMachine"));
    let claim_owner = sendense_e2e::kubectl_ok(&[
        "get",
        "pvc",
        "vm-disk-2000",
        "-n",
        &bed.ns.name,
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ])?;
    assert_eq!(
        claim_owner.trim(),
        "",
        "a restored claim outlives its RestoreJob"
    );

    // A Block-mode claim: disk 2001 at point 2 onto the device itself, its old bytes (0xEE)
    // overwritten, zeros included.
    let device = LoopDevice::new(&bed.work.join("block-2001.img"), 24 * MIB)?;
    let _pv_block = block_volume_for(&bed, "blk-disk-2001", &device.path)?;
    apply_restore(
        &bed,
        "blk",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  disks: [2001]\n  target:\n    pvc:\n      storageClassName: \"\"\n      volumeMode: Block\n"
        ),
    )?;
    let blk = restore_ended(&bed, "blk", Phase::Succeeded).await?;
    let d = &blk.status.context("status")?.disks[0];
    assert_eq!(
        (d.device_key, d.volume_mode, d.verified),
        (2001, Some(VolumeMode::Block), Some(true)),
        "{d:?}"
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {} {} | sha256sum", 16 * MIB, device.path))
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(point2_sums[1].as_str()),
        "the device holds disk 2001 at point 2"
    );

    // Any link of a chain restores: disk 2000 at point 1 onto an existing claim.
    let (_pv2, dir2) = volume_for(&bed, "at-point-1", "1Gi")?;
    claim(&bed, "at-point-1", "100Mi")?;
    apply_restore(
        &bed,
        "p1",
        &format!(
            "  restorePointRef: {{name: {p1}}}\n  disks: [2000]\n  target:\n    pvc:\n      claims: [{{deviceKey: 2000, claimName: at-point-1}}]\n"
        ),
    )?;
    let p1_job = restore_ended(&bed, "p1", Phase::Succeeded).await?;
    assert_eq!(sha256_file(&dir2.join("disk.img"))?, point1_sums[0]);
    assert!(!p1_job.status.context("status")?.disks[0].created);

    // (d) Files from point 2's ext4 into a claim: content, mode and mtime as the guest had them.
    let (_pv3, dir3) = volume_for(&bed, "restored-files", "1Gi")?;
    claim(&bed, "restored-files", "1Gi")?;
    apply_restore(
        &bed,
        "files",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  target:\n    files:\n      paths: [/etc/app.conf, \"/home/**\"]\n      claimName: restored-files\n"
        ),
    )?;
    let files = restore_ended(&bed, "files", Phase::Succeeded).await?;
    let want = tree(3);
    let out = dir3.join("files");
    let got = files_under(&out);
    let expected: Vec<PathBuf> = want
        .keys()
        .filter(|p| p.starts_with("home/") || **p == "etc/app.conf")
        .map(PathBuf::from)
        .chain([PathBuf::from("home/alice/link")])
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(got, expected, "the files selected, and only those");
    for (path, (data, mode, mtime)) in want
        .iter()
        .filter(|(p, _)| expected.contains(&PathBuf::from(p)))
    {
        let p = out.join(path);
        let m = std::fs::metadata(&p)?;
        assert_eq!(&std::fs::read(&p)?, data, "{path}: content");
        assert_eq!(m.mode() & 0o7777, *mode, "{path}: mode");
        assert_eq!(m.mtime(), *mtime, "{path}: mtime");
    }
    assert_eq!(
        std::fs::read_link(out.join("home/alice/link"))?,
        PathBuf::from("notes.txt")
    );
    let fst = files
        .status
        .context("status")?
        .files
        .context("files status")?;
    assert_eq!(fst.files, 4, "{fst:?}");
    assert_eq!(fst.symlinks, 1, "{fst:?}");

    // Bad input: each a clear reason, nothing written, no retries.
    apply_restore(
        &bed,
        "no-such-point",
        "  restorePointRef: {name: nope-12345678}\n  target:\n    pvc: {}\n",
    )?;
    let j = restore_ended(&bed, "no-such-point", Phase::Failed).await?;
    let (reason, message) = failed_with(&j);
    assert_eq!(reason, "RestorePointNotFound", "{message}");
    assert!(message.contains("nope-12345678"), "{message}");

    let (_pv4, _) = volume_for(&bed, "small", "16Mi")?;
    claim(&bed, "small", "16Mi")?;
    apply_restore(
        &bed,
        "too-small",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  target:\n    pvc:\n      claims: [{{deviceKey: 2000, claimName: small}}]\n"
        ),
    )?;
    let j = restore_ended(&bed, "too-small", Phase::Failed).await?;
    let (reason, message) = failed_with(&j);
    assert_eq!(reason, "ClaimTooSmall", "{message}");
    assert!(
        message.contains("small") && message.contains("2000"),
        "{message}"
    );
    let other = sendense_e2e::kubectl(&["get", "pvc", "too-small-disk-2001", "-n", &bed.ns.name])?;
    assert!(
        !other.status.success(),
        "no claim is created when one of them is too small"
    );
    assert_eq!(
        j.status.as_ref().and_then(|s| s.attempts),
        None,
        "no pod ran"
    );

    apply_restore(
        &bed,
        "no-match",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  target:\n    files:\n      paths: [/etc/app.conf, /nowhere/*]\n      claimName: restored-files\n"
        ),
    )?;
    let j = restore_ended(&bed, "no-match", Phase::Failed).await?;
    let (reason, message) = failed_with(&j);
    assert_eq!(reason, "NothingMatched", "{message}");
    assert!(message.contains("/nowhere/*"), "{message}");
    assert_eq!(
        j.status.as_ref().and_then(|s| s.attempts),
        Some(1),
        "not retried"
    );
    assert!(!dir3.join("no-match").exists(), "nothing was written");
    let events = events_of(&bed.ns.name, "no-match").await?;
    assert!(
        events
            .iter()
            .any(|(t, r)| t == "Warning" && r == "NothingMatched"),
        "{events:?}"
    );

    // (a) Point 2 into a new vSphere VM: its disks equal the source's at point 2.
    apply_restore(
        &bed,
        "to-new-vm",
        &format!(
            "  restorePointRef: {{name: {p2}}}\n  target:\n    vsphere:\n      newVm: {{name: restored-vm, datastore: LocalDS_0, cpus: 2}}\n"
        ),
    )?;
    let j = restore_ended(&bed, "to-new-vm", Phase::Succeeded).await?;
    let st = j.status.clone().context("status")?;
    let made = st.vm.clone().context("status.vm")?;
    assert!(made.created && made.name == "restored-vm", "{made:?}");
    let info = bed.sim.cli(&["vm", "-vm", "restored-vm"]);
    let mut keys: Vec<i64> = info["disks"]
        .as_array()
        .context("disks")?
        .iter()
        .filter_map(|d| d["key"].as_i64())
        .collect();
    keys.sort();
    assert_eq!(keys.len(), 2, "{info}");
    for (key, sum) in keys.iter().zip(&point2_sums) {
        assert_eq!(
            &bed.checksum("restored-vm", *key as i32),
            sum,
            "the new VM's disk {key} is the source's disk at point 2"
        );
    }
    for d in &st.disks {
        assert_eq!(d.verified, Some(true), "{d:?}");
        assert!(
            d.file
                .as_deref()
                .is_some_and(|f| f.starts_with("[LocalDS_0] restored-vm/")),
            "{d:?}"
        );
    }
    let vc = bed.vcenter().await?;
    let new_vm = vc
        .find_vm("DC0", &VmSelector::Name("restored-vm".into()))
        .await?;
    // CPUs from the spec; memory and guest OS from the source VM, as the restore point
    // recorded them (the simulator's VMs have 256 MiB).
    let was = point2
        .spec
        .vm
        .hardware
        .clone()
        .context("the point records the hardware")?;
    assert_eq!(was.memory_mib, 256, "{was:?}");
    let hw = vc.vm_state(&new_vm).await?.hardware;
    assert_eq!(
        (hw.num_cpus, hw.memory_mib, hw.guest_id.as_str()),
        (2, was.memory_mib, was.guest_id.as_str()),
        "{hw:?}"
    );
    // The same name again: refused, nothing written.
    apply_restore(
        &bed,
        "name-taken",
        &format!(
            "  restorePointRef: {{name: {p1}}}\n  target:\n    vsphere:\n      newVm: {{name: restored-vm, datastore: LocalDS_0}}\n"
        ),
    )?;
    let j = restore_ended(&bed, "name-taken", Phase::Failed).await?;
    let (reason, message) = failed_with(&j);
    assert_eq!(reason, "VmExists", "{message}");
    for (key, sum) in keys.iter().zip(&point2_sums) {
        assert_eq!(&bed.checksum("restored-vm", *key as i32), sum, "untouched");
    }

    // (b) In place to point 1. A powered-on VM is refused, nothing written.
    let now_sums = [bed.checksum(VM, 2000), bed.checksum(VM, 2001)];
    apply_restore(
        &bed,
        "in-place-on",
        &format!(
            "  restorePointRef: {{name: {p1}}}\n  target:\n    vsphere:\n      inPlace: {{}}\n"
        ),
    )?;
    let j = restore_ended(&bed, "in-place-on", Phase::Failed).await?;
    let (reason, message) = failed_with(&j);
    assert_eq!(reason, "VmPoweredOn", "{message}");
    assert!(message.contains("power it off"), "{message}");
    assert_eq!(j.status.as_ref().and_then(|s| s.attempts), Some(1));
    assert_eq!(
        [bed.checksum(VM, 2000), bed.checksum(VM, 2001)],
        now_sums,
        "nothing was written"
    );
    // Powered off: only the blocks changed since point 1 are written back. A backup of the
    // VM is running (held mid-copy by a bandwidth cap): the restore waits for it, VMBusy,
    // writing nothing, and goes on once it ends.
    let source_vm = vc.find_vm("DC0", &VmSelector::Name(VM.into())).await?;
    vc.set_power(&source_vm, false).await?;
    cap_bandwidth(&bed, Some(8))?;
    bed.apply("busy", &Bed::job_yaml("busy", VM, "full", ""))?;
    mid_copy(&bed, "busy").await?;
    apply_restore(
        &bed,
        "in-place",
        &format!(
            "  restorePointRef: {{name: {p1}}}\n  target:\n    vsphere:\n      inPlace: {{}}\n"
        ),
    )?;
    let message = restore_running_reason(&bed, "in-place", "VMBusy").await?;
    assert!(
        message.contains(&format!("BackupJob {}/busy", bed.ns.name)),
        "names the backup holding the VM: {message}"
    );
    assert_eq!(
        [bed.checksum(VM, 2000), bed.checksum(VM, 2001)],
        now_sums,
        "nothing written while the backup runs"
    );
    cap_bandwidth(&bed, None)?;
    bed.finished("busy", Phase::Succeeded, Duration::from_secs(240))
        .await?;
    let j = restore_ended(&bed, "in-place", Phase::Succeeded).await?;
    assert_eq!(
        [bed.checksum(VM, 2000), bed.checksum(VM, 2001)],
        point1_sums,
        "the VM's disks are back at point 1"
    );
    let st = j.status.clone().context("status")?;
    let rolled = st.vm.clone().context("status.vm")?;
    assert!(!rolled.created && rolled.cbt_reset, "{rolled:?}");
    let capacity: i64 = st.disks.iter().map(|d| d.capacity_bytes).sum();
    let written = st.bytes_written.context("bytes written")?;
    assert!(
        written > 0 && written < capacity / 4,
        "a differential rollback writes the changed blocks only: {written} of {capacity} bytes"
    );
    for d in &st.disks {
        assert_eq!(d.differential, Some(true), "{d:?}");
        assert!(d.bytes_verified.unwrap_or(0) > 0, "read back: {d:?}");
    }
    let complete = j
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Complete"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(complete.contains("only the blocks changed"), "{complete}");
    // CBT was reset: the next backup is a full one, and it holds point 1's data.
    let after = backup(&bed, "after-rollback", "incremental").await?;
    let after_point = point_of(&bed, &after).await?;
    for d in &after_point.spec.disks {
        assert_eq!(
            d.copy,
            sendense_crds::backup_job::CopyKind::Full,
            "the backup after an in-place restore is full: {d:?}"
        );
    }
    assert_eq!(
        after_point
            .spec
            .disks
            .iter()
            .map(|d| d.sha256.clone())
            .collect::<Vec<_>>(),
        point1_sums.to_vec()
    );
    vc.logout().await;

    // The chain's files are read, never written.
    let metrics = bed.metrics().await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendense_restores_total")
                && l.contains("result=\"succeeded\"")
                && l.contains("target=\"pvc\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );
    for job in [&inc2] {
        let rp = point_of(&bed, job).await?;
        for d in &rp.spec.disks {
            bed.verify(&d.file, &d.sha256)?;
        }
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(sendense_e2e::client().await?, &bed.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = pods
            .list(&kube::api::ListParams::default().labels("sendense.io/restorejob"))
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "restore pods are removed when their job ends: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
