//! `sendense-agent backup` end to end: the vCenter simulator with CBT (real SOAP, TLS, flat
//! disk files), the agent binary, hub QCOW2 files served by real qemu-nbd. Every restore point
//! is read back through its QCOW2 chain and compared with the simulator's own checksum of the
//! disk at the snapshot instant.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use support::vcsim::Sim;
use support::*;

const MIB: u64 = 1 << 20;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
}

/// The hub side of a test: QCOW2 files in a repository directory, each served by qemu-nbd.
struct Hub {
    scratch: Scratch,
    servers: Vec<Server>,
}

impl Hub {
    fn new(name: &str) -> Self {
        Self {
            scratch: Scratch::new(name),
            servers: Vec::new(),
        }
    }

    fn file(&self, job: &str, key: i32) -> PathBuf {
        self.scratch.path(&format!("repo/{key}/{job}.qcow2"))
    }

    /// `hub prepare` then qemu-nbd on the file (as the hub pod would); returns the NBD URL.
    fn prepare_and_serve(
        &mut self,
        job: &str,
        key: i32,
        size: u64,
        parent: Option<&str>,
    ) -> Result<String> {
        let file = self.file(job, key);
        let mut cmd = agent();
        let parent = parent.map(|p| self.file(p, key));
        cmd.args(prepare_args(&file, size, parent.as_deref()));
        run(&mut cmd)?;
        let socket = self.scratch.path(&format!("{job}-{key}.sock"));
        let server = qemu_nbd(&file, &socket, "qcow2", &["--shared=8"])?;
        let url = format!("nbd+unix:///?socket={}", socket.display());
        self.servers.push(server);
        Ok(url)
    }

    fn stop_serving(&mut self) {
        self.servers.clear();
    }
}

struct Backup {
    status: std::process::ExitStatus,
    result: Value,
    stderr: String,
    elapsed: Duration,
}

