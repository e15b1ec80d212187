//! Every `sendense-agent` command line the operator puts into a pod is accepted by the agent's
//! own parser, and means what the operator built: the operator's builders and the agent's
//! `Cli` share the contract's argument structs, and this checks the whole path, pod spec to
//! parsed struct.

use clap::Parser;
use k8s_openapi::api::core::v1::{Container, Pod};
use sendense_agent::cli::{Cli, Command, HubCommand, RepoCommand};
use sendense_contract::cli::{
    AGENT_BINARY, BackupArgs, BaseChangeId, DiskTarget, PrepareDisk, Transport,
};
use sendense_crds::SourceNode;
use serde_json::json;

use super::*;
use crate::fixtures::{Fixture, TestObject};

fn images() -> PodSettings {
    PodSettings {
        agent: "img".into(),
        ..Default::default()
    }
}

/// The full argv of a container (command then args), and of its exec startup probe.
fn command_lines(pod: &Pod) -> Vec<Vec<String>> {
    let spec = pod.spec.as_ref().expect("spec");
    let containers: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let mut lines = Vec::new();
    for c in containers {
        let mut argv = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        lines.push(argv);
        if let Some(exec) = c.startup_probe.as_ref().and_then(|p| p.exec.as_ref()) {
            lines.push(exec.command.clone().unwrap_or_default());
        }
    }
    lines
        .into_iter()
        .filter(|argv| argv.first().map(String::as_str) == Some(AGENT_BINARY))
        .collect()
}

fn parse(argv: &[String]) -> Command {
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(e) => panic!("the agent refuses {argv:?}: {e}"),
    }
}

