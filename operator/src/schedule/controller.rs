//! The BackupSchedule controller. Each reconcile: the schedule's jobs read (by label) into the
//! per-VM status; finished jobs past the history limits and unstarted jobs whose window has
//! closed removed; then, when a run is due (the latest scheduled time since the last run made,
//! at most one make-up run after an outage, none past `startingDeadlineSeconds`), the VMs are
//! listed in the SourceNode's vCenter, the selection applied, and one BackupJob made per VM
//! (deterministic names: a reconcile interrupted midway makes the rest, never two). The next
//! reconcile is queued for the next scheduled time; changes of the schedule's jobs (owned)
//! bring it back sooner.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use sendense_crds::backup_schedule::{ConcurrencyPolicy, RunReport, SkippedVm};
use sendense_crds::{BackupJob, BackupSchedule, RestorePoint, SourceNode};

use super::cron::Cron;
use super::plan::{self, SCHEDULE_LABEL, VM_LABEL};
use crate::children::{ApiError, Verb, get, list};
use crate::metrics::Metrics;
use crate::status::{ConditionReason, StatusUpdate};
use crate::vcenter::{ProblemKind, Session};

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub vcenter_timeout: Duration,
    pub clock: super::clock::Clock,
}

#[derive(Debug, thiserror::Error)]
#[error("BackupSchedule {schedule}: {source}")]
pub struct Error {
    schedule: String,
    #[source]
    source: ApiError,
}

type Update<'a> = StatusUpdate<'a, BackupSchedule>;

/// The `Ready` condition.
enum Ready {
    Scheduled,
    Suspended,
    InvalidSchedule,
    InvalidTimeZone,
    SourceNodeNotFound,
    VCenter(ProblemKind),
    VmListFailed,
}

impl ConditionReason for Ready {
    fn condition_type(&self) -> &'static str {
        "Ready"
    }
    fn is_true(&self) -> bool {
        matches!(self, Self::Scheduled | Self::Suspended)
    }
    fn reason(&self) -> &str {
        match self {
            Self::Scheduled => "Scheduled",
            Self::Suspended => "Suspended",
            Self::InvalidSchedule => "InvalidSchedule",
            Self::InvalidTimeZone => "InvalidTimeZone",
            Self::SourceNodeNotFound => "SourceNodeNotFound",
            Self::VCenter(p) => p.as_str(),
            Self::VmListFailed => "VMListFailed",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        Some(if self.is_true() {
            EventType::Normal
        } else {
            EventType::Warning
        })
    }
}

fn err(s: &BackupSchedule) -> impl Fn(ApiError) -> Error + '_ {
    move |source| Error {
        schedule: s.name_any(),
        source,
    }
}

/// The schedule's zone: its `timeZone`, or UTC.
pub fn zone(s: &BackupSchedule) -> Result<TimeZone, String> {
    match s.spec.time_zone.as_deref() {
        None | Some("UTC") | Some("Etc/UTC") => Ok(TimeZone::UTC),
        Some(name) => TimeZone::get(name).map_err(|e| {
            format!("spec.timeZone {name:?} is not an IANA time zone ({e}); use a name such as Europe/Berlin or America/New_York")
        }),
    }
}

