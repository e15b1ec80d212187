//! The sendense-agent binary: `hub prepare`, `hub remove`, `repo probe`, `verify`, and the
//! `backup` failures that need no vCenter, on real files with qemu-img/qemu-nbd.

mod support;

use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;
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

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .with_context(|| format!("not JSON: {text:?}"))
}

fn allocated(path: &std::path::Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[test]
fn repo_probe_measures_a_writable_repository() -> Result<()> {
    let s = Scratch::new("probe");
    let repo = s.path("repo");
    // Two QCOW2 files in nested directories (one made by `hub prepare`), files that do not
    // count (another extension, a symbolic link to a QCOW2 file).
    run(agent()
        .args(["hub", "prepare", "--size", "8388608", "--file"])
        .arg(repo.join("ns/web-01/2000/full.qcow2")))?;
    std::fs::create_dir_all(repo.join("ns/db-01/2001"))?;
    let data = s.path("repo/ns/db-01/2001/part.qcow2");
    std::fs::write(&data, pattern(1, 3 << 20))?;
    std::fs::write(repo.join("ns/notes.raw"), pattern(2, 1 << 20))?;
    std::os::unix::fs::symlink(&data, repo.join("ns/link.qcow2"))?;
    let expected = allocated(&data)? + allocated(&repo.join("ns/web-01/2000/full.qcow2"))?;

    let result_file = s.path("probe.json");
    let out = run(agent()
        .args(["repo", "probe", "--dir"])
        .arg(&repo)
        .arg("--result-file")
        .arg(&result_file))?;
    let v = json(&out)?;
    assert_eq!(v, json(&std::fs::read_to_string(&result_file)?)?);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["qcow2_files"], 2, "{v}");
    assert_eq!(v["qcow2_bytes"], expected, "{v}");
    assert!(
        expected >= 3 << 20,
        "allocated, not apparent, sizes: {expected}"
    );
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(n("capacity_bytes") > 0);
    assert!(n("used_bytes") <= n("capacity_bytes"), "{v}");
    assert!(n("available_bytes") <= n("capacity_bytes"), "{v}");
    assert!(n("used_bytes") >= 3 << 20, "{v}");
    assert!(v.get("error").is_none(), "{v}");
    // The probe file is gone.
    let left: Vec<_> = std::fs::read_dir(&repo)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sendense-probe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

/// Runs `repo probe` on `dir`; (exit code, stdout JSON, result file JSON).
fn failed_probe(dir: &std::path::Path, result_file: &std::path::Path) -> Result<(i32, Value)> {
    let out = agent()
        .args(["repo", "probe", "--dir"])
        .arg(dir)
        .arg("--result-file")
        .arg(result_file)
        .output()?;
    let printed = json(&String::from_utf8_lossy(&out.stdout))?;
    let written = json(&std::fs::read_to_string(result_file)?)?;
    assert_eq!(printed, written);
    Ok((out.status.code().unwrap_or(-1), written))
}

#[test]
fn repo_probe_failures_name_the_directory_and_the_os_error() -> Result<()> {
    let s = Scratch::new("probe-fail");
    let result_file = s.path("probe.json");

    let missing = s.path("no-such-repo");
    let (code, v) = failed_probe(&missing, &result_file)?;
    assert_eq!(code, 1);
    assert_eq!(
        (v["ok"].clone(), v["reason"].clone()),
        (false.into(), "NotFound".into()),
        "{v}"
    );
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains(&missing.display().to_string()), "{error}");
    assert!(error.contains("No such file or directory"), "{error}");
    assert!(v.get("capacity_bytes").is_none(), "{v}");

    let file = s.path("a-file");
    std::fs::write(&file, b"x")?;
    let (code, v) = failed_probe(&file, &result_file)?;
    assert_eq!(code, 1);
    assert_eq!(v["reason"], "NotADirectory", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&file.display().to_string())
    );

    // A read-only file system (a read-only tmpfs in a private mount namespace; root ignores
    // directory permissions). Skipped where unprivileged namespaces are not allowed.
    let ro = s.path("read-only");
    std::fs::create_dir_all(&ro)?;
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o ro none "$1" || exit 99; exec "$2" repo probe --dir "$1" --result-file "$3""#)
        .arg("sh")
        .arg(&ro)
        .arg(env!("CARGO_BIN_EXE_sendense-agent"))
        .arg(&result_file)
        .output()?;
    if out.status.code() == Some(99) || out.status.code().is_none() {
        eprintln!(
            "skipping the read-only case: no mount namespace ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(());
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&std::fs::read_to_string(&result_file)?)?;
    assert_eq!(v["reason"], "ReadOnly", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&ro.display().to_string()) && error.contains("Read-only file system"),
        "{error}"
    );
    Ok(())
}

