//! The agent's command lines, as typed structs: the agent parses them (clap), the operator
//! builds pods' argument lists from them with `to_args()`, which returns the words after the
//! binary name, subcommand included.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The agent's binary, as pods run it.
pub const AGENT_BINARY: &str = "sendense-agent";

pub const DEFAULT_SNAPSHOT_PREFIX: &str = "sendense-";
/// VMware misbehaves with reads above ~2 MiB under parallel transfers.
pub const DEFAULT_REQUEST_SIZE: u32 = 2 << 20;
pub const DEFAULT_IN_FLIGHT: usize = 32;
pub const DEFAULT_CONNECTIONS: usize = 4;
pub const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 120;
pub const DEFAULT_VDDK_LIBDIR: &str = "/opt/vmware-vix-disklib-distrib";
pub const DEFAULT_NBD_PING_TIMEOUT_SECONDS: u64 = 5;

/// How the agent reads the snapshot's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Transport {
    /// The flat disk files of the snapshot, from datastores mounted into the pod.
    #[default]
    Nfs,
    /// nbdkit's VDDK plugin (VMware's library; production images bring it).
    Vddk,
}

/// VDDK transport modes, tried in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum VddkMode {
    Nbdssl,
    Nbd,
    Hotadd,
    San,
}

fn value_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// Why a `KEY:VALUE` or `NAME=DIR` argument was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

fn device_key(s: &str, what: &str) -> Result<(i32, String), ArgError> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| ArgError(format!("{s:?}: expected DEVICE_KEY:{what}")))?;
    let key = k
        .trim()
        .parse()
        .map_err(|_| ArgError(format!("{s:?}: {k:?} is not a device key (e.g. 2000)")))?;
    let v = v.trim();
    if v.is_empty() {
        return Err(ArgError(format!("{s:?}: {what} is empty")));
    }
    Ok((key, v.to_owned()))
}

/// One disk's hub export: `2000:nbd://host:10100/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTarget {
    pub key: i32,
    pub url: String,
}

impl FromStr for DiskTarget {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (key, url) = device_key(s, "NBD_URL")?;
        Ok(Self { key, url })
    }
}

impl fmt::Display for DiskTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key, self.url)
    }
}

/// The change ID of a disk's previous backup: `2000:<changeId>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChangeId {
    pub key: i32,
    pub change_id: String,
}

impl FromStr for BaseChangeId {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (key, change_id) = device_key(s, "CHANGE_ID")?;
        Ok(Self { key, change_id })
    }
}

impl fmt::Display for BaseChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key, self.change_id)
    }
}

/// A datastore mounted into the agent pod for the nfs transport: `NAME=DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreMount {
    pub name: String,
    pub dir: PathBuf,
}

impl FromStr for DatastoreMount {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        match s.split_once('=') {
            Some((n, d)) if !n.trim().is_empty() && !d.trim().is_empty() => Ok(Self {
                name: n.trim().to_owned(),
                dir: PathBuf::from(d.trim()),
            }),
            _ => Err(ArgError(format!("{s:?}: expected NAME=DIR"))),
        }
    }
}

impl fmt::Display for DatastoreMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.dir.display())
    }
}

/// An argument list under construction.
#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn words(words: &[&str]) -> Self {
        Self(words.iter().map(|w| (*w).to_owned()).collect())
    }
    fn opt(&mut self, flag: &str, value: impl ToString) {
        self.0.push(flag.to_owned());
        self.0.push(value.to_string());
    }
    fn some(&mut self, flag: &str, value: Option<impl ToString>) {
        if let Some(v) = value {
            self.opt(flag, v);
        }
    }
    fn not_default<T: PartialEq + ToString>(&mut self, flag: &str, value: T, default: T) {
        if value != default {
            self.opt(flag, value);
        }
    }
    fn path(&mut self, flag: &str, value: Option<&PathBuf>) {
        self.some(flag, value.map(|p| p.display()));
    }
    fn flag(&mut self, flag: &str, on: bool) {
        if on {
            self.0.push(flag.to_owned());
        }
    }
    fn joined<T: ToString>(&mut self, flag: &str, values: &[T]) {
        if !values.is_empty() {
            let v: Vec<String> = values.iter().map(T::to_string).collect();
            self.opt(flag, v.join(","));
        }
    }
}

