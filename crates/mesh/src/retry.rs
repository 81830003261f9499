//! Retries, only where they are safe, and never so many that an outage multiplies load.
//!
//! [`RetryLayer`] sits in a client stack between the deadline and the balancer. A call is sent
//! again (to whichever endpoint the balancer picks next) only when:
//!
//! - the transport failed before the request left us: the connection could not be made
//!   ([`tonic::ConnectError`]), the server refused the stream (HTTP/2 `REFUSED_STREAM`, or a
//!   stream beyond the last one a `GOAWAY` accepted), or a layer below said so with [`NotSent`];
//! - the server answered UNAVAILABLE and marked the answer with [`NOT_PROCESSED_HEADER`]
//!   (its load shedder and its drain do: the handler never ran);
//! - or the method is listed in [`RetryConfig::idempotent_methods`], and the call failed in the
//!   transport or was answered UNAVAILABLE.
//!
//! Each call gets at most [`RetryConfig::max_attempts`] attempts, separated by exponential
//! backoff with full jitter, and only while its deadline leaves time for another attempt. All
//! calls of one client share one [`TpsBudget`]: every call deposits, every retry withdraws, so
//! retries stay within `budget_ratio` of the calls over `budget_ttl`, plus a floor of
//! `budget_min_per_sec` for clients that make few calls. A layer made with
//! [`RetryLayer::observed`] counts its retries and the retries its budget refused
//! (`meshwork_client_retries_total`, `meshwork_client_retry_budget_exhausted_total`).
//!
//! To be replayed, a request body must be held: a unary request's body (whatever the body has
//! ready at once, up to `max_buffered_bytes`) is kept as `Bytes`. A larger body, or one that
//! makes us wait (a client stream), is sent once, as it is, and never retried.
//!
//! ```text
//! let channel = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(config.default_deadline))
//!     .layer(RetryLayer::new(&config.retry)?)
//!     .service(balancer);
//! ```

use std::{
    collections::HashSet,
    error::Error as StdError,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderName, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyStream, Full, StreamBody};
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status, body::Body};
use tower::{
    BoxError, Layer, Service,
    retry::{
        Policy,
        budget::{Budget, TpsBudget},
    },
    util::rng::{HasherRng, Rng},
};

use crate::{
    config::ConfigError,
    deadline::{CallDeadline, GRPC_TIMEOUT, encode_timeout},
    metrics::RetryMetrics,
};

/// Marks an UNAVAILABLE answer as given before any handler ran, so that even a method that is
/// not idempotent may be sent again. Set by the server's load shedder and by a draining server;
/// build such an answer with [`not_processed`].
pub const NOT_PROCESSED_HEADER: HeaderName = HeaderName::from_static(NOT_PROCESSED_KEY);
/// The only value of [`NOT_PROCESSED_HEADER`] that counts.
pub const NOT_PROCESSED_VALUE: &str = "true";
/// [`NOT_PROCESSED_HEADER`] as a static string, which is what tonic's metadata keys are.
const NOT_PROCESSED_KEY: &str = "meshwork-not-processed";

/// An UNAVAILABLE status marked as not processed: what a server answers when it turns a call
/// away before its handler runs (`not_processed("overloaded").into_http()`).
pub fn not_processed(message: impl Into<String>) -> Status {
    let mut status = Status::unavailable(message);
    status.metadata_mut().insert(
        NOT_PROCESSED_KEY,
        tonic::metadata::MetadataValue::from_static(NOT_PROCESSED_VALUE),
    );
    status
}

/// An error from below this layer for a request that provably never left this process (e.g. no
/// endpoint could take it): it is retried whatever the method.
#[derive(Debug, thiserror::Error)]
#[error("request not sent: {0}")]
pub struct NotSent(#[source] pub BoxError);

/// How a client retries. Loaded as the `retry` table of a client's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per call, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// The first backoff's ceiling; each retry doubles it, up to `backoff_max`. The actual pause
    /// is drawn uniformly below the ceiling (full jitter), so that callers do not retry in step.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Retries allowed per call made, over `budget_ttl` (0.2: one retry per five calls).
    pub budget_ratio: f32,
    /// Retries always allowed per second, whatever the call rate (a quiet client's floor).
    pub budget_min_per_sec: u32,
    /// How long a call counts towards the budget (1 s to 60 s).
    #[serde(with = "humantime_serde")]
    pub budget_ttl: Duration,
    /// Largest request body held for replay; a larger one is sent once, never retried.
    pub max_buffered_bytes: usize,
    /// Methods safe to send twice: `package.Service/Method` (a leading `/` is allowed) or
    /// `package.Service/*`.
    pub idempotent_methods: Vec<String>,
}

