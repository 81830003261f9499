//! Billing's configuration: where it listens (mutual TLS, optional plaintext admin port for
//! health probes), where its database is, who may call which method, and how end users' access
//! tokens are verified (auth's key set, fetched over the mesh). Loaded by `mesh::config::load`
//! (defaults, file, environment).

use mesh::{
    authz::{END_USER, Policy},
    config::{AdminConfig, ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate},
    jwt::JwtConfig,
    pki::OPERATOR,
    tls::TlsConfig,
};
use serde::{Deserialize, Serialize};

/// Billing's gRPC port in the local mesh.
pub const DEFAULT_PORT: u16 = 50053;
/// Where auth, the issuer of the access tokens billing verifies, listens locally by default.
pub const AUTH_ENDPOINT: &str = "https://127.0.0.1:50052";
/// This service's name in the mesh: its certificate's identity.
const MESH_NAME: &str = "billing";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    /// This service's certificate and the mesh CA.
    pub tls: TlsConfig,
    pub admin: AdminConfig,
    /// Method → who may call it; see [`default_policy`].
    pub authz: Policy,
    /// Auth, whose key set verifies end users' access tokens.
    pub auth: ClientConfig,
    pub tokens: JwtConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::on_port(DEFAULT_PORT),
            database: DatabaseConfig::sqlite_for(MESH_NAME),
            tls: TlsConfig::local(MESH_NAME),
            admin: AdminConfig::default(),
            authz: default_policy(),
            auth: ClientConfig::to(AUTH_ENDPOINT),
            tokens: JwtConfig::default(),
        }
    }
}

/// The mesh's call graph into billing: orders charges for orders and refunds cancelled ones;
/// end users see their own account and payments and top up their own account (handlers check
/// the ownership); the operator does anything.
pub fn default_policy() -> Policy {
    Policy::from_rules([
        (
            "meshwork.billing.v1.BillingService/GetAccount",
            &[OPERATOR, END_USER][..],
        ),
        (
            "meshwork.billing.v1.BillingService/TopUp",
            &[OPERATOR, END_USER][..],
        ),
        (
            "meshwork.billing.v1.BillingService/Charge",
            &["orders", OPERATOR][..],
        ),
        (
            "meshwork.billing.v1.BillingService/Refund",
            &["orders", OPERATOR][..],
        ),
        (
            "meshwork.billing.v1.BillingService/GetPayment",
            &[OPERATOR, END_USER][..],
        ),
        (
            "meshwork.billing.v1.BillingService/ListPayments",
            &[OPERATOR, END_USER][..],
        ),
    ])
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.database.validate("database")?;
        self.tls.validate("tls")?;
        self.authz.validate("authz")?;
        self.auth.validate("auth")?;
        self.tokens.validate("tokens")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use figment::{
        Figment,
        providers::{Format, Serialized, Toml},
    };
    use meshwork::billing::v1::billing_service_server::SERVICE_NAME;

    use super::*;

    /// The configuration loaded from the defaults and a file holding `toml`, as a deployment
    /// loads it.
    fn loaded(toml: &str) -> Result<Config, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("billing.toml");
        std::fs::write(&file, toml)?;
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(file));
        Ok(mesh::config::from_figment(figment)?)
    }

    #[test]
    fn defaults_are_valid_and_listen_on_the_billing_port() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.server.listen_addr.port(), DEFAULT_PORT);
    }

    #[test]
    fn default_policy_has_one_rule_for_every_method_and_no_other()
    -> Result<(), Box<dyn std::error::Error>> {
        let methods = mesh::authz::methods_of(SERVICE_NAME)?;
        let ruled: BTreeSet<String> = default_policy().0.into_keys().collect();
        assert!(!methods.is_empty());
        assert_eq!(ruled, methods);
        Ok(())
    }

    #[test]
    fn defaults_survive_loading_unchanged() -> Result<(), Box<dyn std::error::Error>> {
        let config = loaded("")?;
        assert_eq!(config.authz, default_policy());
        Ok(())
    }

    #[test]
    fn malformed_policy_key_in_a_file_is_named() {
        let error = loaded("[authz]\n\"BillingService.Charge\" = [\"orders\"]\n")
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("authz") && e.contains("BillingService.Charge")),
            "{error:?}"
        );
    }
}
