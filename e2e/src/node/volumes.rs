//! The pod's volumes as host directories: emptyDir under the pod's directory, hostPath as
//! given, a PersistentVolumeClaim as the directory of the PersistentVolume bound to it, Secret,
//! ConfigMap, downward API and projected (service-account token) volumes written as files.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
    Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::PodError;
use super::env::field_ref;

/// Where each volume of a pod lives on the host.
pub type VolumePaths = BTreeMap<String, PathBuf>;

/// Builds every volume of `pod` under `pod_dir` and returns their host paths.
pub async fn materialize(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<VolumePaths, PodError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| PodError::Unsupported("pod has no spec".into()))?;
    let mut paths = VolumePaths::new();
    for volume in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&volume.name);
        let path = materialize_one(client, pod, &ns, volume, &dir).await?;
        paths.insert(volume.name.clone(), path);
    }
    Ok(paths)
}

async fn materialize_one(
    client: &Client,
    pod: &Pod,
    ns: &str,
    volume: &Volume,
    dir: &Path,
) -> Result<PathBuf, PodError> {
    let io = |e: std::io::Error| PodError::Io(format!("volume {}: {e}", volume.name));
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(dir).map_err(io)?;
        return Ok(dir.to_path_buf());
    }
    if let Some(hp) = &volume.host_path {
        return host_path(&volume.name, &hp.path, hp.type_.as_deref().unwrap_or(""));
    }
    if let Some(pvc) = &volume.persistent_volume_claim {
        return claim_path(client, ns, &pvc.claim_name).await;
    }
    if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = secret_data(client, ns, &name, s.optional == Some(true)).await?;
        return key_files(dir, &data, s.items.as_deref(), s.default_mode);
    }
    if let Some(c) = &volume.config_map {
        let name = c.name.clone();
        let data = config_map_data(client, ns, &name, c.optional == Some(true)).await?;
        return key_files(dir, &data, c.items.as_deref(), c.default_mode);
    }
    if let Some(d) = &volume.downward_api {
        write_fresh(dir).map_err(io)?;
        for item in d.items.iter().flatten() {
            let value = downward_item(
                pod,
                item.field_ref.as_ref().map(|f| f.field_path.as_str()),
                &item.path,
            )?;
            write_file(
                dir,
                &item.path,
                value.as_bytes(),
                item.mode.or(d.default_mode).unwrap_or(0o644),
            )?;
        }
        return Ok(dir.to_path_buf());
    }
    if let Some(p) = &volume.projected {
        write_fresh(dir).map_err(io)?;
        let mode = p.default_mode.unwrap_or(0o644);
        for source in p.sources.iter().flatten() {
            if let Some(t) = &source.service_account_token {
                let token = service_account_token(
                    client,
                    pod,
                    ns,
                    t.audience.clone(),
                    t.expiration_seconds,
                )
                .await?;
                write_file(dir, &t.path, token.as_bytes(), mode)?;
            } else if let Some(c) = &source.config_map {
                let data = config_map_data(client, ns, &c.name, c.optional == Some(true)).await?;
                write_items(dir, &data, c.items.as_deref(), mode)?;
            } else if let Some(s) = &source.secret {
                let data = secret_data(client, ns, &s.name, s.optional == Some(true)).await?;
                write_items(dir, &data, s.items.as_deref(), mode)?;
            } else if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    let value = downward_item(
                        pod,
                        item.field_ref.as_ref().map(|f| f.field_path.as_str()),
                        &item.path,
                    )?;
                    write_file(dir, &item.path, value.as_bytes(), item.mode.unwrap_or(mode))?;
                }
            } else {
                return Err(PodError::Unsupported(format!(
                    "projected volume {}: only serviceAccountToken, configMap, secret and downwardAPI sources are supported",
                    volume.name
                )));
            }
        }
        return Ok(dir.to_path_buf());
    }
    Err(PodError::Unsupported(format!(
        "volume {}: only emptyDir, hostPath, persistentVolumeClaim, secret, configMap, downwardAPI and projected volumes are supported",
        volume.name
    )))
}

