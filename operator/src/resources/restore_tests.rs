use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use sendense_agent::cli::{Cli, Command};
use sendense_agent::cmd::files::FilesCommand;
use sendense_contract::cli::{FilesGetArgs, RestoreArgs, RestoreTargetKind};
use sendense_crds::RestoreJob;
use serde_json::json;

use super::*;
use crate::fixtures::{Fixture, TestObject};
use crate::resources::hardening::restricted_violations;

fn images() -> PodSettings {
    PodSettings {
        agent: "img".into(),
        hub_service_account: Some("sendense-hub".into()),
        ..Default::default()
    }
}

fn argv(pod: &Pod) -> Vec<String> {
    let c = &pod.spec.as_ref().expect("spec").containers[0];
    let mut a = c.command.clone().unwrap_or_default();
    a.extend(c.args.clone().unwrap_or_default());
    a
}

fn parse(pod: &Pod) -> Command {
    let a = argv(pod);
    match Cli::try_parse_from(&a) {
        Ok(cli) => cli.command,
        Err(e) => panic!("the agent refuses {a:?}: {e}"),
    }
}

fn disks() -> Vec<DiskToRestore> {
    vec![
        DiskToRestore {
            key: 2000,
            file: "backups/web-01/b2-u-a1/2000.qcow2".into(),
            sha256: "AB".repeat(32),
            claim: "web-01-r1-disk-2000".into(),
            mode: VolumeMode::Filesystem,
        },
        DiskToRestore {
            key: 2001,
            file: "/backups/web-01/b2-u-a1/2001.qcow2".into(),
            sha256: "cd".repeat(32),
            claim: "data".into(),
            mode: VolumeMode::Block,
        },
    ]
}

#[test]
fn the_restore_pods_command_line_parses_into_what_the_operator_built() {
    let job = RestoreJob::test();
    let pod = restore_pod(&job, 2, "backups", &disks(), &images());
    let args: RestoreArgs = match parse(&pod) {
        Command::Restore(a) => a,
        other => panic!("{other:?}"),
    };
    let sources: Vec<String> = args.sources.iter().map(ToString::to_string).collect();
    assert_eq!(
        sources,
        [
            "2000:/repository/backups/web-01/b2-u-a1/2000.qcow2",
            "2001:/repository/backups/web-01/b2-u-a1/2001.qcow2"
        ]
    );
    assert_eq!(
        args.targets[0].kind,
        RestoreTargetKind::File("/targets/2000/disk.img".into())
    );
    assert_eq!(
        args.targets[1].kind,
        RestoreTargetKind::Device("/dev/sendense/2001".into())
    );
    let expect: Vec<String> = args
        .expect_sha256
        .iter()
        .map(|e| e.sha256.clone())
        .collect();
    assert_eq!(expect, ["ab".repeat(32), "cd".repeat(32)]);
    assert_eq!(args.result_file.as_deref(), Some(TERMINATION_LOG.as_ref()));
    assert!(args.status_addr.is_some_and(|a| a.ends_with(":9090")));

    let spec = pod.spec.as_ref().expect("spec");
    let c = &spec.containers[0];
    let repo = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == REPOSITORY_MOUNT)
        .expect("repository mounted");
    assert_eq!(repo.read_only, Some(true));
    let repo_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == repo.name)
        .and_then(|v| v.persistent_volume_claim.clone())
        .expect("repository claim");
    assert_eq!(
        (repo_volume.claim_name.as_str(), repo_volume.read_only),
        ("backups", Some(true))
    );
    let devices = c.volume_devices.clone().unwrap_or_default();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_path, "/dev/sendense/2001");
    // A block device is the container's by its user and group, not by fsGroup.
    let sc = c.security_context.clone().expect("security context");
    assert_eq!(
        (sc.run_as_user, sc.run_as_group),
        (Some(65532), Some(65532))
    );
    let fs_only = restore_pod(&job, 1, "backups", &disks()[..1], &images());
    let sc = fs_only.spec.expect("spec").containers[0]
        .security_context
        .clone()
        .expect("security context");
    assert_eq!(
        sc.run_as_user, None,
        "the image's user where no device is written"
    );
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());
    assert_eq!(
        pod.labels().get(ATTEMPT_LABEL).map(String::as_str),
        Some("2")
    );
    assert_eq!(pod.name_any(), "web-01-r1-restore");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(
        pod.metadata.owner_references.is_some(),
        "the pod goes with its job"
    );
}

