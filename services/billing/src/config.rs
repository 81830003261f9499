//! Billing's configuration: where it listens and where its database is. Billing calls no other
//! service, so it has no clients. Loaded by `mesh::config::load` (defaults, file, environment).

use mesh::config::{ConfigError, DatabaseConfig, ServerConfig, Validate};
use serde::{Deserialize, Serialize};

/// Billing's gRPC port in the local mesh.
pub const DEFAULT_PORT: u16 = 50053;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(DEFAULT_PORT),
            database: DatabaseConfig::sqlite_for("billing"),
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
    fn defaults_are_valid_and_listen_on_the_billing_port() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.server.listen_addr.port(), DEFAULT_PORT);
    }
}
