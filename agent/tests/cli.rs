//! The sendense-agent binary: `hub prepare` and `verify`, on real files with qemu-img/qemu-nbd.

mod support;

use std::process::Command;

use anyhow::Result;
use support::*;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
}

fn sha256sum(path: &std::path::Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

#[test]
fn hub_prepare_builds_a_chain_with_relative_backing_files() -> Result<()> {
    let s = Scratch::new("prepare");
    let dir = s.path("repo/ns/web-01/2000");
    let full = dir.join("job-1.qcow2");
    let out = run(agent()
        .args(["hub", "prepare", "--size", "8388608", "--file"])
        .arg(&full))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["backing_file"], serde_json::Value::Null);
    let incr = dir.join("job-2.qcow2");
    let out = run(agent()
        .args(["hub", "prepare", "--size", "8388608", "--file"])
        .arg(&incr)
        .arg("--backing")
        .arg(&full))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v["backing_file"], "job-1.qcow2",
        "recorded relative to the overlay"
    );
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&incr))?;
    assert!(
        info.contains("\"backing-filename\": \"job-1.qcow2\""),
        "{info}"
    );

    // The chain still resolves when the repository is mounted elsewhere.
    std::fs::rename(s.path("repo"), s.path("moved"))?;
    run(Command::new("qemu-img")
        .args(["info", "--backing-chain"])
        .arg(s.path("moved/ns/web-01/2000/job-2.qcow2")))?;

    // A resized disk cannot layer on the old chain; a missing parent is named.
    let moved = s.path("moved/ns/web-01/2000");
    let out = agent()
        .args(["hub", "prepare", "--size", "16777216", "--file"])
        .arg(moved.join("job-3.qcow2"))
        .arg("--backing")
        .arg(moved.join("job-2.qcow2"))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent()
        .args(["hub", "prepare", "--size", "8388608", "--file"])
        .arg(moved.join("job-4.qcow2"))
        .arg("--backing")
        .arg(moved.join("nope.qcow2"))
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain parent is missing"));
    Ok(())
}

#[test]
fn verify_checks_a_chain_against_the_source_checksum() -> Result<()> {
    let s = Scratch::new("verify");
    let raw = s.path("disk.raw");
    raw_file(&raw, 16 << 20)?;
    write_at(&raw, 4096, &pattern(7, 3 << 20))?;
    let img = s.path("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img))?;
    let sum = sha256sum(&raw)?;
    let out = run(agent()
        .arg("verify")
        .arg("--file")
        .arg(&img)
        .args(["--sha256", &sum]))?;
    assert!(out.contains("\"match\":true"), "{out}");
    let wrong = "0".repeat(64);
    let out = agent()
        .arg("verify")
        .arg("--file")
        .arg(&img)
        .args(["--sha256", &wrong])
        .output()?;
    assert_eq!(out.status.code(), Some(1), "a mismatch exits 1");
    let out = agent()
        .arg("verify")
        .arg("--file")
        .arg(s.path("missing.qcow2"))
        .args(["--sha256", &sum])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unreadable chain is an error, not a mismatch"
    );
    Ok(())
}

#[test]
fn nbd_ping_completes_a_handshake_or_fails_fast() -> Result<()> {
    let s = Scratch::new("ping");
    let file = s.path("d.raw");
    raw_file(&file, 1 << 20)?;
    let server = qemu_nbd(&file, &s.path("p.sock"), "raw", &["--shared=8"])?;
    let url = format!("nbd+unix:///?socket={}", server.socket.display());
    let out = run(agent().args(["nbd-ping", &url]))?;
    assert!(out.contains("\"size\":1048576"), "{out}");
    // A listener that never speaks NBD is not ready, and the probe says so within its deadline.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let started = std::time::Instant::now();
    let out = agent()
        .args([
            "nbd-ping",
            &format!("nbd://127.0.0.1:{port}/"),
            "--timeout",
            "1",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(listener);
    Ok(())
}
