//! Deadlines: every call has one, a call made while serving another never outlives it, and a
//! server stops work nobody waits for any more.
//!
//! - [`InboundDeadlineLayer`] (server side) reads a call's `grpc-timeout` (capped by the server's
//!   longest call) and runs the handler inside a task-local scope holding the call's deadline,
//!   which [`remaining`] tells; when the deadline passes it drops the handler and answers
//!   DEADLINE_EXCEEDED.
//! - [`DeadlineLayer`] (client side) gives an outgoing call its own `grpc-timeout`, or the
//!   configured default, but never more than what [`remaining`] leaves of the call being served;
//!   sends it on as `grpc-timeout`, fails the call with DEADLINE_EXCEEDED locally when it runs
//!   out, and fails it at once when the call being served has already run out.
//!
//! ```text
//! Server::builder().layer(InboundDeadlineLayer::new(config.max_call_duration)) // server
//! ServiceBuilder::new().layer(DeadlineLayer::new(config.default_deadline))    // client
//! let left = mesh::deadline::remaining();                                       // handler
//! ```
//!
//! The deadline is task-local: work a handler spawns onto another task does not inherit it unless
//! carried there with [`scope`] (the deadline is [`current`]). A server stream's messages are
//! produced after the handler has returned, outside the scope.
//!
//! It also holds the `grpc-timeout` codec (the gRPC over HTTP/2 spec's `TimeoutValue TimeoutUnit`).

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::{
    task::futures::TaskLocalFuture,
    time::{Instant, Sleep},
};
use tower::{BoxError, Layer, Service};

/// The metadata key carrying a call's deadline.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The spec allows at most 8 digits in a timeout value.
const MAX_TIMEOUT_DIGITS: u64 = 99_999_999;

