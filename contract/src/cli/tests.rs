//! Command lines as `to_args()` writes them: defaults left out, hub/repo/ping lines parsed back
//! by clap into the same struct, malformed values refused by name. (Every command line,
//! `backup` with every field set included, round-trips through the agent's own parser in the
//! agent's tests.)

use clap::Parser;

use super::*;

#[derive(Parser, Debug)]
#[command(name = "sendense-agent")]
enum Line {
    Backup(Box<BackupArgs>),
    NbdPing(NbdPingArgs),
    Restore(RestoreArgs),
    RestoreVm(Box<RestoreVmArgs>),
    Files {
        #[command(subcommand)]
        files: Files,
    },
    Hub {
        #[command(subcommand)]
        hub: Hub,
    },
    Repo {
        #[command(subcommand)]
        repo: Repo,
    },
}

#[derive(clap::Subcommand, Debug)]
enum Files {
    Get(FilesGetArgs),
}

#[derive(clap::Subcommand, Debug)]
enum Hub {
    Prepare(HubPrepareArgs),
    Serve(HubServeArgs),
    Remove(HubRemoveArgs),
}

#[derive(clap::Subcommand, Debug)]
enum Repo {
    Probe(RepoProbeArgs),
    Prune(RepoPruneArgs),
}

fn parse(args: Vec<String>) -> Line {
    let argv = std::iter::once(AGENT_BINARY.to_owned()).chain(args.iter().cloned());
    Line::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn defaults_are_left_out_of_the_command_line() {
    let mut args = BackupArgs::new("https://vc/sdk", "DC0", "job-1");
    args.vm = Some("vm".into());
    args.targets = vec!["2000:nbd://h:1/".parse().unwrap()];
    assert_eq!(
        args.to_args(),
        [
            "backup",
            "--vcenter",
            "https://vc/sdk",
            "--datacenter",
            "DC0",
            "--job",
            "job-1",
            "--vm",
            "vm",
            "--targets",
            "2000:nbd://h:1/"
        ]
    );
}

#[test]
fn hub_repo_and_ping_arguments_round_trip() {
    let prepare = HubPrepareArgs {
        disks: vec![
            PrepareDisk {
                file: "/repository/ns/vm \"x\",y/2000/b.qcow2".into(),
                size: 8 << 30,
                backing: Some("/repository/ns/vm \"x\",y/2000/a.qcow2".into()),
            },
            PrepareDisk {
                file: "/repository/ns/vm/2001/a.qcow2".into(),
                size: 1 << 20,
                backing: None,
            },
        ],
    };
    assert_eq!(
        prepare.to_args()[2..4],
        [
            "--disk",
            r#"{"file":"/repository/ns/vm \"x\",y/2000/b.qcow2","size":8589934592,"backing":"/repository/ns/vm \"x\",y/2000/a.qcow2"}"#
        ]
    );
    assert!(matches!(parse(prepare.to_args()), Line::Hub { hub: Hub::Prepare(p) } if p == prepare));
    let serve = HubServeArgs {
        disks: vec![
            ServeDisk {
                key: 2000,
                port: 10100,
                file: "/repository/ns/vm \"x\",y/2000/b.qcow2".into(),
                size: 8 << 30,
                backing: Some("/repository/ns/vm \"x\",y/2000/a.qcow2".into()),
            },
            ServeDisk {
                key: 2001,
                port: 10101,
                file: "/repository/ns/vm/2001/a.qcow2".into(),
                size: 1 << 30,
                backing: None,
            },
        ],
        bind: "$(POD_IP)".into(),
        shared: 8,
        tls_dir: "/etc/sendense/nbd-tls".into(),
        client_identity: "O=Sendense,CN=agent".into(),
        root: "/repository".into(),
        commit_request: "/etc/sendense/commit/manifest".into(),
        result_file: Some("/dev/termination-log".into()),
    };
    assert_eq!(
        serve.to_args()[2..4],
        [
            "--disk",
            r#"{"key":2000,"port":10100,"file":"/repository/ns/vm \"x\",y/2000/b.qcow2","size":8589934592,"backing":"/repository/ns/vm \"x\",y/2000/a.qcow2"}"#
        ]
    );
    assert!(matches!(parse(serve.to_args()), Line::Hub { hub: Hub::Serve(s) } if s == serve));
    let remove = HubRemoveArgs {
        dirs: vec!["/repository/a".into(), "/repository/b c".into()],
    };
    assert!(matches!(parse(remove.to_args()), Line::Hub { hub: Hub::Remove(r) } if r == remove));
    let probe = RepoProbeArgs {
        dir: "/repository".into(),
        list_manifests: true,
        result_file: Some("/dev/termination-log".into()),
        remove_orphans: vec!["ns/vm/j-u-a1".into()],
        orphan_min_idle_seconds: 7200,
    };
    assert!(matches!(parse(probe.to_args()), Line::Repo { repo: Repo::Probe(p) } if p == probe));
    let mut prune = RepoPruneArgs::new("/repository", "ns/vm/j-u-a1");
    assert_eq!(
        prune.to_args(),
        [
            "repo",
            "prune",
            "--root",
            "/repository",
            "--point",
            "ns/vm/j-u-a1"
        ]
    );
    prune.dry_run = true;
    prune.timeout_seconds = Some(3600);
    prune.result_file = Some("/dev/termination-log".into());
    assert!(matches!(parse(prune.to_args()), Line::Repo { repo: Repo::Prune(p) } if p == prune));
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
        assert!(matches!(parse(ping.to_args()), Line::NbdPing(p) if p == ping));
    }
}

