//! Test objects, fluently: `BackupJob::test().named("db").with_status(json!({...}))`. One place
//! for the shapes unit tests start from; each test states only what it changes.

use kube::api::ObjectMeta;
use sendense_crds::{BackupJob, Repository, SourceNode};
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
                "datacenter": "DC1", "transport": {"type": "nfs", "nfs": {"datastores": [{"name": "LocalDS 0", "hostPath": {"path": "/srv/ds0"}}]}},
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
