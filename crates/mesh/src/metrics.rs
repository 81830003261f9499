//! Metrics: what the mesh counts on both sides of every call, and the Prometheus text that the
//! admin port serves at `GET /metrics` (see [`crate::server`]).
//!
//! Everything is registered in one [`Metrics`] per process, [`global`], with the
//! `prometheus-client` crate. Why one per process rather than one per server: a service's server
//! and its clients to other services are built apart (`client::connect` knows nothing of the
//! server), yet a process has one `/metrics`, and a scrape must see both sides. Several servers in
//! one process (tests, `meshctl up`) share the registry: each reads its own series by their
//! labels (`service`, `target`, `method`). The layers take their handles from a [`Metrics`] value,
//! so a unit test can give them a private `Metrics::new()`.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `meshwork_server_requests_total` | counter | `service`, `method`, `code` |
//! | `meshwork_server_request_duration_seconds` | histogram | `service`, `method` |
//! | `meshwork_server_in_flight` | gauge | `service` |
//! | `meshwork_server_shed_total` | counter | `reason` (`overloaded`, `draining`) |
//! | `meshwork_client_requests_total` | counter | `target`, `service`, `method`, `code` |
//! | `meshwork_client_request_duration_seconds` | histogram | `target`, `service`, `method` |
//! | `meshwork_client_retries_total` | counter | `target` |
//! | `meshwork_client_retry_budget_exhausted_total` | counter | `target` |
//! | `meshwork_client_endpoints` | gauge | `target` |
//! | `meshwork_client_ejections_total` | counter | `target` |
//! | `meshwork_client_ejected_endpoints` | gauge | `target` |
//! | `meshwork_db_pool_connections` | gauge | `state` (`idle`, `in_use`) |
//! | `meshwork_db_pool_max_connections` | gauge | |
//!
//! - `service` and `method` come from the request path (`/meshwork.users.v1.UserService/GetUser`
//!   is `service="meshwork.users.v1.UserService", method="GetUser"`); `target` is the
//!   downstream's name in the mesh (`users`); `code` is the gRPC status name (`OK`, `NOT_FOUND`).
//! - A call is counted, and its duration observed, when it ends: at a trailers-only answer, at the
//!   trailers, or at a transport error; a call dropped before it ends (the caller went away, or
//!   gave up) counts as `CANCELLED`. A stream lasts until its last message. On the client, the
//!   duration is the call as the caller sees it, retries and backoff included.
//! - The hot path allocates nothing: a call's handles (its series for each code, its histogram,
//!   its in-flight gauge) are resolved once per method, into a copy-on-write map keyed by path,
//!   and a call only clones an `Arc` out of it. At most [`MAX_METHODS`] methods get series of
//!   their own per side (per target, on the client); calls to any further path are counted as
//!   `service="other", method="other"`, so a peer sending junk paths cannot grow the registry.
//! - `meshwork_client_endpoints` is how many endpoints the balancers of the process's channels to
//!   a target hold (endpoints join and leave with discovery), `meshwork_client_ejected_endpoints`
//!   how many of them outlier ejection holds out ([`crate::eject`]).
//! - The pool gauges are read from the pools at scrape time, summed over the pools whose servers
//!   are serving ([`Metrics::watch_pool`], done by [`crate::server::database_ready`]); with no
//!   pool they are absent.
//!
//! ```text
//! let metrics = mesh::metrics::global();
//! Server::builder().layer(ServerTraceLayer::new()).layer(metrics.server_layer());
//! let users = metrics.target("users"); // users.layer(), users.retry(), users.ejection()
//! let text = metrics.render(Format::from_accept(accept_header));
//! ```
//!
//! Not here: tracing ([`crate::trace`]); the HTTP side of the admin port ([`crate::server`]).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};

use crate::trace::{code_of_error, code_of_http_status, rpc_names};

