//! What a restore to vSphere needs: the state of a VM worth recreating, new VMs with empty thin
//! disks (`CreateVM_Task`), their removal (`Destroy_Task`) and a CBT reset after data was
//! written into a VM's flat files behind CBT's back.

use miniserde::json::{Array, Number, Object, Value};
use vim_rs::mo::{Folder, SearchIndex, VirtualMachine};
use vim_rs::types::boxed_types::ValueElements;
use vim_rs::types::enums::{MoTypesEnum, VirtualMachinePowerStateEnum};
use vim_rs::types::structs::{ManagedObjectReference, VirtualMachineConfigSpec};
use vim_rs::types::vim_any::VimAny;

use super::tasks::result_moref;
use super::{VSphere, VSphereError, VmRef, VmSelector};

/// Hardware of a VM worth recreating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    pub num_cpus: i32,
    pub memory_mib: i64,
    /// `config.guestId`, e.g. "otherGuest64", "ubuntu64Guest".
    pub guest_id: String,
    /// "bios" or "efi"; `None` leaves it to vSphere (reading: not reported).
    pub firmware: Option<String>,
}

/// `runtime.powerState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    PoweredOn,
    PoweredOff,
    Suspended,
}

/// What a restore reads of an existing VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    pub power_state: PowerState,
    /// `config.annotation` ("" when unset).
    pub annotation: String,
    pub hardware: Hardware,
}

/// A VM to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVm {
    pub name: String,
    /// Inventory path of a VM folder below the datacenter's VM folder ("restored" or "a/b");
    /// `None`: the datacenter's VM folder.
    pub folder: Option<String>,
    /// A resource pool: a cluster or host name (its root pool; a host in a cluster also pins
    /// the VM to that host), or a path as vCenter's inventory paths spell it below the
    /// datacenter's host folder ("Cluster/Resources/pool", "Cluster/host"); `None`: the first
    /// cluster's (else standalone host's) root pool, by name.
    pub resource_pool: Option<String>,
    /// Datastore name for the VM's files and disks.
    pub datastore: String,
    pub hardware: Hardware,
    /// Capacities in bytes, in order: one thin flat disk each, on one paravirtual SCSI
    /// controller (units 0.. skipping 7, so at most 15). A capacity that is not a whole number
    /// of KiB is rounded up to one (vSphere sizes disks in KiB).
    pub disks: Vec<u64>,
    /// `config.annotation` (Sendense tags VMs it creates with the RestoreJob's UID).
    pub annotation: String,
    /// Turn CBT on in the same spec.
    pub change_tracking: bool,
}

/// The temporary device key of the new SCSI controller in a create spec.
const CONTROLLER_KEY: i64 = -100;
/// Units of one SCSI controller a disk can take: 0..=15 without the controller's own 7.
const MAX_DISKS: usize = 15;

impl VSphere {
    /// Power state, annotation and hardware of a VM.
    pub async fn vm_state(&self, vm: &VmRef) -> Result<VmState, VSphereError> {
        let mut props = self
            .properties(
                &vm.mor(),
                &[
                    "runtime.powerState",
                    "config.annotation",
                    "config.hardware.numCPU",
                    "config.hardware.memoryMB",
                    "config.guestId",
                    "config.firmware",
                ],
            )
            .await?
            .ok_or_else(|| vm_not_found(vm))?;
        let power_state =
            power_state_value(props.value("runtime.powerState")).ok_or_else(|| {
                VSphereError::Transport(format!(
                    "VM {} ({}) has no readable runtime.powerState",
                    vm.name, vm.moref
                ))
            })?;
        let num_cpus = props.integer("config.hardware.numCPU")?.unwrap_or(0);
        Ok(VmState {
            power_state,
            annotation: props.string("config.annotation")?.unwrap_or_default(),
            hardware: Hardware {
                num_cpus: i32::try_from(num_cpus).unwrap_or(0),
                memory_mib: props.integer("config.hardware.memoryMB")?.unwrap_or(0),
                guest_id: props.string("config.guestId")?.unwrap_or_default(),
                firmware: props.string("config.firmware")?.filter(|f| !f.is_empty()),
            },
        })
    }

