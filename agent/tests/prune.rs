//! `repo prune` on real QCOW2 chains (qemu-img, qemu-io): a restore point merged out of its
//! chain at its base, middle and top, and with two children; refusals that write nothing; and
//! prunes killed at random moments that resume, every kept point reading byte-identically
//! throughout (its recorded SHA-256 through its chain, read by `qemu-img convert`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sendense_agent::repo::{Orphans, probe};
use sendense_contract::cli::RepoPruneArgs;
use sendense_contract::manifest::{
    DiskCopy, JobIdentity, MANIFEST_FILE, Manifest, ManifestDisk, MergeStrategy, ParentIdentity,
    VmIdentity,
};
use sendense_contract::prune::{PruneRefusal, PruneResult};
use sha2::{Digest, Sha256};
use support::{Scratch, pattern, run};

const DISK: u64 = 64 << 20;
const KEYS: [i32; 2] = [2000, 2001];
const LAYOUT: &str = "ns/vm";

fn dir_of(name: &str) -> String {
    format!("{LAYOUT}/{name}-uid-{name}-a1")
}

/// A tiny deterministic generator (xorshift), seeded.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// SHA-256 of a chain as a restore reads it: `qemu-img convert` to raw, hashed.
fn chain_sha(scratch: &Path, file: &Path) -> String {
    let raw = scratch.join(format!(
        "read-{}.raw",
        file.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(file)
        .arg(&raw))
    .expect("chain reads");
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(&raw).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    std::fs::remove_file(&raw).unwrap();
    hex::encode(h.finalize())
}

/// Writes seeded random data at scattered offsets (some over earlier data), and zeros.
fn scribble(scratch: &Path, file: &Path, rng: &mut Rng, data_writes: usize, max_len: u64) {
    let mut cmds = Vec::new();
    for i in 0..data_writes {
        let len = (1 + rng.below(max_len >> 16)) << 16;
        // Some writes start mid-cluster: a layer's partial clusters.
        let off = (rng.below((DISK - len) >> 12) << 12).min(DISK - len);
        let src = scratch.join(format!("src-{i}"));
        std::fs::write(&src, pattern(rng.next(), len as usize)).unwrap();
        cmds.push(format!("write -q -s {} {off} {len}", src.display()));
    }
    for _ in 0..2 {
        let len = 512 << 10;
        let off = rng.below((DISK - len) >> 16) << 16;
        cmds.push(format!("write -q -z {off} {len}"));
    }
    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "qcow2"]);
    for c in &cmds {
        qemu_io.args(["-c", c]);
    }
    run(qemu_io.arg(file)).expect("qemu-io writes");
}

/// Restore points: (name, parent name). Each is written as a backup and a commit would:
/// QCOW2 files made by `hub prepare`, data, a manifest with the chain's SHA-256.
fn build(root: &Path, scratch: &Path, points: &[(&str, Option<&str>)], seed: u64) {
    for (i, (name, parent)) in points.iter().enumerate() {
        let dir = dir_of(name);
        let mut disks = Vec::new();
        for key in KEYS {
            let file = format!("{dir}/{key}.qcow2");
            let backing = parent.map(|p| format!("{}/{key}.qcow2", dir_of(p)));
            sendense_agent::hub::prepare(
                &root.join(&file),
                DISK,
                backing.as_ref().map(|b| root.join(b)).as_deref(),
            )
            .expect("hub prepare");
            let mut rng = Rng((seed ^ ((i as u64 + 1) << 32) ^ key as u64) | 1);
            let (writes, max) = if parent.is_none() {
                (12, 3 << 20)
            } else {
                (6, 2 << 20)
            };
            scribble(scratch, &root.join(&file), &mut rng, writes, max);
            disks.push(ManifestDisk {
                device_key: key,
                label: format!("Hard disk {}", key - 1999),
                sha256: chain_sha(scratch, &root.join(&file)),
                file,
                backing_file: backing,
                capacity_bytes: DISK,
                copy: if parent.is_some() {
                    DiskCopy::Incremental
                } else {
                    DiskCopy::Full
                },
                change_id_used: None,
                change_id_reached: format!("52 aa/{i}"),
                bytes_written: 0,
                bytes_verified: None,
            });
        }
        let m = Manifest {
            version: 1,
            job: JobIdentity {
                namespace: "ns".into(),
                name: name.to_string(),
                uid: format!("uid-{name}"),
            },
            attempt: 1,
            repository: "primary".into(),
            source_node: "vc".into(),
            vcenter: "https://vc/sdk".into(),
            vm: VmIdentity {
                name: "vm".into(),
                instance_uuid: "5029a8f2".into(),
                hardware: None,
            },
            snapshot: None,
            parent: parent.map(|p| ParentIdentity {
                name: p.to_string(),
                directory: dir_of(p),
            }),
            directory: dir.clone(),
            started: "2026-11-25T10:00:00Z".into(),
            completed: "2026-11-25T10:05:00Z".into(),
            scheduled: None,
            disks,
            retention: None,
        };
        std::fs::write(root.join(&dir).join(MANIFEST_FILE), m.to_json()).unwrap();
    }
}

