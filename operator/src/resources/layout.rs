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

/// The directory of one attempt of a job, relative to the repository volume's root: the
/// repository's layout with `{namespace}` and `{vm}` filled in, then
/// `<job>-<job UID>-a<attempt>`. The UID makes it the job's own whatever its name; the attempt
/// gives every attempt fresh files.
pub fn attempt_dir(
    layout: &str,
    namespace: &str,
    vm: &str,
    job: &str,
    uid: &str,
    attempt: i32,
) -> String {
    let dir = layout
        .replace("{namespace}", &path_component(namespace))
        .replace("{vm}", &path_component(vm));
    let mut parts: Vec<String> = dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
        .map(str::to_owned)
        .collect();
    // A name of up to 253 characters, the UID and the attempt stay within 255 bytes.
    let name: String = path_component(job).chars().take(180).collect();
    parts.push(format!("{name}-{}-a{attempt}", path_component(uid)));
    parts.join("/")
}

/// The job UID an attempt directory is named after (`.../<job>-<UID>-a<attempt>`); `None` for a
/// directory not named like one.
pub fn attempt_uid(dir: &str) -> Option<&str> {
    let last = dir.rsplit('/').next()?;
    let (rest, attempt) = last.rsplit_once("-a")?;
    if attempt.is_empty() || !attempt.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let start = rest.len().checked_sub(36)?;
    let (name, uid) = (rest.get(..start)?, rest.get(start..)?);
    let shaped = uid.char_indices().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => c == '-',
        _ => c.is_ascii_hexdigit(),
    });
    (shaped && name.len() > 1 && name.ends_with('-')).then_some(uid)
}

/// The part of the volume that holds the attempt directories of jobs in `namespace` alone, as
/// a prefix ending in '/': the layout up to its `{namespace}` component. `None` when the layout
/// mixes namespaces (no `{namespace}` component, or `{vm}` before it).
pub fn namespace_prefix(layout: &str, namespace: &str) -> Option<String> {
    let mut prefix = String::new();
    for part in layout
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
    {
        if part == "{namespace}" {
            prefix.push_str(&path_component(namespace));
            prefix.push('/');
            return Some(prefix);
        }
        if part.contains('{') {
            return None;
        }
        prefix.push_str(part);
        prefix.push('/');
    }
    None
}

/// The same directory for another attempt.
pub fn for_attempt(dir: &str, attempt: i32) -> String {
    let base = match dir.rfind("-a") {
        Some(i) if dir[i + 2..].chars().all(|c| c.is_ascii_digit()) => &dir[..i],
        _ => dir,
    };
    format!("{base}-a{attempt}")
}

/// A disk's QCOW2 in an attempt's directory.
pub fn disk_file(dir: &str, key: i32) -> String {
    format!("{dir}/{key}.qcow2")
}

/// The directory of a file (relative paths, '/'-separated).
pub fn dir_of(file: &str) -> &str {
    file.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
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
        env: images.log_env().map(|e| vec![e]),
        ..Default::default()
    }
}

/// A short pod of one job on the repository volume: one container (`component`, `container`)
/// running `sendense-agent <args>` (its result as the termination message), run once, hardened.
pub(super) fn job_volume_pod(
    job: &sendense_crds::BackupJob,
    name: String,
    (component, container): (&str, &str),
    args: Vec<String>,
    claim: &str,
    images: &PodSettings,
) -> k8s_openapi::api::core::v1::Pod {
    let mut container = agent_container(container.into(), args, images);
    container.termination_message_policy = Some("FallbackToLogsOnError".into());
    super::harden(k8s_openapi::api::core::v1::Pod {
        metadata: super::owned_meta(job, name, super::labels(job, component)),
        spec: Some(PodSpec {
            containers: vec![container],
            termination_grace_period_seconds: Some(10),
            ..volume_pod_spec(claim, images)
        }),
        status: None,
    })
}

/// The spec every hub-side pod starts from: the claim as its only volume, run once, as the
/// hub ServiceAccount without an API token, with the node's name resolution (`Default`): it
/// looks up no name, so the cluster's DNS is not its concern (and on a cluster without it,
/// the kubelet does not record a MissingClusterDNS Event at each of its syncs).
pub(super) fn volume_pod_spec(claim: &str, images: &PodSettings) -> PodSpec {
    PodSpec {
        restart_policy: Some("Never".into()),
        dns_policy: Some("Default".into()),
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
    fn attempt_directories_follow_the_layout_and_stay_inside_the_volume() {
        let uid = "8f14e45f-ceea-4c8a-9b1c-3a0b5e0d1c2a";
        let dir = attempt_dir("{namespace}/{vm}", "backups", "web 01/x", "b1", uid, 1);
        assert_eq!(dir, format!("backups/web_01_x/b1-{uid}-a1"));
        assert_eq!(disk_file(&dir, 2000), format!("{dir}/2000.qcow2"));
        assert_eq!(dir_of(&disk_file(&dir, 2000)), dir);
        assert_eq!(
            attempt_dir("vms/{vm}/", "ns", "..", "j", "u", 3),
            "vms/_/j-u-a3"
        );
        assert_eq!(
            for_attempt(&dir, 2),
            format!("backups/web_01_x/b1-{uid}-a2")
        );
        assert_eq!(for_attempt("a/b-a12", 13), "a/b-a13");
        assert_eq!(attempt_uid(&dir), Some(uid));
        assert_eq!(attempt_uid(&for_attempt(&dir, 12)), Some(uid));
        for other in [
            "backups/vm/b1-x-a1",
            "b1-a1",
            &format!("{uid}-a1"),
            &format!("a/b1-{uid}-ax"),
        ] {
            assert_eq!(attempt_uid(other), None, "{other}");
        }
        assert_eq!(
            namespace_prefix("{namespace}/{vm}", "prod").as_deref(),
            Some("prod/")
        );
        assert_eq!(
            namespace_prefix("/sendense/{namespace}/vms/{vm}", "a b").as_deref(),
            Some("sendense/a_b/")
        );
        assert_eq!(namespace_prefix("{vm}/{namespace}", "prod"), None);
        assert_eq!(namespace_prefix("vms/{vm}", "prod"), None);
        let long = attempt_dir("{vm}", "ns", "vm", &"n".repeat(253), uid, 10);
        assert!(long.rsplit('/').next().unwrap_or_default().len() <= 255);
    }
}
