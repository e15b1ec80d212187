//! Reading and writing the operator's objects through the API server: server-side apply of
//! children under one field manager, idempotent deletes, and a failed call as an error naming
//! the object it concerned. Every controller goes through here, so the API server sees one
//! manager for everything Sendense owns.

use std::fmt;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::resources::service_account;

/// Field manager of everything the operator writes (objects and status).
pub const MANAGER: &str = "sendense-operator";

/// A namespaced Kubernetes object the operator reads or writes.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + fmt::Debug
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + fmt::Debug
{
}

/// What a failed API call was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Read,
    List,
    Apply,
    Create,
    Delete,
    WriteStatus,
    Annotate,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Read => "reading",
            Verb::List => "listing",
            Verb::Apply => "applying",
            Verb::Create => "creating",
            Verb::Delete => "deleting",
            Verb::WriteStatus => "writing the status of",
            Verb::Annotate => "annotating",
        })
    }
}

/// A call to the API server that failed, and the object (or list) it concerned.
#[derive(Debug, thiserror::Error)]
#[error("{verb} {kind} {namespace}/{name}: {source}")]
pub struct ApiError {
    pub verb: Verb,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

impl ApiError {
    pub fn new<K: Resource<DynamicType = ()>>(
        verb: Verb,
        namespace: &str,
        name: &str,
        source: kube::Error,
    ) -> Self {
        Self {
            verb,
            kind: K::kind(&()).into_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        }
    }
}

impl ApiError {
    /// When the API server refused to create or change the object itself: its message. That is
    /// an admission refusal (a ResourceQuota, Pod Security admission, a policy webhook, RBAC)
    /// or a validation error; it does not pass by retrying the same request soon, so it belongs
    /// in a condition a person reads, not only in the log. None for other failures
    /// (connection, timeout, conflict, server error), which are retried.
    pub fn refusal(&self) -> Option<&str> {
        match (&self.verb, &self.source) {
            (Verb::Apply | Verb::Create, kube::Error::Api(s))
                if matches!(s.code, 400 | 403 | 422) =>
            {
                Some(&s.message)
            }
            _ => None,
        }
    }
}

pub fn api<K: Namespaced>(client: &Client, namespace: &str) -> Api<K> {
    Api::namespaced(client.clone(), namespace)
}

/// Reads an object; None when it does not exist.
pub async fn get<K: Namespaced>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<K>, ApiError> {
    api::<K>(client, namespace)
        .get_opt(name)
        .await
        .map_err(|e| ApiError::new::<K>(Verb::Read, namespace, name, e))
}

/// True when the API server's copy of `object` is the version the caller holds. A controller's
/// cache can trail the operator's own last write: a reconcile on the older copy must not create
/// what that write made unnecessary (a job's hub again after the job Succeeded and its pods
/// were deleted). Checked just before a pod is created; the newer version's watch event
/// brings the next reconcile.
pub async fn is_current<K: Namespaced>(client: &Client, object: &K) -> Result<bool, ApiError> {
    let ns = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let live = api::<K>(client, &ns)
        .get_metadata_opt(&name)
        .await
        .map_err(|e| ApiError::new::<K>(Verb::Read, &ns, &name, e))?;
    Ok(live.is_some_and(|l| {
        l.metadata.resource_version.is_some()
            && l.metadata.resource_version == object.meta().resource_version
    }))
}

/// Every object of a kind in a namespace.
pub async fn list<K: Namespaced>(client: &Client, namespace: &str) -> Result<Vec<K>, ApiError> {
    api::<K>(client, namespace)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| ApiError::new::<K>(Verb::List, namespace, "*", e))
}

/// Server-side apply of `object`, forcing ownership: the operator is the only writer of its
/// children.
pub async fn apply<K: Namespaced>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<(), ApiError> {
    applied(client, namespace, object).await.map(|_| ())
}

/// As `apply`, returning the object as the API server stored it (its UID, for one).
pub async fn applied<K: Namespaced>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<K, ApiError> {
    let name = object.name_any();
    api::<K>(client, namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|e| ApiError::new::<K>(Verb::Apply, namespace, &name, e))
}

/// Creates `object` when no object of its name exists; never changes an existing one (a claim
/// or ServiceAccount a person may have edited).
pub async fn create_if_missing<K: Namespaced>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<(), ApiError> {
    let name = object.name_any();
    if get::<K>(client, namespace, &name).await?.is_none() {
        api::<K>(client, namespace)
            .patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(object))
            .await
            .map_err(|e| ApiError::new::<K>(Verb::Create, namespace, &name, e))?;
    }
    Ok(())
}

/// Deletes an object; true when it existed.
pub async fn delete_if_present<K: Namespaced>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<bool, ApiError> {
    match api::<K>(client, namespace)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(ApiError::new::<K>(Verb::Delete, namespace, name, e)),
    }
}

/// Sets one annotation of the object of `uid` (a merge patch; the UID is its precondition, so an
/// object of the same name created since is left alone). False when no such object exists.
pub async fn annotate<K: Namespaced>(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: &str,
    (key, value): (&str, &str),
) -> Result<bool, ApiError> {
    let patch = serde_json::json!({"metadata": {"uid": uid, "annotations": {key: value}}});
    match api::<K>(client, namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(ApiError::new::<K>(Verb::Annotate, namespace, name, e)),
    }
}

/// Deletes an object at once, without waiting for its kubelet (grace period 0): for a pod whose
/// node no longer answers, which would otherwise stay Terminating for good.
pub async fn force_delete<K: Namespaced>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    match api::<K>(client, namespace).delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ApiError::new::<K>(Verb::Delete, namespace, name, e)),
    }
}

/// Creates the ServiceAccount hub-side or agent pods run as when it is missing (`None`: the
/// pods use the namespace's default account, nothing to create).
pub async fn ensure_service_account(
    client: &Client,
    namespace: &str,
    name: Option<&str>,
) -> Result<(), ApiError> {
    let Some(name) = name else { return Ok(()) };
    create_if_missing::<ServiceAccount>(client, namespace, &service_account(namespace, name)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::core::Status;

    fn failed(verb: Verb, code: u16, message: &str) -> ApiError {
        let status = Status::failure(message, "Forbidden").with_code(code);
        ApiError::new::<Pod>(verb, "ns", "job-hub", kube::Error::Api(status.boxed()))
    }

    #[test]
    fn an_admission_refusal_of_a_write_is_told_apart_from_passing_failures() {
        let quota = "pods \"job-hub\" is forbidden: exceeded quota: pods, requested: pods=1";
        assert_eq!(failed(Verb::Apply, 403, quota).refusal(), Some(quota));
        assert_eq!(
            failed(Verb::Create, 422, "invalid").refusal(),
            Some("invalid")
        );
        // Reading is not refused admission; conflicts, throttling and server errors pass.
        assert_eq!(failed(Verb::Read, 403, "no").refusal(), None);
        for code in [409, 429, 500, 503] {
            assert_eq!(failed(Verb::Apply, code, "x").refusal(), None, "{code}");
        }
    }
}
