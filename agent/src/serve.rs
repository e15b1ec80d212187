//! `hub serve`: the hub's one container. Each disk's QCOW2 is created (as `hub prepare` does),
//! then served by its own qemu-nbd child (TLS only, one client identity) until one of two
//! things happens:
//! - a qemu-nbd ends: the others are stopped and the hub fails, its last words in the result;
//! - the commit request appears (a file the kubelet fills from the pod's annotation, once the
//!   agent has ended): every qemu-nbd is stopped, so nothing can write the files any more, and
//!   the attempt is committed in process (`crate::commit`), the result as JSON.
//!
//! One container instead of one per disk plus a commit pod: the kubelet's work (Events, status
//! writes, volume checks) is per container and per pod, and the commit reads the files on the
//! node that wrote them, without a pod of its own.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sendense_contract::cli::{HubServeArgs, ServeDisk};
use sendense_contract::manifest::{CommitResult, Manifest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

/// How often the children and the commit request are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long a qemu-nbd may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a qemu-nbd's stderr kept for the hub's failure message.
const LAST_WORDS: usize = 4;

/// How serving ended.
#[derive(Debug)]
pub enum Ended {
    /// The commit request, as its text.
    CommitRequested(String),
    /// A qemu-nbd ended, or could not start, or the hub was told to stop: why.
    Failed(String),
}

struct Server {
    disk: ServeDisk,
    child: Child,
    last_words: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    fn ended(&mut self, status: ExitStatus) -> String {
        let words: Vec<String> = self
            .last_words
            .lock()
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default();
        format!(
            "qemu-nbd serving disk {} ({}) on port {} ended ({status}){}",
            self.disk.key,
            self.disk.file.display(),
            self.disk.port,
            if words.is_empty() {
                String::new()
            } else {
                format!(": {}", words.join(" / "))
            }
        )
    }
}

/// The qemu-nbd command line serving `d`.
pub fn qemu_nbd_args(args: &HubServeArgs, d: &ServeDisk) -> Vec<String> {
    vec![
        "--format=qcow2".into(),
        "--persistent".into(),
        format!("--shared={}", args.shared),
        format!("--bind={}", args.bind),
        format!("--port={}", d.port),
        // TLS only, and only the attempt's agent certificate (plain NBD is refused).
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
            args.tls_dir.display()
        ),
        "--tls-creds=tls0".into(),
        "--object".into(),
        format!("authz-simple,id=authz0,identity={}", args.client_identity),
        "--tls-authz=authz0".into(),
        "--cache=writeback".into(),
        "--aio=threads".into(),
        d.file.display().to_string(),
    ]
}

fn start(args: &HubServeArgs, d: &ServeDisk) -> Result<Server, String> {
    let mut child = Command::new("qemu-nbd")
        .args(qemu_nbd_args(args, d))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting qemu-nbd for disk {}: {e}", d.key))?;
    let last_words = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stderr) = child.stderr.take() {
        let kept = last_words.clone();
        let key = d.key;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("qemu-nbd {key}: {line}");
                if let Ok(mut k) = kept.lock() {
                    if k.len() == LAST_WORDS {
                        k.pop_front();
                    }
                    k.push_back(line);
                }
            }
        });
    }
    Ok(Server {
        disk: d.clone(),
        child,
        last_words,
    })
}

/// The commit request in `file`: `None` while the file is missing or empty.
pub fn read_request(file: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(file) {
        Ok(t) if t.trim().is_empty() => Ok(None),
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "reading the commit request {}: {e}",
            file.display()
        )),
    }
}

/// The request names exactly the files this hub served (a request for other files, or for
/// some of them only, is refused before anything is read).
pub fn check_request(root: &Path, served: &[ServeDisk], request: &str) -> Result<(), String> {
    let m = Manifest::parse(request).map_err(|e| format!("the commit request: {e}"))?;
    let mut asked: Vec<(i32, PathBuf)> = m
        .disks
        .iter()
        .map(|d| (d.device_key, root.join(&d.file)))
        .collect();
    let mut have: Vec<(i32, PathBuf)> = served.iter().map(|d| (d.key, d.file.clone())).collect();
    asked.sort();
    have.sort();
    if asked != have {
        return Err(format!(
            "the commit request names the disks {asked:?}, but this hub served {have:?}"
        ));
    }
    Ok(())
}

/// Serves until a qemu-nbd ends, SIGTERM arrives, or the commit request appears; every
/// qemu-nbd is stopped before it returns.
pub async fn serve(args: &HubServeArgs) -> Ended {
    let mut servers = Vec::new();
    for d in &args.disks {
        match start(args, d) {
            Ok(s) => servers.push(s),
            Err(e) => {
                stop(&mut servers).await;
                return Ended::Failed(e);
            }
        }
    }
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            stop(&mut servers).await;
            return Ended::Failed(format!("installing the SIGTERM handler: {e}"));
        }
    };
    let mut tick = tokio::time::interval(TICK);
    let ended = loop {
        tokio::select! {
            _ = term.recv() => break Ended::Failed("stopped by SIGTERM (the pod is being deleted or evicted)".into()),
            _ = tick.tick() => {}
        }
        if let Some(why) = servers.iter_mut().find_map(|s| match s.child.try_wait() {
            Ok(Some(status)) => Some(s.ended(status)),
            Ok(None) => None,
            Err(e) => Some(format!("waiting for qemu-nbd of disk {}: {e}", s.disk.key)),
        }) {
            break Ended::Failed(why);
        }
        match read_request(&args.commit_request) {
            Ok(Some(text)) => break Ended::CommitRequested(text),
            Ok(None) => {}
            Err(e) => break Ended::Failed(e),
        }
    };
    stop(&mut servers).await;
    ended
}

