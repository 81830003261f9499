//! Service identities. Every mesh certificate carries exactly one URI SAN, a SPIFFE ID
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`; the server reads the caller's from the
//! verified client certificate and puts a [`PeerInfo`] into every request's extensions, where
//! handlers and the authorization layer find it with [`caller`].

use std::{fmt, net::SocketAddr};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// A SPIFFE ID of the form the mesh issues: `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service: String,
}

/// Why a text or a certificate does not carry a mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not spiffe://<trust-domain>/ns/<namespace>/sa/<service>")]
    Malformed(String),
    #[error("the certificate cannot be parsed")]
    Certificate,
    #[error("the certificate carries {0} SPIFFE URI SANs, not exactly one")]
    UriSanCount(usize),
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service: &str) -> Result<Self, IdentityError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
        ))
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed(text.to_owned());
        let rest = text.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service] = parts.as_slice() else {
            return Err(malformed());
        };
        let valid = |segment: &str| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        if !(valid(trust_domain) && valid(namespace) && valid(service)) {
            return Err(malformed());
        }
        Ok(Self {
            trust_domain: (*trust_domain).to_owned(),
            namespace: (*namespace).to_owned(),
            service: (*service).to_owned(),
        })
    }

    /// The identity in a DER certificate: its one `spiffe://` URI SAN.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|_| IdentityError::Certificate)?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|_| IdentityError::Certificate)?
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [one] => Self::parse(one),
            other => Err(IdentityError::UriSanCount(other.len())),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service (Kubernetes service account) name.
    pub fn service(&self) -> &str {
        &self.service
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

/// What the server knows about the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The verified identity of the caller's certificate.
    pub identity: Option<SpiffeId>,
}

/// The verified identity of whoever made `request`, if it came over mutual TLS.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&SpiffeId> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|peer| peer.identity.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spiffe_id_round_trips() {
        let text = "spiffe://meshwork.local/ns/default/sa/orders";
        let id = SpiffeId::parse(text);
        assert_eq!(id.as_ref().map(ToString::to_string), Ok(text.to_owned()));
        assert_eq!(
            id.map(|id| id.service().to_owned()),
            Ok("orders".to_owned())
        );
    }

    #[test]
    fn other_shapes_are_rejected() {
        for bad in [
            "https://meshwork.local/ns/default/sa/orders",
            "spiffe://meshwork.local/orders",
            "spiffe://meshwork.local/ns//sa/orders",
            "spiffe://meshwork.local/ns/default/sa/orders/extra",
            "spiffe://meshwork.local/ns/default/sa/or ders",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
