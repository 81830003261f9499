//! The users service's configuration: its gRPC server (mutual TLS, optional plaintext admin
//! port for health probes), its database, who may call which method, and how end users' access
//! tokens are verified (auth's key set, fetched over the mesh). Loaded by `mesh::config::load`
//! (defaults → file → `MESHWORK_` environment).

use mesh::{
    authz::{END_USER, Policy},
    config::{AdminConfig, ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate},
    jwt::JwtConfig,
    pki::OPERATOR,
    tls::TlsConfig,
};
use serde::{Deserialize, Serialize};

/// The port users listens on by default; the mesh's plan is users 50051, auth 50052,
/// billing 50053, orders 50054, and the other services' defaults point here.
pub const PORT: u16 = 50051;
/// Where auth, the issuer of the access tokens users verifies, listens locally by default.
pub const AUTH_ENDPOINT: &str = "https://127.0.0.1:50052";
/// This service's name in the mesh: its certificate's identity.
const MESH_NAME: &str = "users";

/// Everything the users service can be configured with.
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
            server: ServerConfig::on_port(PORT),
            database: DatabaseConfig::sqlite_for(MESH_NAME),
            tls: TlsConfig::local(MESH_NAME),
            admin: AdminConfig::default(),
            authz: default_policy(),
            auth: ClientConfig::to(AUTH_ENDPOINT),
            tokens: JwtConfig::default(),
        }
    }
}

/// The mesh's call graph into users: auth creates a user at registration and reads or deletes
/// it; orders reads the user an order is for; end users read, change and delete their own
/// profile (handlers check the ownership); the operator does anything.
pub fn default_policy() -> Policy {
    Policy::from_rules([
        (
            "meshwork.users.v1.UserService/CreateUser",
            &["auth", OPERATOR][..],
        ),
        (
            "meshwork.users.v1.UserService/GetUser",
            &["auth", "orders", OPERATOR, END_USER][..],
        ),
        ("meshwork.users.v1.UserService/ListUsers", &[OPERATOR][..]),
        (
            "meshwork.users.v1.UserService/UpdateUser",
            &[OPERATOR, END_USER][..],
        ),
        (
            "meshwork.users.v1.UserService/DeleteUser",
            &["auth", OPERATOR, END_USER][..],
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
    use meshwork::users::v1::user_service_server::SERVICE_NAME;

    use super::*;

    /// The configuration loaded from the defaults and a file holding `toml`, as a deployment
    /// loads it.
    fn loaded(toml: &str) -> Result<Config, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("users.toml");
        std::fs::write(&file, toml)?;
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(file));
        Ok(mesh::config::from_figment(figment)?)
    }

    #[test]
    fn defaults_are_valid_and_listen_on_the_users_port() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.server.listen_addr.port(), PORT);
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
        let error = loaded("[authz]\n\"GetUser\" = [\"auth\"]\n")
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("authz") && e.contains("GetUser")),
            "{error:?}"
        );
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