/// Encodes a duration as a `grpc-timeout` value, choosing the finest unit that fits in 8 digits.
pub fn encode_timeout(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per_unit, suffix) in units {
        // Round up so the server never sees a deadline later than ours.
        let value = nanos.div_ceil(per_unit);
        if value <= u128::from(MAX_TIMEOUT_DIGITS) {
            return HeaderValue::from_str(&format!("{value}{suffix}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Parses a `grpc-timeout` value; `None` when it is malformed.
pub fn decode_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

tokio::task_local! {
    /// The deadline of the call the current task is serving.
    static INBOUND: Instant;
}

/// The deadline of the call being served, if this task is serving one.
pub fn current() -> Option<Instant> {
    INBOUND.try_with(|deadline| *deadline).ok()
}

/// What is left of the deadline of the call being served (zero once it has passed); `None`
/// outside a call.
pub fn remaining() -> Option<Duration> {
    current().map(|deadline| deadline.saturating_duration_since(Instant::now()))
}

/// Runs `future` (typically work spawned by a handler) as part of a call with `deadline`, so that
/// its outgoing calls are bounded by it.
pub fn scope<F: Future>(deadline: Instant, future: F) -> TaskLocalFuture<Instant, F> {
    INBOUND.scope(deadline, future)
}

/// A deadline past any a call could have, for timeouts too large to add to an `Instant`.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

fn after(now: Instant, timeout: Duration) -> Instant {
    now.checked_add(timeout).unwrap_or_else(|| now + FAR_FUTURE)
}

/// The deadline an outgoing call was given, put in the request's extensions so that the layers
/// below (retries) can tell what is left of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallDeadline(pub(crate) Instant);

/// Gives every outgoing call a deadline: its own or the default, never past the deadline of the
/// call being served; sends it as `grpc-timeout` and enforces it.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    defaults: Arc<MethodDeadlines>,
}

/// The deadline of a call that sets none: per method (`package.Service/Method`), else one default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodDeadlines {
    pub default: Duration,
    pub methods: BTreeMap<String, Duration>,
}

impl MethodDeadlines {
    fn of(&self, path: &str) -> Duration {
        self.methods
            .get(path.trim_start_matches('/'))
            .copied()
            .unwrap_or(self.default)
    }
}

impl DeadlineLayer {
    /// One default deadline for every method.
    pub fn new(default: Duration) -> Self {
        Self::per_method(MethodDeadlines {
            default,
            methods: BTreeMap::new(),
        })
    }

    /// A default per method, falling back to `defaults.default`.
    pub fn per_method(defaults: MethodDeadlines) -> Self {
        Self {
            defaults: Arc::new(defaults),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            defaults: self.defaults.clone(),
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    defaults: Arc<MethodDeadlines>,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let now = Instant::now();
        let own = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(decode_timeout)
            .unwrap_or_else(|| self.defaults.of(request.uri().path()));
        let mut deadline = after(now, own);
        if let Some(inbound) = current() {
            if inbound <= now {
                return ResponseFuture {
                    inner: None,
                    sleep: tokio::time::sleep_until(now),
                    timeout: None,
                };
            }
            deadline = deadline.min(inbound);
        }
        let timeout = deadline - now;
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, encode_timeout(timeout));
        request.extensions_mut().insert(CallDeadline(deadline));
        ResponseFuture {
            inner: Some(self.inner.call(request)),
            sleep: tokio::time::sleep_until(deadline),
            timeout: Some(timeout),
        }
    }
}

pin_project! {
    /// The response future of [`Deadline`]: the call, raced against its deadline.
    pub struct ResponseFuture<F> {
        // `None` when the call being served had run out before this one could start.
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Sleep,
        timeout: Option<Duration>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(Box::new(tonic::Status::deadline_exceeded(
                "the deadline of the call being served has passed",
            ))));
        };
        let exceeded = |timeout: &Option<Duration>| -> BoxError {
            Box::new(tonic::Status::deadline_exceeded(format!(
                "deadline of {:?} exceeded",
                timeout.unwrap_or_default()
            )))
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            return Poll::Ready(result.map_err(|error| {
                let error = error.into();
                if is_tonic_timeout(error.as_ref()) {
                    exceeded(this.timeout)
                } else {
                    error
                }
            }));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(exceeded(this.timeout))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// tonic's channel enforces the `grpc-timeout` this layer sends with a timer of its own, and calls
/// it running out CANCELLED; it is this call's deadline, and the caller is told so.
fn is_tonic_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// tonic's own timeout, which wraps every layer a server adds, stops a handler at the same
/// deadline but answers CANCELLED. Answering this much earlier (the tokio timer's resolution)
/// makes the answer DEADLINE_EXCEEDED, as the gRPC spec and the caller expect.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(1);

/// Server side: serves each call inside the scope of its deadline (from `grpc-timeout`, at most
/// `max_call_duration`), and stops the handler with DEADLINE_EXCEEDED when it passes.
#[derive(Debug, Clone, Copy)]
pub struct InboundDeadlineLayer {
    max_call_duration: Duration,
}

impl InboundDeadlineLayer {
    /// `max_call_duration` bounds calls without a `grpc-timeout` and those asking for more.
    pub fn new(max_call_duration: Duration) -> Self {
        Self { max_call_duration }
    }
}

impl<S> Layer<S> for InboundDeadlineLayer {
    type Service = InboundDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InboundDeadline {
            inner,
            max_call_duration: self.max_call_duration,
        }
    }
}

/// See [`InboundDeadlineLayer`].
#[derive(Debug, Clone)]
pub struct InboundDeadline<S> {
    inner: S,
    max_call_duration: Duration,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for InboundDeadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = InboundResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let now = Instant::now();
        let timeout = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(decode_timeout)
            .map_or(self.max_call_duration, |asked| {
                asked.min(self.max_call_duration)
            });
        let deadline = after(now, timeout);
        let expiry = deadline.checked_sub(AHEAD_OF_TONIC).unwrap_or(now).max(now);
        let inner = INBOUND.sync_scope(deadline, || self.inner.call(request));
        InboundResponseFuture {
            inner: INBOUND.scope(deadline, inner),
            expiry: tokio::time::sleep_until(expiry),
            timeout,
        }
    }
}

pin_project! {
    /// The response future of [`InboundDeadline`]: the handler, in its deadline's scope, raced
    /// against the deadline.
    pub struct InboundResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<Instant, F>,
        #[pin]
        expiry: Sleep,
        timeout: Duration,
    }
}

