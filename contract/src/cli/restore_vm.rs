//! `sendense-agent restore-vm`: a restore point's disks back into vSphere.

use std::path::PathBuf;

use super::*;

/// `sendense-agent restore-vm`: disks of a restore point written into vSphere, through the
/// transport (`nfs`: the disks' flat files on datastores mounted writable; `vddk`: nbdkit's
/// vddk plugin in write mode). Either a new VM (`--new-vm`: created with the disks' layout,
/// then filled) or a VM's disks overwritten in place (`--vm-uuid`/`--vm`: the VM must be
/// powered off and have no snapshots; with `--since-change-id` only the blocks changed since
/// the restore point are written). Credentials as for `backup`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct RestoreVmArgs {
    /// vCenter SDK URL, e.g. https://vcenter.example.com/sdk
    #[arg(long)]
    pub vcenter: String,
    #[arg(long)]
    pub datacenter: String,
    /// vCenter certificate SHA-256 (or SHA-1) thumbprint, AA:BB:...
    #[arg(long)]
    pub thumbprint: Option<String>,
    /// PEM file of the CA that signed the vCenter certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    #[arg(long)]
    pub insecure_skip_verify: bool,
    /// Directory with files `username` and `password` (a mounted Secret).
    #[arg(long)]
    pub credentials_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Transport::Nfs)]
    pub transport: Transport,
    /// Datastore mounted writable for the nfs transport: NAME=DIR (repeatable).
    #[arg(long = "datastore")]
    pub datastores: Vec<DatastoreMount>,
    #[arg(long, default_value = DEFAULT_VDDK_LIBDIR)]
    pub vddk_libdir: PathBuf,
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [VddkMode::Nbdssl])]
    pub vddk_modes: Vec<VddkMode>,

    /// The top QCOW2 file of a disk's chain: 2000:/repository/dir/2000.qcow2 (repeatable).
    #[arg(long = "source", required = true)]
    pub sources: Vec<DiskPath>,
    /// Expected SHA-256 of a disk at the restore point (its manifest records it): a disk
    /// written whole is read back and must hash to it (repeatable, 2000:HEX).
    #[arg(long = "expect-sha256")]
    pub expect_sha256: Vec<DiskSha256>,

    /// Create this VM (it must not exist, unless a failed attempt of the same `--tag` left
    /// it) and restore into its new disks.
    #[arg(long, conflicts_with_all = ["vm", "vm_uuid"], required_unless_present_any = ["vm", "vm_uuid"], requires = "target_datastore")]
    pub new_vm: Option<String>,
    /// Folder of the new VM, an inventory path below the datacenter's VM folder.
    #[arg(long, requires = "new_vm")]
    pub folder: Option<String>,
    /// Resource pool of the new VM: a cluster or host (its root pool), or Cluster/Resources/pool.
    #[arg(long, requires = "new_vm")]
    pub resource_pool: Option<String>,
    /// Datastore of the new VM's files and disks.
    #[arg(long, requires = "new_vm")]
    pub target_datastore: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub cpus: i32,
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: i64,
    #[arg(long, default_value = "otherGuest64")]
    pub guest_id: String,
    /// bios or efi; unset: vSphere's default.
    #[arg(long)]
    pub firmware: Option<String>,
    /// Marks the VM this restore creates (its annotation): the RestoreJob's UID.
    #[arg(long)]
    pub tag: Option<String>,

    /// Restore in place into the VM of this instance UUID.
    #[arg(long, conflicts_with = "vm")]
    pub vm_uuid: Option<String>,
    /// Restore in place into the VM of this name.
    #[arg(long)]
    pub vm: Option<String>,
    /// In place: the change ID the restore point reached, per disk (2000:<changeId>). With
    /// CBT still valid on the VM, only the blocks changed since are written; otherwise the
    /// whole disk.
    #[arg(long = "since-change-id")]
    pub since_change_ids: Vec<BaseChangeId>,
    /// In place: a later restore point's own QCOW2 file of a disk (2000:PATH, repeatable):
    /// the blocks it holds are written back too.
    #[arg(long = "later-layer")]
    pub later_layers: Vec<DiskPath>,
    /// Prefix of the temporary snapshot an in-place restore takes to ask CBT.
    #[arg(long, default_value = DEFAULT_SNAPSHOT_PREFIX)]
    pub snapshot_prefix: String,

    #[arg(long, default_value_t = DEFAULT_REQUEST_SIZE)]
    pub request_size: u32,
    #[arg(long, default_value_t = DEFAULT_IN_FLIGHT)]
    pub in_flight: usize,
    /// Seconds allowed for each NBD request and each vCenter call.
    #[arg(long, default_value_t = DEFAULT_REQUEST_TIMEOUT_SECONDS)]
    pub request_timeout: u64,
    /// Also write the JSON result here (at most 4096 bytes: a termination message).
    #[arg(long)]
    pub result_file: Option<PathBuf>,
    /// Serve `GET /progress` (JSON) on HOST:PORT (or :PORT) while the restore runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub status_addr: Option<String>,
}