/// `sendense-agent backup`: back up a VM (one snapshot, every target disk's changed areas
/// copied, snapshot removed). Credentials: SENDENSE_VCENTER_USERNAME /
/// SENDENSE_VCENTER_PASSWORD, or --credentials-dir with files `username` and `password` (a
/// mounted Secret); never command-line arguments.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct BackupArgs {
    /// vCenter SDK URL, e.g. https://vcenter.example.com/sdk
    #[arg(long)]
    pub vcenter: String,
    #[arg(long)]
    pub datacenter: String,
    /// VM inventory name (or use --vm-uuid).
    #[arg(long, conflicts_with = "vm_uuid", required_unless_present = "vm_uuid")]
    pub vm: Option<String>,
    /// VM instance UUID.
    #[arg(long)]
    pub vm_uuid: Option<String>,
    /// Hub export per disk: 2000:nbd://host:port/export,2001:...
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<DiskTarget>,
    /// Change ID of the previous backup per disk: 2000:<changeId>,... (absent: full copy)
    #[arg(long, value_delimiter = ',')]
    pub base_change_ids: Vec<BaseChangeId>,
    #[arg(long, value_enum, default_value_t = Transport::Nfs)]
    pub transport: Transport,
    /// Mounted datastore for the nfs transport: NAME=DIR (repeatable)
    #[arg(long = "datastore")]
    pub datastores: Vec<DatastoreMount>,
    #[arg(long, default_value = DEFAULT_VDDK_LIBDIR)]
    pub vddk_libdir: PathBuf,
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [VddkMode::Nbdssl])]
    pub vddk_modes: Vec<VddkMode>,
    /// Pinned certificate fingerprint (SHA-256 or SHA-1, colon-separated hex).
    #[arg(long)]
    pub thumbprint: Option<String>,
    /// PEM CA bundle that signed the vCenter certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Skip certificate verification (labs only).
    #[arg(long)]
    pub insecure_skip_verify: bool,
    /// Directory with `username` and `password` files.
    #[arg(long)]
    pub credentials_dir: Option<PathBuf>,
    /// Name of this backup (BackupJob name): the snapshot is named <prefix><job>, followed by
    /// `-<first 8 characters of --job-uid>` when that is given.
    #[arg(long)]
    pub job: String,
    /// The BackupJob's UID: its snapshot carries it (name and description), so a snapshot
    /// names the job that took it even when a job of the same name comes later.
    #[arg(long)]
    pub job_uid: Option<String>,
    #[arg(long, default_value = DEFAULT_SNAPSHOT_PREFIX)]
    pub snapshot_prefix: String,
    #[arg(long)]
    pub quiesce: bool,
    #[arg(long, default_value_t = DEFAULT_REQUEST_SIZE)]
    pub request_size: u32,
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    pub in_flight: usize,
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// Seconds allowed for each NBD and vSphere request.
    #[arg(long, default_value_t = DEFAULT_REQUEST_TIMEOUT_SECONDS)]
    pub request_timeout: u64,
    /// Seconds the whole backup may take; then it stops and removes its snapshot.
    #[arg(long)]
    pub deadline_seconds: Option<u64>,
    /// Cap on the data read from the source over all disks, in megabits per second (the
    /// SourceNode's `spec.limits.maxBandwidthMbps`). Unset: no cap.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_bandwidth_mbps: Option<u32>,
    /// Do not read the copied chunks back from the hub after the flush to compare them with
    /// what the source gave (they are, by default).
    #[arg(long)]
    pub skip_verify: bool,
    /// Also hash each disk as read from the snapshot (a full read), for verify.
    #[arg(long)]
    pub checksum: bool,
    /// Also write the JSON result here, on every outcome (early failures included), shrunk to
    /// at most 4096 bytes (a Kubernetes termination message); stdout gets the whole result.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Serve `GET /progress` (JSON) on HOST:PORT (or :PORT) while the backup runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub status_addr: Option<String>,
    /// Certificates for nbds:// targets: ca-cert.pem, client-cert.pem, client-key.pem.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
}

