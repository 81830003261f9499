//! Password hashing with Argon2id (the `argon2` crate's defaults, stored as PHC strings). Both
//! hashing and verification are deliberately expensive, so they run on the blocking pool and
//! never stall the async workers.
//!
//! Verifying against an unknown account still costs one verification, against
//! [`DUMMY_HASH`], so that response time does not tell whether an email is registered.

use argon2::{
    Argon2, PasswordHasher, PasswordVerifier,
    password_hash::{PasswordHash, SaltString},
};

use crate::{domain::Password, error::DomainError};

/// A PHC string made with `Argon2::default()` (argon2id, m=19456, t=2, p=1) from 32 random
/// bytes that were then thrown away; a unit test checks that its parameters stay those of the default.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$zYbbRiNi0uay64hgnXxVyg$\
     ZSQCD8fuoS0mtFkLHPGt1565NmhQPFjsxSS0r99jJak";

/// Hashes a new password into a PHC string, with a fresh random salt.
pub async fn hash(password: Password) -> Result<String, DomainError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        Argon2::default()
            .hash_password(password.expose().as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| DomainError::Internal(format!("hashing the password: {e}")))
    })
    .await
    .map_err(|e| DomainError::Internal(format!("password hashing task: {e}")))?
}

/// Whether `password` matches `stored` (a PHC string); with no stored hash (unknown account)
/// the same work is done against [`DUMMY_HASH`] and the answer is `false`.
pub async fn verify(password: Password, stored: Option<String>) -> Result<bool, DomainError> {
    tokio::task::spawn_blocking(move || {
        let known = stored.is_some();
        let phc = stored.as_deref().unwrap_or(DUMMY_HASH);
        let parsed = PasswordHash::new(phc).map_err(|e| {
            DomainError::Internal(format!("stored password hash is unreadable: {e}"))
        })?;
        let matches = Argon2::default()
            .verify_password(password.expose().as_bytes(), &parsed)
            .is_ok();
        Ok(known && matches)
    })
    .await
    .map_err(|e| DomainError::Internal(format!("password verification task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn password(raw: &str) -> Result<Password, DomainError> {
        Password::parse(raw.to_owned()).map_err(DomainError::Internal)
    }

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() -> Result<(), DomainError> {
        let stored = hash(password("correct horse battery")?).await?;
        assert!(stored.starts_with("$argon2id$"));
        assert!(verify(password("correct horse battery")?, Some(stored.clone())).await?);
        assert!(!verify(password("wrong horse battery")?, Some(stored)).await?);
        Ok(())
    }

    #[tokio::test]
    async fn same_password_gets_a_different_salt() -> Result<(), DomainError> {
        let a = hash(password("correct horse battery")?).await?;
        let b = hash(password("correct horse battery")?).await?;
        assert_ne!(a, b);
        Ok(())
    }

    #[tokio::test]
    async fn unknown_account_never_verifies() -> Result<(), DomainError> {
        assert!(!verify(password("correct horse battery")?, None).await?);
        Ok(())
    }

    #[test]
    fn dummy_hash_costs_what_a_real_one_costs() -> Result<(), argon2::password_hash::Error> {
        let dummy = PasswordHash::new(DUMMY_HASH)?;
        let salt = SaltString::encode_b64(b"any salt value")?;
        let real = Argon2::default().hash_password(b"x", &salt)?;
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        Ok(())
    }
}
