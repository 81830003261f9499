//! Minting mesh certificates with rcgen: a CA, and leaf certificates that carry one SPIFFE URI
//! SAN each (plus DNS names), usable both as server and as client certificates. `meshctl certs`
//! and `meshctl up` use it to make a development PKI; tests use it to make CAs of every kind
//! (another CA, expired leaves). In a cluster, cert-manager or the operator's own CA does this.
//!
//! Files written by [`write_dev_pki`]: `ca.crt`, `ca.key`, and `<name>.crt` / `<name>.key` for
//! every service and for the operator (the identity grpcurl uses).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

/// The identity operators (grpcurl, meshctl) present.
pub const OPERATOR: &str = "operator";
/// Leaf certificates live this long by default; cert-manager renews far sooner in a cluster.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// The CA outlives every leaf it signs.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start being valid slightly in the past, so clock skew does not reject them.
const BACKDATE: Duration = Duration::from_secs(300);

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a little before now, for `lifetime`.
    pub fn starting_now(lifetime: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        }
    }

    /// A window that ended before now (for tests of expiry).
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::from_secs(2 * 24 * 3600),
            not_after: now - Duration::from_secs(24 * 3600),
        }
    }
}

/// A certificate authority that can sign mesh certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl CertificateAuthority {
    /// A new self-signed CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("Meshwork CA ({trust_domain})"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let validity = Validity::starting_now(CA_VALIDITY);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and key (as [`Self::cert_pem`] / [`Self::key_pem`] wrote).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A leaf certificate for `identity`, valid as server and client, naming `dns_names` too.
    pub fn issue(
        &self,
        identity: &SpiffeId,
        dns_names: &[&str],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(
            dns_names
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.to_string().try_into()?));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.service());
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The DNS names a service's certificate carries: its name (what mesh clients verify) and
/// `localhost` (what grpcurl verifies locally).
pub fn dns_names(service: &str) -> Vec<&str> {
    vec![service, "localhost"]
}

/// Writes a CA (unless `dir` has one) and a certificate for every name in `names` that has none
/// yet. Returns the names it issued certificates for.
pub fn write_dev_pki(
    dir: &Path,
    trust_domain: &str,
    namespace: &str,
    names: &[&str],
) -> Result<Vec<String>, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_cert = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let ca = if ca_cert.exists() && ca_key.exists() {
        CertificateAuthority::from_pem(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let ca = CertificateAuthority::generate(trust_domain)?;
        write(&ca_cert, ca.cert_pem(), false)?;
        write(&ca_key, ca.key_pem(), true)?;
        ca
    };
    let mut issued = Vec::new();
    for name in names {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        if cert.exists() && key.exists() {
            continue;
        }
        let identity = SpiffeId::new(trust_domain, namespace, name)?;
        let leaf = ca.issue(
            &identity,
            &dns_names(name),
            Validity::starting_now(DEFAULT_LEAF_VALIDITY),
        )?;
        write(&cert, &leaf.cert_pem, false)?;
        write(&key, &leaf.key_pem, true)?;
        issued.push((*name).to_owned());
    }
    Ok(issued)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents`; private keys are readable by their owner only.
pub fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn a_leaf_carries_its_spiffe_id() -> Result<(), Box<dyn std::error::Error>> {
        let ca = CertificateAuthority::generate("meshwork.local")?;
        let id = SpiffeId::new("meshwork.local", "default", "billing")?;
        let leaf = ca.issue(
            &id,
            &dns_names("billing"),
            Validity::starting_now(DEFAULT_LEAF_VALIDITY),
        )?;
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())?;
        assert_eq!(SpiffeId::from_certificate(&der)?, id);
        Ok(())
    }

    #[test]
    fn the_dev_pki_is_written_once() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let first = write_dev_pki(
            dir.path(),
            "meshwork.local",
            "default",
            &["users", OPERATOR],
        )?;
        assert_eq!(first, vec!["users", OPERATOR]);
        let again = write_dev_pki(
            dir.path(),
            "meshwork.local",
            "default",
            &["users", "orders"],
        )?;
        assert_eq!(again, vec!["orders"]);
        Ok(())
    }
}
