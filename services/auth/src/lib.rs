//! Meshwork's auth service: credentials (argon2id password hashes, login attempts throttled),
//! short-lived Ed25519 JWT access tokens signed by keys that rotate, and opaque refresh tokens
//! that rotate on use and can be revoked. Users are created through the users service, which
//! owns profiles; auth owns only what proves who a user is. It speaks mutual TLS only.
//!
//! [`App`] builds and runs the service; [`tokens::Verifier`] is what any service uses to check
//! an access token against the key set auth publishes (`GetJwks`).

mod accounts;
mod app;
pub mod config;
mod domain;
mod error;
mod grpc;
mod issuer;
mod keyring;
mod keys;
mod login_limits;
mod password;
mod store;
pub mod tokens;

pub use app::{App, AppError};
pub use config::{Config, LoginLimits, TokenConfig};
pub use error::{BAD_CREDENTIALS, TOO_MANY_ATTEMPTS};
