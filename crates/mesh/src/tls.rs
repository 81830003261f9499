//! Mutual TLS for every mesh connection, with rustls only. A [`MeshTls`] holds this process's
//! certificate, key and the mesh CA bundle as rustls server and client configurations: servers
//! accept only TLS 1.3 clients presenting a certificate from the mesh CA; clients present their
//! own and verify the server's chain against the CA and its SPIFFE identity (the transport then
//! checks it is the service meant), not a DNS name: in a cluster a replica is reached by its pod
//! IP, which no certificate names.
//!
//! The files are re-read every `reload_interval` ([`MeshTls::watch`]); when they change (a
//! Kubernetes Secret update, a cert-manager renewal) the new configuration is swapped in
//! atomically: new handshakes use it, established connections keep theirs. A half-written or
//! invalid set of files is logged and ignored until it becomes valid.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use serde::{Deserialize, Serialize};

use crate::{config::ConfigError, identity::SpiffeId};

/// The trust domain of identities when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshwork.local";
/// The only application protocol spoken over the mesh.
const ALPN_H2: &[u8] = b"h2";
/// How often certificate files are checked for changes by default.
const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Where a process's mesh certificate, key and CA bundle are, and whom to trust.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; the leaf carries the SPIFFE ID.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// PEM bundle of the mesh CA certificates: peers must chain to one of them.
    pub ca_file: PathBuf,
    /// Identities from other trust domains are refused.
    pub trust_domain: String,
    /// How often the files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl TlsConfig {
    /// The files `meshctl certs` writes for `name` under `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
            ca_file: dir.join("ca.crt"),
            ..Self::default()
        }
    }

    /// The local development certificates of `name` (what `meshctl up` creates).
    pub fn local(name: &str) -> Self {
        Self::in_dir(Path::new(".meshwork/certs"), name)
    }

    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, path) in [
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("ca_file", &self.ca_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    format!("{prefix}.{key}"),
                    "must be set",
                ));
            }
        }
        if self.trust_domain.is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.trust_domain"),
                "must be set",
            ));
        }
        if self.reload_interval.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.reload_interval"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        }
    }
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: crate::identity::IdentityError,
    },
    #[error("certificate identity {identity} is not in trust domain {trust_domain}")]
    TrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// One loaded, consistent set of certificate, key and CA.
struct Material {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    identity: SpiffeId,
    /// The files' bytes, to tell whether they changed.
    source: Vec<u8>,
}

struct Inner {
    config: TlsConfig,
    current: ArcSwap<Material>,
}

/// This process's mesh TLS configuration, reloadable. Cheap to clone.
#[derive(Clone)]
pub struct MeshTls {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("identity", &self.identity().to_string())
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Loads the files `config` names.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let source = read_all(config)?;
        let material = build(config, source)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                current: ArcSwap::from_pointee(material),
            }),
        })
    }

    /// This process's own identity.
    pub fn identity(&self) -> SpiffeId {
        self.inner.current.load().identity.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.config.trust_domain
    }

    /// The server configuration new handshakes use now.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.current.load().server.clone()
    }

    /// The client configuration new connections use now.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.inner.current.load().client.clone()
    }

    /// Re-reads the files; swaps in the new material if they changed. `Ok(true)` if swapped.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let source = read_all(&self.inner.config)?;
        if source == self.inner.current.load().source {
            return Ok(false);
        }
        let material = build(&self.inner.config, source)?;
        tracing::info!(identity = %material.identity, "mesh certificate reloaded");
        self.inner.current.store(Arc::new(material));
        Ok(true)
    }

    /// Checks the files every `reload_interval` until every clone of this `MeshTls` is gone.
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let interval = self.inner.config.reload_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { break };
                let tls = MeshTls { inner };
                if let Err(error) = tls.reload_if_changed() {
                    tracing::warn!(%error, "mesh certificate files changed but cannot be used yet; keeping the current ones");
                }
            }
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The three files, concatenated with their lengths (so a byte moving between files counts).
fn read_all(config: &TlsConfig) -> Result<Vec<u8>, TlsError> {
    let mut all = Vec::new();
    for path in [&config.cert_file, &config.key_file, &config.ca_file] {
        let bytes = read(path)?;
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend_from_slice(&bytes);
    }
    Ok(all)
}

