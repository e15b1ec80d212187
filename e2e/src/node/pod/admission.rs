//! What the stand-in refuses to run. A pod asking for something it cannot honour fails at once
//! with reason [`UNSUPPORTED`] and a message naming the field, rather than running differently
//! from a real node.

use k8s_openapi::api::core::v1::Pod;

use crate::node::probe;

/// The pod's status reason when the stand-in cannot honour what it asks for.
pub(super) const UNSUPPORTED: &str = "UnsupportedByNodeStandIn";

/// What the pod asks for that this stand-in cannot honour, if anything.
pub(super) fn unsupported(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        return Some("readinessGates are not supported".into());
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Some("ephemeral containers are not supported".into());
    }
    for c in spec.init_containers.iter().flatten() {
        if c.restart_policy.is_some() {
            return Some(format!(
                "init container {}: sidecar containers (restartPolicy on an init container) are not supported",
                c.name
            ));
        }
    }
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        if c.command.as_ref().is_none_or(|cmd| cmd.is_empty()) {
            return Some(format!(
                "container {}: no command; the node stand-in runs commands on the host and cannot run an image's entrypoint",
                c.name
            ));
        }
        for p in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            if let Some(why) = probe::unsupported(p) {
                return Some(format!("container {}: {why}", c.name));
            }
        }
        if let Some(l) = &c.lifecycle
            && (l.post_start.is_some() || l.pre_stop.is_some())
        {
            return Some(format!(
                "container {}: lifecycle hooks are not supported",
                c.name
            ));
        }
        for m in c.volume_mounts.iter().flatten() {
            if m.sub_path_expr.is_some() {
                return Some(format!(
                    "container {}: subPathExpr is not supported",
                    c.name
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod with one init container and one container, `app` changed by `edit`.
    fn pod(edit: impl FnOnce(&mut serde_json::Value)) -> Pod {
        let mut spec = serde_json::json!({
            "initContainers": [{"name": "init", "image": "x", "command": ["true"]}],
            "containers": [{"name": "app", "image": "x", "command": ["sleep"], "args": ["1"],
                "readinessProbe": {"tcpSocket": {"port": 80}}}],
        });
        edit(&mut spec["containers"][0]);
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
            .expect("a valid pod")
    }

    #[test]
    fn a_pod_of_commands_and_supported_probes_is_admitted() {
        assert_eq!(unsupported(&pod(|_| {})), None);
    }

    #[test]
    fn refusals_name_the_container_and_what_it_asked_for() {
        let no_command = pod(|c| c["command"] = serde_json::json!([]));
        assert!(
            unsupported(&no_command)
                .is_some_and(|why| why.starts_with("container app: no command"))
        );
        let grpc = pod(|c| c["livenessProbe"] = serde_json::json!({"grpc": {"port": 9000}}));
        assert_eq!(
            unsupported(&grpc).as_deref(),
            Some("container app: gRPC probes are not supported")
        );
        let hook = pod(|c| {
            c["lifecycle"] = serde_json::json!({"preStop": {"exec": {"command": ["true"]}}});
        });
        assert_eq!(
            unsupported(&hook).as_deref(),
            Some("container app: lifecycle hooks are not supported")
        );
        let expr = pod(|c| {
            c["volumeMounts"] =
                serde_json::json!([{"name": "v", "mountPath": "/v", "subPathExpr": "$(POD)"}]);
        });
        assert_eq!(
            unsupported(&expr).as_deref(),
            Some("container app: subPathExpr is not supported")
        );
    }

    #[test]
    fn sidecar_init_containers_are_refused() {
        let mut sidecar = pod(|_| {});
        if let Some(init) = sidecar
            .spec
            .as_mut()
            .and_then(|s| s.init_containers.as_mut())
        {
            init[0].restart_policy = Some("Always".into());
        }
        assert!(unsupported(&sidecar).is_some_and(|why| why.starts_with("init container init:")));
    }
}