/// The manifests on the volume, by directory.
fn manifests(root: &Path) -> BTreeMap<String, Manifest> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root.join(LAYOUT)) else {
        return out;
    };
    for e in entries {
        let path = e.unwrap().path().join(MANIFEST_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let m = Manifest::parse(&text).expect("manifests stay readable");
            out.insert(m.directory.clone(), m);
        }
    }
    out
}

/// Every restore point on the volume but `except` reads, through its chain, as its manifest
/// records.
fn assert_kept_points_verify(root: &Path, scratch: &Path, except: Option<&str>) {
    for (dir, m) in manifests(root) {
        if Some(dir.as_str()) == except {
            continue;
        }
        assert!(!m.being_pruned(), "{dir} is journalled");
        for d in &m.disks {
            let found = chain_sha(scratch, &root.join(&d.file));
            if found != d.sha256 {
                let chain = run(Command::new("qemu-img")
                    .args(["info", "-U", "--backing-chain"])
                    .arg(root.join(&d.file)))
                .unwrap_or_else(|e| e.to_string());
                let journal: Vec<String> = manifests(root)
                    .values()
                    .filter_map(|m| m.retention.as_ref())
                    .map(|r| format!("{r:?}"))
                    .collect();
                panic!(
                    "disk {} of {dir} reads as {found}, its manifest records {}\nchain:\n{chain}\njournal: {journal:?}",
                    d.device_key, d.sha256
                );
            }
        }
    }
}

/// After `point` was pruned: its directory is gone, nothing names it, the probe lists `kept`.
fn assert_pruned(root: &Path, point: &str, kept: &[&str]) {
    assert!(!root.join(point).exists(), "{point} is still there");
    let all = manifests(root);
    for m in all.values() {
        assert!(
            m.parent.as_ref().is_none_or(|p| p.directory != point),
            "{} still names {point} as its parent",
            m.directory
        );
        for d in &m.disks {
            let b = d.backing_file.as_deref().unwrap_or_default();
            assert!(!b.starts_with(point), "{}: {b}", m.directory);
            assert_eq!(d.copy == DiskCopy::Full, d.backing_file.is_none());
            let info = run(Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(root.join(&d.file)))
            .unwrap();
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            let header = v["backing-filename"].as_str().map(|h| {
                support_lexical(&root.join(&m.directory).join(h))
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            });
            assert_eq!(header, d.backing_file, "{}", d.file);
            if let Some(h) = v["backing-filename"].as_str() {
                assert!(h.starts_with("../"), "backing {h} written relative");
            }
        }
    }
    let dirs: Vec<String> = all.keys().cloned().collect();
    let mut want: Vec<String> = kept.iter().map(|k| dir_of(k)).collect();
    want.sort();
    assert_eq!(dirs, want);
    let (probed, found) = probe(root, true, &Orphans::default());
    assert!(probed.ok, "{probed:?}");
    assert_eq!(probed.restore_points, Some(kept.len() as u64));
    assert_eq!(probed.points_being_pruned, Some(0));
    assert!(found.uncommitted.is_empty(), "{:?}", found.uncommitted);
}

