//! Issuing access tokens: the claims of a new token for a user, signed with the key it is
//! given (the key ring's current one). Verification is [`crate::tokens::Verifier`]'s job; this
//! module only signs.

use std::{fmt, time::Duration};

use jsonwebtoken::{Algorithm, Header};
use secrecy::{ExposeSecret, SecretString};

use crate::{config::TokenConfig, error::DomainError, keys::SigningKey, tokens::Claims};

/// The `typ` header of every access token.
const TOKEN_TYPE: &str = "JWT";
const MILLIS_PER_SECOND: i64 = 1000;

/// A signed access token and how long it lives. Its `Debug` shows only the lifetime: the token
/// is a bearer credential.
#[derive(Clone)]
pub struct AccessToken {
    pub token: SecretString,
    pub expires_in: Duration,
}

impl AccessToken {
    /// The token itself, to hand to its holder.
    pub fn expose(&self) -> &str {
        self.token.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Signs access tokens for one issuer and audience.
#[derive(Debug, Clone)]
pub struct Issuer {
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl Issuer {
    pub fn new(config: &TokenConfig) -> Self {
        Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            ttl: config.access_ttl,
        }
    }

    /// A token for `user_id` signed by `key`, valid from `now_ms` for the configured lifetime.
    pub fn issue(
        &self,
        key: &SigningKey,
        user_id: &str,
        now_ms: i64,
    ) -> Result<AccessToken, DomainError> {
        let now = now_ms.div_euclid(MILLIS_PER_SECOND);
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user_id.to_owned(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some(TOKEN_TYPE.to_owned());
        header.kid = Some(key.kid().to_owned());
        let token = jsonwebtoken::encode(&header, &claims, key.encoding_key())
            .map_err(|e| DomainError::Internal(format!("signing an access token: {e}")))?;
        Ok(AccessToken {
            token: token.into(),
            expires_in: Duration::from_secs(self.ttl.as_secs()),
        })
    }
}

#[cfg(test)]
mod tests {
    use meshwork::auth::v1::GetJwksResponse;

    use super::*;
    use crate::{keys::KeyRecord, tokens::Verifier};

    #[test]
    fn issued_token_carries_the_configured_claims() -> Result<(), Box<dyn std::error::Error>> {
        let record = KeyRecord::generate(0, 0)?;
        let config = TokenConfig::default();
        let issuer = Issuer::new(&config);
        let now_ms = mesh::timestamp::now_millis();
        let access = issuer.issue(&record.signing_key()?, "user-7", now_ms)?;

        let header = jsonwebtoken::decode_header(access.expose())?;
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some(record.kid.as_str()));

        let jwks = GetJwksResponse {
            keys: vec![record.jwk()],
        };
        let claims =
            Verifier::new(&jwks, &config.issuer, &config.audience)?.verify(access.expose())?;
        assert_eq!(claims.sub, "user-7");
        assert_eq!(claims.iat, now_ms / 1000);
        assert_eq!(claims.nbf, claims.iat);
        assert_eq!(claims.exp - claims.iat, 15 * 60);
        assert_eq!(access.expires_in, config.access_ttl);
        assert!(!claims.jti.is_empty());
        Ok(())
    }

    #[test]
    fn every_token_has_its_own_id() -> Result<(), Box<dyn std::error::Error>> {
        let issuer = Issuer::new(&TokenConfig::default());
        let key = KeyRecord::generate(0, 0)?.signing_key()?;
        let a = issuer.issue(&key, "u", 0)?;
        let b = issuer.issue(&key, "u", 0)?;
        let a = jsonwebtoken::dangerous::insecure_decode::<Claims>(a.expose())?;
        let b = jsonwebtoken::dangerous::insecure_decode::<Claims>(b.expose())?;
        assert_ne!(a.claims.jti, b.claims.jti);
        Ok(())
    }

    #[test]
    fn access_tokens_do_not_print() -> Result<(), Box<dyn std::error::Error>> {
        let issuer = Issuer::new(&TokenConfig::default());
        let access = issuer.issue(&KeyRecord::generate(0, 0)?.signing_key()?, "u", 0)?;
        let printed = format!("{access:?}");
        assert!(!printed.contains(access.expose()), "{printed}");
        // Not even the header or the claims: no part of the token is printed.
        let header = access.expose().split('.').next().unwrap_or_default();
        assert!(!printed.contains(header), "{printed}");
        Ok(())
    }
}