fn backup_command(
    sim: &Sim,
    job: &str,
    targets: &[(i32, String)],
    bases: &[(i32, String)],
) -> Command {
    let mut cmd = agent();
    let ds = sim.info["datastores"]["LocalDS_0"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    cmd.args([
        "backup",
        "--vcenter",
        &sim.s("url"),
        "--datacenter",
        &sim.s("datacenter"),
        "--vm",
        "cbt-vm-0",
    ])
    .args([
        "--thumbprint",
        &sim.s("thumbprint"),
        "--job",
        job,
        "--checksum",
        "--request-timeout",
        "20",
    ])
    .arg("--datastore")
    .arg(format!("LocalDS_0={ds}"))
    .arg("--targets")
    .arg(
        targets
            .iter()
            .map(|(k, u)| format!("{k}:{u}"))
            .collect::<Vec<_>>()
            .join(","),
    )
    .env("SENDENSE_VCENTER_USERNAME", sim.s("username"))
    .env("SENDENSE_VCENTER_PASSWORD", sim.s("password"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if !bases.is_empty() {
        cmd.arg("--base-change-ids").arg(
            bases
                .iter()
                .map(|(k, c)| format!("{k}:{c}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    cmd
}

fn finish(child: std::process::Child, started: Instant) -> Result<Backup> {
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
            format!(
                "agent printed no JSON result; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(Backup {
        status: out.status,
        result,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

fn backup(
    sim: &Sim,
    job: &str,
    targets: &[(i32, String)],
    bases: &[(i32, String)],
) -> Result<Backup> {
    let started = Instant::now();
    let child = backup_command(sim, job, targets, bases).spawn()?;
    finish(child, started)
}

fn live_sha(sim: &Sim, key: i32) -> String {
    sim.cli(&["checksum", "-disk", &key.to_string()])["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn disk(b: &Backup, key: i32) -> &Value {
    b.result["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["key"] == key))
        .unwrap_or(&Value::Null)
}

fn reached(b: &Backup, key: i32) -> String {
    disk(b, key)["change_id_reached"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn verify(file: &Path, sha: &str) -> Result<()> {
    let out = agent()
        .arg("verify")
        .arg("--file")
        .arg(file)
        .args(["--sha256", sha])
        .output()?;
    if !out.status.success() {
        bail!(
            "restore point {} does not match {sha}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn no_snapshots(sim: &Sim) -> bool {
    sim.cli(&["snapshots"])
        .as_array()
        .is_some_and(|a| a.is_empty())
}

#[test]
fn full_then_two_incrementals_restore_byte_identical() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "64MiB,48MiB", "-page-size", "100"]);
    let (c0, c1) = (64 * MIB, 48 * MIB);
    // Data written before CBT is on must be in the full backup ("*" = allocated areas).
    sim.cli(&[
        "fill", "-disk", "2000", "-pattern", "random", "-seed", "1", "-count", "300", "-size",
        "64K",
    ]);
    sim.cli(&[
        "fill",
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
        "5M",
    ]);
    let mut hub = Hub::new("backup-chain");
    let mut points: Vec<(String, i32, String)> = Vec::new();

    // 1. Full.
    let expect = [(2000, live_sha(&sim, 2000)), (2001, live_sha(&sim, 2001))];
    let targets = [
        (2000, hub.prepare_and_serve("full", 2000, c0, None)?),
        (2001, hub.prepare_and_serve("full", 2001, c1, None)?),
    ];
    let b = backup(&sim, "full", &targets, &[])?;
    assert!(
        b.status.success(),
        "full backup failed: {} {}",
        b.result,
        b.stderr
    );
    assert_eq!(b.result["ok"], true);
    assert_eq!(b.result["snapshot"]["removed"], true);
    assert_eq!(b.result["cbt_enabled_now"], true, "the agent turned CBT on");
    assert!(no_snapshots(&sim), "no snapshot remains");
    for (key, sha) in &expect {
        assert_eq!(disk(&b, *key)["copy"], "full");
        assert_eq!(
            disk(&b, *key)["sha256"],
            sha.as_str(),
            "the agent read the snapshot instant"
        );
        points.push(("full".into(), *key, sha.clone()));
    }
    hub.stop_serving();
    let mut bases = vec![(2000, reached(&b, 2000)), (2001, reached(&b, 2001))];

    // 2. Guest writes: many fragmented small writes (more areas than one page), and zeros
    // over data the full backup holds; then an incremental.
    sim.cli(&[
        "fill",
        "-disk",
        "2000",
        "-pattern",
        "fragmented",
        "-seed",
        "3",
        "-count",
        "450",
        "-size",
        "4K",
        "-offset",
        "1M",
    ]);
    sim.cli(&["zero", "-disk", "2001", "-offset", "6M", "-length", "1M"]);
    sim.cli(&[
        "fill", "-disk", "2001", "-pattern", "random", "-seed", "4", "-count", "20", "-size", "8K",
    ]);
    for (n, job) in ["incr-1", "incr-2"].iter().enumerate() {
        if n == 1 {
            sim.cli(&[
                "fill", "-disk", "2000", "-pattern", "random", "-seed", "5", "-count", "50",
                "-size", "32K",
            ]);
            sim.cli(&["zero", "-disk", "2000", "-offset", "0", "-length", "2M"]);
            sim.cli(&[
                "write",
                "-disk",
                "2001",
                "-offset",
                "47M",
                "-data",
                "the last megabyte",
            ]);
        }
        let expect = [(2000, live_sha(&sim, 2000)), (2001, live_sha(&sim, 2001))];
        let parent = if n == 0 { "full" } else { "incr-1" };
        let targets = [
            (2000, hub.prepare_and_serve(job, 2000, c0, Some(parent))?),
            (2001, hub.prepare_and_serve(job, 2001, c1, Some(parent))?),
        ];
        // The second incremental runs both disks on one thread (`--threads 1`; the default is
        // a thread per disk): the same chain must come out either way.
        let mut cmd = backup_command(&sim, job, &targets, &bases);
        if n == 1 {
            cmd.args(["--threads", "1"]);
        }
        let b = finish(cmd.spawn()?, Instant::now())?;
        assert!(
            b.status.success(),
            "{job} failed: {} {}",
            b.result,
            b.stderr
        );
        assert!(no_snapshots(&sim), "no snapshot remains after {job}");
        assert!(
            b.result["leftover_snapshots_removed"]
                .as_array()
                .is_some_and(|a| a.is_empty())
        );
        for (key, sha) in &expect {
            let d = disk(&b, *key);
            assert_eq!(d["copy"], "incremental", "{job} disk {key}: {d}");
            assert_eq!(
                d["change_id_used"],
                bases
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, c)| c.as_str())
                    .unwrap_or_default()
            );
            assert_eq!(d["sha256"], sha.as_str());
            assert!(
                d["bytes_to_copy"].as_u64().unwrap_or(u64::MAX)
                    < d["capacity"].as_u64().unwrap_or(0) / 2,
                "{job} disk {key} copies the changes, not the disk: {d}"
            );
            points.push((job.to_string(), *key, sha.clone()));
        }
        if n == 0 {
            // 450 writes of 4 KiB two blocks apart: 450 areas of one 64 KiB block each, more
            // than four pages of 100.
            assert_eq!(disk(&b, 2000)["areas"], 450);
            assert_eq!(disk(&b, 2000)["bytes_to_copy"], 450 * 65536);
            assert!(
                disk(&b, 2001)["bytes_zeroed"].as_u64().unwrap_or(0) >= MIB,
                "zeroed data written as zeros"
            );
        }
        hub.stop_serving();
        bases = vec![(2000, reached(&b, 2000)), (2001, reached(&b, 2001))];
    }

    // Every restore point, read through its chain, equals the disk at its snapshot instant.
    for (job, key, sha) in &points {
        verify(&hub.file(job, *key), sha)?;
    }
    Ok(())
}

#[test]
fn a_stale_change_id_falls_back_to_a_full_copy_with_the_reason() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "32MiB"]);
    sim.cli(&[
        "fill", "-disk", "2000", "-pattern", "random", "-seed", "1", "-count", "100", "-size",
        "16K",
    ]);
    sim.cli(&[
        "fill", "-disk", "2001", "-pattern", "random", "-seed", "2", "-count", "100", "-size",
        "16K",
    ]);
    let mut hub = Hub::new("backup-stale");
    let size = 32 * MIB;
    let targets = [
        (2000, hub.prepare_and_serve("full", 2000, size, None)?),
        (2001, hub.prepare_and_serve("full", 2001, size, None)?),
    ];
    let b = backup(&sim, "full", &targets, &[])?;
    assert!(b.status.success(), "{} {}", b.result, b.stderr);
    hub.stop_serving();
    let bases = [(2000, reached(&b, 2000)), (2001, reached(&b, 2001))];

    // CBT reset on disk 2001 (as after some vMotions or a CBT repair): its change ID is void.
    sim.cli(&["cbt", "-reset", "-disk", "2001"]);
    sim.cli(&[
        "fill", "-disk", "2000", "-pattern", "random", "-seed", "3", "-count", "10", "-size", "4K",
    ]);
    sim.cli(&["zero", "-disk", "2001", "-offset", "0", "-length", "8M"]);
    let expect = [(2000, live_sha(&sim, 2000)), (2001, live_sha(&sim, 2001))];
    let targets = [
        (
            2000,
            hub.prepare_and_serve("incr", 2000, size, Some("full"))?,
        ),
        (
            2001,
            hub.prepare_and_serve("incr", 2001, size, Some("full"))?,
        ),
    ];
    let b = backup(&sim, "incr", &targets, &bases)?;
    assert!(b.status.success(), "{} {}", b.result, b.stderr);
    assert_eq!(disk(&b, 2000)["copy"], "incremental");
    let d = disk(&b, 2001);
    assert_eq!(d["copy"], "full", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no longer accepts change ID"),
        "{d}"
    );
    hub.stop_serving();
    for (key, sha) in &expect {
        verify(&hub.file("incr", *key), sha)?;
    }
    assert!(no_snapshots(&sim));
    Ok(())
}

/// Serves `url`'s export again through nbdkit with every write delayed, so a copy is slow
/// enough to be interrupted; returns the proxy and its URL.
fn slow_proxy(scratch: &Scratch, upstream_socket: &str, name: &str) -> Result<(Server, String)> {
    slow_proxy_by(scratch, upstream_socket, name, "wdelay=5")
}

/// `slow_proxy` with another delay (`wdelay=300ms`, ...).
fn slow_proxy_by(
    scratch: &Scratch,
    upstream_socket: &str,
    name: &str,
    delay: &str,
) -> Result<(Server, String)> {
    let socket = scratch.path(&format!("{name}.sock"));
    let server = nbdkit(
        &socket,
        &[
            "--filter=delay",
            "nbd",
            &format!("socket={upstream_socket}"),
            delay,
        ],
    )?;
    let url = format!("nbd+unix:///?socket={}", socket.display());
    Ok((server, url))
}

#[test]
fn killing_the_target_or_source_mid_copy_fails_clearly_and_removes_the_snapshot() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "128MiB", "-disks", "1"]);
    sim.cli(&[
        "fill",
        "-disk",
        "2000",
        "-pattern",
        "sequential",
        "-seed",
        "1",
        "-count",
        "96",
        "-size",
        "1M",
    ]);
    let mut hub = Hub::new("backup-kill");
    let size = 128 * MIB;

    // The target dies.
    let direct = hub.prepare_and_serve("a", 2000, size, None)?;
    let upstream = direct.trim_start_matches("nbd+unix:///?socket=").to_owned();
    let (mut proxy, url) = slow_proxy(&hub.scratch, &upstream, "slow-a")?;
    let started = Instant::now();
    let child = backup_command(&sim, "a", &[(2000, url)], &[]).spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    proxy.child.kill()?;
    let b = finish(child, started)?;
    assert!(!b.status.success(), "the backup must fail");
    assert!(
        b.elapsed < Duration::from_secs(40),
        "ended within its deadline: {:?}",
        b.elapsed
    );
    assert_eq!(b.result["snapshot"]["removed"], true, "{}", b.result);
    assert!(
        b.result["error"]
            .as_str()
            .unwrap_or_default()
            .contains("disk 2000"),
        "{}",
        b.result
    );
    assert!(
        disk(&b, 2000)["change_id_reached"].is_null(),
        "a failed copy reaches no change ID"
    );
    assert!(no_snapshots(&sim), "no snapshot left behind");

    // The source (nbdkit reading the snapshot's flat file) dies.
    let direct = hub.prepare_and_serve("b", 2000, size, None)?;
    let upstream = direct.trim_start_matches("nbd+unix:///?socket=").to_owned();
    let (_proxy, url) = slow_proxy(&hub.scratch, &upstream, "slow-b")?;
    let started = Instant::now();
    let child = backup_command(&sim, "b", &[(2000, url)], &[]).spawn()?;
    let marker = format!("sendense-source-{}-2000", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new("pkill")
        .args(["-f", &marker])
        .status()?
        .success()
    {
        if Instant::now() > deadline {
            bail!("the agent's source nbdkit ({marker}) never appeared");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = finish(child, started)?;
    assert!(!b.status.success());
    assert!(b.elapsed < Duration::from_secs(40), "{:?}", b.elapsed);
    assert_eq!(b.result["snapshot"]["removed"], true, "{}", b.result);
    assert!(no_snapshots(&sim));
    Ok(())
}

#[test]
fn the_result_file_says_why_a_backup_was_turned_down() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "8MiB", "-disks", "1"]);
    let s = Scratch::new("backup-reasons");
    let result_file = s.path("result.json");
    let attempt = |vm: &str, key: i32, thumbprint: &str, password: &str| -> Result<(i32, Value)> {
        let _ = std::fs::remove_file(&result_file);
        let out = agent()
            .args([
                "backup",
                "--vcenter",
                &sim.s("url"),
                "--datacenter",
                &sim.s("datacenter"),
                "--vm",
                vm,
                "--thumbprint",
                thumbprint,
                "--job",
                "turned-down",
                "--request-timeout",
                "20",
                "--targets",
                &format!("{key}:nbd://127.0.0.1:1/"),
            ])
            .arg("--result-file")
            .arg(&result_file)
            .env("SENDENSE_VCENTER_USERNAME", sim.s("username"))
            .env("SENDENSE_VCENTER_PASSWORD", password)
            .output()?;
        let written: Value = serde_json::from_str(&std::fs::read_to_string(&result_file)?)?;
        let printed: Value = serde_json::from_str(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default(),
        )?;
        assert_eq!(printed, written, "a small result is written whole");
        assert_eq!(written["ok"], false, "{written}");
        Ok((out.status.code().unwrap_or(-1), written))
    };
    let thumbprint = sim.s("thumbprint");
    let password = sim.s("password");

    let (code, v) = attempt("cbt-vm-0", 2000, &thumbprint, "Wrong-Secret-1")?;
    assert_eq!(
        (code, v["reason"].as_str()),
        (2, Some("LoginFailed")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("connecting to vCenter")
    );

    let (code, v) = attempt("no-such-vm", 2000, &thumbprint, &password)?;
    assert_eq!((code, v["reason"].as_str()), (1, Some("VMNotFound")), "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-vm"),
        "{v}"
    );

    let (code, v) = attempt("cbt-vm-0", 2999, &thumbprint, &password)?;
    assert_eq!(
        (code, v["reason"].as_str()),
        (1, Some("DiskNotFound")),
        "{v}"
    );
    assert_eq!(v["vm"], "cbt-vm-0");

    let wrong = format!("{}00", &thumbprint[..thumbprint.len() - 2]);
    let wrong = if wrong == thumbprint {
        format!("{}11", &thumbprint[..thumbprint.len() - 2])
    } else {
        wrong
    };
    let (code, v) = attempt("cbt-vm-0", 2000, &wrong, &password)?;
    assert_eq!(
        (code, v["reason"].as_str()),
        (2, Some("TLSVerificationFailed")),
        "{v}"
    );
    assert!(no_snapshots(&sim), "no snapshot was taken");
    Ok(())
}

/// One answer of the status endpoint: (status line, Content-Type, body).
fn get(addr: &str, request: &str) -> Option<(String, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.to_string();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    Some((status, content_type, body.to_string()))
}

#[test]
fn the_status_endpoint_serves_progress_while_a_backup_runs() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "64MiB", "-disks", "1"]);
    sim.cli(&[
        "fill",
        "-disk",
        "2000",
        "-pattern",
        "sequential",
        "-seed",
        "1",
        "-count",
        "8",
        "-size",
        "1M",
    ]);
    let mut hub = Hub::new("backup-status");
    // Writes slowed down so the copy lasts a few seconds.
    let direct = hub.prepare_and_serve("s", 2000, 64 * MIB, None)?;
    let upstream = direct.trim_start_matches("nbd+unix:///?socket=").to_owned();
    let (_proxy, url) = slow_proxy_by(&hub.scratch, &upstream, "slow-s", "wdelay=300ms")?;
    let result_file = hub.scratch.path("result.json");
    let log = hub.scratch.path("agent.log");
    let started = Instant::now();
    // Port 0: the agent binds a free port and logs it (no window for another process to take a
    // port chosen beforehand).
    let mut child = backup_command(&sim, "s", &[(2000, url)], &[])
        .args(["--status-addr", "127.0.0.1:0", "--request-size", "1048576"])
        .args(["--in-flight", "1", "--connections", "1"])
        .arg("--result-file")
        .arg(&result_file)
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .filter(|l| l.contains("serving progress"))
            .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next());
        if let Some(a) = found {
            break a.to_owned();
        }
        if child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not report its progress address; log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut reports: Vec<Value> = Vec::new();
    let mut others_checked = false;
    while child.try_wait()?.is_none() && started.elapsed() < Duration::from_secs(120) {
        if let Some((status, content_type, body)) =
            get(&addr, "GET /progress HTTP/1.1\r\nHost: agent\r\n\r\n")
        {
            assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
            assert_eq!(content_type, "application/json");
            reports.push(serde_json::from_str(&body).with_context(|| body.clone())?);
            if !others_checked {
                let (status, ..) =
                    get(&addr, "GET /metrics HTTP/1.1\r\n\r\n").context("answer to /metrics")?;
                assert!(status.starts_with("HTTP/1.1 404"), "{status}");
                let (status, ..) =
                    get(&addr, "POST /progress HTTP/1.1\r\n\r\n").context("answer to POST")?;
                assert!(status.starts_with("HTTP/1.1 405"), "{status}");
                others_checked = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = finish(child, started)?;
    assert!(b.status.success(), "{} {}", b.result, b.stderr);
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&result_file)?)?;
    assert_eq!(written["ok"], true);
    assert_eq!(written["reason"], Value::Null);
    assert!(
        get(&addr, "GET /progress HTTP/1.1\r\n\r\n").is_none(),
        "the endpoint is gone with the backup"
    );

    assert!(!reports.is_empty(), "no answer from the status endpoint");
    let mut stages: Vec<&str> = reports.iter().filter_map(|r| r["stage"].as_str()).collect();
    stages.dedup();
    eprintln!("{} answers, stages {stages:?}", reports.len());
    for r in &reports {
        let stage = r["stage"].as_str().unwrap_or_default();
        assert!(
            [
                "connecting",
                "snapshot",
                "copying",
                "removing-snapshot",
                "done"
            ]
            .contains(&stage),
            "{r}"
        );
        let (to_copy, copied) = (r["bytesToCopy"].as_u64(), r["bytesCopied"].as_u64());
        assert!(copied <= to_copy && to_copy.is_some(), "{r}");
        for d in r["disks"].as_array().context("disks")? {
            assert_eq!(d["key"], 2000, "{r}");
            assert!(
                d["bytesCopied"].as_u64() <= d["bytesToCopy"].as_u64(),
                "{r}"
            );
        }
    }
    // 8 writes of 1 MiB, one at a time, 300 ms each: the copy is seen.
    assert!(
        reports
            .iter()
            .any(|r| r["stage"] == "copying" && r["bytesToCopy"].as_u64() >= Some(8 * MIB)),
        "{reports:?}"
    );
    Ok(())
}

#[test]
fn a_backup_past_its_deadline_stops_with_reason_stopped() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "32MiB", "-disks", "1"]);
    sim.cli(&[
        "fill",
        "-disk",
        "2000",
        "-pattern",
        "sequential",
        "-seed",
        "1",
        "-count",
        "16",
        "-size",
        "1M",
    ]);
    let mut hub = Hub::new("backup-deadline");
    let direct = hub.prepare_and_serve("d", 2000, 32 * MIB, None)?;
    let upstream = direct.trim_start_matches("nbd+unix:///?socket=").to_owned();
    let (_proxy, url) = slow_proxy(&hub.scratch, &upstream, "slow-d")?;
    let result_file = hub.scratch.path("result.json");
    let started = Instant::now();
    let child = backup_command(&sim, "d", &[(2000, url)], &[])
        .args(["--deadline-seconds", "3"])
        .arg("--result-file")
        .arg(&result_file)
        .spawn()?;
    let b = finish(child, started)?;
    assert_eq!(b.status.code(), Some(1), "{} {}", b.result, b.stderr);
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&result_file)?)?;
    assert_eq!(written["reason"], "Stopped", "{written}");
    assert!(
        written["error"]
            .as_str()
            .unwrap_or_default()
            .contains("deadline of 3s"),
        "{written}"
    );
    assert_eq!(written["snapshot"]["removed"], true, "{written}");
    assert!(no_snapshots(&sim));
    Ok(())
}