pub async fn reconcile(s: Arc<BackupSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("backupschedule");
    let ns = s.namespace().unwrap_or_default();
    // Read fresh, not from the watch cache: the status records the runs made and the failures
    // counted, which a reconcile started from an older copy would make or count again.
    let Some(s) = get::<BackupSchedule>(&ctx.client, &ns, &s.name_any())
        .await
        .map_err(err(&s))?
    else {
        return Ok(Action::await_change());
    };
    let s = &s;
    if s.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let mut u = Update::new(s);
    let now = match ctx.clock.now() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(schedule = %s.name_any(), "{e}");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    };
    let cron: Cron = match s.spec.schedule.parse() {
        Ok(c) => c,
        Err(e) => {
            u.set(
                &Ready::InvalidSchedule,
                format!("spec.schedule {:?}: {e}", s.spec.schedule),
            );
            u.status.next_schedule_time = None;
            write(u, s, &ctx).await?;
            return Ok(Action::await_change());
        }
    };
    let tz = match zone(s) {
        Ok(tz) => tz,
        Err(message) => {
            u.set(&Ready::InvalidTimeZone, message);
            u.status.next_schedule_time = None;
            write(u, s, &ctx).await?;
            return Ok(Action::await_change());
        }
    };

    // The schedule's jobs: status, history, the window.
    let jobs_api: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &ns);
    let mine = ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", s.name_any()));
    let jobs = jobs_api
        .list(&mine)
        .await
        .map_err(|e| err(s)(ApiError::new::<BackupJob>(Verb::List, &ns, "", e)))?
        .items;
    let names: BTreeMap<String, String> = u
        .status
        .vms
        .iter()
        .map(|v| (v.instance_uuid.clone(), v.name.clone()))
        .collect();
    u.status.vms = plan::vm_status(&u.status.vms, &jobs, &names);
    for j in plan::window_closed(s, &jobs, now) {
        delete_job(&jobs_api, j).await.map_err(err(s))?;
        let uuid = j.labels().get(VM_LABEL).cloned().unwrap_or_default();
        if let Some(v) = u.status.vms.iter_mut().find(|v| v.instance_uuid == uuid) {
            v.last_result = Some("WindowClosed".into());
            v.last_job = Some(j.name_any());
        }
        ctx.recorder
            .publish(
                &kube::runtime::events::Event {
                    type_: EventType::Warning,
                    reason: "WindowClosed".into(),
                    note: Some(format!(
                        "BackupJob {} had not started when the window of {} minutes closed: removed; its VM is backed up at the next run",
                        j.name_any(),
                        s.spec.window_minutes.unwrap_or_default()
                    )),
                    action: "Schedule".into(),
                    secondary: None,
                },
                &s.object_ref(&()),
            )
            .await
            .ok();
    }
    for j in plan::past_history(s, &jobs) {
        delete_job(&jobs_api, j).await.map_err(err(s))?;
    }
    let active = jobs
        .iter()
        .filter(|j| !plan::ended(j) && j.metadata.deletion_timestamp.is_none())
        .count();
    u.status.active_jobs = Some(active as i32);
    u.status.failing_vms = u
        .status
        .vms
        .iter()
        .filter(|v| v.last_result.as_deref() == Some("Failed"))
        .map(|v| v.name.clone())
        .collect();
    if let Some(t) = plan::last_success(&u.status.vms) {
        u.status.last_successful_time = Some(t);
    }

    // The run due now, if any.
    let last = u
        .status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| s.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    let due = cron.last_between(last, now, &tz);
    let mut retry = None;
    match due {
        _ if s.spec.suspend => {
            // Runs missed while suspended are not made up for.
            if let Some(t) = due {
                u.status.last_schedule_time = Some(Time(t));
            }
            u.set(
                &Ready::Suspended,
                "spec.suspend is true: no new runs; jobs already made go on",
            );
        }
        None => {
            u.set(
                &Ready::Scheduled,
                format!("next run at {}", next_text(&cron, now, &tz)),
            );
        }
        Some(t) => {
            let late = now.as_second() - t.as_second();
            match s.spec.starting_deadline_seconds {
                Some(d) if late > d => {
                    u.status.last_schedule_time = Some(Time(t));
                    u.status.last_run = Some(RunReport {
                        scheduled_time: Some(Time(t)),
                        jobs_created: 0,
                        skipped: vec![SkippedVm {
                            name: "*".into(),
                            reason: format!(
                                "missed: the run of {t} was noticed {late} s late, past spec.startingDeadlineSeconds {d}"
                            ),
                        }],
                    });
                    u.set(
                        &Ready::Scheduled,
                        format!(
                            "the run of {t} was missed ({late} s late); next run at {}",
                            next_text(&cron, now, &tz)
                        ),
                    );
                }
                _ => match run(s, &ctx, &mut u, &jobs, t, now).await? {
                    Ok(report) => {
                        u.status.last_schedule_time = Some(Time(t));
                        let message = format!(
                            "the run of {t} made {} BackupJobs{}; next run at {}",
                            report.jobs_created,
                            if report.skipped.is_empty() {
                                String::new()
                            } else {
                                format!(", skipped {} VMs", report.skipped.len())
                            },
                            next_text(&cron, now, &tz)
                        );
                        ctx.metrics
                            .schedule_runs
                            .with_label_values(&[&ns, &s.name_any()])
                            .inc();
                        u.status.last_run = Some(report);
                        u.set(&Ready::Scheduled, message);
                    }
                    Err((reason, message)) => {
                        u.set(&reason, message);
                        retry = Some(Duration::from_secs(30));
                    }
                },
            }
        }
    }
    let last_run = u.status.last_schedule_time.as_ref().map(|t| t.0);
    for v in u.status.vms.iter_mut() {
        v.backup_due = plan::backup_due(s, &cron, &tz, v, last_run).map(Time);
        let labels = [ns.as_str(), &s.name_any(), v.name.as_str()];
        match &v.backup_due {
            Some(t) => ctx
                .metrics
                .schedule_backup_due
                .with_label_values(&labels)
                .set(t.0.as_second()),
            None => {
                let _ = ctx.metrics.schedule_backup_due.remove_label_values(&labels);
            }
        }
    }
    let next = cron.next_after(now, &tz);
    u.status.next_schedule_time = next.map(|n| n.to_zoned(tz.clone()).to_string());
    if let Some(n) = next {
        ctx.metrics
            .schedule_next_run
            .with_label_values(&[&ns, &s.name_any()])
            .set(n.as_second());
    }
    write(u, s, &ctx).await?;
    let until_next = next
        .map(|n| Duration::from_secs((n.as_second() - now.as_second()).max(1) as u64))
        .unwrap_or(Duration::from_secs(3600));
    // Jobs still active are looked at again (their changes wake the controller too).
    let wake = retry.unwrap_or(until_next).min(if active > 0 {
        Duration::from_secs(30)
    } else {
        until_next
    });
    Ok(Action::requeue(
        ctx.clock.longest_sleep().map_or(wake, |w| w.min(wake)),
    ))
}

