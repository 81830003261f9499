//! The users service's configuration: its gRPC server and its database. Users calls no other
//! service, so it has no clients. Loaded by `mesh::config::load` (defaults → file →
//! `MESHWORK_` environment).

use mesh::config::{ConfigError, DatabaseConfig, ServerConfig, Validate};
use serde::{Deserialize, Serialize};

/// The port users listens on by default; the mesh's plan is users 50051, auth 50052,
/// billing 50053, orders 50054, and the other services' defaults point here.
pub const PORT: u16 = 50051;

/// Everything the users service can be configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(PORT),
            database: DatabaseConfig::sqlite_for("users"),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.database.validate("database")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_listen_on_the_users_port() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.server.listen_addr.port(), PORT);
    }

    #[test]
    fn invalid_database_is_named() {
        let config = Config {
            database: DatabaseConfig {
                max_connections: 0,
                ..DatabaseConfig::sqlite_for("users")
            },
            ..Config::default()
        };
        let error = config.validate().err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("database.max_connections")),
            "{error:?}"
        );
    }
}
