//! Where a snapshot disk's bytes come from: an nbdkit export the agent starts for each disk.
//! The operator picks a [`Transport`] (the contract's); the backup plan turns it and its
//! settings into a [`DiskReader`]:
//! `nfs`: nbdkit's file plugin on the snapshot's flat extent, read from the datastore mounted
//! into the agent pod. `vddk`: nbdkit's vddk plugin (VMware's library; not available here, but
//! its command line is built and tested).
//!
//! [`Transport`]: sendense_contract::cli::Transport

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::nbd::{Address, NbdUrl};
use sendense_contract::cli::VddkMode;
use sendense_vsphere::{Disk, SnapshotRef, VmRef, flat_extent_path, parse_datastore_path};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "disk {key}: backing file {file:?} is not a datastore path like \"[datastore] dir/disk.vmdk\""
    )]
    BadPath { key: i32, file: String },
    #[error(
        "disk {key}: datastore {datastore:?} is not mounted in the agent (mounted: {mounted}); add it to the SourceNode's nfs datastores"
    )]
    NotMounted {
        key: i32,
        datastore: String,
        mounted: String,
    },
    #[error("disk {key}: {path} is missing or unreadable: {reason}")]
    Unreadable {
        key: i32,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "disk {key}: {path} cannot be read by the agent ({who}): {owner}; set the SourceNode's transport.nfs.readAs to a user or group that may read it (for an export squashing all clients, its anonuid)"
    )]
    PermissionDenied {
        key: i32,
        path: PathBuf,
        /// The agent's user and groups.
        who: String,
        /// The file's owner, group and mode.
        owner: String,
    },
    #[error("disk {key}: starting nbdkit: {source}")]
    ScratchDir {
        key: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {key}: starting nbdkit: {source} (is nbdkit installed?)")]
    Spawn {
        key: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {key}: starting nbdkit: exited with {status} before serving")]
    Exited {
        key: i32,
        status: std::process::ExitStatus,
    },
    #[error("disk {key}: starting nbdkit: did not listen within {} s", READY_TIMEOUT.as_secs())]
    NotListening { key: i32 },
}

/// How long nbdkit may take to serve a disk.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the snapshot's disks are read.
#[derive(Debug, Clone)]
pub enum DiskReader {
    /// Datastore name -> directory where it is mounted.
    Nfs {
        datastores: BTreeMap<String, PathBuf>,
    },
    Vddk(VddkSettings),
}

#[derive(Clone)]
pub struct VddkSettings {
    /// vCenter host name (as in the SourceNode URL).
    pub server: String,
    pub username: String,
    /// File holding the password (nbdkit reads `password=+FILE`; never on the command line).
    pub password_file: PathBuf,
    /// The vCenter certificate's thumbprint.
    pub thumbprint: String,
    /// Transport modes, tried in order.
    pub modes: Vec<VddkMode>,
    /// Where VDDK is installed.
    pub libdir: PathBuf,
}

/// The user name redacted: with a Secret's keys swapped it is the password.
impl std::fmt::Debug for VddkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VddkSettings")
            .field("server", &self.server)
            .field("username", &"<redacted>")
            .field("password_file", &self.password_file)
            .field("thumbprint", &self.thumbprint)
            .field("modes", &self.modes)
            .field("libdir", &self.libdir)
            .finish()
    }
}

/// The name nbdkit's vddk plugin gives a transport mode (`transports=`).
fn nbdkit_mode(mode: VddkMode) -> &'static str {
    match mode {
        VddkMode::Nbdssl => "nbdssl",
        VddkMode::Nbd => "nbd",
        VddkMode::Hotadd => "hotadd",
        VddkMode::San => "san",
    }
}

/// Which state of a disk an export serves, and how.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// The disk as a snapshot froze it, read-only (a backup).
    Snapshot(&'a SnapshotRef),
    /// The VM's own disk, writable (a restore into a powered-off VM).
    Write,
}

