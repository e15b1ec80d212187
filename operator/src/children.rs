//! Writing the operator's children (pods, Services, claims, ServiceAccounts): server-side apply
//! under one field manager, and idempotent deletes. Every controller writes through here, so the
//! API server sees one manager for everything Sendense owns.

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::resources::service_account;

/// Field manager of everything the operator writes (objects and status).
pub const MANAGER: &str = "sendense-operator";

/// Server-side apply of `object` in `namespace`, forcing ownership: the operator is the only
/// writer of its children.
pub async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &object.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
    Ok(())
}

/// Creates `object` when no object of its name exists; never changes an existing one (a claim
/// or ServiceAccount a person may have edited).
pub async fn create_if_missing<K>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let name = object.name_any();
    if api.get_opt(&name).await?.is_none() {
        api.patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(object))
            .await?;
    }
    Ok(())
}

/// Deletes an object; true when it existed.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the ServiceAccount hub-side or agent pods run as when it is missing (`None`: the
/// pods use the namespace's default account, nothing to create).
pub async fn ensure_service_account(
    client: &Client,
    namespace: &str,
    name: Option<&str>,
) -> Result<(), kube::Error> {
    let Some(name) = name else { return Ok(()) };
    create_if_missing::<ServiceAccount>(client, namespace, &service_account(namespace, name)).await
}