    /// Creates the VM (`CreateVM_Task` in the folder, pool and datastore), waits for the task
    /// and returns it. A VM of that name already in the datacenter is an error saying so
    /// (`Fault` with `fault = "DuplicateName"`), checked before creating; a folder, pool or
    /// datastore that does not exist is a `NotFound` naming it.
    pub async fn create_vm(&self, datacenter: &str, spec: &NewVm) -> Result<VmRef, VSphereError> {
        if spec.name.is_empty() {
            return Err(invalid("create_vm", "the VM name is empty"));
        }
        if spec.disks.len() > MAX_DISKS {
            return Err(invalid(
                "create_vm",
                &format!(
                    "{} disks asked for; one SCSI controller holds at most {MAX_DISKS}",
                    spec.disks.len()
                ),
            ));
        }
        if let Some(zero) = spec.disks.iter().position(|c| *c == 0) {
            return Err(invalid(
                "create_vm",
                &format!("disk {zero} has a capacity of 0 bytes"),
            ));
        }
        let dc = self.find_datacenter(datacenter).await?;
        match self
            .find_vm(datacenter, &VmSelector::Name(spec.name.clone()))
            .await
        {
            Err(VSphereError::NotFound(_)) => {}
            Err(e @ VSphereError::Fault { .. }) if e.fault_type() == Some("DuplicateName") => {
                return Err(duplicate_vm(&spec.name, datacenter, None));
            }
            Err(e) => return Err(e),
            Ok(existing) => return Err(duplicate_vm(&spec.name, datacenter, Some(&existing))),
        }
        let mut dc_props = self
            .properties(&dc, &["vmFolder", "hostFolder"])
            .await?
            .ok_or_else(|| VSphereError::NotFound(format!("datacenter {datacenter:?}")))?;
        let vm_folder = dc_props.moref("vmFolder")?.ok_or_else(|| {
            VSphereError::Transport(format!("datacenter {datacenter:?} has no vmFolder"))
        })?;
        let host_folder = dc_props.moref("hostFolder")?.ok_or_else(|| {
            VSphereError::Transport(format!("datacenter {datacenter:?} has no hostFolder"))
        })?;
        self.find_datastore(&dc, datacenter, &spec.datastore)
            .await?;
        let folder = match spec
            .folder
            .as_deref()
            .map(str::trim)
            .filter(|f| !f.is_empty())
        {
            None => vm_folder,
            Some(path) => self.find_vm_folder(&vm_folder, datacenter, path).await?,
        };
        let (pool, host) = self
            .find_placement(&host_folder, datacenter, spec.resource_pool.as_deref())
            .await?;

        let config = &config_spec(spec)?;
        let (folder, pool, host) = (&folder, &pool, &host);
        let task = self
            .call("CreateVM_Task", || async move {
                Folder::new(self.handle(), &folder.value)
                    .create_vm_task(config, pool, host.as_ref())
                    .await
            })
            .await
            .map_err(|e| match e.fault_type() {
                Some("DuplicateName") => duplicate_vm(&spec.name, datacenter, None),
                _ => e,
            })?;
        let what = format!("creating VM {:?} in datacenter {datacenter:?}", spec.name);
        let result = match self.wait_task(&task, &what).await {
            Ok(result) => result,
            Err(VSphereError::Task { message, .. }) if message.starts_with("DuplicateName") => {
                return Err(duplicate_vm(&spec.name, datacenter, None));
            }
            Err(e) => return Err(e),
        };
        let vm = result_moref(result, MoTypesEnum::VirtualMachine).ok_or_else(|| {
            VSphereError::Task {
                what: what.clone(),
                message: "the task succeeded without naming the VM".to_string(),
            }
        })?;
        let mut props = self
            .properties(&vm, &["name", "config.instanceUuid"])
            .await?
            .ok_or_else(|| {
                VSphereError::NotFound(format!("the new VM {:?} ({})", spec.name, vm.value))
            })?;
        let created = VmRef {
            moref: vm.value,
            name: props.string("name")?.unwrap_or_else(|| spec.name.clone()),
            instance_uuid: props.string("config.instanceUuid")?.unwrap_or_default(),
        };
        tracing::info!(vm = %created.name, moref = %created.moref, datacenter,
            disks = spec.disks.len(), "created VM");
        Ok(created)
    }

