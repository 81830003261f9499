//! The process's telemetry: one tracing subscriber, and the OpenTelemetry trace pipeline behind
//! it when a collector is configured.
//!
//! - Logs: filtered by `RUST_LOG` (INFO by default, with the chatty transport crates held at
//!   WARN), human-readable by default, JSON lines when `MESHWORK_LOG_FORMAT=json`. A JSON line
//!   written inside a traced request carries the request's `trace_id` and `span_id` at the top
//!   level, so logs and traces join on them. The mesh's per-call and per-query spans
//!   ([`crate::trace::SPAN_TARGET`]) go to the traces only: formatting their fields for the log
//!   layer on every call was the largest cost of the server stack.
//! - Traces: only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//!   set. Spans go through a batch processor to an OTLP/gRPC exporter; the sampler comes from
//!   `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`), the
//!   service name from `OTEL_SERVICE_NAME` or the name the binary gives. Without an endpoint no
//!   OpenTelemetry layer is installed at all: nothing is exported, no thread is started, nothing
//!   blocks.
//!
//! Not here: the spans themselves, made by the mesh's layers ([`crate::trace`]).
//!
//! ```text
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     let _telemetry = mesh::telemetry::init("users"); // flushes spans when dropped
//!     ...
//! }
//! ```

use std::{cell::RefCell, fmt, time::Duration};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{
        FmtContext, FormatEvent, FormatFields, MakeWriter, format::Writer, writer::BoxMakeWriter,
    },
    prelude::*,
    registry::LookupSpan,
};

/// Selects the log format; not a configuration key, so the config loader ignores it.
pub const LOG_FORMAT_VAR: &str = "MESHWORK_LOG_FORMAT";
/// The standard OTLP endpoint variables; traces are exported only when one of them is set.
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTLP_TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The standard service name variable; it wins over the name the binary passes.
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";

/// h2, hyper and tonic trace every frame; at INFO we keep only what operators read. The
/// OpenTelemetry SDK reports its own start-up at INFO, which nobody needs either.
pub const DEFAULT_FILTER: &str =
    "info,h2=warn,hyper=warn,hyper_util=warn,tonic=warn,tower=warn,sqlx=warn,opentelemetry=warn";
/// The instrumentation scope of every span the mesh makes.
const TRACER_NAME: &str = "meshwork";
/// How long shutting down may wait for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event for a person at a terminal.
    Human,
    /// One JSON object per line, with `trace_id` / `span_id` inside traced requests.
    Json,
}

impl LogFormat {
    /// JSON when `MESHWORK_LOG_FORMAT=json`, human-readable otherwise.
    pub fn from_env() -> Self {
        if std::env::var(LOG_FORMAT_VAR).is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
            Self::Json
        } else {
            Self::Human
        }
    }
}

