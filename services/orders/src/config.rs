//! The orders service's configuration: where it listens, its database, how it reaches users and
//! billing, and how often unfinished sagas are resumed. Loaded by [`mesh::config::load`].

use std::time::Duration;

use mesh::config::{ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate};
use serde::{Deserialize, Serialize};

/// The orders service's default gRPC port.
pub const PORT: u16 = 50054;
/// Where users and billing listen by default (see their crates).
const USERS_ENDPOINT: &str = "http://127.0.0.1:50051";
const BILLING_ENDPOINT: &str = "http://127.0.0.1:50053";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    /// The users service: orders are placed only for users it knows.
    pub users: ClientConfig,
    /// The billing service: charges and refunds orders.
    pub billing: ClientConfig,
    pub recovery: RecoveryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(PORT),
            database: DatabaseConfig::sqlite_for("orders"),
            users: ClientConfig::to(USERS_ENDPOINT),
            billing: ClientConfig::to(BILLING_ENDPOINT),
            recovery: RecoveryConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.database.validate("database")?;
        self.users.validate("users")?;
        self.billing.validate("billing")?;
        self.recovery.validate("recovery")
    }
}

/// The background sweep that finishes orders left PENDING (a crash or a billing outage in the
/// middle of a saga).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// Time between two sweeps (the first runs at start).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Only orders PENDING for at least this long are resumed, so a sweep seldom races a saga
    /// that is still running (it would be harmless: the charge's idempotency key is the same).
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
}

impl RecoveryConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.interval"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            min_age: Duration::from_secs(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn zero_recovery_interval_is_named() {
        let mut config = Config::default();
        config.recovery.interval = Duration::ZERO;
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("recovery.interval")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_billing_endpoint_is_named() {
        let mut config = Config::default();
        config.billing.endpoints.clear();
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("billing.endpoints")),
            "{err:?}"
        );
    }
}
