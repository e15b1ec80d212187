//! What an administrator lets a SourceNode ask of the operator. The operator creates agent pods
//! with its own, cluster-wide rights, so whoever may edit a SourceNode must not gain through it
//! what they could not do themselves (a confused deputy):
//!
//! - **Datastores.** A datastore reaches the agent either through a PersistentVolumeClaim in the
//!   SourceNode's namespace (the claim binds to a PersistentVolume an administrator made, e.g.
//!   of type NFS), or by naming one of the volumes the administrator lists in the operator's
//!   settings (the chart's `datastoreVolumes`, SENDENSE_DATASTORE_VOLUMES), each limited to
//!   some namespaces or open to all. A raw `hostPath` or `nfs` volume in a SourceNode is refused
//!   (admission refuses it too; this check covers CRDs installed by an older release, which
//!   Helm does not upgrade).
//! - **Placement.** `nodeSelector` only narrows where an agent may run; taints are how an
//!   administrator keeps pods off nodes (control plane, other tenants), so every toleration a
//!   SourceNode asks for must be one the settings allow (the chart's
//!   `agentPlacement.allowedTolerations`, SENDENSE_ALLOWED_TOLERATIONS).
//!
//! A SourceNode that asks for more is not Ready (reason `NotAllowed`, the message naming the
//! field and the fix), so no job starts from it; the agent pod is built only from what passed.

use k8s_openapi::api::core::v1::{HostPathVolumeSource, NFSVolumeSource, Toleration, Volume};
use kube::ResourceExt;
use sendense_crds::SourceNode;
use serde::Deserialize;

/// A volume the administrator lets SourceNodes mount as a datastore, by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedVolume {
    /// What a SourceNode's `transport.nfs.datastores[].volume` says.
    pub name: String,
    /// Namespaces whose SourceNodes may mount it; empty: every namespace.
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub nfs: Option<NFSVolumeSource>,
    #[serde(default)]
    pub host_path: Option<HostPathVolumeSource>,
    /// Restores into vSphere may write through it (mounted read-write in restore pods only;
    /// backups always mount it read-only).
    #[serde(default)]
    pub writable: bool,
}

/// A taint SourceNodes may tolerate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedToleration {
    /// The taint's key.
    pub key: String,
    /// The taint's effect (NoSchedule, PreferNoSchedule, NoExecute); unset: any.
    #[serde(default)]
    pub effect: Option<String>,
    /// Namespaces whose SourceNodes may tolerate it; empty: every namespace.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// The administrator's limits on SourceNodes. The default allows claims only and no
/// toleration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourcePolicy {
    pub volumes: Vec<AllowedVolume>,
    pub tolerations: Vec<AllowedToleration>,
}

/// A SourceNode asks for something the policy does not allow; the message names the field and
/// the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAllowed(pub String);

/// One datastore as the agent pod mounts it.
#[derive(Debug, Clone, PartialEq)]
pub struct Datastore {
    /// The datastore's name in vSphere.
    pub name: String,
    /// The pod volume (its name is set by the pod builder).
    pub volume: Volume,
}

fn open_to(namespaces: &[String], ns: &str) -> bool {
    namespaces.is_empty() || namespaces.iter().any(|n| n == ns)
}

/// Parses SENDENSE_DATASTORE_VOLUMES: a JSON list of `{name, namespaces?, nfs | hostPath}`.
pub fn parse_volumes(s: &str) -> Result<Vec<AllowedVolume>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let volumes: Vec<AllowedVolume> = serde_json::from_str(s).map_err(|e| {
        format!(
            "not a JSON list of datastore volumes ({e}); example: \
             [{{\"name\":\"ds01\",\"namespaces\":[\"backups\"],\"nfs\":{{\"server\":\"nfs01\",\"path\":\"/ds01\",\"readOnly\":true}}}}]"
        )
    })?;
    for (i, v) in volumes.iter().enumerate() {
        if v.name.is_empty() {
            return Err(format!(
                "[{i}].name: empty; a SourceNode names the volume by it"
            ));
        }
        if volumes[..i].iter().any(|o| o.name == v.name) {
            return Err(format!("[{i}].name: {:?} is listed twice", v.name));
        }
        if v.nfs.is_some() == v.host_path.is_some() {
            return Err(format!(
                "[{i}] ({}): set exactly one of nfs or hostPath",
                v.name
            ));
        }
    }
    Ok(volumes)
}

/// Parses SENDENSE_ALLOWED_TOLERATIONS: a JSON list of `{key, effect?, namespaces?}`.
pub fn parse_tolerations(s: &str) -> Result<Vec<AllowedToleration>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<AllowedToleration> = serde_json::from_str(s).map_err(|e| {
        format!(
            "not a JSON list of tolerations ({e}); example: \
             [{{\"key\":\"sendense.io/site\",\"effect\":\"NoSchedule\"}}]"
        )
    })?;
    for (i, t) in list.iter().enumerate() {
        if t.key.is_empty() {
            return Err(format!(
                "[{i}].key: empty; allowing every taint is not possible, list the keys"
            ));
        }
        if let Some(e) = &t.effect
            && !matches!(e.as_str(), "NoSchedule" | "PreferNoSchedule" | "NoExecute")
        {
            return Err(format!(
                "[{i}].effect: {e:?} is not NoSchedule, PreferNoSchedule or NoExecute"
            ));
        }
    }
    Ok(list)
}

const DATASTORE_FIX: &str = "use persistentVolumeClaim (a claim in this namespace, bound to a \
     PersistentVolume an administrator made) or volume (a datastore volume the Sendense \
     administrator allows: the chart's datastoreVolumes)";

