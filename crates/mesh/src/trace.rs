//! Distributed tracing of every RPC: a client span and a server span per call, following the
//! OpenTelemetry RPC conventions, joined across processes by W3C trace context in the gRPC
//! metadata. Handlers never touch any of it.
//!
//! - [`ClientTraceLayer`] (outermost on the client stack) opens a `client` span
//!   (`rpc.system=grpc`, `rpc.service`, `rpc.method`, `server.address`) as a child of the current
//!   span, and injects `traceparent` / `tracestate` from it with the global propagator.
//! - [`ServerTraceLayer`] (outermost on the server, right after TLS) extracts the caller's
//!   context from the headers and opens the `server` span as its child (with the caller's
//!   `client.address` / `client.port`); the handler runs inside it, so its logs carry the trace
//!   id and the calls it makes continue the trace.
//! - Both record `rpc.grpc.status_code` from a trailers-only response or from the trailers, and
//!   end the span when the response body ends, so a stream's span lasts as long as the stream.
//!   A client span is an error for any code but OK; a server span only for the codes that mean
//!   the server failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
//!   DATA_LOSS), as the conventions say.
//! - [`db_span`]: the span of one database query (`db.system.name`, `db.operation.name`,
//!   `db.collection.name`).
//!
//! Health checks and reflection are not traced: probes would bury the traces that matter.
//! Without an OpenTelemetry layer in the subscriber (no collector configured) the spans are
//! plain tracing spans and no context travels.
//!
//! ```text
//! let channel = ServiceBuilder::new().layer(ClientTraceLayer::new("users")).service(channel);
//! Server::builder().layer(ServerTraceLayer::new()).add_routes(routes)
//! ```

use std::{
    any::Any,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector};
use pin_project_lite::pin_project;
use tonic::{Code, body::Body, server::NamedService};
use tower::{BoxError, Layer, Service};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::identity::PeerInfo;

/// The `tracing` target of every span made here (calls and queries): what the log layer leaves
/// out ([`crate::telemetry`]).
pub const SPAN_TARGET: &str = module_path!();

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Services whose calls are not traced (probes and tooling).
const UNTRACED: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Which end of a call a span stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    /// Whether `code` makes the span an error, per the OpenTelemetry gRPC conventions.
    fn is_error(self, code: Code) -> bool {
        match self {
            Side::Client => code != Code::Ok,
            Side::Server => matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ),
        }
    }
}

/// `/package.Service/Method` as (`package.Service/Method`, `package.Service`, `Method`), borrowed
/// from the path.
pub(crate) fn rpc_names(path: &str) -> (&str, &str, &str) {
    let name = path.strip_prefix('/').unwrap_or(path);
    let (service, method) = name.rsplit_once('/').unwrap_or((name, ""));
    (name, service, method)
}

fn is_traced(path: &str) -> bool {
    !UNTRACED.iter().any(|prefix| path.starts_with(prefix))
}

/// Adds a client span and trace context to every call: see the module documentation.
#[derive(Debug, Clone)]
pub struct ClientTraceLayer {
    peer: Arc<str>,
}

impl ClientTraceLayer {
    /// For calls to `peer`, the downstream's name in the mesh (`users`, `billing`...), recorded
    /// as `server.address`: the balancer below picks the endpoint.
    pub fn new(peer: &str) -> Self {
        Self { peer: peer.into() }
    }
}

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace {
            inner,
            peer: self.peer.clone(),
        }
    }
}

/// See [`ClientTraceLayer`].
#[derive(Debug, Clone)]
pub struct ClientTrace<S> {
    inner: S,
    peer: Arc<str>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: fmt::Display + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let span = if is_traced(path) {
            let (name, service, method) = rpc_names(path);
            tracing::info_span!(
                "grpc.client",
                otel.name = name,
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                server.address = &*self.peer,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
            )
        } else {
            Span::none()
        };
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut HeaderInjector(request.headers_mut()));
        });
        let inner = span.in_scope(|| self.inner.call(request));
        ResponseFuture {
            inner,
            span,
            side: Side::Client,
        }
    }
}

/// Opens a server span per call, continuing the caller's trace: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl ServerTraceLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// See [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

