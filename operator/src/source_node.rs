//! The SourceNode controller: probes the vCenter (log in, read its version) and reports the
//! outcome as the Ready condition, with a reason a person can act on, and an Event when it
//! changes. Probes repeat every few minutes; a failing vCenter is retried sooner.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Api, Client, Resource, ResourceExt};
use sendense_crds::SourceNode;
use sendense_crds::conditions::{self, FALSE, TRUE};
use sendense_vsphere::{Tls, VCenterConfig, VSphere, VSphereError};

/// Field manager of everything the operator writes.
pub const MANAGER: &str = "sendense-operator";
const READY: &str = "Ready";

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Deadline of each vCenter call during a probe.
    pub probe_timeout: Duration,
    /// Time between probes of a healthy vCenter.
    pub probe_interval: Duration,
    pub metrics: crate::metrics::Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing SourceNode status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// The `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Status(_) => "status_write",
        }
    }
}

/// Why a probe failed, as the Ready condition says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
    /// Worth retrying soon (network) rather than waiting for the user to fix something.
    pub transient: bool,
}

impl Problem {
    fn config(reason: &'static str, message: String) -> Self {
        Self {
            reason,
            message,
            transient: false,
        }
    }
}

/// Maps a vSphere error to a condition reason and message.
pub fn problem(err: &VSphereError, username: &str) -> Problem {
    match err {
        VSphereError::Login(m) => {
            let hint = if username.contains('@') || username.contains('\\') {
                String::new()
            } else {
                format!(
                    "; the user name {username:?} has no SSO domain — vCenter users are usually written user@vsphere.local"
                )
            };
            Problem::config(
                "LoginFailed",
                format!("vCenter rejected the credentials: {m}{hint}"),
            )
        }
        VSphereError::Tls(m) => Problem::config(
            "CertificateNotTrusted",
            format!("{m}; check spec.vcenter.tls (thumbprint or CA bundle)"),
        ),
        VSphereError::Timeout { what, after } => Problem {
            reason: "Unreachable",
            message: format!("{what} got no answer within {after:?}"),
            transient: true,
        },
        other => Problem {
            reason: "Unreachable",
            message: other.to_string(),
            transient: true,
        },
    }
}

async fn credentials(sn: &SourceNode, client: &Client) -> Result<(String, String), Problem> {
    let ns = sn.namespace().unwrap_or_default();
    let r = &sn.spec.vcenter.credentials_secret_ref;
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&r.name)
        .await
        .map_err(|e| Problem {
            reason: "SecretUnreadable",
            message: format!("reading Secret {ns}/{}: {e}", r.name),
            transient: true,
        })?
        .ok_or_else(|| {
            Problem::config(
                "SecretNotFound",
                format!(
                    "Secret {ns}/{} named by spec.vcenter.credentialsSecretRef does not exist",
                    r.name
                ),
            )
        })?;
    let data = secret.data.unwrap_or_default();
    let get = |key: &str| {
        data.get(key)
            .map(|v| {
                String::from_utf8_lossy(&v.0)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned()
            })
            .ok_or_else(|| {
                Problem::config(
                    "SecretKeyMissing",
                    format!("Secret {ns}/{} has no key {key:?}", r.name),
                )
            })
    };
    Ok((get(&r.username_key)?, get(&r.password_key)?))
}

async fn tls(sn: &SourceNode, client: &Client) -> Result<Tls, Problem> {
    let t = &sn.spec.vcenter.tls;
    if let Some(tp) = &t.thumbprint {
        return Ok(Tls::Thumbprint(tp.clone()));
    }
    if let Some(r) = &t.ca_config_map_ref {
        let ns = sn.namespace().unwrap_or_default();
        let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get_opt(&r.name)
            .await
            .map_err(|e| Problem {
                reason: "ConfigMapUnreadable",
                message: e.to_string(),
                transient: true,
            })?
            .ok_or_else(|| {
                Problem::config(
                    "CABundleNotFound",
                    format!("ConfigMap {ns}/{} does not exist", r.name),
                )
            })?;
        let pem = cm
            .data
            .and_then(|d| d.get(&r.key).cloned())
            .ok_or_else(|| {
                Problem::config(
                    "CABundleNotFound",
                    format!("ConfigMap {ns}/{} has no key {:?}", r.name, r.key),
                )
            })?;
        return Ok(Tls::CaPem(pem.into_bytes()));
    }
    Ok(Tls::Insecure)
}

