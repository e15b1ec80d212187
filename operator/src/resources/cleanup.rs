//! The short pod that removes the directories of a job's attempts that did not commit (only
//! that job's: named after its UID; `hub remove` refuses a committed restore point's).

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use sendense_crds::BackupJob;

use super::layout::{agent_container, mounted, volume_pod_spec};
use super::{PodSettings, cleanup_name, harden, labels, owned_meta};
use sendense_contract::cli::HubRemoveArgs;

/// The cleanup pod: `dirs` relative to the volume's root, on the repository's `claim`.
pub fn cleanup_pod(job: &BackupJob, claim: &str, dirs: &[String], images: &PodSettings) -> Pod {
    let args = HubRemoveArgs {
        dirs: dirs.iter().map(|f| mounted(f)).collect(),
    };
    let mut remove = agent_container("remove".into(), args.to_args(), images);
    remove.termination_message_policy = Some("FallbackToLogsOnError".into());
    harden(Pod {
        metadata: owned_meta(job, cleanup_name(job), labels(job, "cleanup")),
        spec: Some(PodSpec {
            containers: vec![remove],
            termination_grace_period_seconds: Some(10),
            ..volume_pod_spec(claim, images)
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TestObject;

    #[test]
    fn the_cleanup_pod_removes_only_this_jobs_attempts() {
        let j = BackupJob::test();
        let images = PodSettings {
            agent: "agent:1".into(),
            ..Default::default()
        };
        let pod = cleanup_pod(&j, "data", &["ns/vm/web-01-b2-u-2-a1".into()], &images);
        assert_eq!(
            crate::resources::hardening::restricted_violations(&pod),
            Vec::<String>::new()
        );
        let spec = pod.spec.expect("spec");
        assert!(spec.init_containers.is_none());
        let cmd = spec.containers[0].command.clone().expect("command");
        assert_eq!(
            cmd,
            vec![
                "sendense-agent",
                "hub",
                "remove",
                "--dir",
                "/repository/ns/vm/web-01-b2-u-2-a1"
            ]
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("web-01-b2-cleanup"));
    }
}
