//! Reading managed-object properties through the PropertyCollector: only the paths asked for,
//! typed on the way out.

use std::collections::HashMap;

use vim_rs::mo::ViewManager;
use vim_rs::types::boxed_types::ValueElements;
use vim_rs::types::enums::MoTypesEnum;
use vim_rs::types::structs::{
    ManagedObjectReference, ObjectContent, ObjectSpec, PropertyFilterSpec, PropertySpec,
    SelectionSpec, TraversalSpec,
};
use vim_rs::types::vim_any::VimAny;

use super::collector::retrieve_properties;
use super::error::not_authenticated;
use super::{VSphere, VSphereError};

/// The properties of one object that the server returned (unset ones are absent).
pub(super) struct Props {
    pub obj: ManagedObjectReference,
    values: HashMap<String, VimAny>,
}

impl Props {
    fn from_content(content: ObjectContent) -> Props {
        let values = content
            .prop_set
            .into_iter()
            .flatten()
            .map(|p| (p.name, p.val))
            .collect();
        Props {
            obj: content.obj,
            values,
        }
    }

    pub(super) fn unexpected(&self, path: &str, got: &VimAny) -> VSphereError {
        VSphereError::Transport(format!(
            "unexpected value for {} {} property {path}: {}",
            self.obj.r#type.as_str(),
            self.obj.value,
            vim_rs::core::pc_helpers::type_name(got)
        ))
    }

    pub fn string(&mut self, path: &str) -> Result<Option<String>, VSphereError> {
        match self.values.remove(path) {
            None => Ok(None),
            Some(VimAny::Value(ValueElements::PrimitiveString(s))) => Ok(Some(s)),
            Some(other) => Err(self.unexpected(path, &other)),
        }
    }

    pub fn boolean(&mut self, path: &str) -> Result<Option<bool>, VSphereError> {
        match self.values.remove(path) {
            None => Ok(None),
            Some(VimAny::Value(ValueElements::PrimitiveBoolean(b))) => Ok(Some(b)),
            Some(other) => Err(self.unexpected(path, &other)),
        }
    }

    /// An integer property (`int`, `long` or `short` on the wire).
    pub fn integer(&mut self, path: &str) -> Result<Option<i64>, VSphereError> {
        match self.values.remove(path) {
            None => Ok(None),
            Some(VimAny::Value(ValueElements::PrimitiveInt(i))) => Ok(Some(i64::from(i))),
            Some(VimAny::Value(ValueElements::PrimitiveLong(i))) => Ok(Some(i)),
            Some(VimAny::Value(ValueElements::PrimitiveShort(i))) => Ok(Some(i64::from(i))),
            Some(other) => Err(self.unexpected(path, &other)),
        }
    }

    /// A managed object reference property (e.g. a datacenter's `vmFolder`).
    pub fn moref(&mut self, path: &str) -> Result<Option<ManagedObjectReference>, VSphereError> {
        self.object::<ManagedObjectReference>(path)
    }

    /// A data object property of type `T` (e.g. `VirtualMachineSnapshotInfo`).
    pub fn object<T: 'static>(&mut self, path: &str) -> Result<Option<T>, VSphereError> {
        match self.values.remove(path) {
            None => Ok(None),
            Some(VimAny::Object(o)) => match o.as_any_box().downcast::<T>() {
                Ok(t) => Ok(Some(*t)),
                Err(_) => Err(VSphereError::Transport(format!(
                    "unexpected data object for {} {} property {path}",
                    self.obj.r#type.as_str(),
                    self.obj.value
                ))),
            },
            Some(other) => Err(self.unexpected(path, &other)),
        }
    }

    /// Any other value, for the caller to match.
    pub fn value(&mut self, path: &str) -> Option<VimAny> {
        self.values.remove(path)
    }
}

pub(super) fn moref(kind: MoTypesEnum, value: &str) -> ManagedObjectReference {
    ManagedObjectReference {
        r#type: kind,
        value: value.to_string(),
    }
}

fn prop_spec(kind: &MoTypesEnum, paths: &[&str]) -> PropertySpec {
    PropertySpec {
        r#type: kind.as_str().to_string(),
        all: Some(false),
        path_set: Some(paths.iter().map(|p| p.to_string()).collect()),
    }
}

impl VSphere {
    /// Every object `spec` selects, in one `RetrieveProperties` call.
    ///
    /// Not `RetrievePropertiesEx`: the simulator answers it with an empty `returnval` (which
    /// vim_rs cannot parse) when nothing matches, and with nothing at all for a deleted object
    /// where vCenter faults ManagedObjectNotFound; `RetrieveProperties` behaves the same on
    /// both. It has no paging, so a large inventory comes back in one answer: name-sized
    /// properties only for container searches.
    async fn retrieve(&self, spec: &PropertyFilterSpec) -> Result<Vec<Props>, VSphereError> {
        let found = self
            .call("RetrieveProperties", || async move {
                let (found, missing) = retrieve_properties(&*self.client, spec).await?;
                for m in &missing {
                    // The simulator's way of saying the session is gone: log in again.
                    if m.fault == "NotAuthenticated" {
                        return Err(not_authenticated());
                    }
                    tracing::debug!(path = %m.path, fault = %m.fault, "property not returned");
                }
                Ok(found)
            })
            .await?;
        Ok(found.into_iter().map(Props::from_content).collect())
    }

