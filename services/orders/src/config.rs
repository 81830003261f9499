//! The orders service's configuration: where it listens, its mesh identity and who may call it,
//! its database, how it reaches users, billing and auth (whose keys verify end users' tokens),
//! and how often unfinished sagas are resumed. Loaded by [`mesh::config::load`].

use std::time::Duration;

use mesh::{
    authz::{END_USER, Policy},
    config::{AdminConfig, ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate},
    jwt::JwtConfig,
    pki::OPERATOR,
    tls::TlsConfig,
};
use meshwork::orders::v1::order_service_server::SERVICE_NAME;
use serde::{Deserialize, Serialize};

/// The orders service's default gRPC port.
pub const PORT: u16 = 50054;
/// The orders service's name in the mesh: its certificate's identity and local files.
const MESH_NAME: &str = "orders";
/// Where users, auth and billing listen by default (see their crates).
const USERS_ENDPOINT: &str = "https://127.0.0.1:50051";
const AUTH_ENDPOINT: &str = "https://127.0.0.1:50052";
const BILLING_ENDPOINT: &str = "https://127.0.0.1:50053";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// The plaintext health port for probes (off by default).
    pub admin: AdminConfig,
    /// This service's certificate, key and mesh CA: the mesh port speaks mutual TLS only.
    pub tls: TlsConfig,
    /// Who may call which method (see [`default_policy`]).
    pub authz: Policy,
    pub database: DatabaseConfig,
    /// The users service: orders are placed only for users it knows.
    pub users: ClientConfig,
    /// The billing service: charges and refunds orders.
    pub billing: ClientConfig,
    /// The auth service, whose key set verifies end users' access tokens.
    pub auth: ClientConfig,
    /// What an end user's access token must say.
    pub tokens: JwtConfig,
    pub recovery: RecoveryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(PORT),
            admin: AdminConfig::default(),
            tls: TlsConfig::local(MESH_NAME),
            authz: default_policy(),
            database: DatabaseConfig::sqlite_for(MESH_NAME),
            users: ClientConfig::to(USERS_ENDPOINT),
            billing: ClientConfig::to(BILLING_ENDPOINT),
            auth: ClientConfig::to(AUTH_ENDPOINT),
            tokens: JwtConfig::default(),
            recovery: RecoveryConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.tls.validate("tls")?;
        self.authz.validate("authz")?;
        self.database.validate("database")?;
        self.users.validate("users")?;
        self.billing.validate("billing")?;
        self.auth.validate("auth")?;
        self.tokens.validate("tokens")?;
        self.recovery.validate("recovery")
    }
}

/// No service calls orders: the operator may call every method, and so may an end user with an
/// access token (the handlers then keep them to their own orders).
pub fn default_policy() -> Policy {
    let every_method = format!("{SERVICE_NAME}/*");
    Policy::from_rules([(every_method.as_str(), &[OPERATOR, END_USER][..])])
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
    fn the_default_policy_is_valid_and_admits_the_operator_and_end_users() {
        let policy = default_policy();
        assert!(policy.validate("authz").is_ok());
        let callers = policy.0.get("meshwork.orders.v1.OrderService/*");
        assert_eq!(
            callers.map(Vec::as_slice),
            Some(&["operator".to_owned(), "user".to_owned()][..])
        );
        assert_eq!(policy.0.len(), 1, "{policy:?}");
    }

    #[test]
    fn downstream_services_are_reached_over_tls_by_default() {
        let config = Config::default();
        for client in [&config.users, &config.billing, &config.auth] {
            assert!(
                client.endpoints.iter().all(|e| e.starts_with("https://")),
                "{client:?}"
            );
        }
    }

    #[test]
    fn a_malformed_policy_rule_is_named() {
        let mut config = Config::default();
        config
            .authz
            .0
            .insert("GetOrder".to_owned(), vec!["operator".to_owned()]);
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("authz") && e.contains("GetOrder")),
            "{err:?}"
        );
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