impl BackupArgs {
    /// Arguments with every optional setting at its default.
    pub fn new(
        vcenter: impl Into<String>,
        datacenter: impl Into<String>,
        job: impl Into<String>,
    ) -> Self {
        Self {
            vcenter: vcenter.into(),
            datacenter: datacenter.into(),
            vm: None,
            vm_uuid: None,
            targets: Vec::new(),
            base_change_ids: Vec::new(),
            transport: Transport::Nfs,
            datastores: Vec::new(),
            vddk_libdir: PathBuf::from(DEFAULT_VDDK_LIBDIR),
            vddk_modes: vec![VddkMode::Nbdssl],
            thumbprint: None,
            ca_file: None,
            insecure_skip_verify: false,
            credentials_dir: None,
            job: job.into(),
            job_uid: None,
            snapshot_prefix: DEFAULT_SNAPSHOT_PREFIX.to_owned(),
            quiesce: false,
            request_size: DEFAULT_REQUEST_SIZE,
            in_flight: DEFAULT_IN_FLIGHT,
            connections: DEFAULT_CONNECTIONS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT_SECONDS,
            deadline_seconds: None,
            max_bandwidth_mbps: None,
            skip_verify: false,
            checksum: false,
            result_file: None,
            status_addr: None,
            tls_dir: None,
        }
    }

    /// `backup ...`: settings at their defaults are left out.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["backup"]);
        a.opt("--vcenter", &self.vcenter);
        a.opt("--datacenter", &self.datacenter);
        a.opt("--job", &self.job);
        a.some("--vm", self.vm.as_ref());
        a.some("--vm-uuid", self.vm_uuid.as_ref());
        a.joined("--targets", &self.targets);
        a.joined("--base-change-ids", &self.base_change_ids);
        a.not_default(
            "--transport",
            value_name(&self.transport),
            value_name(&Transport::Nfs),
        );
        for d in &self.datastores {
            a.opt("--datastore", d);
        }
        a.not_default(
            "--vddk-libdir",
            self.vddk_libdir.display().to_string(),
            DEFAULT_VDDK_LIBDIR.to_owned(),
        );
        if self.vddk_modes != [VddkMode::Nbdssl] {
            let modes: Vec<String> = self.vddk_modes.iter().map(value_name).collect();
            a.joined("--vddk-modes", &modes);
        }
        a.some("--thumbprint", self.thumbprint.as_ref());
        a.path("--ca-file", self.ca_file.as_ref());
        a.flag("--insecure-skip-verify", self.insecure_skip_verify);
        a.path("--credentials-dir", self.credentials_dir.as_ref());
        a.not_default(
            "--snapshot-prefix",
            self.snapshot_prefix.as_str(),
            DEFAULT_SNAPSHOT_PREFIX,
        );
        a.flag("--quiesce", self.quiesce);
        a.not_default("--request-size", self.request_size, DEFAULT_REQUEST_SIZE);
        a.not_default("--in-flight", self.in_flight, DEFAULT_IN_FLIGHT);
        a.not_default("--connections", self.connections, DEFAULT_CONNECTIONS);
        a.not_default(
            "--request-timeout",
            self.request_timeout,
            DEFAULT_REQUEST_TIMEOUT_SECONDS,
        );
        a.some("--job-uid", self.job_uid.as_deref());
        a.some("--deadline-seconds", self.deadline_seconds);
        a.some("--max-bandwidth-mbps", self.max_bandwidth_mbps);
        a.flag("--checksum", self.checksum);
        a.flag("--skip-verify", self.skip_verify);
        a.path("--result-file", self.result_file.as_ref());
        a.some("--status-addr", self.status_addr.as_ref());
        a.path("--tls-dir", self.tls_dir.as_ref());
        a.0
    }
}

