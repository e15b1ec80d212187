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
    // The test SourceNode: a thumbprint, the nfs transport with one datastore on a claim.
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
    )
    .expect("allowed");
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
            .and_then(|v| v.persistent_volume_claim.clone())
            .map(|c| (c.claim_name, c.read_only))
            .as_ref(),
        Some(&("ds0".to_owned(), Some(true)))
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
    )
    .expect("allowed");
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
    let pod = |src: &SourceNode| {
        agent_pod(&job(), src, Vec::new(), Vec::new(), &images).expect("allowed")
    };
    let vddk = SourceNode::test().with_spec(serde_json::json!({"transport": {"type": "vddk"}}));
    assert_eq!(restricted_violations(&pod(&vddk)), Vec::<String>::new());
    let claim = SourceNode::test()
        .with_spec(serde_json::json!({"transport": {"type": "nfs", "nfs":
        {"datastores": [{"name": "ds1", "persistentVolumeClaim": {"claimName": "ds1"}}]}}}));
    assert_eq!(restricted_violations(&pod(&claim)), Vec::<String>::new());
    // A hostPath datastore volume the administrator allows: `baseline` admits that, not
    // `restricted` (the README says so).
    let images = PodSettings {
        agent: "img".into(),
        source_policy: lab_policy(),
        ..Default::default()
    };
    let node_dir = SourceNode::test()
        .with_spec(serde_json::json!({"transport": {"type": "nfs", "nfs":
        {"datastores": [{"name": "ds1", "volume": "lab-ds"}]}}}));
    let pod = agent_pod(&job(), &node_dir, Vec::new(), Vec::new(), &images).expect("allowed");
    assert_eq!(
        restricted_violations(&pod),
        ["volume datastore-0 of a restricted type"]
    );
}

/// Settings allowing the hostPath volume `lab-ds` in namespace `backups` and the taint
/// `sendense.io/site:NoSchedule`.
fn lab_policy() -> crate::source_policy::SourcePolicy {
    crate::source_policy::SourcePolicy {
        volumes: crate::source_policy::parse_volumes(
            r#"[{"name": "lab-ds", "namespaces": ["backups"], "hostPath": {"path": "/srv/ds0"}}]"#,
        )
        .expect("volumes"),
        tolerations: crate::source_policy::parse_tolerations(
            r#"[{"key": "sendense.io/site", "effect": "NoSchedule"}]"#,
        )
        .expect("tolerations"),
    }
}

#[test]
fn the_agent_mounts_only_claims_and_allowed_volumes_and_tolerates_only_allowed_taints() {
    let open = PodSettings {
        agent: "img".into(),
        source_policy: lab_policy(),
        ..Default::default()
    };
    let with = |datastore: serde_json::Value, placement: serde_json::Value| {
        SourceNode::test().with_spec(serde_json::json!({
            "transport": {"type": "nfs", "nfs": {"datastores": [datastore]}},
            "placement": placement,
        }))
    };
    let pod = |src: &SourceNode, images: &PodSettings| {
        agent_pod(&job(), src, Vec::new(), Vec::new(), images)
    };
    let allowed = with(
        serde_json::json!({"name": "ds1", "volume": "lab-ds"}),
        serde_json::json!({"tolerations": [{"key": "sendense.io/site", "operator": "Exists", "effect": "NoSchedule"}]}),
    );
    let spec = pod(&allowed, &open).expect("allowed").spec.expect("spec");
    let volume = spec
        .volumes
        .expect("volumes")
        .into_iter()
        .find(|v| v.name == "datastore-0")
        .expect("datastore volume");
    assert_eq!(
        volume.host_path.map(|h| h.path).as_deref(),
        Some("/srv/ds0")
    );
    assert_eq!(spec.tolerations.map(|t| t.len()), Some(1));

    // The same SourceNode where nothing is allowed.
    let closed = PodSettings {
        agent: "img".into(),
        ..Default::default()
    };
    let err = pod(&allowed, &closed).expect_err("not allowed");
    assert!(
        err.0.contains(
            "volume \"lab-ds\" is not a datastore volume the operator allows in namespace backups"
        ),
        "{err}"
    );

    // A raw hostPath or nfs volume in the object (an older CRD admitted it).
    for raw in [
        serde_json::json!({"name": "ds1", "hostPath": {"path": "/"}}),
        serde_json::json!({"name": "ds1", "nfs": {"server": "10.0.0.1", "path": "/"}}),
    ] {
        let err = pod(&with(raw, serde_json::json!({})), &open).expect_err("refused");
        assert!(
            err.0
                .starts_with("spec.transport.nfs.datastores[0] (ds1): a "),
            "{err}"
        );
        assert!(
            err.0.contains("is refused") && err.0.contains("persistentVolumeClaim"),
            "{err}"
        );
    }

    // Tolerations: another key, every effect of an allowed key, no key at all.
    for (t, says) in [
        (
            serde_json::json!({"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}),
            "the taint node-role.kubernetes.io/control-plane:NoSchedule",
        ),
        (
            serde_json::json!({"key": "sendense.io/site", "operator": "Exists"}),
            "the taint sendense.io/site with every effect",
        ),
        (
            serde_json::json!({"operator": "Exists"}),
            "a toleration without a key",
        ),
    ] {
        let src = with(
            serde_json::json!({"name": "ds1", "persistentVolumeClaim": {"claimName": "ds1"}}),
            serde_json::json!({"tolerations": [t]}),
        );
        let err = pod(&src, &open).expect_err("toleration refused");
        assert!(
            err.0
                .starts_with(&format!("spec.placement.tolerations[0]: {says}")),
            "{err}"
        );
        assert!(err.0.contains("agentPlacement.allowedTolerations"), "{err}");
    }
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
            .expect("allowed")
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
    let pod = agent_pod(&job(), &squashed, Vec::new(), Vec::new(), &images).expect("allowed");
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());

    // Only groups: the image's user stays (no runAsUser).
    let p = psc(&claim_as(serde_json::json!({"supplementalGroups": [50]})));
    assert_eq!((p.run_as_user, p.run_as_group), (None, None));
    assert_eq!(p.supplemental_groups, Some(vec![50]));

    // Root (no_root_squash): runAsNonRoot lifted, and `restricted` refuses the pod.
    let root = claim_as(serde_json::json!({"user": 0}));
    assert_eq!(psc(&root).run_as_non_root, Some(false));
    let pod = agent_pod(&job(), &root, Vec::new(), Vec::new(), &images).expect("allowed");
    assert_eq!(
        restricted_violations(&pod),
        ["agent: runAsNonRoot != true", "agent: runAsUser 0"]
    );
}
