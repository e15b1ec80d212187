use super::*;
use crate::fixtures::{Fixture, TestObject};

fn job() -> BackupJob {
    BackupJob::test().named("web-01-nightly")
}

fn disks() -> Vec<HubDisk> {
    vec![
        HubDisk {
            key: 2000,
            port: 10100,
            file: "backups/web-01/2000/web-01-nightly.qcow2".into(),
            size: 1 << 30,
            backing: Some("backups/web-01/2000/web-01-full.qcow2".into()),
        },
        HubDisk {
            key: 2001,
            port: 10101,
            file: "backups/web-01/2001/web-01-nightly.qcow2".into(),
            size: 1 << 29,
            backing: None,
        },
    ]
}

#[test]
fn the_hub_creates_then_serves_each_disk_on_its_port_and_commits_on_request() {
    let pod = hub_pod(
        &job(),
        "backups-data",
        &disks(),
        &HubTls::of(&job(), 3),
        &PodSettings {
            agent: "sendense/agent:0.1".into(),
            ..Default::default()
        },
    );
    assert_eq!(pod.metadata.name.as_deref(), Some("web-01-nightly-hub"));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("backups"));
    let owner = &pod.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("BackupJob", "web-01-nightly", Some(true))
    );
    let spec = pod.spec.expect("spec");
    // It resolves no name: the node's resolver, not the cluster's DNS.
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    // No init container: the one container creates the files, then serves them.
    assert!(spec.init_containers.is_none());
    assert_eq!(spec.containers.len(), 1, "one container serves every disk");
    let serve = &spec.containers[0];
    let cmd = serve.command.as_deref().expect("command");
    let parsed = match <sendense_agent::cli::Cli as clap::Parser>::try_parse_from(cmd) {
        Ok(sendense_agent::cli::Cli {
            command:
                sendense_agent::cli::Command::Hub {
                    command: sendense_agent::cli::HubCommand::Serve(a),
                },
            ..
        }) => a,
        other => panic!("{other:?}"),
    };
    let served: Vec<serde_json::Value> = parsed
        .disks
        .iter()
        .map(|d| serde_json::to_value(d).expect("json"))
        .collect();
    assert_eq!(
        served,
        [
            serde_json::json!({
                "key": 2000, "port": 10100,
                "file": "/repository/backups/web-01/2000/web-01-nightly.qcow2",
                "size": 1073741824,
                "backing": "/repository/backups/web-01/2000/web-01-full.qcow2"
            }),
            // A full has no parent.
            serde_json::json!({
                "key": 2001, "port": 10101,
                "file": "/repository/backups/web-01/2001/web-01-nightly.qcow2",
                "size": 536870912
            })
        ]
    );
    assert!(
        parsed.shared > 1,
        "--shared must exceed 1 or the agent's second connection hangs"
    );
    let ports: Vec<i32> = serve
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [10100, 10101]);
    // TLS only, on the pod IP, for the attempt's agent alone.
    let uid = job().metadata.uid.clone().expect("uid");
    assert_eq!(parsed.bind, "$(POD_IP)");
    assert_eq!(
        parsed.tls_dir,
        std::path::Path::new("/etc/sendense/nbd-tls")
    );
    assert_eq!(parsed.client_identity, format!("CN=sendense-agent.{uid}.3"));
    // The commit: the repository's root, the request from the pod's annotation, the result as
    // the termination message.
    assert_eq!(parsed.root, std::path::Path::new("/repository"));
    assert_eq!(
        parsed.result_file.as_deref(),
        Some(std::path::Path::new("/dev/termination-log"))
    );
    let request = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.downward_api.clone())
        .and_then(|d| d.items)
        .expect("the commit request volume");
    assert_eq!(
        request[0].field_ref.as_ref().map(|f| f.field_path.as_str()),
        Some("metadata.annotations['sendense.io/commit']")
    );
    let mount = serve
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "commit")
        .expect("the request mounted");
    assert_eq!(
        parsed.commit_request,
        std::path::Path::new(&mount.mount_path).join(&request[0].path)
    );
    let tls_volume = spec
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .find(|v| v.name == "nbd-tls")
        .and_then(|v| v.secret.clone())
        .expect("the attempt's Secret mounted");
    assert_eq!(
        tls_volume.secret_name.as_deref(),
        Some("web-01-nightly-nbd-tls")
    );
    let probe = serve
        .startup_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("exec probe");
    // Every export answers a handshake before the hub counts as started.
    assert_eq!(
        probe[..4],
        [
            "sendense-agent",
            "nbd-ping",
            "nbds://127.0.0.1:10100/?tls-hostname=web-01-nightly-hub.backups.svc",
            "nbds://127.0.0.1:10101/?tls-hostname=web-01-nightly-hub.backups.svc"
        ]
    );
    assert!(probe.ends_with(&[
        "--tls-dir".into(),
        "/etc/sendense/nbd-tls".into(),
        "--host-env".into(),
        "POD_IP".into()
    ]));
    let claim = spec.volumes.expect("volumes")[0]
        .persistent_volume_claim
        .clone()
        .expect("pvc");
    assert_eq!(claim.claim_name, "backups-data");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
}

#[test]
fn every_container_is_hardened_and_runs_without_an_api_token() {
    let pod = hub_pod(
        &job(),
        "data",
        &disks(),
        &HubTls::of(&job(), 1),
        &PodSettings {
            agent: "a".into(),
            hub_service_account: Some("sendense-hub".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        crate::resources::hardening::restricted_violations(&pod),
        Vec::<String>::new()
    );
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.service_account_name.as_deref(), Some("sendense-hub"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.security_context
            .and_then(|s| s.seccomp_profile)
            .map(|p| p.type_)
            .as_deref(),
        Some("RuntimeDefault")
    );
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let sc = c.security_context.clone().expect("security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
    }
}