/// One disk `hub prepare` creates: its QCOW2 file, its virtual size in bytes (the disk's
/// capacity) and, for an incremental, the previous backup of the disk it is layered on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareDisk {
    pub file: PathBuf,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
}

impl std::str::FromStr for PrepareDisk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| {
            format!(r#"expected {{"file": PATH, "size": BYTES, "backing": PATH (optional)}}: {e}"#)
        })
    }
}

/// `sendense-agent hub prepare`: create the QCOW2 of each of a job's disks for a backup, in
/// order (one init container for all of them). An existing file is never replaced: each
/// attempt of a job writes into a directory of its own.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct HubPrepareArgs {
    /// A disk as JSON, `{"file": PATH, "size": BYTES, "backing": PATH}` (`backing` only for
    /// an incremental); repeated for each disk.
    #[arg(long = "disk", required = true, value_parser = clap::value_parser!(PrepareDisk))]
    pub disks: Vec<PrepareDisk>,
}

impl HubPrepareArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["hub", "prepare"]);
        for d in &self.disks {
            a.opt(
                "--disk",
                serde_json::to_string(d).expect("a disk serialises"),
            );
        }
        a.0
    }
}

/// One disk a hub prepares and serves: `{"key": DEVICE_KEY, "port": PORT, "file": PATH,
/// "size": BYTES, "backing": PATH}` (`backing` only for an incremental), the file created as
/// `hub prepare` creates it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeDisk {
    pub key: i32,
    pub port: u16,
    pub file: PathBuf,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
}

impl std::str::FromStr for ServeDisk {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| {
            format!(
                r#"expected {{"key": DEVICE_KEY, "port": PORT, "file": PATH, "size": BYTES, "backing": PATH (optional)}}: {e}"#
            )
        })
    }
}

/// `sendense-agent hub serve`: the hub's one container. It creates each disk's QCOW2 (as `hub
/// prepare` does; a file that exists is never replaced), then serves each with its own qemu-nbd (TLS only, the attempt's client identity alone) until either a qemu-nbd ends,
/// which fails the hub (its last words go to `--result-file`), or the commit request appears in
/// `--commit-request` (a file the kubelet fills from the pod's annotation): then every qemu-nbd
/// is stopped, so nothing can write the files any more, and the attempt is committed in
/// process as `repo commit` would (the result, as JSON, to `--result-file`). Exits 0 when the
/// restore point is committed, 1 otherwise.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct HubServeArgs {
    /// A disk as JSON, `{"key": DEVICE_KEY, "port": PORT, "file": PATH, "size": BYTES,
    /// "backing": PATH}` (`backing` only for an incremental); repeated.
    #[arg(long = "disk", required = true, value_parser = clap::value_parser!(ServeDisk))]
    pub disks: Vec<ServeDisk>,
    /// The address every export is bound to (the pod's IP).
    #[arg(long)]
    pub bind: String,
    /// Clients each qemu-nbd serves at once.
    #[arg(long)]
    pub shared: u32,
    /// The server's certificates (ca-cert.pem, server-cert.pem, server-key.pem).
    #[arg(long)]
    pub tls_dir: PathBuf,
    /// The only client certificate identity (its distinguished name) the exports serve.
    #[arg(long)]
    pub client_identity: String,
    /// The repository volume's root (the commit's manifest names files relative to it).
    #[arg(long)]
    pub root: PathBuf,
    /// The file the commit request (the manifest, JSON, without digests) appears in; empty or
    /// missing until then.
    #[arg(long)]
    pub commit_request: PathBuf,
    /// Where the result goes: the commit's JSON, or the reason the hub stopped serving.
    #[arg(long)]
    pub result_file: Option<PathBuf>,
}