fn build(config: &TlsConfig, source: Vec<u8>) -> Result<Material, TlsError> {
    let pem_error = |path: &Path, what| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(&config.cert_file)?)
            .collect::<Result<_, _>>()
            .map_err(|_| pem_error(&config.cert_file, "certificate"))?;
    let Some(leaf) = certs.first() else {
        return Err(pem_error(&config.cert_file, "certificate"));
    };
    let identity = SpiffeId::from_certificate(leaf).map_err(|source| TlsError::Identity {
        path: config.cert_file.clone(),
        source,
    })?;
    if identity.trust_domain() != config.trust_domain {
        return Err(TlsError::TrustDomain {
            identity,
            trust_domain: config.trust_domain.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&config.key_file)?)
        .map_err(|_| pem_error(&config.key_file, "private key"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&config.ca_file)?) {
        let ca = ca.map_err(|_| pem_error(&config.ca_file, "CA certificate"))?;
        roots.add(ca)?;
    }
    if roots.is_empty() {
        return Err(pem_error(&config.ca_file, "CA certificate"));
    }
    let roots = Arc::new(roots);

    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];

    let verifier = Arc::new(MeshServerVerifier {
        roots,
        provider: provider(),
        trust_domain: config.trust_domain.clone(),
    });
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    Ok(Material {
        server: Arc::new(server),
        client: Arc::new(client),
        identity,
        source,
    })
}

/// Verifies a server by its chain to the mesh CA and its SPIFFE identity in our trust domain,
/// ignoring the DNS name: mesh peers are named by identity, and reached by (pod) address.
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match SpiffeId::from_certificate(end_entity) {
            Ok(identity) if identity.trust_domain() == self.trust_domain => {
                Ok(ServerCertVerified::assertion())
            }
            Ok(identity) => Err(rustls::Error::General(format!(
                "server identity {identity} is outside trust domain {}",
                self.trust_domain
            ))),
            Err(error) => Err(rustls::Error::General(format!(
                "server certificate carries no mesh identity: {error}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, DEFAULT_LEAF_VALIDITY, Validity, dns_names, write};

    fn issue(
        ca: &CertificateAuthority,
        dir: &Path,
        name: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let id = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", name)?;
        let leaf = ca.issue(
            &id,
            &dns_names(name),
            Validity::starting_now(DEFAULT_LEAF_VALIDITY),
        )?;
        write(&dir.join(format!("{name}.crt")), &leaf.cert_pem, false)?;
        write(&dir.join(format!("{name}.key")), &leaf.key_pem, true)?;
        write(&dir.join("ca.crt"), ca.cert_pem(), false)?;
        Ok(())
    }

    #[test]
    fn loads_the_identity_from_the_certificate() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        issue(
            &CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?,
            dir.path(),
            "users",
        )?;
        let tls = MeshTls::load(&TlsConfig::in_dir(dir.path(), "users"))?;
        assert_eq!(tls.identity().service(), "users");
        Ok(())
    }

    #[test]
    fn another_trust_domain_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        issue(
            &CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?,
            dir.path(),
            "users",
        )?;
        let config = TlsConfig {
            trust_domain: "elsewhere.example".into(),
            ..TlsConfig::in_dir(dir.path(), "users")
        };
        assert!(matches!(
            MeshTls::load(&config),
            Err(TlsError::TrustDomain { .. })
        ));
        Ok(())
    }

    #[test]
    fn reload_swaps_only_when_files_change() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let ca = CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?;
        issue(&ca, dir.path(), "users")?;
        let tls = MeshTls::load(&TlsConfig::in_dir(dir.path(), "users"))?;
        let before = tls.server_config();
        assert!(!tls.reload_if_changed()?);
        issue(&ca, dir.path(), "users")?;
        assert!(tls.reload_if_changed()?);
        assert!(!Arc::ptr_eq(&before, &tls.server_config()));
        Ok(())
    }

    #[test]
    fn a_broken_file_keeps_the_current_material() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        issue(
            &CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?,
            dir.path(),
            "users",
        )?;
        let tls = MeshTls::load(&TlsConfig::in_dir(dir.path(), "users"))?;
        let before = tls.server_config();
        std::fs::write(dir.path().join("users.crt"), "half a certifi")?;
        assert!(tls.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&before, &tls.server_config()));
        Ok(())
    }
}
