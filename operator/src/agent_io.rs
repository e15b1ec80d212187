//! What the operator and `sendense-agent` say to each other, in one place: the agent's result
//! (its termination message), its live progress (`GET /progress`), the repository probe's
//! result, and the command lines of the agent, hub, probe and cleanup containers. (These move to
//! a crate both sides share; until then they mirror the agent's JSON and flags exactly.)

use serde::Deserialize;

/// The agent's JSON result (its termination message), the fields the operator reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct BackupResult {
    pub ok: bool,
    pub vm: Option<String>,
    pub snapshot: Option<SnapshotReport>,
    pub disks: Vec<DiskReport>,
    pub error: Option<String>,
    pub reason: Option<String>,
}

impl BackupResult {
    /// Parses the result from a termination message; None for anything else (a panic, logs).
    pub fn parse(message: &str) -> Option<Self> {
        serde_json::from_str(message.trim()).ok()
    }

    /// The reason the agent gave for failing, as the API shows it.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotReport {
    pub id: String,
    pub name: String,
    pub removed: bool,
    pub removal_error: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DiskReport {
    pub key: i32,
    /// "full" or "incremental".
    pub copy: String,
    pub reason: String,
    pub change_id_used: String,
    pub change_id_reached: Option<String>,
    pub bytes_to_copy: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub error: Option<String>,
}

/// The agent's live progress (`GET /progress`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ProgressReport {
    /// connecting, snapshot, copying, removing-snapshot, done.
    pub stage: String,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
    pub disks: Vec<DiskProgress>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DiskProgress {
    pub key: i32,
    pub bytes_to_copy: u64,
    pub bytes_copied: u64,
}

/// What `sendense-agent repo probe` reports.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProbeResult {
    pub ok: bool,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub qcow2_files: u64,
    pub qcow2_bytes: u64,
    pub error: Option<String>,
}

/// The agent's command lines, built from typed arguments.
pub mod cli {
    /// The agent's executable in the image.
    pub const PROGRAM: &str = "sendense-agent";