    /// Destroys a VM (`Destroy_Task`, waited for): the VM and its files. It must be powered
    /// off: vSphere refuses otherwise, and so does this, before asking (`Fault` with
    /// `fault = "InvalidPowerState"`). A VM that does not exist is `NotFound`.
    pub async fn destroy_vm(&self, vm: &VmRef) -> Result<(), VSphereError> {
        let state = self.vm_state(vm).await?;
        if state.power_state != PowerState::PoweredOff {
            return Err(VSphereError::Fault {
                method: "Destroy_Task".to_string(),
                fault: "InvalidPowerState".to_string(),
                message: format!(
                    "VM {} ({}) is {}: vSphere destroys only powered-off VMs",
                    vm.name,
                    vm.moref,
                    power_state_name(state.power_state)
                ),
            });
        }
        let task = self
            .call("Destroy_Task", || async move {
                VirtualMachine::new(self.handle(), &vm.moref)
                    .destroy_task()
                    .await
            })
            .await
            .map_err(|e| match e {
                VSphereError::NotFound(_) => vm_not_found(vm),
                e => e,
            })?;
        self.wait_task(&task, &format!("destroying VM {} ({})", vm.name, vm.moref))
            .await?;
        tracing::info!(vm = %vm.name, moref = %vm.moref, "destroyed VM");
        Ok(())
    }

    /// Powers a VM on or off (`PowerOnVM_Task` / `PowerOffVM_Task`, a hard power-off), waited
    /// for. Already in that state: nothing is done.
    pub async fn set_power(&self, vm: &VmRef, on: bool) -> Result<(), VSphereError> {
        let state = self.vm_state(vm).await?.power_state;
        if (state == PowerState::PoweredOn) == on && state != PowerState::Suspended {
            return Ok(());
        }
        let method = if on {
            "PowerOnVM_Task"
        } else {
            "PowerOffVM_Task"
        };
        let task = self
            .call(method, || async move {
                let stub = VirtualMachine::new(self.handle(), &vm.moref);
                if on {
                    stub.power_on_vm_task(None).await
                } else {
                    stub.power_off_vm_task().await
                }
            })
            .await
            .map_err(|e| match e {
                VSphereError::NotFound(_) => vm_not_found(vm),
                e => e,
            })?;
        self.wait_task(
            &task,
            &format!("powering VM {} {}", vm.name, if on { "on" } else { "off" }),
        )
        .await?;
        Ok(())
    }

    /// Marks a powered-off VM as a template (`MarkAsTemplate`). For tests and admin tools:
    /// backups list templates (`VmListing::template`) and leave them out.
    pub async fn mark_as_template(&self, vm: &VmRef) -> Result<(), VSphereError> {
        self.call("MarkAsTemplate", || async move {
            VirtualMachine::new(self.handle(), &vm.moref)
                .mark_as_template()
                .await
        })
        .await
        .map_err(|e| match e {
            VSphereError::NotFound(_) => vm_not_found(vm),
            e => e,
        })
    }

    /// Turns CBT off and on again (two `ReconfigVM_Task`s), leaving it on: every change ID
    /// issued before becomes invalid. For use after data was written into a VM's flat files
    /// behind CBT's back. (On vSphere, tracking changes of a powered-on VM take effect at its
    /// next stun: a snapshot or a power cycle. A restored VM is powered off.)
    pub async fn reset_cbt(&self, vm: &VmRef) -> Result<(), VSphereError> {
        for on in [false, true] {
            let spec = &cbt_spec(on)?;
            let task = self
                .call("ReconfigVM_Task", || async move {
                    VirtualMachine::new(self.handle(), &vm.moref)
                        .reconfig_vm_task(spec)
                        .await
                })
                .await
                .map_err(|e| match e {
                    VSphereError::NotFound(_) => vm_not_found(vm),
                    e => e,
                })?;
            let what = format!(
                "turning CBT {} on VM {} (CBT reset)",
                if on { "on again" } else { "off" },
                vm.name
            );
            self.wait_task(&task, &what).await?;
        }
        tracing::info!(vm = %vm.name, "reset changed block tracking");
        Ok(())
    }