/// SIGTERM to every qemu-nbd still running, SIGKILL to those still there after STOP_GRACE.
async fn stop(servers: &mut [Server]) {
    for s in servers.iter_mut() {
        if let (Ok(None), Some(pid)) = (s.child.try_wait(), s.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    for s in servers.iter_mut() {
        if tokio::time::timeout(STOP_GRACE, s.child.wait())
            .await
            .is_err()
        {
            let _ = s.child.start_kill();
            let _ = tokio::time::timeout(STOP_GRACE, s.child.wait()).await;
        }
    }
}

/// Prepares, serves, then commits when asked: the commit's result, or why the hub stopped
/// serving (or could not start).
pub async fn run(args: &HubServeArgs) -> Result<CommitResult, String> {
    for d in &args.disks {
        let (file, size, backing) = (d.file.clone(), d.size, d.backing.clone());
        tokio::task::spawn_blocking(move || crate::hub::prepare(&file, size, backing.as_deref()))
            .await
            .map_err(|e| format!("preparing disk {}: {e}", d.key))?
            .map_err(|e| format!("preparing disk {}: {e}", d.key))?;
    }
    match serve(args).await {
        Ended::Failed(why) => Err(why),
        Ended::CommitRequested(request) => {
            if let Err(e) = check_request(&args.root, &args.disks, &request) {
                return Ok(CommitResult::failed(e));
            }
            Ok(crate::commit::commit(&args.root, &request)
                .await
                .unwrap_or_else(|e| CommitResult::failed(e.to_string())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks() -> Vec<ServeDisk> {
        vec![
            ServeDisk {
                key: 2000,
                port: 10100,
                file: "/repository/ns/vm/j-a1/2000.qcow2".into(),
                size: 1 << 30,
                backing: None,
            },
            ServeDisk {
                key: 2001,
                port: 10101,
                file: "/repository/ns/vm/j-a1/2001.qcow2".into(),
                size: 1 << 30,
                backing: None,
            },
        ]
    }

    fn manifest(files: &[(i32, &str)]) -> String {
        let disks: Vec<serde_json::Value> = files
            .iter()
            .map(|(k, f)| {
                serde_json::json!({"deviceKey": k, "file": f, "capacityBytes": 1, "copy": "full",
                    "changeIdReached": "c", "bytesWritten": 0})
            })
            .collect();
        serde_json::json!({
            "version": 1, "job": {"namespace": "ns", "name": "j", "uid": "u"},
            "attempt": 1, "repository": "r", "sourceNode": "s", "vcenter": "https://vc/sdk",
            "vm": {"name": "vm", "instanceUuid": "i"}, "directory": "ns/vm/j-a1",
            "started": "2026-11-25T10:00:00Z", "completed": "2026-11-25T10:05:00Z",
            "disks": disks
        })
        .to_string()
    }

    #[test]
    fn a_commit_request_must_name_exactly_the_served_files() {
        let root = Path::new("/repository");
        let both = manifest(&[
            (2001, "ns/vm/j-a1/2001.qcow2"),
            (2000, "ns/vm/j-a1/2000.qcow2"),
        ]);
        assert_eq!(check_request(root, &disks(), &both), Ok(()));
        let one = manifest(&[(2000, "ns/vm/j-a1/2000.qcow2")]);
        let e = check_request(root, &disks(), &one).unwrap_err();
        assert!(e.contains("served"), "{e}");
        let other = manifest(&[
            (2000, "ns/vm/j-a2/2000.qcow2"),
            (2001, "ns/vm/j-a1/2001.qcow2"),
        ]);
        assert!(check_request(root, &disks(), &other).is_err());
        let e = check_request(root, &disks(), "{not json").unwrap_err();
        assert!(e.starts_with("the commit request"), "{e}");
    }

    #[test]
    fn an_empty_or_missing_request_file_is_no_request() {
        let dir = std::env::temp_dir().join(format!("sendense-serve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("manifest");
        assert_eq!(read_request(&f), Ok(None));
        std::fs::write(&f, "").expect("write");
        assert_eq!(read_request(&f), Ok(None));
        std::fs::write(&f, "{}").expect("write");
        assert_eq!(read_request(&f), Ok(Some("{}".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_disk_gets_a_tls_only_qemu_nbd_on_its_port() {
        let args = HubServeArgs {
            disks: disks(),
            bind: "10.0.0.5".into(),
            shared: 8,
            tls_dir: "/etc/sendense/nbd-tls".into(),
            client_identity: "O=Sendense,CN=agent".into(),
            root: "/repository".into(),
            commit_request: "/etc/sendense/commit/manifest".into(),
            result_file: None,
        };
        let a = qemu_nbd_args(&args, &args.disks[1]);
        for want in [
            "--bind=10.0.0.5",
            "--port=10101",
            "--shared=8",
            "--persistent",
            "--tls-creds=tls0",
            "--tls-authz=authz0",
            "authz-simple,id=authz0,identity=O=Sendense,CN=agent",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert_eq!(
            a.last().map(String::as_str),
            Some("/repository/ns/vm/j-a1/2001.qcow2")
        );
    }
}
