//! Logging in to a SourceNode's vCenter from its Secret and TLS trust, and saying what went wrong
//! in a reason a person can act on. Used by the SourceNode probe and by the BackupJob's VM lookup
//! and snapshot confirmation.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client, ResourceExt};
use sendense_crds::SourceNode;

pub use sendense_vsphere::{Disk, Tls, VCenterConfig, VSphere, VSphereError, VmSelector};

/// Why the vCenter could not be used, as the reason of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The credentials were rejected.
    LoginFailed,
    /// The certificate matched neither the thumbprint nor the CA bundle.
    CertificateNotTrusted,
    /// No answer, or an answer that is no vCenter's.
    Unreachable,
    SecretNotFound,
    SecretKeyMissing,
    /// Reading the Secret failed (RBAC, API server).
    SecretUnreadable,
    CABundleNotFound,
    /// Reading the CA bundle's ConfigMap failed (RBAC, API server).
    ConfigMapUnreadable,
}

impl ProblemKind {
    /// The condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginFailed => "LoginFailed",
            Self::CertificateNotTrusted => "CertificateNotTrusted",
            Self::Unreachable => "Unreachable",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::SecretUnreadable => "SecretUnreadable",
            Self::CABundleNotFound => "CABundleNotFound",
            Self::ConfigMapUnreadable => "ConfigMapUnreadable",
        }
    }

    /// Worth retrying soon (network, API server) rather than waiting for the user to fix
    /// something.
    pub fn transient(self) -> bool {
        matches!(
            self,
            Self::Unreachable | Self::SecretUnreadable | Self::ConfigMapUnreadable
        )
    }
}

/// Why the vCenter could not be used, with the message the condition carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
}

impl Problem {
    fn new(kind: ProblemKind, message: String) -> Self {
        Self { kind, message }
    }

    /// Maps a vSphere error to a problem; `username` adds a hint to a failed login.
    pub fn from_vsphere(err: &VSphereError, username: &str) -> Self {
        match err {
            VSphereError::Login(m) => {
                let hint = if username.contains('@') || username.contains('\\') {
                    String::new()
                } else {
                    // The name itself is never quoted: with the Secret's keys swapped it is
                    // the password, and this message reaches status and Events.
                    "; the user name has no SSO domain — vCenter users are usually written \
                     user@vsphere.local (check the Secret's username and password keys)"
                        .to_owned()
                };
                Self::new(
                    ProblemKind::LoginFailed,
                    format!("vCenter rejected the credentials: {m}{hint}"),
                )
            }
            VSphereError::Tls(m) => Self::new(
                ProblemKind::CertificateNotTrusted,
                format!("{m}; check spec.vcenter.tls (thumbprint or CA bundle)"),
            ),
            VSphereError::Timeout { what, after } => Self::new(
                ProblemKind::Unreachable,
                format!("{what} got no answer within {after:?}"),
            ),
            other => Self::new(ProblemKind::Unreachable, other.to_string()),
        }
    }
}

/// A logged-in vCenter session and the user it logged in as (for error hints).
pub struct Session {
    pub vsphere: VSphere,
    pub username: String,
}

impl Session {
    /// Logs in to the SourceNode's vCenter with its Secret and TLS trust; every call of the
    /// session gets `timeout`.
    pub async fn connect(
        sn: &SourceNode,
        client: &Client,
        timeout: Duration,
    ) -> Result<Self, Problem> {
        let (username, password) = credentials(sn, client).await?;
        let tls = tls(sn, client).await?;
        let mut cfg =
            VCenterConfig::new(sn.spec.vcenter.url.clone(), username.clone(), password, tls);
        cfg.call_timeout = timeout;
        let vsphere = VSphere::connect(cfg)
            .await
            .map_err(|e| Problem::from_vsphere(&e, &username))?;
        Ok(Self { vsphere, username })
    }

    /// A vSphere error of this session as a problem.
    pub fn problem(&self, err: &VSphereError) -> Problem {
        Problem::from_vsphere(err, &self.username)
    }