fn next_text(cron: &Cron, now: Timestamp, tz: &TimeZone) -> String {
    cron.next_after(now, tz)
        .map(|n| n.to_zoned(tz.clone()).to_string())
        .unwrap_or_else(|| "never (the expression matches no date)".into())
}

async fn write(u: Update<'_>, s: &BackupSchedule, ctx: &Context) -> Result<(), Error> {
    u.write(&ctx.client, &ctx.recorder).await.map_err(err(s))
}

async fn delete_job(api: &Api<BackupJob>, j: &BackupJob) -> Result<(), ApiError> {
    let ns = j.namespace().unwrap_or_default();
    match api.delete(&j.name_any(), &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(ApiError::new::<BackupJob>(
            Verb::Delete,
            &ns,
            &j.name_any(),
            e,
        )),
    }
}

/// One run at scheduled time `at`: the VMs listed and selected, one job each. The outer error
/// is the API server's; the inner one why the vCenter could not be asked (retried).
async fn run(
    s: &BackupSchedule,
    ctx: &Context,
    u: &mut Update<'_>,
    jobs: &[BackupJob],
    at: Timestamp,
    now: Timestamp,
) -> Result<Result<RunReport, (Ready, String)>, Error> {
    let ns = s.namespace().unwrap_or_default();
    let sn_name = &s.spec.source_node_ref.name;
    let Some(sn) = get::<SourceNode>(&ctx.client, &ns, sn_name)
        .await
        .map_err(err(s))?
    else {
        return Ok(Err((
            Ready::SourceNodeNotFound,
            format!(
                "spec.sourceNodeRef: SourceNode {sn_name} does not exist in namespace {ns}; the run of {at} waits for it"
            ),
        )));
    };
    let session = match Session::connect(&sn, &ctx.client, ctx.vcenter_timeout).await {
        Ok(v) => v,
        Err(p) => {
            return Ok(Err((
                Ready::VCenter(p.kind),
                format!(
                    "SourceNode {sn_name}: {}; the run of {at} is retried",
                    p.message
                ),
            )));
        }
    };
    let listed = session.vsphere.list_vms(&sn.spec.datacenter).await;
    let listed = match listed {
        Ok(l) => l,
        Err(e) => {
            let p = session.problem(&e);
            session.logout().await;
            return Ok(Err((
                Ready::VmListFailed,
                format!(
                    "listing the VMs of datacenter {} failed: {}; the run of {at} is retried",
                    sn.spec.datacenter, p.message
                ),
            )));
        }
    };
    session.logout().await;
    let points = list::<RestorePoint>(&ctx.client, &ns)
        .await
        .map_err(err(s))?;
    let by_vm = plan::by_vm(jobs);
    let api: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &ns);
    let mut report = RunReport {
        scheduled_time: Some(Time(at)),
        ..Default::default()
    };
    let chosen: Vec<_> = listed
        .iter()
        .filter(|v| plan::selected(&s.spec.vms, v))
        .collect();
    u.status.selected_vms = Some(chosen.len() as i32);
    // VMs this run does not select are no longer due for backups.
    for known in u.status.vms.iter_mut() {
        if !chosen.iter().any(|c| {
            c.vm.instance_uuid
                .eq_ignore_ascii_case(&known.instance_uuid)
        }) {
            known.last_selected_run = None;
        }
    }
    for v in chosen {
        let uuid = v.vm.instance_uuid.to_ascii_lowercase();
        let name = plan::job_name(&s.name_any(), &v.vm.name, &uuid, at);
        let entry = plan::mark_selected(&mut u.status.vms, &uuid, &v.vm.name, at);
        if entry.last_job.is_none() {
            entry.last_job = Some(name.clone());
            entry.last_result = Some("Pending".into());
        }
        let previous = by_vm.get(&uuid).and_then(|l| {
            l.iter()
                .find(|j| !plan::ended(j) && j.metadata.deletion_timestamp.is_none())
        });
        if let Some(prev) = previous
            && prev.name_any() != name
        {
            match s.spec.concurrency_policy {
                ConcurrencyPolicy::Forbid => {
                    report.skipped.push(SkippedVm {
                        name: v.vm.name.clone(),
                        reason: format!(
                            "BackupJob {} of an earlier run has not ended (concurrencyPolicy Forbid)",
                            prev.name_any()
                        ),
                    });
                    continue;
                }
                ConcurrencyPolicy::Replace => {
                    delete_job(&api, prev).await.map_err(err(s))?;
                }
                ConcurrencyPolicy::Allow => {}
            }
        }
        let (mode, why_full) = plan::mode_for(s, &points, &uuid, now);
        let job = plan::new_job(s, &name, v, mode, why_full.as_deref(), at);
        match api.create(&PostParams::default(), &job).await {
            Ok(_) => report.jobs_created += 1,
            // Made by an earlier try of this run.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(err(s)(ApiError::new::<BackupJob>(
                    Verb::Create,
                    &ns,
                    &name,
                    e,
                )));
            }
        }
    }
    Ok(Ok(report))
}

pub fn error_policy(s: Arc<BackupSchedule>, e: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failed_reconcile("backupschedule", &s.name_any(), e, "kube_api");
    Action::requeue(Duration::from_secs(10))
}