/// `--max-bandwidth-mbps` is one cap for the whole backup, shared by its disks: two disks
/// copied at once read, together, at the cap (within 10%), not each at the cap. The copy is
/// long enough (about 20 s) that connecting and the read-back are noise against it.
#[test]
fn the_bandwidth_cap_holds_for_all_disks_together_within_ten_percent() -> Result<()> {
    let sim = Sim::start(&["-disk-size", "32MiB,32MiB", "-page-size", "100"]);
    for (disk, seed) in [("2000", "31"), ("2001", "32")] {
        sim.cli(&[
            "fill", "-disk", disk, "-pattern", "random", "-seed", seed, "-count", "20", "-size",
            "1M", "-offset", "4M",
        ]);
    }
    let mut hub = Hub::new("bandwidth-cap");
    let targets = [
        (2000, hub.prepare_and_serve("capped", 2000, 32 * MIB, None)?),
        (2001, hub.prepare_and_serve("capped", 2001, 32 * MIB, None)?),
    ];
    const MBPS: f64 = 16.0;
    let started = Instant::now();
    let child = backup_command(&sim, "capped", &targets, &[])
        .args(["--max-bandwidth-mbps", "16"])
        .spawn()?;
    let b = finish(child, started)?;
    assert!(b.status.success(), "{} {}", b.result, b.stderr);
    let bytes: u64 = [2000, 2001]
        .iter()
        .map(|k| disk(&b, *k)["bytes_to_copy"].as_u64().unwrap_or(0))
        .sum();
    assert!(bytes >= 24 * MIB, "both disks' data is read: {}", b.result);
    let seconds = [2000, 2001]
        .iter()
        .map(|k| disk(&b, *k)["seconds"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    let mbps = bytes as f64 * 8.0 / 1e6 / seconds;
    eprintln!("{bytes} bytes in {seconds:.2} s: {mbps:.2} Mbit/s (cap {MBPS})");
    assert!(
        (mbps - MBPS).abs() <= MBPS * 0.10,
        "{mbps:.2} Mbit/s against a cap of {MBPS}: {}",
        b.result
    );
    Ok(())
}