    /// Which vCenter this is, whatever URL reaches it: its `about.instanceUuid`, or the URL's
    /// host when it reports none. VM Leases are named by it.
    pub fn identity(&self, sn: &SourceNode) -> String {
        self.vsphere
            .instance_uuid()
            .unwrap_or_else(|| url_host(&sn.spec.vcenter.url))
    }

    pub async fn logout(self) {
        self.vsphere.logout().await;
    }
}

/// The host of a vCenter URL, lowercased ("https://VC.example.com:443/sdk" -> "vc.example.com").
pub fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    host.to_ascii_lowercase()
}

async fn credentials(sn: &SourceNode, client: &Client) -> Result<(String, String), Problem> {
    let ns = sn.namespace().unwrap_or_default();
    let r = &sn.spec.vcenter.credentials_secret_ref;
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&r.name)
        .await
        .map_err(|e| {
            // Forbidden: the operator's RBAC does not serve this namespace (the chart grants
            // Secrets only in rbac.secretNamespaces); say what to change.
            let hint = match &e {
                kube::Error::Api(s) if s.code == 403 => format!(
                    " (the operator may read Secrets only in the namespaces it serves: add {ns} to the chart's rbac.secretNamespaces, or bind its ClusterRole <operator>-secrets there with a RoleBinding)"
                ),
                _ => String::new(),
            };
            Problem::new(
                ProblemKind::SecretUnreadable,
                format!("reading Secret {ns}/{}: {e}{hint}", r.name),
            )
        })?
        .ok_or_else(|| {
            Problem::new(
                ProblemKind::SecretNotFound,
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
                Problem::new(
                    ProblemKind::SecretKeyMissing,
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
    let Some(r) = &t.ca_config_map_ref else {
        return Ok(Tls::Insecure);
    };
    let ns = sn.namespace().unwrap_or_default();
    let not_found = |what: String| Problem::new(ProblemKind::CABundleNotFound, what);
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get_opt(&r.name)
        .await
        .map_err(|e| Problem::new(ProblemKind::ConfigMapUnreadable, e.to_string()))?
        .ok_or_else(|| not_found(format!("ConfigMap {ns}/{} does not exist", r.name)))?;
    let pem = cm
        .data
        .and_then(|d| d.get(&r.key).cloned())
        .ok_or_else(|| not_found(format!("ConfigMap {ns}/{} has no key {:?}", r.name, r.key)))?;
    Ok(Tls::CaPem(pem.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_failures_point_at_a_missing_sso_domain() {
        let p = Problem::from_vsphere(&VSphereError::Login("InvalidLogin".into()), "administrator");
        assert_eq!(p.kind.as_str(), "LoginFailed");
        assert!(
            p.message.contains("no SSO domain") && p.message.contains("user@vsphere.local"),
            "{}",
            p.message
        );
        assert!(!p.kind.transient());
        assert!(!p.message.contains("administrator"), "{}", p.message);
        let p = Problem::from_vsphere(
            &VSphereError::Login("InvalidLogin".into()),
            "backup@vsphere.local",
        );
        assert!(!p.message.contains("SSO domain"));
    }

    #[test]
    fn tls_and_network_failures_have_their_own_reasons() {
        let p = Problem::from_vsphere(&VSphereError::Tls("presented AB:CD".into()), "u@d");
        assert_eq!(p.kind.as_str(), "CertificateNotTrusted");
        assert!(p.message.contains("spec.vcenter.tls"));
        let p = Problem::from_vsphere(
            &VSphereError::Timeout {
                what: "connecting".into(),
                after: Duration::from_secs(5),
            },
            "u@d",
        );
        assert_eq!((p.kind.as_str(), p.kind.transient()), ("Unreachable", true));
    }

    #[test]
    fn a_vcenter_without_an_identity_is_known_by_its_host() {
        for (url, host) in [
            ("https://VC.example.com:443/sdk", "vc.example.com"),
            ("https://user@vc:8989/sdk?x", "vc"),
            ("https://[fd00::1]:443/sdk", "fd00::1"),
            ("vc.local", "vc.local"),
        ] {
            assert_eq!(url_host(url), host, "{url}");
        }
    }
}