impl<F, B, E> Future for InboundResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The deadline first: once it has passed, the handler gets no more time at all.
        if this.expiry.poll(cx).is_ready() {
            tracing::debug!(timeout = ?this.timeout, "deadline passed, handler stopped");
            return Poll::Ready(Ok(tonic::Status::deadline_exceeded(format!(
                "deadline of {:?} exceeded",
                this.timeout
            ))
            .into_http()));
        }
        this.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_round_trips_through_the_header() {
        for timeout in [
            Duration::from_millis(250),
            Duration::from_secs(5),
            Duration::from_secs(3 * 3600),
        ] {
            assert_eq!(decode_timeout(&encode_timeout(timeout)), Some(timeout));
        }
    }

    #[test]
    fn encoding_never_exceeds_eight_digits() {
        let value = encode_timeout(Duration::from_secs(86_400 * 365));
        assert!(value.len() <= 9, "{value:?}");
    }

    #[test]
    fn malformed_values_are_rejected() {
        for bad in ["", "5", "5x", "123456789S", "-1S", "S"] {
            assert_eq!(
                decode_timeout(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_deadline_gets_the_default_and_fails_with_deadline_exceeded() {
        let slow = tower::service_fn(|request: Request<()>| async move {
            assert!(request.headers().contains_key(GRPC_TIMEOUT));
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, BoxError>(())
        });
        let mut service = DeadlineLayer::new(Duration::from_secs(1)).layer(slow);
        let err = service.call(Request::new(())).await.err();
        let status = err.and_then(|e| e.downcast::<tonic::Status>().ok());
        assert_eq!(
            status.map(|s| s.code()),
            Some(tonic::Code::DeadlineExceeded)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_with_its_own_deadline_keeps_it() {
        let echo = tower::service_fn(|request: Request<()>| async move {
            Ok::<_, BoxError>(request.headers().get(GRPC_TIMEOUT).and_then(decode_timeout))
        });
        let mut service = DeadlineLayer::new(Duration::from_secs(1)).layer(echo);
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, HeaderValue::from_static("250m"));
        let sent = service.call(request).await.ok().flatten();
        assert_eq!(sent, Some(Duration::from_millis(250)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_method_with_its_own_default_gets_it_and_others_the_default() {
        let echo = tower::service_fn(|request: Request<()>| async move {
            Ok::<_, BoxError>(request.headers().get(GRPC_TIMEOUT).and_then(decode_timeout))
        });
        let mut service = DeadlineLayer::per_method(MethodDeadlines {
            default: Duration::from_secs(1),
            methods: BTreeMap::from([(
                "meshwork.orders.v1.OrderService/WatchOrder".to_owned(),
                Duration::from_secs(600),
            )]),
        })
        .layer(echo);
        let mut sent = Vec::new();
        for path in [
            "/meshwork.orders.v1.OrderService/WatchOrder",
            "/meshwork.orders.v1.OrderService/GetOrder",
        ] {
            let request = Request::builder().uri(path).body(()).ok();
            if let Some(request) = request {
                sent.push(service.call(request).await.ok().flatten());
            }
        }
        assert_eq!(
            sent,
            vec![Some(Duration::from_secs(600)), Some(Duration::from_secs(1))]
        );
    }

    fn served(timeout: Option<&'static str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_static(timeout));
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn a_served_call_sees_its_deadline_capped_by_the_longest_call() {
        let handler = tower::service_fn(|_: Request<()>| async {
            Ok::<_, BoxError>(Response::new(remaining()))
        });
        let mut server = InboundDeadlineLayer::new(Duration::from_secs(10)).layer(handler);
        for (asked, seen) in [
            (Some("2S"), Duration::from_secs(2)),
            (Some("60S"), Duration::from_secs(10)),
            (None, Duration::from_secs(10)),
        ] {
            let response = server.call(served(asked)).await.ok();
            assert_eq!(
                response.and_then(Response::into_body),
                Some(seen),
                "{asked:?}"
            );
        }
        assert_eq!(remaining(), None, "no deadline outside a call");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_past_its_deadline_is_stopped_with_deadline_exceeded() {
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handler = {
            let finished = finished.clone();
            tower::service_fn(move |_: Request<()>| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    finished.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok::<_, BoxError>(Response::new(()))
                }
            })
        };
        let mut server = InboundDeadlineLayer::new(Duration::from_secs(60)).layer(handler);
        let started = Instant::now();
        let response = server.call(served(Some("100m"))).await.ok();
        assert!(started.elapsed() <= Duration::from_millis(100));
        let status = response.and_then(|r| tonic::Status::from_header_map(r.headers()));
        assert_eq!(
            status.map(|s| s.code()),
            Some(tonic::Code::DeadlineExceeded)
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!finished.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// An outgoing call through a client stack (default deadline 5 s) whose downstream reports
    /// the `grpc-timeout` it was sent.
    async fn outgoing(own: Option<&'static str>) -> Result<Option<Duration>, BoxError> {
        let downstream = tower::service_fn(|request: Request<()>| async move {
            Ok::<_, BoxError>(request.headers().get(GRPC_TIMEOUT).and_then(decode_timeout))
        });
        let mut request = Request::new(());
        if let Some(own) = own {
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_static(own));
        }
        DeadlineLayer::new(Duration::from_secs(5))
            .layer(downstream)
            .call(request)
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_made_while_serving_gets_at_most_what_is_left() {
        let handler = tower::service_fn(|request: Request<Option<&'static str>>| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let sent = outgoing(request.into_body()).await?;
            Ok::<_, BoxError>(Response::new(sent))
        });
        let mut server = InboundDeadlineLayer::new(Duration::from_secs(60)).layer(handler);
        let served = |own: Option<&'static str>| {
            let mut request = Request::new(own);
            request
                .headers_mut()
                .insert(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
            request
        };
        // The default (5 s) and a longer own timeout (3 s) are cut to the 700 ms left...
        for own in [None, Some("3S")] {
            let sent = server
                .call(served(own))
                .await
                .ok()
                .and_then(Response::into_body);
            assert_eq!(sent, Some(Duration::from_millis(700)), "{own:?}");
        }
        // ...and a shorter own timeout is kept.
        let sent = server
            .call(served(Some("200m")))
            .await
            .ok()
            .and_then(Response::into_body);
        assert_eq!(sent, Some(Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_made_after_the_served_deadline_fails_at_once_and_is_not_sent() {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let downstream = {
            let sent = sent.clone();
            tower::service_fn(move |_: Request<()>| {
                sent.store(true, std::sync::atomic::Ordering::SeqCst);
                async { Ok::<_, BoxError>(()) }
            })
        };
        let mut client = DeadlineLayer::new(Duration::from_secs(5)).layer(downstream);
        let expired = Instant::now();
        tokio::time::advance(Duration::from_millis(1)).await;
        let started = Instant::now();
        // Called from inside the scope, as a handler calls.
        let result = scope(expired, async { client.call(Request::new(())).await }).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        let status = result
            .err()
            .and_then(|e| e.downcast::<tonic::Status>().ok());
        assert_eq!(
            status.map(|s| s.code()),
            Some(tonic::Code::DeadlineExceeded)
        );
        assert!(!sent.load(std::sync::atomic::Ordering::SeqCst));
    }
}
