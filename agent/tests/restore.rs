//! `sendense-agent restore` against real QCOW2 chains made by qemu-img and qemu-io: restored
//! disks equal `qemu-img convert` of the same chain byte for byte, file targets stay sparse,
//! the chain's files are never modified, and bad input writes nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use sendense_contract::restore::{Refusal, RestoreResult};
use sha2::{Digest, Sha256};
use support::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
}

/// Runs `restore` with `args`; its exit code and its JSON result.
fn restore(args: &[String]) -> Result<(i32, RestoreResult)> {
    let out = agent().arg("restore").args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = RestoreResult::parse(&stdout).unwrap_or_else(|| {
        panic!(
            "no result on stdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Ok((out.status.code().unwrap_or(-1), result))
}

fn qemu_io(file: &Path, format: &str, cmds: &[&str]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(file))?;
    Ok(())
}

fn overlay(file: &Path, backing: &Path) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing.file_name().expect("name"))
        .arg(file))?;
    Ok(())
}

/// A three-link chain: data, then overwrites, zeroed ranges and discards, then more data.
struct Chain {
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
}

fn chain(s: &Scratch) -> Result<Chain> {
    let base = s.path("base.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg(DISK.to_string()))?;
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 10M 5M",
            "write -P 0x33 40M 1M",
            "write -P 0x44 63M 1M",
        ],
    )?;
    let mid = s.path("mid.qcow2");
    overlay(&mid, &base)?;
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x55 1M 512k",
            "write -z 10M 2M",
            "write -P 0x66 30M 4M",
            "discard 40M 1M",
        ],
    )?;
    let top = s.path("top.qcow2");
    overlay(&top, &mid)?;
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x77 2M 2M",
            "write -P 0x88 50M 64k",
            "write -z 63M 1M",
            // Data with zeros inside one cluster: block status says data, the bytes say zeros.
            "write -P 0x99 20M 256k",
            "write -z 20979712 16k",
            "write -P 0 21233664 4k",
        ],
    )?;
    Ok(Chain { base, mid, top })
}

/// The disk as qemu-img reads the chain: the reference every restore is compared with.
fn converted(s: &Scratch, qcow2: &Path, name: &str) -> Result<PathBuf> {
    let out = s.path(name);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2)
        .arg(&out))?;
    Ok(out)
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

fn files_digest(c: &Chain) -> Result<Vec<(String, std::time::SystemTime)>> {
    [&c.base, &c.mid, &c.top]
        .iter()
        .map(|p| Ok((sha256_file(p)?, std::fs::metadata(p)?.modified()?)))
        .collect()
}

fn s(v: &str) -> String {
    v.to_owned()
}

#[test]
fn restores_a_chain_to_a_sparse_image_file_identical_to_qemu_img_convert() -> Result<()> {
    let sc = Scratch::new("restore-file");
    let c = chain(&sc)?;
    let before = files_digest(&c)?;
    let reference = converted(&sc, &c.top, "reference.raw")?;
    let want = sha256_file(&reference)?;
    let target_dir = sc.path("pvc");
    std::fs::create_dir(&target_dir)?;
    let target = target_dir.join("disk.img");
    // An old disk.img with other content is replaced, never merged with.
    std::fs::write(&target, vec![0xEEu8; 3 * MIB as usize])?;

    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
        s("--expect-sha256"),
        format!("2000:{want}"),
    ])?;
    assert_eq!(code, 0, "{r:?}");
    assert!(r.ok && !r.nothing_written, "{r:?}");
    let d = &r.disks[0];
    assert_eq!((d.key, d.capacity, d.bytes_total), (2000, DISK, DISK));
    assert_eq!(d.verified, Some(true));
    assert_eq!(d.sha256.as_deref(), Some(want.as_str()));
    assert_eq!(sha256_file(&target)?, want);
    assert_eq!(std::fs::metadata(&target)?.len(), DISK);
    // Exactly the 4 KiB blocks that hold a non-zero byte are written: holes, zeroed ranges
    // and zeros inside data (as `qemu-img convert -S 4k` would skip them) stay unallocated.
    let reference_bytes = std::fs::read(&reference)?;
    let nonzero = reference_bytes
        .chunks(4096)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64
        * 4096;
    assert_eq!(d.bytes_written, nonzero, "{d:?}");
    assert_eq!(d.bytes_written + d.bytes_skipped, DISK, "{d:?}");
    assert!(
        allocated(&target)? <= d.bytes_written + MIB,
        "sparse: {} bytes allocated for {} written",
        allocated(&target)?,
        d.bytes_written
    );
    assert!(!target_dir.join("disk.img.sendense-partial").exists());
    assert_eq!(files_digest(&c)?, before, "the chain's files were modified");

    // Any link restores: the middle one too.
    let mid_ref = converted(&sc, &c.mid, "mid.raw")?;
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.mid.display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
    ])?;
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(sha256_file(&target)?, sha256_file(&mid_ref)?);
    assert_eq!(files_digest(&c)?, before);
    Ok(())
}

