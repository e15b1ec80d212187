//! `hub serve`, the hub's one container, with real qemu-nbd over TCP and TLS: it creates every
//! disk's QCOW2 (a disk that cannot be created ends it, named) and serves each to the attempt's
//! certificate; when the commit request appears it stops serving and
//! commits, and the digests it reports are those of the bytes the client wrote; a request for
//! other files is refused without reading anything; a qemu-nbd that dies ends the hub, named.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sendense_agent::nbd::{ConnectOptions, NbdClient, NbdUrl, TlsClient};
use sendense_contract::cli::{HubServeArgs, ServeDisk};
use sendense_contract::manifest::CommitResult;
use sha2::{Digest, Sha256};

mod support;
use support::tls::Ca;
use support::*;

const SIZE: u64 = 4 << 20;
const SERVER: &str = "hub.test.svc";
const CLIENT: &str = "sendense-agent.u-1.1";

/// Ports outside the ephemeral range (32768-60999), so no outgoing connection can hold one;
/// the first free pair from `base`.
fn free_ports(base: u16) -> (u16, u16) {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    (base..base + 200)
        .step_by(2)
        .find(|p| free(*p) && free(p + 1))
        .map(|p| (p, p + 1))
        .expect("a free pair of ports")
}

struct Hub {
    child: Child,
    root: PathBuf,
    request: PathBuf,
    result: PathBuf,
    ports: (u16, u16),
}

impl Hub {
    /// `hub serve` of two disks under `s`'s repo/ns/vm/j-u-1-a1, which it creates (disk 2001
    /// layered on `backing` when given); not waited for.
    fn spawn(s: &Scratch, base: u16, backing: Option<PathBuf>) -> Result<Hub> {
        let root = s.path("repo");
        let dir = root.join("ns/vm/j-u-1-a1");
        std::fs::create_dir_all(&dir)?;
        let ca = Ca::new("sendense test CA")?;
        let tls = s.path("tls-server");
        ca.issue(&tls, "server", SERVER)?;
        ca.issue(&s.path("tls-client"), "client", CLIENT)?;
        let ports = free_ports(base);
        let args = HubServeArgs {
            disks: vec![
                ServeDisk {
                    key: 2000,
                    port: ports.0,
                    file: dir.join("2000.qcow2"),
                    size: SIZE,
                    backing: None,
                },
                ServeDisk {
                    key: 2001,
                    port: ports.1,
                    file: dir.join("2001.qcow2"),
                    size: SIZE,
                    backing: backing.clone(),
                },
            ],
            bind: "127.0.0.1".into(),
            shared: 8,
            tls_dir: tls,
            client_identity: format!("CN={CLIENT}"),
            root: root.clone(),
            commit_request: s.path("request"),
            result_file: Some(s.path("result")),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_sendense-agent"))
            .args(args.to_args())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Hub {
            child,
            root,
            request: s.path("request"),
            result: s.path("result"),
            ports,
        })
    }

    /// `spawn`, then served: both disks answer a TLS handshake.
    fn start(s: &Scratch, base: u16) -> Result<Hub> {
        let hub = Hub::spawn(s, base, None)?;
        let ports = hub.ports;
        // Served once a TLS handshake with the client's certificate completes on each port.
        let mut ping = Command::new(env!("CARGO_BIN_EXE_sendense-agent"));
        ping.arg("nbd-ping")
            .args([hub.url(ports.0), hub.url(ports.1)])
            .args(["--timeout", "30", "--tls-dir"])
            .arg(s.path("tls-client"));
        run(&mut ping).context("the hub serves both disks")?;
        Ok(hub)
    }

    fn url(&self, port: u16) -> String {
        format!("nbds://127.0.0.1:{port}/?tls-hostname={SERVER}")
    }

    async fn client(&self, s: &Scratch, port: u16) -> Result<NbdClient> {
        let url: NbdUrl = self.url(port).parse()?;
        let opts = ConnectOptions {
            tls: Some(TlsClient::from_dir(&s.path("tls-client"))?),
            ..opts()
        };
        Ok(NbdClient::connect(&url, &opts).await?)
    }