/// Logs in to the SourceNode's vCenter with its Secret and TLS trust; returns the session and
/// the user name (for error hints).
pub async fn connect(
    sn: &SourceNode,
    client: &Client,
    timeout: Duration,
) -> Result<(VSphere, String), Problem> {
    let (username, password) = credentials(sn, client).await?;
    let tls = tls(sn, client).await?;
    let mut cfg = VCenterConfig::new(sn.spec.vcenter.url.clone(), username.clone(), password, tls);
    cfg.call_timeout = timeout;
    let vs = VSphere::connect(cfg)
        .await
        .map_err(|e| problem(&e, &username))?;
    Ok((vs, username))
}

/// Logs in and reads the vCenter's version.
pub async fn probe(sn: &SourceNode, ctx: &Context) -> Result<String, Problem> {
    let (vs, username) = connect(sn, &ctx.client, ctx.probe_timeout).await?;
    let about = vs.about().await.map_err(|e| problem(&e, &username));
    vs.logout().await;
    about
}

pub async fn reconcile(sn: Arc<SourceNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sn.namespace().unwrap_or_default();
    let name = sn.name_any();
    let _timer = ctx.metrics.reconcile("sourcenode");
    let outcome = probe(&sn, &ctx).await;
    let now = Time(Timestamp::now());
    let mut conds = sn
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = sn.metadata.generation;
    let (ready, reason, message, version, requeue) = match &outcome {
        Ok(v) => (
            TRUE,
            "Connected",
            format!("logged in to {v}"),
            Some(v.clone()),
            ctx.probe_interval,
        ),
        Err(p) => (
            FALSE,
            p.reason,
            p.message.clone(),
            sn.status.as_ref().and_then(|s| s.vcenter_version.clone()),
            if p.transient {
                Duration::from_secs(30)
            } else {
                ctx.probe_interval
            },
        ),
    };
    ctx.metrics.probes.with_label_values(&[reason]).inc();
    ctx.metrics
        .vcenter_up
        .with_label_values(&[&ns, &name])
        .set(i64::from(ready == TRUE));
    let was = conditions::find(&conds, READY).map(|c| (c.status.clone(), c.reason.clone()));
    conditions::set_condition(
        &mut conds,
        conditions::condition(
            READY,
            ready,
            reason,
            message.clone(),
            generation,
            now.clone(),
        ),
    );
    let status = serde_json::json!({
        "apiVersion": "sendense.io/v1alpha1",
        "kind": "SourceNode",
        "status": {
            "conditions": conds,
            "vcenterVersion": version,
            "lastProbeTime": now,
            "observedGeneration": generation,
        }
    });
    Api::<SourceNode>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .map_err(Error::Status)?;
    if was != Some((ready.to_owned(), reason.to_owned())) {
        crate::events::publish(
            &ctx.recorder,
            &sn.object_ref(&()),
            ready != TRUE,
            reason,
            &message,
            "Probe",
        )
        .await;
    }
    Ok(Action::requeue(requeue))
}

pub fn error_policy(sn: Arc<SourceNode>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(sourcenode = %sn.name_any(), "reconcile failed: {err}");
    ctx.metrics
        .reconcile_failures
        .with_label_values(&["sourcenode", err.metric_label()])
        .inc();
    Action::requeue(Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_failures_point_at_a_missing_sso_domain() {
        let p = problem(&VSphereError::Login("InvalidLogin".into()), "administrator");
        assert_eq!(p.reason, "LoginFailed");
        assert!(
            p.message.contains("no SSO domain") && p.message.contains("user@vsphere.local"),
            "{}",
            p.message
        );
        assert!(!p.transient);
        let p = problem(
            &VSphereError::Login("InvalidLogin".into()),
            "backup@vsphere.local",
        );
        assert!(!p.message.contains("SSO domain"));
    }

    #[test]
    fn tls_and_network_failures_have_their_own_reasons() {
        let p = problem(&VSphereError::Tls("presented AB:CD".into()), "u@d");
        assert_eq!(p.reason, "CertificateNotTrusted");
        assert!(p.message.contains("spec.vcenter.tls"));
        let p = problem(
            &VSphereError::Timeout {
                what: "connecting".into(),
                after: Duration::from_secs(5),
            },
            "u@d",
        );
        assert_eq!((p.reason, p.transient), ("Unreachable", true));
    }
}
