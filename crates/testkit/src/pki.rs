//! Certificates made at run time for TLS tests and benchmarks: a CA and leaves for
//! localhost / 127.0.0.1, valid for server and client auth, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A certificate authority; `pem` is its certificate's file.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: PathBuf,
}

impl Ca {
    /// A new CA, its certificate written to `dir/<name>-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("Tandem test CA {name}"));
        let cert = p.self_signed(&key)?;
        let pem = dir.join(format!("{name}-ca.crt"));
        std::fs::write(&pem, cert.pem())?;
        Ok(Self { cert, key, pem })
    }

    /// A certificate for localhost / 127.0.0.1 (server and client auth) signed by this CA,
    /// written to `dir/<name>.crt` and `dir/<name>.key` (the key first: overwriting both is a
    /// rotation that a reloading server sees whole). Returns (certificate, key).
    pub fn leaf(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["localhost".to_owned()])?;
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&k, key.serialize_pem())?;
        std::fs::write(&c, cert.pem())?;
        Ok((c, k))
    }
}