/// Upper bounds of the latency buckets, in seconds: from half a millisecond (a cached read on
/// the same node) to ten seconds (beyond which a call is failing, whatever it returns).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Methods with series of their own, per side (per target on the client): far more than the
/// mesh's services have, few enough that junk paths cannot exhaust memory.
pub const MAX_METHODS: usize = 256;
/// What calls past [`MAX_METHODS`] are counted as.
const OTHER: &str = "other";
/// The gRPC status codes by number, as they are named in the `code` label.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The content type of the OpenMetrics text format, which `prometheus-client` writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set: names are fixed, values are shared between the series of one method.
type Labels = Vec<(&'static str, Arc<str>)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The process's metrics, registered once; clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    /// Every server of the process shares one cache: `service` tells their calls apart.
    server: Arc<MethodCache>,
    server_shed: Family<Labels, Counter>,
    client_requests: Family<Labels, Counter>,
    client_duration: HistogramFamily,
    retries: Family<Labels, Counter>,
    budget_exhausted: Family<Labels, Counter>,
    endpoints: Family<Labels, Gauge>,
    ejections: Family<Labels, Counter>,
    ejected: Family<Labels, Gauge>,
    pools: Arc<Pools>,
}

/// The metrics of this process, which every mesh server exposes on its admin port.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry of its own, with every metric of the module documentation; the process's is
    /// [`global`].
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // Registered without `_total` (the encoder adds it) and without the unit (a suffix from
        // `register_with_unit`).
        let server_requests = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_server_requests",
            "Calls served, by gRPC service, method and status code",
            server_requests.clone(),
        );
        let server_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "meshwork_server_request_duration",
            "How long calls took to serve, until their last message",
            Unit::Seconds,
            server_duration.clone(),
        );
        let server_in_flight = Family::<Labels, Gauge>::default();
        registry.register(
            "meshwork_server_in_flight",
            "Calls being served",
            server_in_flight.clone(),
        );
        let server_shed = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_server_shed",
            "Calls refused before any handler ran: overloaded (the concurrency limit) or draining",
            server_shed.clone(),
        );
        let client_requests = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_client_requests",
            "Calls made to a target service, by gRPC service, method and status code",
            client_requests.clone(),
        );
        let client_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "meshwork_client_request_duration",
            "How long calls to a target took, retries included",
            Unit::Seconds,
            client_duration.clone(),
        );
        let retries = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_client_retries",
            "Attempts sent again to a target",
            retries.clone(),
        );
        let budget_exhausted = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_client_retry_budget_exhausted",
            "Retries not made because the target's retry budget was spent",
            budget_exhausted.clone(),
        );
        let endpoints = Family::<Labels, Gauge>::default();
        registry.register(
            "meshwork_client_endpoints",
            "Endpoints of a target in the balancers",
            endpoints.clone(),
        );
        let ejections = Family::<Labels, Counter>::default();
        registry.register(
            "meshwork_client_ejections",
            "Endpoints of a target ejected for failing",
            ejections.clone(),
        );
        let ejected = Family::<Labels, Gauge>::default();
        registry.register(
            "meshwork_client_ejected_endpoints",
            "Endpoints of a target held out of the balancers by ejection",
            ejected.clone(),
        );
        let pools = Arc::new(Pools::default());
        registry.register_collector(Box::new(Arc::clone(&pools)));
        let server = Arc::new(MethodCache::new(
            Vec::new(),
            server_requests,
            server_duration,
            Some(server_in_flight),
        ));
        Self {
            inner: Arc::new(Inner {
                registry,
                server,
                server_shed,
                client_requests,
                client_duration,
                retries,
                budget_exhausted,
                endpoints,
                ejections,
                ejected,
                pools,
            }),
        }
    }

    /// The layer that counts the calls a server serves: outermost but for tracing.
    pub fn server_layer(&self) -> MetricsLayer {
        MetricsLayer {
            cache: Arc::clone(&self.inner.server),
        }
    }

    /// The shedding counters of a server.
    pub fn shed(&self) -> ShedMetrics {
        let reason = |reason: &str| vec![("reason", Arc::from(reason))];
        ShedMetrics {
            overloaded: self
                .inner
                .server_shed
                .get_or_create_owned(&reason("overloaded")),
            draining: self
                .inner
                .server_shed
                .get_or_create_owned(&reason("draining")),
        }
    }

    /// The handles of one client's stack to `target` (the downstream's name in the mesh).
    pub fn target(&self, target: &str) -> TargetMetrics {
        let labels: Labels = vec![("target", Arc::from(target))];
        let inner = &self.inner;
        TargetMetrics {
            cache: Arc::new(MethodCache::new(
                labels.clone(),
                inner.client_requests.clone(),
                inner.client_duration.clone(),
                None,
            )),
            retry: RetryMetrics {
                retries: inner.retries.get_or_create_owned(&labels),
                budget_exhausted: inner.budget_exhausted.get_or_create_owned(&labels),
            },
            ejection: EjectionMetrics {
                endpoints: inner.endpoints.get_or_create_owned(&labels),
                ejections: inner.ejections.get_or_create_owned(&labels),
                ejected: inner.ejected.get_or_create_owned(&labels),
            },
        }
    }

    /// Exports `pool`'s connections until the returned guard is dropped.
    pub fn watch_pool(&self, pool: sqlx::AnyPool) -> PoolWatch {
        let pools = Arc::clone(&self.inner.pools);
        let id = pools.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&pools.watched).push((id, pool));
        PoolWatch { pools, id }
    }

    /// Every metric, as text in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut text = String::new();
        let encoded = match format {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(
                &mut text,
                &self.inner.registry,
            ),
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            }
        };
        // Writing into a String cannot fail: an error is a metric that cannot encode itself.
        if let Err(error) = encoded {
            tracing::error!(%error, "metrics could not be encoded");
        }
        text
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: what any scraper reads.
    Prometheus,
    /// OpenMetrics 1.0 text, which Prometheus asks for first.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics when it names it.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// The handles of one client stack to one target.
