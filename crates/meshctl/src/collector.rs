//! The local mesh's trace receiver: an OTLP/gRPC collector (opentelemetry-proto's TraceService,
//! plaintext, on 127.0.0.1) that `meshctl up` runs in its own process and points every service
//! at. It keeps the last traces in memory, grouped by trace id, and writes them to
//! `traces.json` in the data directory after every export, where `meshctl trace` reads them, so
//! they outlive `meshctl up` and need no second port. Not a collector for anything but a
//! developer's machine: nothing is forwarded, nothing is kept beyond the last traces.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tonic::{Request, Response, Status};

/// The file under the data directory that holds the last traces.
pub const TRACES_FILE: &str = "traces.json";
/// The standard OTLP/gRPC port, where the receiver listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4317";
/// How many traces are kept when not told otherwise.
pub const DEFAULT_KEPT: usize = 100;
/// A trace with more spans than this (a runaway stream) keeps only its first ones.
const MAX_SPANS_PER_TRACE: usize = 1_000;

/// One span as `meshctl trace` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSpan {
    /// Lower-case hex, as in `traceparent`.
    pub span_id: String,
    /// Empty for a root.
    pub parent_span_id: String,
    /// `service.name` of the process that made the span.
    pub service: String,
    /// `service.instance.id`, when set (`users-2`).
    pub instance: Option<String>,
    pub name: String,
    /// `server`, `client`, `internal`...
    pub kind: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The status message when the span failed.
    pub error: Option<String>,
}

/// The spans of one trace received so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTrace {
    pub trace_id: String,
    pub spans: Vec<StoredSpan>,
}

/// The last traces, oldest first.
#[derive(Debug)]
pub struct Traces {
    traces: VecDeque<StoredTrace>,
    kept: usize,
}

impl Traces {
    pub fn new(kept: usize) -> Self {
        Self {
            traces: VecDeque::new(),
            kept: kept.max(1),
        }
    }

    /// Adds the spans of one export, dropping the oldest traces beyond the limit.
    pub fn add(&mut self, request: ExportTraceServiceRequest) {
        for resource_spans in request.resource_spans {
            let attributes = resource_spans
                .resource
                .map(|resource| resource.attributes)
                .unwrap_or_default();
            let service = text(&attributes, "service.name").unwrap_or_else(|| "?".to_owned());
            let instance = text(&attributes, "service.instance.id");
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                self.add_span(&service, instance.as_deref(), span);
            }
        }
    }

    fn add_span(&mut self, service: &str, instance: Option<&str>, span: Span) {
        let trace_id = hex(&span.trace_id);
        let stored = StoredSpan {
            span_id: hex(&span.span_id),
            parent_span_id: hex(&span.parent_span_id),
            service: service.to_owned(),
            instance: instance.map(str::to_owned),
            kind: kind_name(span.kind()).to_owned(),
            start_unix_nano: span.start_time_unix_nano,
            end_unix_nano: span.end_time_unix_nano,
            error: span
                .status
                .as_ref()
                .filter(|status| status.code() == StatusCode::Error)
                .map(|status| status.message.clone()),
            name: span.name,
        };
        match self.traces.iter_mut().find(|t| t.trace_id == trace_id) {
            Some(trace) => {
                if trace.spans.len() < MAX_SPANS_PER_TRACE {
                    trace.spans.push(stored);
                }
            }
            None => {
                if self.traces.len() == self.kept {
                    self.traces.pop_front();
                }
                self.traces.push_back(StoredTrace {
                    trace_id,
                    spans: vec![stored],
                });
            }
        }
    }

    pub fn snapshot(&self) -> Vec<StoredTrace> {
        self.traces.iter().cloned().collect()
    }
}

