use std::collections::BTreeMap;

use sendense_contract::cli::VddkMode;

use super::*;
use crate::nbd::Address;

/// Fixed files and variables.
#[derive(Default)]
struct Fixed {
    files: BTreeMap<PathBuf, String>,
    vars: BTreeMap<&'static str, &'static str>,
}

impl Fixed {
    fn with_env_credentials() -> Self {
        Self {
            vars: BTreeMap::from([(USERNAME_VAR, "backup@vsphere.local"), (PASSWORD_VAR, "pw")]),
            ..Default::default()
        }
    }
    fn file(mut self, path: &str, text: &str) -> Self {
        self.files.insert(path.into(), text.into());
        self
    }
}

impl Environment for Fixed {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.read_to_string(path).map(String::into_bytes)
    }
    fn read_to_string(&self, path: &Path) -> std::io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
    fn var(&self, name: &str) -> Result<String, VarError> {
        self.vars
            .get(name)
            .map(|v| v.to_string())
            .ok_or(VarError::NotPresent)
    }
}

fn args() -> BackupArgs {
    let mut a = BackupArgs::new("https://vc.example.com/sdk", "DC0", "nightly-1");
    a.vm = Some("web-01".into());
    a.thumbprint = Some("AA:BB".into());
    a.targets = vec![
        "2000:nbd://10.0.0.7:10100/".parse().expect("target"),
        "2001:nbd://10.0.0.7:10101/".parse().expect("target"),
    ];
    a
}

fn refused(args: &BackupArgs, env: &Fixed) -> (AgentReason, String) {
    match BackupPlan::new(args, env) {
        Ok(_) => panic!("{args:?} was accepted"),
        Err(e) => (e.reason(), e.to_string()),
    }
}