    /// Its exit within 60 s, and its result file.
    fn ended(&mut self) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let result = std::fs::read_to_string(&self.result).unwrap_or_default();
                return Ok((status, result));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("hub serve did not end within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The commit request for the attempt's disks `files` (relative to the root).
    fn request(&self, files: &[(i32, &str)]) -> Result<()> {
        let disks: Vec<serde_json::Value> = files
            .iter()
            .map(|(k, f)| {
                serde_json::json!({"deviceKey": k, "file": f, "capacityBytes": SIZE, "copy": "full",
                    "changeIdReached": "52 a/1", "bytesWritten": 65536})
            })
            .collect();
        let m = serde_json::json!({
            "version": 1, "job": {"namespace": "ns", "name": "j", "uid": "u-1"},
            "attempt": 1, "repository": "r", "sourceNode": "s", "vcenter": "https://vc/sdk",
            "vm": {"name": "vm", "instanceUuid": "i"}, "directory": "ns/vm/j-u-1-a1",
            "started": "2026-11-28T10:00:00Z", "completed": "2026-11-28T10:05:00Z",
            "disks": disks
        });
        // As the kubelet updates a downward API file: a new file swapped in.
        let tmp = self.request.with_extension("tmp");
        std::fs::write(&tmp, m.to_string())?;
        std::fs::rename(&tmp, &self.request)?;
        Ok(())
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_of(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn pids_of_qemu_nbd_serving(root: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("qemu-nbd"))
            && args
                .iter()
                .any(|a| a.starts_with(&root.display().to_string()))
        {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test]
async fn the_hub_serves_until_asked_then_commits_what_was_written() -> Result<()> {
    let s = Scratch::new("hub-serve-commit");
    let mut hub = Hub::start(&s, 21200)?;
    // Written over NBD with TLS, as the agent writes: disk 2000 gets data at two places.
    let (a, b) = (pattern(7, 65536), pattern(8, 4096));
    let c = hub.client(&s, hub.ports.0).await?;
    c.write(0, a.clone()).await?;
    c.write(SIZE - 4096, b.clone()).await?;
    c.flush().await?;
    c.disconnect().await;
    // Nothing is committed while no request is there (an empty file is none, as the kubelet
    // writes it for an annotation not set yet).
    std::fs::write(&hub.request, "")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(hub.child.try_wait()?.is_none(), "the hub still serves");
    hub.request(&[
        (2000, "ns/vm/j-u-1-a1/2000.qcow2"),
        (2001, "ns/vm/j-u-1-a1/2001.qcow2"),
    ])?;
    let (status, result) = hub.ended()?;
    assert!(status.success(), "{status}: {result}");
    let r = CommitResult::parse(&result).context("a commit result")?;
    assert!(r.ok, "{result}");
    let mut disk = vec![0u8; SIZE as usize];
    disk[..a.len()].copy_from_slice(&a);
    disk[SIZE as usize - 4096..].copy_from_slice(&b);
    let digests: Vec<(i32, String)> = r
        .disks
        .iter()
        .map(|d| (d.device_key, d.sha256.clone()))
        .collect();
    assert_eq!(
        digests,
        [
            (2000, sha256_of(&disk)),
            (2001, sha256_of(&vec![0u8; SIZE as usize]))
        ]
    );
    assert!(
        r.manifest.starts_with("ns/vm/j-u-1-a1/") && hub.root.join(&r.manifest).is_file(),
        "the manifest is written next to the files: {}",
        r.manifest
    );
    // Nothing serves the files any more.
    assert_eq!(pids_of_qemu_nbd_serving(&hub.root), Vec::<i32>::new());
    assert!(hub.client(&s, hub.ports.0).await.is_err());
    Ok(())
}

#[test]
fn a_disk_that_cannot_be_prepared_ends_the_hub_naming_it_before_anything_is_served() -> Result<()> {
    let s = Scratch::new("hub-serve-prepare");
    let missing = s.path("repo/ns/vm/gone/2001.qcow2");
    let mut hub = Hub::spawn(&s, 21800, Some(missing))?;
    let (status, result) = hub.ended()?;
    assert!(!status.success());
    assert!(
        result.contains("preparing disk 2001") && result.contains("gone/2001.qcow2"),
        "{result}"
    );
    assert_eq!(pids_of_qemu_nbd_serving(&hub.root), Vec::<i32>::new());
    Ok(())
}

#[tokio::test]
async fn a_request_for_other_files_is_refused_and_a_dead_qemu_nbd_ends_the_hub() -> Result<()> {
    // (a) The request names one of the two disks: refused before anything is read.
    let s = Scratch::new("hub-serve-refused");
    let mut hub = Hub::start(&s, 21400)?;
    hub.request(&[(2000, "ns/vm/j-u-1-a1/2000.qcow2")])?;
    let (status, result) = hub.ended()?;
    assert!(!status.success());
    let r = CommitResult::parse(&result).context("a commit result")?;
    let error = r.error.unwrap_or_default();
    assert!(
        !r.ok && error.contains("names the disks") && error.contains("2001"),
        "{result}"
    );
    let files: Vec<String> = std::fs::read_dir(hub.root.join("ns/vm/j-u-1-a1"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().all(|f| f.ends_with(".qcow2")),
        "nothing committed: {files:?}"
    );
    drop(hub);

    // (b) One qemu-nbd killed: the others stop, the hub fails naming the disk and its port.
    let s = Scratch::new("hub-serve-killed");
    let mut hub = Hub::start(&s, 21600)?;
    let pids = pids_of_qemu_nbd_serving(&hub.root);
    assert_eq!(pids.len(), 2, "one qemu-nbd per disk: {pids:?}");
    let victim = pids
        .iter()
        .copied()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("2001.qcow2"))
                .unwrap_or(false)
        })
        .context("disk 2001's qemu-nbd")?;
    // SAFETY: kill(2) on a process this test's hub started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let (status, result) = hub.ended()?;
    assert!(!status.success());
    assert!(
        result.contains("disk 2001") && result.contains(&format!("port {}", hub.ports.1)),
        "{result}"
    );
    assert_eq!(pids_of_qemu_nbd_serving(&hub.root), Vec::<i32>::new());
    Ok(())
}