impl RestoreVmArgs {
    /// Arguments with every optional setting at its default.
    pub fn new(vcenter: impl Into<String>, datacenter: impl Into<String>) -> Self {
        Self {
            vcenter: vcenter.into(),
            datacenter: datacenter.into(),
            thumbprint: None,
            ca_file: None,
            insecure_skip_verify: false,
            credentials_dir: None,
            transport: Transport::Nfs,
            datastores: Vec::new(),
            vddk_libdir: PathBuf::from(DEFAULT_VDDK_LIBDIR),
            vddk_modes: vec![VddkMode::Nbdssl],
            sources: Vec::new(),
            expect_sha256: Vec::new(),
            new_vm: None,
            folder: None,
            resource_pool: None,
            target_datastore: None,
            cpus: 1,
            memory_mib: 2048,
            guest_id: "otherGuest64".into(),
            firmware: None,
            tag: None,
            vm_uuid: None,
            vm: None,
            since_change_ids: Vec::new(),
            later_layers: Vec::new(),
            snapshot_prefix: DEFAULT_SNAPSHOT_PREFIX.to_owned(),
            request_size: DEFAULT_REQUEST_SIZE,
            in_flight: DEFAULT_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT_SECONDS,
            result_file: None,
            status_addr: None,
        }
    }

    /// `restore-vm ...`: settings at their defaults are left out.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Argv::words(&["restore-vm"]);
        a.opt("--vcenter", &self.vcenter);
        a.opt("--datacenter", &self.datacenter);
        a.some("--thumbprint", self.thumbprint.as_ref());
        a.path("--ca-file", self.ca_file.as_ref());
        a.flag("--insecure-skip-verify", self.insecure_skip_verify);
        a.path("--credentials-dir", self.credentials_dir.as_ref());
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
            a.opt("--vddk-modes", modes.join(","));
        }
        for s in &self.sources {
            a.opt("--source", s);
        }
        for e in &self.expect_sha256 {
            a.opt("--expect-sha256", e);
        }
        a.some("--new-vm", self.new_vm.as_ref());
        a.some("--folder", self.folder.as_ref());
        a.some("--resource-pool", self.resource_pool.as_ref());
        a.some("--target-datastore", self.target_datastore.as_ref());
        a.not_default("--cpus", self.cpus, 1);
        a.not_default("--memory-mib", self.memory_mib, 2048);
        a.not_default("--guest-id", self.guest_id.as_str(), "otherGuest64");
        a.some("--firmware", self.firmware.as_ref());
        a.some("--tag", self.tag.as_ref());
        a.some("--vm-uuid", self.vm_uuid.as_ref());
        a.some("--vm", self.vm.as_ref());
        for c in &self.since_change_ids {
            a.opt("--since-change-id", c);
        }
        for l in &self.later_layers {
            a.opt("--later-layer", l);
        }
        a.not_default(
            "--snapshot-prefix",
            self.snapshot_prefix.as_str(),
            DEFAULT_SNAPSHOT_PREFIX,
        );
        a.not_default("--request-size", self.request_size, DEFAULT_REQUEST_SIZE);
        a.not_default("--in-flight", self.in_flight, DEFAULT_IN_FLIGHT);
        a.not_default(
            "--request-timeout",
            self.request_timeout,
            DEFAULT_REQUEST_TIMEOUT_SECONDS,
        );
        a.path("--result-file", self.result_file.as_ref());
        a.some("--status-addr", self.status_addr.as_ref());
        a.0
    }
}
