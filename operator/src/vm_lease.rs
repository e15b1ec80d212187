//! One job per VM at a time, cluster-wide: before a BackupJob's plan is recorded, and before an
//! in-place RestoreJob writes the VM's disks, the job takes a `coordination.k8s.io` Lease named
//! after the vCenter's identity and the VM's instance UUID, so two SourceNodes (or two
//! namespaces) that reach the same VM through different names or URLs still meet at one Lease.
//! The holder is the job by kind, namespace, name and UID. A job that finds the Lease held by
//! another job that still runs waits (`VMBusy`); a Lease whose holder has ended or is gone is
//! taken over, with the API server's optimistic concurrency deciding between two takers. The
//! holder releases it when it ends.
//!
//! There is no renewal and no expiry: a holder's liveness is its job object, which the API
//! server keeps, not a clock, so an operator that is down for a while loses nothing and a
//! slow job keeps its VM.
//!
//! The usual case costs one request each way: the Lease is created without a read first, and
//! the holder that created it deletes it on the version its create made.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use sendense_crds::backup_job::Phase;
use sendense_crds::{BackupJob, RestoreJob};

use crate::children::{ApiError, Verb, get};

/// Label of every VM Lease, for `kubectl get lease -l sendense.io/vm-lease`.
pub const LEASE_LABEL: &str = "sendense.io/vm-lease";

/// The Lease of a VM: `sendense-vm-<vCenter identity>-<instance UUID>`, lowercased, any
/// character a name may not hold replaced by `-` (a URL host keeps its dots).
pub fn lease_name(vcenter: &str, instance_uuid: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let mut name = format!("sendense-vm-{}-{}", clean(vcenter), clean(instance_uuid));
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_owned()
}

/// Prefix of a RestoreJob's holder identity (a BackupJob's has none, as before RestoreJobs
/// took the Lease).
const RESTORE_PREFIX: &str = "restorejob:";

/// The holder identity of a BackupJob: `<namespace>/<name>/<uid>`.
pub fn holder(job: &BackupJob) -> String {
    format!(
        "{}/{}/{}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.uid().unwrap_or_default()
    )
}

/// The holder identity of a RestoreJob: `restorejob:<namespace>/<name>/<uid>`.
pub fn restore_holder(job: &RestoreJob) -> String {
    format!(
        "{RESTORE_PREFIX}{}/{}/{}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.uid().unwrap_or_default()
    )
}

/// Who holds the VM instead of this job: its kind and namespace/name ("BackupJob ns/x"), for
/// the wait's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBy(pub String);

/// Takes the VM's Lease for the job whose identity is `me` ([`holder`], [`restore_holder`]),
/// or says which running job holds it.
pub async fn acquire(
    client: &Client,
    namespace: &str,
    name: &str,
    me: &str,
    vm: &str,
) -> Result<Result<(), HeldBy>, ApiError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let me = me.to_owned();
    let fresh = || Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(LEASE_LABEL.to_owned(), "true".to_owned())].into()),
            annotations: Some([("sendense.io/vm".to_owned(), vm.to_owned())].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(me.clone()),
            acquire_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    // Created at once when there is none (a VM's Lease goes when its job ends, so this is the
    // usual case: one request); else read, and taken over when its holder has ended.
    let mut tries = 0;
    let existing = loop {
        tries += 1;
        match api.create(&PostParams::default(), &fresh()).await {
            Ok(created) => {
                remember(namespace, name, &me, created.resource_version());
                return Ok(Ok(()));
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(ApiError::new::<Lease>(Verb::Create, namespace, name, e)),
        }
        if let Some(existing) = get::<Lease>(client, namespace, name).await? {
            break existing;
        }
        // Released between the create and the read: created again, twice at most (other
        // jobs taking and releasing it as fast: the next look).
        if tries == 3 {
            return Ok(Err(HeldBy("another job".into())));
        }
    };
    let current = existing
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    if current == me {
        return Ok(Ok(()));
    }
    if let Some(other) = running_holder(client, &current).await? {
        return Ok(Err(HeldBy(other)));
    }
    // The holder ended or is gone: take over, only if nobody changed the Lease meanwhile.
    let mut taken = fresh();
    taken.metadata.resource_version = existing.metadata.resource_version.clone();
    match api.replace(name, &PostParams::default(), &taken).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err(HeldBy("another job".into()))),
        Err(e) => Err(ApiError::new::<Lease>(Verb::Apply, namespace, name, e)),
    }
}

