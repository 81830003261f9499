//! Test support shared by the trace tests (this crate's `tracing.rs` and the workspace's
//! `tests/observability.rs`, which includes this file by path): an in-process OTLP/gRPC collector
//! (opentelemetry-proto's TraceService) that keeps every span, a log buffer for JSON lines, and
//! span lookups.

#![allow(dead_code)] // Each test crate uses part of it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// No wait for spans lasts longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps every span exported to it.
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        self.spans
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .extend(spans);
        self.arrived.notify_waiters();
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    pub async fn start() -> anyhow::Result<(Self, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Self::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        Ok((collector, addr))
    }

    /// The spans received, grouped by trace in order of arrival, once there are `count`.
    pub async fn traces(&self, count: usize) -> anyhow::Result<Vec<Vec<Span>>> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                if let Some(traces) = self.grouped(count)? {
                    return Ok(traces);
                }
                arrived.await;
            }
        };
        tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .with_context(|| format!("fewer than {count} spans arrived"))?
    }

    fn grouped(&self, count: usize) -> anyhow::Result<Option<Vec<Vec<Span>>>> {
        let spans = self.spans.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if spans.len() < count {
            return Ok(None);
        }
        let mut traces: Vec<Vec<Span>> = Vec::new();
        for span in spans.iter() {
            match traces.iter_mut().find(|t| t[0].trace_id == span.trace_id) {
                Some(trace) => trace.push(span.clone()),
                None => traces.push(vec![span.clone()]),
            }
        }
        Ok(Some(traces))
    }
}

/// A span attribute as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref();
    match value?.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(number) => Some(number.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match span.attributes.iter().find(|kv| kv.key == key)?.value {
        Some(AnyValue {
            value: Some(any_value::Value::IntValue(number)),
        }) => Some(number),
        _ => None,
    }
}

/// The one span of `trace` with this name and kind.
pub fn span<'a>(trace: &'a [Span], name: &str, kind: SpanKind) -> anyhow::Result<&'a Span> {
    let mut found = trace
        .iter()
        .filter(|s| s.name == name && s.kind == kind as i32);
    let first = found
        .next()
        .with_context(|| format!("no {kind:?} span {name} in {trace:#?}"))?;
    anyhow::ensure!(found.next().is_none(), "two {kind:?} spans {name}");
    Ok(first)
}

pub fn status_code(span: &Span) -> StatusCode {
    span.status
        .as_ref()
        .map_or(StatusCode::Unset, |status| status.code())
}

/// Log lines written to a buffer.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<u8>>>);

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

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Lines {
    /// Every JSON line logged with `message`.
    pub fn with_message(&self, message: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let bytes = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut found = Vec::new();
        for line in String::from_utf8_lossy(&bytes).lines() {
            let line: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            if line["fields"]["message"] == message {
                found.push(line);
            }
        }
        Ok(found)
    }
}
