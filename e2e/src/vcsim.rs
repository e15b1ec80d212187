//! The vCenter simulator with CBT (e2e/vcsim-cbt) for tests: built once per test run, one
//! instance per test in its own directory, killed on drop.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

/// The simulator binary, built once per test run.
pub fn simulator_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = crate::repo_root().join("e2e/vcsim-cbt/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("running e2e/vcsim-cbt/build.sh");
        assert!(out.status.success(), "build.sh failed: {:?}", out.status);
        let path = String::from_utf8(out.stdout).expect("utf-8 path");
        let path = PathBuf::from(
            path.lines()
                .last()
                .expect("build.sh prints the path")
                .trim(),
        );
        assert!(path.is_file(), "{} is not a file", path.display());
        path
    })
}

/// A running simulator in its own directory; killed and cleaned up on drop.
/// The user of the agent image, which owns the test datastores.
pub const DATASTORE_USER: u32 = 65532;

pub struct Simulator {
    pub child: Child,
    pub dir: PathBuf,
    pub info: Value,
}

impl Simulator {
    /// The simulator on 127.0.0.1 (for clients on this host only).
    pub fn start(extra: &[&str]) -> Simulator {
        Self::start_as("127.0.0.1", None, extra)
    }

    /// The simulator for the real node's pods: listening on `host` (an address of this
    /// machine; pods reach the host at its InternalIP, not at 127.0.0.1), and running as
    /// uid/gid 65532, the agent image's user. Like ESXi, the simulator writes disk files with
    /// mode 0600; a datastore export squashing every client to one user
    /// (`all_squash,anonuid=65532,anongid=65532`) looks the same to the agent.
    pub fn start_for_pods(host: &str, extra: &[&str]) -> Simulator {
        Self::start_as(host, Some(DATASTORE_USER), extra)
    }

    /// As `start_for_pods`, with the datastore's files owned by `user` (uid and gid) instead
    /// of the agent image's user: a datastore the agent may read only as that user.
    pub fn start_for_pods_owned_by(host: &str, user: u32, extra: &[&str]) -> Simulator {
        Self::start_as(host, Some(user), extra)
    }

