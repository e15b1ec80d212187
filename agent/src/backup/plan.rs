//! The backup plan: the operator's command line (the contract's [`BackupArgs`]) checked and
//! turned into what the backup runs, with the vCenter settings and credentials. Pure but for
//! what it reads through an [`Environment`] (the CA bundle, the credentials), so tests give it
//! fixed contents.

use std::collections::BTreeMap;
use std::env::VarError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sendense_contract::AgentReason;
use sendense_contract::cli::{BackupArgs, DiskTarget, Transport};
use sendense_vsphere::{Tls, VCenterConfig, VmSelector};

use super::failure::{Failure, failure_from};
use crate::copy::CopyOptions;
use crate::nbd::{ConnectOptions, NbdError, NbdUrl};
use crate::source::{DiskReader, VddkSettings};

/// What to back up and where to.
#[derive(Debug, Clone)]
pub struct BackupPlan {
    pub datacenter: String,
    pub vm: VmSelector,
    /// Device key -> hub export for that disk. Only these disks are backed up.
    pub targets: BTreeMap<i32, NbdUrl>,
    /// Device key -> change ID of the previous backup of that disk (absent: full copy).
    pub base_change_ids: BTreeMap<i32, String>,
    /// How the snapshot's disks are read.
    pub reader: DiskReader,
    pub snapshot_prefix: String,
    /// Name of this backup (goes into the snapshot name and description).
    pub job: String,
    /// UID of this backup's BackupJob (goes into the snapshot name and description).
    pub job_uid: Option<String>,
    pub quiesce: bool,
    pub copy: CopyOptions,
    pub connect: ConnectOptions,
    /// Also hash each disk as read from the snapshot, for verifying the restore point.
    pub checksum: bool,
}

/// Why there is no plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--tls-dir: {0}")]
    Tls(#[from] crate::nbd::TlsError),
    #[error("--targets {0} is an nbds:// URL: give --tls-dir with the job's certificates")]
    TlsDirMissing(String),
    #[error("give exactly one of --thumbprint, --ca-file or --insecure-skip-verify")]
    Trust,
    #[error("reading --ca-file {}: {source}", .path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--targets {target}: {source}")]
    Target {
        target: DiskTarget,
        #[source]
        source: NbdError,
    },
    #[error("--base-change-ids names disk {0}, which has no --targets entry")]
    BaseWithoutTarget(i32),
    #[error("give --vm or --vm-uuid")]
    NoVm,
    #[error("--vcenter: not a URL")]
    VCenterUrl,
    #[error("the vddk transport reads the password from a file: give --credentials-dir")]
    VddkWithoutCredentialsDir,
    #[error("the vddk transport needs --thumbprint")]
    VddkWithoutThumbprint,
    #[error("reading {}: {source}", .path.display())]
    CredentialsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no vCenter credentials: set {USERNAME_VAR} and {PASSWORD_VAR}, or --credentials-dir: {0}"
    )]
    NoCredentials(#[source] VarError),
    #[error("{PASSWORD_VAR} is not set: {0}")]
    NoPassword(#[source] VarError),
}

impl PlanError {
    pub fn reason(&self) -> AgentReason {
        match self {
            PlanError::CredentialsFile { .. }
            | PlanError::NoCredentials(_)
            | PlanError::NoPassword(_) => AgentReason::CredentialsUnavailable,
            _ => AgentReason::InvalidArguments,
        }
    }
}

failure_from!(PlanError);

pub const USERNAME_VAR: &str = "SENDENSE_VCENTER_USERNAME";
pub const PASSWORD_VAR: &str = "SENDENSE_VCENTER_PASSWORD";

/// What a plan reads besides the command line.
pub trait Environment {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    fn read_to_string(&self, path: &Path) -> std::io::Result<String>;
    fn var(&self, name: &str) -> Result<String, VarError>;
}

/// The agent's own file system and environment variables.
pub struct Process;

impl Environment for Process {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn var(&self, name: &str) -> Result<String, VarError> {
        std::env::var(name)
    }
}

/// vCenter credentials: from `--credentials-dir` (files `username` and `password`, a mounted
/// Secret) or the environment; never from arguments.
struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    fn load(dir: Option<&Path>, env: &impl Environment) -> Result<Self, PlanError> {
        if let Some(dir) = dir {
            let read = |f: &str| {
                let path = dir.join(f);
                env.read_to_string(&path)
                    .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                    .map_err(|source| PlanError::CredentialsFile { path, source })
            };
            return Ok(Self {
                username: read("username")?,
                password: read("password")?,
            });
        }
        Ok(Self {
            username: env.var(USERNAME_VAR).map_err(PlanError::NoCredentials)?,
            password: env.var(PASSWORD_VAR).map_err(PlanError::NoPassword)?,
        })
    }
}