/// The holder (`[restorejob:]<namespace>/<name>/<uid>`) as `BackupJob namespace/name` or
/// `RestoreJob namespace/name` while that job still runs.
async fn running_holder(client: &Client, holder: &str) -> Result<Option<String>, ApiError> {
    let (restore, id) = match holder.strip_prefix(RESTORE_PREFIX) {
        Some(id) => (true, id),
        None => (false, holder),
    };
    let mut parts = id.splitn(3, '/');
    let (Some(ns), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (kind, phase, job_uid) = if restore {
        let Some(job) = get::<RestoreJob>(client, ns, name).await? else {
            return Ok(None);
        };
        let phase = job.status.as_ref().and_then(|s| s.phase);
        ("RestoreJob", phase, job.uid())
    } else {
        let Some(job) = get::<BackupJob>(client, ns, name).await? else {
            return Ok(None);
        };
        let phase = job.status.as_ref().and_then(|s| s.phase);
        ("BackupJob", phase, job.uid())
    };
    let ended = matches!(phase, Some(Phase::Succeeded | Phase::Failed));
    Ok((job_uid.as_deref() == Some(uid) && !ended).then(|| format!("{kind} {ns}/{name}")))
}

/// Leases this process created, by namespace, name and holder: the resourceVersion the create
/// made. Nothing changes a held Lease (no renewal), so a delete on that version removes the
/// holder's own Lease without reading it first; a Lease taken over since has another version
/// and is not removed. A restarted operator has none of this and reads the Lease.
/// Namespace, name, holder.
type LeaseKey = (String, String, String);

static CREATED: LazyLock<Mutex<HashMap<LeaseKey, String>>> = LazyLock::new(Mutex::default);

fn remember(namespace: &str, name: &str, me: &str, version: Option<String>) {
    if let Some(v) = version {
        let key = (namespace.to_owned(), name.to_owned(), me.to_owned());
        CREATED.lock().expect("lock").insert(key, v);
    }
}

/// Releases the Lease when the job `me` holds it (a Lease taken over by another job stays).
pub async fn release(
    client: &Client,
    namespace: &str,
    name: &str,
    me: &str,
) -> Result<(), ApiError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let key = (namespace.to_owned(), name.to_owned(), me.to_owned());
    let created = CREATED.lock().expect("lock").remove(&key);
    if let Some(version) = created {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version),
                uid: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &params).await {
            // Removed, or already gone.
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            // Changed since this process created it: read below.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(ApiError::new::<Lease>(Verb::Delete, namespace, name, e)),
        }
    }
    let Some(existing) = get::<Lease>(client, namespace, name).await? else {
        return Ok(());
    };
    let current = existing
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if current != Some(me) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: existing.metadata.resource_version.clone(),
            uid: existing.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone, or taken over meanwhile: not ours to remove.
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => Ok(()),
        Err(e) => Err(ApiError::new::<Lease>(Verb::Delete, namespace, name, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_lease_is_named_by_vcenter_and_instance_uuid() {
        assert_eq!(
            lease_name(
                "dbed6e0c-bd88-4ef6-b594-21283e1c677f",
                "5029A8F2-1B6C-4C2E-9A55-3F0B7E0D1C2A"
            ),
            "sendense-vm-dbed6e0c-bd88-4ef6-b594-21283e1c677f-5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"
        );
        assert_eq!(
            lease_name("VC.example.com", "u_1"),
            "sendense-vm-vc.example.com-u-1"
        );
        let long = lease_name(&"a".repeat(300), "u");
        assert!(long.len() <= 253 && !long.ends_with('-'));
    }
}