#[test]
fn hub_remove_is_idempotent_and_removes_emptied_directories() -> Result<()> {
    let s = Scratch::new("remove");
    let a = s.path("repo/ns/vm/2000/job-2.qcow2");
    let b = s.path("repo/ns/vm/2001/job-2.qcow2");
    let kept = s.path("repo/ns/vm/2001/job-1.qcow2");
    for f in [&a, &b, &kept] {
        std::fs::create_dir_all(f.parent().unwrap_or(&s.0))?;
        std::fs::write(f, b"partial")?;
    }
    let remove = || {
        let mut cmd = agent();
        cmd.args(["hub", "remove", "--file"])
            .arg(&a)
            .arg("--file")
            .arg(&b);
        cmd
    };
    let v = json(&run(&mut remove())?)?;
    let paths = |k: &str| -> Vec<String> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let shown = |p: &std::path::Path| p.display().to_string();
    assert_eq!(paths("removed"), [shown(&a), shown(&b)], "{v}");
    assert!(paths("missing").is_empty(), "{v}");
    assert_eq!(
        paths("removed_dirs"),
        [shown(&s.path("repo/ns/vm/2000"))],
        "{v}"
    );
    assert!(!a.exists() && !b.exists());
    assert!(
        !s.path("repo/ns/vm/2000").exists(),
        "the emptied directory is gone"
    );
    assert!(
        kept.exists(),
        "the other backup in 2001 stays, and so does its directory"
    );
    assert!(
        s.path("repo/ns/vm").exists(),
        "only the file's own directory is removed"
    );

    // Again: nothing to do, and that is fine.
    let out = run(&mut remove())?;
    let v = json(&out)?;
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(
        v["missing"],
        serde_json::json!([shown(&a), shown(&b)]),
        "{v}"
    );

    // `..` is refused, before anything is removed.
    let sneaky = s.path("repo/ns/vm/2001/../2001/job-1.qcow2");
    let out = agent()
        .args(["hub", "remove", "--file"])
        .arg(&kept)
        .arg("--file")
        .arg(&sneaky)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(".."),
        "{out:?}"
    );
    assert!(kept.exists());
    Ok(())
}

/// Runs a `backup` that must fail before contacting vCenter; its result file.
fn early_backup_failure(extra: &[&str], env: &[(&str, &str)]) -> Result<Value> {
    let s = Scratch::new("early");
    let result_file = s.path("result.json");
    let mut cmd = agent();
    cmd.args([
        "backup",
        "--vcenter",
        "https://127.0.0.1:1/sdk",
        "--datacenter",
        "DC0",
        "--vm",
        "vm",
        "--job",
        "j",
        "--insecure-skip-verify",
    ])
    .arg("--result-file")
    .arg(&result_file)
    .args(extra)
    .env_remove("SENDENSE_VCENTER_USERNAME")
    .env_remove("SENDENSE_VCENTER_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = cmd.output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let v = json(&std::fs::read_to_string(&result_file)?)?;
    assert_eq!(v["ok"], false, "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = v["error"].as_str().unwrap_or_default();
    // Clap formats its own errors over several lines.
    let first_words: String = error.chars().take(30).collect();
    assert!(
        !error.is_empty() && stderr.contains(&first_words),
        "{error} / {stderr}"
    );
    Ok(v)
}

#[test]
fn backup_writes_its_result_file_when_it_cannot_start() -> Result<()> {
    let creds = [
        ("SENDENSE_VCENTER_USERNAME", "u"),
        ("SENDENSE_VCENTER_PASSWORD", "p"),
    ];
    // Rejected by the argument parser (no --targets).
    let v = early_backup_failure(&[], &creds)?;
    assert_eq!(v["reason"], "InvalidArguments", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--targets"),
        "{v}"
    );
    // Rejected after parsing.
    let v = early_backup_failure(&["--targets", "2000:http://x/"], &creds)?;
    assert_eq!(v["reason"], "InvalidArguments", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--targets"),
        "{v}"
    );
    let v = early_backup_failure(
        &["--targets", "2000:nbd://h:1/", "--transport", "ftp"],
        &creds,
    )?;
    assert_eq!(v["reason"], "InvalidArguments", "{v}");
    // No credentials.
    let v = early_backup_failure(
        &[
            "--targets",
            "2000:nbd://h:1/",
            "--credentials-dir",
            "/nonexistent/creds",
        ],
        &[],
    )?;
    assert_eq!(v["reason"], "CredentialsUnavailable", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("/nonexistent/creds/username"),
        "{v}"
    );
    // vCenter does not answer.
    let v = early_backup_failure(&["--targets", "2000:nbd://h:1/"], &creds)?;
    assert_eq!(v["reason"], "Unreachable", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("connecting to vCenter"),
        "{v}"
    );
    // The status address is taken: fails before vCenter is contacted, naming the flag.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let v = early_backup_failure(
        &["--targets", "2000:nbd://h:1/", "--status-addr", &addr],
        &creds,
    )?;
    assert_eq!(v["reason"], "StatusListenFailed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("--status-addr") && error.contains(&addr),
        "{error}"
    );
    Ok(())
}
