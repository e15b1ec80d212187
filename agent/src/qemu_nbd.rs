//! A short-lived qemu-nbd on a private Unix socket: read-only over a QCOW2 chain (verifying
//! and restoring a restore point), or writable over a raw image or block device (a restore's
//! target).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::nbd::NbdUrl;

#[derive(Debug, thiserror::Error)]
pub enum QemuNbdError {
    #[error("starting qemu-nbd for {file}: {source}")]
    Spawn {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-nbd for {file} exited before serving ({status}): {message}")]
    Exited {
        file: PathBuf,
        status: std::process::ExitStatus,
        message: String,
    },
    #[error("qemu-nbd for {0} did not listen within 10 s")]
    NotListening(PathBuf),
}

/// qemu-nbd serving one file; killed (and its socket removed) on drop.
pub struct ReadOnlyExport {
    child: Child,
    dir: PathBuf,
}

/// What qemu-nbd is asked to serve, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A QCOW2 chain, read-only. Its files take shared (read) locks only, as the backing files
    /// of a backup being written at the same time do: the two never conflict.
    ReadOnlyQcow2,
    /// A raw image or block device, written. WRITE_ZEROES may deallocate (holes stay holes).
    WritableRaw,
}

/// qemu-nbd serving a raw file or block device for writing; killed on drop. The writer flushes
/// before it is dropped.
pub struct WritableExport(ReadOnlyExport);

impl WritableExport {
    pub async fn start(file: &Path) -> Result<Self, QemuNbdError> {
        ReadOnlyExport::start_mode(file, Mode::WritableRaw)
            .await
            .map(Self)
    }

    pub fn url(&self) -> NbdUrl {
        self.0.url()
    }
}

impl ReadOnlyExport {
    pub async fn start(file: &Path) -> Result<Self, QemuNbdError> {
        Self::start_mode(file, Mode::ReadOnlyQcow2).await
    }

    async fn start_mode(file: &Path, mode: Mode) -> Result<Self, QemuNbdError> {
        let dir = std::env::temp_dir().join(format!(
            "sendense-verify-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| QemuNbdError::Spawn {
            file: file.to_owned(),
            source,
        })?;
        let socket = dir.join("nbd.sock");
        let mode_args: &[&str] = match mode {
            Mode::ReadOnlyQcow2 => &["--read-only", "--format=qcow2"],
            Mode::WritableRaw => &["--format=raw", "--discard=unmap", "--cache=writeback"],
        };
        let mut child = Command::new("qemu-nbd");
        child
            .args(mode_args)
            .args(["--persistent", "--shared=8", "--socket"])
            .arg(&socket)
            // Written once the socket listens: the readiness signal, without a probe connection.
            .arg("--pid-file")
            .arg(dir.join("qemu-nbd.pid"))
            .arg(file)
            .stderr(
                std::fs::File::create(dir.join("qemu-nbd.log")).map_err(|source| {
                    QemuNbdError::Spawn {
                        file: file.to_owned(),
                        source,
                    }
                })?,
            )
            .kill_on_drop(true);
        // A killed agent (SIGKILL: no drop runs) must not leave a persistent server behind.
        die_with_agent(&mut child);
        let mut child = child.spawn().map_err(|source| QemuNbdError::Spawn {
            file: file.to_owned(),
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("qemu-nbd.log")).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(QemuNbdError::Exited {
                    file: file.to_owned(),
                    status,
                    message: log.trim().to_owned(),
                });
            }
            if dir.join("qemu-nbd.pid").exists() {
                break;
            }
            if Instant::now() > deadline {
                return Err(QemuNbdError::NotListening(file.to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, dir })
    }

    pub fn url(&self) -> NbdUrl {
        NbdUrl {
            address: crate::nbd::Address::Unix(self.dir.join("nbd.sock")),
            export: String::new(),
            tls: None,
        }
    }
}

impl Drop for ReadOnlyExport {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Makes the process `cmd` starts die with the agent, however the agent ends (a SIGKILL runs no
/// drop, so `kill_on_drop` alone leaves it running): no qemu process outlives the run that
/// needed it, to hold locks against, or write beside, the run that comes next.
pub(crate) fn die_with_agent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died before the call above took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the agent is gone"));
            }
            Ok(())
        });
    }
}

fn unique() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) as u32
}
