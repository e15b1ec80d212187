//! How to reach one vCenter: address, credentials, trust and deadlines.

use std::fmt;
use std::time::Duration;

use super::VSphereError;

/// How the vCenter's TLS certificate is trusted.
#[derive(Clone, PartialEq, Eq)]
pub enum Tls {
    /// Pin the end-entity certificate: its SHA-256 (32 bytes) or SHA-1 (20 bytes, the form VDDK
    /// takes) as hex, colon-separated or not, any case. Name and expiry are not checked: the pin
    /// is the trust, as vCenter's own tools do.
    Thumbprint(String),
    /// Trust certificates issued by these CA certificates (PEM, one or more), e.g. vCenter's VMCA
    /// root. The name in the URL must match the certificate.
    CaPem(Vec<u8>),
    /// Accept any certificate. For tests and first contact only.
    Insecure,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tls::Thumbprint(t) => f.debug_tuple("Thumbprint").field(t).finish(),
            Tls::CaPem(pem) => write!(f, "CaPem({} bytes)", pem.len()),
            Tls::Insecure => f.write_str("Insecure"),
        }
    }
}

/// One vCenter (or ESXi) endpoint.
#[derive(Clone)]
pub struct VCenterConfig {
    /// `https://host[:port]/sdk` (the path may be omitted).
    pub url: String,
    /// Never logged, never in errors, redacted from `Debug` (with a Secret's keys swapped it
    /// is the password).
    pub username: String,
    /// Never logged, never in errors, redacted from `Debug`.
    pub password: String,
    pub tls: Tls,
    /// Deadline of every single request to vCenter.
    pub call_timeout: Duration,
    /// Deadline of every wait for a vSphere task (snapshot, reconfigure, removal).
    pub task_timeout: Duration,
}

impl VCenterConfig {
    /// A configuration with the default deadlines: 60 s per call, 30 min per task (removing a
    /// snapshot of a large, busy VM consolidates and can take that long).
    pub fn new(
        url: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
        tls: Tls,
    ) -> Self {
        Self {
            url: url.into(),
            username: username.into(),
            password: password.into(),
            tls,
            call_timeout: Duration::from_secs(60),
            task_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl fmt::Debug for VCenterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VCenterConfig")
            .field("url", &self.url)
            // With a Secret's keys swapped the user name is the password.
            .field("username", &"<redacted>")
            .field("password", &"<redacted>")
            .field("tls", &self.tls)
            .field("call_timeout", &self.call_timeout)
            .field("task_timeout", &self.task_timeout)
            .finish()
    }
}

/// `https://host[:port]/sdk` -> `host:port`, the form vim_rs takes (it appends `/sdk`).
pub(crate) fn server_address(url: &str) -> Result<String, VSphereError> {
    // The URL itself is not echoed: a mistyped one may carry a password.
    let bad = |why: &str| VSphereError::Transport(format!("invalid vCenter URL: {why}"));
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "https" {
        return Err(bad("the scheme must be https"));
    }
    if !matches!(parsed.path(), "" | "/" | "/sdk" | "/sdk/") {
        return Err(bad("the path must be /sdk"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            "credentials belong in the configuration, not in the URL",
        ));
    }
    let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_address_from_urls() {
        let ok = |u: &str| server_address(u).expect(u);
        assert_eq!(ok("https://vc.example.com/sdk"), "vc.example.com:443");
        assert_eq!(ok("https://127.0.0.1:8989/sdk"), "127.0.0.1:8989");
        assert_eq!(ok("https://vc:1443"), "vc:1443");
        assert_eq!(ok("https://[::1]:9443/sdk/"), "[::1]:9443");
        assert!(server_address("http://vc/sdk").is_err());
        assert!(server_address("https://vc/api").is_err());
        assert!(server_address("vc.example.com").is_err());
        let err = server_address("https://root:secret@vc/sdk").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn debug_redacts_the_password_and_the_user_name() {
        let cfg = VCenterConfig::new(
            "https://vc/sdk",
            "administrator@vsphere.local",
            "S3cr3t!",
            Tls::CaPem(b"-----BEGIN CERTIFICATE-----".to_vec()),
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("S3cr3t!"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("administrator"), "{shown}");
    }
}
