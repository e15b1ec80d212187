//! The SourceNode controller: probes the vCenter (log in, read its version) and reports the
//! outcome as the Ready condition, with a reason a person can act on, and an Event when it
//! changes. Probes repeat every few minutes; a failing vCenter is retried sooner.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::{Client, ResourceExt};
use sendense_crds::SourceNode;

use crate::children::ApiError;
use crate::metrics::Metrics;
use crate::source_policy::SourcePolicy;
use crate::status::{ConditionReason, StatusUpdate, now};
use crate::vcenter::{Problem, ProblemKind, Session};

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Deadline of each vCenter call during a probe.
    pub probe_timeout: Duration,
    /// Time between probes of a healthy vCenter.
    pub probe_interval: Duration,
    pub metrics: Metrics,
    /// What SourceNodes may ask of the operator.
    pub policy: SourcePolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Status(ApiError),
}

impl Error {
    /// The `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Status(_) => "status_write",
        }
    }
}

/// The Ready condition of a SourceNode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Connected,
    Problem(ProblemKind),
    /// It asks for a datastore volume or a toleration the operator's settings do not allow.
    NotAllowed,
}

impl ConditionReason for Ready {
    fn condition_type(&self) -> &'static str {
        "Ready"
    }
    fn is_true(&self) -> bool {
        matches!(self, Ready::Connected)
    }
    fn reason(&self) -> &str {
        match self {
            Ready::Connected => "Connected",
            Ready::Problem(p) => p.as_str(),
            Ready::NotAllowed => "NotAllowed",
        }
    }
    fn event_type(&self) -> Option<EventType> {
        Some(match self {
            Ready::Connected => EventType::Normal,
            Ready::Problem(_) | Ready::NotAllowed => EventType::Warning,
        })
    }
}

/// Logs in and reads the vCenter's version.
pub async fn probe(sn: &SourceNode, ctx: &Context) -> Result<String, Problem> {
    let session = Session::connect(sn, &ctx.client, ctx.probe_timeout).await?;
    let about = session
        .vsphere
        .about()
        .await
        .map_err(|e| session.problem(&e));
    session.logout().await;
    about
}

pub async fn reconcile(sn: Arc<SourceNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sn.namespace().unwrap_or_default();
    let name = sn.name_any();
    let _timer = ctx.metrics.reconcile("sourcenode");
    let mut update = StatusUpdate::new(sn.as_ref());
    // What it asks of the operator is checked first: vCenter is not logged in to for a
    // SourceNode that is not allowed.
    let (ready, requeue) = match ctx.policy.check(&sn) {
        Err(not_allowed) => {
            update.set(&Ready::NotAllowed, not_allowed.0);
            (Ready::NotAllowed, ctx.probe_interval)
        }
        Ok(()) => {
            let outcome = probe(&sn, &ctx).await;
            update.status.last_probe_time = Some(now());
            match outcome {
                Ok(version) => {
                    update.set(&Ready::Connected, format!("logged in to {version}"));
                    update.status.vcenter_version = Some(version);
                    (Ready::Connected, ctx.probe_interval)
                }
                Err(p) => {
                    update.set(&Ready::Problem(p.kind), p.message);
                    let retry = if p.kind.transient() {
                        Duration::from_secs(30)
                    } else {
                        ctx.probe_interval
                    };
                    (Ready::Problem(p.kind), retry)
                }
            }
        }
    };
    ctx.metrics
        .probes
        .with_label_values(&[ready.reason()])
        .inc();
    // Not probed when not allowed: whether vCenter is up is not known then.
    if ready != Ready::NotAllowed {
        ctx.metrics
            .vcenter_up
            .with_label_values(&[&ns, &name])
            .set(i64::from(ready.is_true()));
    }
    update
        .write(&ctx.client, &ctx.recorder)
        .await
        .map_err(Error::Status)?;
    Ok(Action::requeue(requeue))
}

pub fn error_policy(sn: Arc<SourceNode>, err: &Error, ctx: Arc<Context>) -> Action {
    let label = err.metric_label();
    ctx.metrics
        .failed_reconcile("sourcenode", &sn.name_any(), err, label);
    Action::requeue(Duration::from_secs(15))
}
