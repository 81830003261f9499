//! The users service: user profiles (email, display name), the identity every other service
//! refers to by `user_id`. Serves `meshwork.users.v1.UserService` over the mesh's server stack,
//! stores profiles in its own database (SQLite by default, PostgreSQL by URL), and calls no other
//! service.
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
pub use config::{Config, PORT};
pub use error::AppError;
