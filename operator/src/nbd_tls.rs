//! The CA of the NBD data path. The operator keeps one CA (its certificate and key in a Secret
//! of its own namespace, created at first use) and issues, for each attempt of a BackupJob, a
//! server certificate for the hub and a client certificate for the agent, into one Secret of
//! the job. The hub's qemu-nbd accepts only that attempt's client identity (`--tls-authz`), so
//! no other pod — not another job's agent, not an earlier attempt's — can read or write the
//! attempt's exports.
//!
//! Rotation: the CA is replaced when its Secret is deleted (or holds something unusable) and
//! when less than [`CA_RENEW_BEFORE_DAYS`] of it are left. A job's Secret carries the CA that
//! signed it, so attempts running during a rotation finish with their own certificates; the
//! next attempt gets certificates of the new CA.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sendense_crds::BackupJob;
use time::{Duration, OffsetDateTime};

use crate::resources::{hub_name, owned_meta};

/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Keys of a job's Secret: file names as qemu (`tls-creds-x509,dir=`) and libnbd read them.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// Where the hub and the agent mount the job's Secret.
pub const TLS_DIR: &str = "/etc/sendense/nbd-tls";

/// How long a CA is valid, and how long before its end it is replaced.
pub const CA_VALID_DAYS: i64 = 365;
pub const CA_RENEW_BEFORE_DAYS: i64 = 30;
/// How long an attempt's certificates are valid (TLS checks them when a connection opens; an
/// attempt opens its connections at its start).
pub const JOB_CERT_VALID_DAYS: i64 = 7;
/// Clock skew allowed between the operator and the nodes.
const BACKDATE_MINUTES: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA Secret {namespace}/{name}: {source}")]
    Secret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the CA Secret {namespace}/{name} was replaced at the same time by something that is not a CA ({CA_CERT_KEY} and {CA_KEY_KEY}, PEM)"
    )]
    Unusable { namespace: String, name: String },
}