impl DiskReader {
    /// The nbdkit command that serves `disk` on `<dir>/nbd.sock` (a snapshot's read-only, or
    /// the live disk writable); nbdkit writes `<dir>/nbdkit.pid` once it accepts connections.
    pub fn nbdkit_command(
        &self,
        vm: &VmRef,
        access: Access<'_>,
        disk: &Disk,
        dir: &Path,
    ) -> Result<Command, SourceError> {
        let mut cmd = Command::new("nbdkit");
        // --exit-with-parent: nbdkit never outlives the agent; -r: a source is never written.
        cmd.arg("--exit-with-parent");
        if let Access::Snapshot(_) = access {
            cmd.arg("--readonly");
        }
        cmd.args(["--foreground", "--unix"])
            .arg(dir.join("nbd.sock"))
            .arg("--pidfile")
            .arg(dir.join("nbdkit.pid"));
        match self {
            DiskReader::Nfs { datastores } => {
                let writable = matches!(access, Access::Write);
                let path = self.flat_file(datastores, disk, writable)?;
                cmd.arg("file").arg(format!("file={}", path.display()));
            }
            DiskReader::Vddk(v) => {
                let modes: Vec<&str> = v.modes.iter().copied().map(nbdkit_mode).collect();
                cmd.arg("vddk")
                    .arg(format!("libdir={}", v.libdir.display()))
                    .arg(format!("server={}", v.server))
                    .arg(format!("user={}", v.username))
                    .arg(format!("password=+{}", v.password_file.display()))
                    .arg(format!("thumbprint={}", v.thumbprint))
                    .arg(format!("vm=moref={}", vm.moref));
                if let Access::Snapshot(snapshot) = access {
                    cmd.arg(format!("snapshot={}", snapshot.moref));
                }
                cmd.arg(format!("transports={}", modes.join(":")))
                    .arg(format!("file={}", disk.file_name));
            }
        }
        Ok(cmd)
    }

    fn flat_file(
        &self,
        datastores: &BTreeMap<String, PathBuf>,
        disk: &Disk,
        writable: bool,
    ) -> Result<PathBuf, SourceError> {
        let (ds, rel) =
            parse_datastore_path(&disk.file_name).ok_or_else(|| SourceError::BadPath {
                key: disk.key,
                file: disk.file_name.clone(),
            })?;
        let root = datastores.get(&ds).ok_or_else(|| SourceError::NotMounted {
            key: disk.key,
            datastore: ds.clone(),
            mounted: datastores.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        let path = root.join(flat_extent_path(&rel));
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            // A directory on the way the agent may not enter: who owns it says whom to read as.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(SourceError::PermissionDenied {
                    key: disk.key,
                    owner: closed_directory(&path),
                    who: identity(),
                    path,
                });
            }
            Err(e) => {
                return Err(SourceError::Unreadable {
                    key: disk.key,
                    path,
                    reason: e.to_string(),
                });
            }
        };
        if meta.len() < disk.capacity {
            return Err(SourceError::Unreadable {
                key: disk.key,
                path,
                reason: format!("{} bytes, but the disk holds {}", meta.len(), disk.capacity),
            });
        }
        // ESXi's files are readable by their owner only: a wrong user shows here, with what
        // to change, rather than as an nbdkit that exits.
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
        {
            use std::os::unix::fs::MetadataExt;
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(SourceError::PermissionDenied {
                    key: disk.key,
                    owner: format!(
                        "the file is owned by uid {} gid {}, mode {:04o}",
                        meta.uid(),
                        meta.gid(),
                        meta.mode() & 0o7777
                    ),
                    who: identity(),
                    path,
                });
            }
            return Err(SourceError::Unreadable {
                key: disk.key,
                path,
                reason: e.to_string(),
            });
        }
        Ok(path)
    }

    /// Starts the export for one disk and waits (bounded) until it listens.
    pub async fn open(
        &self,
        vm: &VmRef,
        access: Access<'_>,
        disk: &Disk,
    ) -> Result<DiskSource, SourceError> {
        let key = disk.key;
        let dir = std::env::temp_dir().join(format!(
            "sendense-source-{}-{}-{}",
            std::process::id(),
            disk.key,
            unique()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| SourceError::ScratchDir { key, source })?;
        // nbdkit writes its pid file once it accepts connections: the readiness signal.
        let pidfile = dir.join("nbdkit.pid");
        let mut cmd = self.nbdkit_command(vm, access, disk, &dir)?;
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SourceError::Spawn { key, source })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SourceError::Exited { key, status });
            }
            if pidfile.exists() {
                break;
            }
            if Instant::now() > deadline {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SourceError::NotListening { key });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(DiskSource { _child: child, dir })
    }
}