    fn start_as(host: &str, user: Option<u32>, extra: &[&str]) -> Simulator {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sendense-vsphere-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let log = std::fs::File::create(dir.join("vcsim.log")).expect("log file");
        let mut cmd = Command::new(simulator_binary());
        if let Some(id) = user {
            std::os::unix::fs::chown(&dir, Some(id), Some(id)).expect("chown scratch dir");
            // The build cache is under root's home, which the user cannot enter: a copy here.
            let copy = dir.join("vcsim-cbt");
            std::fs::copy(simulator_binary(), &copy).expect("copying vcsim-cbt");
            use std::os::unix::process::CommandExt;
            cmd = Command::new(&copy);
            cmd.uid(id).gid(id);
        }
        let mut child = cmd
            .arg("serve")
            .arg("-datastore-dir")
            .arg(dir.join("ds"))
            .args([
                "-listen",
                &format!("{host}:0"),
                "-control-listen",
                "127.0.0.1:0",
            ])
            .args(["-tls-host", host])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting vcsim-cbt");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut sim = Simulator {
            child,
            dir,
            info: Value::Null,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no startup line within 60s; log: {}", sim.log()));
        sim.info = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("startup line {line:?}: {e}; log: {}", sim.log()));
        sim
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vcsim.log")).unwrap_or_default()
    }

    pub fn s(&self, key: &str) -> String {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} in {}", self.info))
            .to_string()
    }

    /// Runs a guest stand-in / control command of the simulator; its JSON answer.
    pub fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(simulator_binary())
            .args(args)
            .env("VCSIM_CBT_CONTROL", self.s("control_url"))
            .output()
            .expect("running vcsim-cbt client");
        assert!(
            out.status.success(),
            "vcsim-cbt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON answer")
    }

    /// Adds a thin disk of `capacity` (bytes, or with a K/M/G suffix: "8M") to `vm`, as a
    /// vSphere client's ReconfigVM_Task would; the new disk's device key.
    pub fn add_disk(&self, vm: &str, capacity: &str) -> i32 {
        let disk = self.cli(&["add-disk", "-vm", vm, "-capacity", capacity]);
        disk["key"]
            .as_i64()
            .and_then(|k| i32::try_from(k).ok())
            .unwrap_or_else(|| panic!("add-disk answered no device key: {disk}"))
    }

    /// Grows disk `key` of `vm` to `capacity` (bytes or "24M"); this resets the disk's CBT.
    pub fn resize(&self, vm: &str, key: i32, capacity: &str) {
        self.cli(&[
            "resize",
            "-vm",
            vm,
            "-disk",
            &key.to_string(),
            "-capacity",
            capacity,
        ]);
    }

    /// QueryChangedDiskAreas lists each page's areas of `vm`'s disks out of order (`true`) or
    /// sorted by start, as vCenter does (`false`).
    pub fn unsorted_pages(&self, vm: &str, unsorted: bool) {
        let vm_info = self.cli(&["cbt", "-vm", vm, &format!("-unsorted={unsorted}")]);
        assert_eq!(
            vm_info["unsorted_pages"],
            Value::Bool(unsorted),
            "{vm_info}"
        );
    }

    /// Every later QueryChangedDiskAreas call on `vm` waits `delay` before it is answered
    /// (zero: at once); lowering it releases the calls already waiting.
    pub fn query_delay(&self, vm: &str, delay: std::time::Duration) {
        let ms = delay.as_millis();
        let vm_info = self.cli(&["cbt", "-vm", vm, &format!("-query-delay={ms}ms")]);
        assert_eq!(
            vm_info["query_delay_ms"].as_u64(),
            Some(ms as u64),
            "{vm_info}"
        );
    }

    /// How many QueryChangedDiskAreas calls on `vm` are waiting out its query delay now.
    pub fn queries_held(&self, vm: &str) -> u64 {
        let vm_info = self.cli(&["vm", "-vm", vm]);
        vm_info["queries_held"]
            .as_u64()
            .unwrap_or_else(|| panic!("vm answered no queries_held: {vm_info}"))
    }

    /// SHA-256 of disk `key` of `vm` as it is now, over its whole capacity.
    pub fn checksum(&self, vm: &str, key: i32) -> String {
        let sum = self.cli(&["checksum", "-vm", vm, "-disk", &key.to_string()]);
        sum["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("checksum answered no sha256: {sum}"))
            .to_owned()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// Starts the simulator's log line for every panic it survived (`cbtsim.PanicMarker`): always
/// a simulator bug, where vCenter would have answered with a fault.
pub const PANIC_MARKER: &str = "SIMULATOR PANIC:";

impl Drop for Simulator {
    /// Also fails the test when the simulator logged a panic, even if everything else passed.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.log();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(at) = log.find(PANIC_MARKER) {
            let panic: String = log[at..].chars().take(4000).collect();
            let message = format!("vcsim-cbt logged a panic (a simulator bug):\n{panic}");
            // A second panic while the test is already failing would abort the whole binary.
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulator stand-in: a `sleep` child and a directory holding `log` as vcsim.log.
    fn simulator_with_log(name: &str, log: &str) -> Simulator {
        let dir =
            std::env::temp_dir().join(format!("sendense-vcsim-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("vcsim.log"), log).expect("log");
        let child = Command::new("sleep").arg("60").spawn().expect("sleep");
        Simulator {
            child,
            dir,
            info: Value::Null,
        }
    }

    #[test]
    fn a_panic_the_simulator_survived_fails_the_test_at_teardown() {
        let sim = simulator_with_log(
            "panicked",
            "12:00:00 vcsim-cbt: started\n12:00:01 SIMULATOR PANIC: task VirtualMachine.removeSnapshot (task-71) on vm-62: boom\ngoroutine 7 [running]:\n",
        );
        let dir = sim.dir.clone();
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(sim)));
        let message = dropped.expect_err("dropping the simulator must fail the test");
        let message = message
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            message.contains("SIMULATOR PANIC: task VirtualMachine.removeSnapshot")
                && message.contains("goroutine 7"),
            "{message}"
        );
        assert!(!dir.exists(), "the directory is removed all the same");
    }

    #[test]
    fn a_simulator_without_panics_drops_quietly() {
        let sim = simulator_with_log("clean", "12:00:00 vcsim-cbt: shutting down\n");
        let dir = sim.dir.clone();
        drop(sim);
        assert!(!dir.exists());
    }
}