impl BackupPlan {
    /// The plan and the vCenter settings. The command line is checked before the credentials
    /// are read: a refused command line is `InvalidArguments` even without credentials.
    pub fn new(
        args: &BackupArgs,
        env: &impl Environment,
    ) -> Result<(Self, VCenterConfig), PlanError> {
        let mut targets = BTreeMap::new();
        for t in &args.targets {
            let url = t.url.parse().map_err(|source| PlanError::Target {
                target: t.clone(),
                source,
            })?;
            targets.insert(t.key, url);
        }
        let mut base_change_ids = BTreeMap::new();
        for b in &args.base_change_ids {
            if !targets.contains_key(&b.key) {
                return Err(PlanError::BaseWithoutTarget(b.key));
            }
            base_change_ids.insert(b.key, b.change_id.clone());
        }
        let vm = match (&args.vm, &args.vm_uuid) {
            (Some(n), _) => VmSelector::Name(n.clone()),
            (None, Some(u)) => VmSelector::InstanceUuid(u.clone()),
            (None, None) => return Err(PlanError::NoVm),
        };
        let request_timeout = Duration::from_secs(args.request_timeout);
        let (vcenter, reader) = connection(&Connection::from(args), request_timeout, env)?;
        let nbd_tls = args
            .tls_dir
            .as_deref()
            .map(crate::nbd::TlsClient::from_dir)
            .transpose()?;
        if nbd_tls.is_none()
            && let Some(t) = args.targets.iter().find(|t| t.url.starts_with("nbds"))
        {
            return Err(PlanError::TlsDirMissing(t.url.clone()));
        }
        let plan = BackupPlan {
            datacenter: args.datacenter.clone(),
            vm,
            targets,
            base_change_ids,
            reader,
            snapshot_prefix: args.snapshot_prefix.clone(),
            job: args.job.clone(),
            job_uid: args.job_uid.clone().filter(|u| !u.is_empty()),
            quiesce: args.quiesce,
            copy: CopyOptions {
                request_size: args.request_size,
                max_in_flight: args.in_flight,
                verify: !args.skip_verify,
                rate: args
                    .max_bandwidth_mbps
                    .map(|m| std::sync::Arc::new(crate::rate::RateLimiter::from_mbps(m))),
                ..Default::default()
            },
            connect: ConnectOptions {
                connections: args.connections,
                tls: nbd_tls,
                ..ConnectOptions::with_request_timeout(request_timeout)
            },
            checksum: args.checksum,
        };
        Ok((plan, vcenter))
    }
}

/// The vCenter and transport settings of a command line (`backup`, `restore-vm`).
pub(crate) struct Connection<'a> {
    pub vcenter: &'a str,
    pub thumbprint: Option<&'a String>,
    pub ca_file: Option<&'a PathBuf>,
    pub insecure_skip_verify: bool,
    pub credentials_dir: Option<&'a Path>,
    pub transport: Transport,
    pub datastores: &'a [sendense_contract::cli::DatastoreMount],
    pub vddk_libdir: &'a Path,
    pub vddk_modes: &'a [sendense_contract::cli::VddkMode],
}