fn support_lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            o => out.push(o.as_os_str()),
        }
    }
    out
}

async fn prune(root: &Path, point: &str) -> PruneResult {
    sendense_agent::prune::prune(&RepoPruneArgs::new(root, point)).await
}

fn strategies(r: &PruneResult) -> Vec<(i32, MergeStrategy)> {
    r.steps
        .iter()
        .map(|s| (s.device_key, s.strategy.unwrap()))
        .collect()
}

const CHAIN: [(&str, Option<&str>); 4] = [
    ("full", None),
    ("inc1", Some("full")),
    ("inc2", Some("inc1")),
    ("inc3", Some("inc2")),
];

#[tokio::test]
async fn a_chain_pruned_at_its_base_middle_and_top_keeps_every_kept_point_byte_identical() {
    let s = Scratch::new("prune-chain");
    let root = s.path("volume");
    build(&root, &s.0, &CHAIN, 0x5eed);

    // The full under a small incremental: its only child's data is committed down.
    let plan = sendense_agent::prune::prune(&RepoPruneArgs {
        dry_run: true,
        ..RepoPruneArgs::new(&root, dir_of("full"))
    })
    .await;
    assert!(plan.ok && plan.dry_run && plan.nothing_written, "{plan:?}");
    assert!(plan.bytes_freed > 0, "{plan:?}");
    let r = prune(&root, &dir_of("full")).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(strategies(&r), KEYS.map(|k| (k, MergeStrategy::CommitDown)));
    assert_eq!(strategies(&plan), strategies(&r));
    assert_eq!(r.children, [dir_of("inc1")]);
    assert!(r.steps.iter().all(|s| s.verified == Some(true)));
    assert!(r.bytes_freed > 0 && r.bytes_moved > 0, "{r:?}");
    assert_pruned(&root, &dir_of("full"), &["inc1", "inc2", "inc3"]);
    assert_kept_points_verify(&root, &s.0, None);
    let inc1 = &manifests(&root)[&dir_of("inc1")];
    assert!(inc1.parent.is_none() && inc1.disks.iter().all(|d| d.copy == DiskCopy::Full));

    // A middle incremental: inc2 between inc1 (now the base) and inc3.
    let r = prune(&root, &dir_of("inc2")).await;
    assert!(r.ok, "{r:?}");
    assert_pruned(&root, &dir_of("inc2"), &["inc1", "inc3"]);
    assert_kept_points_verify(&root, &s.0, None);
    assert_eq!(
        manifests(&root)[&dir_of("inc3")]
            .parent
            .as_ref()
            .map(|p| p.directory.clone()),
        Some(dir_of("inc1"))
    );

    // The top: no children, just deleted (journalled all the same).
    let r = prune(&root, &dir_of("inc3")).await;
    assert!(r.ok && r.steps.is_empty() && r.children.is_empty(), "{r:?}");
    assert_pruned(&root, &dir_of("inc3"), &["inc1"]);
    assert_kept_points_verify(&root, &s.0, None);

    // Again: gone, and nothing names it.
    let again = prune(&root, &dir_of("inc3")).await;
    assert!(again.ok && again.already, "{again:?}");
}

