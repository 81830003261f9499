//! Why a billing operation failed, and the one place that decides which gRPC status each reason
//! becomes. Invalid requests never get here: they are rejected at the edge with field violations.

use tonic::Status;

use crate::domain::{CurrencyCode, IdempotencyKey, PaymentId, PaymentKind, UserId};

/// A billing operation's failure, in the domain's words.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("user {0} has no account: it opens with the first top-up")]
    AccountNotFound(UserId),
    #[error("payment {0} not found")]
    PaymentNotFound(PaymentId),
    #[error("the account of user {user_id} is in {account}, not {requested}")]
    CurrencyMismatch {
        user_id: UserId,
        account: CurrencyCode,
        requested: CurrencyCode,
    },
    #[error(
        "insufficient funds: balance {balance_minor}, charge {charge_minor} \
         (minor units of {currency})"
    )]
    InsufficientFunds {
        currency: CurrencyCode,
        balance_minor: i64,
        charge_minor: i64,
    },
    #[error(
        "the account of user {user_id} cannot hold {balance_minor} + {amount_minor} \
         minor units: the balance would overflow"
    )]
    BalanceOverflow {
        user_id: UserId,
        balance_minor: i64,
        amount_minor: i64,
    },
    #[error("idempotency_key {0:?} was used for a different request")]
    IdempotencyKeyReused(IdempotencyKey),
    #[error("payment {id} is a {kind}: only a CHARGE can be refunded")]
    NotACharge { id: PaymentId, kind: PaymentKind },
    #[error(
        "a refund of {requested_minor} exceeds what remains of charge {id}: \
         {remaining_minor} of {charged_minor}"
    )]
    RefundExceedsCharge {
        id: PaymentId,
        charged_minor: i64,
        remaining_minor: i64,
        requested_minor: i64,
    },
    #[error("charge {0} is already fully refunded")]
    FullyRefunded(PaymentId),
    #[error("{context}: {source}")]
    Storage {
        context: &'static str,
        source: sqlx::Error,
    },
    /// A stored row that no longer parses: a bug or a manual edit, never the caller's fault.
    #[error("stored {table} row {key:?} is unreadable: {reason}")]
    CorruptRow {
        table: &'static str,
        key: String,
        reason: String,
    },
}

impl DomainError {
    /// A storage failure while `context` was being done.
    pub fn storage(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Storage { context, source }
    }
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        match &error {
            DomainError::AccountNotFound(_) | DomainError::PaymentNotFound(_) => {
                Status::not_found(error.to_string())
            }
            DomainError::CurrencyMismatch { .. }
            | DomainError::InsufficientFunds { .. }
            | DomainError::BalanceOverflow { .. }
            | DomainError::IdempotencyKeyReused(_)
            | DomainError::NotACharge { .. }
            | DomainError::RefundExceedsCharge { .. }
            | DomainError::FullyRefunded(_) => Status::failed_precondition(error.to_string()),
            DomainError::Storage { context, source } => mesh::status::storage(context, source),
            DomainError::CorruptRow { .. } => {
                tracing::error!(%error, "corrupt row");
                Status::internal("a stored record is unreadable")
            }
        }
    }
}
