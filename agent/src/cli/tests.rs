//! The agent parses every command line the operator builds: each contract struct, written out
//! with `to_args()` and parsed by the agent's own parser, comes back equal.

use clap::Parser;
use sendense_contract::cli::{
    BackupArgs, DEFAULT_NBD_PING_TIMEOUT_SECONDS, HubPrepareArgs, HubRemoveArgs, NbdPingArgs,
    PrepareDisk, RepoCommitArgs, RepoProbeArgs, Transport, VddkMode,
};

use super::*;

fn parse(args: &[String]) -> Command {
    let argv = std::iter::once(AGENT_BINARY.to_owned()).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn minimal_backup() -> BackupArgs {
    let mut args = BackupArgs::new("https://vc.example.com/sdk", "DC0", "nightly-1");
    args.vm = Some("db 01".into());
    args.targets = vec!["2000:nbd://10.0.0.7:10100/".parse().expect("target")];
    args.thumbprint = Some("AA:BB".into());
    args
}

fn every_backup_field_set() -> BackupArgs {
    BackupArgs {
        vm: None,
        vm_uuid: Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into()),
        targets: vec![
            "2000:nbd://10.0.0.7:10100/".parse().expect("target"),
            "2001:nbd+unix:///x?socket=/run/a.sock"
                .parse()
                .expect("target"),
        ],
        base_change_ids: vec![
            "2000:52 3c 1d/7".parse().expect("change id"),
            "2001:*".parse().expect("change id"),
        ],
        transport: Transport::Vddk,
        datastores: vec![
            "datastore1=/datastores/0".parse().expect("mount"),
            "ds 2=/datastores/1".parse().expect("mount"),
        ],
        vddk_libdir: "/opt/vddk".into(),
        vddk_modes: vec![VddkMode::Hotadd, VddkMode::San, VddkMode::Nbd],
        thumbprint: Some("AA:BB".into()),
        ca_file: Some("/etc/sendense/vcenter-ca/ca.crt".into()),
        insecure_skip_verify: true,
        credentials_dir: Some("/etc/sendense/credentials".into()),
        snapshot_prefix: "sd-".into(),
        quiesce: true,
        request_size: 1 << 20,
        in_flight: 8,
        connections: 2,
        request_timeout: 30,
        deadline_seconds: Some(3600),
        max_bandwidth_mbps: Some(800),
        skip_verify: true,
        job_uid: Some("8f14e45f-ceea-4c8a-9b1c-3a0b5e0d1c2a".into()),
        checksum: true,
        result_file: Some("/dev/termination-log".into()),
        status_addr: Some("$(POD_IP):9090".into()),
        tls_dir: Some("/etc/sendense/nbd-tls".into()),
        ..BackupArgs::new("https://vc.example.com/sdk", "DC0", "nightly-1")
    }
}