fn downward_item(pod: &Pod, field_path: Option<&str>, path: &str) -> Result<String, PodError> {
    match field_path {
        Some(f) => field_ref(pod, f),
        None => Err(PodError::Unsupported(format!(
            "downward API item {path}: only fieldRef is supported"
        ))),
    }
}

fn host_path(volume: &str, path: &str, kind: &str) -> Result<PathBuf, PodError> {
    let p = PathBuf::from(path);
    let bad = |what: &str| {
        Err(PodError::Config(format!(
            "hostPath volume {volume}: {path} is not {what}"
        )))
    };
    let io = |e: std::io::Error| PodError::Io(format!("hostPath volume {volume}: {path}: {e}"));
    match kind {
        "" => {}
        "DirectoryOrCreate" => std::fs::create_dir_all(&p).map_err(io)?,
        "Directory" if !p.is_dir() => return bad("an existing directory"),
        "FileOrCreate" => {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(io)?;
        }
        "File" if !p.is_file() => return bad("an existing file"),
        "Directory" | "File" => {}
        other => {
            return Err(PodError::Unsupported(format!(
                "hostPath volume {volume}: type {other} is not supported"
            )));
        }
    }
    Ok(p)
}

/// A claim's directory: the hostPath or local path of the PersistentVolume bound to it. An
/// unbound claim keeps the pod waiting, as on a real node.
async fn claim_path(client: &Client, ns: &str, claim: &str) -> Result<PathBuf, PodError> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(claim)
        .await
        .map_err(PodError::Api)?
        .ok_or_else(|| PodError::Config(format!("persistentvolumeclaim \"{claim}\" not found")))?;
    let pv_name = pvc
        .spec
        .and_then(|s| s.volume_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            PodError::Config(format!("persistentvolumeclaim \"{claim}\" is not bound"))
        })?;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .map_err(PodError::Api)?;
    let spec = pv.spec.unwrap_or_default();
    let path = spec
        .host_path
        .map(|h| h.path)
        .or(spec.local.map(|l| l.path))
        .ok_or_else(|| {
            PodError::Unsupported(format!(
                "persistentvolume {pv_name} (bound to claim {claim}) is neither hostPath nor local"
            ))
        })?;
    std::fs::create_dir_all(&path).map_err(|e| PodError::Io(format!("{path}: {e}")))?;
    Ok(PathBuf::from(path))
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, PodError> {
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(PodError::Api)?
    {
        Some(s) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        None if optional => Ok(BTreeMap::new()),
        None => Err(PodError::Config(format!("secret \"{name}\" not found"))),
    }
}

async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, PodError> {
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(PodError::Api)?
    {
        Some(c) => {
            let mut data: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                c.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(data)
        }
        None if optional => Ok(BTreeMap::new()),
        None => Err(PodError::Config(format!("configmap \"{name}\" not found"))),
    }
}

/// A bound token for the pod's service account, as the kubelet requests it.
async fn service_account_token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String, PodError> {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let answer: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await
        .map_err(PodError::Api)?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| PodError::Config(format!("no token issued for serviceaccount {sa}")))
}

/// A Secret or ConfigMap volume: its keys (or the chosen items) as files in a fresh directory.
fn key_files(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<PathBuf, PodError> {
    write_fresh(dir).map_err(|e| PodError::Io(format!("{}: {e}", dir.display())))?;
    write_items(dir, data, items, default_mode.unwrap_or(0o644))?;
    Ok(dir.to_path_buf())
}

fn write_fresh(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
) -> Result<(), PodError> {
    match items {
        None => {
            for (key, value) in data {
                write_file(dir, key, value, default_mode)?;
            }
        }
        Some(items) => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    PodError::Config(format!(
                        "couldn't find key {} for volume item {}",
                        item.key, item.path
                    ))
                })?;
                write_file(dir, &item.path, value, item.mode.unwrap_or(default_mode))?;
            }
        }
    }
    Ok(())
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: i32) -> Result<(), PodError> {
    if rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
        return Err(PodError::Config(format!(
            "volume item path {rel} escapes the volume"
        )));
    }
    let path = dir.join(rel);
    let io = |e: std::io::Error| PodError::Io(format!("{}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(&path, data).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode as u32 & 0o7777))
        .map_err(io)?;
    Ok(())
}
