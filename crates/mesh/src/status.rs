//! Errors as the caller sees them. Invalid input becomes one INVALID_ARGUMENT carrying a
//! `google.rpc.BadRequest` with every field violation found; storage failures are logged here
//! with their context and reach the caller as UNAVAILABLE (retryable) or INTERNAL, never as SQL.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The field violations of one request, collected so the caller learns them all at once.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<FieldViolation>,
}

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (its path in the request, e.g. `amount.currency_code`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field.into(), description.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// The fields named so far, in order.
    pub fn fields(&self) -> Vec<&str> {
        self.violations.iter().map(|v| v.field.as_str()).collect()
    }

    /// `Ok(())` when nothing was recorded, else the INVALID_ARGUMENT status.
    pub fn into_result(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    /// Parses with `parse` and returns its value, or records its error under `field`.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &str,
        parsed: Result<T, E>,
    ) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(error) => {
                self.add(field, error.to_string());
                None
            }
        }
    }

    /// The INVALID_ARGUMENT status; its message names every field too, for clients that do not
    /// read details (grpcurl prints the message).
    pub fn into_status(self) -> Status {
        let message = self
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {message}"),
            ErrorDetails::with_bad_request(self.violations),
        )
    }
}

/// One field violation as an INVALID_ARGUMENT status.
pub fn invalid_argument(field: &str, description: impl Into<String>) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations.into_status()
}

/// The field violations carried by a status, as `(field, description)` pairs.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

/// A storage failure: logged with `context` here; UNAVAILABLE when retrying may help
/// (pool exhausted, connection lost), INTERNAL otherwise.
pub fn storage(context: &str, error: &sqlx::Error) -> Status {
    tracing::error!(context, %error, "storage failure");
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => {
            Status::unavailable(format!("{context}: storage unavailable"))
        }
        sqlx::Error::Database(db) if is_busy(db.as_ref()) => {
            Status::unavailable(format!("{context}: storage busy, retry"))
        }
        _ => Status::internal(format!("{context}: storage failure")),
    }
}

/// SQLite reports lock contention as SQLITE_BUSY (5) or SQLITE_LOCKED (6): worth a retry.
fn is_busy(error: &dyn sqlx::error::DatabaseError) -> bool {
    matches!(error.code().as_deref(), Some("5" | "6" | "517"))
}

/// Whether a storage error is a unique-constraint violation (a duplicate).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.is_unique_violation(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_become_one_bad_request() {
        let mut v = FieldViolations::new();
        v.add("email", "is not an email address");
        v.add("display_name", "must not be empty");
        let status = v.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<String> = field_violations(&status)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(fields, vec!["email", "display_name"]);
        assert!(status.message().contains("email: is not an email address"));
    }

    #[test]
    fn no_violations_is_ok() {
        assert!(FieldViolations::new().into_result().is_ok());
    }

    #[test]
    fn pool_timeout_is_unavailable() {
        let status = storage("reading", &sqlx::Error::PoolTimedOut);
        assert_eq!(status.code(), Code::Unavailable);
    }
}