    /// The `paths` of one object; `None` when the object does not exist.
    pub(super) async fn properties(
        &self,
        obj: &ManagedObjectReference,
        paths: &[&str],
    ) -> Result<Option<Props>, VSphereError> {
        let spec = PropertyFilterSpec {
            prop_set: vec![prop_spec(&obj.r#type, paths)],
            object_set: vec![ObjectSpec {
                obj: obj.clone(),
                skip: Some(false),
                select_set: None,
            }],
            report_missing_objects_in_results: None,
        };
        match self.retrieve(&spec).await {
            Ok(found) => Ok(found.into_iter().find(|p| p.obj.value == obj.value)),
            Err(VSphereError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The `paths` of every object of `kind` under `container` (recursively), through a
    /// ContainerView that is destroyed afterwards.
    pub(super) async fn properties_in_container(
        &self,
        container: &ManagedObjectReference,
        kind: MoTypesEnum,
        paths: &[&str],
    ) -> Result<Vec<Props>, VSphereError> {
        self.sweep(container, &[(kind, paths)], &[]).await
    }

    /// In one `RetrieveProperties` call: the paths of every object of each kind in `kinds`
    /// under `container` (recursively, through a ContainerView destroyed afterwards), and the
    /// paths of each of `others` beside them. Paths asked for one type apply to every object
    /// of that type read here.
    pub(super) async fn sweep(
        &self,
        container: &ManagedObjectReference,
        kinds: &[(MoTypesEnum, &[&str])],
        others: &[(&ManagedObjectReference, &[&str])],
    ) -> Result<Vec<Props>, VSphereError> {
        match self.properties_in_view(container, kinds, others).await {
            // Views die with their session: after a re-login between creating the view and
            // reading it, the view is gone. That is no answer about the inventory: once more.
            Err(VSphereError::NotFound(why)) => {
                tracing::debug!(%why, "container view vanished; retrying with a new one");
                self.properties_in_view(container, kinds, others)
                    .await
                    .map_err(|e| match e {
                        VSphereError::NotFound(why) => VSphereError::Transport(format!(
                            "a ContainerView vanished while being read: {why}"
                        )),
                        e => e,
                    })
            }
            other => other,
        }
    }

    async fn properties_in_view(
        &self,
        container: &ManagedObjectReference,
        kinds: &[(MoTypesEnum, &[&str])],
        others: &[(&ManagedObjectReference, &[&str])],
    ) -> Result<Vec<Props>, VSphereError> {
        let view_manager = self
            .client
            .service_content()
            .view_manager
            .clone()
            .ok_or_else(|| VSphereError::Transport("the server has no ViewManager".into()))?;
        let view_manager = &view_manager;
        let type_names: Vec<String> = kinds.iter().map(|(k, _)| k.as_str().to_string()).collect();
        let type_names = &type_names;
        let view = self
            .call("CreateContainerView", || async move {
                ViewManager::new(self.handle(), &view_manager.value)
                    .create_container_view(container, Some(type_names), true)
                    .await
            })
            .await?;
        let view = &view;
        // One PropertySpec per type, the paths of every entry of that type merged.
        let mut prop_set: Vec<PropertySpec> = Vec::new();
        let entries = kinds
            .iter()
            .map(|(kind, paths)| (kind, *paths))
            .chain(others.iter().map(|(obj, paths)| (&obj.r#type, *paths)));
        for (kind, paths) in entries {
            match prop_set.iter_mut().find(|p| p.r#type == kind.as_str()) {
                Some(spec) => {
                    let set = spec.path_set.get_or_insert_with(Vec::new);
                    for path in paths {
                        if !set.iter().any(|p| p == path) {
                            set.push(path.to_string());
                        }
                    }
                }
                None => prop_set.push(prop_spec(kind, paths)),
            }
        }
        let mut object_set = vec![ObjectSpec {
            obj: view.clone(),
            skip: Some(true),
            select_set: Some(vec![Box::new(TraversalSpec {
                selection_spec_: SelectionSpec {
                    name: Some("traverseView".to_string()),
                },
                r#type: view.r#type.as_str().to_string(),
                path: "view".to_string(),
                skip: Some(false),
                select_set: None,
            })]),
        }];
        object_set.extend(others.iter().map(|(obj, _)| ObjectSpec {
            obj: (*obj).clone(),
            skip: Some(false),
            select_set: None,
        }));
        let spec = PropertyFilterSpec {
            prop_set,
            object_set,
            report_missing_objects_in_results: None,
        };
        let result = self.retrieve(&spec).await;
        let destroyed = self
            .call("DestroyView", || async move {
                vim_rs::mo::ContainerView::new(self.handle(), &view.value)
                    .destroy_view()
                    .await
            })
            .await;
        if let Err(e) = destroyed {
            tracing::warn!(view = %view.value, error = %e, "could not destroy a ContainerView");
        }
        result
    }
}