fn backup_args(pod: &Pod) -> BackupArgs {
    let lines = command_lines(pod);
    assert_eq!(lines.len(), 1, "{lines:?}");
    match parse(&lines[0]) {
        Command::Backup(args) => *args,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_agent_pods_command_line_parses_into_what_the_operator_built() {
    let job = BackupJob::test().with_spec(json!({
        "vm": {"name": "web 01"}, "quiesce": true, "activeDeadlineSeconds": 3600
    }));
    let targets = vec![
        DiskTarget {
            key: 2000,
            url: "nbd://10.0.0.5:10100/".into(),
        },
        DiskTarget {
            key: 2001,
            url: "nbd://10.0.0.5:10101/".into(),
        },
    ];
    let bases = vec![BaseChangeId {
        key: 2001,
        change_id: "52 aa 10/7".into(),
    }];
    let nfs = SourceNode::test();
    let args = backup_args(
        &agent_pod(&job, &nfs, targets.clone(), bases.clone(), &images()).expect("allowed"),
    );
    assert_eq!(args.vcenter, "https://vc.example.com/sdk");
    assert_eq!(args.datacenter, "DC1");
    assert_eq!(args.job, "web-01-b2");
    assert_eq!(args.vm.as_deref(), Some("web 01"));
    assert_eq!(
        (args.targets, args.base_change_ids),
        (targets.clone(), bases)
    );
    assert_eq!(args.transport, Transport::Nfs);
    assert_eq!(args.datastores.len(), 1);
    assert_eq!(args.datastores[0].name, "LocalDS 0");
    assert_eq!(args.thumbprint.as_deref(), Some("AA:BB"));
    assert!(args.quiesce);
    assert_eq!(args.deadline_seconds, Some(3600));
    assert_eq!(
        args.result_file.as_deref(),
        Some(std::path::Path::new(TERMINATION_LOG))
    );
    assert!(args.status_addr.is_some_and(|a| a.ends_with(":9090")));

    let vddk = nfs.edit(|v| {
        v["spec"]["transport"] = json!({"type": "vddk", "vddk": {"modes": ["hotadd", "nbdssl"]}})
    });
    let args = backup_args(&agent_pod(&job, &vddk, targets, vec![], &images()).expect("allowed"));
    assert_eq!(args.transport, Transport::Vddk);
    assert_eq!(args.vddk_modes.len(), 2);
    assert!(args.datastores.is_empty() && args.base_change_ids.is_empty());
}

#[test]
fn hub_probe_and_cleanup_command_lines_parse_into_what_the_operator_built() {
    let job = BackupJob::test();
    let disks = [
        HubDisk {
            key: 2000,
            port: 10100,
            file: "backups/web-01/2000/b2.qcow2".into(),
            size: 8 << 30,
            backing: Some("backups/web-01/2000/b1.qcow2".into()),
        },
        HubDisk {
            key: 2001,
            port: 10101,
            file: "backups/web-01/2001/b2.qcow2".into(),
            size: 1 << 30,
            backing: None,
        },
    ];
    let hub = hub_pod(
        &job,
        "backups-data",
        &disks,
        &crate::resources::HubTls::of(&job, 1),
        &images(),
    );
    let lines = command_lines(&hub);
    // One container creating and serving every disk, its startup probe pinging every export.
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (mut prepared, mut pinged, mut served) = (Vec::new(), Vec::new(), Vec::new());
    for argv in &lines {
        match parse(argv) {
            Command::Hub {
                command: HubCommand::Serve(s),
            } => {
                prepared.extend(s.disks.iter().map(|d| PrepareDisk {
                    file: d.file.clone(),
                    size: d.size,
                    backing: d.backing.clone(),
                }));
                served.extend(s.disks.into_iter().map(|d| (d.key, d.port, d.file)))
            }
            Command::NbdPing(p) => {
                assert_eq!(
                    p.tls_dir.as_deref(),
                    Some(std::path::Path::new("/etc/sendense/nbd-tls"))
                );
                pinged.extend(p.urls)
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(prepared.len(), 2);
    assert_eq!(
        prepared[0].file,
        std::path::Path::new(REPOSITORY_MOUNT).join(&disks[0].file)
    );
    assert_eq!(prepared[0].size, 8 << 30);
    assert_eq!(
        prepared[0].backing.as_deref(),
        Some(std::path::Path::new(REPOSITORY_MOUNT).join("backups/web-01/2000/b1.qcow2"))
            .as_deref()
    );
    assert_eq!(prepared[1].backing, None);
    assert_eq!(
        served,
        disks
            .iter()
            .map(|d| (
                d.key,
                d.port as u16,
                std::path::Path::new(REPOSITORY_MOUNT).join(&d.file)
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        pinged,
        [
            "nbds://127.0.0.1:10100/?tls-hostname=web-01-b2-hub.backups.svc",
            "nbds://127.0.0.1:10101/?tls-hostname=web-01-b2-hub.backups.svc"
        ]
    );

    let files = vec![
        "backups/web-01/b2-u-a1".to_owned(),
        "backups/web-01/b2-u-a2".to_owned(),
    ];
    let cleanup = cleanup_pod(&job, "backups-data", &files, &images());
    match parse(&command_lines(&cleanup)[0]) {
        Command::Hub {
            command: HubCommand::Remove(r),
        } => assert_eq!(
            r.dirs,
            files
                .iter()
                .map(|f| std::path::Path::new(REPOSITORY_MOUNT).join(f))
                .collect::<Vec<_>>()
        ),
        other => panic!("{other:?}"),
    }

    let mut repo = Repository::test();
    repo.status = Some(sendense_crds::RepositoryStatus {
        orphaned_attempts: vec!["ns/vm/gone-u-a1".into(), "ns/vm/b c-u-a2".into()],
        ..Default::default()
    });
    let probe = probe_pod(&repo, &images(), 600);
    match parse(&command_lines(&probe)[0]) {
        Command::Repo {
            command: RepoCommand::Probe(p),
        } => {
            assert_eq!(
                p.result_file.as_deref(),
                Some(std::path::Path::new(TERMINATION_LOG))
            );
            assert_eq!(p.remove_orphans, ["ns/vm/gone-u-a1", "ns/vm/b c-u-a2"]);
            assert_eq!(p.orphan_min_idle_seconds, 600);
        }
        other => panic!("{other:?}"),
    }
}

/// The `RUST_LOG` value of every sendense-agent container of `pod` (qemu-nbd's excluded).
fn log_filters(pod: &Pod) -> Vec<Option<String>> {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| {
            c.command
                .as_ref()
                .and_then(|c| c.first())
                .map(String::as_str)
                == Some(AGENT_BINARY)
        })
        .map(|c| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == "RUST_LOG")
                .and_then(|e| e.value.clone())
        })
        .collect()
}

#[test]
fn every_sendense_agent_container_logs_at_the_pod_log_level_when_one_is_set() {
    let job = BackupJob::test();
    let disk = HubDisk {
        key: 2000,
        port: 10100,
        file: "backups/web-01/2000/b2.qcow2".into(),
        size: 1 << 30,
        backing: None,
    };
    let tls = crate::resources::HubTls::of(&job, 1);
    let pods = |images: &PodSettings| {
        vec![
            agent_pod(&job, &SourceNode::test(), vec![], vec![], images).expect("allowed"),
            hub_pod(&job, "data", std::slice::from_ref(&disk), &tls, images),
            cleanup_pod(&job, "data", &["backups/web-01/b2-u-a1".to_owned()], images),
            probe_pod(&Repository::test(), images, 600),
        ]
    };
    let traced = PodSettings {
        log_filter: Some("trace".into()),
        ..images()
    };
    for pod in pods(&traced) {
        let filters = log_filters(&pod);
        assert!(!filters.is_empty(), "{:?}", pod.metadata.name);
        assert!(
            filters.iter().all(|f| f.as_deref() == Some("trace")),
            "{:?}: {filters:?}",
            pod.metadata.name
        );
    }
    for pod in pods(&images()) {
        assert!(
            log_filters(&pod).iter().all(Option::is_none),
            "{:?}",
            pod.metadata.name
        );
    }
}

fn restore_vm_args(pod: &Pod) -> sendense_contract::cli::RestoreVmArgs {
    let lines = command_lines(pod);
    assert_eq!(lines.len(), 1, "{lines:?}");
    match parse(&lines[0]) {
        Command::RestoreVm(args) => *args,
        other => panic!("{other:?}"),
    }
}

fn disks<'a>(point: &'a sendense_crds::RestorePoint, later: &'a [(i32, String)]) -> PointDisks<'a> {
    PointDisks {
        point,
        disks: &[2000],
        later,
    }
}

#[test]
fn the_vsphere_restore_pods_command_lines_parse_into_what_the_operator_built() {
    use sendense_crds::{RestoreJob, RestorePoint};
    let point = RestorePoint::test();
    let nfs = SourceNode::test();
    let new_vm = RestoreJob::test().with_spec(json!({
        "restorePointRef": {"name": "web-01-b1-0000000b"},
        "target": {"vsphere": {"newVm": {"name": "web 01 restored", "datastore": "LocalDS 0", "folder": "restored/nov", "resourcePool": "DC0_C0", "cpus": 4, "memoryMib": 8192, "firmware": "efi"}}}
    }));
    let pod = vsphere_pod(
        &new_vm,
        1,
        "backups-data",
        &disks(&point, &[]),
        &nfs,
        &images(),
    )
    .expect("allowed");
    let args = restore_vm_args(&pod);
    assert_eq!(args.new_vm.as_deref(), Some("web 01 restored"));
    assert_eq!(args.folder.as_deref(), Some("restored/nov"));
    assert_eq!(args.resource_pool.as_deref(), Some("DC0_C0"));
    assert_eq!(args.target_datastore.as_deref(), Some("LocalDS 0"));
    assert_eq!((args.cpus, args.memory_mib), (4, 8192));
    // Unset in the spec: the source VM's hardware as the restore point recorded it.
    let recorded = point.clone().edit(|v| {
        v["spec"]["vm"]["hardware"] =
            json!({"cpus": 8, "memoryMib": 16384, "guestId": "ubuntu64Guest", "firmware": "efi"})
    });
    let bare = RestoreJob::test().with_spec(json!({
        "restorePointRef": {"name": "web-01-b1-0000000b"},
        "target": {"vsphere": {"newVm": {"name": "x", "datastore": "LocalDS 0", "cpus": 2}}}
    }));
    let a = restore_vm_args(
        &vsphere_pod(
            &bare,
            1,
            "backups-data",
            &disks(&recorded, &[]),
            &nfs,
            &images(),
        )
        .expect("allowed"),
    );
    assert_eq!(
        (
            a.cpus,
            a.memory_mib,
            a.guest_id.as_str(),
            a.firmware.as_deref()
        ),
        (2, 16384, "ubuntu64Guest", Some("efi"))
    );
    assert_eq!(args.firmware.as_deref(), Some("efi"));
    assert_eq!(args.tag.as_deref(), Some("r-1"));
    assert_eq!(args.sources.len(), 1);
    assert!(args.sources[0].path.ends_with("2000.qcow2"));
    assert!(args.since_change_ids.is_empty() && args.vm_uuid.is_none());
    assert_eq!(args.datastores.len(), 1);
    // The datastore is mounted writable for the restore (read-only for backups).
    let spec = pod.spec.as_ref().expect("spec");
    let mount = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == args.datastores[0].dir.display().to_string())
        .expect("datastore mounted");
    assert_eq!(mount.read_only, Some(false));

    let in_place = RestoreJob::test().with_spec(json!({
        "restorePointRef": {"name": "web-01-b1-0000000b"},
        "target": {"vsphere": {"inPlace": {}}}
    }));
    let later = vec![(2000, "backups/web-01/later/2000.qcow2".to_owned())];
    let args = restore_vm_args(
        &vsphere_pod(
            &in_place,
            2,
            "backups-data",
            &disks(&point, &later),
            &nfs,
            &images(),
        )
        .expect("allowed"),
    );
    assert_eq!(
        args.vm_uuid.as_deref(),
        Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a")
    );
    assert_eq!(args.since_change_ids.len(), 1);
    assert_eq!(args.since_change_ids[0].change_id, "52 aa/1");
    assert_eq!(args.later_layers.len(), 1);
    assert!(args.new_vm.is_none());

    let whole = in_place
        .edit(|v| v["spec"]["target"]["vsphere"]["inPlace"] = json!({"differential": false}));
    let args = restore_vm_args(
        &vsphere_pod(
            &whole,
            1,
            "backups-data",
            &disks(&point, &later),
            &nfs,
            &images(),
        )
        .expect("allowed"),
    );
    assert!(args.since_change_ids.is_empty() && args.later_layers.is_empty());
}
