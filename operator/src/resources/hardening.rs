//! The restrictions every pod the operator builds carries, so that each of them is admitted in
//! a namespace enforcing the `restricted` Pod Security Standard: non-root, no privilege
//! escalation, no Linux capabilities, the runtime's default seccomp profile, a read-only root
//! file system with a private `/tmp`, and volumes owned through `fsGroup`.
//!
//! The pods run as the image's user (65532 in Sendense's images; the operator does not set
//! `runAsUser`, so a platform that assigns user IDs, such as OpenShift's restricted SCC, can).
//! `fsGroup` makes the repository volume writable by that user: the kubelet gives the volume's
//! files that group, and new files inherit it.

use k8s_openapi::api::core::v1::{
    Capabilities, EmptyDirVolumeSource, Pod, PodSecurityContext, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The group the repository volume's files belong to (the images' user and group).
pub const FS_GROUP: i64 = 65532;
/// The writable scratch directory of every container (the root file system is read-only).
pub const TMP_DIR: &str = "/tmp";
const TMP_VOLUME: &str = "tmp";

pub fn harden(mut pod: Pod) -> Pod {
    let Some(spec) = pod.spec.as_mut() else {
        return pod;
    };
    let psc = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    psc.run_as_non_root = Some(true);
    psc.fs_group = Some(FS_GROUP);
    // Only a volume whose root does not already carry the group is walked: a repository of
    // many large files is not re-chowned at every pod start.
    psc.fs_group_change_policy = Some("OnRootMismatch".into());
    psc.seccomp_profile = Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    });
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: TMP_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("64Mi".into())),
            ..Default::default()
        }),
        ..Default::default()
    });
    for c in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        c.security_context = Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        });
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: TMP_VOLUME.into(),
                mount_path: TMP_DIR.into(),
                ..Default::default()
            });
    }
    pod
}

#[cfg(test)]
/// What the `restricted` Pod Security Standard (v1.34) checks, applied to one pod: the
/// kube-apiserver enforces the same rules; the end-to-end tests run the pods in such a
/// namespace.
pub fn restricted_violations(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().expect("spec");
    let psc = spec.security_context.clone().unwrap_or_default();
    let mut v = Vec::new();
    let allowed = |vol: &Volume| {
        vol.config_map.is_some()
            || vol.csi.is_some()
            || vol.downward_api.is_some()
            || vol.empty_dir.is_some()
            || vol.ephemeral.is_some()
            || vol.persistent_volume_claim.is_some()
            || vol.projected.is_some()
            || vol.secret.is_some()
    };
    for vol in spec.volumes.iter().flatten() {
        if !allowed(vol) {
            v.push(format!("volume {} of a restricted type", vol.name));
        }
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.allow_privilege_escalation != Some(false) {
            v.push(format!("{}: allowPrivilegeEscalation != false", c.name));
        }
        let drops_all = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.as_ref())
            .is_some_and(|d| d.iter().any(|x| x == "ALL"));
        if !drops_all {
            v.push(format!("{}: capabilities not dropped", c.name));
        }
        if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
            v.push(format!("{}: runAsNonRoot != true", c.name));
        }
        if sc.run_as_user.or(psc.run_as_user) == Some(0) {
            v.push(format!("{}: runAsUser 0", c.name));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str())
            .or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{}: no seccomp profile", c.name));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod() -> Pod {
        let c = |name: &str| Container {
            name: name.into(),
            ..Default::default()
        };
        Pod {
            spec: Some(PodSpec {
                init_containers: Some(vec![c("prepare")]),
                containers: vec![c("serve"), c("other")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_hardened_pod_meets_the_restricted_standard() {
        assert!(!restricted_violations(&pod()).is_empty());
        assert_eq!(restricted_violations(&harden(pod())), Vec::<String>::new());
    }

    #[test]
    fn every_container_gets_a_read_only_root_and_a_private_tmp() {
        let p = harden(pod());
        let spec = p.spec.expect("spec");
        let tmp = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == TMP_VOLUME)
            .expect("tmp volume");
        assert!(tmp.empty_dir.is_some());
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let sc = c.security_context.clone().expect("security context");
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert!(
                c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == TMP_VOLUME && m.mount_path == TMP_DIR),
                "{}",
                c.name
            );
        }
        let psc = spec.security_context.expect("pod security context");
        assert_eq!(psc.fs_group, Some(FS_GROUP));
        assert_eq!(psc.run_as_user, None, "the image's user, not a fixed one");
    }
}