/// The operator's CA.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA, valid from a few minutes before `now` for [`CA_VALID_DAYS`].
    pub fn generate(now: OffsetDateTime) -> Result<Ca, TlsError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Sendense");
        p.distinguished_name.push(
            DnType::CommonName,
            format!("Sendense NBD CA {}", now.unix_timestamp()),
        );
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now - Duration::minutes(BACKDATE_MINUTES);
        p.not_after = now + Duration::days(CA_VALID_DAYS);
        let not_after = p.not_after;
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(p, key),
            not_after,
        })
    }

    /// The CA of a Secret's PEM certificate and key; None when they are not a usable pair.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Option<Ca> {
        let key = KeyPair::from_pem(key_pem).ok()?;
        let der = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .ok()?
            .1;
        let cert = der.parse_x509().ok()?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return None;
        }
        let not_after =
            OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).ok()?;
        Some(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            not_after,
        })
    }

    /// Whether the CA should be replaced at `now`.
    pub fn due_for_rotation(&self, now: OffsetDateTime) -> bool {
        self.not_after - now < Duration::days(CA_RENEW_BEFORE_DAYS)
    }

    /// A server certificate for `dns_name` and a client certificate with common name
    /// `client_cn`, valid from a few minutes before `now` for `days` (never past the CA).
    pub fn issue(
        &self,
        dns_name: &str,
        client_cn: &str,
        now: OffsetDateTime,
        days: i64,
    ) -> Result<AttemptCerts, TlsError> {
        let not_after = (now + Duration::days(days)).min(self.not_after);
        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(sans)?;
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.not_before = now - Duration::minutes(BACKDATE_MINUTES);
            p.not_after = not_after;
            let cert = p.signed_by(&key, &self.issuer)?;
            Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec![dns_name.to_owned()],
            dns_name,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) =
            leaf(vec![], client_cn, ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(AttemptCerts {
            ca_cert: self.cert_pem.clone(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }
}

/// The certificates of one attempt (PEM).
pub struct AttemptCerts {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// The name the hub's certificate carries and the agent checks (it dials the pod's IP): the
/// DNS name a Service `<job>-hub` of the namespace would have; none is made.
pub fn server_name(job: &BackupJob) -> String {
    format!(
        "{}.{}.svc",
        hub_name(job),
        job.namespace().unwrap_or_default()
    )
}

/// The common name of an attempt's agent certificate: the job's UID and the attempt, so that
/// neither another job's agent nor an earlier attempt's is accepted by this attempt's hub.
pub fn client_name(job: &BackupJob, attempt: i32) -> String {
    format!("sendense-agent.{}.{attempt}", job.uid().unwrap_or_default())
}

/// The identity qemu-nbd's `authz-simple` compares with the client certificate's subject.
pub fn client_identity(job: &BackupJob, attempt: i32) -> String {
    format!("CN={}", client_name(job, attempt))
}

/// The job's Secret holding its current attempt's certificates: `<job>-nbd-tls`.
pub fn secret_name(job: &BackupJob) -> String {
    format!("{}-nbd-tls", job.name_any())
}

/// The job's Secret for `attempt`, owned by the job (so it goes with it).
pub fn attempt_secret(job: &BackupJob, certs: &AttemptCerts) -> Secret {
    let mut labels = BTreeMap::new();
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        crate::resources::MANAGED_BY.to_owned(),
    );
    labels.insert(
        "app.kubernetes.io/component".to_owned(),
        "nbd-tls".to_owned(),
    );
    let data = [
        (CA_CERT_FILE, &certs.ca_cert),
        (SERVER_CERT_FILE, &certs.server_cert),
        (SERVER_KEY_FILE, &certs.server_key),
        (CLIENT_CERT_FILE, &certs.client_cert),
        (CLIENT_KEY_FILE, &certs.client_key),
    ];
    let data = secret_data(&data);
    Secret {
        metadata: owned_meta(job, secret_name(job), labels),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A Secret's data from (key, PEM text) pairs.
fn secret_data(pairs: &[(&str, &String)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn ca_secret(name: &str, ca: &Ca) -> Secret {
    let data = secret_data(&[(CA_CERT_KEY, &ca.cert_pem), (CA_KEY_KEY, &ca.key_pem)]);
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    crate::resources::MANAGED_BY.to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn ca_of(secret: &Secret) -> Option<Ca> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    Ca::from_pem(&text(CA_CERT_KEY)?, &text(CA_KEY_KEY)?)
}

/// The CA to issue with at `now`: the one in Secret `namespace/name`, or a new one stored
/// there when the Secret is missing, unusable or due for rotation. Two operators racing to
/// create it meet at the API server: the loser uses the winner's. `watched`: the Secret as
/// the operator's watch of it shows it; used without a read when it holds a CA not due for
/// rotation (anything else is decided on the API server's copy).
pub async fn current_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    now: OffsetDateTime,
    watched: Option<&Secret>,
) -> Result<Ca, TlsError> {
    if let Some(ca) = watched.and_then(ca_of)
        && !ca.due_for_rotation(now)
    {
        return Ok(ca);
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| TlsError::Secret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let existing = api.get_opt(name).await.map_err(err)?;
    if let Some(ca) = existing.as_ref().and_then(ca_of)
        && !ca.due_for_rotation(now)
    {
        return Ok(ca);
    }
    let ca = Ca::generate(now)?;
    let mut secret = ca_secret(name, &ca);
    let stored = match existing {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            tracing::info!(namespace, name, "rotating the NBD CA");
            // Replace only the version read (a conflict means another replaced it first).
            secret.metadata.resource_version = old.resource_version();
            api.replace(name, &PostParams::default(), &secret).await
        }
    };
    match stored {
        Ok(_) => {
            tracing::info!(namespace, name, not_after = %ca.not_after, "new NBD CA stored");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let winner = api.get(name).await.map_err(err)?;
            ca_of(&winner).ok_or_else(|| TlsError::Unusable {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
#[path = "nbd_tls_tests.rs"]
mod tests;
