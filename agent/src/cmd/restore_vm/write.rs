//! The VM's disks served writable through the transport, and the restore engine into them.

use super::*;

/// Serves each VM disk writable through the transport and runs the restore engine into it.
pub(super) async fn write_disks(
    args: &RestoreVmArgs,
    reader: &DiskReader,
    vm: &VmRef,
    disks: &[(&Source, VmDisk, Plan)],
    blank: bool,
    started: Instant,
    live: &LiveProgress,
) -> RestoreResult {
    let scratch = std::env::temp_dir().join(format!("sendense-restore-vm-{}", std::process::id()));
    let prepared = async {
        std::fs::create_dir_all(&scratch).context("scratch directory")?;
        let mut exports: Vec<DiskSource> = Vec::new();
        let mut restore = RestoreArgs::new(Vec::new(), Vec::new());
        for (s, d, plan) in disks {
            let export = reader.open(vm, Access::Write, d).await.map_err(|e| {
                refused(
                    Refusal::TargetUnusable,
                    format!("disk {}: serving {} writable: {e}", s.key, d.file_name),
                )
            })?;
            restore.sources.push(DiskPath {
                key: s.key,
                path: s.path.clone(),
            });
            restore.targets.push(RestoreTarget {
                key: s.key,
                kind: RestoreTargetKind::Nbd {
                    url: export.url_text(),
                    blank,
                },
            });
            match &plan.areas {
                Some(areas) => {
                    let file = scratch.join(format!("{}.areas", s.key));
                    let text: String = areas
                        .iter()
                        .map(|a| format!("{}+{}\n", a.start, a.length))
                        .collect();
                    std::fs::write(&file, text).context("writing the areas file")?;
                    restore.areas_files.push(DiskPath {
                        key: s.key,
                        path: file,
                    });
                }
                None => {
                    if let Some(e) = args.expect_sha256.iter().find(|e| e.key == s.key) {
                        restore.expect_sha256.push(DiskSha256 {
                            key: s.key,
                            sha256: e.sha256.clone(),
                        });
                    }
                }
            }
            exports.push(export);
        }
        restore.request_size = args.request_size;
        restore.in_flight = args.in_flight;
        restore.request_timeout = args.request_timeout;
        anyhow::Ok((exports, restore))
    }
    .await;
    let mut result = match prepared {
        Ok((exports, restore)) => {
            let r = crate::cmd::restore::restore(&restore, started, live).await;
            drop(exports);
            r
        }
        Err(e) => failure(e, true, started),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    for r in &mut result.disks {
        if let Some((_, d, plan)) = disks.iter().find(|(s, _, _)| s.key == r.key) {
            r.file = Some(d.file_name.clone());
            r.target = d.file_name.clone();
            r.differential = Some(plan.areas.is_some());
            r.full_reason = plan.full_reason.clone();
        }
    }
    result
}
