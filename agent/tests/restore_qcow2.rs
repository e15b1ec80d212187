//! `sendense-agent restore` into a file reads the chain in process (agent/src/qcow2) when it
//! can, and through qemu-nbd when the chain uses something the reader does not support. Either
//! way the restored disk equals `qemu-img convert` of the chain byte for byte, exactly the
//! non-zero 4 KiB blocks are written, and the chain's files are never modified. The chains
//! are real ones, made by qemu-img and written by qemu-io.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use sendense_contract::restore::RestoreResult;
use sha2::{Digest, Sha256};
use support::*;

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB;

/// How the restore read the chain (from the agent's debug log).
#[derive(Debug, PartialEq, Eq)]
enum ReadBy {
    InProcess,
    QemuNbd,
}

fn qemu_img(args: &[&str], files: &[&Path]) -> Result<()> {
    run(Command::new("qemu-img").args(args).args(files))?;
    Ok(())
}

fn qemu_io(file: &Path, cmds: &[&str]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(file))?;
    Ok(())
}

/// `qemu-img create -f qcow2` with `opts`, over `backing` (by its file name, in the same
/// directory) of `format`.
fn create(file: &Path, opts: &str, backing: Option<(&Path, &str)>, size: u64) -> Result<()> {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", "-o", opts]);
    if let Some((b, format)) = backing {
        c.args(["-F", format, "-b"])
            .arg(b.file_name().expect("name"));
    }
    run(c.arg(file).arg(size.to_string()))?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

fn digests(files: &[&Path]) -> Result<Vec<(String, std::time::SystemTime)>> {
    files
        .iter()
        .map(|p| Ok((sha256_file(p)?, std::fs::metadata(p)?.modified()?)))
        .collect()
}

/// Restores `top` into a new file and checks it against `qemu-img convert`; `files` (every
/// file of the chain) must be left as they were. How the chain was read.
fn restore_and_compare(sc: &Scratch, top: &Path, files: &[&Path]) -> Result<ReadBy> {
    use std::os::unix::fs::MetadataExt;
    let before = digests(files)?;
    let reference = sc.path("reference.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw"], &[top, &reference])?;
    let target = sc.path("restored.img");
    let _ = std::fs::remove_file(&target);
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
        .env("RUST_LOG", "sendense_agent=debug")
        .arg("restore")
        .arg("--source")
        .arg(format!("2000:{}", top.display()))
        .arg("--target")
        .arg(format!("2000:file:{}", target.display()))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = RestoreResult::parse(&stdout)
        .unwrap_or_else(|| panic!("no result on stdout: {stdout}\nstderr: {stderr}"));
    assert!(r.ok, "{r:?}\n{stderr}");
    let reference_bytes = std::fs::read(&reference)?;
    assert!(
        std::fs::read(&target)? == reference_bytes,
        "{} restored differs from qemu-img convert",
        top.display()
    );
    let nonzero = reference_bytes
        .chunks(4096)
        .filter(|b| b.iter().any(|x| *x != 0))
        .count() as u64
        * 4096;
    let d = &r.disks[0];
    assert_eq!(d.bytes_written, nonzero, "{d:?}");
    assert_eq!(d.bytes_written + d.bytes_skipped, d.capacity, "{d:?}");
    assert_eq!(d.bytes_total, d.capacity, "{d:?}");
    assert!(
        std::fs::metadata(&target)?.blocks() * 512 <= d.bytes_written + MIB,
        "not sparse"
    );
    assert_eq!(digests(files)?, before, "the chain's files were modified");
    Ok(if stderr.contains("through qemu-nbd") {
        ReadBy::QemuNbd
    } else {
        assert!(stderr.contains("in process"), "{stderr}");
        ReadBy::InProcess
    })
}

/// A base and two overlays with `opts`: data, zeros written over data below, discards,
/// partial clusters, data holding zeros.
fn three_links(sc: &Scratch, opts: &str) -> Result<[PathBuf; 3]> {
    let [base, mid, top] = ["base.qcow2", "mid.qcow2", "top.qcow2"].map(|n| sc.path(n));
    create(&base, opts, None, DISK)?;
    qemu_io(
        &base,
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 10M 5M",
            "write -P 0x33 40M 1M",
            "write -P 0x44 63M 1M",
            "write -P 0x45 45M 6k",
        ],
    )?;
    create(&mid, opts, Some((&base, "qcow2")), DISK)?;
    qemu_io(
        &mid,
        &[
            "write -P 0x55 1M 512k",
            "write -z 10M 2M",
            "write -z 13M 4k",
            "write -P 0x66 30M 4M",
            "discard 40M 1M",
            "write -P 0x67 45M 2k",
        ],
    )?;
    create(&top, opts, Some((&mid, "qcow2")), DISK)?;
    qemu_io(
        &top,
        &[
            "write -P 0x77 2M 2M",
            "write -P 0x88 50M 64k",
            "write -z 63M 1M",
            "write -P 0x99 20M 256k",
            "write -z 20979712 16k",
            "write -P 0 21233664 4k",
            "write -P 0x9a 12345678 3k",
            "discard 30M 1M",
        ],
    )?;
    Ok([base, mid, top])
}

