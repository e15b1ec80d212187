//! Real NBD servers for tests: qemu-nbd and nbdkit on Unix sockets in a scratch directory.
#![allow(dead_code)]

pub mod tls;
pub mod vcsim;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use sendense_agent::nbd::{ConnectOptions, NbdUrl};

pub struct Scratch(pub PathBuf);
impl Scratch {
    pub fn new(name: &str) -> Self {
        use std::hash::BuildHasher;
        let tag = std::collections::hash_map::RandomState::new().hash_one(name) as u32;
        let dir = std::env::temp_dir().join(format!("sendense-nbd-{name}-{tag:08x}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
}
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub fn start(mut cmd: Command, socket: &Path) -> Result<Self> {
        // Server chatter goes to a log beside the socket: the readiness check below makes the
        // servers complain about a client that left mid-handshake.
        let log = std::fs::File::create(socket.with_extension("log"))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting NBD server")?;
        let server = Server {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "NBD server did not listen on {} within 10s",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
    pub fn url(&self, export: &str) -> NbdUrl {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
            .parse()
            .expect("valid url")
    }
}

pub fn qemu_nbd(file: &Path, socket: &Path, format: &str, extra: &[&str]) -> Result<Server> {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", format, "-k"])
        .arg(socket)
        .args(["-t", "--cache=none", "--aio=threads"])
        .args(extra)
        .arg(file);
    Server::start(cmd, socket)
}

pub fn nbdkit(socket: &Path, args: &[&str]) -> Result<Server> {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(socket).args(args);
    Server::start(cmd, socket)
}

pub fn raw_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    Ok(())
}

pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

pub fn opts() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Runs a command and fails with its stderr unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `data` into `file` at `offset` (as a guest would, straight into the disk file).
pub fn write_at(file: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    f.write_all_at(data, offset)?;
    Ok(())
}

/// `hub prepare`'s arguments for one disk, as the operator builds them.
pub fn prepare_args(file: &Path, size: u64, backing: Option<&Path>) -> Vec<String> {
    sendense_contract::cli::HubPrepareArgs {
        disks: vec![sendense_contract::cli::PrepareDisk {
            file: file.to_owned(),
            size,
            backing: backing.map(Path::to_owned),
        }],
    }
    .to_args()
}
