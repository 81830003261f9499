//! The users service's values, parsed once at the edge: an [`Email`] or a [`DisplayName`] can
//! only hold a valid value, so nothing past the gRPC layer checks them again. Not for storage or
//! status codes (see `store` and `error`).

use std::fmt;

/// Longest email address accepted: the 254 characters a forward path allows (RFC 5321 4.5.3.1).
pub const MAX_EMAIL_CHARS: usize = 254;
/// Longest display name accepted, as the contract (`users.proto`) promises.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;

/// Why a string is not an email address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_EMAIL_CHARS} characters")]
    TooLong,
    #[error("must not contain whitespace or control characters")]
    ForbiddenCharacter,
    #[error("must contain exactly one '@'")]
    NotOneAt,
    #[error("must have a non-empty part before the '@'")]
    EmptyLocalPart,
    #[error("must have a domain with a dot and no empty labels after the '@', like example.com")]
    BadDomain,
}

/// A normalised email address: trimmed, lower-cased, one `@`, a dotted domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(EmailError::Empty);
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(EmailError::ForbiddenCharacter);
        }
        let email = trimmed.to_lowercase();
        if email.chars().count() > MAX_EMAIL_CHARS {
            return Err(EmailError::TooLong);
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(EmailError::NotOneAt);
        };
        if domain.contains('@') {
            return Err(EmailError::NotOneAt);
        }
        if local.is_empty() {
            return Err(EmailError::EmptyLocalPart);
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 || labels.iter().any(|label| label.is_empty()) {
            return Err(EmailError::BadDomain);
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string is not a display name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DisplayNameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_DISPLAY_NAME_CHARS} characters")]
    TooLong,
    #[error("must not contain control characters")]
    ControlCharacter,
}

/// A name shown to people: trimmed, 1 to [`MAX_DISPLAY_NAME_CHARS`] characters, no control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(raw: &str) -> Result<Self, DisplayNameError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(DisplayNameError::Empty);
        }
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
            return Err(DisplayNameError::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(DisplayNameError::ControlCharacter);
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("must not be empty")]
    Empty,
}

/// The id of a user as a caller names it. Ids are opaque to callers, so any non-empty string is
/// a well-formed id; one this service never issued is simply not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, UserIdError> {
        if raw.is_empty() {
            return Err(UserIdError::Empty);
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh id: a UUIDv7, so that ids sort in creation order.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What CreateUser asks for.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: Email,
    pub display_name: DisplayName,
}

/// What UpdateUser changes: the fields its mask names, each already valid.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    pub email: Option<Email>,
    pub display_name: Option<DisplayName>,
}

/// The fields an update mask may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserField {
    Email,
    DisplayName,
}

impl UserField {
    /// Every maskable field's path, for messages.
    pub const PATHS: &'static str = "email, display_name";

    /// The field an update-mask path names, if it is one that may change.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "email" => Some(Self::Email),
            "display_name" => Some(Self::DisplayName),
            _ => None,
        }
    }
}

/// A user as stored: the values were parsed on their way in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub display_name: String,
    /// Milliseconds since the Unix epoch.
    pub create_time: i64,
    /// Milliseconds since the Unix epoch.
    pub update_time: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_trimmed_and_lower_cased() {
        assert_eq!(
            Email::parse("  Ada.Lovelace@Example.COM \n").map(|e| e.to_string()),
            Ok("ada.lovelace@example.com".to_owned())
        );
    }

    #[test]
    fn email_rejections_say_why() {
        let cases = [
            ("", EmailError::Empty),
            ("   ", EmailError::Empty),
            ("ada lovelace@example.com", EmailError::ForbiddenCharacter),
            ("ada\u{7}@example.com", EmailError::ForbiddenCharacter),
            ("ada.example.com", EmailError::NotOneAt),
            ("ada@lovelace@example.com", EmailError::NotOneAt),
            ("@example.com", EmailError::EmptyLocalPart),
            ("ada@localhost", EmailError::BadDomain),
            ("ada@example.", EmailError::BadDomain),
            ("ada@.example.com", EmailError::BadDomain),
            ("ada@example..com", EmailError::BadDomain),
            ("ada@", EmailError::BadDomain),
        ];
        for (raw, expected) in cases {
            assert_eq!(Email::parse(raw), Err(expected), "{raw:?}");
        }
    }

    #[test]
    fn email_length_limit_is_inclusive() {
        let domain = "@example.com";
        let longest = format!("{}{domain}", "a".repeat(MAX_EMAIL_CHARS - domain.len()));
        assert!(Email::parse(&longest).is_ok());
        let too_long = format!("a{longest}");
        assert_eq!(Email::parse(&too_long), Err(EmailError::TooLong));
    }

    #[test]
    fn display_name_is_trimmed() {
        assert_eq!(
            DisplayName::parse("  Ada Lovelace ").map(|n| n.as_str().to_owned()),
            Ok("Ada Lovelace".to_owned())
        );
    }

    #[test]
    fn display_name_counts_characters_not_bytes() {
        let longest = "é".repeat(MAX_DISPLAY_NAME_CHARS);
        assert!(DisplayName::parse(&longest).is_ok());
        assert_eq!(
            DisplayName::parse(&format!("{longest}é")),
            Err(DisplayNameError::TooLong)
        );
    }

    #[test]
    fn display_name_rejections_say_why() {
        assert_eq!(DisplayName::parse(" \t "), Err(DisplayNameError::Empty));
        assert_eq!(
            DisplayName::parse("Ada\u{0}Lovelace"),
            Err(DisplayNameError::ControlCharacter)
        );
    }

    #[test]
    fn empty_user_id_is_rejected() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        assert!(UserId::parse("anything-else").is_ok());
    }

    #[test]
    fn generated_ids_sort_in_creation_order() {
        let first = UserId::generate();
        let second = UserId::generate();
        assert!(first.as_str() < second.as_str());
    }

    #[test]
    fn only_email_and_display_name_are_maskable() {
        assert_eq!(UserField::from_path("email"), Some(UserField::Email));
        assert_eq!(
            UserField::from_path("display_name"),
            Some(UserField::DisplayName)
        );
        assert_eq!(UserField::from_path("id"), None);
        assert_eq!(UserField::from_path("create_time"), None);
    }
}
