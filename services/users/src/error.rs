//! The users service's failures and the one place that decides their gRPC status codes
//! ([`DomainError`] → [`tonic::Status`]), plus [`AppError`], why the service could not start or
//! keep serving. Invalid input never reaches here: it is rejected at the edge as field
//! violations (see `grpc`).

use tonic::Status;

/// Why an operation on users failed, after its input was found valid.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("user `{id}` not found")]
    NotFound { id: String },
    #[error("a user with email `{email}` already exists")]
    EmailTaken { email: String },
    #[error("{context}: {source}")]
    Storage {
        context: &'static str,
        source: sqlx::Error,
    },
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::NotFound { .. } => Status::not_found(error.to_string()),
            DomainError::EmailTaken { .. } => Status::already_exists(error.to_string()),
            DomainError::Storage { context, source } => mesh::status::storage(context, &source),
        }
    }
}

/// Why the service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] mesh::store::StoreError),
    #[error(transparent)]
    Server(#[from] mesh::server::ServerError),
    #[error("mesh TLS: {0}")]
    Tls(#[from] mesh::tls::TlsError),
    #[error("auth client: {0}")]
    Client(#[from] mesh::client::ClientError),
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn not_found_names_the_id() {
        let status = Status::from(DomainError::NotFound { id: "u-1".into() });
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("u-1"), "{}", status.message());
    }

    #[test]
    fn taken_email_is_already_exists_naming_it() {
        let status = Status::from(DomainError::EmailTaken {
            email: "ada@example.com".into(),
        });
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(status.message().contains("ada@example.com"));
    }

    #[test]
    fn storage_failure_does_not_leak_the_database_error() {
        let status = Status::from(DomainError::Storage {
            context: "reading a user",
            source: sqlx::Error::Protocol("secret detail".into()),
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret detail"));
    }
}