#[derive(Clone)]
pub struct TargetMetrics {
    cache: Arc<MethodCache>,
    retry: RetryMetrics,
    ejection: EjectionMetrics,
}

impl std::fmt::Debug for TargetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMetrics").finish_non_exhaustive()
    }
}

impl TargetMetrics {
    /// The layer that counts the calls made: right under the client's trace layer.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer {
            cache: Arc::clone(&self.cache),
        }
    }

    pub fn retry(&self) -> RetryMetrics {
        self.retry.clone()
    }

    pub fn ejection(&self) -> EjectionMetrics {
        self.ejection.clone()
    }
}

/// What the retry layer counts ([`crate::retry`]). The default counts into no registry.
#[derive(Debug, Clone, Default)]
pub struct RetryMetrics {
    pub(crate) retries: Counter,
    pub(crate) budget_exhausted: Counter,
}

/// What outlier ejection counts ([`crate::eject`]). The default counts into no registry.
#[derive(Debug, Clone, Default)]
pub struct EjectionMetrics {
    pub(crate) endpoints: Gauge,
    pub(crate) ejections: Counter,
    pub(crate) ejected: Gauge,
}

/// What the load shedder counts ([`crate::shed`]). The default counts into no registry.
#[derive(Debug, Clone, Default)]
pub struct ShedMetrics {
    pub(crate) overloaded: Counter,
    pub(crate) draining: Counter,
}

/// The handles of one method (on one side, for one target), resolved on its first call.
struct CallMetrics {
    /// `service` and `method` (after `target` on the client), for the per-code series.
    labels: Labels,
    requests: Family<Labels, Counter>,
    /// The series of each code, by its number, made on the first call that ends with it.
    by_code: [OnceLock<Counter>; CODE_NAMES.len()],
    duration: Histogram,
    in_flight: Option<Gauge>,
}

impl CallMetrics {
    fn requests(&self, code: Code) -> &Counter {
        let index = usize::try_from(i32::from(code))
            .ok()
            .filter(|index| *index < CODE_NAMES.len())
            .unwrap_or(Code::Unknown as usize);
        self.by_code[index].get_or_init(|| {
            let mut labels = self.labels.clone();
            labels.push(("code", Arc::from(CODE_NAMES[index])));
            self.requests.get_or_create_owned(&labels)
        })
    }
}

/// The handles of every method one side has seen, keyed by request path.
struct MethodCache {
    /// Labels before `service` and `method`: none on the server, `target` on a client.
    base: Labels,
    requests: Family<Labels, Counter>,
    duration: HistogramFamily,
    in_flight: Option<Family<Labels, Gauge>>,
    /// Read on every call without a lock; replaced whole on a method's first call.
    methods: ArcSwap<HashMap<Box<str>, Arc<CallMetrics>>>,
    other: OnceLock<Arc<CallMetrics>>,
}

impl MethodCache {
    fn new(
        base: Labels,
        requests: Family<Labels, Counter>,
        duration: HistogramFamily,
        in_flight: Option<Family<Labels, Gauge>>,
    ) -> Self {
        Self {
            base,
            requests,
            duration,
            in_flight,
            methods: ArcSwap::default(),
            other: OnceLock::new(),
        }
    }

    fn get(&self, path: &str) -> Arc<CallMetrics> {
        match self.methods.load().get(path) {
            Some(call) => Arc::clone(call),
            None => self.insert(path),
        }
    }

