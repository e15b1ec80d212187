//! Step 1 of a pending job: everything it refers to, read once into one struct. The SourceNode
//! and Repository must exist and be Ready; the VM and its disks come from vCenter; the jobs of
//! the namespace are read fresh under the allocation lock, which the struct holds until the
//! plan is recorded in status. Anything missing stops the job here with a reason to wait.

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use sendense_crds::common::VmHardware;
use sendense_crds::conditions;
use sendense_crds::{BackupJob, Repository, RestorePoint, SourceNode};
use tokio::sync::MutexGuard;

use super::context::Context;
use super::outcome::{Wait, WaitReason};
use crate::children::{ApiError, get, list};
use crate::status::Reported;
use crate::vcenter::{Session, VSphereError, VmSelector};

pub use crate::vcenter::Disk;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading what the job refers to: {0}")]
    Refs(#[source] ApiError),
    #[error("reading the jobs of its namespace: {0}")]
    Jobs(#[source] ApiError),
    #[error("reading the restore points of its namespace: {0}")]
    RestorePoints(#[source] ApiError),
}

/// Port allocation is serialized in this process: the guard is held from reading the jobs until
/// the plan is in status.
pub type AllocationGuard<'a> = MutexGuard<'a, ()>;

/// What a pending job refers to, all of it present and Ready.
#[derive(Debug, Clone)]
pub struct Dereferenced {
    pub source_node: SourceNode,
    pub repository: Repository,
    /// The VM's inventory name and instance UUID, as vCenter reports them.
    pub vm_name: String,
    pub vm_instance_uuid: String,
    /// The VM's hardware, for the restore point's manifest (None in tests' fixtures).
    pub vm_hardware: Option<VmHardware>,
    /// Which vCenter this is, whatever URL reaches it: its `about.instanceUuid`, or the URL's
    /// host when it reports none.
    pub vcenter_identity: String,
    /// Every virtual disk of the VM.
    pub disks: Vec<Disk>,
    /// The jobs of the job's namespace, read under the allocation lock.
    pub jobs: Vec<BackupJob>,
    /// The restore points of the job's namespace (chain parents).
    pub restore_points: Vec<RestorePoint>,
}

/// How the job names its VM, and the words a message uses for it. (The CRD's CEL rule requires
/// exactly one of vm.name and vm.instanceUuid.)
pub fn vm_selector(job: &BackupJob) -> (VmSelector, String) {
    match (&job.spec.vm.name, &job.spec.vm.instance_uuid) {
        (Some(n), _) => (VmSelector::Name(n.clone()), format!("VM {n:?}")),
        (None, Some(u)) => (
            VmSelector::InstanceUuid(u.clone()),
            format!("VM with instance UUID {u}"),
        ),
        (None, None) => (VmSelector::Name(String::new()), "VM (no selector)".into()),
    }
}

fn ready_problem(conds: &[Condition]) -> String {
    match conditions::find(conds, "Ready") {
        Some(c) => format!("{}: {}", c.reason, c.message),
        None => "not probed yet".into(),
    }
}

/// A field of the spec naming an object that must exist and be Ready.
struct Reference {
    field: &'static str,
    not_found: WaitReason,
    not_ready: WaitReason,
}

const SOURCE_NODE: Reference = Reference {
    field: "spec.sourceNodeRef",
    not_found: WaitReason::SourceNodeNotFound,
    not_ready: WaitReason::SourceNodeNotReady,
};

const REPOSITORY: Reference = Reference {
    field: "spec.repositoryRef",
    not_found: WaitReason::RepositoryNotFound,
    not_ready: WaitReason::RepositoryNotReady,
};

/// A referenced SourceNode or Repository, when it exists and is Ready: the controller's cached
/// copy when it holds one that is Ready, else read from the API server (a job waits only on
/// the API server's word).
async fn ready_ref<K: Reported>(
    ctx: &Context,
    ns: &str,
    name: &str,
    r: &Reference,
    cached: Option<Arc<K>>,
) -> Result<ControlFlow<Wait, K>, Error> {
    let kind = K::kind(&());
    if let Some(obj) = cached
        && conditions::is_true(obj.status().map(K::conditions).unwrap_or_default(), "Ready")
    {
        return Ok(Continue(obj.as_ref().clone()));
    }
    let Some(obj) = get::<K>(&ctx.client, ns, name).await.map_err(Error::Refs)? else {
        return Ok(Break(Wait::new(
            r.not_found,
            format!("{kind} {ns}/{name} named by {} does not exist", r.field),
        )));
    };
    let conds = obj.status().map(K::conditions).unwrap_or_default();
    if !conditions::is_true(conds, "Ready") {
        return Ok(Break(Wait::new(
            r.not_ready,
            format!("{kind} {name} is not Ready: {}", ready_problem(conds)),
        )));
    }
    Ok(Continue(obj))
}

/// The VM and its disks, from the SourceNode's vCenter.
/// The VM a job backs up, as vCenter describes it.
struct VmFound {
    name: String,
    instance_uuid: String,
    /// The vCenter's identity (its instance UUID, else its host).
    vcenter: String,
    disks: Vec<Disk>,
    hardware: VmHardware,
}

async fn vm(ctx: &Context, job: &BackupJob, sn: &SourceNode) -> ControlFlow<Wait, VmFound> {
    let session = match Session::connect(sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok(s) => s,
        Err(p) => {
            let message = format!("SourceNode {}: {}", sn.name_any(), p.message);
            return Break(Wait::new(WaitReason::VCenter(p.kind), message));
        }
    };
    let (selector, what) = vm_selector(job);
    let vs = &session.vsphere;
    let found = async {
        let vm = vs.find_vm(&sn.spec.datacenter, &selector).await?;
        let info = vs.vm_info(&vm).await?;
        let hw = vs.vm_state(&vm).await?.hardware;
        let hardware = VmHardware {
            cpus: hw.num_cpus,
            memory_mib: hw.memory_mib,
            guest_id: hw.guest_id,
            firmware: hw.firmware,
        };
        let vcenter = session.identity(sn);
        Ok::<_, VSphereError>(VmFound {
            name: vm.name,
            instance_uuid: vm.instance_uuid,
            vcenter,
            disks: info.disks,
            hardware,
        })
    }
    .await;
    let outcome = match found {
        Ok(v) => Continue(v),
        Err(VSphereError::NotFound(m)) => Break(Wait::new(
            WaitReason::VmNotFound,
            format!(
                "{what} was not found in datacenter {} of {} ({m}): check spec.vm",
                sn.spec.datacenter, sn.spec.vcenter.url
            ),
        )),
        Err(e) => {
            let p = session.problem(&e);
            Break(Wait::new(
                WaitReason::VmLookup(p.kind),
                format!("looking up {what}: {}", p.message),
            ))
        }
    };
    session.logout().await;
    outcome
}

/// Step 1: the SourceNode, the Repository, the VM, then (under the allocation lock) the jobs.
pub async fn dereference<'a>(
    ctx: &'a Context,
    job: &BackupJob,
) -> Result<ControlFlow<Wait, (Dereferenced, AllocationGuard<'a>)>, Error> {
    let ns = job.namespace().unwrap_or_default();
    let sn_name = &job.spec.source_node_ref.name;
    let cached = ctx
        .caches
        .source_nodes
        .get(&ObjectRef::new(sn_name).within(&ns));
    let source_node =
        step!(ready_ref::<SourceNode>(ctx, &ns, sn_name, &SOURCE_NODE, cached).await?);
    let repo_name = &job.spec.repository_ref.name;
    let cached = ctx
        .caches
        .repositories
        .get(&ObjectRef::new(repo_name).within(&ns));
    let repository =
        step!(ready_ref::<Repository>(ctx, &ns, repo_name, &REPOSITORY, cached).await?);
    let found = step!(vm(ctx, job, &source_node).await);
    let allocation = ctx.allocation.lock().await;
    let jobs = list::<BackupJob>(&ctx.client, &ns)
        .await
        .map_err(Error::Jobs)?;
    let restore_points = list::<RestorePoint>(&ctx.client, &ns)
        .await
        .map_err(Error::RestorePoints)?;
    let refs = Dereferenced {
        source_node,
        repository,
        vm_name: found.name,
        vm_instance_uuid: found.instance_uuid,
        vm_hardware: Some(found.hardware),
        vcenter_identity: found.vcenter,
        disks: found.disks,
        jobs,
        restore_points,
    };
    Ok(Continue((refs, allocation)))
}
