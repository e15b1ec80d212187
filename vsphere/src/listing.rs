//! Every VM of a datacenter with what a backup schedule selects VMs by: name, VM folder,
//! custom attributes; and whether it is a template, and its power state.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use vim_rs::types::enums::MoTypesEnum;
use vim_rs::types::structs::ManagedObjectReference;

use super::attributes::{custom_values, field_defs, vm_attributes, vm_field_names};
use super::vms::power_state_value;
use super::{PowerState, VSphere, VSphereError, VmRef};

/// A VM as a backup schedule sees it when it selects VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListing {
    pub vm: VmRef,
    /// Inventory path of the VM's folder below the datacenter's VM folder, '/'-separated: ""
    /// for the VM folder itself, "prod/web" for folder "web" in folder "prod". Names are
    /// escaped as in vCenter's inventory paths, so a '/' always separates folders: '/' as
    /// "%2f", '\' as "%5c", '%' as "%25". vCenter (and the simulator) store and return names
    /// escaped that way already ("a/b" is named "a%2fb"); they pass unchanged, and a raw '/',
    /// '\' or lone '%' from a server that does not escape is escaped here. A VM in a vApp is
    /// listed with the vApp's path ("prod/shop-vapp").
    pub folder: String,
    /// Custom attribute name -> this VM's value, for the fields defined for VMs (or for all
    /// types) that the VM has a value of.
    pub attributes: BTreeMap<String, String>,
    /// `config.template`: templates cannot be backed up like VMs; callers skip them.
    pub template: bool,
    pub power: PowerState,
}

const VM_PATHS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.template",
    "parent",
    "parentVApp",
    "customValue",
    "runtime.powerState",
];
const FOLDER_PATHS: &[&str] = &["name", "parent"];
const VAPP_PATHS: &[&str] = &["name", "parentFolder", "parentVApp"];

/// A folder or vApp: what VM folder paths are made of.
#[derive(Debug)]
struct Container {
    name: String,
    /// The folder or vApp it is in (by moref value; these are unique across types).
    parent: Option<String>,
}

/// A VM as read, before its folder and attributes are resolved.
struct VmRow {
    vm: VmRef,
    container: Option<String>,
    template: bool,
    power: Option<PowerState>,
    values: Vec<Box<dyn vim_rs::types::traits::CustomFieldValueTrait>>,
}

impl VSphere {
    /// Every VM and template of the datacenter, sorted by folder then name: in one
    /// `RetrieveProperties` over a view of the datacenter, the VMs, folders and vApps, the
    /// datacenter's VM folder and the custom field definitions (after the datacenter lookup).
    /// What it returns is the inventory at the time of the call; evaluate it for each run.
    pub async fn list_vms(&self, datacenter: &str) -> Result<Vec<VmListing>, VSphereError> {
        let dc = self.find_datacenter(datacenter).await?;
        // Absent on an ESXi host: no custom attributes there.
        let cfm = self.custom_fields_manager().ok();
        let mut others: Vec<(&ManagedObjectReference, &[&str])> = vec![(&dc, &["vmFolder"])];
        if let Some(cfm) = &cfm {
            others.push((cfm, &["field"]));
        }
        let found = self
            .sweep(
                &dc,
                &[
                    (MoTypesEnum::VirtualMachine, VM_PATHS),
                    (MoTypesEnum::Folder, FOLDER_PATHS),
                    (MoTypesEnum::VirtualApp, VAPP_PATHS),
                ],
                &others,
            )
            .await?;

        let mut vm_folder = None;
        let mut defs = Vec::new();
        let mut containers = HashMap::new();
        let mut rows = Vec::new();
        for mut props in found {
            let id = props.obj.value.clone();
            match props.obj.r#type {
                MoTypesEnum::Datacenter if id == dc.value => {
                    vm_folder = props.moref("vmFolder")?.map(|f| f.value);
                }
                MoTypesEnum::CustomFieldsManager => defs = field_defs(&mut props)?,
                MoTypesEnum::Folder => {
                    let container = Container {
                        name: props.string("name")?.unwrap_or_default(),
                        parent: props.moref("parent")?.map(|p| p.value),
                    };
                    containers.insert(id, container);
                }
                MoTypesEnum::VirtualApp => {
                    let in_folder = props.moref("parentFolder")?;
                    let in_vapp = props.moref("parentVApp")?;
                    let container = Container {
                        name: props.string("name")?.unwrap_or_default(),
                        parent: in_folder.or(in_vapp).map(|p| p.value),
                    };
                    containers.insert(id, container);
                }
                MoTypesEnum::VirtualMachine => {
                    let in_folder = props.moref("parent")?;
                    let in_vapp = props.moref("parentVApp")?;
                    rows.push(VmRow {
                        vm: VmRef {
                            name: props.string("name")?.unwrap_or_default(),
                            instance_uuid: props.string("config.instanceUuid")?.unwrap_or_default(),
                            moref: id,
                        },
                        container: in_folder.or(in_vapp).map(|p| p.value),
                        template: props.boolean("config.template")?.unwrap_or(false),
                        power: power_state_value(props.value("runtime.powerState")),
                        values: custom_values(&mut props)?,
                    });
                }
                _ => {}
            }
        }
        let vm_folder = vm_folder.ok_or_else(|| {
            VSphereError::Transport(format!("datacenter {datacenter:?} has no vmFolder"))
        })?;
        let names = vm_field_names(&defs);