/// The mesh's read-only methods, plus billing's money movers: `Charge`, `Refund` and `TopUp` carry
/// an idempotency key, so billing moves money once however often the same request arrives.
pub const DEFAULT_IDEMPOTENT_METHODS: [&str; 11] = [
    "meshwork.users.v1.UserService/GetUser",
    "meshwork.users.v1.UserService/ListUsers",
    "meshwork.billing.v1.BillingService/GetAccount",
    "meshwork.billing.v1.BillingService/GetPayment",
    "meshwork.billing.v1.BillingService/ListPayments",
    "meshwork.billing.v1.BillingService/Charge",
    "meshwork.billing.v1.BillingService/Refund",
    "meshwork.billing.v1.BillingService/TopUp",
    "meshwork.orders.v1.OrderService/GetOrder",
    "meshwork.orders.v1.OrderService/ListOrders",
    "meshwork.auth.v1.AuthService/GetJwks",
];

/// Three attempts: enough to step around one or two bad endpoints, few enough that a caller's
/// deadline is not spent on a service that is down.
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Long enough for a refused connection's endpoint to be passed over, short against the
/// default deadline.
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Finagle's and linkerd's defaults: 20% extra load at most in an outage, 10 retries a second
/// for a client that makes few calls, counted over 10 s.
const DEFAULT_BUDGET_RATIO: f32 = 0.2;
const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;
const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);
/// The mesh's messages are small; a body past this is not worth holding in memory to replay.
const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024;
/// [`TpsBudget`]'s limits (it asserts them).
const BUDGET_TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
const BUDGET_RATIO_MAX: f32 = 1000.0;

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            budget_ratio: DEFAULT_BUDGET_RATIO,
            budget_min_per_sec: DEFAULT_BUDGET_MIN_PER_SEC,
            budget_ttl: DEFAULT_BUDGET_TTL,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            idempotent_methods: DEFAULT_IDEMPOTENT_METHODS
                .iter()
                .map(|method| (*method).to_owned())
                .collect(),
        }
    }
}

impl RetryConfig {
    /// Checks the values serde cannot; the error names the key under `prefix` (e.g.
    /// `billing.retry`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                key("max_attempts"),
                "must be at least 1 (1 turns retries off)",
            ));
        }
        if self.backoff_base.is_zero() {
            return Err(ConfigError::invalid(
                key("backoff_base"),
                "must be greater than zero",
            ));
        }
        if self.backoff_max < self.backoff_base {
            return Err(ConfigError::invalid(
                key("backoff_max"),
                "must not be less than backoff_base",
            ));
        }
        if !(self.budget_ratio.is_finite() && (0.0..=BUDGET_RATIO_MAX).contains(&self.budget_ratio))
        {
            return Err(ConfigError::invalid(
                key("budget_ratio"),
                format!("must be between 0 and {BUDGET_RATIO_MAX}"),
            ));
        }
        if self.budget_min_per_sec >= i32::MAX.unsigned_abs() {
            return Err(ConfigError::invalid(
                key("budget_min_per_sec"),
                "is too large",
            ));
        }
        let (shortest, longest) = BUDGET_TTL_RANGE;
        if self.budget_ttl < shortest || self.budget_ttl > longest {
            return Err(ConfigError::invalid(
                key("budget_ttl"),
                "must be between 1s and 60s",
            ));
        }
        IdempotentMethods::parse(&self.idempotent_methods)
            .map_err(|reason| ConfigError::invalid(key("idempotent_methods"), reason))?;
        Ok(())
    }
}

/// The methods a config names as idempotent, ready to be matched against a request path without
/// allocating.
#[derive(Debug, Default)]
struct IdempotentMethods {
    /// `package.Service/Method`
    methods: HashSet<String>,
    /// `package.Service`, from `package.Service/*`
    services: HashSet<String>,
}