    #[cold]
    fn insert(&self, path: &str) -> Arc<CallMetrics> {
        if self.methods.load().len() >= MAX_METHODS {
            return Arc::clone(self.other.get_or_init(|| self.resolve(OTHER, OTHER)));
        }
        let (_, service, method) = rpc_names(path);
        let resolved = self.resolve(service, method);
        // Two first calls may race: the one stored first wins, and both count into the same
        // series anyway (the families hand out one metric per label set).
        self.methods.rcu(|methods| {
            let mut methods = HashMap::clone(methods);
            methods
                .entry(Box::from(path))
                .or_insert_with(|| Arc::clone(&resolved));
            methods
        });
        self.methods.load().get(path).map_or(resolved, Arc::clone)
    }

    fn resolve(&self, service: &str, method: &str) -> Arc<CallMetrics> {
        let service: Arc<str> = Arc::from(service);
        let mut labels = self.base.clone();
        labels.push(("service", Arc::clone(&service)));
        labels.push(("method", Arc::from(method)));
        let in_flight = self.in_flight.as_ref().map(|family| {
            let mut labels = self.base.clone();
            labels.push(("service", service));
            family.get_or_create_owned(&labels)
        });
        Arc::new(CallMetrics {
            duration: self.duration.get_or_create_owned(&labels),
            labels,
            requests: self.requests.clone(),
            by_code: Default::default(),
            in_flight,
        })
    }
}

/// Counts calls, their codes and durations, and (on a server) the calls in flight: see the
/// module documentation. Made by [`Metrics::server_layer`] and [`TargetMetrics::layer`].
#[derive(Clone)]
pub struct MetricsLayer {
    cache: Arc<MethodCache>,
}

impl std::fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            cache: Arc::clone(&self.cache),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    cache: Arc<MethodCache>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Metered<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metered<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let settle = Settle::start(self.cache.get(request.uri().path()));
        ResponseFuture {
            inner: self.inner.call(request),
            settle: Some(settle),
        }
    }
}

/// One call being measured: counted once, with the code it ends with, when it ends (or as
/// CANCELLED when dropped before).
struct Settle {
    call: Arc<CallMetrics>,
    started: Instant,
    settled: bool,
}

