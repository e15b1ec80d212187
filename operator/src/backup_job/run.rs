//! A planned job's attempt, as small steps, each either going on or stopping the reconcile
//! with a requeue: clear pods of an earlier attempt -> wait out a retry's back-off -> ensure the
//! hub -> wait for the hub to serve -> ensure the agent -> observe the agent (progress into
//! status; its end is handed to `finish`).

use std::ops::ControlFlow::{self, Break, Continue};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use sendense_crds::conditions;
use sendense_crds::{BackupJob, Repository, SourceNode};

use super::Context;
use super::dereference::{self, get};
use super::finish;
use super::outcome::{Failure, FailureReason, Running, retry_backoff};
use super::status::{self, JobUpdate};
use crate::agent_io::BackupResult;
use crate::children::{apply, delete_if_present, ensure_service_account};
use crate::pod_state::{self, PodPhase};
use crate::resources::{
    ATTEMPT_LABEL, PROGRESS_PORT, agent_name, agent_pod, claim_name, hub_name, hub_pod, hub_service,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading pod {name}: {source}")]
    ReadPod {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting pod {name} of an earlier attempt: {source}")]
    DeleteStalePod {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating ServiceAccount {name}: {source}")]
    ServiceAccount {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Dereference(#[from] dereference::Error),
    #[error(transparent)]
    Status(#[from] status::WriteError),
    #[error(transparent)]
    Finish(#[from] finish::Error),
}

/// A step's outcome: go on with its output, or stop with this requeue.
type Step<T> = Result<ControlFlow<Action, T>, Error>;

fn requeue(secs: u64) -> Action {
    Action::requeue(Duration::from_secs(secs))
}

/// The attempt a pod was created for.
fn attempt_of(pod: &Pod) -> Option<i32> {
    pod.labels().get(ATTEMPT_LABEL)?.parse().ok()
}

fn for_attempt(mut pod: Pod, attempt: i32) -> Pod {
    pod.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(ATTEMPT_LABEL.into(), attempt.to_string());
    pod
}

async fn read_pod(pods: &Api<Pod>, name: &str) -> Result<Option<Pod>, Error> {
    pods.get_opt(name).await.map_err(|source| Error::ReadPod {
        name: name.into(),
        source,
    })
}

async fn service_account(ctx: &Context, ns: &str, name: Option<&str>) -> Result<(), Error> {
    ensure_service_account(&ctx.client, ns, name)
        .await
        .map_err(|source| Error::ServiceAccount {
            name: name.unwrap_or_default().into(),
            source,
        })
}

async fn apply_named<K>(
    ctx: &Context,
    ns: &str,
    kind: &'static str,
    object: &K,
) -> Result<(), Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    apply(&ctx.client, ns, object)
        .await
        .map_err(|source| Error::Apply {
            kind,
            name: object.name_any(),
            source,
        })
}

/// A failed attempt, as a step's stop.
async fn fail<T>(
    job: &BackupJob,
    ctx: &Context,
    failure: Failure,
    result: Option<&BackupResult>,
) -> Step<T> {
    Ok(Break(
        finish::attempt_failed(job, ctx, failure, result).await?,
    ))
}

/// Step 1: pods of an earlier attempt go first; the new attempt starts when they are gone.
async fn clear_stale(pods: &Api<Pod>, attempt: i32, existing: [&Option<Pod>; 2]) -> Step<()> {
    let mut stale = false;
    for p in existing.into_iter().flatten() {
        if attempt_of(p) != Some(attempt) || pod_state::is_terminating(p) {
            stale = true;
            if !pod_state::is_terminating(p) {
                delete_if_present(pods, &p.name_any())
                    .await
                    .map_err(|source| Error::DeleteStalePod {
                        name: p.name_any(),
                        source,
                    })?;
            }
        }
    }
    Ok(if stale {
        Break(requeue(2))
    } else {
        Continue(())
    })
}

/// Step 2: a retry waits out its back-off, counted from the failure of the previous attempt.
fn back_off(job: &BackupJob, attempt: i32) -> ControlFlow<Action> {
    let conds = job
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if let Some(c) = conditions::find(conds, "Running")
        && c.reason == "Retrying"
    {
        let since = Timestamp::now().as_millisecond() - c.last_transition_time.0.as_millisecond();
        let left = retry_backoff(attempt).as_millis() as i64 - since;
        if left > 0 {
            return Break(Action::requeue(Duration::from_millis(left as u64)));
        }
    }
    Continue(())
}

/// Step 3: the hub's Service and Pod exist (created now when missing).
async fn ensure_hub(job: &BackupJob, ctx: &Context, attempt: i32, hub: Option<Pod>) -> Step<Pod> {
    if let Some(hub) = hub {
        return Ok(Continue(hub));
    }
    let ns = job.namespace().unwrap_or_default();
    let repo_name = &job.spec.repository_ref.name;
    let Some(repo) = get::<Repository>(ctx, &ns, repo_name).await? else {
        let failure = Failure::new(
            FailureReason::RepositoryNotFound,
            format!("Repository {repo_name} no longer exists"),
        );
        return fail(job, ctx, failure, None).await;
    };
    service_account(ctx, &ns, ctx.images.hub_service_account.as_deref()).await?;
    let disks = status::hub_disks(job);
    apply_named::<Service>(ctx, &ns, "Service", &hub_service(job, &disks)).await?;
    let pod = hub_pod(job, &claim_name(&repo), &disks, &ctx.images);
    apply_named(ctx, &ns, "Pod", &for_attempt(pod, attempt)).await?;
    Ok(Break(requeue(3)))
}

/// Step 4: the hub serves its NBD exports; its IP.
async fn hub_ready(job: &BackupJob, ctx: &Context, attempt: i32, hub: &Pod) -> Step<String> {
    if let Some(why) = pod_state::failure(hub) {
        let failure = Failure::new(
            FailureReason::HubFailed,
            format!("hub pod {}: {why}", hub.name_any()),
        );
        return fail(job, ctx, failure, None).await;
    }
    if let (true, Some(ip)) = (pod_state::is_ready(hub), pod_state::ip(hub)) {
        return Ok(Continue(ip));
    }
    let mut u = JobUpdate::new(job);
    u.set(
        &Running::HubStarting,
        format!(
            "attempt {attempt}: waiting for hub pod {} to serve its NBD exports",
            hub.name_any()
        ),
    );
    status::write(u, ctx).await?;
    Ok(Break(requeue(3)))
}

/// Step 5: the agent pod exists (created now when missing), aimed at the hub's exports.
async fn ensure_agent(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    hub_ip: &str,
    agent: Option<Pod>,
) -> Step<Pod> {
    if let Some(agent) = agent {
        return Ok(Continue(agent));
    }
    let ns = job.namespace().unwrap_or_default();
    let sn_name = &job.spec.source_node_ref.name;
    let Some(sn) = get::<SourceNode>(ctx, &ns, sn_name).await? else {
        let failure = Failure::new(
            FailureReason::SourceNodeNotFound,
            format!("SourceNode {sn_name} no longer exists"),
        );
        return fail(job, ctx, failure, None).await;
    };
    service_account(ctx, &ns, ctx.images.agent_service_account.as_deref()).await?;
    let pod = agent_pod(
        job,
        &sn,
        status::targets(job, hub_ip),
        status::base_change_ids(job),
        &ctx.images,
    );
    apply_named(ctx, &ns, "Pod", &for_attempt(pod, attempt)).await?;
    let mut u = JobUpdate::new(job);
    u.set(
        &Running::AgentStarting,
        format!("attempt {attempt}: hub ready at {hub_ip}; starting the agent"),
    );
    status::write(u, ctx).await?;
    Ok(Break(requeue(3)))
}

/// Where the agent is, read from its pod.
#[derive(Debug)]
pub enum AgentState {
    /// Not running yet (or its phase is unknown).
    Starting,
    /// Copying; its progress is served on this address.
    Running(Option<String>),
    Succeeded(BackupResult),
    Failed(Failure, Option<BackupResult>),
}

impl AgentState {
    /// The agent's state from its pod: its phase and, once it ended, its result.
    pub fn of(agent: &Pod) -> Self {
        let result = || {
            let msg = pod_state::termination_message(agent).unwrap_or_default();
            (BackupResult::parse(&msg), msg)
        };
        let reported = |r: &BackupResult, default: &str| {
            let reason = FailureReason::Agent(r.reason().map(str::to_owned));
            Failure::new(reason, r.error.clone().unwrap_or_else(|| default.into()))
        };
        match PodPhase::of(agent) {
            PodPhase::Succeeded => match result() {
                (Some(r), _) if r.ok => Self::Succeeded(r),
                (Some(r), _) => Self::Failed(reported(&r, "the agent reported failure"), Some(r)),
                (None, msg) => Self::Failed(
                    Failure::new(
                        FailureReason::ResultMissing,
                        format!("the agent ended without a readable result: {msg:.300}"),
                    ),
                    None,
                ),
            },
            PodPhase::Failed => match result() {
                (Some(r), _) => Self::Failed(reported(&r, "the agent failed"), Some(r)),
                (None, _) => {
                    let why =
                        pod_state::failure(agent).unwrap_or_else(|| "the agent pod failed".into());
                    Self::Failed(Failure::new(FailureReason::Agent(None), why), None)
                }
            },
            PodPhase::Running => Self::Running(pod_state::ip(agent)),
            PodPhase::Pending | PodPhase::Unknown => Self::Starting,
        }
    }
}

/// Step 6: the agent's progress into status while it runs; its end to `finish`.
async fn observe_agent(
    job: &BackupJob,
    ctx: &Context,
    attempt: i32,
    agent: &Pod,
) -> Result<Action, Error> {
    match AgentState::of(agent) {
        AgentState::Succeeded(r) => Ok(finish::succeeded(job, ctx, &r).await?),
        AgentState::Failed(failure, r) => {
            Ok(finish::attempt_failed(job, ctx, failure, r.as_ref()).await?)
        }
        AgentState::Running(ip) => {
            if let Some(ip) = ip {
                match crate::agent_progress::fetch(&format!("{ip}:{PROGRESS_PORT}")).await {
                    Ok(p) => {
                        let mut u = JobUpdate::new(job);
                        status::progress(&mut u, attempt, &p);
                        status::write(u, ctx).await?;
                    }
                    Err(e) => tracing::debug!(job = %job.name_any(), "progress: {e}"),
                }
            }
            Ok(requeue(3))
        }
        AgentState::Starting => Ok(requeue(3)),
    }
}

/// Running: the steps of one attempt, in order.
pub async fn run(job: &BackupJob, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let attempt = job.status.as_ref().and_then(|s| s.attempts).unwrap_or(1);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let hub = read_pod(&pods, &hub_name(job)).await?;
    let agent = read_pod(&pods, &agent_name(job)).await?;
    proceed!(clear_stale(&pods, attempt, [&hub, &agent]).await?);
    proceed!(back_off(job, attempt));
    let hub = proceed!(ensure_hub(job, ctx, attempt, hub).await?);
    let hub_ip = proceed!(hub_ready(job, ctx, attempt, &hub).await?);
    let agent = proceed!(ensure_agent(job, ctx, attempt, &hub_ip, agent).await?);
    observe_agent(job, ctx, attempt, &agent).await
}
