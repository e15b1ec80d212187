//! Every command line round-trips: `to_args()` parsed by clap gives back the same struct.
//! (The agent's own parser is checked against these in the agent's tests.)

use clap::Parser;

use super::*;

#[derive(Parser, Debug)]
#[command(name = "sendense-agent")]
enum Line {
    Backup(Box<BackupArgs>),
    NbdPing(NbdPingArgs),
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
enum Hub {
    Prepare(HubPrepareArgs),
    Remove(HubRemoveArgs),
}

#[derive(clap::Subcommand, Debug)]
enum Repo {
    Probe(RepoProbeArgs),
}

fn parse(args: Vec<String>) -> Line {
    let argv = std::iter::once(AGENT_BINARY.to_owned()).chain(args.iter().cloned());
    Line::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn everything_set() -> BackupArgs {
    BackupArgs {
        vm: None,
        vm_uuid: Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a".into()),
        targets: vec![
            "2000:nbd://10.0.0.7:10100/".parse().unwrap(),
            "2001:nbd+unix:///x?socket=/run/a.sock".parse().unwrap(),
        ],
        base_change_ids: vec!["2000:52 3c 1d/7".parse().unwrap()],
        transport: Transport::Vddk,
        datastores: vec!["datastore1=/datastores/0".parse().unwrap()],
        vddk_libdir: "/opt/vddk".into(),
        vddk_modes: vec![VddkMode::Hotadd, VddkMode::Nbdssl],
        thumbprint: None,
        ca_file: Some("/etc/sendense/vcenter-ca/ca.crt".into()),
        insecure_skip_verify: false,
        credentials_dir: Some("/etc/sendense/credentials".into()),
        snapshot_prefix: "sd-".into(),
        quiesce: true,
        request_size: 1 << 20,
        in_flight: 8,
        connections: 2,
        request_timeout: 30,
        deadline_seconds: Some(3600),
        checksum: true,
        result_file: Some("/dev/termination-log".into()),
        status_addr: Some("$(POD_IP):9090".into()),
        ..BackupArgs::new("https://vc.example.com/sdk", "DC0", "nightly-1")
    }
}

#[test]
fn backup_arguments_round_trip() {
    let mut minimal = BackupArgs::new("https://vc/sdk", "DC0", "job-1");
    minimal.vm = Some("db 01".into());
    minimal.targets = vec!["2000:nbd://h:1/".parse().unwrap()];
    minimal.thumbprint = Some("AA:BB".into());
    for args in [minimal, everything_set()] {
        match parse(args.to_args()) {
            Line::Backup(parsed) => assert_eq!(*parsed, args),
            other => panic!("{other:?}"),
        }
    }
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
        file: "/repository/ns/vm/2000/b.qcow2".into(),
        size: 8 << 30,
        backing: Some("/repository/ns/vm/2000/a.qcow2".into()),
    };
    assert!(matches!(parse(prepare.to_args()), Line::Hub { hub: Hub::Prepare(p) } if p == prepare));
    let remove = HubRemoveArgs {
        files: vec!["/repository/a".into(), "/repository/b c".into()],
    };
    assert!(matches!(parse(remove.to_args()), Line::Hub { hub: Hub::Remove(r) } if r == remove));
    let probe = RepoProbeArgs {
        dir: "/repository".into(),
        result_file: Some("/dev/termination-log".into()),
    };
    assert!(matches!(parse(probe.to_args()), Line::Repo { repo: Repo::Probe(p) } if p == probe));
    for timeout in [4, DEFAULT_NBD_PING_TIMEOUT_SECONDS] {
        let ping = NbdPingArgs {
            url: "nbd://127.0.0.1:10100/".into(),
            timeout,
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