impl Settle {
    fn start(call: Arc<CallMetrics>) -> Self {
        if let Some(in_flight) = &call.in_flight {
            in_flight.inc();
        }
        Self {
            call,
            started: Instant::now(),
            settled: false,
        }
    }

    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.call.requests(code).inc();
        self.call
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(in_flight) = &self.call.in_flight {
            in_flight.dec();
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

pin_project! {
    /// The response future of [`Metered`]: settles a call that ends at its head, and hands the
    /// others on to the body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        settle: Option<Settle>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: 'static,
{
    type Output = Result<Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let settle = this.settle.take();
        Poll::Ready(match result {
            Ok(response) => {
                let settle = match (settle, code_of_head(response.status(), response.headers())) {
                    (Some(settle), Some(code)) => {
                        settle.finish(code);
                        None
                    }
                    (settle, _) => settle,
                };
                Ok(response.map(|inner| MeteredBody { inner, settle }))
            }
            Err(error) => {
                if let Some(settle) = settle {
                    settle.finish(code_of_error(&error));
                }
                Err(error)
            }
        })
    }
}

/// The code a response's head already tells: a trailers-only answer's, or a response that is
/// not gRPC at all.
fn code_of_head(status: StatusCode, headers: &HeaderMap) -> Option<Code> {
    if let Some(code) = headers.get(GRPC_STATUS) {
        Some(Code::from_bytes(code.as_bytes()))
    } else if status != StatusCode::OK {
        Some(code_of_http_status(status))
    } else {
        None
    }
}

pin_project! {
    /// A response body that settles its call at the trailers (or the end, or an error).
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        settle: Option<Settle>,
    }
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body,
    B::Error: std::error::Error + 'static,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        let code = match &polled {
            Some(Ok(frame)) => frame.trailers_ref().map(|trailers| {
                trailers
                    .get(GRPC_STATUS)
                    .map_or(Code::Unknown, |code| Code::from_bytes(code.as_bytes()))
            }),
            Some(Err(error)) => Some(
                (error as &(dyn std::error::Error + 'static))
                    .downcast_ref::<tonic::Status>()
                    .map_or(Code::Unknown, tonic::Status::code),
            ),
            // A gRPC response always ends with its status: one that does not has failed.
            None => Some(Code::Unknown),
        };
        if let Some(code) = code
            && let Some(settle) = this.settle.take()
        {
            settle.finish(code);
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

/// The database pools whose use is exported, read at each scrape.
#[derive(Debug, Default)]
struct Pools {
    watched: Mutex<Vec<(u64, sqlx::AnyPool)>>,
    next_id: AtomicU64,
}

impl Collector for Pools {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (idle, in_use, max) = {
            let watched = lock(&self.watched);
            if watched.is_empty() {
                return Ok(());
            }
            watched
                .iter()
                .fold((0u64, 0u64, 0u64), |(idle, in_use, max), (_, pool)| {
                    let size = u64::from(pool.size());
                    let pool_idle = u64::try_from(pool.num_idle()).unwrap_or(u64::MAX);
                    (
                        idle.saturating_add(pool_idle),
                        in_use.saturating_add(size.saturating_sub(pool_idle)),
                        max.saturating_add(u64::from(pool.options().get_max_connections())),
                    )
                })
        };
        {
            let mut connections = encoder.encode_descriptor(
                "meshwork_db_pool_connections",
                "Database connections open, idle or in use",
                None,
                MetricType::Gauge,
            )?;
            for (state, value) in [("idle", idle), ("in_use", in_use)] {
                let labels = [("state", state)];
                ConstGauge::new(value).encode(connections.encode_family(&labels)?)?;
            }
        }
        let largest = ConstGauge::new(max);
        largest.encode(encoder.encode_descriptor(
            "meshwork_db_pool_max_connections",
            "Database connections the pools may open",
            None,
            largest.metric_type(),
        )?)
    }
}

/// Keeps a pool exported (see [`Metrics::watch_pool`]) until dropped.
#[derive(Debug)]
pub struct PoolWatch {
    pools: Arc<Pools>,
    id: u64,
}

impl Drop for PoolWatch {
    fn drop(&mut self) {
        lock(&self.pools.watched).retain(|(id, _)| *id != self.id);
    }
}

/// A list of handles stays usable whatever a panicking holder left.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use tonic::Status;
    use tower::ServiceExt;

    use super::*;

    const GET_USER: &str = "/meshwork.users.v1.UserService/GetUser";

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap_or_default()
    }

    /// The value of the sample `name{labels}` in `text`, if there is one.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{labels}}} ")
        };
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
    }

    /// A handler that answers with the status `code` in a trailers-only response.
    fn answers(
        code: Code,
    ) -> impl Service<
        Request<()>,
        Response = Response<Empty<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Empty<Bytes>>, Infallible>>,
    > + Clone {
        tower::service_fn(move |_: Request<()>| async move {
            Ok::<_, Infallible>(Status::new(code, "").into_http::<Empty<Bytes>>())
        })
    }

    #[tokio::test]
    async fn a_trailers_only_answer_is_counted_with_its_code_and_duration() {
        let metrics = Metrics::new();
        let service = metrics.server_layer().layer(answers(Code::NotFound));
        for _ in 0..3 {
            let _ = service.clone().oneshot(request(GET_USER)).await;
        }
        let text = metrics.render(Format::Prometheus);
        let labels = r#"service="meshwork.users.v1.UserService",method="GetUser""#;
        assert_eq!(
            sample(
                &text,
                "meshwork_server_requests_total",
                &format!(r#"{labels},code="NOT_FOUND""#)
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "meshwork_server_request_duration_seconds_count",
                labels
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "meshwork_server_in_flight",
                r#"service="meshwork.users.v1.UserService""#
            ),
            Some(0.0),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_answer_is_counted_at_its_trailers_and_in_flight_until_then() {
        let metrics = Metrics::new();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut body = Some(body);
        let service = metrics
            .server_layer()
            .layer(tower::service_fn(move |_: Request<()>| {
                std::future::ready(body.take().map(Response::new).ok_or("called twice"))
            }));
        let response = service.oneshot(request(GET_USER)).await;
        let response = response.unwrap_or_else(|error| panic!("{error}"));
        let in_flight = || {
            sample(
                &metrics.render(Format::Prometheus),
                "meshwork_server_in_flight",
                r#"service="meshwork.users.v1.UserService""#,
            )
        };
        assert_eq!(in_flight(), Some(1.0));

        let reading = tokio::spawn(response.into_body().collect());
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, http::HeaderValue::from_static("0"));
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
        drop(tx);
        assert!(matches!(reading.await, Ok(Ok(_))));

        let text = metrics.render(Format::Prometheus);
        assert_eq!(in_flight(), Some(0.0));
        let labels = r#"service="meshwork.users.v1.UserService",method="GetUser""#;
        assert_eq!(
            sample(
                &text,
                "meshwork_server_requests_total",
                &format!(r#"{labels},code="OK""#)
            ),
            Some(1.0),
            "{text}"
        );
        // 30 ms falls in the 50 ms bucket and not in the 25 ms one.
        let bucket = |le: &str| {
            sample(
                &text,
                "meshwork_server_request_duration_seconds_bucket",
                &format!(r#"{labels},le="{le}""#),
            )
        };
        assert_eq!(bucket("0.025"), Some(0.0), "{text}");
        assert_eq!(bucket("0.05"), Some(1.0), "{text}");
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_ends_is_cancelled() {
        let metrics = Metrics::new();
        let service = metrics
            .target("users")
            .layer()
            .layer(tower::service_fn(|_: Request<()>| {
                std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
            }));
        let call = service.oneshot(request(GET_USER));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), call)
                .await
                .is_err()
        );
        let text = metrics.render(Format::Prometheus);
        assert_eq!(
            sample(
                &text,
                "meshwork_client_requests_total",
                r#"target="users",service="meshwork.users.v1.UserService",method="GetUser",code="CANCELLED""#
            ),
            Some(1.0),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_transport_error_counts_with_its_status_or_as_unavailable() {
        let metrics = Metrics::new();
        let failing = |error: fn() -> tower::BoxError| {
            metrics
                .target("billing")
                .layer()
                .layer(tower::service_fn(move |_: Request<()>| {
                    std::future::ready(Err::<Response<Empty<Bytes>>, _>(error()))
                }))
        };
        let refused = failing(|| "connection refused".into());
        let _ = refused.oneshot(request("/b.B/Charge")).await;
        let late = failing(|| Box::new(Status::deadline_exceeded("late")));
        let _ = late.oneshot(request("/b.B/Charge")).await;
        let text = metrics.render(Format::Prometheus);
        for code in ["UNAVAILABLE", "DEADLINE_EXCEEDED"] {
            assert_eq!(
                sample(
                    &text,
                    "meshwork_client_requests_total",
                    &format!(r#"target="billing",service="b.B",method="Charge",code="{code}""#)
                ),
                Some(1.0),
                "{code}: {text}"
            );
        }
    }

    #[test]
    fn a_method_is_resolved_once_and_junk_paths_share_one_series() {
        let metrics = Metrics::new();
        let cache = &metrics.inner.server;
        assert!(Arc::ptr_eq(&cache.get(GET_USER), &cache.get(GET_USER)));
        for n in 0..MAX_METHODS + 10 {
            let _ = cache.get(&format!("/junk.S/M{n}"));
        }
        assert!(cache.methods.load().len() <= MAX_METHODS);
        let late = cache.get("/junk.S/Late");
        assert_eq!(&*late.labels[1].1, OTHER);
    }

    #[tokio::test]
    async fn pools_are_read_at_scrape_time_while_watched() {
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(3)
            .connect("sqlite::memory:")
            .await;
        let Ok(pool) = pool else {
            panic!("in-memory SQLite: {pool:?}");
        };
        let metrics = Metrics::new();
        let watch = metrics.watch_pool(pool.clone());
        let connection = pool.acquire().await;
        assert!(connection.is_ok());
        let text = metrics.render(Format::Prometheus);
        assert_eq!(
            sample(&text, "meshwork_db_pool_connections", r#"state="in_use""#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "meshwork_db_pool_max_connections", ""),
            Some(3.0),
            "{text}"
        );
        drop(watch);
        let text = metrics.render(Format::Prometheus);
        assert!(!text.contains("meshwork_db_pool"), "{text}");
    }

    #[test]
    fn scrapers_asking_for_openmetrics_get_it() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        let metrics = Metrics::new();
        let _ = metrics.shed();
        assert!(metrics.render(Format::OpenMetrics).ends_with("# EOF\n"));
        assert!(
            metrics
                .render(Format::Prometheus)
                .contains("# TYPE meshwork_server_shed_total counter")
        );
    }
}
