//! The process's tracing subscriber: filtered by `RUST_LOG` (INFO by default, with the chatty
//! transport crates held at WARN), human-readable by default, JSON lines when
//! `MESHWORK_LOG_FORMAT=json`.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Selects the log format; not a configuration key, so the config loader ignores it.
pub const LOG_FORMAT_VAR: &str = "MESHWORK_LOG_FORMAT";

/// h2, hyper and tonic trace every frame; at INFO we keep only what operators read.
const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,sqlx=warn";

/// Installs the subscriber for this process; a second call is a no-op.
pub fn init(service: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var(LOG_FORMAT_VAR).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    // A second initialisation (several apps in one test process) keeps the first subscriber.
    let _ = if json {
        registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init()
    } else {
        registry.with(fmt::layer().with_target(false)).try_init()
    };
    tracing::debug!(service, "telemetry initialised");
}
