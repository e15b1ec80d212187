//! Where things are on a repository volume: the claim it lives on, the file of each disk of a
//! job (from the repository's layout), and how hub-side pods mount it.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaimVolumeSource, PodSpec, Volume, VolumeMount,
};
use kube::ResourceExt;
use sendense_crds::Repository;

use super::PodSettings;
use sendense_contract::cli::AGENT_BINARY;

/// Where the repository volume is mounted in hub-side containers.
pub const REPOSITORY_MOUNT: &str = "/repository";
const VOLUME: &str = "repository";

/// The claim a repository's data lives on.
pub fn claim_name(repo: &Repository) -> String {
    match &repo.spec.storage.persistent_volume_claim {
        Some(c) => c.claim_name.clone(),
        None => format!("{}-data", repo.name_any()),
    }
}

/// Replaces characters a path component should not carry.
fn path_component(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match out.as_str() {
        "" | "." | ".." => "_".into(),
        _ => out,
    }
}

/// Where a disk's QCOW2 of this job lives, relative to the repository volume's root:
/// the repository's layout with `{namespace}`, `{vm}` and `{deviceKey}` filled in, then
/// `<job>.qcow2`.
pub fn disk_file(layout: &str, namespace: &str, vm: &str, key: i32, job: &str) -> String {
    let dir = layout
        .replace("{namespace}", &path_component(namespace))
        .replace("{vm}", &path_component(vm))
        .replace("{deviceKey}", &key.to_string());
    let dir: Vec<&str> = dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
        .collect();
    format!("{}/{}.qcow2", dir.join("/"), path_component(job))
}

/// A path relative to the volume's root, as hub-side containers see it.
pub(super) fn mounted(relative: &str) -> PathBuf {
    PathBuf::from(format!(
        "{REPOSITORY_MOUNT}/{}",
        relative.trim_start_matches('/')
    ))
}

pub(super) fn mount() -> VolumeMount {
    VolumeMount {
        name: VOLUME.into(),
        mount_path: REPOSITORY_MOUNT.into(),
        ..Default::default()
    }
}

/// A container of the agent image running `sendense-agent <args>` with the volume mounted.
pub(super) fn agent_container(name: String, args: Vec<String>, images: &PodSettings) -> Container {
    let mut command = vec![AGENT_BINARY.to_owned()];
    command.extend(args);
    Container {
        name,
        image: Some(images.agent.clone()),
        image_pull_policy: Some(images.pull_policy()),
        command: Some(command),
        resources: images.hub_resources.clone(),
        volume_mounts: Some(vec![mount()]),
        ..Default::default()
    }
}

/// The spec every hub-side pod starts from: the claim as its only volume, run once, as the
/// hub ServiceAccount without an API token.
pub(super) fn volume_pod_spec(claim: &str, images: &PodSettings) -> PodSpec {
    PodSpec {
        restart_policy: Some("Never".into()),
        service_account_name: images.hub_service_account.clone(),
        automount_service_account_token: Some(false),
        volumes: Some(vec![Volume {
            name: VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                read_only: Some(false),
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_files_follow_the_layout_and_stay_inside_the_volume() {
        assert_eq!(
            disk_file(
                "{namespace}/{vm}/{deviceKey}",
                "backups",
                "web 01/x",
                2000,
                "b1"
            ),
            "backups/web_01_x/2000/b1.qcow2"
        );
        assert_eq!(
            disk_file("vms/{vm}/{deviceKey}/", "ns", "..", 2001, "j"),
            "vms/_/2001/j.qcow2"
        );
    }
}
