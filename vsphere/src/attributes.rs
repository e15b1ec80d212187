//! vCenter's Custom Attributes on VMs: field definitions kept by the CustomFieldsManager (a
//! key, a name, the managed object type they apply to, or none for all), values kept on each
//! entity (`customValue`: key and string value).

use std::collections::{BTreeMap, HashMap};

use vim_rs::mo::CustomFieldsManager;
use vim_rs::types::boxed_types::ValueElements;
use vim_rs::types::structs::{CustomFieldDef, CustomFieldStringValue, ManagedObjectReference};
use vim_rs::types::traits::CustomFieldValueTrait;
use vim_rs::types::vim_any::VimAny;

use super::props::Props;
use super::vms::{invalid, vm_not_found};
use super::{VSphere, VSphereError, VmRef};

const VM_TYPE: &str = "VirtualMachine";

/// Whether a field definition applies to VMs: made for them, or for every type.
fn applies_to_vms(def: &CustomFieldDef) -> bool {
    matches!(
        def.managed_object_type.as_deref(),
        None | Some("") | Some(VM_TYPE)
    )
}

/// The names of the fields that apply to VMs, by key.
pub(super) fn vm_field_names(defs: &[CustomFieldDef]) -> HashMap<i32, String> {
    defs.iter()
        .filter(|d| applies_to_vms(d))
        .map(|d| (d.key, d.name.clone()))
        .collect()
}

/// A VM's `customValue` as field name -> value; values of keys `names` does not hold (fields
/// of other types, or removed since) are left out.
pub(super) fn vm_attributes(
    values: &[Box<dyn CustomFieldValueTrait>],
    names: &HashMap<i32, String>,
) -> BTreeMap<String, String> {
    values
        .iter()
        .filter_map(|v| {
            let name = names.get(&v.get_custom_field_value().key)?;
            // CustomFieldStringValue is the only kind of value vSphere has.
            let value = v.as_any_ref().downcast_ref::<CustomFieldStringValue>()?;
            Some((name.clone(), value.value.clone()))
        })
        .collect()
}

/// The CustomFieldsManager's `field` property of `props` (absent: no fields defined).
pub(super) fn field_defs(props: &mut Props) -> Result<Vec<CustomFieldDef>, VSphereError> {
    match props.value("field") {
        None => Ok(Vec::new()),
        Some(VimAny::Value(ValueElements::ArrayOfCustomFieldDef(defs))) => Ok(defs),
        Some(other) => Err(props.unexpected("field", &other)),
    }
}

/// A VM's `customValue` property of `props` (absent: no values set).
pub(super) fn custom_values(
    props: &mut Props,
) -> Result<Vec<Box<dyn CustomFieldValueTrait>>, VSphereError> {
    match props.value("customValue") {
        None => Ok(Vec::new()),
        Some(VimAny::Value(ValueElements::ArrayOfCustomFieldValue(values))) => Ok(values),
        Some(other) => Err(props.unexpected("customValue", &other)),
    }
}

impl VSphere {
    /// Sets the custom attribute `name` of a VM to `value` (`SetField`), first defining the
    /// field for VMs (`AddCustomFieldDef`) when no field of that name applies to VMs yet.
    pub async fn set_custom_attribute(
        &self,
        vm: &VmRef,
        name: &str,
        value: &str,
    ) -> Result<(), VSphereError> {
        if name.is_empty() {
            return Err(invalid("AddCustomFieldDef", "the attribute name is empty"));
        }
        let cfm = self.custom_fields_manager()?;
        let cfm = &cfm;
        let key = match self.vm_field_key(cfm, name).await? {
            Some(key) => key,
            None => {
                let added = self
                    .call("AddCustomFieldDef", || async move {
                        CustomFieldsManager::new(self.handle(), &cfm.value)
                            .add_custom_field_def(name, Some(VM_TYPE), None, None)
                            .await
                    })
                    .await;
                match added {
                    Ok(def) => {
                        tracing::info!(
                            field = name,
                            key = def.key,
                            "defined a VM custom attribute"
                        );
                        def.key
                    }
                    // Defined meanwhile by someone else: theirs will do.
                    Err(e) if e.fault_type() == Some("DuplicateName") => {
                        self.vm_field_key(cfm, name).await?.ok_or(e)?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let entity = &vm.mor();
        self.call("SetField", || async move {
            CustomFieldsManager::new(self.handle(), &cfm.value)
                .set_field(entity, key, value)
                .await
        })
        .await
        .map_err(|e| match e {
            VSphereError::NotFound(_) => vm_not_found(vm),
            e => e,
        })
    }

    pub(super) fn custom_fields_manager(&self) -> Result<ManagedObjectReference, VSphereError> {
        self.client
            .service_content()
            .custom_fields_manager
            .clone()
            .ok_or_else(|| VSphereError::Fault {
                method: "AddCustomFieldDef".to_string(),
                fault: "NotSupported".to_string(),
                message: "the server has no CustomFieldsManager (custom attributes are a \
                          vCenter feature; is this an ESXi host?)"
                    .to_string(),
            })
    }

    /// The key of the field named `name` that applies to VMs, if defined.
    async fn vm_field_key(
        &self,
        cfm: &ManagedObjectReference,
        name: &str,
    ) -> Result<Option<i32>, VSphereError> {
        let Some(mut props) = self.properties(cfm, &["field"]).await? else {
            return Ok(None);
        };
        Ok(field_defs(&mut props)?
            .iter()
            .find(|d| d.name == name && applies_to_vms(d))
            .map(|d| d.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vim_rs::types::structs::CustomFieldValue;

    fn def(key: i32, name: &str, kind: Option<&str>) -> CustomFieldDef {
        CustomFieldDef {
            key,
            name: name.into(),
            r#type: kind.unwrap_or_default().into(),
            managed_object_type: kind.map(String::from),
            field_def_privileges: None,
            field_instance_privileges: None,
        }
    }

    fn value(key: i32, value: &str) -> Box<dyn CustomFieldValueTrait> {
        Box::new(CustomFieldStringValue {
            custom_field_value_: CustomFieldValue { key },
            value: value.into(),
        })
    }

    #[test]
    fn attributes_are_named_by_fields_that_apply_to_vms_only() {
        let names = vm_field_names(&[
            def(1, "backup", Some("VirtualMachine")),
            def(2, "owner", None),
            def(3, "rack", Some("HostSystem")),
            def(4, "tier", Some("")),
        ]);
        let values = [
            value(1, "nightly"),
            value(2, "team-a"),
            value(3, "r12"),
            value(4, "gold"),
            value(9, "field removed since"),
        ];
        let attributes = vm_attributes(&values, &names);
        let expected: BTreeMap<String, String> =
            [("backup", "nightly"), ("owner", "team-a"), ("tier", "gold")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(attributes, expected);
    }
}
