//! Ed25519 signing keys: generating one, the form the database keeps it in, the in-memory key
//! that signs access tokens, and the public half as a JWK (RFC 8037).
//!
//! A private key appears only in [`KeyRecord`] and [`SigningKey`], whose `Debug` leaves it out,
//! so no log line can carry it.

use std::fmt;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::EncodingKey;
use meshwork::auth::v1::Jwk;

pub use mesh::jwt::{ALGORITHM, CURVE, KEY_TYPE, USE_SIGNATURE};

/// Why a key could not be made or read back.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("encoding a new signing key: {0}")]
    Encode(String),
    #[error("stored signing key `{kid}` is unreadable: {reason}")]
    Corrupt { kid: String, reason: String },
}

/// A signing key as stored: the private key as base64 PKCS#8 DER, the public key as the
/// base64url (no padding) of its 32 bytes, which is also its JWK `x`. Keys are numbered by
/// `generation`: the key of generation `n + 1` replaces the key of generation `n`.
#[derive(Clone, sqlx::FromRow)]
pub struct KeyRecord {
    pub kid: String,
    pub private_key_pkcs8: String,
    pub public_key: String,
    pub generation: i64,
    pub create_ms: i64,
}

impl KeyRecord {
    /// A fresh key of `generation` from the operating system's randomness, named by a
    /// time-ordered id.
    pub fn generate(generation: i64, create_ms: i64) -> Result<Self, KeyError> {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let der = key
            .to_pkcs8_der()
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok(Self {
            kid: uuid::Uuid::now_v7().to_string(),
            private_key_pkcs8: STANDARD.encode(der.as_bytes()),
            public_key: URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes()),
            generation,
            create_ms,
        })
    }

    /// The key that signs with this record's private key.
    pub fn signing_key(&self) -> Result<SigningKey, KeyError> {
        let corrupt = |reason: String| KeyError::Corrupt {
            kid: self.kid.clone(),
            reason,
        };
        let der = STANDARD
            .decode(&self.private_key_pkcs8)
            // The decoder's message quotes a character of the key: it is left out.
            .map_err(|_| corrupt("private key is not base64".to_owned()))?;
        let key = ed25519_dalek::SigningKey::from_pkcs8_der(&der)
            .map_err(|e| corrupt(format!("private key is not Ed25519 PKCS#8: {e}")))?;
        if URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes()) != self.public_key {
            return Err(corrupt(
                "public key does not match the private key".to_owned(),
            ));
        }
        Ok(SigningKey {
            kid: self.kid.clone(),
            encoding: EncodingKey::from_ed_der(&der),
        })
    }

    /// The public half, as GetJwks publishes it.
    #[cfg(test)]
    pub fn jwk(&self) -> Jwk {
        jwk(self.kid.clone(), self.public_key.clone())
    }
}

/// The JWK of the Ed25519 public key `public_key` (base64url, no padding) named `kid`.
pub fn jwk(kid: String, public_key: String) -> Jwk {
    Jwk {
        kid,
        kty: KEY_TYPE.to_owned(),
        crv: CURVE.to_owned(),
        x: public_key,
        alg: ALGORITHM.to_owned(),
        r#use: USE_SIGNATURE.to_owned(),
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("kid", &self.kid)
            .field("public_key", &self.public_key)
            .field("generation", &self.generation)
            .field("create_ms", &self.create_ms)
            .finish_non_exhaustive()
    }
}

/// The private key that signs access tokens, with the `kid` that names it in the JWKS.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
}

impl SigningKey {
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_reads_back() -> Result<(), KeyError> {
        let record = KeyRecord::generate(0, 1)?;
        let key = record.signing_key()?;
        assert_eq!(key.kid(), record.kid);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&record.public_key).map(|b| b.len()),
            Ok(32)
        );
        Ok(())
    }

    #[test]
    fn debug_never_shows_the_private_key() -> Result<(), KeyError> {
        let record = KeyRecord::generate(0, 1)?;
        let printed = format!("{record:?} {:?}", record.signing_key()?);
        assert!(!printed.contains(&record.private_key_pkcs8));
        assert!(printed.contains(&record.kid));
        Ok(())
    }

    #[test]
    fn mismatched_public_key_is_corrupt() -> Result<(), KeyError> {
        let mut record = KeyRecord::generate(0, 1)?;
        record.public_key = KeyRecord::generate(0, 1)?.public_key;
        assert!(matches!(
            record.signing_key(),
            Err(KeyError::Corrupt { .. })
        ));
        Ok(())
    }

    #[test]
    fn jwk_is_an_ed25519_signature_key() -> Result<(), KeyError> {
        let record = KeyRecord::generate(0, 1)?;
        let jwk = record.jwk();
        assert_eq!(
            (
                jwk.kty.as_str(),
                jwk.crv.as_str(),
                jwk.alg.as_str(),
                jwk.r#use.as_str()
            ),
            ("OKP", "Ed25519", "EdDSA", "sig")
        );
        assert_eq!((jwk.kid, jwk.x), (record.kid, record.public_key));
        Ok(())
    }
}
