//! API types of Sendense (`sendense.io/v1alpha1`): the custom resources users apply and the
//! operator reconciles. Doc comments on fields become the CRD schema's descriptions, so they are
//! written for the person running `kubectl explain`.
//!
//! Validation lives in the schema (OpenAPI bounds and patterns, CEL rules) so that bad input is
//! rejected at admission with a message naming the field, never discovered by a reconciler.

// kube's derive takes one `printcolumn(...)` per column, each with its own `type_ = "string"`;
// clippy reads those as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod backup_job;
pub mod backup_schedule;
pub mod common;
pub mod conditions;
pub mod repository;
pub mod restore_job;
pub mod restore_point;
pub mod source_node;

pub use backup_job::{BackupJob, BackupJobSpec, BackupJobStatus};
pub use backup_schedule::{BackupSchedule, BackupScheduleSpec, BackupScheduleStatus};
pub use repository::{Repository, RepositorySpec, RepositoryStatus};
pub use restore_job::{RestoreJob, RestoreJobSpec, RestoreJobStatus};
pub use restore_point::{RestorePoint, RestorePointSpec};
pub use source_node::{SourceNode, SourceNodeSpec, SourceNodeStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every Sendense resource.
pub const GROUP: &str = "sendense.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD Sendense installs, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        SourceNode::crd(),
        Repository::crd(),
        BackupJob::crd(),
        RestorePoint::crd(),
        RestoreJob::crd(),
        BackupSchedule::crd(),
    ]
    .into_iter()
    .map(reflow_descriptions)
    .collect()
}

/// Doc comments are wrapped at 100 columns in the source; `kubectl explain` wraps again, so the
/// source line breaks would show as ragged lines. Join lines within a paragraph, keep paragraphs.
fn reflow_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = reflow(text);
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("reflowing descriptions keeps a valid CRD")
}

fn reflow(text: &str) -> String {
    text.split("\n\n")
        .map(|para| para.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The CRDs as one multi-document YAML stream, exactly as committed under `config/crd/bases/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(crd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use std::path::Path;

    /// The committed CRD YAML (config/crd/bases and the Helm chart's crds/) must be exactly what
    /// the types generate: change a type, run `make crds`, commit both.
    #[test]
    fn committed_crds_match_the_types() {
        // At run time: the shared target directory may hold a build made in another clone.
        let root =
            Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..");
        for crd in all_crds() {
            let name = crd.meta().name.clone().expect("CRD has a name");
            let generated = crd_yaml(&crd).expect("CRD serializes");
            for dir in ["config/crd/bases", "charts/sendense/crds"] {
                let path = root.join(dir).join(format!("{name}.yaml"));
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(
                    committed == generated,
                    "{} differs from the types in crds/: run `make crds` and commit",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn reflow_joins_lines_and_keeps_paragraphs() {
        assert_eq!(
            reflow("one\ntwo  three\n\nfour\nfive"),
            "one two three\n\nfour five"
        );
    }

    #[test]
    fn every_kind_is_namespaced_in_sendense_io_v1alpha1() {
        for crd in all_crds() {
            // A RestorePoint is a record: its spec never changes and it has no status.
            let has_status = crd.spec.names.kind != "RestorePoint";
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.len(), 1);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(v.served && v.storage);
            assert_eq!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                has_status,
                "{}",
                crd.spec.names.kind
            );
        }
    }
}