impl HubServeArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["hub", "serve"]);
        for d in &self.disks {
            a.opt(
                "--disk",
                serde_json::to_string(d).expect("a disk serialises"),
            );
        }
        a.opt("--bind", &self.bind);
        a.opt("--shared", self.shared);
        a.path("--tls-dir", Some(&self.tls_dir));
        a.opt("--client-identity", &self.client_identity);
        a.path("--root", Some(&self.root));
        a.path("--commit-request", Some(&self.commit_request));
        a.path("--result-file", self.result_file.as_ref());
        a.0
    }
}

/// `sendense-agent hub remove`: remove the directories of attempts that did not commit (their
/// QCOW2 files and a half-written manifest; a missing directory is fine). A directory holding a
/// committed restore point's manifest is refused, as is anything but such files in it and a
/// path with `..`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct HubRemoveArgs {
    /// An attempt's directory to remove (repeatable).
    #[arg(long = "dir", required = true)]
    pub dirs: Vec<PathBuf>,
}

impl HubRemoveArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["hub", "remove"]);
        for d in &self.dirs {
            a.path("--dir", Some(d));
        }
        a.0
    }
}

/// `sendense-agent repo commit`: make an attempt's directory a committed restore point. Reads
/// each disk back through its backing chain (the SHA-256 of the disk as it restores), flushes
/// the files, then writes the manifest atomically (temporary file, fsync, rename, fsync of the
/// directory). Repeated for the same job and attempt, it reports the manifest already there;
/// a manifest of another job or attempt is never replaced. Exits 1 when it cannot commit.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RepoCommitArgs {
    /// The volume's root (the paths in the manifest are relative to it).
    #[arg(long)]
    pub root: PathBuf,
    /// The manifest to write (JSON), without digests or commit time.
    #[arg(long)]
    pub manifest: String,
    /// Also write the JSON result here (on failure too).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
}

impl RepoCommitArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["repo", "commit"]);
        a.path("--root", Some(&self.root));
        a.opt("--manifest", &self.manifest);
        a.path("--result-file", self.result_file.as_ref());
        a.0
    }
}

/// `sendense-agent repo prune`: retention's removal of one restore point from its chain. Its
/// children's files are made independent of its files (per disk the cheaper of committing the
/// only child's data down into the point's file, or rebasing each child onto the point's
/// parent), read back against the SHA-256 their manifests record, their manifests pointed past
/// it, then its files, manifest and directory removed. The decisions are journalled in its
/// manifest before any file is touched: run again after a crash, it finishes the same job.
/// Exits 1 when it refuses or fails (the result says why).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RepoPruneArgs {
    /// The volume's root.
    #[arg(long)]
    pub root: PathBuf,
    /// The restore point's directory, relative to the root.
    #[arg(long)]
    pub point: String,
    /// Report the plan (strategies, bytes to move, bytes that would be freed); write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds each qemu-img merge may take (default: 10 minutes plus one second per 8 MiB of
    /// the disk's size, i.e. a merge slower than 8 MiB/s of disk is stopped).
    #[arg(long)]
    pub timeout_seconds: Option<u64>,
    /// Also write the JSON result here (on failure too).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
}

impl RepoPruneArgs {
    pub fn new(root: impl Into<PathBuf>, point: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            point: point.into(),
            dry_run: false,
            timeout_seconds: None,
            result_file: None,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["repo", "prune"]);
        a.path("--root", Some(&self.root));
        a.opt("--point", &self.point);
        a.flag("--dry-run", self.dry_run);
        a.some("--timeout-seconds", self.timeout_seconds);
        a.path("--result-file", self.result_file.as_ref());
        a.0
    }
}