#[test]
fn an_nfs_backup_plans_every_target_with_the_command_lines_settings() {
    let mut a = args();
    a.base_change_ids = vec!["2001:52 3c/7".parse().expect("change id")];
    a.datastores = vec!["datastore1=/datastores/0".parse().expect("mount")];
    a.request_size = 1 << 20;
    a.in_flight = 8;
    a.connections = 2;
    a.request_timeout = 30;
    a.quiesce = true;
    a.checksum = true;
    let (plan, vcenter) = BackupPlan::new(&a, &Fixed::with_env_credentials()).expect("plan");
    assert_eq!(plan.vm, VmSelector::Name("web-01".into()));
    assert_eq!(
        plan.targets.get(&2001).map(|u| &u.address),
        Some(&Address::Tcp {
            host: "10.0.0.7".into(),
            port: 10101
        })
    );
    assert_eq!(plan.targets.len(), 2);
    assert_eq!(
        plan.base_change_ids,
        BTreeMap::from([(2001, "52 3c/7".to_string())])
    );
    match &plan.reader {
        DiskReader::Nfs { datastores } => assert_eq!(
            datastores,
            &BTreeMap::from([("datastore1".to_string(), PathBuf::from("/datastores/0"))])
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (plan.copy.request_size, plan.copy.max_in_flight),
        (1 << 20, 8)
    );
    assert_eq!(plan.connect.connections, 2);
    assert_eq!(plan.connect.request_timeout, Duration::from_secs(30));
    assert!(plan.quiesce && plan.checksum);
    assert_eq!(
        (plan.snapshot_prefix.as_str(), plan.job.as_str()),
        ("sendense-", "nightly-1")
    );
    assert_eq!(vcenter.url, "https://vc.example.com/sdk");
    assert_eq!(
        (vcenter.username.as_str(), vcenter.password.as_str()),
        ("backup@vsphere.local", "pw")
    );
    assert_eq!(vcenter.tls, Tls::Thumbprint("AA:BB".into()));
    assert_eq!(vcenter.call_timeout, Duration::from_secs(30));

    a.vm = None;
    a.vm_uuid = Some("5029a8f2".into());
    let (plan, _) = BackupPlan::new(&a, &Fixed::with_env_credentials()).expect("plan");
    assert_eq!(plan.vm, VmSelector::InstanceUuid("5029a8f2".into()));
}

#[test]
fn the_certificate_is_trusted_exactly_one_way() {
    let env = Fixed::with_env_credentials().file("/ca/ca.crt", "PEM");
    let mut a = args();
    a.thumbprint = None;
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert!(message.contains("exactly one of --thumbprint"), "{message}");
    a.ca_file = Some("/ca/ca.crt".into());
    let (_, vcenter) = BackupPlan::new(&a, &env).expect("plan");
    assert_eq!(vcenter.tls, Tls::CaPem(b"PEM".to_vec()));
    a.insecure_skip_verify = true;
    assert_eq!(refused(&a, &env).0, AgentReason::InvalidArguments);
    a.insecure_skip_verify = false;
    a.ca_file = Some("/ca/missing.crt".into());
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert!(
        message.starts_with("reading --ca-file /ca/missing.crt: "),
        "{message}"
    );
}

#[test]
fn targets_and_change_ids_must_name_the_same_disks() {
    let env = Fixed::with_env_credentials();
    let mut a = args();
    a.targets = vec!["2000:http://x/".parse().expect("target")];
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert!(
        message.starts_with("--targets 2000:http://x/: "),
        "{message}"
    );
    let mut a = args();
    a.base_change_ids = vec!["2002:52/1".parse().expect("change id")];
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert_eq!(
        message,
        "--base-change-ids names disk 2002, which has no --targets entry"
    );
}

#[test]
fn vddk_reads_the_password_from_the_credentials_dir_and_pins_the_thumbprint() {
    let env = Fixed::default()
        .file("/creds/username", "backup@vsphere.local\n")
        .file("/creds/password", "pw\r\n");
    let mut a = args();
    a.transport = Transport::Vddk;
    a.vddk_modes = vec![VddkMode::Hotadd, VddkMode::Nbdssl];
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert!(message.contains("give --credentials-dir"), "{message}");
    a.credentials_dir = Some("/creds".into());
    let (plan, vcenter) = BackupPlan::new(&a, &env).expect("plan");
    match &plan.reader {
        DiskReader::Vddk(v) => {
            assert_eq!(v.server, "vc.example.com");
            assert_eq!(v.username, "backup@vsphere.local");
            assert_eq!(v.password_file, PathBuf::from("/creds/password"));
            assert_eq!(v.thumbprint, "AA:BB");
            assert_eq!(v.modes, [VddkMode::Hotadd, VddkMode::Nbdssl]);
            assert_eq!(v.libdir, PathBuf::from("/opt/vmware-vix-disklib-distrib"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(vcenter.password, "pw", "line ends trimmed");
    a.thumbprint = None;
    a.insecure_skip_verify = true;
    let (reason, message) = refused(&a, &env);
    assert_eq!(reason, AgentReason::InvalidArguments);
    assert_eq!(message, "the vddk transport needs --thumbprint");
}

#[test]
fn credentials_come_from_the_directory_or_the_environment_after_the_arguments_are_checked() {
    let mut a = args();
    let (reason, message) = refused(&a, &Fixed::default());
    assert_eq!(reason, AgentReason::CredentialsUnavailable);
    assert!(
        message.contains(USERNAME_VAR) && message.contains("--credentials-dir"),
        "{message}"
    );
    a.credentials_dir = Some("/nonexistent/creds".into());
    let (reason, message) = refused(&a, &Fixed::with_env_credentials());
    assert_eq!(reason, AgentReason::CredentialsUnavailable);
    assert!(
        message.starts_with("reading /nonexistent/creds/username: "),
        "{message}"
    );
    a.base_change_ids = vec!["2002:52/1".parse().expect("change id")];
    assert_eq!(
        refused(&a, &Fixed::default()).0,
        AgentReason::InvalidArguments,
        "a refused command line says so, credentials or not"
    );
}
