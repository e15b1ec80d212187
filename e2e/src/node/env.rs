//! A container's environment as a kubelet builds it: `env` in order (later entries may refer to
//! earlier ones with `$(NAME)`), `envFrom`, `valueFrom` secretKeyRef / configMapKeyRef /
//! fieldRef, and `$(NAME)` expansion in command and args.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;

use super::PodError;

/// Reads Secrets and ConfigMaps of the pod's namespace.
pub struct Sources {
    pub secrets: Api<Secret>,
    pub config_maps: Api<ConfigMap>,
}

impl Sources {
    async fn secret(&self, name: &str) -> Result<Option<Secret>, PodError> {
        self.secrets.get_opt(name).await.map_err(PodError::Api)
    }
    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>, PodError> {
        self.config_maps.get_opt(name).await.map_err(PodError::Api)
    }
}

fn decode(bytes: &ByteString) -> String {
    String::from_utf8_lossy(&bytes.0).into_owned()
}

/// The value of a downward-API field path of the pod, as the kubelet resolves it.
pub fn field_ref(pod: &Pod, path: &str) -> Result<String, PodError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let from_map = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let bracketed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_owned)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        _ => {
            if let Some(key) = bracketed("metadata.labels['") {
                from_map(&meta.labels, &key)
            } else if let Some(key) = bracketed("metadata.annotations['") {
                from_map(&meta.annotations, &key)
            } else {
                return Err(PodError::Unsupported(format!(
                    "fieldRef {path} is not supported"
                )));
            }
        }
    })
}

/// Builds the container's environment: `base` (PATH, HOME, service discovery) overridden by
/// envFrom, then env, in the pod's order.
pub async fn container_env(
    pod: &Pod,
    container: &Container,
    base: &[(String, String)],
    sources: &Sources,
) -> Result<Vec<(String, String)>, PodError> {
    let mut env: Vec<(String, String)> = base.to_vec();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.secret_ref {
            match sources.secret(&r.name).await? {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), decode(v));
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(PodError::Config(format!("secret \"{}\" not found", r.name))),
            }
        }
        if let Some(r) = &from.config_map_ref {
            match sources.config_map(&r.name).await? {
                Some(c) => {
                    for (k, v) in c.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(PodError::Config(format!(
                        "configmap \"{}\" not found",
                        r.name
                    )));
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let lookup: BTreeMap<String, String> = env.iter().cloned().collect();
                expand(var.value.as_deref().unwrap_or_default(), &lookup)
            }
            Some(from) => {
                if let Some(r) = &from.secret_key_ref {
                    let secret = sources.secret(&r.name).await?;
                    match secret
                        .as_ref()
                        .and_then(|s| s.data.as_ref())
                        .and_then(|d| d.get(&r.key))
                    {
                        Some(v) => decode(v),
                        None if r.optional == Some(true) => continue,
                        None if secret.is_none() => {
                            return Err(PodError::Config(format!(
                                "secret \"{}\" not found",
                                r.name
                            )));
                        }
                        None => {
                            return Err(PodError::Config(format!(
                                "couldn't find key {} in Secret {}",
                                r.key, r.name
                            )));
                        }
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    let cm = sources.config_map(&r.name).await?;
                    match cm
                        .as_ref()
                        .and_then(|c| c.data.as_ref())
                        .and_then(|d| d.get(&r.key))
                    {
                        Some(v) => v.clone(),
                        None if r.optional == Some(true) => continue,
                        None if cm.is_none() => {
                            return Err(PodError::Config(format!(
                                "configmap \"{}\" not found",
                                r.name
                            )));
                        }
                        None => {
                            return Err(PodError::Config(format!(
                                "couldn't find key {} in ConfigMap {}",
                                r.key, r.name
                            )));
                        }
                    }
                } else if let Some(r) = &from.field_ref {
                    field_ref(pod, &r.field_path)?
                } else {
                    return Err(PodError::Unsupported(format!(
                        "env {}: only secretKeyRef, configMapKeyRef and fieldRef are supported",
                        var.name
                    )));
                }
            }
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

/// Expands `$(NAME)` references from `env`; `$$(NAME)` stays literally `$(NAME)`; unknown
/// references are left as written (as the kubelet does).
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(end) => {
                    let name = &tail[..end];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &tail[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_references_and_keeps_escapes_and_unknowns() {
        let env: BTreeMap<String, String> = [
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ]
        .into();
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(C) $A $", &env), "$(C) $A $");
        assert_eq!(expand("x$(A", &env), "x$(A");
    }

    #[test]
    fn field_refs_resolve_from_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "hub"}},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"podIP": "127.10.0.2"}
        }))
        .expect("valid pod");
        assert_eq!(field_ref(&pod, "metadata.name").ok().as_deref(), Some("p"));
        assert_eq!(
            field_ref(&pod, "spec.nodeName").ok().as_deref(),
            Some("node-a")
        );
        assert_eq!(
            field_ref(&pod, "status.podIP").ok().as_deref(),
            Some("127.10.0.2")
        );
        assert_eq!(
            field_ref(&pod, "metadata.labels['app']").ok().as_deref(),
            Some("hub")
        );
        assert!(matches!(
            field_ref(&pod, "spec.nope"),
            Err(PodError::Unsupported(_))
        ));
    }
}
