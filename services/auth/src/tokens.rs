//! Access tokens as every service sees them: the [`Claims`] auth puts in them, and the
//! [`Verifier`] that checks a token against the key set auth publishes (`GetJwks`).
//!
//! Verification pins the algorithm to EdDSA (a token naming any other algorithm, `none` or an
//! HMAC one, is refused before its signature is looked at), finds the key by the header's `kid`,
//! and checks the signature, `iss`, `aud`, `exp` and `nbf`.
//!
//! ```text
//! let jwks = auth.get_jwks(GetJwksRequest {}).await?.into_inner();
//! let verifier = Verifier::new(&jwks, "meshwork-auth", "meshwork")?;
//! let claims = verifier.verify(&access_token)?;   // claims.sub is the user id
//! ```
//! An [`VerifyError::UnknownKey`] tells the caller to fetch the key set again: auth may have
//! started signing with a newer key.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use meshwork::auth::v1::{GetJwksResponse, Jwk};
use serde::{Deserialize, Serialize};

use crate::keys;

/// Tolerated clock difference between auth and a verifying service when checking `exp` and
/// `nbf`: clocks of machines in one cluster agree within this.
pub const CLOCK_SKEW_LEEWAY_SECS: u64 = 60;
/// Length of an Ed25519 public key.
const ED25519_PUBLIC_KEY_BYTES: usize = 32;
/// Claims a token must carry to be accepted.
const REQUIRED_CLAIMS: [&str; 5] = ["iss", "aud", "sub", "exp", "nbf"];

/// The claims of a Meshwork access token. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who issued the token (auth's configured issuer).
    pub iss: String,
    /// Who the token is for (the mesh's configured audience).
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// Issued at.
    pub iat: i64,
    /// Not valid before.
    pub nbf: i64,
    /// Expires at.
    pub exp: i64,
    /// Unique id of this token.
    pub jti: String,
}

/// Why a token or a key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("key `{kid}` in the key set is not a usable Ed25519 signature key: {reason}")]
    InvalidKey { kid: String, reason: String },
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token header names no key (`kid`)")]
    MissingKeyId,
    #[error("token is signed by unknown key `{0}`")]
    UnknownKey(String),
    #[error("token is not signed with EdDSA")]
    WrongAlgorithm,
    #[error("token signature is invalid")]
    InvalidSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has the wrong issuer")]
    WrongIssuer,
    #[error("token has the wrong audience")]
    WrongAudience,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(String),
}

/// Verifies access tokens against one key set, for one issuer and audience.
#[derive(Clone)]
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Verifier")
            .field("kids", &kids)
            .field("iss", &self.validation.iss)
            .field("aud", &self.validation.aud)
            .finish()
    }
}

impl Verifier {
    /// A verifier trusting every key of `jwks`; each must be an Ed25519 signature key.
    pub fn new(jwks: &GetJwksResponse, issuer: &str, audience: &str) -> Result<Self, VerifyError> {
        let keys = jwks
            .keys
            .iter()
            .map(|jwk| Ok((jwk.kid.clone(), decoding_key(jwk)?)))
            .collect::<Result<HashMap<_, _>, VerifyError>>()?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&REQUIRED_CLAIMS);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.leeway = CLOCK_SKEW_LEEWAY_SECS;
        Ok(Self { keys, validation })
    }

    /// Whether the key set holds `kid`.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The claims of `token` if it is a valid, current access token signed by one of the keys.
    pub fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(from_jwt)?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(VerifyError::MissingKeyId)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(from_jwt)
    }
}

/// The decoding key of one JWK, refusing anything but an Ed25519 signature key. The length is
/// checked here because the signature library would not check it before slicing.
fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, VerifyError> {
    let invalid = |reason: &str| VerifyError::InvalidKey {
        kid: jwk.kid.clone(),
        reason: reason.to_owned(),
    };
    if jwk.kid.is_empty() {
        return Err(invalid("it has no `kid`"));
    }
    if jwk.kty != keys::KEY_TYPE || jwk.crv != keys::CURVE {
        return Err(invalid("kty must be OKP and crv Ed25519"));
    }
    if !(jwk.alg.is_empty() || jwk.alg == keys::ALGORITHM) {
        return Err(invalid("alg must be EdDSA"));
    }
    if !(jwk.r#use.is_empty() || jwk.r#use == keys::USE_SIGNATURE) {
        return Err(invalid("use must be sig"));
    }
    match URL_SAFE_NO_PAD.decode(&jwk.x) {
        Ok(bytes) if bytes.len() == ED25519_PUBLIC_KEY_BYTES => {
            DecodingKey::from_ed_components(&jwk.x).map_err(|e| invalid(&e.to_string()))
        }
        Ok(_) => Err(invalid("x must be 32 bytes")),
        Err(_) => Err(invalid("x must be base64url without padding")),
    }
}