impl IdempotentMethods {
    fn parse(patterns: &[String]) -> Result<Self, String> {
        let mut parsed = Self::default();
        for pattern in patterns {
            let trimmed = pattern.strip_prefix('/').unwrap_or(pattern);
            let well_formed = |(service, method): &(&str, &str)| {
                service.contains('.')
                    && !service.starts_with('.')
                    && !service.ends_with('.')
                    && !method.is_empty()
                    && !method.contains('/')
            };
            let (service, method) =
                trimmed.split_once('/').filter(well_formed).ok_or_else(|| {
                    format!(
                        "`{pattern}` must look like package.Service/Method or package.Service/*"
                    )
                })?;
            if method == "*" {
                parsed.services.insert(service.to_owned());
            } else {
                parsed.methods.insert(trimmed.to_owned());
            }
        }
        Ok(parsed)
    }

    /// Whether the gRPC request path (`/package.Service/Method`) names an idempotent method.
    fn contains(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path);
        self.methods.contains(path)
            || path
                .split_once('/')
                .is_some_and(|(service, _)| self.services.contains(service))
    }
}

/// What every call of one client shares: the budget above all.
#[derive(Debug)]
struct Shared {
    budget: TpsBudget,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    max_buffered_bytes: usize,
    idempotent: IdempotentMethods,
    metrics: RetryMetrics,
}

