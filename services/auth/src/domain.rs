//! The values auth works with, each parsed once at the edge so that past it they are known to
//! be well-formed: a [`Password`] of acceptable length, a [`LoginEmail`] normalised the way users
//! normalises it, and refresh tokens ([`RefreshToken`], stored only as a [`RefreshTokenHash`]).
//!
//! Email *validity* is the users service's business (it owns profiles and their rules); auth
//! only normalises an email to look credentials up by it.
//!
//! Secrets (passwords, refresh tokens) are held in [`SecretString`]s: their `Debug` prints
//! nothing of them, and their memory is wiped when dropped. Reading one takes an explicit
//! `expose`.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// Shortest password accepted at registration: below this, guessing is too cheap.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted: hashing cost grows with length, so it is bounded.
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Random bytes in a refresh token: 256 bits, beyond guessing.
const REFRESH_TOKEN_BYTES: usize = 32;

/// A password of acceptable length. Its `Debug` never shows it.
#[derive(Clone)]
pub struct Password(SecretString);

impl Password {
    /// A password for a new account: 8 to 1024 characters.
    pub fn parse(raw: String) -> Result<Self, String> {
        let chars = raw.chars().count();
        if chars < MIN_PASSWORD_CHARS {
            return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        if chars > MAX_PASSWORD_CHARS {
            return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        Ok(Self(raw.into()))
    }

    /// A password presented at login: only emptiness and the upper bound are refused, so that a
    /// login says nothing about the registration rules beyond what the contract documents.
    pub fn presented(raw: String) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".to_owned());
        }
        if raw.chars().count() > MAX_PASSWORD_CHARS {
            return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        Ok(Self(raw.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// An email as presented at login, normalised exactly as the users service normalises it
/// (trimmed, lower-cased), so that it finds the credentials stored under users' form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginEmail(String);

impl LoginEmail {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let normalised = raw.trim().to_lowercase();
        if normalised.is_empty() {
            return Err("must not be empty".to_owned());
        }
        Ok(Self(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An opaque refresh token as the client holds it. Its `Debug` never shows it.
#[derive(Clone)]
pub struct RefreshToken(SecretString);

impl RefreshToken {
    /// A new random token: 32 bytes from the operating system, base64url without padding.
    pub fn generate() -> Self {
        let mut bytes = [0u8; REFRESH_TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes).into())
    }

    /// A token presented by a client; its content is checked by looking its hash up.
    pub fn presented(raw: String) -> Result<Self, String> {
        if raw.trim().is_empty() {
            return Err("must not be empty".to_owned());
        }
        Ok(Self(raw.into()))
    }

    /// What the database keeps instead of the token itself.
    pub fn hash(&self) -> RefreshTokenHash {
        let digest = Sha256::digest(self.0.expose_secret().as_bytes());
        let hex = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        RefreshTokenHash(hex)
    }

    /// The token itself, to hand to its holder.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(***)")
    }
}

/// The SHA-256 of a refresh token, lower-case hex: a database leak reveals no usable token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshTokenHash(String);

impl RefreshTokenHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_length_is_bounded_in_characters() {
        assert!(Password::parse("short".to_owned()).is_err());
        assert!(Password::parse("ééééééé".to_owned()).is_err());
        assert!(Password::parse("éééééééé".to_owned()).is_ok());
        assert!(Password::parse("x".repeat(MAX_PASSWORD_CHARS)).is_ok());
        assert!(Password::parse("x".repeat(MAX_PASSWORD_CHARS + 1)).is_err());
    }

    #[test]
    fn presented_password_only_needs_to_be_non_empty() {
        assert!(Password::presented("a".to_owned()).is_ok());
        assert!(Password::presented(String::new()).is_err());
    }

    #[test]
    fn passwords_do_not_print() {
        let password = Password::parse("hunter2hunter2".to_owned());
        assert!(password.is_ok_and(|p| !format!("{p:?}").contains("hunter2")));
    }

    #[test]
    fn refresh_tokens_do_not_print() -> Result<(), String> {
        let generated = RefreshToken::generate();
        assert!(!format!("{generated:?}").contains(generated.expose()));
        let presented = RefreshToken::presented("a-presented-refresh-token".to_owned())?;
        assert!(!format!("{presented:?}").contains("presented-refresh"));
        Ok(())
    }

    #[test]
    fn login_email_is_trimmed_and_lower_cased() {
        assert_eq!(
            LoginEmail::parse("  Ada@Example.COM ").map(|e| e.as_str().to_owned()),
            Ok("ada@example.com".to_owned())
        );
        assert!(LoginEmail::parse("   ").is_err());
    }

    #[test]
    fn refresh_tokens_are_random_base64url() {
        let (a, b) = (RefreshToken::generate(), RefreshToken::generate());
        let (a, b) = (a.expose(), b.expose());
        assert_ne!(a, b);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(a).map(|v| v.len()),
            Ok(REFRESH_TOKEN_BYTES)
        );
    }

    #[test]
    fn refresh_token_hash_is_sha256_hex() -> Result<(), String> {
        let token = RefreshToken::presented("abc".to_owned())?;
        assert_eq!(
            token.hash().as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        Ok(())
    }
}
