//! Helpers for tests that run mesh servers in-process: a throw-away PKI in a temp dir with a
//! certificate for every service and the operator, and mutual-TLS client channels from it.
//! (Databases for tests are in [`crate::store::testing`].)

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    client::{ClientError, MeshChannel},
    config::ClientConfig,
    identity::SpiffeId,
    pki::{self, CertificateAuthority, PkiError, Validity},
    tls::{DEFAULT_TRUST_DOMAIN, MeshTls, TlsConfig, TlsError},
};

/// Every name a test PKI issues a certificate for by default.
pub const NAMES: [&str; 5] = ["users", "auth", "billing", "orders", pki::OPERATOR];
/// Tests notice certificate changes quickly.
const TEST_RELOAD_INTERVAL: Duration = Duration::from_millis(50);
/// Test clients give up on a dead endpoint fast.
const TEST_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A CA and certificates in a directory, for one test.
pub struct TestPki {
    dir: PathBuf,
    ca: CertificateAuthority,
}

/// Why a test PKI could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TestPkiError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

impl TestPki {
    /// A new CA in `dir`, with certificates for [`NAMES`].
    pub fn new(dir: &Path) -> Result<Self, TestPkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca = CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?;
        pki::write(&dir.join("ca.crt"), ca.cert_pem(), false)?;
        let pki = Self {
            dir: dir.to_path_buf(),
            ca,
        };
        for name in NAMES {
            pki.issue(name, Validity::starting_now(pki::DEFAULT_LEAF_VALIDITY))?;
        }
        Ok(pki)
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// (Re)issues `name`'s certificate with `validity`, replacing the files.
    pub fn issue(&self, name: &str, validity: Validity) -> Result<(), TestPkiError> {
        let identity = SpiffeId::new(DEFAULT_TRUST_DOMAIN, "default", name)?;
        let leaf = self.ca.issue(&identity, &pki::dns_names(name), validity)?;
        pki::write(&self.dir.join(format!("{name}.crt")), &leaf.cert_pem, false)?;
        pki::write(&self.dir.join(format!("{name}.key")), &leaf.key_pem, true)?;
        Ok(())
    }

    /// The TLS configuration of `name`.
    pub fn config(&self, name: &str) -> TlsConfig {
        TlsConfig {
            reload_interval: TEST_RELOAD_INTERVAL,
            ..TlsConfig::in_dir(&self.dir, name)
        }
    }

    /// Loaded TLS material of `name`.
    pub fn tls(&self, name: &str) -> Result<MeshTls, TestPkiError> {
        Ok(MeshTls::load(&self.config(name))?)
    }

    /// Client configuration for a server at `addr`.
    pub fn client_config(addr: SocketAddr) -> ClientConfig {
        ClientConfig {
            connect_timeout: TEST_CONNECT_TIMEOUT,
            ..ClientConfig::to(format!("https://{addr}"))
        }
    }

    /// A mutual-TLS channel to `service` at `addr`, presenting `as_name`'s certificate.
    pub fn channel_as(
        &self,
        as_name: &str,
        addr: SocketAddr,
        service: &str,
    ) -> Result<MeshChannel, TestPkiError> {
        let tls = self.tls(as_name)?;
        Ok(crate::client::connect(
            &Self::client_config(addr),
            &tls,
            service,
        )?)
    }

    /// A mutual-TLS channel to `service` at `addr` as the operator (admitted everywhere).
    pub fn channel(&self, addr: SocketAddr, service: &str) -> Result<MeshChannel, TestPkiError> {
        self.channel_as(pki::OPERATOR, addr, service)
    }
}