/// Retries safe failures within a budget shared by every service this layer makes (build one
/// layer per downstream client).
#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// Validates `config` (an error names the key under `retry`) and makes the shared budget.
    pub fn new(config: &RetryConfig) -> Result<Self, ConfigError> {
        Self::observed(config, RetryMetrics::default())
    }

    /// The same, counting retries and budget refusals into `metrics`.
    pub fn observed(config: &RetryConfig, metrics: RetryMetrics) -> Result<Self, ConfigError> {
        config.validate("retry")?;
        let idempotent = IdempotentMethods::parse(&config.idempotent_methods)
            .map_err(|reason| ConfigError::invalid("retry.idempotent_methods", reason))?;
        Ok(Self {
            shared: Arc::new(Shared {
                budget: TpsBudget::new(
                    config.budget_ttl,
                    config.budget_min_per_sec,
                    config.budget_ratio,
                ),
                max_attempts: config.max_attempts,
                backoff_base: config.backoff_base,
                backoff_max: config.backoff_max,
                max_buffered_bytes: config.max_buffered_bytes,
                idempotent,
                metrics,
            }),
        })
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Clone,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<
        S::Future,
        tower::retry::future::ResponseFuture<RetryPolicy, S, Request<Body>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        self.shared.budget.deposit();
        let (parts, body) = request.into_parts();
        match hold(body, self.shared.max_buffered_bytes) {
            Held::Replayable(bytes) => {
                let policy = RetryPolicy {
                    idempotent: self.shared.idempotent.contains(parts.uri.path()),
                    shared: self.shared.clone(),
                    body: bytes.clone(),
                    attempts: 1,
                    rng: HasherRng::default(),
                };
                // The service that was polled ready takes this call; its clone takes the next.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let request = Request::from_parts(parts, replay(bytes));
                ResponseFuture::Retrying {
                    future: tower::retry::Retry::new(policy, ready).call(request),
                }
            }
            Held::SendOnce(body) => ResponseFuture::Once {
                future: self.inner.call(Request::from_parts(parts, body)),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Retry`]: a call that may be retried, or one sent once.
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F, R> {
        Retrying { #[pin] future: R },
        Once { #[pin] future: F },
    }
}

impl<F, R, T> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<T, BoxError>>,
    R: Future<Output = Result<T, BoxError>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Retrying { future } => future.poll(cx),
            ResponseFutureProj::Once { future } => future.poll(cx),
        }
    }
}

/// One call's retry state, under the [`tower::retry::Retry`] that drives it.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    shared: Arc<Shared>,
    /// The request body, to send again.
    body: Bytes,
    idempotent: bool,
    /// Attempts made so far.
    attempts: u32,
    /// Seeded per call, so that concurrent calls draw different pauses.
    rng: HasherRng,
}

impl RetryPolicy {
    /// Whether this outcome may be sent again at all (the budget and the deadline aside).
    fn is_safe<B>(&self, result: &Result<Response<B>, BoxError>) -> bool {
        match result {
            Ok(response) => {
                is_unavailable(response.headers())
                    && (self.idempotent || is_marked_not_processed(response.headers()))
            }
            Err(error) => self.idempotent || never_sent(error.as_ref()),
        }
    }

    /// Full jitter: uniformly below `base * 2^(retries so far)`, capped at `backoff_max`.
    fn backoff(&mut self) -> Duration {
        let doublings = self.attempts.saturating_sub(1);
        let ceiling = self
            .shared
            .backoff_base
            .checked_mul(2_u32.saturating_pow(doublings))
            .map_or(self.shared.backoff_max, |ceiling| {
                ceiling.min(self.shared.backoff_max)
            });
        ceiling.mul_f64(self.rng.next_f64())
    }
}

impl<B> Policy<Request<Body>, Response<B>, BoxError> for RetryPolicy {
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Body>,
        result: &mut Result<Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        if self.attempts >= self.shared.max_attempts || !self.is_safe(result) {
            return None;
        }
        let resend_at = Instant::now() + self.backoff();
        // The call's deadline (set by the deadline layer above) must leave room for an attempt,
        // and the attempt tells the server what is left of it, not what was left at the start.
        if let Some(CallDeadline(deadline)) = request.extensions().get::<CallDeadline>().copied() {
            if resend_at >= deadline {
                return None;
            }
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, encode_timeout(deadline - resend_at));
        }
        if !self.shared.budget.withdraw() {
            self.shared.metrics.budget_exhausted.inc();
            tracing::debug!(path = request.uri().path(), "retry budget exhausted");
            return None;
        }
        self.shared.metrics.retries.inc();
        self.attempts += 1;
        tracing::debug!(
            path = request.uri().path(),
            attempt = self.attempts,
            "retrying"
        );
        Some(tokio::time::sleep_until(resend_at))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(replay(self.body.clone()));
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

fn replay(bytes: Bytes) -> Body {
    Body::new(Full::new(bytes))
}

/// A trailers-only answer (how gRPC errors arrive) with status UNAVAILABLE.
fn is_unavailable(headers: &HeaderMap) -> bool {
    headers
        .get(Status::GRPC_STATUS)
        .is_some_and(|code| Code::from_bytes(code.as_bytes()) == Code::Unavailable)
}

/// Whether an answer carries [`NOT_PROCESSED_HEADER`] (the outlier ejection reads it too).
pub(crate) fn is_marked_not_processed(headers: &HeaderMap) -> bool {
    headers
        .get(NOT_PROCESSED_HEADER)
        .is_some_and(|value| value.as_bytes() == NOT_PROCESSED_VALUE.as_bytes())
}

/// Whether a transport error proves the request never reached a handler.
fn never_sent(error: &(dyn StdError + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() || error.is::<NotSent>() {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            // REFUSED_STREAM promises the server did nothing with the stream (RFC 9113 8.7), and
            // a stream that errs from a GOAWAY was numbered past the last one the server took.
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = error.source();
    }
    false
}

/// A request body as this layer sends it.
enum Held {
    /// The whole body, to send now and replay later.
    Replayable(Bytes),
    /// A body too large to hold, or one still being produced: sent once, exactly as it came.
    SendOnce(Body),
}

/// Holds `body` if it is complete, at most `limit` bytes, and has everything ready now. A unary
/// tonic request's body is a single encoded message that is always ready at once; a body that
/// would make us wait is a client stream, and waiting for it to end could wait forever.
fn hold(mut body: Body, limit: usize) -> Held {
    // Polled only to see what is ready: no one is woken when more arrives, and no one needs to
    // be, because a body that is not ready is handed on to the transport, which polls it again.
    let mut cx = Context::from_waker(Waker::noop());
    let mut data = BytesMut::new();
    let unread = loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Held::Replayable(data.freeze()),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() > limit {
                        break None;
                    }
                }
                // Trailers end a body; gRPC requests never carry them, so just pass them on.
                Err(trailers) => break Some(Ok(trailers)),
            },
            Poll::Ready(Some(Err(status))) => break Some(Err(status)),
            Poll::Pending => break None,
        }
    };
    if data.is_empty() && unread.is_none() {
        return Held::SendOnce(body);
    }
    let mut read: Vec<Result<Frame<Bytes>, Status>> = Vec::with_capacity(2);
    if !data.is_empty() {
        read.push(Ok(Frame::data(data.freeze())));
    }
    read.extend(unread);
    let rest = BodyStream::new(body);
    Held::SendOnce(Body::new(StreamBody::new(
        futures::stream::iter(read).chain(rest),
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    const GET_USER: &str = "/meshwork.users.v1.UserService/GetUser";
    const CREATE_USER: &str = "/meshwork.users.v1.UserService/CreateUser";

    fn request(path: &str, body: &'static [u8]) -> Request<Body> {
        let mut request = Request::new(Body::new(Full::new(Bytes::from_static(body))));
        *request.uri_mut() = path.parse().unwrap_or_default();
        request
    }

    fn ok() -> Response<Body> {
        let mut response = Response::new(Body::empty());
        response
            .headers_mut()
            .insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        response
    }

    fn unavailable() -> Response<Body> {
        Status::unavailable("down").into_http()
    }

    fn unavailable_not_processed() -> Response<Body> {
        not_processed("overloaded").into_http()
    }

    fn connect_refused() -> BoxError {
        Box::new(tonic::ConnectError(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        ))))
    }

    fn reset_after_sending() -> BoxError {
        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    fn code(response: &Response<Body>) -> Option<Code> {
        response
            .headers()
            .get(Status::GRPC_STATUS)
            .map(|value| Code::from_bytes(value.as_bytes()))
    }

    /// A downstream that answers attempt `n` with `script(n)` (counting from 0) and records the
    /// bodies it received.
    #[derive(Clone)]
    struct Downstream {
        attempts: Arc<AtomicUsize>,
        bodies: Arc<Mutex<Vec<Bytes>>>,
        script: Arc<dyn Fn(usize) -> Result<Response<Body>, BoxError> + Send + Sync>,
    }

    impl Downstream {
        fn new(
            script: impl Fn(usize) -> Result<Response<Body>, BoxError> + Send + Sync + 'static,
        ) -> Self {
            Self {
                attempts: Arc::default(),
                bodies: Arc::default(),
                script: Arc::new(script),
            }
        }

        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::SeqCst)
        }

        fn bodies(&self) -> Vec<Bytes> {
            self.bodies.lock().map(|b| b.clone()).unwrap_or_default()
        }
    }

    impl Service<Request<Body>> for Downstream {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = futures::future::BoxFuture<'static, Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
            let this = self.clone();
            Box::pin(async move {
                let body = request.into_body().collect().await?.to_bytes();
                if let Ok(mut bodies) = this.bodies.lock() {
                    bodies.push(body);
                }
                (this.script)(attempt)
            })
        }
    }

    fn layer() -> RetryLayer {
        RetryLayer::new(&RetryConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn send(
        layer: &RetryLayer,
        downstream: &Downstream,
        request: Request<Body>,
    ) -> Result<Response<Body>, BoxError> {
        layer.layer(downstream.clone()).oneshot(request).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_is_retried_whatever_the_method() {
        let downstream = Downstream::new(|n| {
            if n == 0 {
                Err(connect_refused())
            } else {
                Ok(ok())
            }
        });
        let response = send(&layer(), &downstream, request(CREATE_USER, b"create")).await;
        assert_eq!(response.ok().as_ref().and_then(code), Some(Code::Ok));
        assert_eq!(downstream.attempts(), 2);
        assert_eq!(downstream.bodies(), vec![Bytes::from_static(b"create"); 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_after_sending_is_retried_only_for_an_idempotent_method() {
        let downstream = Downstream::new(|n| {
            if n == 0 {
                Err(reset_after_sending())
            } else {
                Ok(ok())
            }
        });
        let created = send(&layer(), &downstream, request(CREATE_USER, b"x")).await;
        assert!(created.is_err());
        assert_eq!(downstream.attempts(), 1);

        let downstream = Downstream::new(|n| {
            if n == 0 {
                Err(reset_after_sending())
            } else {
                Ok(ok())
            }
        });
        let got = send(&layer(), &downstream, request(GET_USER, b"x")).await;
        assert_eq!(got.ok().as_ref().and_then(code), Some(Code::Ok));
        assert_eq!(downstream.attempts(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_without_the_marker_is_not_retried_for_a_method_that_is_not_idempotent() {
        let downstream = Downstream::new(|_| Ok(unavailable()));
        let response = send(&layer(), &downstream, request(CREATE_USER, b"x")).await;
        assert_eq!(
            response.ok().as_ref().and_then(code),
            Some(Code::Unavailable)
        );
        assert_eq!(downstream.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_with_the_marker_is_retried_for_any_method() {
        let downstream = Downstream::new(|n| {
            if n == 0 {
                Ok(unavailable_not_processed())
            } else {
                Ok(ok())
            }
        });
        let response = send(&layer(), &downstream, request(CREATE_USER, b"create")).await;
        assert_eq!(response.ok().as_ref().and_then(code), Some(Code::Ok));
        assert_eq!(downstream.attempts(), 2);
        assert_eq!(downstream.bodies(), vec![Bytes::from_static(b"create"); 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_for_an_idempotent_method_at_most_max_attempts_times() {
        let downstream = Downstream::new(|_| Ok(unavailable()));
        let response = send(&layer(), &downstream, request(GET_USER, b"x")).await;
        assert_eq!(
            response.ok().as_ref().and_then(code),
            Some(Code::Unavailable)
        );
        assert_eq!(downstream.attempts(), DEFAULT_MAX_ATTEMPTS as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_are_never_retried() {
        let downstream = Downstream::new(|_| Ok(Status::internal("bug").into_http()));
        let _ = send(&layer(), &downstream, request(GET_USER, b"x")).await;
        assert_eq!(downstream.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_always_unavailable_downstream_sees_at_most_the_budget() {
        const CALLS: usize = 1_000;
        let config = RetryConfig::default();
        let layer = RetryLayer::new(&config).unwrap_or_else(|e| panic!("{e}"));
        let downstream = Downstream::new(|_| Ok(unavailable()));
        let calls = (0..CALLS).map(|_| send(&layer, &downstream, request(GET_USER, b"x")));
        let started = Instant::now();
        let results = futures::future::join_all(calls).await;
        // Every call counts for the whole test: it fits in one budget window.
        assert!(started.elapsed() < config.budget_ttl);
        assert!(results.iter().all(|r| r.is_ok()));

        let floor = config.budget_min_per_sec as usize * config.budget_ttl.as_secs() as usize;
        let budget = CALLS + (CALLS as f64 * f64::from(config.budget_ratio)).round() as usize;
        let attempts = downstream.attempts();
        assert!(
            attempts <= budget + floor,
            "{attempts} attempts for {CALLS} calls"
        );
        // Retries did happen (up to the budget), and far fewer than without one.
        assert!(attempts > CALLS + floor, "{attempts} attempts");
        assert!(attempts < CALLS * DEFAULT_MAX_ATTEMPTS as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_and_budget_refusals_are_counted() {
        let config = RetryConfig {
            budget_ratio: 0.0,
            budget_min_per_sec: 1,
            budget_ttl: Duration::from_secs(1),
            ..RetryConfig::default()
        };
        let metrics = RetryMetrics::default();
        let layer =
            RetryLayer::observed(&config, metrics.clone()).unwrap_or_else(|e| panic!("{e}"));
        let downstream = Downstream::new(|_| Ok(unavailable()));
        // The floor allows one retry in the (one second) window: the rest are refused.
        for _ in 0..3 {
            let _ = send(&layer, &downstream, request(GET_USER, b"x")).await;
        }
        let retries = metrics.retries.get();
        let refused = metrics.budget_exhausted.get();
        assert_eq!(
            u64::try_from(downstream.attempts()).ok(),
            Some(3 + retries),
            "every retry counted"
        );
        assert_eq!(
            (retries, refused),
            (1, 3),
            "one retry, then one refusal per call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_sends_what_is_left_of_the_deadline_and_none_past_it() {
        let downstream = Downstream::new(|n| {
            if n == 0 {
                Err(connect_refused())
            } else {
                Ok(ok())
            }
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = {
            let seen = seen.clone();
            let downstream = downstream.clone();
            tower::service_fn(move |request: Request<Body>| {
                if let Ok(mut seen) = seen.lock() {
                    seen.push(request.headers().get(GRPC_TIMEOUT).cloned());
                }
                downstream.clone().oneshot(request)
            })
        };
        let mut call = request(CREATE_USER, b"x");
        let deadline = Instant::now() + Duration::from_secs(1);
        call.extensions_mut().insert(CallDeadline(deadline));
        call.headers_mut()
            .insert(GRPC_TIMEOUT, encode_timeout(Duration::from_secs(1)));
        let response = layer().layer(recorder).oneshot(call).await;
        assert!(response.is_ok());
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let timeouts: Vec<Duration> = seen
            .iter()
            .flatten()
            .filter_map(crate::deadline::decode_timeout)
            .collect();
        assert_eq!(timeouts.len(), 2, "{seen:?}");
        assert!(timeouts[1] < timeouts[0], "{timeouts:?}");

        // No time left: the failure is final.
        let downstream = Downstream::new(|_| Err(connect_refused()));
        let mut call = request(CREATE_USER, b"x");
        call.extensions_mut().insert(CallDeadline(Instant::now()));
        let response = send(&layer(), &downstream, call).await;
        assert!(response.is_err());
        assert_eq!(downstream.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_limit_is_sent_once_and_whole() {
        let config = RetryConfig {
            max_buffered_bytes: 4,
            ..RetryConfig::default()
        };
        let layer = RetryLayer::new(&config).unwrap_or_else(|e| panic!("{e}"));
        let downstream = Downstream::new(|_| Err(connect_refused()));
        let _ = send(&layer, &downstream, request(GET_USER, b"too large")).await;
        assert_eq!(downstream.attempts(), 1);
        assert_eq!(downstream.bodies(), vec![Bytes::from_static(b"too large")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streaming_body_is_sent_once_and_whole() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        let body = Body::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let mut call = Request::new(body);
        *call.uri_mut() = http::Uri::from_static(GET_USER);
        let downstream = Downstream::new(|_| Err(connect_refused()));
        let sender = tokio::spawn(async move {
            for chunk in [&b"first "[..], &b"second"[..]] {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(chunk)))).await;
                tokio::task::yield_now().await;
            }
        });
        let _ = send(&layer(), &downstream, call).await;
        let _ = sender.await;
        assert_eq!(downstream.attempts(), 1);
        assert_eq!(
            downstream.bodies(),
            vec![Bytes::from_static(b"first second")]
        );
    }

    #[test]
    fn the_budget_and_every_call_share_one_layer() {
        let layer = layer();
        let a = layer.layer(());
        let b = layer.layer(());
        assert!(Arc::ptr_eq(&a.shared, &b.shared));
    }

    #[test]
    fn idempotent_methods_match_exactly_or_by_service() {
        let methods = IdempotentMethods::parse(&[
            "meshwork.users.v1.UserService/GetUser".into(),
            "/meshwork.billing.v1.BillingService/*".into(),
        ])
        .unwrap_or_default();
        assert!(methods.contains(GET_USER));
        assert!(!methods.contains(CREATE_USER));
        assert!(methods.contains("/meshwork.billing.v1.BillingService/Charge"));
        assert!(!methods.contains("/meshwork.billing.v1.BillingServiceX/Charge"));
    }

    #[test]
    fn defaults_are_valid_and_cover_the_read_only_methods() {
        let config = RetryConfig::default();
        assert!(config.validate("retry").is_ok());
        let methods = IdempotentMethods::parse(&config.idempotent_methods).unwrap_or_default();
        assert!(methods.contains("/meshwork.billing.v1.BillingService/Charge"));
        assert!(!methods.contains("/meshwork.orders.v1.OrderService/CreateOrder"));
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                RetryConfig {
                    idempotent_methods: vec!["GetUser".into()],
                    ..RetryConfig::default()
                },
                "billing.retry.idempotent_methods",
            ),
            (
                RetryConfig {
                    budget_ttl: Duration::from_secs(120),
                    ..RetryConfig::default()
                },
                "billing.retry.budget_ttl",
            ),
            (
                RetryConfig {
                    budget_ratio: f32::NAN,
                    ..RetryConfig::default()
                },
                "billing.retry.budget_ratio",
            ),
            (
                RetryConfig {
                    max_attempts: 0,
                    ..RetryConfig::default()
                },
                "billing.retry.max_attempts",
            ),
            (
                RetryConfig {
                    backoff_max: Duration::from_millis(1),
                    ..RetryConfig::default()
                },
                "billing.retry.backoff_max",
            ),
        ];
        for (config, key) in cases {
            let error = config
                .validate("billing.retry")
                .err()
                .map(|e| e.to_string());
            assert!(
                error.as_deref().is_some_and(|e| e.contains(key)),
                "{key}: {error:?}"
            );
        }
    }

    #[test]
    fn config_reads_humantime_durations() {
        use figment::{
            Figment,
            providers::{Format, Serialized, Toml},
        };
        let config: Result<RetryConfig, _> =
            Figment::from(Serialized::defaults(RetryConfig::default()))
                .merge(Toml::string(
                    "backoff_base = \"10ms\"\nidempotent_methods = [\"a.B/*\"]",
                ))
                .extract();
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.backoff_base, Duration::from_millis(10));
        assert_eq!(config.idempotent_methods, vec!["a.B/*".to_owned()]);
    }
}