#[test]
fn malformed_pairs_name_the_value_and_the_expected_form() {
    let e = "nbd://h:1/".parse::<DiskTarget>().unwrap_err().to_string();
    assert!(
        e.contains("\"nbd://h:1/\"") && e.contains("device key"),
        "{e}"
    );
    let e = "2000".parse::<BaseChangeId>().unwrap_err().to_string();
    assert!(e.contains("DEVICE_KEY:CHANGE_ID"), "{e}");
    let e = "2000:".parse::<DiskTarget>().unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = "datastore1"
        .parse::<DatastoreMount>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("NAME=DIR"), "{e}");
    let err = Line::try_parse_from([
        "sendense-agent",
        "backup",
        "--vcenter",
        "x",
        "--datacenter",
        "d",
        "--job",
        "j",
        "--vm",
        "v",
        "--targets",
        "2000:nbd://h:1/",
        "--transport",
        "ftp",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--transport") && err.contains("nfs") && err.contains("vddk"),
        "{err}"
    );
}

#[test]
fn restore_line_round_trips_with_every_target_kind() {
    let mut args = RestoreArgs::new(
        vec![
            "2000:/repo/rp/2000.qcow2".parse().unwrap(),
            "2001:/repo/rp/2001.qcow2".parse().unwrap(),
        ],
        vec![
            "2000:file:/targets/2000/disk.img".parse().unwrap(),
            "2001:blank-nbd:nbd+unix:///?socket=/run/x.sock"
                .parse()
                .unwrap(),
        ],
    );
    assert_eq!(
        args.to_args(),
        [
            "restore",
            "--source",
            "2000:/repo/rp/2000.qcow2",
            "--source",
            "2001:/repo/rp/2001.qcow2",
            "--target",
            "2000:file:/targets/2000/disk.img",
            "--target",
            "2001:blank-nbd:nbd+unix:///?socket=/run/x.sock",
        ]
    );
    args.areas_files = vec!["2000:/tmp/areas".parse().unwrap()];
    args.expect_sha256 = vec![format!("2000:{}", "AB".repeat(32)).parse().unwrap()];
    args.targets[1] = "2001:device:/dev/xvdb".parse().unwrap();
    args.request_timeout = 30;
    args.result_file = Some("/dev/termination-log".into());
    match parse(args.to_args()) {
        Line::Restore(back) => assert_eq!(back, args),
        other => panic!("{other:?}"),
    }
    assert_eq!(args.expect_sha256[0].sha256, "ab".repeat(32));
    assert_eq!(
        "2000:nbd:nbd://h:1/x"
            .parse::<RestoreTarget>()
            .unwrap()
            .kind,
        RestoreTargetKind::Nbd {
            url: "nbd://h:1/x".into(),
            blank: false
        }
    );
}