        let mut listed = Vec::with_capacity(rows.len());
        for row in rows {
            let vm = row.vm;
            let folder = row
                .container
                .as_deref()
                .and_then(|c| folder_path(&containers, &vm_folder, c))
                .ok_or_else(|| {
                    VSphereError::Transport(format!(
                        "VM {} ({}) in datacenter {datacenter:?} is in no folder or vApp below \
                         the datacenter's VM folder",
                        vm.name, vm.moref
                    ))
                })?;
            let power = row.power.ok_or_else(|| {
                VSphereError::Transport(format!(
                    "VM {} ({}) has no readable runtime.powerState",
                    vm.name, vm.moref
                ))
            })?;
            listed.push(VmListing {
                attributes: vm_attributes(&row.values, &names),
                folder,
                template: row.template,
                power,
                vm,
            });
        }
        listed.sort_by(|a, b| {
            (&a.folder, &a.vm.name, &a.vm.moref).cmp(&(&b.folder, &b.vm.name, &b.vm.moref))
        });
        Ok(listed)
    }
}

/// The path of container `at` below `root` (the VM folder), escaped names joined with '/';
/// `None` when `at` is not below `root`.
fn folder_path(containers: &HashMap<String, Container>, root: &str, at: &str) -> Option<String> {
    let mut names = Vec::new();
    let mut at = at;
    while at != root {
        // A parent chain longer than the containers there are is a cycle.
        if names.len() > containers.len() {
            return None;
        }
        let container = containers.get(at)?;
        names.push(escape_name(&container.name));
        at = container.parent.as_deref()?;
    }
    names.reverse();
    Some(names.join("/"))
}

/// An inventory name escaped as vCenter escapes names in inventory paths (and in the names its
/// API returns): '/' -> "%2f", '\' -> "%5c", and '%' -> "%25" unless it starts an escape
/// ('%' and two hex digits). Names vCenter or the simulator returned are escaped already and
/// come back unchanged.
pub(super) fn escape_name(name: &str) -> Cow<'_, str> {
    let bytes = name.as_bytes();
    let escape_at = |i: usize| match bytes[i] {
        b'/' | b'\\' => true,
        b'%' => {
            !(i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit())
        }
        _ => false,
    };
    if !(0..bytes.len()).any(escape_at) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for (i, c) in name.char_indices() {
        match c {
            '/' => out.push_str("%2f"),
            '\\' => out.push_str("%5c"),
            '%' if escape_at(i) => out.push_str("%25"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containers(entries: &[(&str, &str, Option<&str>)]) -> HashMap<String, Container> {
        entries
            .iter()
            .map(|(id, name, parent)| {
                (
                    id.to_string(),
                    Container {
                        name: name.to_string(),
                        parent: parent.map(String::from),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn folder_paths_are_relative_to_the_vm_folder() {
        let c = containers(&[
            ("group-v1", "vm", Some("datacenter-2")),
            ("group-v10", "prod", Some("group-v1")),
            ("group-v11", "web", Some("group-v10")),
            ("resgroup-v20", "shop", Some("group-v10")),
            ("group-h4", "host", Some("datacenter-2")),
        ]);
        let path = |at| folder_path(&c, "group-v1", at);
        assert_eq!(path("group-v1").as_deref(), Some(""));
        assert_eq!(path("group-v10").as_deref(), Some("prod"));
        assert_eq!(path("group-v11").as_deref(), Some("prod/web"));
        // A vApp in a folder.
        assert_eq!(path("resgroup-v20").as_deref(), Some("prod/shop"));
        // Not below the VM folder, or unknown.
        assert_eq!(path("group-h4"), None);
        assert_eq!(path("group-v99"), None);
    }

    #[test]
    fn a_parent_cycle_is_no_path() {
        let c = containers(&[
            ("group-v10", "a", Some("group-v11")),
            ("group-v11", "b", Some("group-v10")),
        ]);
        assert_eq!(folder_path(&c, "group-v1", "group-v10"), None);
    }

    #[test]
    fn names_are_escaped_as_in_vcenter_inventory_paths() {
        let c = containers(&[
            ("group-v10", "a/b", Some("group-v1")),
            ("group-v11", "50%", Some("group-v10")),
        ]);
        assert_eq!(
            folder_path(&c, "group-v1", "group-v11").as_deref(),
            Some("a%2fb/50%25")
        );
        assert_eq!(escape_name("plain"), "plain");
        assert!(matches!(escape_name("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_name(r"dom\user"), "dom%5cuser");
        // Already escaped, as vCenter returns names: unchanged.
        assert_eq!(escape_name("a%2fb"), "a%2fb");
        assert_eq!(escape_name("a%2Fb%25"), "a%2Fb%25");
        assert_eq!(escape_name("%zz%4"), "%25zz%254");
        assert_eq!(escape_name("é/%"), "é%2f%25");
    }
}