/// A single generated service wrapped on its own (`Routes::new(ServerTraceLayer::new().layer(svc))`)
/// keeps its name.
impl<S: NamedService> NamedService for ServerTrace<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ServerTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: fmt::Display + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::error::Error + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let span = if is_traced(path) {
            let (name, service, method) = rpc_names(path);
            // No tracing parent: the parent is the caller's span, from the headers.
            let span = tracing::info_span!(
                parent: None,
                "grpc.server",
                otel.name = name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                client.address = Empty,
                client.port = Empty,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
            );
            let remote = request
                .extensions()
                .get::<PeerInfo>()
                .and_then(|peer| peer.remote_addr)
                .or_else(|| {
                    request
                        .extensions()
                        .get::<tonic::transport::server::TcpConnectInfo>()
                        .and_then(|info| info.remote_addr())
                });
            if let Some(remote) = remote {
                span.record("client.address", tracing::field::display(remote.ip()));
                span.record("client.port", remote.port());
            }
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract_with_context(
                    &opentelemetry::Context::new(),
                    &HeaderExtractor(request.headers()),
                )
            });
            // Fails only when no OpenTelemetry layer is installed: then there is no trace.
            let _ = span.set_parent(parent);
            span
        } else {
            Span::none()
        };
        let inner = span.in_scope(|| self.inner.call(request));
        ResponseFuture {
            inner,
            span,
            side: Side::Server,
        }
    }
}

