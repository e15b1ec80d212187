use super::*;
use crate::fixtures::{Fixture, TestObject, with_tls};

fn job() -> BackupJob {
    BackupJob::test()
        .named("db-01-full")
        .with_spec(serde_json::json!({
            "vm": {"instanceUuid": "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"},
            "mode": "full", "quiesce": true, "activeDeadlineSeconds": 3600
        }))
}

fn target(key: i32, url: &str) -> DiskTarget {
    DiskTarget {
        key,
        url: url.into(),
    }
}

fn args(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers[0].args.clone())
        .unwrap_or_default()
}

fn value_after(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[test]
fn nfs_agent_mounts_datastores_and_credentials_and_names_its_targets() {
    // The test SourceNode: a thumbprint, the nfs transport with one hostPath datastore.
    let src = SourceNode::test();
    let targets = vec![
        target(2000, "nbd://10.0.0.5:10100/"),
        target(2001, "nbd://10.0.0.5:10101/"),
    ];
    let bases = vec![BaseChangeId {
        key: 2000,
        change_id: "52 aa/3".into(),
    }];
    let pod = agent_pod(
        &job(),
        &src,
        targets,
        bases,
        &PodSettings {
            agent: "img".into(),
            ..Default::default()
        },
    );
    let a = args(&pod);
    assert_eq!(
        value_after(&a, "--targets").as_deref(),
        Some("2000:nbd://10.0.0.5:10100/,2001:nbd://10.0.0.5:10101/")
    );
    assert_eq!(
        value_after(&a, "--base-change-ids").as_deref(),
        Some("2000:52 aa/3")
    );
    assert_eq!(
        value_after(&a, "--vm-uuid").as_deref(),
        Some("5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a")
    );
    assert_eq!(value_after(&a, "--thumbprint").as_deref(), Some("AA:BB"));
    assert_eq!(
        value_after(&a, "--datastore").as_deref(),
        Some("LocalDS 0=/datastores/0")
    );
    assert_eq!(
        value_after(&a, "--deadline-seconds").as_deref(),
        Some("3600")
    );
    assert!(a.contains(&"--quiesce".to_string()));
    let spec = pod.spec.expect("spec");
    let vols = spec.volumes.expect("volumes");
    let creds = vols
        .iter()
        .find(|v| v.name == "credentials")
        .and_then(|v| v.secret.clone())
        .expect("secret volume");
    assert_eq!(creds.secret_name.as_deref(), Some("vc-creds"));
    let keys: Vec<(String, String)> = creds
        .items
        .expect("items")
        .into_iter()
        .map(|i| (i.key, i.path))
        .collect();
    assert_eq!(
        keys,
        [
            ("user".into(), "username".into()),
            ("pass".into(), "password".into())
        ]
    );
    assert_eq!(
        vols.iter()
            .find(|v| v.name == "datastore-0")
            .and_then(|v| v.host_path.clone())
            .map(|h| h.path)
            .as_deref(),
        Some("/srv/ds0")
    );
    let env = spec.containers[0].env.clone().unwrap_or_default();
    assert!(
        env.iter().all(|e| e.name == "POD_IP" && e.value.is_none()),
        "no credentials in the environment: {env:?}"
    );
    assert_eq!(
        spec.node_selector
            .expect("placement")
            .get("sendense.io/site")
            .map(String::as_str),
        Some("lab")
    );
    assert_eq!(
        spec.active_deadline_seconds,
        Some(3600 + AGENT_GRACE_SECONDS),
        "time to remove the snapshot after the deadline"
    );
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
}

#[test]
fn ca_bundle_and_vddk_transport() {
    let src = with_tls(
        SourceNode::test(),
        serde_json::json!({"caConfigMapRef": {"name": "vc-ca", "key": "bundle.pem"}}),
    )
    .with_spec(
        serde_json::json!({"transport": {"type": "vddk", "vddk": {"modes": ["hotadd", "nbdssl"]}}}),
    );
    let pod = agent_pod(
        &job(),
        &src,
        vec![target(2000, "nbd://h:1/")],
        Vec::new(),
        &PodSettings {
            agent: "img".into(),
            ..Default::default()
        },
    );
    let a = args(&pod);
    assert_eq!(
        value_after(&a, "--ca-file").as_deref(),
        Some("/etc/sendense/vcenter-ca/ca.crt")
    );
    assert_eq!(value_after(&a, "--transport").as_deref(), Some("vddk"));
    assert_eq!(
        value_after(&a, "--vddk-modes").as_deref(),
        Some("hotadd,nbdssl")
    );
    assert!(
        !a.contains(&"--base-change-ids".to_string()),
        "a full has no base"
    );
    let vols = pod.spec.expect("spec").volumes.expect("volumes");
    assert!(
        vols.iter()
            .any(|v| v.config_map.as_ref().is_some_and(|c| c.name == "vc-ca"))
    );
}

#[test]
fn the_agent_pod_meets_the_restricted_standard_unless_a_datastore_is_a_node_or_nfs_volume() {
    use crate::resources::hardening::restricted_violations;
    let images = PodSettings {
        agent: "img".into(),
        ..Default::default()
    };
    let pod = |src: &SourceNode| agent_pod(&job(), src, Vec::new(), Vec::new(), &images);
    let vddk = SourceNode::test().with_spec(serde_json::json!({"transport": {"type": "vddk"}}));
    assert_eq!(restricted_violations(&pod(&vddk)), Vec::<String>::new());
    let claim = SourceNode::test()
        .with_spec(serde_json::json!({"transport": {"type": "nfs", "nfs":
        {"datastores": [{"name": "ds1", "persistentVolumeClaim": {"claimName": "ds1"}}]}}}));
    assert_eq!(restricted_violations(&pod(&claim)), Vec::<String>::new());
    // The test SourceNode mounts its datastore as a hostPath: `baseline` admits that, not
    // `restricted` (the README says so).
    assert_eq!(
        restricted_violations(&pod(&SourceNode::test())),
        ["volume datastore-0 of a restricted type"]
    );
}

#[test]
fn the_agent_reads_datastores_as_the_user_and_groups_the_source_node_names() {
    use crate::resources::hardening::restricted_violations;
    let images = PodSettings {
        agent: "img".into(),
        ..Default::default()
    };
    let claim_as = |read_as: serde_json::Value| {
        SourceNode::test().with_spec(serde_json::json!({"transport": {"type": "nfs", "nfs":
        {"datastores": [{"name": "ds1", "persistentVolumeClaim": {"claimName": "ds1"}}],
         "readAs": read_as}}}))
    };
    let psc = |src: &SourceNode| {
        agent_pod(&job(), src, Vec::new(), Vec::new(), &images)
            .spec
            .and_then(|s| s.security_context)
            .expect("pod security context")
    };

    // An export squashing every client to 4242: the agent is 4242, still non-root, and the
    // pod stays within `restricted`.
    let squashed =
        claim_as(serde_json::json!({"user": 4242, "group": 4243, "supplementalGroups": [50, 51]}));
    let p = psc(&squashed);
    assert_eq!(p.run_as_user, Some(4242));
    assert_eq!(p.run_as_group, Some(4243));
    assert_eq!(p.supplemental_groups, Some(vec![50, 51]));
    assert_eq!(p.run_as_non_root, Some(true));
    assert_eq!(p.fs_group, Some(crate::resources::hardening::FS_GROUP));
    let pod = agent_pod(&job(), &squashed, Vec::new(), Vec::new(), &images);
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());

    // Only groups: the image's user stays (no runAsUser).
    let p = psc(&claim_as(serde_json::json!({"supplementalGroups": [50]})));
    assert_eq!((p.run_as_user, p.run_as_group), (None, None));
    assert_eq!(p.supplemental_groups, Some(vec![50]));

    // Root (no_root_squash): runAsNonRoot lifted, and `restricted` refuses the pod.
    let root = claim_as(serde_json::json!({"user": 0}));
    assert_eq!(psc(&root).run_as_non_root, Some(false));
    let pod = agent_pod(&job(), &root, Vec::new(), Vec::new(), &images);
    assert_eq!(
        restricted_violations(&pod),
        ["agent: runAsNonRoot != true", "agent: runAsUser 0"]
    );
}
