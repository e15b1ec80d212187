//! The short pod that removes a failed job's partial QCOW2 files from the repository (only
//! that job's files: the paths recorded in its status).

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use sendense_crds::BackupJob;

use super::layout::{agent_container, mounted, volume_pod_spec};
use super::{PodSettings, cleanup_name, harden, labels, owned_meta};
use sendense_contract::cli::HubRemoveArgs;

/// The cleanup pod: `files` relative to the volume's root, on the repository's `claim`.
pub fn cleanup_pod(job: &BackupJob, claim: &str, files: &[String], images: &PodSettings) -> Pod {
    let args = HubRemoveArgs {
        files: files.iter().map(|f| mounted(f)).collect(),
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
    fn the_cleanup_pod_removes_only_this_jobs_files() {
        let j = BackupJob::test();
        let images = PodSettings {
            agent: "agent:1".into(),
            ..Default::default()
        };
        let pod = cleanup_pod(&j, "data", &["ns/vm/2000/web-01-b2.qcow2".into()], &images);
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
                "--file",
                "/repository/ns/vm/2000/web-01-b2.qcow2"
            ]
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("web-01-b2-cleanup"));
    }
}
