//! The short pod that commits a job's copied attempt as a restore point: `repo commit` reads
//! each disk back through its chain and writes the manifest next to the files.

use k8s_openapi::api::core::v1::Pod;
use sendense_contract::cli::RepoCommitArgs;
use sendense_contract::manifest::Manifest;
use sendense_crds::BackupJob;

use super::layout::{REPOSITORY_MOUNT, job_volume_pod};
use super::{PodSettings, TERMINATION_LOG, commit_name};

/// The commit pod for `manifest` (the attempt's, without digests), on the repository's `claim`.
pub fn commit_pod(job: &BackupJob, claim: &str, manifest: &Manifest, images: &PodSettings) -> Pod {
    let args = RepoCommitArgs {
        root: REPOSITORY_MOUNT.into(),
        manifest: manifest.to_json(),
        result_file: Some(TERMINATION_LOG.into()),
    };
    let mut pod = job_volume_pod(
        job,
        commit_name(job),
        ("commit", "commit"),
        args.to_args(),
        claim,
        images,
    );
    // The job's deadline bounds the read-back too.
    if let Some(spec) = pod.spec.as_mut() {
        spec.active_deadline_seconds =
            super::seconds_left(job, k8s_openapi::jiff::Timestamp::now());
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TestObject;

    #[test]
    fn the_commit_pod_commits_the_manifest_on_the_repository_volume() {
        let m = Manifest::parse(
            &serde_json::json!({
                "version": 1, "job": {"namespace": "backups", "name": "web-01-b2", "uid": "u-2"},
                "attempt": 1, "repository": "primary", "sourceNode": "vc", "vcenter": "https://vc/sdk",
                "vm": {"name": "web-01", "instanceUuid": "u"}, "directory": "backups/web-01/d",
                "started": "2026-11-25T10:00:00Z", "completed": "2026-11-25T10:05:00Z",
                "disks": [{"deviceKey": 2000, "file": "backups/web-01/d/2000.qcow2", "capacityBytes": 1,
                           "copy": "full", "changeIdReached": "c", "bytesWritten": 0}]
            })
            .to_string(),
        )
        .expect("manifest");
        let pod = commit_pod(&BackupJob::test(), "data", &m, &PodSettings::default());
        assert_eq!(
            crate::resources::hardening::restricted_violations(&pod),
            Vec::<String>::new()
        );
        assert_eq!(pod.metadata.name.as_deref(), Some("web-01-b2-commit"));
        let cmd = pod.spec.expect("spec").containers[0]
            .command
            .clone()
            .expect("command");
        assert_eq!(
            &cmd[..5],
            ["sendense-agent", "repo", "commit", "--root", "/repository"]
        );
        assert_eq!(cmd[5], "--manifest");
        assert_eq!(Manifest::parse(&cmd[6]).expect("the manifest, whole"), m);
    }
}