#[test]
fn cluster_sizes_and_extended_l2_are_read_in_process() -> Result<()> {
    for (name, opts) in [
        ("c4k", "cluster_size=4096"),
        ("c2m", "cluster_size=2097152"),
        ("c512", "cluster_size=512"),
        ("extl2", "cluster_size=65536,extended_l2=on"),
        ("extl2-2m", "cluster_size=2097152,extended_l2=on"),
        ("v2", "cluster_size=65536,compat=0.10"),
    ] {
        let sc = Scratch::new(&format!("qcow2-{name}"));
        let [base, mid, top] = three_links(&sc, opts)?;
        let files = [base.as_path(), &mid, &top];
        // v2 images have no zero clusters: qemu-io writes zeros as data there.
        assert_eq!(
            restore_and_compare(&sc, &top, &files)?,
            ReadBy::InProcess,
            "{name}"
        );
        assert_eq!(
            restore_and_compare(&sc, &mid, &files)?,
            ReadBy::InProcess,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn raw_and_shorter_backing_files_are_read_in_process() -> Result<()> {
    let sc = Scratch::new("qcow2-backing");
    // A raw base of 10 MiB + 1000 bytes under a 64 MiB top: zeros past its end.
    let raw = sc.path("base.raw");
    std::fs::write(&raw, pattern(7, (10 * MIB + 1000) as usize))?;
    let top = sc.path("top.qcow2");
    create(&top, "cluster_size=65536", Some((&raw, "raw")), DISK)?;
    qemu_io(&top, &["write -P 0x12 1M 1M", "write -z 9M 512k"])?;
    assert_eq!(
        restore_and_compare(&sc, &top, &[&raw, &top])?,
        ReadBy::InProcess
    );

    // A 16 MiB QCOW2 base under a 64 MiB top, a middle link of 32 MiB.
    let base = sc.path("small.qcow2");
    create(&base, "cluster_size=65536", None, 16 * MIB)?;
    qemu_io(&base, &["write -P 0x21 0 16M"])?;
    let mid = sc.path("mid.qcow2");
    create(&mid, "cluster_size=4096", Some((&base, "qcow2")), 32 * MIB)?;
    qemu_io(&mid, &["write -P 0x22 20M 1M"])?;
    let top = sc.path("top2.qcow2");
    create(&top, "cluster_size=65536", Some((&mid, "qcow2")), DISK)?;
    qemu_io(&top, &["write -P 0x23 15M 2M", "write -P 0x24 40M 1M"])?;
    assert_eq!(
        restore_and_compare(&sc, &top, &[&base, &mid, &top])?,
        ReadBy::InProcess
    );
    Ok(())
}

#[test]
fn compressed_clusters_are_read_in_process() -> Result<()> {
    let sc = Scratch::new("qcow2-compressed");
    let raw = sc.path("source.raw");
    let mut bytes = vec![0u8; DISK as usize];
    bytes[..(8 * MIB) as usize].copy_from_slice(&pattern(3, (8 * MIB) as usize));
    bytes[(20 * MIB) as usize..(21 * MIB) as usize].fill(0x5a);
    std::fs::write(&raw, &bytes)?;
    let base = sc.path("base.qcow2");
    qemu_img(
        &["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"],
        &[&raw, &base],
    )?;
    let top = sc.path("top.qcow2");
    create(&top, "cluster_size=65536", Some((&base, "qcow2")), DISK)?;
    qemu_io(&top, &["write -P 0x31 4M 100k", "write -z 20M 64k"])?;
    assert_eq!(
        restore_and_compare(&sc, &top, &[&base, &top])?,
        ReadBy::InProcess
    );
    Ok(())
}

#[test]
fn unsupported_chains_fall_back_to_qemu_nbd() -> Result<()> {
    // zstd-compressed clusters.
    let sc = Scratch::new("qcow2-zstd");
    let raw = sc.path("source.raw");
    std::fs::write(&raw, pattern(5, (4 * MIB) as usize))?;
    let base = sc.path("base.qcow2");
    qemu_img(
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ],
        &[&raw, &base],
    )?;
    let top = sc.path("top.qcow2");
    create(&top, "cluster_size=65536", Some((&base, "qcow2")), 8 * MIB)?;
    qemu_io(&top, &["write -P 0x41 1M 1M"])?;
    assert_eq!(
        restore_and_compare(&sc, &top, &[&base, &top])?,
        ReadBy::QemuNbd
    );

    // An external data file.
    let sc = Scratch::new("qcow2-datafile");
    let data = sc.path("data.raw");
    let top = sc.path("top.qcow2");
    let opts = format!("data_file={}", data.display());
    create(&top, &opts, None, 8 * MIB)?;
    qemu_io(&top, &["write -P 0x42 1M 1M"])?;
    assert_eq!(
        restore_and_compare(&sc, &top, &[&data, &top])?,
        ReadBy::QemuNbd
    );
    Ok(())
}

/// A chain someone holds open for writing is not read in process (qemu's locks, as qemu-nbd
/// takes them): the restore fails as qemu-nbd makes it fail, and writes nothing.
#[test]
fn an_image_open_for_writing_is_refused_as_qemu_refuses_it() -> Result<()> {
    let sc = Scratch::new("qcow2-locked");
    let top = sc.path("top.qcow2");
    create(&top, "cluster_size=65536", None, 8 * MIB)?;
    let writer = qemu_nbd(&top, &sc.path("w.sock"), "qcow2", &[])?;
    let target = sc.path("restored.img");
    let out = Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
        .env("RUST_LOG", "sendense_agent=debug")
        .arg("restore")
        .arg("--source")
        .arg(format!("2000:{}", top.display()))
        .arg("--target")
        .arg(format!("2000:file:{}", target.display()))
        .output()?;
    drop(writer);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = RestoreResult::parse(&String::from_utf8_lossy(&out.stdout)).expect("result");
    assert!(!r.ok && r.nothing_written, "{r:?}");
    assert!(stderr.contains("held open for writing"), "{stderr}");
    assert!(r.error.unwrap_or_default().contains("lock"));
    assert!(!target.exists());
    Ok(())
}