impl<'a> From<&'a BackupArgs> for Connection<'a> {
    fn from(args: &'a BackupArgs) -> Self {
        Self {
            vcenter: &args.vcenter,
            thumbprint: args.thumbprint.as_ref(),
            ca_file: args.ca_file.as_ref(),
            insecure_skip_verify: args.insecure_skip_verify,
            credentials_dir: args.credentials_dir.as_deref(),
            transport: args.transport,
            datastores: &args.datastores,
            vddk_libdir: &args.vddk_libdir,
            vddk_modes: &args.vddk_modes,
        }
    }
}

impl<'a> From<&'a sendense_contract::cli::RestoreVmArgs> for Connection<'a> {
    fn from(args: &'a sendense_contract::cli::RestoreVmArgs) -> Self {
        Self {
            vcenter: &args.vcenter,
            thumbprint: args.thumbprint.as_ref(),
            ca_file: args.ca_file.as_ref(),
            insecure_skip_verify: args.insecure_skip_verify,
            credentials_dir: args.credentials_dir.as_deref(),
            transport: args.transport,
            datastores: &args.datastores,
            vddk_libdir: &args.vddk_libdir,
            vddk_modes: &args.vddk_modes,
        }
    }
}

/// The vCenter settings (credentials read) and the disk access of a transport.
pub(crate) fn connection(
    c: &Connection<'_>,
    request_timeout: Duration,
    env: &impl Environment,
) -> Result<(VCenterConfig, DiskReader), PlanError> {
    let tls = trust(c, env)?;
    let mut reader = disk_reader(c)?;
    let credentials = Credentials::load(c.credentials_dir, env)?;
    if let DiskReader::Vddk(v) = &mut reader {
        v.username = credentials.username.clone();
    }
    let mut vcenter = VCenterConfig::new(
        c.vcenter.to_owned(),
        credentials.username,
        credentials.password,
        tls,
    );
    vcenter.call_timeout = request_timeout;
    Ok((vcenter, reader))
}

/// How the vCenter certificate is trusted: exactly one way.
fn trust(c: &Connection<'_>, env: &impl Environment) -> Result<Tls, PlanError> {
    match (c.thumbprint, c.ca_file, c.insecure_skip_verify) {
        (Some(t), None, false) => Ok(Tls::Thumbprint(t.clone())),
        (None, Some(path), false) => {
            env.read(path)
                .map(Tls::CaPem)
                .map_err(|source| PlanError::CaFile {
                    path: path.clone(),
                    source,
                })
        }
        (None, None, true) => Ok(Tls::Insecure),
        _ => Err(PlanError::Trust),
    }
}

/// The contract's transport and its settings as a reader; the VDDK user is the vCenter user,
/// filled in once the credentials are read.
fn disk_reader(c: &Connection<'_>) -> Result<DiskReader, PlanError> {
    Ok(match c.transport {
        Transport::Nfs => DiskReader::Nfs {
            datastores: c
                .datastores
                .iter()
                .map(|d| (d.name.clone(), d.dir.clone()))
                .collect(),
        },
        Transport::Vddk => {
            let server = url::Url::parse(c.vcenter)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .ok_or(PlanError::VCenterUrl)?;
            let dir = c
                .credentials_dir
                .ok_or(PlanError::VddkWithoutCredentialsDir)?;
            DiskReader::Vddk(VddkSettings {
                server,
                username: String::new(),
                password_file: dir.join("password"),
                thumbprint: c
                    .thumbprint
                    .cloned()
                    .ok_or(PlanError::VddkWithoutThumbprint)?,
                modes: c.vddk_modes.to_vec(),
                libdir: c.vddk_libdir.to_owned(),
            })
        }
    })
}

#[cfg(test)]
mod tests;