#[test]
fn the_files_pods_command_line_parses_into_what_the_operator_built() {
    let job = RestoreJob::test().with_spec(json!({
        "disks": [2000],
        "target": {"files": {"paths": ["/etc/hosts", "/home/**"], "claimName": "restored", "volume": "2000:1", "format": "Tar", "directory": "ticket-42/"}}
    }));
    let target = job.spec.target.files.clone().expect("files");
    let pod = files_pod(
        &job,
        1,
        "backups",
        "backups/web-01/b2-u-a1",
        &target,
        &images(),
    );
    let args: FilesGetArgs = match parse(&pod) {
        Command::Files {
            command: FilesCommand::Get(a),
        } => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        args.restore_point.as_deref(),
        Some("/repository/backups/web-01/b2-u-a1".as_ref())
    );
    assert_eq!(args.tar.as_deref(), Some("/target/ticket-42.tar".as_ref()));
    assert_eq!(args.to, None);
    assert_eq!(
        (args.disks, args.volumes),
        (vec![2000], vec!["2000:1".into()])
    );
    assert_eq!(args.patterns, ["/etc/hosts", "/home/**"]);
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());

    // A pattern that looks like a flag stays a pattern.
    let job = RestoreJob::test().with_spec(json!({
        "target": {"files": {"paths": ["/--tar"], "claimName": "restored"}}
    }));
    let target = job.spec.target.files.clone().expect("files");
    let args: FilesGetArgs = match parse(&files_pod(&job, 1, "b", "d", &target, &images())) {
        Command::Files {
            command: FilesCommand::Get(a),
        } => a,
        other => panic!("{other:?}"),
    };
    assert_eq!(args.to.as_deref(), Some("/target/web-01-r1".as_ref()));
    assert_eq!(args.patterns, ["/--tar"]);
}

#[test]
fn created_claims_hold_their_disk_and_are_not_owned_by_the_job() {
    let gib = 1i64 << 30;
    assert!(filesystem_claim_bytes(gib) >= gib + gib / 20 + (64 << 20));
    assert_eq!(filesystem_claim_bytes(gib) % (1 << 20), 0);
    assert_eq!(block_claim_bytes(gib), gib);
    assert_eq!(block_claim_bytes(gib + 1), gib + (1 << 20));
    let job = RestoreJob::test();
    let c = restore_claim(
        &job,
        2000,
        &NewClaim {
            name: default_claim_name(&job, 2000),
            bytes: 12345,
            mode: VolumeMode::Block,
            access: ClaimAccessMode::ReadWriteMany,
            storage_class: Some("fast".into()),
        },
    );
    assert_eq!(c.name_any(), "web-01-r1-disk-2000");
    assert!(c.metadata.owner_references.is_none());
    let spec = c.spec.expect("spec");
    assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".into()]));
    assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
    let req = spec.resources.and_then(|r| r.requests).expect("requests");
    assert_eq!(req["storage"].0, "12345");
    assert_eq!(
        c.metadata.labels.expect("labels")[RESTORE_JOB_LABEL],
        "web-01-r1"
    );
}

#[test]
fn the_kubevirt_vm_boots_from_the_first_disk_and_starts_halted() {
    let job = RestoreJob::test();
    let yaml = kubevirt_vm(
        &job,
        "web-01",
        "4Gi",
        2,
        &[(2001, "data".into()), (2000, "boot".into())],
    );
    let vm: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
    assert_eq!(vm["kind"], "VirtualMachine");
    assert_eq!(vm["metadata"]["namespace"], "backups");
    assert_eq!(vm["spec"]["runStrategy"], "Halted");
    let t = &vm["spec"]["template"]["spec"];
    assert_eq!(t["domain"]["memory"]["guest"], "4Gi");
    assert_eq!(t["domain"]["cpu"]["cores"], 2);
    assert_eq!(t["domain"]["devices"]["disks"][0]["name"], "disk-2000");
    assert_eq!(t["domain"]["devices"]["disks"][0]["bootOrder"], 1);
    assert!(
        t["domain"]["devices"]["disks"][1]
            .get("bootOrder")
            .is_none()
    );
    assert_eq!(
        t["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "boot"
    );
    assert_eq!(
        t["volumes"][1]["persistentVolumeClaim"]["claimName"],
        "data"
    );
}
