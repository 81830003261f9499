//! The auth service's configuration: where it listens (mutual TLS, optional plaintext admin port
//! for health probes), who may call it, where its database is, how it reaches the users service,
//! what the tokens it issues look like and how often its signing key changes, and how hard login
//! attempts are throttled. Loaded by [`mesh::config::load`].

use std::{num::NonZeroU32, time::Duration};

use mesh::{
    authz::{ANY_SERVICE, Policy},
    config::{AdminConfig, ClientConfig, ConfigError, DatabaseConfig, ServerConfig, Validate},
    tls::TlsConfig,
};
use serde::{Deserialize, Serialize};

/// The auth service's well-known local port.
pub const PORT: u16 = 50052;
/// Where the users service listens locally by default.
pub const USERS_ENDPOINT: &str = "https://127.0.0.1:50051";
/// This service's name in the mesh: the identity its certificate carries.
pub const MESH_NAME: &str = "auth";

/// Access tokens are short-lived: a stolen one is useful for a quarter of an hour at most.
const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// A session lasts a month of inactivity before the user has to log in again.
const DEFAULT_REFRESH_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// A signing key signs for a day: a leaked key is useful for a day (plus the lifetime of the
/// tokens it signed), and the key set stays small.
const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Attempts on one account per minute: plenty for a person mistyping, far too few to guess.
const DEFAULT_PER_ACCOUNT_PER_MINUTE: NonZeroU32 = NonZeroU32::new(10).unwrap();
/// Attempts from one address per minute: room for a few people behind one NAT.
const DEFAULT_PER_PEER_PER_MINUTE: NonZeroU32 = NonZeroU32::new(60).unwrap();

/// The auth service's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// The plaintext health port for probes (off by default).
    pub admin: AdminConfig,
    /// This service's certificate and the mesh CA.
    pub tls: TlsConfig,
    /// Method -> who may call it; see [`default_policy`].
    pub authz: Policy,
    pub database: DatabaseConfig,
    /// The users service, which owns the profiles that credentials belong to.
    pub users: ClientConfig,
    pub tokens: TokenConfig,
    pub login_limits: LoginLimits,
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
            tokens: TokenConfig::default(),
            login_limits: LoginLimits::default(),
        }
    }
}

/// Every method of auth is open to the whole mesh: registering, logging in, refreshing and
/// logging out are how end users get tokens (through whichever service fronts them), and
/// GetJwks is how every service gets the keys that verify them. Auth verifies no end-user
/// tokens on its own methods.
pub fn default_policy() -> Policy {
    Policy::from_rules([("meshwork.auth.v1.AuthService/*", &[ANY_SERVICE][..])])
}

impl Validate for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate("server")?;
        self.tls.validate("tls")?;
        self.authz.validate("authz")?;
        self.database.validate("database")?;
        self.users.validate("users")?;
        self.tokens.validate("tokens")
    }
}

/// How many login attempts are answered before RESOURCE_EXHAUSTED, counted before any password
/// is verified. Each limit refills continuously: `n` per minute is one more attempt every
/// `60/n` seconds, after a first burst of `n`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginLimits {
    /// Attempts on one account (its normalised email), whoever makes them.
    pub per_account_per_minute: NonZeroU32,
    /// Attempts from one caller address (the mesh peer), whatever the account. Behind a
    /// gateway every user shares the gateway's address: raise this there.
    pub per_peer_per_minute: NonZeroU32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_account_per_minute: DEFAULT_PER_ACCOUNT_PER_MINUTE,
            per_peer_per_minute: DEFAULT_PER_PEER_PER_MINUTE,
        }
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
    /// Age at which the signing key is replaced by a new one (a new `kid`). The old public key
    /// stays in GetJwks until every token it signed has expired.
    #[serde(with = "humantime_serde")]
    pub key_rotation: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "meshwork-auth".to_owned(),
            audience: "meshwork".to_owned(),
            access_ttl: DEFAULT_ACCESS_TTL,
            refresh_ttl: DEFAULT_REFRESH_TTL,
            key_rotation: DEFAULT_KEY_ROTATION,
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
        // Keys are dated in milliseconds; below a second a key would be replaced on every call.
        if self.key_rotation.as_secs() == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.key_rotation"),
                "must be at least one second",
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
    fn defaults_speak_mutual_tls_as_auth_and_admit_the_whole_mesh() {
        let config = Config::default();
        assert_eq!(
            config.tls.cert_file,
            std::path::Path::new(".meshwork/certs/auth.crt")
        );
        assert_eq!(config.users.endpoints, [USERS_ENDPOINT]);
        assert!(USERS_ENDPOINT.starts_with("https://"));
        assert!(config.admin.listen_addr.is_none());
        assert_eq!(
            config.authz,
            Policy::from_rules([("meshwork.auth.v1.AuthService/*", &["*"][..])])
        );
    }

    #[test]
    fn defaults_rotate_daily_and_allow_ten_logins_per_account_and_sixty_per_peer() {
        let config = Config::default();
        assert_eq!(config.tokens.key_rotation, Duration::from_secs(24 * 3600));
        assert_eq!(config.login_limits.per_account_per_minute.get(), 10);
        assert_eq!(config.login_limits.per_peer_per_minute.get(), 60);
    }

    #[test]
    fn sub_second_key_rotation_is_named() {
        let mut config = Config::default();
        config.tokens.key_rotation = Duration::from_millis(500);
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("tokens.key_rotation")),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_policy_is_named() {
        let config = Config {
            authz: Policy::from_rules([("Login", &["*"][..])]),
            ..Config::default()
        };
        let err = config.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("authz")),
            "{err:?}"
        );
    }

    fn loaded(toml: &str) -> Result<Config, ConfigError> {
        use figment::{
            Figment,
            providers::{Format, Serialized, Toml},
        };
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml));
        mesh::config::from_figment(figment)
    }

    #[test]
    fn rotation_and_login_limits_are_configurable() -> Result<(), ConfigError> {
        let config = loaded(
            "[tokens]\nkey_rotation = \"7days\"\n\
             [login_limits]\nper_account_per_minute = 5\nper_peer_per_minute = 600",
        )?;
        assert_eq!(
            config.tokens.key_rotation,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(config.login_limits.per_account_per_minute.get(), 5);
        assert_eq!(config.login_limits.per_peer_per_minute.get(), 600);
        Ok(())
    }

    #[test]
    fn a_zero_login_limit_is_named() {
        let err = loaded("[login_limits]\nper_peer_per_minute = 0")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("per_peer_per_minute")),
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