/// A running source export; stopped and cleaned up on drop.
pub struct DiskSource {
    _child: Child,
    dir: PathBuf,
}

impl DiskSource {
    /// The export's URL as text (`nbd+unix:///?socket=...`).
    pub fn url_text(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    pub fn url(&self) -> NbdUrl {
        NbdUrl {
            address: Address::Unix(self.dir.join("nbd.sock")),
            export: String::new(),
            tls: None,
        }
    }
}

impl Drop for DiskSource {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first directory on `path` this process may not enter, with its owner and mode.
fn closed_directory(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    for dir in path
        .ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip(1)
    {
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            break;
        };
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
            return match std::fs::metadata(dir) {
                Ok(m) => format!(
                    "the directory {} is owned by uid {} gid {}, mode {:04o}",
                    dir.display(),
                    m.uid(),
                    m.gid(),
                    m.mode() & 0o7777
                ),
                Err(_) => format!("the directory {} may not be entered", dir.display()),
            };
        }
    }
    "a directory on its path may not be entered".into()
}

/// "uid U gid G, groups A,B": who this process is, for a permission error.
fn identity() -> String {
    // SAFETY: getuid, getgid and getgroups have no preconditions; the buffer is as long as
    // the count passed.
    let (uid, gid, groups) = unsafe {
        let mut buf = [0 as libc::gid_t; 64];
        let n = libc::getgroups(buf.len() as libc::c_int, buf.as_mut_ptr());
        let groups: Vec<String> = buf[..usize::try_from(n).unwrap_or(0)]
            .iter()
            .map(|g| g.to_string())
            .collect();
        (libc::getuid(), libc::getgid(), groups)
    };
    if groups.is_empty() {
        format!("uid {uid} gid {gid}")
    } else {
        format!("uid {uid} gid {gid}, groups {}", groups.join(","))
    }
}