#[test]
fn the_agent_parses_every_backup_command_line_the_operator_builds() {
    for args in [minimal_backup(), every_backup_field_set()] {
        match parse(&args.to_args()) {
            Command::Backup(parsed) => assert_eq!(*parsed, args),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn the_agent_parses_the_hub_repo_and_ping_command_lines_the_operator_builds() {
    for prepare in [
        HubPrepareArgs {
            disks: vec![PrepareDisk {
                file: "/repository/ns/vm/2000/b.qcow2".into(),
                size: 8 << 30,
                backing: Some("/repository/ns/vm/2000/a.qcow2".into()),
            }],
        },
        HubPrepareArgs {
            disks: vec![
                PrepareDisk {
                    file: "/repository/ns/vm/2000/a.qcow2".into(),
                    size: 1 << 20,
                    backing: None,
                },
                PrepareDisk {
                    file: "/repository/ns/vm/2001/a.qcow2".into(),
                    size: 2 << 20,
                    backing: Some("/repository/ns/vm/2001/z.qcow2".into()),
                },
            ],
        },
    ] {
        match parse(&prepare.to_args()) {
            Command::Hub {
                command: HubCommand::Prepare(parsed),
            } => assert_eq!(parsed, prepare),
            other => panic!("{other:?}"),
        }
    }
    let remove = HubRemoveArgs {
        dirs: vec!["/repository/a".into(), "/repository/b c".into()],
    };
    match parse(&remove.to_args()) {
        Command::Hub {
            command: HubCommand::Remove(parsed),
        } => assert_eq!(parsed, remove),
        other => panic!("{other:?}"),
    }
    for result_file in [Some("/dev/termination-log".into()), None] {
        let probe = RepoProbeArgs {
            dir: "/repository".into(),
            list_manifests: result_file.is_some(),
            remove_orphans: if result_file.is_some() {
                vec!["ns/vm/j-u-a1".into(), "a b".into()]
            } else {
                vec![]
            },
            orphan_min_idle_seconds: if result_file.is_some() { 60 } else { 3600 },
            result_file,
        };
        match parse(&probe.to_args()) {
            Command::Repo {
                command: RepoCommand::Probe(parsed),
            } => assert_eq!(parsed, probe),
            other => panic!("{other:?}"),
        }
    }
    let commit = RepoCommitArgs {
        root: "/repository".into(),
        manifest: r#"{"version":1,"job":{"name":"a b"}}"#.into(),
        result_file: Some("/dev/termination-log".into()),
    };
    match parse(&commit.to_args()) {
        Command::Repo {
            command: RepoCommand::Commit(parsed),
        } => assert_eq!(parsed, commit),
        other => panic!("{other:?}"),
    }
    for timeout in [4, DEFAULT_NBD_PING_TIMEOUT_SECONDS] {
        let ping = NbdPingArgs {
            urls: vec![
                "nbds://127.0.0.1:10100/?tls-hostname=h.ns.svc".into(),
                "nbds://127.0.0.1:10101/?tls-hostname=h.ns.svc".into(),
            ],
            timeout,
            tls_dir: (timeout == 4).then(|| "/etc/sendense/nbd-tls".into()),
            host_env: (timeout == 4).then(|| "POD_IP".into()),
        };
        match parse(&ping.to_args()) {
            Command::NbdPing(parsed) => assert_eq!(parsed, ping),
            other => panic!("{other:?}"),
        }
    }
}

fn rejected(words: &[&str]) -> (clap::Error, Vec<OsString>) {
    let args: Vec<OsString> = words.iter().map(OsString::from).collect();
    let argv = std::iter::once(OsString::from(AGENT_BINARY)).chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(cli) => panic!("{words:?} parsed: {cli:?}"),
        Err(e) => (e, args),
    }
}

#[test]
fn a_rejected_backup_or_probe_still_writes_its_result_file() {
    let (e, args) = rejected(&[
        "backup",
        "--vcenter",
        "https://vc/sdk",
        "--result-file",
        "/tmp/result.json",
    ]);
    let (file, text) = usage_error_result(&e, &args).expect("a result");
    assert_eq!(file, PathBuf::from("/tmp/result.json"));
    let result = BackupResult::parse(&text).expect("a backup result");
    assert_eq!(result.reason, Some(AgentReason::InvalidArguments));
    let error = result.error.unwrap_or_default();
    assert!(
        error.contains("--datacenter") && !error.contains("Usage:"),
        "{error}"
    );

    let (e, args) = rejected(&["repo", "probe", "--result-file=/tmp/p.json", "--dir"]);
    let (file, text) = usage_error_result(&e, &args).expect("a result");
    assert_eq!(file, PathBuf::from("/tmp/p.json"));
    let probe = ProbeResult::parse(&text).expect("a probe result");
    assert_eq!(
        (probe.ok, probe.reason),
        (false, Some(ProbeReason::InvalidArguments))
    );

    for (words, what) in [
        (
            &[
                "restore",
                "--source",
                "2000:/a.qcow2",
                "--result-file",
                "/tmp/r.json",
            ][..],
            "restore",
        ),
        (
            &[
                "files",
                "get",
                "--result-file",
                "/tmp/r.json",
                "--restore-point",
                "/rp",
            ][..],
            "files",
        ),
    ] {
        let (e, args) = rejected(words);
        let (file, text) = usage_error_result(&e, &args).expect(what);
        assert_eq!(file, PathBuf::from("/tmp/r.json"));
        let v: serde_json::Value = serde_json::from_str(&text).expect(what);
        assert_eq!(
            (v["ok"].as_bool(), v["nothingWritten"].as_bool()),
            (Some(false), Some(true)),
            "{what}"
        );
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("invalid arguments"),
            "{text}"
        );
    }

    let (e, args) = rejected(&["hub", "prepare", "--result-file", "/tmp/x"]);
    assert_eq!(
        usage_error_result(&e, &args),
        None,
        "hub has no result file"
    );
    let (e, args) = rejected(&["backup", "--help", "--result-file", "/tmp/x"]);
    assert_eq!(usage_error_result(&e, &args), None, "help is no error");
}

#[test]
fn threads_default_to_one_per_disk_within_the_cpus() {
    let cli = |extra: &[&str]| {
        let mut argv = vec![AGENT_BINARY, "copy"];
        for i in 0..3 {
            argv.extend(["--source", ["nbd://s/a", "nbd://s/b", "nbd://s/c"][i]]);
            argv.extend(["--target", ["nbd://t/a", "nbd://t/b", "nbd://t/c"][i]]);
        }
        argv.extend(extra);
        Cli::try_parse_from(argv).expect("parses")
    };
    // Only when the environment does not choose (the variable is read as the flag's default).
    if std::env::var_os("SENDENSE_AGENT_THREADS").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(cli(&[]).threads(), 3.min(cpus));
        let ping = Cli::try_parse_from([AGENT_BINARY, "nbd-ping", "nbd://h/"]).expect("parses");
        assert_eq!(ping.threads(), 1);
    }
    assert_eq!(cli(&["--threads", "1"]).threads(), 1);
    assert_eq!(cli(&["--threads", "5"]).threads(), 5);
    assert!(Cli::try_parse_from([AGENT_BINARY, "nbd-ping", "nbd://h/", "--threads", "0"]).is_err());
}
