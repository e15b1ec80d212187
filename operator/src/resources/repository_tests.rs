use super::*;
use crate::fixtures::{Fixture, TestObject};

#[test]
fn the_probe_pod_mounts_the_claim_and_reports_through_its_termination_message() {
    let r = Repository::test().with_spec(
        serde_json::json!({"storage": {"persistentVolumeClaim": {"claimName": "backups-data"}}}),
    );
    let pod = probe_pod(
        &r,
        &PodSettings {
            agent: "agent:1".into(),
            ..Default::default()
        },
        3600,
    );
    assert_eq!(
        crate::resources::hardening::restricted_violations(&pod),
        Vec::<String>::new()
    );
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let vol = &spec.volumes.expect("volumes")[0];
    assert_eq!(
        vol.persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("backups-data")
    );
    let cmd = spec.containers[0].command.clone().expect("command");
    assert_eq!(&cmd[..3], ["sendense-agent", "repo", "probe"]);
    assert!(cmd.contains(&"/dev/termination-log".to_string()));
    assert_eq!(
        pod.metadata.owner_references.expect("owner")[0].name,
        "primary"
    );
}

#[test]
fn a_templated_claim_has_no_owner_so_backups_outlive_the_repository_object() {
    let r = Repository::test().with_spec(
        serde_json::json!({"storage": {"claimTemplate": {"size": "50Gi", "storageClassName": "fast"}}}),
    );
    let pvc = templated_claim(&r).expect("claim");
    assert_eq!(pvc.metadata.name.as_deref(), Some("primary-data"));
    assert!(pvc.metadata.owner_references.is_none());
    let spec = pvc.spec.expect("spec");
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    assert_eq!(
        spec.resources.and_then(|r| r.requests).expect("requests")["storage"].0,
        "50Gi"
    );
    let existing = Repository::test()
        .with_spec(serde_json::json!({"storage": {"persistentVolumeClaim": {"claimName": "x"}}}));
    assert!(templated_claim(&existing).is_none());
}