fn unique() -> u32 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> (VmRef, SnapshotRef, Disk) {
        (
            VmRef {
                moref: "vm-62".into(),
                name: "web-01".into(),
                instance_uuid: "u".into(),
            },
            SnapshotRef {
                moref: "snapshot-7".into(),
                name: "sendense-x".into(),
            },
            Disk {
                key: 2000,
                label: "Hard disk 1".into(),
                capacity: 1 << 20,
                file_name: "[ds1] web-01/web-01.vmdk".into(),
                change_id: None,
            },
        )
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn vddk_command_names_vm_snapshot_and_file_and_keeps_the_password_in_a_file() {
        let (vm, snap, disk) = fixtures();
        let t = DiskReader::Vddk(VddkSettings {
            server: "vcenter.example.com".into(),
            username: "backup@vsphere.local".into(),
            password_file: "/run/secrets/vcenter/password".into(),
            thumbprint: "AA:BB".into(),
            modes: vec![VddkMode::Nbdssl, VddkMode::Nbd],
            libdir: "/opt/vmware-vix-disklib-distrib".into(),
        });
        let cmd = t
            .nbdkit_command(&vm, Access::Snapshot(&snap), &disk, Path::new("/tmp/s"))
            .expect("command");
        let a = args(&cmd);
        assert_eq!(
            &a[..8],
            [
                "--exit-with-parent",
                "--readonly",
                "--foreground",
                "--unix",
                "/tmp/s/nbd.sock",
                "--pidfile",
                "/tmp/s/nbdkit.pid",
                "vddk"
            ]
        );
        for want in [
            "libdir=/opt/vmware-vix-disklib-distrib",
            "server=vcenter.example.com",
            "user=backup@vsphere.local",
            "password=+/run/secrets/vcenter/password",
            "thumbprint=AA:BB",
            "vm=moref=vm-62",
            "snapshot=snapshot-7",
            "transports=nbdssl:nbd",
            "file=[ds1] web-01/web-01.vmdk",
        ] {
            assert!(a.contains(&want.to_string()), "{want} missing from {a:?}");
        }
        // Only the password's file is named; `-`, `+FILE` or a literal are nbdkit's choices.
        let password = a.iter().filter(|x| x.starts_with("password=")).count();
        assert_eq!(password, 1, "{a:?}");
        // A Debug print of the settings (in a plan, an error) names no user: with a Secret's
        // keys swapped it is the password.
        let shown = format!("{t:?}");
        assert!(!shown.contains("backup@vsphere.local"), "{shown}");
        assert!(shown.contains("/run/secrets/vcenter/password"), "{shown}");
    }

    #[test]
    fn vddk_write_mode_serves_the_live_disk_writable() {
        let (vm, _, disk) = fixtures();
        let t = DiskReader::Vddk(VddkSettings {
            server: "vcenter.example.com".into(),
            username: "restore@vsphere.local".into(),
            password_file: "/run/secrets/vcenter/password".into(),
            thumbprint: "AA:BB".into(),
            modes: vec![VddkMode::Nbd],
            libdir: "/opt/vmware-vix-disklib-distrib".into(),
        });
        let a = args(
            &t.nbdkit_command(&vm, Access::Write, &disk, Path::new("/tmp/w"))
                .expect("command"),
        );
        assert_eq!(
            &a[..7],
            [
                "--exit-with-parent",
                "--foreground",
                "--unix",
                "/tmp/w/nbd.sock",
                "--pidfile",
                "/tmp/w/nbdkit.pid",
                "vddk"
            ]
        );
        assert!(!a.iter().any(|x| x == "--readonly" || x == "-r"), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("snapshot=")), "{a:?}");
        for want in [
            "vm=moref=vm-62",
            "file=[ds1] web-01/web-01.vmdk",
            "transports=nbd",
            "password=+/run/secrets/vcenter/password",
        ] {
            assert!(a.contains(&want.to_string()), "{want} missing from {a:?}");
        }
    }

    #[test]
    fn nfs_maps_the_datastore_path_to_the_mounted_flat_file() {
        let (vm, snap, disk) = fixtures();
        let dir = std::env::temp_dir().join(format!("sendense-src-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("web-01")).expect("dir");
        let flat = dir.join("web-01/web-01-flat.vmdk");
        std::fs::File::create(&flat)
            .and_then(|f| f.set_len(1 << 20))
            .expect("flat file");
        let t = DiskReader::Nfs {
            datastores: BTreeMap::from([("ds1".to_string(), dir.clone())]),
        };
        let a = args(
            &t.nbdkit_command(&vm, Access::Snapshot(&snap), &disk, Path::new("/tmp/s"))
                .expect("command"),
        );
        assert_eq!(
            a.last().map(String::as_str),
            Some(format!("file={}", flat.display()).as_str())
        );

        let other = DiskReader::Nfs {
            datastores: BTreeMap::from([("ds9".to_string(), dir.clone())]),
        };
        let err = other
            .nbdkit_command(&vm, Access::Snapshot(&snap), &disk, Path::new("/tmp/s"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"ds1\" is not mounted") && err.contains("ds9"),
            "{err}"
        );
        let short = Disk {
            capacity: 2 << 20,
            ..disk
        };
        let err = t
            .nbdkit_command(&vm, Access::Snapshot(&snap), &short, Path::new("/tmp/s"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("but the disk holds"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
