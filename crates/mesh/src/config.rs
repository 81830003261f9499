//! Configuration loading: embedded defaults, then an optional TOML file (named by
//! `MESHWORK_CONFIG`), then `MESHWORK_` environment variables (`__` separates nesting:
//! `MESHWORK_SERVER__LISTEN_ADDR=0.0.0.0:50051`). Each service declares one typed struct with
//! `#[serde(deny_unknown_fields)]`; an unknown or ill-typed key is an error that names it.
//!
//! The building blocks every service shares ([`ServerConfig`], [`DatabaseConfig`],
//! [`ClientConfig`]) live here too, with their validation.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The environment variable naming an optional configuration file.
pub const CONFIG_FILE_VAR: &str = "MESHWORK_CONFIG";
/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "MESHWORK_";

/// Why a configuration could not be loaded; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// A service's configuration: loadable, and able to check the values serde cannot.
pub trait Validate {
    /// Checks values across fields; the error names the key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from its defaults, the file named by `MESHWORK_CONFIG` (if set) and the environment.
pub fn load<T>() -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = std::env::var_os(CONFIG_FILE_VAR).map(PathBuf::from) {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .ignore(&["CONFIG", "LOG_FORMAT"])
            .split("__"),
    );
    from_figment(figment)
}

/// Extracts and validates `T` from an assembled figment (what [`load`] does after assembling it).
pub fn from_figment<T>(figment: Figment) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let config: T = figment
        .extract()
        .map_err(|e| ConfigError::Load(Box::new(e)))?;
    config.validate()?;
    Ok(config)
}

/// Largest gRPC message a server accepts by default (4 MiB, tonic's own default, made explicit).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Calls a server lets into its handlers at once by default. Well above what one replica's
/// database pool (8 connections) can work through without queueing, so that it only sheds when
/// it is truly saturated; well below what makes a replica run out of memory or file descriptors.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;
/// HTTP/2 streams one client connection may have open at once by default: room for every
/// admitted call plus long-lived server streams (WatchOrder), while bounding one peer's share.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

/// How a service's gRPC server listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the gRPC port; port 0 picks a free one.
    pub listen_addr: SocketAddr,
    /// Largest request message accepted; a larger one is refused by tonic with OUT_OF_RANGE.
    pub max_message_bytes: usize,
    /// Longest time in-flight calls get to finish after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Upper bound on any call's processing time, whatever `grpc-timeout` the caller sent.
    #[serde(with = "humantime_serde")]
    pub max_call_duration: Duration,
    /// Calls in the handlers at once, across all connections; a call beyond it is refused at
    /// once with UNAVAILABLE, marked as not processed (health and reflection are exempt).
    pub max_concurrent_calls: usize,
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
}

impl ServerConfig {
    /// Defaults listening on `port` of the loopback interface.
    pub fn on_port(port: u16) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ..Self::default()
        }
    }

    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_message_bytes"),
                "must be at least 1024",
            ));
        }
        if self.max_call_duration.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_call_duration"),
                "must be greater than zero",
            ));
        }
        if self.max_concurrent_calls == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_concurrent_calls"),
                "must be at least 1",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_concurrent_streams"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            drain_timeout: Duration::from_secs(10),
            max_call_duration: Duration::from_secs(60),
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// The plaintext admin port: `grpc.health.v1` for the kubelet's probes (it has no mesh
/// certificate), and over HTTP/1.1 `/healthz` and `/metrics` (Prometheus text); nothing else.
/// Off unless an address is given.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// e.g. `0.0.0.0:9090` in a pod; reachable only from the node by NetworkPolicy.
    pub listen_addr: Option<SocketAddr>,
}