pin_project! {
    /// The response future of [`ClientTrace`] and [`ServerTrace`]: runs the call inside its
    /// span and hands the span on to the response body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        side: Side,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: fmt::Display + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: std::error::Error + Send + Sync + 'static,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            ready!(this.inner.poll(cx))
        };
        let side = *this.side;
        let span = std::mem::replace(this.span, Span::none());
        match result {
            Ok(response) => {
                let settled = record_head(&span, side, response.status(), response.headers());
                Poll::Ready(Ok(response.map(|inner| {
                    Body::new(TracedBody {
                        inner,
                        // A trailers-only response is over: its span ends here.
                        span: if settled { Span::none() } else { span },
                        side,
                    })
                })))
            }
            Err(error) => {
                record(&span, side, code_of_error(&error), Some(&error.to_string()));
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project! {
    /// A response body that records the call's status from its trailers and ends the call's
    /// span with the body.
    struct TracedBody<B> {
        #[pin]
        inner: B,
        span: Span,
        side: Side,
    }
}

impl<B> http_body::Body for TracedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = {
            let _entered = this.span.enter();
            ready!(this.inner.poll_frame(cx))
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get(GRPC_STATUS)
                        .map_or(Code::Unknown, |v| Code::from_bytes(v.as_bytes()));
                    record_code(this.span, *this.side, code, trailers);
                    *this.span = Span::none();
                }
            }
            Some(Err(error)) => {
                let code = (error as &(dyn std::error::Error + 'static))
                    .downcast_ref::<tonic::Status>()
                    .map_or(Code::Unknown, tonic::Status::code);
                record(this.span, *this.side, code, Some(&error.to_string()));
                *this.span = Span::none();
            }
            None => *this.span = Span::none(),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records the status a response's head already tells (trailers-only, or not gRPC at all);
/// whether it did.
fn record_head(span: &Span, side: Side, status: StatusCode, headers: &HeaderMap) -> bool {
    if let Some(value) = headers.get(GRPC_STATUS) {
        record_code(span, side, Code::from_bytes(value.as_bytes()), headers);
        true
    } else if status != StatusCode::OK {
        record(span, side, code_of_http_status(status), None);
        true
    } else {
        false
    }
}

/// Records `code`, with the `grpc-message` of `headers` when it is an error.
fn record_code(span: &Span, side: Side, code: Code, headers: &HeaderMap) {
    if side.is_error(code) {
        let status = tonic::Status::from_header_map(headers);
        record(
            span,
            side,
            code,
            status.as_ref().map(tonic::Status::message),
        );
    } else {
        record(span, side, code, None);
    }
}

fn record(span: &Span, side: Side, code: Code, message: Option<&str>) {
    span.record("rpc.grpc.status_code", i64::from(i32::from(code)));
    if side.is_error(code) {
        span.record("otel.status_code", "ERROR");
        match message.filter(|m| !m.is_empty()) {
            Some(message) => span.record("otel.status_description", message),
            None => span.record("otel.status_description", code.description()),
        };
    }
}

/// The code a failed call ends with: a status's own (the deadline layer's DEADLINE_EXCEEDED...),
/// otherwise UNAVAILABLE, as for a downstream that could not be reached.
pub(crate) fn code_of_error<E: 'static>(error: &E) -> Code {
    let error: &dyn Any = error;
    let status = error.downcast_ref::<tonic::Status>().or_else(|| {
        error
            .downcast_ref::<BoxError>()
            .and_then(|boxed| boxed.downcast_ref::<tonic::Status>())
    });
    status.map_or(Code::Unavailable, tonic::Status::code)
}

/// The gRPC code of a response that is not gRPC, as the gRPC HTTP/2 mapping gives it.
pub(crate) fn code_of_http_status(status: StatusCode) -> Code {
    match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Writes trace context into request headers. Only the W3C keys are known statically; any
/// other a propagator sets is skipped rather than allocated per call.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            _ => return,
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

/// Reads trace context from request headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The database system of a query, as OpenTelemetry names it (`db.system.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbSystem {
    Sqlite,
    Postgresql,
    Other,
}

impl DbSystem {
    /// The system `pool` talks to, from its URL's scheme.
    pub fn of(pool: &sqlx::AnyPool) -> Self {
        match pool.connect_options().database_url.scheme() {
            "sqlite" => Self::Sqlite,
            "postgres" | "postgresql" => Self::Postgresql,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgresql => "postgresql",
            Self::Other => "other_sql",
        }
    }
}

/// The span of one query, named `{operation} {collection}` (`SELECT orders`): instrument the
/// query's future with it. A query made outside any span (a background poll) is not traced:
/// every tick of a poll would otherwise be a trace of its own and bury the requests' traces.
///
/// ```text
/// sqlx::query(SQL).fetch_one(&pool).instrument(db_span(system, "SELECT", "orders")).await
/// ```
pub fn db_span(system: DbSystem, operation: &'static str, collection: &'static str) -> Span {
    if Span::current().is_none() {
        return Span::none();
    }
    tracing::info_span!(
        "db.query",
        otel.name = %format_args!("{operation} {collection}"),
        otel.kind = "client",
        db.system.name = system.as_str(),
        db.operation.name = operation,
        db.collection.name = collection,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_are_read_from_the_path() {
        assert_eq!(
            rpc_names("/meshwork.users.v1.UserService/GetUser"),
            (
                "meshwork.users.v1.UserService/GetUser",
                "meshwork.users.v1.UserService",
                "GetUser"
            )
        );
        assert_eq!(rpc_names("/odd"), ("odd", "odd", ""));
    }

    #[test]
    fn probes_and_reflection_are_not_traced() {
        assert!(!is_traced("/grpc.health.v1.Health/Check"));
        assert!(!is_traced(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(is_traced("/meshwork.orders.v1.OrderService/CreateOrder"));
    }

    #[test]
    fn a_client_fails_on_any_code_a_server_only_on_its_own_faults() {
        assert!(Side::Client.is_error(Code::FailedPrecondition));
        assert!(!Side::Server.is_error(Code::FailedPrecondition));
        assert!(!Side::Server.is_error(Code::NotFound));
        assert!(Side::Server.is_error(Code::Internal));
        assert!(!Side::Client.is_error(Code::Ok));
    }

    #[test]
    fn a_query_is_traced_only_inside_a_span() {
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            assert!(db_span(DbSystem::Sqlite, "SELECT", "orders").is_none());
            let request = tracing::info_span!("request");
            let query = request.in_scope(|| db_span(DbSystem::Sqlite, "SELECT", "orders"));
            assert!(!query.is_none());
        });
    }

    #[test]
    fn only_trace_context_headers_are_injected() {
        let mut headers = HeaderMap::new();
        let mut injector = HeaderInjector(&mut headers);
        injector.set("traceparent", "00-abc-def-01".to_owned());
        injector.set("baggage", "k=v".to_owned());
        assert_eq!(headers.len(), 1);
        assert_eq!(
            HeaderExtractor(&headers).get("traceparent"),
            Some("00-abc-def-01")
        );
    }
}