    /// Creates the VM folders of `path` ("a/b") below the datacenter's VM folder that do not
    /// exist yet. Existing ones are fine.
    pub async fn create_vm_folder(&self, datacenter: &str, path: &str) -> Result<(), VSphereError> {
        let dc = self.find_datacenter(datacenter).await?;
        let mut parent = self
            .properties(&dc, &["vmFolder"])
            .await?
            .ok_or_else(|| VSphereError::NotFound(format!("datacenter {datacenter:?}")))?
            .moref("vmFolder")?
            .ok_or_else(|| {
                VSphereError::Transport(format!("datacenter {datacenter:?} has no vmFolder"))
            })?;
        for name in segments(path) {
            parent = match self.find_child(&parent, name).await? {
                Some(child) if child.r#type == MoTypesEnum::Folder => child,
                Some(child) => {
                    return Err(invalid(
                        "CreateFolder",
                        &format!(
                            "{name:?} in folder path {path:?} is a {}, not a folder",
                            child.r#type.as_str()
                        ),
                    ));
                }
                None => {
                    let parent = &parent;
                    self.call("CreateFolder", || async move {
                        Folder::new(self.handle(), &parent.value)
                            .create_folder(name)
                            .await
                    })
                    .await?
                }
            };
        }
        Ok(())
    }

    /// `FindChild`: the direct child of `entity` named `name` (for a datacenter its folders;
    /// for a cluster or host its hosts and root pool "Resources"; for a pool its pools and
    /// VMs).
    async fn find_child(
        &self,
        entity: &ManagedObjectReference,
        name: &str,
    ) -> Result<Option<ManagedObjectReference>, VSphereError> {
        let search_index = self
            .client
            .service_content()
            .search_index
            .clone()
            .ok_or_else(|| VSphereError::Transport("the server has no SearchIndex".into()))?;
        let search_index = &search_index;
        self.call("FindChild", || async move {
            SearchIndex::new(self.handle(), &search_index.value)
                .find_child(entity, name)
                .await
        })
        .await
    }

    async fn find_datastore(
        &self,
        dc: &ManagedObjectReference,
        datacenter: &str,
        name: &str,
    ) -> Result<ManagedObjectReference, VSphereError> {
        for mut props in self
            .properties_in_container(dc, MoTypesEnum::Datastore, &["name"])
            .await?
        {
            if props.string("name")?.as_deref() == Some(name) {
                return Ok(props.obj);
            }
        }
        Err(VSphereError::NotFound(format!(
            "datastore {name:?} in datacenter {datacenter:?}"
        )))
    }