/// Where a service keeps its data. Its `Debug` hides the URL's password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db` (created when absent) or `postgres://user@host/db`.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before failing UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::store::redact(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    /// A SQLite file named after the service under the local data directory.
    pub fn sqlite_for(service: &str) -> Self {
        Self {
            url: format!("sqlite://.meshwork/data/{service}.db"),
            ..Self::default()
        }
    }

    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        crate::store::Backend::of_url(&self.url)
            .map_err(|reason| ConfigError::invalid(format!("{prefix}.url"), reason))?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_connections"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://.meshwork/data/meshwork.db".to_owned(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// How a service reaches one downstream service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Where the downstream's replicas are, one entry per source (see [`crate::discovery`]):
    /// - `https://host:port` (or `http://`, which means the same: mutual TLS is the connector's
    ///   job): one endpoint; a host name is resolved by each connection attempt;
    /// - `dns://host:port`: every address the name resolves to is an endpoint, re-resolved every
    ///   `dns_refresh` (a Kubernetes headless Service gives one address per ready pod).
    pub endpoints: Vec<String>,
    /// How long establishing a connection to one endpoint may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The deadline of a call that did not set one.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
    /// Per-method deadlines (`"package.Service/Method" = "500ms"`) that replace
    /// `default_deadline` for those methods.
    pub method_deadlines: BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// How often `dns://` endpoints are re-resolved (default 5s). Replicas that appear are added,
    /// vanished ones removed; a failed or empty lookup keeps the previous addresses.
    #[serde(with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// Outlier ejection: when an endpoint stops receiving calls for a while (see [`crate::eject`]).
    pub ejection: EjectionConfig,
    /// Which failed calls are tried again, how often, and the budget that bounds retries (see
    /// [`crate::retry`]).
    pub retry: crate::retry::RetryConfig,
}

/// Outlier ejection of one client's endpoints: after `consecutive_failures` failed calls in a row
/// (connection or transport errors, UNAVAILABLE), an endpoint is taken out of the balancer for
/// `base_interval`, doubled for each further ejection without a success in between, up to
/// `max_interval`; then one probe call decides whether it stays in. At most
/// `max_ejected_percent` of the endpoints (rounded down) are out at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionConfig {
    /// Failures in a row that eject an endpoint (default 5; at least 1).
    pub consecutive_failures: u32,
    /// How long a first ejection lasts (default 1s).
    #[serde(with = "humantime_serde")]
    pub base_interval: Duration,
    /// The longest an ejection lasts, however often it repeats (default 30s).
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Share of the endpoints, in percent, that may be ejected at once (default 50; 0 turns
    /// ejection off). With 50, a single endpoint is never ejected: failing fast beats waiting.
    pub max_ejected_percent: u8,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            max_ejected_percent: 50,
        }
    }
}

impl EjectionConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                format!("{prefix}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        if self.base_interval.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.base_interval"),
                "must be greater than zero",
            ));
        }
        if self.max_interval < self.base_interval {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_interval"),
                "must be at least base_interval",
            ));
        }
        if self.max_ejected_percent > 100 {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_ejected_percent"),
                "must be between 0 and 100",
            ));
        }
        Ok(())
    }
}

