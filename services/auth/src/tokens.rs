//! Access tokens as auth issues them: the claims and their verification live in
//! [`mesh::jwt`], shared by every service; re-exported here for auth's own code and tests.

pub use mesh::jwt::{CLOCK_SKEW_LEEWAY_SECS, Claims, Verifier, VerifyError};

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use jsonwebtoken::Algorithm;
    use meshwork::auth::v1::GetJwksResponse;

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
        let record = KeyRecord::generate(0, 0)?;
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
        let intruder = KeyRecord::generate(0, 0)?;
        let token = sign(&intruder, &record.kid, &claims())?;
        assert_eq!(verifier.verify(&token), Err(VerifyError::InvalidSignature));
        Ok(())
    }

    #[test]
    fn token_naming_an_unknown_key_fails() -> TestResult {
        let (_, verifier) = setup()?;
        let intruder = KeyRecord::generate(0, 0)?;
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
        let record = KeyRecord::generate(0, 0)?;
        let verifier = verifier(&record);
        assert!(matches!(
            verifier.map(|v| v.verify("not.a.token")),
            Ok(Err(VerifyError::Malformed(_)))
        ));
        Ok(())
    }

    #[test]
    fn short_public_key_is_refused_not_a_panic() -> Result<(), KeyError> {
        let mut jwk = KeyRecord::generate(0, 0)?.jwk();
        jwk.x = URL_SAFE_NO_PAD.encode([1u8; 4]);
        let result = Verifier::new(&GetJwksResponse { keys: vec![jwk] }, ISSUER, AUDIENCE);
        assert!(matches!(result, Err(VerifyError::InvalidKey { .. })));
        Ok(())
    }

    #[test]
    fn non_ed25519_key_is_refused() -> Result<(), KeyError> {
        let mut jwk = KeyRecord::generate(0, 0)?.jwk();
        jwk.kty = "RSA".to_owned();
        let result = Verifier::new(&GetJwksResponse { keys: vec![jwk] }, ISSUER, AUDIENCE);
        assert!(matches!(result, Err(VerifyError::InvalidKey { .. })));
        Ok(())
    }
}
