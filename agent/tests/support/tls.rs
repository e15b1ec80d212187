//! Certificates for NBD over TLS tests, in qemu's directory layout.

use std::path::Path;

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA that signs server and client certificates into qemu's directory layout.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        })
    }

    /// Writes `ca-cert.pem` and `{role}-cert.pem`/`{role}-key.pem` (role "server" or
    /// "client") into `dir`: a server certificate for the DNS name `name`, or a client one
    /// with the common name `name`.
    pub fn issue(&self, dir: &Path, role: &str, name: &str) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let key = KeyPair::generate()?;
        let mut p = if role == "server" {
            let mut p = CertificateParams::new(vec![name.to_owned()])?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p
        } else {
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p
        };
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &self.issuer)?;
        std::fs::write(dir.join("ca-cert.pem"), &self.cert_pem)?;
        std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem())?;
        Ok(())
    }
}
