//! NBD over TLS, client side: the certificates of a directory laid out as qemu's and libnbd's
//! (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), so one directory serves our agent,
//! `nbdinfo`/`nbdcopy` (`tls-certificates=DIR`) and a debugging qemu-nbd alike. The server
//! must present a certificate signed by that CA for the name the client expects; the client
//! presents its own, which the server's `--tls-authz` checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// File names in a TLS directory, as qemu (`tls-creds-x509,dir=`) and libnbd read them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS directory {dir}: {file}: {reason}")]
    File {
        dir: PathBuf,
        file: &'static str,
        reason: String,
    },
    #[error("TLS directory {dir}: {reason}")]
    Config { dir: PathBuf, reason: String },
}

/// A client TLS configuration: the CA to trust and the certificate to present.
#[derive(Clone)]
pub struct TlsClient {
    pub(super) config: Arc<rustls::ClientConfig>,
    dir: PathBuf,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").field("dir", &self.dir).finish()
    }
}

impl TlsClient {
    /// Reads `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let bad = |file: &'static str, reason: String| TlsError::File {
            dir: dir.to_owned(),
            file,
            reason,
        };
        let certs = |file: &'static str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_file_iter(dir.join(file))
                .map_err(|e| bad(file, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(file, e.to_string()))?;
            if certs.is_empty() {
                return Err(bad(file, "no PEM certificate in it".into()));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(CA_CERT)? {
            roots
                .add(ca)
                .map_err(|e| bad(CA_CERT, format!("not a usable CA certificate: {e}")))?;
        }
        let chain = certs(CLIENT_CERT)?;
        let key = PrivateKeyDer::from_pem_file(dir.join(CLIENT_KEY))
            .map_err(|e| bad(CLIENT_KEY, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                dir: dir.to_owned(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config {
                dir: dir.to_owned(),
                reason: format!(
                    "{CLIENT_CERT} and {CLIENT_KEY} do not make a client identity: {e}"
                ),
            })?;
        Ok(Self {
            config: Arc::new(config),
            dir: dir.to_owned(),
        })
    }
}

/// The name the server's certificate must carry: `tls-hostname` from the URL, else its host.
pub(super) fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name:?} is not a valid TLS server name: {e}"))
}