    /// One disk's hub export: `2000:nbd://host:port/`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DiskTarget {
        pub key: i32,
        pub url: String,
    }

    /// The change ID an incremental disk starts from: `2000:<changeId>`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct BaseChangeId {
        pub key: i32,
        pub change_id: String,
    }

    /// A datastore mounted into the agent pod: `NAME=DIR`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DatastoreMount {
        pub name: String,
        pub dir: String,
    }

    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub enum Transport {
        #[default]
        Nfs,
        Vddk,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum VddkMode {
        Nbdssl,
        Nbd,
        Hotadd,
        San,
    }

    impl VddkMode {
        fn as_str(self) -> &'static str {
            match self {
                Self::Nbdssl => "nbdssl",
                Self::Nbd => "nbd",
                Self::Hotadd => "hotadd",
                Self::San => "san",
            }
        }
    }

    /// `sendense-agent backup`.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct BackupArgs {
        pub vcenter: String,
        pub datacenter: String,
        pub vm: Option<String>,
        pub vm_uuid: Option<String>,
        pub targets: Vec<DiskTarget>,
        pub base_change_ids: Vec<BaseChangeId>,
        pub transport: Transport,
        pub datastores: Vec<DatastoreMount>,
        pub vddk_modes: Vec<VddkMode>,
        pub thumbprint: Option<String>,
        pub ca_file: Option<String>,
        pub insecure_skip_verify: bool,
        pub credentials_dir: Option<String>,
        pub job: String,
        pub quiesce: bool,
        pub deadline_seconds: Option<i64>,
        pub result_file: Option<String>,
        pub status_addr: Option<String>,
    }

    /// Pushes `--flag value`.
    fn flag(args: &mut Vec<String>, name: &str, value: impl Into<String>) {
        args.extend([name.to_owned(), value.into()]);
    }

    fn joined<T>(items: &[T], item: impl Fn(&T) -> String) -> String {
        items.iter().map(item).collect::<Vec<_>>().join(",")
    }

    impl BackupArgs {
        /// The argument list, starting with the subcommand.
        pub fn to_args(&self) -> Vec<String> {
            let mut a = vec!["backup".to_owned()];
            flag(&mut a, "--vcenter", &self.vcenter);
            flag(&mut a, "--datacenter", &self.datacenter);
            flag(&mut a, "--job", &self.job);
            if let Some(d) = &self.credentials_dir {
                flag(&mut a, "--credentials-dir", d);
            }
            let targets = joined(&self.targets, |t| format!("{}:{}", t.key, t.url));
            flag(&mut a, "--targets", targets);
            if let Some(f) = &self.result_file {
                flag(&mut a, "--result-file", f);
            }
            if let Some(s) = &self.status_addr {
                flag(&mut a, "--status-addr", s);
            }
            if let Some(vm) = &self.vm {
                flag(&mut a, "--vm", vm);
            }
            if let Some(uuid) = &self.vm_uuid {
                flag(&mut a, "--vm-uuid", uuid);
            }
            if !self.base_change_ids.is_empty() {
                let bases = joined(&self.base_change_ids, |b| {
                    format!("{}:{}", b.key, b.change_id)
                });
                flag(&mut a, "--base-change-ids", bases);
            }
            if self.quiesce {
                a.push("--quiesce".into());
            }
            if let Some(d) = self.deadline_seconds {
                flag(&mut a, "--deadline-seconds", d.to_string());
            }
            if let Some(t) = &self.thumbprint {
                flag(&mut a, "--thumbprint", t);
            }
            if let Some(f) = &self.ca_file {
                flag(&mut a, "--ca-file", f);
            }
            if self.insecure_skip_verify {
                a.push("--insecure-skip-verify".into());
            }
            match self.transport {
                Transport::Nfs => flag(&mut a, "--transport", "nfs"),
                Transport::Vddk => flag(&mut a, "--transport", "vddk"),
            }
            for ds in &self.datastores {
                flag(&mut a, "--datastore", format!("{}={}", ds.name, ds.dir));
            }
            if !self.vddk_modes.is_empty() {
                let modes = joined(&self.vddk_modes, |m| m.as_str().to_owned());
                flag(&mut a, "--vddk-modes", modes);
            }
            a
        }
    }

    /// `sendense-agent hub prepare`: one disk's QCOW2, layered on `backing` for an incremental.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct HubPrepareArgs {
        pub file: String,
        pub size: u64,
        pub backing: Option<String>,
    }

    impl HubPrepareArgs {
        pub fn to_args(&self) -> Vec<String> {
            let mut a = vec!["hub".to_owned(), "prepare".into()];
            flag(&mut a, "--file", &self.file);
            flag(&mut a, "--size", self.size.to_string());
            if let Some(b) = &self.backing {
                flag(&mut a, "--backing", b);
            }
            a
        }
    }

    /// `sendense-agent hub remove`: a failed job's files.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct HubRemoveArgs {
        pub files: Vec<String>,
    }

    impl HubRemoveArgs {
        pub fn to_args(&self) -> Vec<String> {
            let mut a = vec!["hub".to_owned(), "remove".into()];
            for f in &self.files {
                flag(&mut a, "--file", f);
            }
            a
        }
    }

    /// `sendense-agent repo probe`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct RepoProbeArgs {
        pub dir: String,
        pub result_file: Option<String>,
    }

    impl RepoProbeArgs {
        pub fn to_args(&self) -> Vec<String> {
            let mut a = vec!["repo".to_owned(), "probe".into()];
            flag(&mut a, "--dir", &self.dir);
            if let Some(f) = &self.result_file {
                flag(&mut a, "--result-file", f);
            }
            a
        }
    }

    /// `sendense-agent nbd-ping`: an NBD handshake, the hub's readiness probe.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct NbdPingArgs {
        pub url: String,
        pub timeout: u64,
    }

    impl NbdPingArgs {
        pub fn to_args(&self) -> Vec<String> {
            let mut a = vec!["nbd-ping".to_owned(), self.url.clone()];
            flag(&mut a, "--timeout", self.timeout.to_string());
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_result() {
        assert!(BackupResult::parse("panicked at main.rs").is_none());
        assert!(BackupResult::parse("").is_none());
    }
}