impl ClientConfig {
    /// Defaults pointing at one endpoint.
    pub fn to(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            ..Self::default()
        }
    }

    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.endpoints"),
                "needs at least one endpoint",
            ));
        }
        for endpoint in &self.endpoints {
            crate::discovery::Source::parse(endpoint)
                .map_err(|e| ConfigError::invalid(format!("{prefix}.endpoints"), e.to_string()))?;
        }
        if self.default_deadline.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.default_deadline"),
                "must be greater than zero",
            ));
        }
        if self.dns_refresh.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.dns_refresh"),
                "must be greater than zero",
            ));
        }
        for (method, deadline) in &self.method_deadlines {
            let well_formed = method
                .split_once('/')
                .is_some_and(|(service, name)| service.contains('.') && !name.is_empty());
            if !well_formed || deadline.is_zero() {
                return Err(ConfigError::invalid(
                    format!("{prefix}.method_deadlines.\"{method}\""),
                    "must map package.Service/Method to a duration greater than zero",
                ));
            }
        }
        self.ejection.validate(&format!("{prefix}.ejection"))?;
        self.retry.validate(&format!("{prefix}.retry"))
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            default_deadline: Duration::from_secs(5),
            dns_refresh: Duration::from_secs(5),
            method_deadlines: BTreeMap::new(),
            ejection: EjectionConfig::default(),
            retry: crate::retry::RetryConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        server: ServerConfig,
        database: DatabaseConfig,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            self.server.validate("server")?;
            self.database.validate("database")
        }
    }

    #[test]
    fn defaults_are_valid() {
        let figment = Figment::from(Serialized::defaults(Sample::default()));
        assert!(from_figment::<Sample>(figment).is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        let figment = Figment::from(Serialized::defaults(Sample::default()))
            .merge(Toml::string("[server]\nlisten_adr = \"127.0.0.1:1\""));
        let err = from_figment::<Sample>(figment).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("listen_adr")),
            "{err:?}"
        );
    }

    #[test]
    fn ill_typed_value_is_named() {
        let figment = Figment::from(Serialized::defaults(Sample::default()))
            .merge(Toml::string("[server]\nlisten_addr = \"not an address\""));
        let err = from_figment::<Sample>(figment).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("server.listen_addr")),
            "{err:?}"
        );
    }

    #[test]
    fn method_deadlines_are_read_and_checked() -> Result<(), Box<figment::Error>> {
        let read = |toml: &str| {
            Figment::from(Serialized::defaults(ClientConfig::to("https://h:1")))
                .merge(Toml::string(toml))
                .extract::<ClientConfig>()
                .map_err(Box::new)
        };
        let config = read("[method_deadlines]\n\"a.B/Watch\" = \"10m\"\n")?;
        assert_eq!(
            config.method_deadlines.get("a.B/Watch").map(|d| **d),
            Some(Duration::from_secs(600))
        );
        assert!(config.validate("users").is_ok());
        let bad = read("[method_deadlines]\n\"Watch\" = \"10m\"\n")?;
        assert!(
            bad.validate("users")
                .err()
                .is_some_and(|e| e.to_string().contains("users.method_deadlines"))
        );
        Ok(())
    }

    #[test]
    fn database_passwords_do_not_print() {
        let config = DatabaseConfig {
            url: "postgres://app:hunter2@db/app".into(),
            ..DatabaseConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_server_that_admits_no_calls_is_named() {
        for key in ["max_concurrent_calls", "max_concurrent_streams"] {
            let figment = Figment::from(Serialized::defaults(Sample::default()))
                .merge(Toml::string(&format!("[server]\n{key} = 0")));
            let err = from_figment::<Sample>(figment).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains(&format!("server.{key}"))),
                "{err:?}"
            );
        }
    }

    #[test]
    fn bad_database_url_is_named() {
        let figment = Figment::from(Serialized::defaults(Sample::default()))
            .merge(Toml::string("[database]\nurl = \"mysql://x\""));
        let err = from_figment::<Sample>(figment).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("database.url")),
            "{err:?}"
        );
    }

    #[test]
    // figment::Jail fixes the closure's error type; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MESHWORK_SERVER__MAX_MESSAGE_BYTES", "2048");
            let config: Sample = load().map_err(|e| e.to_string())?;
            assert_eq!(config.server.max_message_bytes, 2048);
            Ok(())
        });
    }

    /// Validates `toml` over a client's defaults, as the client of `users`.
    fn client_config(toml: &str) -> Result<ClientConfig, String> {
        let config: ClientConfig = Figment::from(Serialized::defaults(ClientConfig::to(
            "https://127.0.0.1:50051",
        )))
        .merge(Toml::string(toml))
        .extract()
        .map_err(|e| e.to_string())?;
        config.validate("users").map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn client_discovery_and_ejection_knobs_are_read_and_checked() {
        let config = client_config(
            "endpoints = [\"dns://users-headless:50051\", \"https://users:50051\"]\n\
             dns_refresh = \"2s\"\n[ejection]\nconsecutive_failures = 3\nmax_interval = \"1m\"",
        );
        let config = config
            .as_ref()
            .map(|c| (c.dns_refresh, c.ejection.consecutive_failures));
        assert_eq!(config, Ok((Duration::from_secs(2), 3)));
        for (toml, key) in [
            ("endpoints = [\"users:50051\"]", "users.endpoints"),
            ("endpoints = [\"dns://users\"]", "users.endpoints"),
            ("dns_refresh = \"0s\"", "users.dns_refresh"),
            (
                "[ejection]\nconsecutive_failures = 0",
                "users.ejection.consecutive_failures",
            ),
            (
                "[ejection]\nbase_interval = \"0s\"",
                "users.ejection.base_interval",
            ),
            (
                "[ejection]\nmax_interval = \"100ms\"",
                "users.ejection.max_interval",
            ),
            (
                "[ejection]\nmax_ejected_percent = 101",
                "users.ejection.max_ejected_percent",
            ),
        ] {
            let err = client_config(toml).err();
            assert!(
                err.as_deref().is_some_and(|e| e.contains(key)),
                "{toml}: {err:?}"
            );
        }
    }
}