#[test]
fn malformed_restore_values_name_the_form() {
    for (bad, says) in [
        ("2000:/x/disk.img", "KIND file, device, nbd or blank-nbd"),
        (
            "2000:ftp:/x/disk.img",
            "not one of file, device, nbd, blank-nbd",
        ),
        ("2000:file", "DEVICE_KEY:KIND:WHERE"),
        ("2000:file:", "empty"),
        ("x:file:/a", "device key"),
    ] {
        let e = bad.parse::<RestoreTarget>().unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let e = "2000:abc".parse::<DiskSha256>().unwrap_err().to_string();
    assert!(e.contains("64 hexadecimal digits"), "{e}");
}

#[test]
fn files_get_line_round_trips_with_patterns_that_look_like_flags() {
    let args = FilesGetArgs {
        restore_point: Some("/repository/ns/vm/rp-a1".into()),
        image: None,
        disks: vec![2000],
        volumes: vec!["2000:1".into()],
        to: None,
        tar: Some("/target/restore.tar".into()),
        request_timeout: DEFAULT_REQUEST_TIMEOUT_SECONDS,
        result_file: Some("/dev/termination-log".into()),
        patterns: vec!["/etc/**".into(), "--weird-name".into()],
    };
    let words = args.to_args();
    assert_eq!(&words[..2], ["files", "get"]);
    assert_eq!(&words[words.len() - 3..], ["--", "/etc/**", "--weird-name"]);
    match parse(words) {
        Line::Files {
            files: Files::Get(back),
        } => assert_eq!(back, args),
        other => panic!("{other:?}"),
    }
}

#[test]
fn restore_vm_line_round_trips_new_and_in_place() {
    let mut args = RestoreVmArgs::new("https://vc.example.com/sdk", "DC0");
    args.sources = vec!["2000:/repository/a/2000.qcow2".parse().unwrap()];
    args.new_vm = Some("web-01 restored".into());
    args.target_datastore = Some("LocalDS_0".into());
    args.thumbprint = Some("AA:BB".into());
    args.datastores = vec!["LocalDS_0=/datastores/0".parse().unwrap()];
    args.cpus = 4;
    args.tag = Some("uid-1".into());
    let line = args.to_args();
    assert_eq!(line[0], "restore-vm");
    assert!(
        !line.contains(&"--memory-mib".to_owned()),
        "defaults left out: {line:?}"
    );
    match Line::try_parse_from(std::iter::once("sendense-agent".to_owned()).chain(line)) {
        Ok(Line::RestoreVm(parsed)) => assert_eq!(*parsed, args),
        other => panic!("{other:?}"),
    }

    let mut args = RestoreVmArgs::new("https://vc.example.com/sdk", "DC0");
    args.sources = vec!["2000:/repository/a/2000.qcow2".parse().unwrap()];
    args.vm_uuid = Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into());
    args.since_change_ids = vec!["2000:52 aa 10/7".parse().unwrap()];
    args.later_layers = vec!["2000:/repository/b/2000.qcow2".parse().unwrap()];
    args.transport = Transport::Vddk;
    args.vddk_modes = vec![VddkMode::Nbd];
    let line = args.to_args();
    match Line::try_parse_from(std::iter::once("sendense-agent".to_owned()).chain(line)) {
        Ok(Line::RestoreVm(parsed)) => assert_eq!(*parsed, args),
        other => panic!("{other:?}"),
    }

    // A new VM needs its datastore; new and in place exclude each other.
    for bad in [
        vec![
            "restore-vm",
            "--vcenter",
            "u",
            "--datacenter",
            "d",
            "--source",
            "2000:/a",
            "--new-vm",
            "x",
        ],
        vec![
            "restore-vm",
            "--vcenter",
            "u",
            "--datacenter",
            "d",
            "--source",
            "2000:/a",
            "--new-vm",
            "x",
            "--target-datastore",
            "ds",
            "--vm-uuid",
            "u",
        ],
        vec![
            "restore-vm",
            "--vcenter",
            "u",
            "--datacenter",
            "d",
            "--source",
            "2000:/a",
        ],
    ] {
        assert!(
            Line::try_parse_from(std::iter::once("sendense-agent").chain(bad.clone())).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn a_prepare_disk_that_is_not_the_json_expected_is_refused_naming_the_flag_and_its_form() {
    for bad in [
        r#"{"file":"/r/a.qcow2"}"#,
        r#"{"file":"/r/a.qcow2","size":1,"parent":"/r/b.qcow2"}"#,
        "/r/a.qcow2:1",
    ] {
        let argv = [AGENT_BINARY, "hub", "prepare", "--disk", bad];
        let e = Line::try_parse_from(argv).expect_err(bad).to_string();
        assert!(
            e.contains("--disk") && e.contains(r#""size": BYTES"#),
            "{e}"
        );
    }
}
