//! Certificate trust for the vCenter connection: a pinned thumbprint, a CA, or nothing.
//!
//! Every verifier records why it rejected a certificate (with the presented certificate's SHA-256
//! thumbprint) in a [`Rejections`] slot: by the time the failure surfaces as a `reqwest::Error`
//! the reason is buried in an error chain, and the administrator needs the thumbprint to fix the
//! pin.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use ring::digest;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{Tls, VSphereError};

/// The last certificate rejection of one connection, for the error message.
#[derive(Clone, Default, Debug)]
pub(crate) struct Rejections(Arc<Mutex<Option<String>>>);

impl Rejections {
    fn record(&self, why: String) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(why);
        }
    }

    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// A pinned certificate digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pin {
    Sha256(Vec<u8>),
    Sha1(Vec<u8>),
}

impl Pin {
    /// `AA:BB:...` or `aabb...`; 32 bytes is SHA-256, 20 bytes is SHA-1.
    pub(crate) fn parse(thumbprint: &str) -> Result<Pin, VSphereError> {
        let hex_digits: String = thumbprint
            .chars()
            .filter(|c| !matches!(c, ':' | ' ' | '-'))
            .collect();
        let bytes = hex::decode(&hex_digits).map_err(|_| {
            VSphereError::Tls(format!(
                "thumbprint {thumbprint:?} is not hex (expected AA:BB:... SHA-256 or SHA-1)"
            ))
        })?;
        match bytes.len() {
            32 => Ok(Pin::Sha256(bytes)),
            20 => Ok(Pin::Sha1(bytes)),
            n => Err(VSphereError::Tls(format!(
                "thumbprint {thumbprint:?} has {n} bytes: expected 32 (SHA-256) or 20 (SHA-1)"
            ))),
        }
    }

    fn matches(&self, der: &[u8]) -> bool {
        match self {
            Pin::Sha256(want) => digest::digest(&digest::SHA256, der).as_ref() == want.as_slice(),
            Pin::Sha1(want) => {
                digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref() == want.as_slice()
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Pin::Sha256(b) => format!("SHA-256 {}", colon_hex(b)),
            Pin::Sha1(b) => format!("SHA-1 {}", colon_hex(b)),
        }
    }
}

/// `AA:BB:CC`, vCenter's way of writing thumbprints.
fn colon_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// The SHA-256 thumbprint of a DER certificate, as vCenter shows it (`AA:BB:...`).
pub fn sha256_thumbprint(der: &[u8]) -> String {
    colon_hex(digest::digest(&digest::SHA256, der).as_ref())
}

/// The SHA-1 thumbprint of a DER certificate (`AA:BB:...`), the form VDDK takes.
pub fn sha1_thumbprint(der: &[u8]) -> String {
    colon_hex(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// The rustls configuration for `tls`, and the slot its verifier reports rejections to.
pub(crate) fn client_config(tls: &Tls) -> Result<(ClientConfig, Rejections), VSphereError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rejections = Rejections::default();
    let verifier: Arc<dyn ServerCertVerifier> = match tls {
        Tls::Thumbprint(t) => Arc::new(PinnedVerifier {
            pin: Pin::parse(t)?,
            provider: provider.clone(),
            rejections: rejections.clone(),
        }),
        Tls::CaPem(pem) => Arc::new(CaVerifier {
            inner: webpki_verifier(pem, provider.clone())?,
            rejections: rejections.clone(),
        }),
        Tls::Insecure => Arc::new(AnyCertificate {
            provider: provider.clone(),
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VSphereError::Tls(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((config, rejections))
}

fn webpki_verifier(
    pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, VSphereError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| VSphereError::Tls(format!("CA certificate is not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| VSphereError::Tls(format!("CA certificate rejected: {e}")))?;
    }
    if roots.is_empty() {
        return Err(VSphereError::Tls(
            "the CA PEM holds no certificate".to_string(),
        ));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| VSphereError::Tls(format!("CA verifier: {e}")))
}

/// Handshake signatures are verified with the provider whatever the certificate policy: the peer
/// must hold the private key of the certificate it presents.
macro_rules! verify_signatures_with {
    ($provider:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.$provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

#[derive(Debug)]
struct PinnedVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
    rejections: Rejections,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pin.matches(end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        let why = format!(
            "the server's certificate does not match the pinned thumbprint ({}): it presented \
             a certificate with SHA-256 thumbprint {} (SHA-1 {})",
            self.pin.describe(),
            sha256_thumbprint(end_entity.as_ref()),
            sha1_thumbprint(end_entity.as_ref()),
        );
        self.rejections.record(why.clone());
        Err(rustls::Error::General(why))
    }

    verify_signatures_with!(provider);
}

#[derive(Debug)]
struct CaVerifier {
    inner: Arc<WebPkiServerVerifier>,
    rejections: Rejections,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                self.rejections.record(format!(
                    "the server's certificate is not trusted by the configured CA ({e}): it \
                     presented a certificate for {server_name:?} with SHA-256 thumbprint {}",
                    sha256_thumbprint(end_entity.as_ref()),
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    verify_signatures_with!(provider);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_in_vcenter_and_plain_forms() {
        let sha256 = "01:43:92:8C:EA:68:6D:31:FF:F3:7A:5D:54:D2:85:29:6C:E9:6C:72:36:C4:16:C8:09:19:11:61:36:18:69:F5";
        assert!(matches!(Pin::parse(sha256), Ok(Pin::Sha256(b)) if b[0] == 0x01 && b[31] == 0xf5));
        let lower = sha256.to_lowercase().replace(':', "");
        assert_eq!(Pin::parse(&lower).ok(), Pin::parse(sha256).ok());
        let sha1 = "83:D7:00:03:F7:FA:EA:B2:28:C4:DC:50:7E:3E:4F:05:2B:E2:0F:44";
        assert!(matches!(Pin::parse(sha1), Ok(Pin::Sha1(b)) if b.len() == 20));
        assert!(matches!(Pin::parse("AB:CD"), Err(VSphereError::Tls(_))));
        assert!(matches!(Pin::parse("zz:zz"), Err(VSphereError::Tls(_))));
    }

    #[test]
    fn pins_match_their_digest_only() {
        let der = b"not really a certificate";
        let pin = Pin::parse(&sha256_thumbprint(der)).expect("pin");
        assert!(pin.matches(der));
        assert!(!pin.matches(b"another one"));
        let pin = Pin::parse(&sha1_thumbprint(der)).expect("pin");
        assert!(matches!(pin, Pin::Sha1(_)));
        assert!(pin.matches(der));
        assert!(!pin.matches(b"another one"));
    }

    #[test]
    fn ca_pem_without_certificates_is_refused() {
        assert!(matches!(
            client_config(&Tls::CaPem(b"nothing here".to_vec())),
            Err(VSphereError::Tls(_))
        ));
    }
}