impl SourcePolicy {
    /// The volumes of the SourceNode's datastores, or why one is not allowed.
    pub fn datastores(&self, sn: &SourceNode) -> Result<Vec<Datastore>, NotAllowed> {
        self.datastores_for(sn, false)
    }

    /// The datastores' volumes for a restore that writes into them: a claim mounted
    /// read-write (its PersistentVolume decides whether writes work), an allowed volume only
    /// when the administrator marked it `writable`.
    pub fn writable_datastores(&self, sn: &SourceNode) -> Result<Vec<Datastore>, NotAllowed> {
        self.datastores_for(sn, true)
    }

    fn datastores_for(&self, sn: &SourceNode, write: bool) -> Result<Vec<Datastore>, NotAllowed> {
        let ns = sn.namespace().unwrap_or_default();
        let Some(nfs) = &sn.spec.transport.nfs else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (i, ds) in nfs.datastores.iter().enumerate() {
            let field = format!("spec.transport.nfs.datastores[{i}] ({})", ds.name);
            let refused = |what: &str| {
                NotAllowed(format!(
                    "{field}: a {what} volume in a SourceNode is refused (it would let anyone \
                     who may edit SourceNodes mount it through the operator); {DATASTORE_FIX}"
                ))
            };
            if ds.host_path.is_some() {
                return Err(refused("hostPath"));
            }
            if ds.nfs.is_some() {
                return Err(refused("raw nfs"));
            }
            let volume = match (&ds.persistent_volume_claim, &ds.volume) {
                (Some(claim), None) => {
                    let mut claim = claim.clone();
                    if write {
                        claim.read_only = Some(false);
                    }
                    Volume {
                        persistent_volume_claim: Some(claim),
                        ..Default::default()
                    }
                }
                (None, Some(name)) => {
                    let allowed = self
                        .volumes
                        .iter()
                        .find(|v| &v.name == name && open_to(&v.namespaces, &ns));
                    let Some(v) = allowed else {
                        let here: Vec<&str> = self
                            .volumes
                            .iter()
                            .filter(|v| open_to(&v.namespaces, &ns))
                            .map(|v| v.name.as_str())
                            .collect();
                        return Err(NotAllowed(format!(
                            "{field}: volume {name:?} is not a datastore volume the operator \
                             allows in namespace {ns} (the chart's datastoreVolumes); {}",
                            if here.is_empty() {
                                "none is allowed here: ask the Sendense administrator to add it, or use persistentVolumeClaim".to_owned()
                            } else {
                                format!("allowed here: {}", here.join(", "))
                            }
                        )));
                    };
                    if write && !v.writable {
                        return Err(NotAllowed(format!(
                            "{field}: volume {name:?} is not writable for restores; ask the \
                             Sendense administrator to mark it writable (the chart's \
                             datastoreVolumes[].writable), or restore through a SourceNode \
                             whose datastore volume is"
                        )));
                    }
                    let mut nfs = v.nfs.clone();
                    if let Some(n) = nfs.as_mut().filter(|_| write) {
                        n.read_only = Some(false);
                    }
                    Volume {
                        nfs,
                        host_path: v.host_path.clone(),
                        ..Default::default()
                    }
                }
                _ => {
                    return Err(NotAllowed(format!(
                        "{field}: set exactly one of persistentVolumeClaim or volume"
                    )));
                }
            };
            out.push(Datastore {
                name: ds.name.clone(),
                volume,
            });
        }
        Ok(out)
    }

    /// Whether every toleration the SourceNode asks for is allowed in its namespace.
    pub fn placement(&self, sn: &SourceNode) -> Result<(), NotAllowed> {
        let ns = sn.namespace().unwrap_or_default();
        let Some(placement) = &sn.spec.placement else {
            return Ok(());
        };
        for (i, t) in placement.tolerations.iter().enumerate() {
            if !self.tolerates(t, &ns) {
                let what = match (t.key.as_deref(), t.effect.as_deref()) {
                    (None | Some(""), _) => {
                        "a toleration without a key (it tolerates every taint)".to_owned()
                    }
                    (Some(k), Some(e)) if !e.is_empty() => format!("the taint {k}:{e}"),
                    (Some(k), _) => format!("the taint {k} with every effect"),
                };
                return Err(NotAllowed(format!(
                    "spec.placement.tolerations[{i}]: {what} is not one SourceNodes in namespace \
                     {ns} may tolerate (the chart's agentPlacement.allowedTolerations); remove it, \
                     or ask the Sendense administrator to allow it"
                )));
            }
        }
        Ok(())
    }

    fn tolerates(&self, t: &Toleration, ns: &str) -> bool {
        let Some(key) = t.key.as_deref().filter(|k| !k.is_empty()) else {
            return false;
        };
        let effect = t.effect.as_deref().filter(|e| !e.is_empty());
        self.tolerations.iter().any(|a| {
            a.key == key
                && open_to(&a.namespaces, ns)
                && match (&a.effect, effect) {
                    (None, _) => true,
                    (Some(allowed), Some(asked)) => allowed == asked,
                    // No effect tolerates every effect: wider than one allowed effect.
                    (Some(_), None) => false,
                }
        })
    }

    /// Everything the SourceNode asks of the operator, checked.
    pub fn check(&self, sn: &SourceNode) -> Result<(), NotAllowed> {
        self.datastores(sn)?;
        self.placement(sn)
    }
}

#[cfg(test)]
#[path = "source_policy_tests.rs"]
mod tests;