fn from_jwt(error: jsonwebtoken::errors::Error) -> VerifyError {
    match error.kind() {
        ErrorKind::InvalidSignature => VerifyError::InvalidSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        ErrorKind::InvalidAlgorithm => VerifyError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) => VerifyError::MissingClaim(claim.clone()),
        _ => VerifyError::Malformed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;
    use crate::keys::{KeyError, KeyRecord};

    const ISSUER: &str = "meshwork-auth";
    const AUDIENCE: &str = "meshwork";
    const HOUR: i64 = 3600;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn now() -> i64 {
        mesh::timestamp::now_millis() / 1000
    }

    fn claims() -> Claims {
        let now = now();
        Claims {
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            sub: "user-1".to_owned(),
            iat: now,
            nbf: now,
            exp: now + HOUR,
            jti: "jti-1".to_owned(),
        }
    }

    fn sign(
        record: &KeyRecord,
        kid: &str,
        claims: &Claims,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let key = record.signing_key()?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, key.encoding_key())?)
    }

    fn verifier(record: &KeyRecord) -> Result<Verifier, VerifyError> {
        let jwks = GetJwksResponse {
            keys: vec![record.jwk()],
        };
        Verifier::new(&jwks, ISSUER, AUDIENCE)
    }

    fn setup() -> Result<(KeyRecord, Verifier), Box<dyn std::error::Error>> {
        let record = KeyRecord::generate(0)?;
        let verifier = verifier(&record)?;
        Ok((record, verifier))
    }

    #[test]
    fn valid_token_gives_its_claims() -> TestResult {
        let (record, verifier) = setup()?;
        let claims = claims();
        let token = sign(&record, &record.kid, &claims)?;
        assert_eq!(verifier.verify(&token)?, claims);
        Ok(())
    }

    #[test]
    fn tampered_payload_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let token = sign(&record, &record.kid, &claims())?;
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims();
        forged.sub = "someone-else".to_owned();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged)?);
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(
            verifier.verify(&tampered),
            Err(VerifyError::InvalidSignature)
        );
        Ok(())
    }

    #[test]
    fn token_signed_by_another_key_with_a_known_kid_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let intruder = KeyRecord::generate(0)?;
        let token = sign(&intruder, &record.kid, &claims())?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::InvalidSignature));
        Ok(())
    }

    #[test]
    fn token_naming_an_unknown_key_fails() -> TestResult {
        let (_, verifier) = setup()?;
        let intruder = KeyRecord::generate(0)?;
        let token = sign(&intruder, &intruder.kid, &claims())?;
        assert_eq!(
            verifier.verify(&token),
            Err(VerifyError::UnknownKey(intruder.kid))
        );
        Ok(())
    }

    #[test]
    fn hmac_token_is_refused_whatever_its_key() -> TestResult {
        let (record, verifier) = setup()?;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(record.kid.clone());
        // An attacker "signing" with the public key as an HMAC secret: the classic confusion.
        let secret = EncodingKey::from_secret(record.public_key.as_bytes());
        let token = jsonwebtoken::encode(&header, &claims(), &secret)?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::WrongAlgorithm));
        Ok(())
    }

    #[test]
    fn expired_token_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let mut claims = claims();
        claims.exp = now() - HOUR;
        let token = sign(&record, &record.kid, &claims)?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::Expired));
        Ok(())
    }

    #[test]
    fn token_not_yet_valid_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let mut claims = claims();
        claims.nbf = now() + HOUR;
        claims.exp = now() + 2 * HOUR;
        let token = sign(&record, &record.kid, &claims)?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::NotYetValid));
        Ok(())
    }

    #[test]
    fn wrong_issuer_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let mut claims = claims();
        claims.iss = "someone-else".to_owned();
        let token = sign(&record, &record.kid, &claims)?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::WrongIssuer));
        Ok(())
    }

    #[test]
    fn wrong_audience_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let mut claims = claims();
        claims.aud = "another-mesh".to_owned();
        let token = sign(&record, &record.kid, &claims)?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::WrongAudience));
        Ok(())
    }

    #[test]
    fn token_without_kid_fails() -> TestResult {
        let (record, verifier) = setup()?;
        let key = record.signing_key()?;
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims(),
            key.encoding_key(),
        )?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::MissingKeyId));
        Ok(())
    }

    #[test]
    fn garbage_is_malformed() -> Result<(), KeyError> {
        let record = KeyRecord::generate(0)?;
        let verifier = verifier(&record);
        assert!(matches!(
            verifier.map(|v| v.verify("not.a.token")),
            Ok(Err(VerifyError::Malformed(_)))
        ));
        Ok(())
    }

    #[test]
    fn short_public_key_is_refused_not_a_panic() -> Result<(), KeyError> {
        let mut jwk = KeyRecord::generate(0)?.jwk();
        jwk.x = URL_SAFE_NO_PAD.encode([1u8; 4]);
        let result = Verifier::new(&GetJwksResponse { keys: vec![jwk] }, ISSUER, AUDIENCE);
        assert!(matches!(result, Err(VerifyError::InvalidKey { .. })));
        Ok(())
    }

    #[test]
    fn non_ed25519_key_is_refused() -> Result<(), KeyError> {
        let mut jwk = KeyRecord::generate(0)?.jwk();
        jwk.kty = "RSA".to_owned();
        let result = Verifier::new(&GetJwksResponse { keys: vec![jwk] }, ISSUER, AUDIENCE);
        assert!(matches!(result, Err(VerifyError::InvalidKey { .. })));
        Ok(())
    }
}
