use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::*;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn key(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("PEM key")
}

/// A TLS handshake in memory: a server with `server` (trusting `client_ca` for client
/// certificates), a client trusting `server_ca` with `client`, connecting to `name`. Both
/// sides verify the other's chain; the error, if any.
fn handshake(
    server: &AttemptCerts,
    client_ca: &str,
    client: &AttemptCerts,
    server_ca: &str,
    name: &str,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = |pem: &str| {
        let mut r = rustls::RootCertStore::empty();
        for c in certs(pem) {
            r.add(c).expect("CA");
        }
        Arc::new(r)
    };
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(client_ca),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let sc = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server.server_cert), key(&server.server_key))
        .expect("server identity");
    let cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(server_ca))
        .with_client_auth_cert(certs(&client.client_cert), key(&client.client_key))
        .expect("client identity");
    let mut s = rustls::ServerConnection::new(Arc::new(sc)).expect("server");
    let name = ServerName::try_from(name.to_owned()).expect("name");
    let mut c = rustls::ClientConnection::new(Arc::new(cc), name).expect("client");
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        s.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        s.process_new_packets()
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        c.read_tls(&mut buf.as_slice()).map_err(|e| e.to_string())?;
        c.process_new_packets()
            .map_err(|e| format!("client: {e}"))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    Err("the handshake did not finish".into())
}

#[test]
fn an_attempts_certificates_verify_against_their_ca_and_name_only() {
    let ca = Ca::generate(now()).expect("CA");
    let a = ca
        .issue("web-hub.ns.svc", "sendense-agent.uid.1", now(), 7)
        .expect("certs");
    handshake(&a, &ca.cert_pem, &a, &ca.cert_pem, "web-hub.ns.svc").expect("the pair works");
    let e = handshake(&a, &ca.cert_pem, &a, &ca.cert_pem, "db-hub.ns.svc").expect_err("name");
    assert!(e.contains("client"), "{e}");
    let other = Ca::generate(now()).expect("CA");
    let foreign = other
        .issue("web-hub.ns.svc", "sendense-agent.uid.1", now(), 7)
        .expect("certs");
    let e = handshake(&a, &ca.cert_pem, &foreign, &ca.cert_pem, "web-hub.ns.svc")
        .expect_err("a client of another CA");
    assert!(e.contains("server"), "{e}");
    let e = handshake(&foreign, &ca.cert_pem, &a, &ca.cert_pem, "web-hub.ns.svc")
        .expect_err("a server of another CA");
    assert!(e.contains("client"), "{e}");
}

#[test]
fn a_ca_read_back_from_its_secret_issues_certificates_that_chain_to_it() {
    let ca = Ca::generate(now()).expect("CA");
    let secret = ca_secret("sendense-nbd-ca", &ca);
    let back = ca_of(&secret).expect("the stored CA reads back");
    assert_eq!(back.cert_pem, ca.cert_pem);
    assert_eq!(
        back.not_after.unix_timestamp(),
        ca.not_after.unix_timestamp()
    );
    let a = back.issue("h.ns.svc", "c", now(), 7).expect("certs");
    handshake(&a, &ca.cert_pem, &a, &ca.cert_pem, "h.ns.svc").expect("chains to the CA");
    // A key that is not the certificate's, or no PEM at all: unusable, so replaced.
    let other = Ca::generate(now()).expect("CA");
    assert!(Ca::from_pem(&ca.cert_pem, &other.key_pem).is_none());
    assert!(Ca::from_pem("garbage", &ca.key_pem).is_none());
}

#[test]
fn the_ca_is_rotated_within_its_last_month_and_never_outlived_by_a_leaf() {
    let t0 = now();
    let ca = Ca::generate(t0).expect("CA");
    assert!(!ca.due_for_rotation(t0));
    assert!(!ca.due_for_rotation(t0 + Duration::days(CA_VALID_DAYS - CA_RENEW_BEFORE_DAYS - 1)));
    assert!(ca.due_for_rotation(t0 + Duration::days(CA_VALID_DAYS - CA_RENEW_BEFORE_DAYS + 1)));
    let late = t0 + Duration::days(CA_VALID_DAYS - 2);
    let a = ca.issue("h.ns.svc", "c", late, 7).expect("certs");
    let der = x509_parser::pem::parse_x509_pem(a.client_cert.as_bytes())
        .expect("pem")
        .1;
    let cert = der.parse_x509().expect("x509");
    assert!(cert.validity().not_after.timestamp() <= ca.not_after.unix_timestamp());
}

#[test]
fn names_and_identity_of_an_attempt() {
    use crate::fixtures::TestObject;
    let job = BackupJob::test();
    assert_eq!(server_name(&job), "web-01-b2-hub.backups.svc");
    assert_eq!(client_identity(&job, 2), "CN=sendense-agent.u-2.2");
    assert_eq!(secret_name(&job), "web-01-b2-nbd-tls");
    let ca = Ca::generate(now()).expect("CA");
    let s = attempt_secret(
        &job,
        &ca.issue("web-hub.ns.svc", "x", now(), 7).expect("certs"),
    );
    let keys: Vec<_> = s.data.as_ref().expect("data").keys().cloned().collect();
    assert_eq!(
        keys,
        [
            CA_CERT_FILE,
            CLIENT_CERT_FILE,
            CLIENT_KEY_FILE,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE
        ]
    );
    let owner = &s.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("BackupJob", "u-2")
    );
}
