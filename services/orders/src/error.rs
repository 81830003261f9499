//! What can go wrong past the gRPC edge, and the one place that picks a status code for it.
//! (Invalid requests never get here: [`crate::domain::NewOrder::parse`] and the handlers turn
//! them into INVALID_ARGUMENT at the edge.)

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("order `{0}` not found")]
    OrderNotFound(String),
    #[error("user `{0}` not found")]
    UserNotFound(String),
    /// The users service could not say whether the user exists; nothing was stored.
    #[error("users service unavailable: {0}")]
    UsersUnavailable(String),
    /// Billing could not be reached for a refund; the order is unchanged and a retry is safe.
    #[error("billing service unavailable: {0}")]
    BillingUnavailable(String),
    /// Billing answered a refund with a refusal.
    #[error("billing refused the refund: {0}")]
    RefundRefused(String),
    #[error("order `{0}`: payment still in progress")]
    PaymentInProgress(String),
    /// The server is stopping; a watch should be opened again (on another replica).
    #[error("the server is shutting down; watch again")]
    ShuttingDown,
    #[error("{context}: {source}")]
    Storage {
        context: &'static str,
        source: sqlx::Error,
    },
    /// A stored row this version cannot read (e.g. an unknown status).
    #[error("order `{id}` is stored in a form this service cannot read: {reason}")]
    Corrupt { id: String, reason: String },
}

impl DomainError {
    /// Wraps a storage error with what was being done, for `map_err`.
    pub fn storage(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Storage { context, source }
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::OrderNotFound(_) | DomainError::UserNotFound(_) => {
                Status::not_found(error.to_string())
            }
            DomainError::UsersUnavailable(_)
            | DomainError::BillingUnavailable(_)
            | DomainError::ShuttingDown => Status::unavailable(error.to_string()),
            DomainError::RefundRefused(_) | DomainError::PaymentInProgress(_) => {
                Status::failed_precondition(error.to_string())
            }
            DomainError::Storage { context, source } => mesh::status::storage(context, &source),
            DomainError::Corrupt { .. } => {
                tracing::error!(%error, "unreadable order");
                Status::internal(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let cases = [
            (DomainError::OrderNotFound("o".into()), Code::NotFound),
            (DomainError::UserNotFound("u".into()), Code::NotFound),
            (
                DomainError::UsersUnavailable("down".into()),
                Code::Unavailable,
            ),
            (
                DomainError::BillingUnavailable("down".into()),
                Code::Unavailable,
            ),
            (
                DomainError::RefundRefused("no".into()),
                Code::FailedPrecondition,
            ),
            (
                DomainError::PaymentInProgress("o".into()),
                Code::FailedPrecondition,
            ),
            (
                DomainError::storage("reading")(sqlx::Error::PoolTimedOut),
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn not_found_names_the_user() {
        let status = Status::from(DomainError::UserNotFound("u-42".into()));
        assert!(status.message().contains("u-42"), "{}", status.message());
    }
}
