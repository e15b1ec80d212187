//! Running a container's command as a local process: its own session (so the whole process
//! group can be signalled), its own mount namespace with the pod's volumes bind-mounted at the
//! container's mount paths, and death with the stand-in as a backstop.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// One volume mount: `host` appears at `target` inside the container's mount namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Mount {
    pub host: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything needed to start one container process.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub mounts: Vec<Mount>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// stdout and stderr are appended here.
    pub log: Option<PathBuf>,
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUL in {}", p.display()),
        )
    })
}

/// Creates the mount points (bind mounts need an existing target of the same kind: a directory
/// for a directory, a file for a file). A missing file is created empty and an existing one is
/// left as it is, so containers starting at the same time may share a mount point such as
/// /dev/termination-log: each binds its own file there in its own mount namespace.
fn prepare_targets(mounts: &[Mount]) -> io::Result<()> {
    for (i, m) in mounts.iter().enumerate() {
        let point = mount_point_on_host(mounts, i);
        if m.host.is_dir() {
            std::fs::create_dir_all(&point)?;
        } else {
            if let Some(parent) = point.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&point)?;
        }
    }
    Ok(())
}

/// Where the mount point of `mounts[i]` is on the host: inside the last earlier mount whose
/// target contains it (that mount is what the container sees there when this one is made),
/// else at its own target on the host file system.
fn mount_point_on_host(mounts: &[Mount], i: usize) -> PathBuf {
    let target = &mounts[i].target;
    mounts[..i]
        .iter()
        .rev()
        .find_map(|m| {
            let rest = target.strip_prefix(&m.target).ok()?;
            Some(if rest.as_os_str().is_empty() {
                m.host.clone()
            } else {
                m.host.join(rest)
            })
        })
        .unwrap_or_else(|| target.clone())
}

/// Starts the process described by `spec`.
pub fn spawn(spec: &ProcessSpec) -> io::Result<Child> {
    prepare_targets(&spec.mounts)?;
    let mounts: Vec<(CString, CString, bool)> = spec
        .mounts
        .iter()
        .map(|m| Ok((cstring(&m.host)?, cstring(&m.target)?, m.read_only)))
        .collect::<io::Result<_>>()?;
    let cwd = spec.working_dir.as_deref().map(cstring).transpose()?;
    let root = CString::new("/").expect("static string");
    let (uid, gid) = (spec.uid, spec.gid);

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().cloned())
        .stdin(Stdio::null());
    match &spec.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    cmd.kill_on_drop(false);
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // (setsid, prctl, unshare, mount, chdir, setgid, setuid) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if !mounts.is_empty() {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (host, target, read_only) in &mounts {
                    check(libc::mount(
                        host.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    if *read_only {
                        check(libc::mount(
                            std::ptr::null(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
            // After the mounts, so a working directory inside a volume is the volume's.
            if let Some(dir) = &cwd {
                check(libc::chdir(dir.as_ptr()))?;
            }
            if let Some(gid) = gid {
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = uid {
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `signal` to the whole process group led by `pid` (the container's session).
pub fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as libc::pid_t), signal);
    }
}

/// True while any process of the group led by `pid` is alive.
pub fn group_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pid as libc::pid_t), 0) == 0 }
}

/// Resolves a command name the way a shell would, on the stand-in's search path.
pub fn resolve_program(name: &str, search_path: &[PathBuf]) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    search_path
        .iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_inside_earlier_mounts_are_made_in_their_host_paths() {
        let mount = |host: &str, target: &str| Mount {
            host: PathBuf::from(host),
            target: PathBuf::from(target),
            read_only: false,
        };
        let mounts = vec![
            mount("/pods/p/volumes/out", "/sendense-e2e/out"),
            mount("/pods/p/volumes/cfg", "/etc/cfg"),
            mount("/pods/p/logs/c.termination-log", "/sendense-e2e/out/msg"),
            mount("/pods/p/logs/d.termination-log", "/dev/termination-log"),
            mount("/pods/p/volumes/other", "/sendense-e2e/outside"),
            mount("/pods/p/volumes/again", "/etc/cfg"),
        ];
        let points: Vec<PathBuf> = (0..mounts.len())
            .map(|i| mount_point_on_host(&mounts, i))
            .collect();
        assert_eq!(
            points,
            [
                "/sendense-e2e/out",
                "/etc/cfg",
                "/pods/p/volumes/out/msg",
                "/dev/termination-log",
                "/sendense-e2e/outside",
                "/pods/p/volumes/cfg",
            ]
            .map(PathBuf::from),
            "components, not string prefixes, decide what contains what"
        );
    }

    #[test]
    fn resolves_on_the_search_path_only_executables() {
        let path = vec![
            PathBuf::from("/nonexistent"),
            PathBuf::from("/bin"),
            PathBuf::from("/usr/bin"),
        ];
        let sh = resolve_program("sh", &path).expect("sh is on every machine");
        assert!(sh.ends_with("sh"));
        assert_eq!(
            resolve_program("/bin/sh", &[]),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(resolve_program("no-such-command-here", &path), None);
        let plain =
            std::env::temp_dir().join(format!("sendense-not-executable-{}", std::process::id()));
        std::fs::write(&plain, "data").expect("temp file");
        let found = resolve_program(plain.to_str().expect("utf-8 path"), &[]);
        let _ = std::fs::remove_file(&plain);
        assert_eq!(
            found, None,
            "a file without execute permission is not a command"
        );
    }
}
