//! Meshwork's billing service: accounts and the ledger of payments behind
//! `meshwork.billing.v1.BillingService`. Balances never go negative, and every money movement
//! (TopUp, Charge, Refund) takes an idempotency key: repeating it returns the first result and
//! moves no money again.
//!
//! - [`app`]: building and running the server (what the binary, `meshctl up` and tests use);
//! - [`grpc`]: the tonic service: decode and validate, call the store, encode;
//! - [`domain`]: valid-by-construction values and the rules about balances and refunds;
//! - [`store`]: the database, one transaction per movement;
//! - [`error`]: failures, and the status code each one becomes.

pub mod app;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod store;

pub use app::{App, AppError};
pub use config::Config;
pub use error::DomainError;
pub use grpc::BillingGrpc;
pub use store::{Receipt, Store};
