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
    let out = run(agent().args(prepare_args(&full, 8388608, None)))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v[0]["backing_file"], serde_json::Value::Null);
    let incr = dir.join("job-2.qcow2");
    let out = run(agent().args(prepare_args(&incr, 8388608, Some(&full))))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v[0]["backing_file"], "job-1.qcow2",
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
        .args(prepare_args(
            &moved.join("job-3.qcow2"),
            16777216,
            Some(&moved.join("job-2.qcow2")),
        ))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent()
        .args(prepare_args(
            &moved.join("job-4.qcow2"),
            8388608,
            Some(&moved.join("nope.qcow2")),
        ))
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain parent is missing"));

    // An existing file is never replaced: it may be a committed restore point's.
    let before = sha256sum(&moved.join("job-1.qcow2"))?;
    let out = agent()
        .args(prepare_args(&moved.join("job-1.qcow2"), 8388608, None))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("never replaced"),
        "{out:?}"
    );
    assert_eq!(sha256sum(&moved.join("job-1.qcow2"))?, before);

    // All of a job's disks in one call (the hub's one init container), in order; the first
    // that cannot be prepared stops it, and is named.
    use sendense_contract::cli::{HubPrepareArgs, PrepareDisk};
    let disk = |file: &str, size: u64, backing: Option<&str>| PrepareDisk {
        file: moved.join(file),
        size,
        backing: backing.map(|b| moved.join(b)),
    };
    let both = HubPrepareArgs {
        disks: vec![
            disk("job-5.qcow2", 8388608, Some("job-2.qcow2")),
            disk("../2001/job-5.qcow2", 1048576, None),
        ],
    };
    let out = run(agent().args(both.to_args()))?;
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(v[0]["backing_file"], "job-2.qcow2", "{v}");
    assert_eq!(v[1]["size"], 1048576, "{v}");
    assert!(s.path("moved/ns/web-01/2001/job-5.qcow2").exists());
    let second_fails = HubPrepareArgs {
        disks: vec![
            disk("job-6.qcow2", 8388608, None),
            disk("job-7.qcow2", 8388608, Some("gone.qcow2")),
        ],
    };
    let out = agent().args(second_fails.to_args()).output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("chain parent is missing") && err.contains("gone.qcow2"),
        "{err}"
    );
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
    // The runtime's threads: any number from 1 works; 0 is refused, naming the option.
    let out = run(agent().args(["nbd-ping", &url, "--threads", "2"]))?;
    assert!(out.contains("\"size\":1048576"), "{out}");
    for (args, env) in [(&["--threads", "0"][..], None), (&[][..], Some("none"))] {
        let mut cmd = agent();
        cmd.args(["nbd-ping", &url]).args(args);
        if let Some(v) = env {
            cmd.env("SENDENSE_AGENT_THREADS", v);
        }
        let out = cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains("--threads"), "{args:?} {env:?}: {err}");
    }
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
    // A server that is not up yet (nothing listens on its socket) is waited for within the
    // deadline: Ready at the first probe once it serves.
    let late = s.path("late.sock");
    let started = std::time::Instant::now();
    let ping = agent()
        .args([
            "nbd-ping",
            &format!("nbd+unix:///?socket={}", late.display()),
            "--timeout",
            "20",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(700));
    let _late_server = qemu_nbd(&file, &late, "raw", &["--shared=8"])?;
    let out = ping.wait_with_output()?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"size\":1048576"));
    assert!(started.elapsed() >= std::time::Duration::from_millis(700));
    // Never up: it fails at its deadline, not before.
    let never = s.path("never.sock");
    let started = std::time::Instant::now();
    let out = agent()
        .args([
            "nbd-ping",
            &format!("nbd+unix:///?socket={}", never.display()),
            "--timeout",
            "1",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(700) && took < std::time::Duration::from_secs(5),
        "{took:?}"
    );
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
    run(agent().args(prepare_args(
        &repo.join("ns/web-01/2000/full.qcow2"),
        8388608,
        None,
    )))?;
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

/// Sets the modification time of `path` (a file or a directory) to `ago` in the past.
fn age(path: &std::path::Path, ago: std::time::Duration) -> Result<()> {
    let when = std::time::SystemTime::now() - ago;
    std::fs::File::open(path)?.set_modified(when)?;
    Ok(())
}

#[test]
fn repo_probe_lists_uncommitted_attempts_and_removes_only_idle_orphans() -> Result<()> {
    let s = Scratch::new("probe-orphans");
    let repo = s.path("repo");
    let hour = std::time::Duration::from_secs(3600);
    // Three uncommitted attempts: idle for two hours, written to just now, and one with a
    // file no attempt writes; and a committed restore point.
    for (dir, idle) in [
        ("ns/vm/gone-u1-a1", Some(2 * hour)),
        ("ns/vm/busy-u2-a1", None),
        ("ns/vm/odd-u3-a1", Some(2 * hour)),
        ("ns/vm/kept-u4-a1", Some(2 * hour)),
    ] {
        std::fs::create_dir_all(repo.join(dir))?;
        std::fs::write(repo.join(dir).join("2000.qcow2"), pattern(3, 1 << 16))?;
        if dir.contains("odd") {
            std::fs::write(repo.join(dir).join("notes.txt"), b"mine")?;
        }
        if dir.contains("kept") {
            std::fs::write(repo.join(dir).join("restorepoint.json"), b"{}")?;
        }
        if let Some(idle) = idle {
            for e in std::fs::read_dir(repo.join(dir))? {
                age(&e?.path(), idle)?;
            }
            age(&repo.join(dir), idle)?;
        }
    }
    let probe = |remove: &[&str]| -> Result<(Vec<Value>, Value)> {
        let mut cmd = agent();
        cmd.args(["repo", "probe", "--list-manifests", "--dir"])
            .arg(&repo);
        for r in remove {
            cmd.args(["--remove-orphan", r]);
        }
        let out = run(&mut cmd)?;
        let mut lines: Vec<Value> = out.lines().map(json).collect::<Result<_>>()?;
        let result = lines.pop().context("result")?;
        let uncommitted = lines
            .into_iter()
            .filter_map(|l| l.get("uncommitted").cloned())
            .collect();
        Ok((uncommitted, result))
    };
    let (uncommitted, _) = probe(&[])?;
    let dirs: Vec<&str> = uncommitted
        .iter()
        .filter_map(|u| u["dir"].as_str())
        .collect();
    assert_eq!(
        dirs,
        ["ns/vm/busy-u2-a1", "ns/vm/gone-u1-a1", "ns/vm/odd-u3-a1"],
        "a committed directory is not listed"
    );
    let idle: Vec<u64> = uncommitted
        .iter()
        .filter_map(|u| u["idleSeconds"].as_u64())
        .collect();
    assert!(
        idle[0] < 600 && idle[1] >= 7000 && idle[2] >= 7000,
        "{uncommitted:?}"
    );
    assert!(uncommitted[1]["bytes"].as_u64().is_some_and(|b| b > 0));

    let (uncommitted, result) = probe(&[
        "ns/vm/gone-u1-a1",
        "ns/vm/busy-u2-a1",
        "ns/vm/odd-u3-a1",
        "ns/vm/kept-u4-a1",
        "../escape",
        "ns/vm/never-was-a1",
    ])?;
    assert_eq!(
        result["removed_orphans"],
        serde_json::json!(["ns/vm/gone-u1-a1", "ns/vm/never-was-a1"]),
        "{result}"
    );
    let kept = result["kept_orphans"].to_string();
    for why in [
        "busy-u2-a1: changed",
        "odd-u3-a1",
        "kept-u4-a1",
        "../escape: not a plain path",
    ] {
        assert!(kept.contains(why), "{why} in {kept}");
    }
    assert!(!repo.join("ns/vm/gone-u1-a1").exists());
    for d in ["busy-u2-a1", "odd-u3-a1", "kept-u4-a1"] {
        assert!(
            repo.join("ns/vm").join(d).join("2000.qcow2").exists(),
            "{d}"
        );
    }
    assert_eq!(uncommitted.len(), 2, "{uncommitted:?}");
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
fn hub_remove_takes_uncommitted_attempts_and_refuses_committed_ones() -> Result<()> {
    let s = Scratch::new("remove");
    let a1 = s.path("repo/ns/vm/job-u1-a1");
    let a2 = s.path("repo/ns/vm/job-u1-a2");
    let committed = s.path("repo/ns/vm/job-u0-a1");
    for d in [&a1, &a2, &committed] {
        std::fs::create_dir_all(d)?;
        std::fs::write(d.join("2000.qcow2"), b"partial")?;
    }
    std::fs::write(a2.join(".restorepoint.json.77"), b"{")?;
    std::fs::write(committed.join("restorepoint.json"), b"{}")?;
    let remove = |dirs: &[&std::path::Path]| {
        let mut cmd = agent();
        cmd.args(["hub", "remove"]);
        for d in dirs {
            cmd.arg("--dir").arg(d);
        }
        cmd
    };
    let shown = |p: &std::path::Path| p.display().to_string();

    // A committed restore point among them: refused, and nothing is removed.
    let out = remove(&[&a1, &committed]).output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("committed restore point"), "{err}");
    assert!(a1.join("2000.qcow2").exists() && committed.join("2000.qcow2").exists());

    // A file no attempt writes: refused too.
    std::fs::write(a1.join("notes.txt"), b"mine")?;
    let out = remove(&[&a1]).output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes.txt"));
    std::fs::remove_file(a1.join("notes.txt"))?;

    let v = json(&run(&mut remove(&[&a1, &a2]))?)?;
    assert_eq!(
        v["removed"],
        serde_json::json!([shown(&a1), shown(&a2)]),
        "{v}"
    );
    assert!(!a1.exists() && !a2.exists());
    assert!(
        committed.join("2000.qcow2").exists(),
        "the committed one stays"
    );

    // Again: nothing to do, and that is fine.
    let v = json(&run(&mut remove(&[&a1, &a2]))?)?;
    assert_eq!(
        v["missing"],
        serde_json::json!([shown(&a1), shown(&a2)]),
        "{v}"
    );

    // `..` is refused, before anything is removed.
    std::fs::create_dir_all(&a1)?;
    let sneaky = s.path("repo/ns/vm/x/../job-u0-a1");
    let out = remove(&[&a1, &sneaky]).output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(".."),
        "{out:?}"
    );
    assert!(a1.exists());
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

/// A manifest for `repo commit`: one disk, 2000, in `dir`, layered on `backing`.
fn manifest(uid: &str, attempt: i32, dir: &str, backing: Option<&str>) -> String {
    serde_json::json!({
        "version": 1,
        "job": {"namespace": "ns", "name": "web", "uid": uid},
        "attempt": attempt, "repository": "primary", "sourceNode": "vc",
        "vcenter": "https://vc.example.com/sdk",
        "vm": {"name": "web", "instanceUuid": "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"},
        "directory": dir,
        "started": "2026-11-25T10:00:00Z", "completed": "2026-11-25T10:05:00Z",
        "disks": [{"deviceKey": 2000, "file": format!("{dir}/2000.qcow2"), "backingFile": backing,
                   "capacityBytes": 16 << 20, "copy": if backing.is_some() {"incremental"} else {"full"},
                   "changeIdReached": "52 aa/3", "bytesWritten": 65536}]
    })
    .to_string()
}

#[test]
fn repo_commit_reads_the_chain_back_and_writes_the_manifest_once() -> Result<()> {
    let s = Scratch::new("commit");
    let root = s.path("repo");
    let full_dir = "ns/web/web-u1-a1";
    let incr_dir = "ns/web/web-u2-a1";
    let raw = s.path("disk.raw");
    raw_file(&raw, 16 << 20)?;
    write_at(&raw, 4096, &pattern(3, 2 << 20))?;
    std::fs::create_dir_all(root.join(full_dir))?;
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(root.join(full_dir).join("2000.qcow2")))?;
    let full_sum = sha256sum(&raw)?;
    // The incremental: an overlay with 64 KiB changed at 1 MiB.
    run(agent().args(prepare_args(
        &root.join(incr_dir).join("2000.qcow2"),
        16777216,
        Some(&root.join(full_dir).join("2000.qcow2")),
    )))?;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 64k"])
        .arg(root.join(incr_dir).join("2000.qcow2")))?;
    write_at(&raw, 1 << 20, &[0x5a; 64 << 10])?;
    let incr_sum = sha256sum(&raw)?;

    let commit = |m: &str, result: &std::path::Path| {
        let mut cmd = agent();
        cmd.args(["repo", "commit", "--root"])
            .arg(&root)
            .args(["--manifest", m, "--result-file"])
            .arg(result);
        cmd
    };
    let result = s.path("result.json");
    let v = json(&run(&mut commit(
        &manifest("u1", 1, full_dir, None),
        &result,
    ))?)?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["disks"][0]["sha256"], full_sum.as_str(), "{v}");
    assert_eq!(json(&std::fs::read_to_string(&result)?)?, v);
    let written = json(&std::fs::read_to_string(
        root.join(full_dir).join("restorepoint.json"),
    )?)?;
    assert_eq!(written["disks"][0]["sha256"], full_sum.as_str());
    assert_eq!(written["job"]["uid"], "u1");
    let names: Vec<String> = std::fs::read_dir(root.join(full_dir))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");

    // Again for the same job and attempt (an operator restarted): the same answer.
    let v = json(&run(&mut commit(
        &manifest("u1", 1, full_dir, None),
        &result,
    ))?)?;
    assert_eq!(
        (v["ok"].clone(), v["already"].clone()),
        (true.into(), true.into()),
        "{v}"
    );
    // Another job, or another attempt, into that directory: refused, the manifest kept.
    for (uid, attempt) in [("u9", 1), ("u1", 2)] {
        let out = commit(&manifest(uid, attempt, full_dir, None), &result).output()?;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let v = json(&std::fs::read_to_string(&result)?)?;
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("never replaced"),
            "{v}"
        );
    }
    assert_eq!(
        json(&std::fs::read_to_string(
            root.join(full_dir).join("restorepoint.json")
        )?)?,
        written
    );

    // The incremental, planned on another parent than its image names: refused.
    let full_file = format!("{full_dir}/2000.qcow2");
    let out = commit(
        &manifest("u2", 1, incr_dir, Some("ns/web/other/2000.qcow2")),
        &result,
    )
    .output()?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(std::fs::read_to_string(&result)?.contains("layered on"));
    assert!(!root.join(incr_dir).join("restorepoint.json").exists());
    // On the right one: its digest is the whole disk's, through the chain.
    let v = json(&run(&mut commit(
        &manifest("u2", 1, incr_dir, Some(&full_file)),
        &result,
    ))?)?;
    assert_eq!(v["disks"][0]["sha256"], incr_sum.as_str(), "{v}");

    // A missing disk file and a manifest outside the volume are errors, exit 1.
    let out = commit(&manifest("u3", 1, "ns/web/none", None), &result).output()?;
    assert_eq!(out.status.code(), Some(1));
    let out = commit(&manifest("u3", 1, "../escape", None), &result).output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(std::fs::read_to_string(&result)?.contains("inside the volume"));

    // The probe lists the committed restore points, one line each before its result; an
    // unreadable manifest is named in the result, not listed.
    std::fs::create_dir_all(root.join("ns/web/broken"))?;
    std::fs::write(root.join("ns/web/broken/restorepoint.json"), "{not json")?;
    let out = run(agent()
        .args(["repo", "probe", "--list-manifests", "--dir"])
        .arg(&root))?;
    let lines: Vec<Value> = out.lines().map(json).collect::<Result<_>>()?;
    let (found, result) = lines.split_at(lines.len() - 1);
    let uids: Vec<&str> = found
        .iter()
        .filter_map(|l| l["restorePoint"]["job"]["uid"].as_str())
        .collect();
    assert_eq!(uids, ["u1", "u2"], "{out}");
    assert_eq!(
        found[1]["restorePoint"]["disks"][0]["sha256"],
        incr_sum.as_str()
    );
    assert_eq!(result[0]["restore_points"], 2, "{out}");
    let unreadable = result[0]["unreadable_manifests"].to_string();
    assert!(unreadable.contains("broken/restorepoint.json"), "{out}");
    Ok(())
}