/// What [`Telemetry::init`] installs. [`init`] is the usual entry point; tests use this to point
/// the exporter at an in-process collector and to capture log lines.
pub struct Telemetry {
    service: String,
    log_format: LogFormat,
    otlp_endpoint: Option<String>,
    filter: Option<String>,
    writer: BoxMakeWriter,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("service", &self.service)
            .field("log_format", &self.log_format)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Everything from the environment: log format, OTLP endpoint, service name (`service` when
    /// `OTEL_SERVICE_NAME` is unset); logs to stdout.
    pub fn from_env(service: &str) -> Self {
        let service = std::env::var(SERVICE_NAME_VAR)
            .ok()
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| service.to_owned());
        let otlp_endpoint = [OTLP_TRACES_ENDPOINT_VAR, OTLP_ENDPOINT_VAR]
            .into_iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()));
        Self {
            service,
            log_format: LogFormat::from_env(),
            otlp_endpoint,
            filter: None,
            writer: BoxMakeWriter::new(std::io::stdout),
        }
    }

    pub fn with_log_format(mut self, log_format: LogFormat) -> Self {
        self.log_format = log_format;
        self
    }

    /// Exports traces over OTLP/gRPC to `endpoint` (`http://host:port`; no scheme means http).
    pub fn with_otlp_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(endpoint.into());
        self
    }

    /// Filters with these directives (`RUST_LOG` syntax) instead of `RUST_LOG` or the default.
    pub fn with_filter(mut self, directives: &str) -> Self {
        self.filter = Some(directives.to_owned());
        self
    }

    /// Writes log lines there instead of stdout.
    pub fn with_writer<W>(mut self, writer: W) -> Self
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        self.writer = BoxMakeWriter::new(writer);
        self
    }

    /// Installs the subscriber (and the trace pipeline, when an endpoint is set) for the whole
    /// process. Must run inside a Tokio runtime when exporting: the exporter's channel lives
    /// there. A second call in one process (several apps in a test) keeps the first subscriber
    /// and returns a guard that does nothing.
    pub fn init(self) -> TelemetryGuard {
        if tracing::dispatcher::has_been_set() {
            return TelemetryGuard { provider: None };
        }
        let filter = match &self.filter {
            Some(directives) => EnvFilter::new(directives),
            None => {
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
            }
        };
        let (provider, export_error) = match self.otlp_endpoint.as_deref() {
            Some(endpoint) => match tracer_provider(&self.service, endpoint) {
                Ok(provider) => (Some(provider), None),
                Err(error) => (None, Some(error)),
            },
            None => (None, None),
        };
        let otel = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(TRACER_NAME))
                // Per-span extras we do not read, each a cost on every span.
                .with_tracked_inactivity(false)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
        });
        let registry = tracing_subscriber::registry().with(filter).with(otel);
        let logs = match self.log_format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .event_format(WithTraceIds(
                    tracing_subscriber::fmt::format()
                        .json()
                        .with_current_span(true),
                ))
                .with_writer(self.writer)
                .boxed(),
            LogFormat::Human => tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(self.writer)
                .boxed(),
        };
        // The mesh's own spans (one per call on each side, one per query) are for traces, not
        // for log lines: the log layer would format every field of every one of them on every
        // call, logged or not (measured: about a quarter of the server's CPU per call on a small
        // call, `make bench`). Lines logged inside a call carry its trace and span ids instead
        // (JSON), which join them to the trace.
        let logs = logs.with_filter(without_mesh_spans());
        if registry.with(logs).try_init().is_err() {
            // Someone else installed a subscriber between the check and here.
            if let Some(provider) = provider {
                let _ = provider.shutdown();
            }
            return TelemetryGuard { provider: None };
        }
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        if let Some(provider) = &provider {
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
        match (&provider, export_error) {
            (Some(_), _) => tracing::info!(
                service = %self.service,
                endpoint = self.otlp_endpoint.as_deref().unwrap_or_default(),
                "exporting traces over OTLP/gRPC"
            ),
            (None, Some(error)) => tracing::error!(
                %error,
                "traces will not be exported: check {OTLP_ENDPOINT_VAR}"
            ),
            (None, None) => tracing::debug!(service = %self.service, "telemetry initialised"),
        }
        TelemetryGuard { provider }
    }
}

/// The log layer's filter: everything but the mesh's own spans ([`crate::trace::SPAN_TARGET`]);
/// their events still pass.
fn without_mesh_spans()
-> tracing_subscriber::filter::FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool> {
    tracing_subscriber::filter::filter_fn(|metadata| {
        !(metadata.is_span() && metadata.target() == crate::trace::SPAN_TARGET)
    })
}

/// Installs the process's telemetry from the environment (see the module documentation).
/// Keep the guard alive until the process ends: dropping it flushes the last spans.
pub fn init(service: &str) -> TelemetryGuard {
    Telemetry::from_env(service).init()
}

/// Why the trace pipeline could not be built.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for `{endpoint}`: {source}")]
pub struct TelemetryError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// A tracer provider that batches spans to the OTLP/gRPC collector at `endpoint`, named
/// `service`, with the sampler the environment selects (parent-based unless told otherwise).
/// Must be called inside a Tokio runtime.
pub fn tracer_provider(service: &str, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let endpoint = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|source| TelemetryError { endpoint, source })?;
    // The builder's default configuration reads OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* and the
    // span limits from the environment.
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