    async fn find_vm_folder(
        &self,
        vm_folder: &ManagedObjectReference,
        datacenter: &str,
        path: &str,
    ) -> Result<ManagedObjectReference, VSphereError> {
        let not_found =
            || VSphereError::NotFound(format!("folder {path:?} in datacenter {datacenter:?}"));
        let mut at = vm_folder.clone();
        for name in segments(path) {
            at = self.find_child(&at, name).await?.ok_or_else(not_found)?;
        }
        if at.r#type != MoTypesEnum::Folder {
            return Err(VSphereError::NotFound(format!(
                "folder {path:?} in datacenter {datacenter:?} (it names a {})",
                at.r#type.as_str()
            )));
        }
        Ok(at)
    }

    /// The pool (and, for a host, the host) `resource_pool` names below the host folder.
    async fn find_placement(
        &self,
        host_folder: &ManagedObjectReference,
        datacenter: &str,
        resource_pool: Option<&str>,
    ) -> Result<(ManagedObjectReference, Option<ManagedObjectReference>), VSphereError> {
        let Some(path) = resource_pool.map(str::trim).filter(|p| !p.is_empty()) else {
            return self.default_pool(host_folder, datacenter).await;
        };
        let not_found = |why: &str| {
            VSphereError::NotFound(format!(
                "resource pool {path:?} in datacenter {datacenter:?}{why}"
            ))
        };
        let names = segments(path);
        let mut found = Some(host_folder.clone());
        for name in &names {
            let Some(at) = &found else { break };
            found = self.find_child(at, name).await?;
        }
        // A bare name may be a cluster or host anywhere below the host folder.
        if found.is_none() && names.len() == 1 {
            found = self
                .find_compute_by_name(host_folder, datacenter, names[0])
                .await?;
        }
        let found = found.ok_or_else(|| not_found(""))?;
        match found.r#type {
            MoTypesEnum::ResourcePool | MoTypesEnum::VirtualApp => Ok((found, None)),
            MoTypesEnum::ClusterComputeResource | MoTypesEnum::ComputeResource => {
                let pool = self
                    .properties(&found, &["resourcePool"])
                    .await?
                    .ok_or_else(|| not_found(""))?
                    .moref("resourcePool")?
                    .ok_or_else(|| not_found(" (it has no root resource pool)"))?;
                Ok((pool, None))
            }
            MoTypesEnum::HostSystem => {
                let parent = self
                    .properties(&found, &["parent"])
                    .await?
                    .ok_or_else(|| not_found(""))?
                    .moref("parent")?
                    .ok_or_else(|| not_found(" (the host has no parent)"))?;
                let pool = self
                    .properties(&parent, &["resourcePool"])
                    .await?
                    .ok_or_else(|| not_found(""))?
                    .moref("resourcePool")?
                    .ok_or_else(|| not_found(" (its host has no root resource pool)"))?;
                Ok((pool, Some(found)))
            }
            other => Err(not_found(&format!(
                " (it names a {}, not a resource pool, cluster or host)",
                other.as_str()
            ))),
        }
    }

    /// A cluster, standalone host or host of a cluster named `name` anywhere below the host
    /// folder; more than one is an error.
    async fn find_compute_by_name(
        &self,
        host_folder: &ManagedObjectReference,
        datacenter: &str,
        name: &str,
    ) -> Result<Option<ManagedObjectReference>, VSphereError> {
        let mut matches = Vec::new();
        for kind in [
            MoTypesEnum::ClusterComputeResource,
            MoTypesEnum::ComputeResource,
        ] {
            for mut props in self
                .properties_in_container(host_folder, kind, &["name"])
                .await?
            {
                // vCenter's views include subtypes (a cluster is a ComputeResource too);
                // the simulator's do not: the same object may come twice.
                if props.string("name")?.as_deref() == Some(name)
                    && !matches
                        .iter()
                        .any(|m: &ManagedObjectReference| m.value == props.obj.value)
                {
                    matches.push(props.obj);
                }
            }
        }
        if matches.is_empty() {
            // A host of a cluster: its standalone twin (a ComputeResource) would have matched.
            for mut props in self
                .properties_in_container(host_folder, MoTypesEnum::HostSystem, &["name"])
                .await?
            {
                if props.string("name")?.as_deref() == Some(name) {
                    matches.push(props.obj);
                }
            }
        }
        match matches.len() {
            0 => Ok(None),
            1 => Ok(matches.pop()),
            n => Err(VSphereError::Fault {
                method: "create_vm".to_string(),
                fault: "DuplicateName".to_string(),
                message: format!(
                    "{n} clusters or hosts are named {name:?} in datacenter {datacenter:?}: give \
                     the resource pool as a path (\"Cluster/Resources\")"
                ),
            }),
        }
    }

    /// The first cluster's root pool by name, else the first standalone host's.
    async fn default_pool(
        &self,
        host_folder: &ManagedObjectReference,
        datacenter: &str,
    ) -> Result<(ManagedObjectReference, Option<ManagedObjectReference>), VSphereError> {
        for kind in [
            MoTypesEnum::ClusterComputeResource,
            MoTypesEnum::ComputeResource,
        ] {
            let mut found = Vec::new();
            for mut props in self
                .properties_in_container(host_folder, kind, &["name", "resourcePool"])
                .await?
            {
                if let (Some(name), Some(pool)) =
                    (props.string("name")?, props.moref("resourcePool")?)
                {
                    found.push((name, pool));
                }
            }
            found.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some((_, pool)) = found.into_iter().next() {
                return Ok((pool, None));
            }
        }
        Err(VSphereError::NotFound(format!(
            "a cluster or host (for its resource pool) in datacenter {datacenter:?}"
        )))
    }
}

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// A `runtime.powerState` property as read (an enum, or a string from some servers).
pub(super) fn power_state_value(value: Option<VimAny>) -> Option<PowerState> {
    match value? {
        VimAny::Value(ValueElements::VirtualMachinePowerState(s)) => power_state(&s),
        VimAny::Value(ValueElements::PrimitiveString(s)) => {
            power_state(&VirtualMachinePowerStateEnum::from_str(&s))
        }
        _ => None,
    }
}

