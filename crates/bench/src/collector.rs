//! A trace sink for the runs that export traces: an OTLP/gRPC TraceService on 127.0.0.1 that
//! counts the spans it receives (to show that "every call traced" really exported every call)
//! and, per trace, adds up the time of the root server span and of the database query spans
//! (those with `db.system.name`), which is how the real-service runs tell database time apart.
//! It runs on a thread and runtime of its own, so that receiving spans does not stall the load
//! generator's runtime.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::{Span, span::SpanKind},
};
use tonic::{Request, Response, Status};

/// Time spent in one trace.
#[derive(Debug, Default, Clone, Copy)]
struct TraceTimes {
    /// The root server span's duration (the call as its first server saw it).
    root_nanos: Option<u64>,
    /// Database query spans, summed over every service the call went through.
    db_nanos: u64,
    db_queries: u64,
}

#[derive(Debug, Default)]
struct Received {
    spans: u64,
    traces: HashMap<Vec<u8>, TraceTimes>,
}

/// Where database time went, over the traces received.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DbShare {
    /// Traces with a root server span.
    pub traces: u64,
    /// Mean duration of the root server span.
    pub server_mean_us: f64,
    /// Mean time in database queries per call (all services of the call).
    pub db_mean_us: f64,
    /// Mean number of queries per call.
    pub queries_per_call: f64,
    /// `db_mean_us / server_mean_us`.
    pub share: f64,
}

impl Received {
    fn add(&mut self, request: ExportTraceServiceRequest) {
        for span in request
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans)
        {
            self.add_span(&span);
        }
    }

    fn add_span(&mut self, span: &Span) {
        self.spans += 1;
        let nanos = span
            .end_time_unix_nano
            .saturating_sub(span.start_time_unix_nano);
        let times = self.traces.entry(span.trace_id.clone()).or_default();
        if span.parent_span_id.is_empty() && span.kind() == SpanKind::Server {
            times.root_nanos = Some(nanos);
        }
        if span
            .attributes
            .iter()
            .any(|attribute| attribute.key == "db.system.name")
        {
            times.db_nanos += nanos;
            times.db_queries += 1;
        }
    }

    fn db_share(&self) -> Option<DbShare> {
        let rooted: Vec<&TraceTimes> = self
            .traces
            .values()
            .filter(|times| times.root_nanos.is_some())
            .collect();
        let traces = rooted.len() as u64;
        if traces == 0 {
            return None;
        }
        let mean = |f: &dyn Fn(&TraceTimes) -> u64| {
            rooted.iter().map(|times| f(times) as f64).sum::<f64>() / traces as f64
        };
        let server = mean(&|times| times.root_nanos.unwrap_or(0)) / 1_000.0;
        let db = mean(&|times| times.db_nanos) / 1_000.0;
        Some(DbShare {
            traces,
            server_mean_us: server,
            db_mean_us: db,
            queries_per_call: mean(&|times| times.db_queries),
            share: if server > 0.0 { db / server } else { 0.0 },
        })
    }
}

#[derive(Clone, Default)]
struct Sink {
    received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.received
            .lock()
            .map_err(|_| Status::internal("the span store's lock is poisoned"))?
            .add(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running sink; it stops with the process.
pub struct Collector {
    addr: SocketAddr,
    sink: Sink,
}

impl Collector {
    /// Starts listening on an ephemeral port of 127.0.0.1, on a thread of its own.
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding the sink")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let sink = Sink::default();
        let service = TraceServiceServer::new(sink.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the sink's runtime")?;
        std::thread::Builder::new()
            .name("otlp-sink".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let served = async {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        tonic::transport::Server::builder()
                            .add_service(service)
                            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                                listener,
                            ))
                            .await?;
                        anyhow::Ok(())
                    };
                    if let Err(error) = served.await {
                        eprintln!("the trace sink stopped: {error:#}");
                    }
                });
            })
            .context("starting the sink's thread")?;
        Ok(Self { addr, sink })
    }

    /// The OTLP endpoint to give the services (`http://127.0.0.1:port`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.sink
            .received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets everything received so far.
    pub fn reset(&self) {
        *self.received() = Received::default();
    }

    /// Spans received since the last reset.
    pub fn spans(&self) -> u64 {
        self.received().spans
    }

    /// Database time over the traces received since the last reset.
    pub fn db_share(&self) -> Option<DbShare> {
        self.received().db_share()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

    use super::*;

    fn span(trace: u8, id: u8, parent: Option<u8>, nanos: u64, db: bool) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            kind: if parent.is_none() {
                SpanKind::Server as i32
            } else {
                SpanKind::Client as i32
            },
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 1_000 + nanos,
            attributes: db
                .then(|| KeyValue {
                    key: "db.system.name".to_owned(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("sqlite".to_owned())),
                    }),
                    ..KeyValue::default()
                })
                .into_iter()
                .collect(),
            ..Span::default()
        }
    }

    #[test]
    fn database_time_is_summed_per_trace_against_its_root() {
        let mut received = Received::default();
        // Trace 1: a 1 ms call with two 200 us queries; trace 2: a 3 ms call with one 1 ms query.
        for s in [
            span(1, 1, None, 1_000_000, false),
            span(1, 2, Some(1), 200_000, true),
            span(1, 3, Some(1), 200_000, true),
            span(2, 1, None, 3_000_000, false),
            span(2, 2, Some(1), 1_000_000, true),
            // A trace whose root was not received counts for spans, not for the share.
            span(3, 2, Some(1), 5_000_000, true),
        ] {
            received.add_span(&s);
        }
        assert_eq!(received.spans, 6);
        let share = received.db_share().expect("two rooted traces");
        assert_eq!(share.traces, 2);
        assert!((share.server_mean_us - 2_000.0).abs() < 1e-6);
        assert!((share.db_mean_us - 700.0).abs() < 1e-6);
        assert!((share.queries_per_call - 1.5).abs() < 1e-6);
        assert!((share.share - 0.35).abs() < 1e-9);
    }
}