#[tokio::test]
async fn a_point_with_two_children_is_rebased_into_both() {
    let s = Scratch::new("prune-fork");
    let root = s.path("volume");
    build(
        &root,
        &s.0,
        &[
            ("full", None),
            ("inc1", Some("full")),
            ("inc2a", Some("inc1")),
            ("inc2b", Some("inc1")),
        ],
        0xf02c,
    );
    let r = prune(&root, &dir_of("inc1")).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.steps.len(), 4, "{r:?}");
    assert!(
        r.steps
            .iter()
            .all(|s| s.strategy == Some(MergeStrategy::RebaseUp) && s.verified == Some(true))
    );
    assert_eq!(r.children, [dir_of("inc2a"), dir_of("inc2b")]);
    assert_pruned(&root, &dir_of("inc1"), &["full", "inc2a", "inc2b"]);
    assert_kept_points_verify(&root, &s.0, None);
    for c in ["inc2a", "inc2b"] {
        let m = &manifests(&root)[&dir_of(c)];
        assert_eq!(m.parent.as_ref().unwrap().directory, dir_of("full"));
        assert!(m.disks.iter().all(|d| d.copy == DiskCopy::Incremental));
    }
}

/// Every file under `root` with its size, modification time and (for manifests) contents.
fn tree(root: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime, String)> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                pending.push(e.path());
            }
            let text = if e.file_name() == MANIFEST_FILE {
                std::fs::read_to_string(e.path()).unwrap()
            } else {
                String::new()
            };
            out.push((e.path(), meta.len(), meta.modified().unwrap(), text));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn refusals_name_the_point_and_the_fix_and_write_nothing() {
    let s = Scratch::new("prune-refuse");
    let root = s.path("volume");
    build(&root, &s.0, &CHAIN[..2], 0x2ef5);
    // An attempt that did not commit, with nothing layered on it.
    let attempt = dir_of("inc2");
    sendense_agent::hub::prepare(
        &root.join(&attempt).join("2000.qcow2"),
        DISK,
        Some(&root.join(dir_of("inc1")).join("2000.qcow2")),
    )
    .unwrap();
    // A symbolic link inside the volume that leads out of it (and back).
    std::os::unix::fs::symlink(&s.0, root.join("ns/escape")).unwrap();
    let before = tree(&root);

    let r = prune(&root, &attempt).await;
    assert_eq!(r.refused, Some(PruneRefusal::NotARestorePoint), "{r:?}");
    let e = r.error.unwrap();
    assert!(e.contains(&attempt) && e.contains("--remove-orphan"), "{e}");

    // The same attempt is a backup in flight on inc1.
    let r = prune(&root, &dir_of("inc1")).await;
    assert_eq!(r.refused, Some(PruneRefusal::BackupInFlight), "{r:?}");
    let e = r.error.unwrap();
    assert!(e.contains(&dir_of("inc1")) && e.contains(&attempt), "{e}");

    for outside in ["../volume/ns", "/etc", "ns/vm/../../..", ""] {
        let r = prune(&root, outside).await;
        assert_eq!(
            r.refused,
            Some(PruneRefusal::NotInsideRoot),
            "{outside}: {r:?}"
        );
    }
    let r = prune(&root, "ns/escape/volume/ns/vm").await;
    assert_eq!(r.refused, Some(PruneRefusal::NotInsideRoot), "{r:?}");

    for r in [
        prune(&root, &attempt).await,
        prune(&root, &dir_of("inc1")).await,
    ] {
        assert!(r.nothing_written && !r.ok, "{r:?}");
    }
    assert_eq!(tree(&root), before, "a refused prune changed the volume");
    assert_kept_points_verify(&root, &s.0, None);
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Runs the built agent's `repo prune` to its end (a generous deadline: never forever).
fn prune_process(root: &Path, point: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
        .args(RepoPruneArgs::new(root, point).to_args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent starts")
}

fn finish(child: std::process::Child, what: &str) -> PruneResult {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "{what}: still running after 600 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r = PruneResult::parse(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|| {
        panic!(
            "{what}: no result; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && r.ok,
        "{what}: {r:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

#[test]
fn a_prune_killed_at_any_moment_resumes_and_every_kept_point_verifies() {
    let seed: u64 = std::env::var("SENDENSE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("kill test seed: {seed} (SENDENSE_TEST_SEED={seed} repeats it)");
    let s = Scratch::new("prune-kill");
    let template = s.path("template");
    build(&template, &s.0, &CHAIN, seed | 1);
    let copy = |to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        run(Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(&template)
            .arg(to))
        .expect("copy of the chain");
    };
    // Base (commit-down), middle, and the incremental under the top.
    let points = ["full", "inc1", "inc2"];
    let mut took = BTreeMap::new();
    for p in points {
        let root = s.path(&format!("timed-{p}"));
        copy(&root);
        let t = Instant::now();
        finish(
            prune_process(&root, &dir_of(p)),
            &format!("uninterrupted {p}"),
        );
        took.insert(p, t.elapsed());
        std::fs::remove_dir_all(&root).unwrap();
    }
    println!("uninterrupted prunes took {took:?}");
    let mut rng = Rng(seed | 1);
    for run_no in 0..10 {
        let p = points[run_no % points.len()];
        let point = dir_of(p);
        let root = s.path("killed");
        copy(&root);
        let delay = Duration::from_micros(rng.below(took[p].as_micros() as u64 + 1));
        let child = prune_process(&root, &point);
        std::thread::sleep(delay);
        // Frozen first, so that the qemu processes it started are all known before it dies.
        let pid = child.id();
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let helpers = children_of(pid);
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let mut child = child;
        let _ = child.wait();
        // Its qemu-img and qemu-nbd die with it (they must not race the resumed prune).
        let deadline = Instant::now() + Duration::from_secs(60);
        while helpers
            .iter()
            .any(|h| Path::new(&format!("/proc/{h}")).exists() && !zombie(*h))
        {
            assert!(
                Instant::now() < deadline,
                "run {run_no}: helpers {helpers:?} outlived the killed agent"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let journalled = manifests(&root)
            .get(&point)
            .is_some_and(Manifest::being_pruned);
        println!(
            "run {run_no}: {p} killed after {delay:?} ({} helpers, journal {journalled})",
            helpers.len()
        );
        assert_kept_points_verify(&root, &s.0, Some(&point));
        if journalled {
            let (probed, found) = probe(&root, true, &Orphans::default());
            assert_eq!(probed.points_being_pruned, Some(1), "run {run_no}");
            assert!(
                found
                    .manifests
                    .iter()
                    .any(|m| m.directory == point && m.being_pruned())
            );
        }
        let r = finish(
            prune_process(&root, &point),
            &format!("run {run_no}: resumed {p}"),
        );
        assert_eq!(r.resumed, journalled, "run {run_no}: {r:?}");
        let kept: Vec<&str> = CHAIN.iter().map(|c| c.0).filter(|c| *c != p).collect();
        assert_pruned(&root, &point, &kept);
        assert_kept_points_verify(&root, &s.0, None);
    }
}

/// A process that has exited but not been reaped (its parent was killed: init reaps it).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

/// Two prunes of one volume never merge at once: the second (a pod's replacement while the
/// force-deleted pod's process still runs) waits for the volume's lock, then finds its work
/// done or does it.
#[test]
fn a_second_prune_waits_for_the_volumes_lock() {
    let s = Scratch::new("prune-lock");
    let root = s.path("volume");
    build(&root, &s.0, &CHAIN, 0x10c4);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(sendense_agent::prune::lock::LOCK_FILE))
        .unwrap();
    lock.lock().expect("the test holds the lock");
    let mut waiting = prune_process(&root, &dir_of("inc2"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the prune ran while another held the volume's lock"
    );
    assert!(
        manifests(&root)[&dir_of("inc2")].retention.is_none(),
        "the waiting prune wrote its journal"
    );
    drop(lock);
    let r = finish(waiting, "the prune after the lock was released");
    assert!(!r.resumed, "{r:?}");
    assert_pruned(&root, &dir_of("inc2"), &["full", "inc1", "inc3"]);
    assert_kept_points_verify(&root, &s.0, None);
}
