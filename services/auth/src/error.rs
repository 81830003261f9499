//! What can go wrong in auth, and the one place that decides which gRPC status each becomes.

use std::time::Duration;

use mesh::status::FieldViolations;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::keys::KeyError;

/// One message for a wrong password and an unknown email, so a caller cannot tell them apart.
pub const BAD_CREDENTIALS: &str = "email or password is incorrect";
/// The start of the message of a throttled login (a retry delay follows).
pub const TOO_MANY_ATTEMPTS: &str = "too many login attempts, retry later";

/// Everything auth's handlers can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The request itself is malformed; every violation is listed.
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// Wrong password or unknown email (deliberately the same).
    #[error("{BAD_CREDENTIALS}")]
    BadCredentials,
    /// The refresh token is unknown, expired or revoked.
    #[error("refresh token is invalid, expired or revoked")]
    InvalidRefreshToken,
    /// An already rotated refresh token came back: its whole family is now revoked.
    #[error("refresh token was already used; its session has been revoked")]
    RefreshTokenReused,
    /// Too many login attempts on the account or from the caller: retry after the delay.
    #[error("{TOO_MANY_ATTEMPTS} (in {}s)", whole_seconds(*retry_after))]
    TooManyAttempts { retry_after: Duration },
    /// The users service refused the request (INVALID_ARGUMENT, ALREADY_EXISTS): its status,
    /// details included, is the caller's answer as it stands.
    #[error("users refused: {}", .0.message())]
    UsersRefused(Status),
    /// The users service could not be reached in time.
    #[error("users service unavailable: {}", .0.message())]
    UsersUnavailable(Status),
    /// The users service failed in a way the caller cannot fix.
    #[error("users service failed: {}", .0.message())]
    UsersFailed(Status),
    /// The database failed.
    #[error("{context}: {source}")]
    Storage {
        context: &'static str,
        source: sqlx::Error,
    },
    /// A stored signing key is unusable, or a new one could not be made.
    #[error("signing key: {0}")]
    Key(#[from] KeyError),
    /// A failure of auth itself (a hashing task, token signing, a corrupt stored value).
    #[error("{0}")]
    Internal(String),
}

/// A delay as the whole seconds a client should wait: rounded up, at least one.
fn whole_seconds(delay: Duration) -> u64 {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    seconds.max(1)
}

impl DomainError {
    /// Classifies a status returned by the users service.
    pub fn from_users(status: Status) -> Self {
        match status.code() {
            Code::InvalidArgument | Code::AlreadyExists => Self::UsersRefused(status),
            Code::Unavailable | Code::DeadlineExceeded => Self::UsersUnavailable(status),
            _ => Self::UsersFailed(status),
        }
    }

    pub fn storage(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Storage { context, source }
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::Invalid(violations) => violations.into_status(),
            DomainError::BadCredentials
            | DomainError::InvalidRefreshToken
            | DomainError::RefreshTokenReused => Status::unauthenticated(error.to_string()),
            DomainError::TooManyAttempts { retry_after } => {
                let retry_after = Duration::from_secs(whole_seconds(retry_after));
                Status::with_error_details(
                    Code::ResourceExhausted,
                    error.to_string(),
                    ErrorDetails::with_retry_info(Some(retry_after)),
                )
            }
            DomainError::UsersRefused(status) => status,
            DomainError::UsersUnavailable(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "users service unavailable");
                Status::unavailable("the users service is unavailable, retry later")
            }
            DomainError::UsersFailed(status) => {
                tracing::error!(code = ?status.code(), message = status.message(), "users service failed");
                Status::internal("the users service failed")
            }
            DomainError::Storage { context, source } => mesh::status::storage(context, &source),
            DomainError::Key(error) => {
                tracing::error!(%error, "signing key failure");
                Status::internal("internal failure")
            }
            DomainError::Internal(reason) => {
                tracing::error!(%reason, "internal failure");
                Status::internal("internal failure")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_refusals_pass_through_unchanged() {
        let original = mesh::status::invalid_argument("email", "is not an email address");
        let status = Status::from(DomainError::from_users(original.clone()));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), original.message());
        assert_eq!(status.details(), original.details());
        let exists = Status::from(DomainError::from_users(Status::already_exists("taken")));
        assert_eq!(
            (exists.code(), exists.message()),
            (Code::AlreadyExists, "taken")
        );
    }

    #[test]
    fn users_outages_are_unavailable() {
        for code in [Code::Unavailable, Code::DeadlineExceeded] {
            let status = Status::from(DomainError::from_users(Status::new(code, "down")));
            assert_eq!(status.code(), Code::Unavailable);
        }
    }

    #[test]
    fn throttled_logins_are_resource_exhausted_with_a_retry_delay() {
        let error = DomainError::TooManyAttempts {
            retry_after: Duration::from_millis(4_200),
        };
        let status = Status::from(error);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().starts_with(TOO_MANY_ATTEMPTS),
            "{}",
            status.message()
        );
        assert!(status.message().contains("5s"), "{}", status.message());
        let retry = status.get_details_retry_info();
        assert_eq!(
            retry.and_then(|r| r.retry_delay),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn bad_credentials_are_unauthenticated() {
        let status = Status::from(DomainError::BadCredentials);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), BAD_CREDENTIALS);
    }
}