fn power_state(s: &VirtualMachinePowerStateEnum) -> Option<PowerState> {
    match s {
        VirtualMachinePowerStateEnum::PoweredOn => Some(PowerState::PoweredOn),
        VirtualMachinePowerStateEnum::PoweredOff => Some(PowerState::PoweredOff),
        VirtualMachinePowerStateEnum::Suspended => Some(PowerState::Suspended),
        VirtualMachinePowerStateEnum::Other_(_) => None,
    }
}

fn power_state_name(s: PowerState) -> &'static str {
    match s {
        PowerState::PoweredOn => "poweredOn",
        PowerState::PoweredOff => "poweredOff",
        PowerState::Suspended => "suspended",
    }
}

pub(super) fn vm_not_found(vm: &VmRef) -> VSphereError {
    VSphereError::NotFound(format!("VM {} ({})", vm.name, vm.moref))
}

pub(super) fn invalid(method: &str, message: &str) -> VSphereError {
    VSphereError::Fault {
        method: method.to_string(),
        fault: "InvalidArgument".to_string(),
        message: message.to_string(),
    }
}

fn duplicate_vm(name: &str, datacenter: &str, existing: Option<&VmRef>) -> VSphereError {
    let existing = existing
        .map(|vm| format!(" ({})", vm.moref))
        .unwrap_or_default();
    VSphereError::Fault {
        method: "CreateVM_Task".to_string(),
        fault: "DuplicateName".to_string(),
        message: format!(
            "a VM named {name:?} already exists in datacenter {datacenter:?}{existing}"
        ),
    }
}

fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

fn int(i: i64) -> Value {
    Value::Number(Number::I64(i))
}

fn object(type_name: &str, fields: Vec<(&str, Value)>) -> Value {
    let mut o = Object::new();
    o.insert("_typeName".to_string(), string(type_name));
    for (k, v) in fields {
        o.insert(k.to_string(), v);
    }
    Value::Object(o)
}

/// `VirtualMachineConfigSpec` has no constructor short of vim_rs' heavy `Default` feature:
/// built from its wire form (as `snapshots::cbt_on_spec`).
fn from_json(what: &str, json: &Value) -> Result<VirtualMachineConfigSpec, VSphereError> {
    miniserde::json::from_str(&miniserde::json::to_string(json))
        .map_err(|_| VSphereError::Transport(format!("building the {what} config spec")))
}

fn cbt_spec(on: bool) -> Result<VirtualMachineConfigSpec, VSphereError> {
    from_json(
        "CBT",
        &object(
            "VirtualMachineConfigSpec",
            vec![("changeTrackingEnabled", Value::Bool(on))],
        ),
    )
}

