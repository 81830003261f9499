//! Meshwork's orders service: orders and their items, placed as a saga over users (the user must
//! exist) and billing (the total is charged, refunded on cancel).
//!
//! An order is stored PENDING, charged with an idempotency key derived from its id, then moved
//! to PAID or PAYMENT_FAILED. A crash or an outage in the middle leaves it PENDING, and the
//! recovery task charges it again with the same key, so it is never charged twice and never
//! PENDING forever. Start it with [`App::build`] and [`App::run_until_stopped`].

mod app;
pub mod config;
pub mod domain;
pub mod error;
mod grpc;
mod order_watch;
pub mod recovery;
mod saga;
pub mod store;

pub use app::{App, AppError};
pub use config::{Config, RecoveryConfig};
pub use error::DomainError;
pub use order_watch::POLL_INTERVAL;
pub use recovery::Recovery;
pub use saga::SweepReport;