fn kind_name(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Server => "server",
        SpanKind::Client => "client",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal | SpanKind::Unspecified => "internal",
    }
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attributes.iter().find(|kv| kv.key == key)?.value.as_ref() {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }) => Some(value.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

/// The TraceService the services export to.
#[derive(Clone)]
struct Receiver {
    traces: Arc<Mutex<Traces>>,
    changed: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces
            .lock()
            .map_err(|_| Status::internal("trace store poisoned"))?
            .add(request.into_inner());
        self.changed.notify_one();
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver. Dropping it stops it.
pub struct Collector {
    addr: SocketAddr,
    traces: Arc<Mutex<Traces>>,
    file: PathBuf,
    tasks: [JoinHandle<()>; 2],
}

impl Collector {
    /// Listens on `listen` and keeps the last `kept` traces in `data_dir`'s [`TRACES_FILE`].
    pub async fn start(listen: SocketAddr, data_dir: &Path, kept: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening for traces on {listen}"))?;
        let addr = listener.local_addr()?;
        let traces = Arc::new(Mutex::new(Traces::new(kept)));
        let changed = Arc::new(Notify::new());
        let file = data_dir.join(TRACES_FILE);
        let receiver = Receiver {
            traces: traces.clone(),
            changed: changed.clone(),
        };
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the trace receiver stopped");
            }
        });
        // One writer, so that exports arriving together never race on the file.
        let writer = {
            let traces = traces.clone();
            let file = file.clone();
            tokio::spawn(async move {
                loop {
                    changed.notified().await;
                    if let Err(error) = persist(&traces, &file).await {
                        tracing::warn!(%error, "cannot write the traces");
                    }
                }
            })
        };
        Ok(Self {
            addr,
            traces,
            file,
            tasks: [server, writer],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops receiving, and writes what arrived last.
    pub async fn stop(self) -> anyhow::Result<()> {
        for task in &self.tasks {
            task.abort();
        }
        persist(&self.traces, &self.file).await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Writes the traces to `file` through a temporary file, so a reader never sees half of it.
async fn persist(traces: &Mutex<Traces>, file: &Path) -> anyhow::Result<()> {
    let snapshot = traces
        .lock()
        .map_err(|_| anyhow::anyhow!("trace store poisoned"))?
        .snapshot();
    let json = serde_json::to_vec(&snapshot)?;
    let partial = file.with_extension("json.partial");
    tokio::fs::write(&partial, json)
        .await
        .with_context(|| format!("writing {}", partial.display()))?;
    tokio::fs::rename(&partial, file)
        .await
        .with_context(|| format!("replacing {}", file.display()))
}

/// The traces `meshctl up`'s receiver last wrote under `data_dir`.
pub fn load(data_dir: &Path) -> anyhow::Result<Vec<StoredTrace>> {
    let file = data_dir.join(TRACES_FILE);
    let json = std::fs::read(&file).with_context(|| {
        format!(
            "no traces at {}: `meshctl up` writes them there while it runs its own receiver \
             (with --otlp-endpoint, look in that collector instead)",
            file.display()
        )
    })?;
    serde_json::from_slice(&json).with_context(|| format!("reading {}", file.display()))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans},
    };

    use super::*;

    fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".to_owned(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.to_owned())),
                        }),
                        ..KeyValue::default()
                    }],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    fn span(trace: u8, id: u8, name: &str) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            name: name.to_owned(),
            ..Span::default()
        }
    }

    #[test]
    fn spans_from_several_services_join_their_trace() {
        let mut traces = Traces::new(10);
        traces.add(export("users", vec![span(1, 2, "GetUser")]));
        traces.add(export("orders", vec![span(1, 1, "CreateOrder")]));
        let kept = traces.snapshot();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].trace_id, "01".repeat(16));
        let services: Vec<&str> = kept[0].spans.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(services, ["users", "orders"]);
    }

    #[test]
    fn only_the_last_traces_are_kept() {
        let mut traces = Traces::new(2);
        for trace in 1..=3 {
            traces.add(export("orders", vec![span(trace, 1, "CreateOrder")]));
        }
        let ids: Vec<String> = traces.snapshot().into_iter().map(|t| t.trace_id).collect();
        assert_eq!(ids, ["02".repeat(16), "03".repeat(16)]);
    }
}
