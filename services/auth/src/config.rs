//! The auth service's configuration: where it listens, where its database is, how it reaches
//! the users service, and what the tokens it issues look like. Loaded by [`mesh::config::load`].

use std::time::Duration;

use mesh::config::{ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate};
use serde::{Deserialize, Serialize};

/// The auth service's well-known local port.
pub const PORT: u16 = 50052;
/// Where the users service listens locally by default.
pub const USERS_ENDPOINT: &str = "http://127.0.0.1:50051";

/// Access tokens are short-lived: a stolen one is useful for a quarter of an hour at most.
const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// A session lasts a month of inactivity before the user has to log in again.
const DEFAULT_REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// The auth service's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    /// The users service, which owns the profiles that credentials belong to.
    pub users: ClientConfig,
    pub tokens: TokenConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(PORT),
            database: DatabaseConfig::sqlite_for("auth"),
            users: ClientConfig::to(USERS_ENDPOINT),
            tokens: TokenConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.database.validate("database")?;
        self.users.validate("users")?;
        self.tokens.validate("tokens")
    }
}

/// What the issued tokens say and how long they live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// The `iss` claim of access tokens.
    pub issuer: String,
    /// The `aud` claim of access tokens: the services that accept them.
    pub audience: String,
    /// Lifetime of an access token.
    #[serde(with = "humantime_serde")]
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (each rotation starts a new one).
    #[serde(with = "humantime_serde")]
    pub refresh_ttl: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "meshwork-auth".to_owned(),
            audience: "meshwork".to_owned(),
            access_ttl: DEFAULT_ACCESS_TTL,
            refresh_ttl: DEFAULT_REFRESH_TTL,
        }
    }
}

impl TokenConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.issuer"),
                "must not be empty",
            ));
        }
        if self.audience.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.audience"),
                "must not be empty",
            ));
        }
        // JWT times are whole seconds: a shorter lifetime would issue already-expired tokens.
        if self.access_ttl.as_secs() == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.access_ttl"),
                "must be at least one second",
            ));
        }
        if self.refresh_ttl.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.refresh_ttl"),
                "must be greater than zero",
            ));
        }
        Ok(())
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
    fn empty_issuer_is_named() {
        let mut config = Config::default();
        config.tokens.issuer = " ".to_owned();
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("tokens.issuer")),
            "{err:?}"
        );
    }

    #[test]
    fn empty_audience_is_named() {
        let mut config = Config::default();
        config.tokens.audience = String::new();
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("tokens.audience")),
            "{err:?}"
        );
    }

    #[test]
    fn zero_access_ttl_is_named() {
        let mut config = Config::default();
        config.tokens.access_ttl = Duration::ZERO;
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("tokens.access_ttl")),
            "{err:?}"
        );
    }

    #[test]
    fn zero_refresh_ttl_is_named() {
        let mut config = Config::default();
        config.tokens.refresh_ttl = Duration::ZERO;
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("tokens.refresh_ttl")),
            "{err:?}"
        );
    }

    #[test]
    fn ttls_read_as_human_durations() -> Result<(), ConfigError> {
        use figment::{
            Figment,
            providers::{Format, Serialized, Toml},
        };
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(
            "[tokens]\naccess_ttl = \"5m\"\nrefresh_ttl = \"7days\"",
        ));
        let config: Config = mesh::config::from_figment(figment)?;
        assert_eq!(config.tokens.access_ttl, Duration::from_secs(300));
        assert_eq!(
            config.tokens.refresh_ttl,
            Duration::from_secs(7 * 24 * 3600)
        );
        Ok(())
    }
}