#[test]
fn rollback_writes_only_the_areas_and_devices_get_every_byte() -> Result<()> {
    let sc = Scratch::new("restore-rollback");
    let c = chain(&sc)?;
    let top_raw = converted(&sc, &c.top, "top.raw")?;
    let mid_raw = converted(&sc, &c.mid, "mid.raw")?;
    // The disk holds the top state; roll it back to mid by writing only what top changed.
    let disk = sc.path("disk.raw");
    std::fs::copy(&top_raw, &disk)?;
    let areas = sc.path("areas");
    std::fs::write(
        &areas,
        format!(
            "# written by top\n{}+{}\n{}+{}\n{}+{}\n{}+{}\n",
            2 * MIB,
            2 * MIB,
            50 * MIB,
            64 << 10,
            63 * MIB,
            MIB,
            20 * MIB,
            256 << 10
        ),
    )?;
    // Restores mid over the disk, only the areas in the file.
    let roll_back = || {
        restore(&[
            s("--source"),
            format!("2000:{}", c.mid.display()),
            s("--target"),
            format!("2000:file:{}", disk.display()),
            s("--areas-file"),
            format!("2000:{}", areas.display()),
        ])
    };
    let (code, r) = roll_back()?;
    assert_eq!(code, 0, "{r:?}");
    let d = &r.disks[0];
    assert_eq!(d.bytes_total, 3 * MIB + (64 << 10) + (256 << 10), "{d:?}");
    assert_eq!(sha256_file(&disk)?, sha256_file(&mid_raw)?);

    // An area off the 4 KiB grid: exactly its bytes are rolled back, its neighbours in the same
    // 4 KiB block keep the disk's bytes (the copy does not widen a rollback's writes).
    std::fs::copy(&top_raw, &disk)?;
    let (at, len) = (2 * MIB as usize + 100, 1000usize);
    let (top_b, mid_b) = (std::fs::read(&top_raw)?, std::fs::read(&mid_raw)?);
    assert!(
        top_b[at - 100..at] != mid_b[at - 100..at]
            && top_b[at + len..at + len + 100] != mid_b[at + len..at + len + 100],
        "the test needs top and mid to differ around the area"
    );
    std::fs::write(&areas, format!("{at}+{len}\n"))?;
    let (code, r) = roll_back()?;
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.disks[0].bytes_total, len as u64, "{:?}", r.disks[0]);
    let mut want = top_b.clone();
    want[at..at + len].copy_from_slice(&mid_b[at..at + len]);
    assert!(
        std::fs::read(&disk)? == want,
        "only the area's bytes changed"
    );

    // A "device" (a file standing in for one) full of old bytes: zeros are written too.
    let dev = sc.path("dev.raw");
    std::fs::write(&dev, vec![0xEEu8; (DISK + MIB) as usize])?;
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--target"),
        format!("2000:device:{}", dev.display()),
        s("--expect-sha256"),
        format!("2000:{}", sha256_file(&top_raw)?),
    ])?;
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.disks[0].verified, Some(true));
    let bytes = std::fs::read(&dev)?;
    assert_eq!(&bytes[..DISK as usize], &std::fs::read(&top_raw)?[..]);
    assert!(
        bytes[DISK as usize..].iter().all(|b| *b == 0xEE),
        "past the disk untouched"
    );
    Ok(())
}

#[test]
fn bad_input_writes_nothing_and_says_why() -> Result<()> {
    let sc = Scratch::new("restore-bad");
    let c = chain(&sc)?;
    let target = sc.path("disk.img");
    std::fs::write(&target, b"keep me")?;

    // A restore point file that does not exist.
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", sc.path("missing.qcow2").display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
    ])?;
    assert_eq!(code, 1);
    assert!(!r.ok && r.nothing_written, "{r:?}");
    assert_eq!(r.refused, Some(Refusal::SourceNotFound));
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("disk 2000") && e.contains("missing.qcow2"),
        "{e}"
    );

    // An export too small for the disk: the sizes are named, nothing is written.
    let small = sc.path("small.raw");
    raw_file(&small, 16 * MIB)?;
    let server = qemu_nbd(&small, &sc.path("small.sock"), "raw", &[])?;
    let url = format!("nbd+unix:///?socket={}", server.socket.display());
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
        s("--source"),
        format!("2001:{}", c.top.display()),
        s("--target"),
        format!("2001:nbd:{url}"),
    ])?;
    assert_eq!(code, 1);
    assert!(r.nothing_written, "{r:?}");
    assert_eq!(r.refused, Some(Refusal::TargetTooSmall));
    let e = r.error.unwrap_or_default();
    assert!(
        e.contains("disk 2001")
            && e.contains(&format!("{}", 16 * MIB))
            && e.contains(&format!("{DISK}")),
        "{e}"
    );
    drop(server);
    assert_eq!(std::fs::read(&target)?, b"keep me", "disk 2000 was written");
    assert!(std::fs::read(&small)?.iter().all(|b| *b == 0));

    // A target directory that does not exist; a source without a target.
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--target"),
        format!("2000:file:{}", sc.path("no/such/dir/disk.img").display()),
    ])?;
    assert_eq!((code, r.nothing_written), (1, true));
    assert_eq!(r.refused, Some(Refusal::TargetUnusable));
    assert!(r.error.unwrap_or_default().contains("no/such/dir"));
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--source"),
        format!("2001:{}", c.top.display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
    ])?;
    assert_eq!((code, r.nothing_written), (1, true));
    assert_eq!(r.refused, Some(Refusal::BadArguments));
    assert!(r.error.unwrap_or_default().contains("disk 2001 has none"));

    // A restored disk that does not hash as expected: the old file stays, the partial goes.
    let (code, r) = restore(&[
        s("--source"),
        format!("2000:{}", c.top.display()),
        s("--target"),
        format!("2000:file:{}", target.display()),
        s("--expect-sha256"),
        format!("2000:{}", "0".repeat(64)),
    ])?;
    assert_eq!(code, 1);
    assert!(!r.ok && !r.nothing_written, "{r:?}");
    assert_eq!(
        r.refused, None,
        "a failed restore is not a refusal: it may be retried"
    );
    assert_eq!(r.disks[0].verified, Some(false));
    assert!(r.error.unwrap_or_default().contains("hashes"));
    assert_eq!(std::fs::read(&target)?, b"keep me");
    assert!(!sc.path("disk.img.sendense-partial").exists());
    Ok(())
}