/// Keeps the trace pipeline alive; dropping it (or [`Self::shutdown`]) exports the spans still
/// queued and stops the exporter.
#[must_use = "dropping the guard shuts the trace exporter down"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are being exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now, waiting for the collector's answer without blocking
    /// the runtime.
    pub async fn flush(&self) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        match tokio::task::spawn_blocking(move || provider.force_flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "flushing spans failed"),
            Err(error) => tracing::warn!(%error, "flushing spans panicked"),
        }
    }

    /// Flushes and stops the exporter (what dropping the guard does).
    pub fn shutdown(mut self) {
        self.shutdown_provider();
    }

    fn shutdown_provider(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let shutdown = move || {
            if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
                tracing::warn!(%error, "exporting the last spans failed");
            }
        };
        // The export runs on the runtime's tasks while this thread waits for it.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(shutdown);
            }
            // Waiting here would stall the only thread that can run the export: finish on the
            // side, best effort.
            Ok(_) => {
                std::thread::spawn(shutdown);
            }
            Err(_) => shutdown(),
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_provider();
    }
}

/// The JSON event format with the current OpenTelemetry `trace_id` and `span_id` added at the
/// top level of the object. The inner formatter writes the line as always; the two ids are
/// spliced in before its closing brace, so the rest of the line is exactly the stock format.
struct WithTraceIds<F>(F);

thread_local! {
    /// The line being formatted, reused from event to event.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Entering a span attaches its OpenTelemetry context to the thread
        // (tracing-opentelemetry's context activation), so this is the event's span.
        let context = opentelemetry::Context::current();
        let span = context.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let splice = |line: &mut String, writer: &mut Writer<'_>| -> fmt::Result {
            line.clear();
            self.0.format_event(ctx, Writer::new(line), event)?;
            let object = line.trim_end();
            let Some(open) = object.strip_suffix('}') else {
                // Not a JSON object after all: leave it alone.
                return writer.write_str(line);
            };
            let separator = if open.ends_with('{') { "" } else { "," };
            writeln!(
                writer,
                "{open}{separator}\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                ids.trace_id(),
                ids.span_id()
            )
        };
        LINE.with(|line| match line.try_borrow_mut() {
            Ok(mut line) => splice(&mut line, &mut writer),
            // Formatting an event logged while formatting another: no buffer to share.
            Err(_) => splice(&mut String::new(), &mut writer),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Lines {
        fn text(&self) -> String {
            self.0
                .lock()
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default()
        }
    }

    fn json_subscriber(lines: &Lines) -> impl Subscriber + Send + Sync {
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(WithTraceIds(
                    tracing_subscriber::fmt::format()
                        .json()
                        .with_current_span(true),
                ))
                .with_writer(lines.clone()),
        )
    }

    #[test]
    fn log_lines_leave_out_the_fields_of_the_mesh_spans_but_not_others() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(lines.clone())
                .with_filter(without_mesh_spans()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let call = tracing::info_span!(
                target: crate::trace::SPAN_TARGET,
                "grpc.server",
                rpc.method = "GetUser"
            );
            let _call = call.enter();
            let step = tracing::info_span!("saga", step = "charge");
            let _step = step.enter();
            tracing::info!("inside");
            tracing::warn!(target: crate::trace::SPAN_TARGET, "from the mesh's module");
        });
        let text = lines.text();
        assert!(
            text.contains("inside") && text.contains("from the mesh's module"),
            "{text}"
        );
        assert!(
            text.contains("step"),
            "another span's fields are kept: {text}"
        );
        assert!(
            !text.contains("rpc.method"),
            "a mesh span was formatted: {text}"
        );
    }

    #[test]
    fn json_lines_inside_a_trace_carry_its_ids_at_the_top_level() -> Result<(), serde_json::Error> {
        let lines = Lines::default();
        let trace_id =
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap_or(TraceId::INVALID);
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap_or(SpanId::INVALID);
        let remote = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        tracing::subscriber::with_default(json_subscriber(&lines), || {
            let _attached = opentelemetry::Context::new()
                .with_remote_span_context(remote)
                .attach();
            tracing::info!(order_id = "o1", "inside");
        });
        let line: serde_json::Value = serde_json::from_str(lines.text().trim())?;
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span_id"], "00f067aa0ba902b7");
        assert_eq!(line["fields"]["order_id"], "o1");
        Ok(())
    }

    #[test]
    fn json_lines_outside_a_trace_are_the_stock_format() -> Result<(), serde_json::Error> {
        let lines = Lines::default();
        tracing::subscriber::with_default(json_subscriber(&lines), || {
            tracing::info!("outside");
        });
        let line: serde_json::Value = serde_json::from_str(lines.text().trim())?;
        assert!(line.get("trace_id").is_none());
        assert_eq!(line["fields"]["message"], "outside");
        Ok(())
    }
}
