use super::*;

#[test]
fn settings_parse_and_bad_ones_name_the_entry() {
    assert_eq!(parse_volumes("").expect("empty"), Vec::new());
    let v = parse_volumes(
        r#"[{"name": "ds01", "namespaces": ["a"], "nfs": {"server": "nfs01", "path": "/ds01", "readOnly": true}},
            {"name": "lab", "hostPath": {"path": "/srv/lab", "type": "Directory"}}]"#,
    )
    .expect("volumes");
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].namespaces, ["a"]);
    assert_eq!(
        v[1].host_path.as_ref().map(|h| h.path.as_str()),
        Some("/srv/lab")
    );
    for (bad, says) in [
        (
            r#"[{"name": "x"}]"#,
            "[0] (x): set exactly one of nfs or hostPath",
        ),
        (
            r#"[{"name": "x", "hostPath": {"path": "/a"}}, {"name": "x", "hostPath": {"path": "/b"}}]"#,
            "[1].name: \"x\" is listed twice",
        ),
        (
            r#"[{"name": "", "hostPath": {"path": "/a"}}]"#,
            "[0].name: empty",
        ),
        (
            r#"[{"name": "x", "hostpath": {"path": "/a"}}]"#,
            "unknown field `hostpath`",
        ),
        (r#"{"name": "x"}"#, "not a JSON list of datastore volumes"),
    ] {
        let err = parse_volumes(bad).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
    let t = parse_tolerations(r#"[{"key": "sendense.io/site"}, {"key": "k", "effect": "NoExecute", "namespaces": ["a"]}]"#)
        .expect("tolerations");
    assert_eq!(
        (t[0].effect.clone(), t[1].effect.as_deref()),
        (None, Some("NoExecute"))
    );
    for (bad, says) in [
        (r#"[{"key": ""}]"#, "[0].key: empty"),
        (
            r#"[{"key": "k", "effect": "NoSchedul"}]"#,
            "[0].effect: \"NoSchedul\" is not",
        ),
    ] {
        let err = parse_tolerations(bad).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
}

fn source(namespace: &str, spec: serde_json::Value) -> SourceNode {
    let mut v = serde_json::json!({
        "apiVersion": "sendense.io/v1alpha1", "kind": "SourceNode",
        "metadata": {"name": "vc", "namespace": namespace},
        "spec": {
            "vcenter": {"url": "https://vc.example.com/sdk", "credentialsSecretRef": {"name": "c"}, "tls": {"thumbprint": "AA:BB"}},
            "datacenter": "DC1", "transport": {"type": "vddk"}
        }
    });
    for (k, val) in spec.as_object().expect("object") {
        v["spec"][k] = val.clone();
    }
    serde_json::from_value(v).expect("SourceNode")
}

#[test]
fn volumes_and_tolerations_are_open_only_to_their_namespaces() {
    let policy = SourcePolicy {
        volumes: parse_volumes(
            r#"[{"name": "ds01", "namespaces": ["team-a"], "nfs": {"server": "nfs01", "path": "/ds01"}},
                {"name": "shared", "nfs": {"server": "nfs02", "path": "/shared"}}]"#,
        )
        .expect("volumes"),
        tolerations: parse_tolerations(r#"[{"key": "site", "namespaces": ["team-a"]}]"#)
            .expect("tolerations"),
    };
    let uses = |volume: &str| {
        serde_json::json!({"transport": {"type": "nfs", "nfs": {"datastores": [
            {"name": "one", "persistentVolumeClaim": {"claimName": "one"}},
            {"name": "two", "volume": volume}]}}})
    };
    let ds = policy
        .datastores(&source("team-a", uses("ds01")))
        .expect("team-a may");
    assert_eq!(ds.len(), 2);
    assert_eq!(
        ds[0]
            .volume
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("one")
    );
    assert_eq!(
        ds[1].volume.nfs.as_ref().map(|n| n.server.as_str()),
        Some("nfs01")
    );
    let err = policy
        .datastores(&source("team-b", uses("ds01")))
        .expect_err("team-b may not");
    assert_eq!(
        err.0,
        "spec.transport.nfs.datastores[1] (two): volume \"ds01\" is not a datastore volume the \
         operator allows in namespace team-b (the chart's datastoreVolumes); allowed here: shared"
    );
    assert!(policy.datastores(&source("team-b", uses("shared"))).is_ok());
    // vddk mounts nothing.
    assert_eq!(
        policy.datastores(&source("team-b", serde_json::json!({}))),
        Ok(Vec::new())
    );

    let tolerating = |effect: Option<&str>| {
        let mut t = serde_json::json!({"key": "site", "operator": "Equal", "value": "lab"});
        if let Some(e) = effect {
            t["effect"] = serde_json::json!(e);
        }
        serde_json::json!({"placement": {"nodeSelector": {"site": "lab"}, "tolerations": [t]}})
    };
    assert!(
        policy
            .check(&source("team-a", tolerating(Some("NoSchedule"))))
            .is_ok()
    );
    assert!(
        policy.check(&source("team-a", tolerating(None))).is_ok(),
        "no effect set: any"
    );
    let err = policy
        .check(&source("team-b", tolerating(Some("NoSchedule"))))
        .expect_err("team-b");
    assert!(err.0.contains("namespace team-b"), "{err}");
    // nodeSelector alone only narrows: always allowed.
    assert!(
        SourcePolicy::default()
            .check(&source(
                "x",
                serde_json::json!({"placement": {"nodeSelector": {"a": "b"}}})
            ))
            .is_ok()
    );
}