/// The create spec of `vm`: hardware, annotation, CBT, files on the datastore, one paravirtual
/// SCSI controller and a new thin flat disk per capacity.
fn config_spec(vm: &NewVm) -> Result<VirtualMachineConfigSpec, VSphereError> {
    let ds = format!("[{}]", vm.datastore);
    let mut devices = Array::new();
    devices.push(object(
        "VirtualDeviceConfigSpec",
        vec![
            ("operation", string("add")),
            (
                "device",
                object(
                    "ParaVirtualSCSIController",
                    vec![
                        ("key", int(CONTROLLER_KEY)),
                        ("busNumber", int(0)),
                        ("sharedBus", string("noSharing")),
                    ],
                ),
            ),
        ],
    ));
    let mut unit = 0;
    for (i, capacity) in vm.disks.iter().enumerate() {
        if unit == 7 {
            unit += 1; // the controller's own unit
        }
        let kib = capacity.div_ceil(1024);
        let kib = i64::try_from(kib)
            .map_err(|_| invalid("create_vm", &format!("disk {i} is too large")))?;
        devices.push(object(
            "VirtualDeviceConfigSpec",
            vec![
                ("operation", string("add")),
                ("fileOperation", string("create")),
                (
                    "device",
                    object(
                        "VirtualDisk",
                        vec![
                            ("key", int(CONTROLLER_KEY - 1 - i as i64)),
                            ("controllerKey", int(CONTROLLER_KEY)),
                            ("unitNumber", int(unit)),
                            ("capacityInKB", int(kib)),
                            ("capacityInBytes", int(kib * 1024)),
                            (
                                "backing",
                                object(
                                    "VirtualDiskFlatVer2BackingInfo",
                                    vec![
                                        ("fileName", string(&ds)),
                                        ("diskMode", string("persistent")),
                                        ("thinProvisioned", Value::Bool(true)),
                                    ],
                                ),
                            ),
                        ],
                    ),
                ),
            ],
        ));
        unit += 1;
    }
    let mut fields = vec![
        ("name", string(&vm.name)),
        ("guestId", string(&vm.hardware.guest_id)),
        ("numCPUs", int(i64::from(vm.hardware.num_cpus))),
        ("memoryMB", int(vm.hardware.memory_mib)),
        ("annotation", string(&vm.annotation)),
        ("changeTrackingEnabled", Value::Bool(vm.change_tracking)),
        (
            "files",
            object("VirtualMachineFileInfo", vec![("vmPathName", string(&ds))]),
        ),
        ("deviceChange", Value::Array(devices)),
    ];
    if let Some(firmware) = vm.hardware.firmware.as_deref().filter(|f| !f.is_empty()) {
        fields.push(("firmware", string(firmware)));
    }
    from_json("VM", &object("VirtualMachineConfigSpec", fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vim_rs::types::structs::{ParaVirtualScsiController, VirtualDeviceConfigSpec, VirtualDisk};
    use vim_rs::types::traits::VirtualDeviceConfigSpecTrait;

    fn change(c: &dyn VirtualDeviceConfigSpecTrait) -> &VirtualDeviceConfigSpec {
        c.as_any_ref()
            .downcast_ref::<VirtualDeviceConfigSpec>()
            .expect("VirtualDeviceConfigSpec")
    }

    fn new_vm(disks: Vec<u64>) -> NewVm {
        NewVm {
            name: "r\"estored <1>".into(),
            folder: None,
            resource_pool: None,
            datastore: "LocalDS_0".into(),
            hardware: Hardware {
                num_cpus: 2,
                memory_mib: 512,
                guest_id: "otherGuest64".into(),
                firmware: Some("efi".into()),
            },
            disks,
            annotation: "sendense/restore: 1234".into(),
            change_tracking: true,
        }
    }

    #[test]
    fn create_spec_has_the_controller_and_a_disk_per_capacity() {
        let disks: Vec<u64> = (1..=9).map(|i| i << 20).chain([1500]).collect();
        let spec = config_spec(&new_vm(disks)).expect("spec");
        assert_eq!(spec.name.as_deref(), Some("r\"estored <1>"));
        assert_eq!(spec.num_cp_us, Some(2));
        assert_eq!(spec.memory_mb, Some(512));
        assert_eq!(spec.firmware.as_deref(), Some("efi"));
        assert_eq!(spec.change_tracking_enabled, Some(true));
        assert_eq!(
            spec.files.as_ref().and_then(|f| f.vm_path_name.as_deref()),
            Some("[LocalDS_0]")
        );
        let changes = spec.device_change.expect("device changes");
        assert_eq!(changes.len(), 11);
        let ctrl = change(changes[0].as_ref())
            .device
            .as_any_ref()
            .downcast_ref::<ParaVirtualScsiController>()
            .expect("controller");
        assert_eq!(ctrl.key, -100);
        assert_eq!(ctrl.bus_number, 0);
        let units: Vec<i32> = changes[1..]
            .iter()
            .map(|c| {
                let disk = change(c.as_ref())
                    .device
                    .as_any_ref()
                    .downcast_ref::<VirtualDisk>()
                    .expect("disk");
                assert_eq!(disk.controller_key, Some(-100));
                assert!(disk.key < -100);
                disk.unit_number.expect("unit")
            })
            .collect();
        assert_eq!(units, vec![0, 1, 2, 3, 4, 5, 6, 8, 9, 10]);
        let last = change(changes[10].as_ref())
            .device
            .as_any_ref()
            .downcast_ref::<VirtualDisk>()
            .expect("disk");
        // 1500 bytes: rounded up to whole KiB.
        assert_eq!(
            (last.capacity_in_kb, last.capacity_in_bytes),
            (2, Some(2048))
        );
    }
}
