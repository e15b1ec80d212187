//! Test objects, fluently: `BackupJob::test().named("db").with_status(json!({...}))`. One place
//! for the shapes unit tests start from; each test states only what it changes.

use kube::api::ObjectMeta;
use sendense_crds::{BackupJob, Repository, RestoreJob, RestorePoint, SourceNode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// An object a test starts from.
pub trait TestObject: Sized {
    fn test() -> Self;
}

/// Fluent edits of a test object, through its JSON (as a user would write it).
pub trait Fixture: Serialize + DeserializeOwned + Sized {
    fn edit(self, f: impl FnOnce(&mut Value)) -> Self {
        let mut v = serde_json::to_value(&self).expect("serializable");
        f(&mut v);
        serde_json::from_value(v).expect("the fixture stays a valid object")
    }

    fn named(self, name: &str) -> Self {
        self.edit(|v| v["metadata"]["name"] = json!(name))
    }

    fn in_namespace(self, namespace: &str) -> Self {
        self.edit(|v| v["metadata"]["namespace"] = json!(namespace))
    }

    /// Sets these fields of the spec (each replaced whole).
    fn with_spec(self, fields: Value) -> Self {
        self.edit(|v| {
            if let Value::Object(fields) = fields {
                for (k, val) in fields {
                    v["spec"][k] = val;
                }
            }
        })
    }

    fn with_status(self, status: Value) -> Self {
        self.edit(|v| v["status"] = status)
    }
}

impl Fixture for BackupJob {}
impl Fixture for SourceNode {}
impl Fixture for Repository {}
impl Fixture for RestorePoint {}
impl Fixture for RestoreJob {}

impl TestObject for RestoreJob {
    /// `web-01-r1` in `backups`: restore point `web-01-b2-8f14e45f` onto claims Sendense creates.
    fn test() -> Self {
        parse(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "RestoreJob",
            "metadata": meta("web-01-r1", "r-1"),
            "spec": {"restorePointRef": {"name": "web-01-b2-8f14e45f"}, "target": {"pvc": {}}}
        }))
    }
}

fn parse<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid test object")
}

fn meta(name: &str, uid: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("backups".into()),
        uid: Some(uid.into()),
        generation: Some(1),
        ..Default::default()
    }
}

impl TestObject for BackupJob {
    /// `web-01-b2` in `backups`: VM `web-01` from SourceNode `vc` into Repository `primary`.
    fn test() -> Self {
        parse(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "BackupJob",
            "metadata": meta("web-01-b2", "u-2"),
            "spec": {"vm": {"name": "web-01"}, "sourceNodeRef": {"name": "vc"}, "repositoryRef": {"name": "primary"}}
        }))
    }
}

impl TestObject for SourceNode {
    /// `vc` in `backups`: a thumbprint-pinned vCenter, nfs transport, agents on the `lab` site.
    fn test() -> Self {
        parse(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "SourceNode",
            "metadata": meta("vc", "s-1"),
            "spec": {
                "vcenter": {"url": "https://vc.example.com/sdk", "credentialsSecretRef": {"name": "vc-creds", "usernameKey": "user", "passwordKey": "pass"}, "tls": {"thumbprint": "AA:BB"}},
                "datacenter": "DC1", "transport": {"type": "nfs", "nfs": {"datastores": [{"name": "LocalDS 0", "persistentVolumeClaim": {"claimName": "ds0", "readOnly": true}}]}},
                "placement": {"nodeSelector": {"sendense.io/site": "lab"}}
            }
        }))
    }
}

/// A SourceNode's `spec.vcenter` with other TLS trust.
pub fn with_tls(sn: SourceNode, tls: Value) -> SourceNode {
    sn.edit(|v| v["spec"]["vcenter"]["tls"] = tls)
}

impl TestObject for Repository {
    /// `primary` in `backups`, on the existing claim `backups-data`.
    fn test() -> Self {
        parse(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "Repository",
            "metadata": meta("primary", "r-1"),
            "spec": {"storage": {"persistentVolumeClaim": {"claimName": "backups-data"}}}
        }))
    }
}

impl TestObject for RestorePoint {
    /// `web-01-b1-0000000b` in `backups`: a full backup of VM `web-01` (one disk, 2000) in
    /// Repository `primary`, made by job `web-01-b1`.
    fn test() -> Self {
        parse(json!({
            "apiVersion": "sendense.io/v1alpha1", "kind": "RestorePoint",
            "metadata": meta("web-01-b1-0000000b", "rp-1"),
            "spec": {
                "repositoryRef": {"name": "primary"}, "sourceNodeRef": {"name": "vc"},
                "vcenter": "https://vc.example.com/sdk",
                "vm": {"name": "web-01", "instanceUuid": "5029a8f2-1b6c-4c2e-9a55-3f0b7e0d1c2a"},
                "job": {"name": "web-01-b1", "uid": "0000000b-0000-4000-8000-000000000001", "attempt": 1},
                "mode": "Full", "started": "2026-11-20T00:00:00Z", "completed": "2026-11-20T00:05:00Z",
                "directory": "backups/web-01/web-01-b1-0000000b-0000-4000-8000-000000000001-a1",
                "manifest": "backups/web-01/web-01-b1-0000000b-0000-4000-8000-000000000001-a1/restorepoint.json",
                "bytesWritten": 4096, "size": "4.0 KiB",
                "disks": [{"deviceKey": 2000, "file": "backups/web-01/web-01-b1-0000000b-0000-4000-8000-000000000001-a1/2000.qcow2",
                           "capacityBytes": 1073741824, "copy": "Full", "changeIdReached": "52 aa/1",
                           "bytesWritten": 4096, "sha256": ""}]
            }
        }))
    }
}