/// `sendense-agent repo probe`: prove DIR writable (write, fsync, read back, delete a 4 KiB
/// file) and measure it: capacity, used and available bytes, number and allocated bytes of
/// its *.qcow2 files. Exits 1 when the probe fails.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RepoProbeArgs {
    #[arg(long)]
    pub dir: PathBuf,
    /// Also print every restore point manifest under DIR, one JSON line each, before the result.
    #[arg(long)]
    pub list_manifests: bool,
    /// Also write the JSON result here (on failure too).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// First remove this orphaned attempt directory (relative to DIR; repeated): only when it
    /// holds no manifest, only attempt files, and nothing in it changed for
    /// --orphan-min-idle-seconds.
    #[arg(long = "remove-orphan")]
    pub remove_orphans: Vec<String>,
    #[arg(long, default_value_t = DEFAULT_ORPHAN_MIN_IDLE_SECONDS)]
    pub orphan_min_idle_seconds: u64,
}

/// How long an attempt directory of a job that no longer exists must have been left unchanged
/// before it is removed.
pub const DEFAULT_ORPHAN_MIN_IDLE_SECONDS: u64 = 3600;

impl RepoProbeArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["repo", "probe"]);
        a.path("--dir", Some(&self.dir));
        a.flag("--list-manifests", self.list_manifests);
        for d in &self.remove_orphans {
            a.opt("--remove-orphan", d);
        }
        a.not_default(
            "--orphan-min-idle-seconds",
            self.orphan_min_idle_seconds,
            DEFAULT_ORPHAN_MIN_IDLE_SECONDS,
        );
        a.path("--result-file", self.result_file.as_ref());
        a.0
    }
}

/// `sendense-agent nbd-ping`: complete an NBD handshake with an export and disconnect (a
/// readiness probe for hub containers: a listening socket alone does not prove qemu-nbd
/// serves the export).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct NbdPingArgs {
    /// nbd[s]://host:port/export or nbd[s]+unix:///export?socket=/path; several are pinged
    /// one after the other, within the one timeout.
    #[arg(required = true)]
    pub urls: Vec<String>,
    /// Seconds allowed for connecting and negotiating.
    #[arg(long, default_value_t = DEFAULT_NBD_PING_TIMEOUT_SECONDS)]
    pub timeout: u64,
    /// Certificates for an nbds:// URL: ca-cert.pem, client-cert.pem, client-key.pem.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Connect to the address in this environment variable instead of the URL's host (a
    /// probe reaching the pod's own IP, which the export is bound to).
    #[arg(long, value_name = "VAR")]
    pub host_env: Option<String>,
}

impl NbdPingArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["nbd-ping"]);
        a.0.extend(self.urls.iter().cloned());
        a.not_default("--timeout", self.timeout, DEFAULT_NBD_PING_TIMEOUT_SECONDS);
        a.path("--tls-dir", self.tls_dir.as_ref());
        a.some("--host-env", self.host_env.as_ref());
        a.0
    }
}

/// Where one restored disk is written: `2000:file:/target/disk.img` (a raw image file, written
/// anew beside the old one and renamed over it once complete: holes stay holes),
/// `2000:device:/dev/xvda` (a block device: every byte written, zeros as WRITE_ZEROES),
/// `2000:nbd:nbd://host:port/export` (an NBD export, every byte written) or
/// `2000:blank-nbd:URL` (an export known to read as zeros, such as a new flat disk: zeros are
/// skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreTarget {
    pub key: i32,
    pub kind: RestoreTargetKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTargetKind {
    File(PathBuf),
    Device(PathBuf),
    Nbd { url: String, blank: bool },
}

