//! The users service: user profiles (email, display name), the identity every other service
//! refers to by `user_id`. Serves `meshwork.users.v1.UserService` over the mesh's server stack
//! (mutual TLS, per-method authorization; an end user reaches only their own profile), stores
//! profiles in its own database (SQLite by default, PostgreSQL by URL), and calls auth only for
//! the key set that verifies end users' access tokens.
//!
//! ```text
//! let app = users::App::build(users::Config::default()).await?;
//! app.run_until_stopped(mesh::shutdown::signal()).await?;
//! ```

mod app;
mod config;
mod domain;
mod error;
mod grpc;
mod store;

pub use app::App;
pub use config::{AUTH_ENDPOINT, Config, PORT, default_policy};
pub use error::AppError;
