//! The restore pod of a RestoreJob's `vsphere` target: `sendense-agent restore-vm` through a
//! SourceNode's vCenter and transport, its datastores mounted writable.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sendense_contract::cli::{DiskPath, DiskSha256, RestoreVmArgs};
use sendense_crds::RestoreJob;

use super::restore::{mounted, pod, repository_volume};
use super::{PROGRESS_PORT, PodSettings, TERMINATION_LOG};

/// The disks of a restore point a restore writes, and the later points' files of them.
#[derive(Debug, Clone, Copy)]
pub struct PointDisks<'a> {
    pub point: &'a sendense_crds::RestorePoint,
    pub disks: &'a [i32],
    pub later: &'a [(i32, String)],
}

/// The restore pod of a `vsphere` target: `restore-vm` through the SourceNode's vCenter and
/// transport (its datastores mounted writable), the repository read-only. `disks` are the
/// restored disks; `later`, the files of the restore point's later descendants per disk
/// (an in-place differential restore writes their blocks back too).
pub fn vsphere_pod(
    job: &RestoreJob,
    attempt: i32,
    repository_claim: &str,
    what: &PointDisks<'_>,
    source: &sendense_crds::SourceNode,
    images: &PodSettings,
) -> Result<Pod, crate::source_policy::NotAllowed> {
    let PointDisks {
        point,
        disks,
        later,
    } = *what;
    let target = job.spec.target.vsphere.as_ref();
    let access = super::vcenter_access(source, images, true)?;
    let mut args = RestoreVmArgs::new(&source.spec.vcenter.url, &source.spec.datacenter);
    args.credentials_dir = Some(super::CREDENTIALS_DIR.into());
    args.thumbprint = access.thumbprint;
    args.ca_file = access.ca_file;
    args.insecure_skip_verify = access.insecure_skip_verify;
    args.transport = access.transport;
    args.datastores = access.datastores;
    if let Some(modes) = access.vddk_modes {
        args.vddk_modes = modes;
    }
    for key in disks {
        let Some(d) = point.spec.disks.iter().find(|d| d.device_key == *key) else {
            continue;
        };
        args.sources.push(DiskPath {
            key: *key,
            path: mounted(&d.file),
        });
        if !d.sha256.is_empty() {
            args.expect_sha256.push(DiskSha256 {
                key: *key,
                sha256: d.sha256.to_ascii_lowercase(),
            });
        }
    }
    args.tag = job.uid();
    match (
        target.and_then(|t| t.new_vm.as_ref()),
        target.and_then(|t| t.in_place.as_ref()),
    ) {
        (Some(n), _) => {
            args.new_vm = Some(n.name.clone());
            args.folder = n.folder.clone();
            args.resource_pool = n.resource_pool.clone();
            args.target_datastore = Some(n.datastore.clone());
            // The spec's hardware, else the source VM's at the backup, else the agent's defaults.
            let was = point.spec.vm.hardware.as_ref();
            if let Some(cpus) = n.cpus.or(was.map(|h| h.cpus)) {
                args.cpus = cpus;
            }
            if let Some(mib) = n.memory_mib.or(was.map(|h| h.memory_mib)) {
                args.memory_mib = mib;
            }
            if let Some(g) = n
                .guest_id
                .clone()
                .or(was.map(|h| h.guest_id.clone()).filter(|g| !g.is_empty()))
            {
                args.guest_id = g;
            }
            args.firmware = n
                .firmware
                .map(|f| {
                    match f {
                        sendense_crds::restore_job::Firmware::Bios => "bios",
                        sendense_crds::restore_job::Firmware::Efi => "efi",
                    }
                    .to_owned()
                })
                .or(was.and_then(|h| h.firmware.clone()));
        }
        (None, in_place) => {
            args.vm_uuid = Some(point.spec.vm.instance_uuid.clone());
            if in_place.is_none_or(|p| p.differential) {
                for key in disks {
                    if let Some(d) = point.spec.disks.iter().find(|d| d.device_key == *key)
                        && !d.change_id_reached.is_empty()
                    {
                        args.since_change_ids
                            .push(sendense_contract::cli::BaseChangeId {
                                key: *key,
                                change_id: d.change_id_reached.clone(),
                            });
                    }
                }
                for (key, file) in later {
                    if disks.contains(key) {
                        args.later_layers.push(DiskPath {
                            key: *key,
                            path: mounted(file),
                        });
                    }
                }
            }
        }
    }
    args.result_file = Some(TERMINATION_LOG.into());
    args.status_addr = Some(format!("$(POD_IP):{PROGRESS_PORT}"));
    let (repo_volume, repo_mount) = repository_volume(repository_claim);
    let mut volumes = vec![repo_volume];
    volumes.extend(access.volumes);
    let mut mounts = vec![repo_mount];
    mounts.extend(access.mounts);
    let container = super::progress_container(
        "restore",
        args.to_args(),
        mounts,
        images.agent_resources.clone(),
        images,
    );
    let mut pod = pod(job, attempt, container, volumes, images);
    if let Some(spec) = pod.spec.as_mut() {
        // It talks to vCenter, as a backup's agent does: the agent's identity and placement.
        spec.service_account_name = images.agent_service_account.clone();
        let placement = source.spec.placement.clone().unwrap_or_default();
        spec.node_selector =
            (!placement.node_selector.is_empty()).then_some(placement.node_selector);
        spec.tolerations = (!placement.tolerations.is_empty()).then_some(placement.tolerations);
    }
    let reader = source
        .spec
        .transport
        .nfs
        .as_ref()
        .and_then(|n| n.read_as.as_ref());
    Ok(match reader {
        Some(r) => super::read_as(pod, r),
        None => pod,
    })
}