impl FromStr for RestoreTarget {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (key, rest) = device_key(s, "KIND:WHERE")?;
        let (kind, place) = rest.split_once(':').ok_or_else(|| {
            ArgError(format!(
                "{s:?}: expected DEVICE_KEY:KIND:WHERE with KIND file, device, nbd or blank-nbd"
            ))
        })?;
        let place = place.trim();
        if place.is_empty() {
            return Err(ArgError(format!("{s:?}: the {kind} target is empty")));
        }
        let kind = match kind {
            "file" => RestoreTargetKind::File(PathBuf::from(place)),
            "device" => RestoreTargetKind::Device(PathBuf::from(place)),
            "nbd" | "blank-nbd" => RestoreTargetKind::Nbd {
                url: place.to_owned(),
                blank: kind == "blank-nbd",
            },
            other => {
                return Err(ArgError(format!(
                    "{s:?}: target kind {other:?} is not one of file, device, nbd, blank-nbd"
                )));
            }
        };
        Ok(Self { key, kind })
    }
}

impl fmt::Display for RestoreTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RestoreTargetKind::File(p) => write!(f, "{}:file:{}", self.key, p.display()),
            RestoreTargetKind::Device(p) => write!(f, "{}:device:{}", self.key, p.display()),
            RestoreTargetKind::Nbd { url, blank } => {
                let k = if *blank { "blank-nbd" } else { "nbd" };
                write!(f, "{}:{k}:{url}", self.key)
            }
        }
    }
}

/// A per-disk path: `2000:/repo/dir/2000.qcow2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPath {
    pub key: i32,
    pub path: PathBuf,
}

impl FromStr for DiskPath {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (key, path) = device_key(s, "PATH")?;
        Ok(Self {
            key,
            path: PathBuf::from(path),
        })
    }
}

impl fmt::Display for DiskPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key, self.path.display())
    }
}

/// An expected SHA-256 per disk: `2000:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSha256 {
    pub key: i32,
    pub sha256: String,
}

impl FromStr for DiskSha256 {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let (key, sha256) = device_key(s, "SHA256")?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ArgError(format!(
                "{s:?}: a SHA-256 is 64 hexadecimal digits"
            )));
        }
        Ok(Self {
            key,
            sha256: sha256.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for DiskSha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key, self.sha256)
    }
}

/// `sendense-agent restore`: disks of a restore point (each the top QCOW2 of its chain, read
/// read-only through its backing files) written to their targets, every disk at once; with
/// `--expect-sha256`, each target is read back after the flush and hashed over the disk's
/// capacity. Nothing is written until every source and target has been checked.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RestoreArgs {
    /// The top QCOW2 file of a disk's chain: 2000:/repository/dir/2000.qcow2 (repeatable).
    #[arg(long = "source", required = true)]
    pub sources: Vec<DiskPath>,
    /// Where a disk goes: 2000:file:PATH, 2000:device:PATH, 2000:nbd:URL or
    /// 2000:blank-nbd:URL (repeatable; one per source).
    #[arg(long = "target", required = true)]
    pub targets: Vec<RestoreTarget>,
    /// Write only these areas of a disk (start+length per line), into a target that already
    /// holds the disk at a later state: a rollback (repeatable, 2000:PATH).
    #[arg(long = "areas-file")]
    pub areas_files: Vec<DiskPath>,
    /// Expected SHA-256 of a restored disk (the restore point's manifest records it): the
    /// target is read back and must hash to it (repeatable, 2000:HEX).
    #[arg(long = "expect-sha256")]
    pub expect_sha256: Vec<DiskSha256>,
    #[arg(long, default_value_t = DEFAULT_REQUEST_SIZE)]
    pub request_size: u32,
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    pub in_flight: usize,
    #[arg(long, default_value_t = DEFAULT_CONNECTIONS)]
    pub connections: usize,
    /// Seconds allowed for each NBD request.
    #[arg(long, default_value_t = DEFAULT_REQUEST_TIMEOUT_SECONDS)]
    pub request_timeout: u64,
    /// Certificates for nbds:// targets: ca-cert.pem, client-cert.pem, client-key.pem.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Also write the JSON result here (at most 4096 bytes: a termination message).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Serve `GET /progress` (JSON) on HOST:PORT (or :PORT) while the restore runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub status_addr: Option<String>,
}

