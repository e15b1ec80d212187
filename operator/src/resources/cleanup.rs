//! The short pod that removes the directories of a job's attempts that did not commit (only
//! that job's: named after its UID; `hub remove` refuses a committed restore point's).

use k8s_openapi::api::core::v1::Pod;
use sendense_crds::BackupJob;

use super::layout::{job_volume_pod, mounted};
use super::{PodSettings, cleanup_name};
use sendense_contract::cli::HubRemoveArgs;

/// The cleanup pod: `dirs` relative to the volume's root, on the repository's `claim`.
pub fn cleanup_pod(job: &BackupJob, claim: &str, dirs: &[String], images: &PodSettings) -> Pod {
    let args = HubRemoveArgs {
        dirs: dirs.iter().map(|f| mounted(f)).collect(),
    };
    job_volume_pod(
        job,
        cleanup_name(job),
        ("cleanup", "remove"),
        args.to_args(),
        claim,
        images,
    )
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