impl RestoreArgs {
    pub fn new(sources: Vec<DiskPath>, targets: Vec<RestoreTarget>) -> Self {
        Self {
            sources,
            targets,
            areas_files: Vec::new(),
            expect_sha256: Vec::new(),
            request_size: DEFAULT_REQUEST_SIZE,
            in_flight: DEFAULT_IN_FLIGHT,
            connections: DEFAULT_CONNECTIONS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT_SECONDS,
            tls_dir: None,
            result_file: None,
            status_addr: None,
        }
    }

    /// `restore ...`: settings at their defaults are left out.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["restore"]);
        for s in &self.sources {
            a.opt("--source", s);
        }
        for t in &self.targets {
            a.opt("--target", t);
        }
        for f in &self.areas_files {
            a.opt("--areas-file", f);
        }
        for e in &self.expect_sha256 {
            a.opt("--expect-sha256", e);
        }
        a.not_default("--request-size", self.request_size, DEFAULT_REQUEST_SIZE);
        a.not_default("--in-flight", self.in_flight, DEFAULT_IN_FLIGHT);
        a.not_default("--connections", self.connections, DEFAULT_CONNECTIONS);
        a.not_default(
            "--request-timeout",
            self.request_timeout,
            DEFAULT_REQUEST_TIMEOUT_SECONDS,
        );
        a.path("--tls-dir", self.tls_dir.as_ref());
        a.path("--result-file", self.result_file.as_ref());
        a.some("--status-addr", self.status_addr.as_ref());
        a.0
    }
}

/// `sendense-agent files get`: files from a restore point's guest file systems (partition
/// tables; ext4, XFS, NTFS read in user space over NBD from the QCOW2 chains), into a directory
/// or a tar archive. Every pattern must match on the chosen volumes, or nothing is written.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct FilesGetArgs {
    /// A committed restore point's directory (its manifest names the disks).
    #[arg(long, conflicts_with = "image", required_unless_present = "image")]
    pub restore_point: Option<PathBuf>,
    /// Or one QCOW2 file (the top of a chain), read as disk 0 (or the single --disk given).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Only these disks (device keys, repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<i32>,
    /// Only these volumes, DISK:PARTITION (repeatable); default every volume with a file
    /// system.
    #[arg(long = "volume")]
    pub volumes: Vec<String>,
    /// Directory to extract into (created if missing).
    #[arg(long, conflicts_with = "tar", required_unless_present = "tar")]
    pub to: Option<PathBuf>,
    /// Tar archive to write (PAX: times with nanoseconds, owners, modes, long names).
    #[arg(long)]
    pub tar: Option<PathBuf>,
    /// Seconds allowed for each NBD request.
    #[arg(long, default_value_t = DEFAULT_REQUEST_TIMEOUT_SECONDS)]
    pub request_timeout: u64,
    /// Also write the JSON result here (at most 4096 bytes: a termination message).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Glob patterns over absolute paths: `*`, `?`, `[...]`, `**` for any depth.
    #[arg(required = true)]
    pub patterns: Vec<String>,
}

impl FilesGetArgs {
    /// `files get ...`: settings at their defaults are left out; patterns last, after `--`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["files", "get"]);
        a.path("--restore-point", self.restore_point.as_ref());
        a.path("--image", self.image.as_ref());
        for d in &self.disks {
            a.opt("--disk", d);
        }
        for v in &self.volumes {
            a.opt("--volume", v);
        }
        a.path("--to", self.to.as_ref());
        a.path("--tar", self.tar.as_ref());
        a.not_default(
            "--request-timeout",
            self.request_timeout,
            DEFAULT_REQUEST_TIMEOUT_SECONDS,
        );
        a.path("--result-file", self.result_file.as_ref());
        a.0.push("--".into());
        a.0.extend(self.patterns.iter().cloned());
        a.0
    }
}

mod restore_vm;
pub use restore_vm::RestoreVmArgs;

#[cfg(test)]
mod tests;
