//! Outlier ejection: an endpoint that keeps failing is taken out of the balancer for a while,
//! then probed back in.
//!
//! [`Eject`] wraps one endpoint of a client. It counts the endpoint's consecutive failures — a
//! transport error (connection refused, reset, TLS), or a response whose `grpc-status` header is
//! UNAVAILABLE (how tonic sends an error before any message: "trailers-only") — and after
//! [`EjectionConfig::consecutive_failures`] of them makes itself not ready (an UNAVAILABLE
//! marked [`crate::retry::NOT_PROCESSED_HEADER`] — shed by a busy server, or refused by a draining one —
//! counts neither way: a busy endpoint is not a broken one): `poll_ready` stays
//! pending, with a timer to wake it, for an interval that starts at `base_interval` and doubles
//! with each ejection that follows without a success in between, up to `max_interval`. A
//! `tower::balance` balancer only sends to ready endpoints, so that is what takes it out.
//! When the interval ends, one probe call is let through: a success puts the endpoint fully back
//! (and resets its count and interval), a failure ejects it again for longer.
//!
//! A connection that cannot be made at all (refused, timed out: a replica that has exited or is
//! draining, whose port is closed) ejects its endpoint at once, without waiting for
//! `consecutive_failures`: until it listens again every call sent there fails the same way, in
//! microseconds, which makes it the endpoint that looks least loaded to the balancer, so the
//! retries of one call could all be drawn back to it.
//!
//! The endpoints of one client share a budget: at most `max_ejected_percent` of them (rounded
//! down, so a lone endpoint never) are out at once, and when the set shrinks under the ejected
//! ones, the ejected are let back early. Ejecting every endpoint would turn failures that are
//! quick into waits for the deadline.
//!
//! A layer made with [`EjectionLayer::observed`] exports how many endpoints the balancer holds,
//! how many are ejected, and how many ejections there were (`meshwork_client_endpoints`,
//! `meshwork_client_ejected_endpoints`, `meshwork_client_ejections_total`).
//!
//! What it is not: a health checker (it only learns from real calls), or a retry.
//!
//! ```text
//! let ejection = EjectionLayer::new(&config.ejection, "users"); // one per client
//! let endpoint = ejection.for_endpoint(&address).layer(channel);
//! let endpoint = PeakEwma::new(endpoint, ...);                // then into the balancer
//! ```

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use http::{HeaderMap, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::{config::EjectionConfig, metrics::EjectionMetrics};

/// The response header carrying the gRPC status of a trailers-only response.
const GRPC_STATUS: &str = "grpc-status";
/// `grpc-status` of UNAVAILABLE: the server (or something in front of it) cannot serve now.
const UNAVAILABLE: &str = "14";

/// Ejection for the endpoints of one client: they share the budget of how many may be out.
#[derive(Clone)]
pub struct EjectionLayer {
    policy: Arc<Policy>,
    endpoint: Arc<str>,
}

impl std::fmt::Debug for EjectionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EjectionLayer")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl EjectionLayer {
    /// The layer for the endpoints of one client of `service` (the name its logs give).
    pub fn new(config: &EjectionConfig, service: &str) -> Self {
        Self::observed(config, service, EjectionMetrics::default())
    }

    /// The same, exporting the endpoints and their ejections into `metrics`.
    pub fn observed(config: &EjectionConfig, service: &str, metrics: EjectionMetrics) -> Self {
        Self {
            policy: Arc::new(Policy {
                service: Box::from(service),
                consecutive_failures: config.consecutive_failures.max(1),
                base_interval: config.base_interval,
                max_interval: config.max_interval.max(config.base_interval),
                max_ejected_percent: usize::from(config.max_ejected_percent.min(100)),
                budget: Mutex::new(Budget::new(metrics)),
                next_id: AtomicU64::new(0),
            }),
            endpoint: Arc::from(""),
        }
    }

    /// The same layer, naming the endpoint it wraps in its logs.
    pub fn for_endpoint(&self, endpoint: &impl std::fmt::Display) -> Self {
        Self {
            policy: Arc::clone(&self.policy),
            endpoint: Arc::from(endpoint.to_string()),
        }
    }
}

impl<S> Layer<S> for EjectionLayer {
    type Service = Eject<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let id = self.policy.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.policy.budget).join();
        Eject {
            inner,
            id,
            health: Arc::new(Mutex::new(Health::default())),
            policy: Arc::clone(&self.policy),
            endpoint: Arc::clone(&self.endpoint),
            sleep: None,
        }
    }
}

/// See [`EjectionLayer`]. Not `Clone`: each value is one member of its client's set, counted
/// in the budget from creation until drop (when the balancer lets go of the endpoint).
pub struct Eject<S> {
    inner: S,
    id: u64,
    health: Arc<Mutex<Health>>,
    policy: Arc<Policy>,
    endpoint: Arc<str>,
    /// Wakes `poll_ready` when an ejection ends.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> std::fmt::Debug for Eject<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Eject")
            .field("endpoint", &self.endpoint)
            .field("state", &lock(&self.health).state)
            .finish_non_exhaustive()
    }
}

impl<S> Eject<S> {
    /// Ready unless ejected, or on probation with its probe call still out.
    fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let until = {
                let mut health = lock(&self.health);
                match health.state {
                    State::Active | State::Probing { in_flight: false } => return Poll::Ready(()),
                    State::Probing { in_flight: true } => {
                        health.probe_waiter = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    State::Ejected { until } => {
                        let mut budget = lock(&self.policy.budget);
                        let over_budget = budget.over_budget(self.policy.max_ejected_percent);
                        if Instant::now() >= until || over_budget {
                            budget.release(self.id);
                            health.state = State::Probing { in_flight: false };
                            tracing::info!(service = %self.policy.service, endpoint = %self.endpoint, early = over_budget, "ejection over; probing the endpoint");
                            return Poll::Ready(());
                        }
                        budget.waiting.insert(self.id, cx.waker().clone());
                        until
                    }
                }
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl<S, Req, B> Service<Req> for Eject<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.poll_admit(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let probe = {
            let mut health = lock(&self.health);
            let probe = matches!(health.state, State::Probing { in_flight: false });
            if probe {
                health.state = State::Probing { in_flight: true };
            }
            probe
        };
        ResponseFuture {
            inner: self.inner.call(request),
            outcome: Some(Outcome {
                health: Arc::clone(&self.health),
                policy: Arc::clone(&self.policy),
                endpoint: Arc::clone(&self.endpoint),
                probe,
            }),
        }
    }
}

impl<S> Drop for Eject<S> {
    fn drop(&mut self) {
        let mut health = lock(&self.health);
        health.removed = true;
        let was_ejected = matches!(health.state, State::Ejected { .. });
        lock(&self.policy.budget).leave(self.id, was_ejected, self.policy.max_ejected_percent);
    }
}

pin_project! {
    /// The response future of [`Eject`]: the call, whose outcome is counted when it completes
    /// (a call given up on, e.g. by its deadline, counts neither way).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        outcome: Option<Outcome>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: 'static,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some(outcome) = this.outcome.take() {
            match &result {
                // Refused unprocessed (shedding, draining): busy, not broken. Dropped, the
                // outcome decides nothing (a probe lets another call probe).
                Ok(response) if is_refused_unprocessed(response.headers()) => drop(outcome),
                Ok(response) => outcome.record(is_unavailable(response.headers()), false),
                Err(error) => outcome.record(true, is_unreachable(error)),
            }
        }
        Poll::Ready(result)
    }
}

/// Whether a response says UNAVAILABLE before any message (a trailers-only response).
fn is_unavailable(headers: &HeaderMap) -> bool {
    headers
        .get(GRPC_STATUS)
        .is_some_and(|status| status.as_bytes() == UNAVAILABLE.as_bytes())
}

/// Whether a response is a refusal marked as not processed
/// ([`crate::retry::NOT_PROCESSED_HEADER`]): the
/// server shed the call because it is at its concurrency limit, or refused it while draining.
/// Neither says the endpoint is broken. Counting sheds as failures would eject the replicas
/// that are busiest, pile their load on the others and make those shed in turn (`make bench`
/// showed exactly that: a mesh hop at half its capacity cascading into ejections); a draining
/// replica closes its port next, and that ejects it at once.
fn is_refused_unprocessed(headers: &HeaderMap) -> bool {
    is_unavailable(headers) && crate::retry::is_marked_not_processed(headers)
}

/// Whether a call's error proves that no connection to its endpoint could be made (refused,
/// timed out, TLS refused). Until one can, every call sent there fails the same way, and fast,
/// which makes it the endpoint that looks least loaded to the balancer and draws retries back
/// to it; so it is ejected at once instead of after `consecutive_failures` of them.
fn is_unreachable<E: 'static>(error: &E) -> bool {
    let Some(error) = (error as &dyn std::any::Any).downcast_ref::<tonic::transport::Error>()
    else {
        return false;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// What one call reports back to its endpoint's health.
struct Outcome {
    health: Arc<Mutex<Health>>,
    policy: Arc<Policy>,
    endpoint: Arc<str>,
    /// This call is the probe of an endpoint on probation.
    probe: bool,
}

impl Outcome {
    fn record(mut self, failed: bool, unreachable: bool) {
        let mut health = lock(&self.health);
        if self.probe {
            self.probe = false;
            if let State::Probing { .. } = health.state {
                health.state = State::Probing { in_flight: false };
            }
        }
        if let Some(waiter) = health.probe_waiter.take() {
            waiter.wake();
        }
        if !failed {
            health.failures = 0;
            health.ejections = 0;
            if let State::Probing { .. } = health.state {
                health.state = State::Active;
                tracing::info!(service = %self.policy.service, endpoint = %self.endpoint, "endpoint answers again");
            }
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let due = match health.state {
            State::Active => unreachable || health.failures >= self.policy.consecutive_failures,
            // The probe (or a call from before the ejection) failed: straight back out.
            State::Probing { .. } => true,
            State::Ejected { .. } => false,
        };
        if !due || health.removed {
            return;
        }
        let mut budget = lock(&self.policy.budget);
        if !budget.try_eject(self.policy.max_ejected_percent) {
            // Out of budget: the endpoint stays in and keeps counting.
            health.state = State::Active;
            tracing::debug!(service = %self.policy.service, endpoint = %self.endpoint, failures = health.failures, "not ejecting: too many endpoints already out");
            return;
        }
        let interval = self.policy.interval(health.ejections);
        health.ejections = health.ejections.saturating_add(1);
        health.failures = 0;
        health.state = State::Ejected {
            until: Instant::now() + interval,
        };
        tracing::warn!(service = %self.policy.service, endpoint = %self.endpoint, ?interval, ejections = health.ejections, "ejecting a failing endpoint");
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // A probe that was given up on (cancelled) decides nothing: let another call probe.
        if self.probe {
            let mut health = lock(&self.health);
            if let State::Probing { in_flight: true } = health.state {
                health.state = State::Probing { in_flight: false };
            }
            if let Some(waiter) = health.probe_waiter.take() {
                waiter.wake();
            }
        }
    }
}

/// The configuration and the shared budget of one client's endpoints.
struct Policy {
    service: Box<str>,
    consecutive_failures: u32,
    base_interval: Duration,
    max_interval: Duration,
    max_ejected_percent: usize,
    budget: Mutex<Budget>,
    next_id: AtomicU64,
}

impl Policy {
    /// How long the ejection that follows `previous` ejections (without a success) lasts.
    fn interval(&self, previous: u32) -> Duration {
        self.base_interval
            .saturating_mul(2u32.saturating_pow(previous))
            .min(self.max_interval)
    }
}

/// How many of a client's endpoints exist and how many are out. Every change goes through its
/// methods, which keep the exported gauges in step (by increments, since the channels of a
/// process to one target share the series).
struct Budget {
    members: usize,
    ejected: usize,
    /// Ejected endpoints waiting for their timer, woken early when the set shrinks.
    waiting: HashMap<u64, Waker>,
    metrics: EjectionMetrics,
}

impl Budget {
    fn new(metrics: EjectionMetrics) -> Self {
        Self {
            members: 0,
            ejected: 0,
            waiting: HashMap::new(),
            metrics,
        }
    }

    fn join(&mut self) {
        self.members += 1;
        self.metrics.endpoints.inc();
    }

    /// An ejected endpoint comes back (on probation).
    fn release(&mut self, id: u64) {
        if self.ejected > 0 {
            self.ejected -= 1;
            self.metrics.ejected.dec();
        }
        self.waiting.remove(&id);
    }

    fn limit(&self, percent: usize) -> usize {
        self.members.saturating_mul(percent) / 100
    }

    fn try_eject(&mut self, percent: usize) -> bool {
        let room = self.ejected < self.limit(percent);
        if room {
            self.ejected += 1;
            self.metrics.ejected.inc();
            self.metrics.ejections.inc();
        }
        room
    }

    fn over_budget(&self, percent: usize) -> bool {
        self.ejected > self.limit(percent)
    }

    fn leave(&mut self, id: u64, was_ejected: bool, percent: usize) {
        if self.members > 0 {
            self.members -= 1;
            self.metrics.endpoints.dec();
        }
        if was_ejected {
            self.release(id);
        }
        self.waiting.remove(&id);
        if self.over_budget(percent) {
            for (_, waker) in self.waiting.drain() {
                waker.wake();
            }
        }
    }
}

/// One endpoint's record, shared by the service and its calls in flight.
#[derive(Debug, Default)]
struct Health {
    state: State,
    /// Failures since the last success (or ejection).
    failures: u32,
    /// Ejections since the last success: the next interval doubles with each.
    ejections: u32,
    /// `poll_ready` waiting for the probe to come back.
    probe_waiter: Option<Waker>,
    /// The balancer let go of this endpoint: late outcomes eject nothing.
    removed: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Active,
    Ejected {
        until: Instant,
    },
    /// Back from an ejection; one call at a time decides.
    Probing {
        in_flight: bool,
    },
}

/// The state stays consistent whatever a panicking holder left, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use futures::FutureExt;
    use http::HeaderValue;
    use tower::ServiceExt;

    use super::*;
    use crate::retry::{NOT_PROCESSED_HEADER, NOT_PROCESSED_VALUE};

    /// An endpoint that fails (connection refused) while `down` is set, and answers OK otherwise.
    #[derive(Clone, Default)]
    struct Backend {
        down: Arc<AtomicBool>,
    }

    impl Service<()> for Backend {
        type Response = Response<()>;
        type Error = &'static str;
        type Future = futures::future::Ready<Result<Response<()>, &'static str>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: ()) -> Self::Future {
            futures::future::ready(if self.down.load(Ordering::SeqCst) {
                Err("connection refused")
            } else {
                Ok(Response::new(()))
            })
        }
    }

    fn config(consecutive_failures: u32) -> EjectionConfig {
        EjectionConfig {
            consecutive_failures,
            base_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(4),
            max_ejected_percent: 50,
        }
    }

    fn is_ready<S: Service<()>>(service: &mut S) -> bool {
        matches!(service.ready().now_or_never(), Some(Ok(_)),)
    }

    /// Makes calls (each when ready) until `n` have been made.
    async fn call_n<S: Service<()>>(service: &mut S, n: usize) {
        for _ in 0..n {
            if let Ok(ready) = service.ready().await {
                let _ = ready.call(()).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_a_doubling_interval_and_a_success_resets() {
        let layer = EjectionLayer::new(&config(3), "users");
        let backend = Backend::default();
        let mut endpoint = layer.layer(backend.clone());
        let _other = layer.layer(Backend::default());
        backend.down.store(true, Ordering::SeqCst);

        call_n(&mut endpoint, 2).await;
        assert!(is_ready(&mut endpoint), "two failures are not enough");
        call_n(&mut endpoint, 1).await;
        assert!(!is_ready(&mut endpoint), "the third ejects");

        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!is_ready(&mut endpoint));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(is_ready(&mut endpoint), "back for a probe after 1s");

        // The probe fails: out again, for twice as long.
        call_n(&mut endpoint, 1).await;
        assert!(!is_ready(&mut endpoint));
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!is_ready(&mut endpoint));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(is_ready(&mut endpoint));

        // 4s, then capped at 4s.
        call_n(&mut endpoint, 1).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(is_ready(&mut endpoint));
        call_n(&mut endpoint, 1).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(
            is_ready(&mut endpoint),
            "the interval stops growing at max_interval"
        );

        // A successful probe puts it back for good, and forgets the history.
        backend.down.store(false, Ordering::SeqCst);
        call_n(&mut endpoint, 1).await;
        assert!(is_ready(&mut endpoint));
        backend.down.store(true, Ordering::SeqCst);
        call_n(&mut endpoint, 3).await;
        assert!(!is_ready(&mut endpoint));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            is_ready(&mut endpoint),
            "the interval starts over at base_interval"
        );
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_connections_is_ejected_at_once() {
        // A port that nothing listens on any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap_or_else(|e| panic!("{e}"));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .connect_lazy();
        let layer = EjectionLayer::new(&config(5), "users");
        let mut endpoint = layer.layer(channel);
        let _others = [
            layer.layer(Backend::default()),
            layer.layer(Backend::default()),
        ];
        let mut request = http::Request::new(tonic::body::Body::empty());
        *request.uri_mut() = http::Uri::from_static("/meshwork.users.v1.UserService/GetUser");
        let refused = match endpoint.ready().await {
            Ok(ready) => ready.call(request).await,
            Err(error) => Err(error),
        };
        assert!(refused.is_err());
        assert!(
            endpoint.ready().now_or_never().is_none(),
            "one refused connection ejects"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_ejected_endpoint_is_woken_when_its_interval_ends() {
        let layer = EjectionLayer::new(&config(1), "users");
        let backend = Backend::default();
        let mut endpoint = layer.layer(backend.clone());
        let _others = [
            layer.layer(Backend::default()),
            layer.layer(Backend::default()),
        ];
        backend.down.store(true, Ordering::SeqCst);
        call_n(&mut endpoint, 1).await;
        let start = Instant::now();
        let ready = tokio::time::timeout(Duration::from_secs(5), endpoint.ready()).await;
        assert!(matches!(ready, Ok(Ok(_))));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_probe_at_a_time() {
        let layer = EjectionLayer::new(&config(1), "users");
        let mut endpoint = layer.layer(tower::service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, &'static str>(Response::new(()))
        }));
        let _other = layer.layer(Backend::default());
        // Eject it by hand through a failed call's outcome.
        Outcome {
            health: Arc::clone(&endpoint.health),
            policy: Arc::clone(&endpoint.policy),
            endpoint: Arc::from("test"),
            probe: false,
        }
        .record(true, false);
        assert!(!is_ready(&mut endpoint));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(is_ready(&mut endpoint));
        let probe = endpoint.call(());
        assert!(
            !is_ready(&mut endpoint),
            "a second call waits for the probe"
        );
        drop(probe);
        assert!(
            is_ready(&mut endpoint),
            "a cancelled probe lets another call probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_in_the_headers_is_a_failure_and_other_statuses_are_not() {
        let status = Arc::new(Mutex::new("14"));
        let answer = Arc::clone(&status);
        let layer = EjectionLayer::new(&config(2), "users");
        let mut endpoint = layer.layer(tower::service_fn(move |_: ()| {
            let mut response = Response::new(());
            let code = *lock(&answer);
            response
                .headers_mut()
                .insert(GRPC_STATUS, HeaderValue::from_static(code));
            async move { Ok::<_, &'static str>(response) }
        }));
        let _other = layer.layer(Backend::default());
        call_n(&mut endpoint, 1).await;
        *lock(&status) = "5"; // NOT_FOUND: the endpoint works, and resets the count
        call_n(&mut endpoint, 1).await;
        *lock(&status) = "14";
        call_n(&mut endpoint, 1).await;
        assert!(is_ready(&mut endpoint));
        call_n(&mut endpoint, 1).await;
        assert!(!is_ready(&mut endpoint));
    }

    #[tokio::test(start_paused = true)]
    async fn shed_calls_do_not_eject_a_busy_endpoint() {
        let layer = EjectionLayer::new(&config(2), "users");
        let mut endpoint = layer.layer(tower::service_fn(|_: ()| {
            let mut response = Response::new(());
            response
                .headers_mut()
                .insert(GRPC_STATUS, HeaderValue::from_static("14"));
            response.headers_mut().insert(
                NOT_PROCESSED_HEADER,
                HeaderValue::from_static(NOT_PROCESSED_VALUE),
            );
            async move { Ok::<_, &'static str>(response) }
        }));
        let _other = layer.layer(Backend::default());
        call_n(&mut endpoint, 10).await;
        assert!(is_ready(&mut endpoint), "ten sheds ejected the endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_budgeted_share_is_ejected_and_a_lone_endpoint_never() {
        let layer = EjectionLayer::new(&config(1), "users");
        let backends: Vec<Backend> = (0..3).map(|_| Backend::default()).collect();
        let mut endpoints: Vec<_> = backends.iter().map(|b| layer.layer(b.clone())).collect();
        for backend in &backends {
            backend.down.store(true, Ordering::SeqCst);
        }
        for endpoint in &mut endpoints {
            call_n(endpoint, 1).await;
        }
        let ready = endpoints
            .iter_mut()
            .map(is_ready)
            .filter(|ready| *ready)
            .count();
        assert_eq!(ready, 2, "50% of 3 endpoints is 1");

        let lone = EjectionLayer::new(&config(1), "users");
        let backend = Backend::default();
        backend.down.store(true, Ordering::SeqCst);
        let mut endpoint = lone.layer(backend);
        call_n(&mut endpoint, 10).await;
        assert!(is_ready(&mut endpoint));
    }

    #[tokio::test(start_paused = true)]
    async fn the_gauges_follow_the_endpoints_and_their_ejections() {
        let metrics = EjectionMetrics::default();
        let layer = EjectionLayer::observed(&config(1), "users", metrics.clone());
        let backend = Backend::default();
        let mut failing = layer.layer(backend.clone());
        let others = [
            layer.layer(Backend::default()),
            layer.layer(Backend::default()),
        ];
        assert_eq!(metrics.endpoints.get(), 3);

        backend.down.store(true, Ordering::SeqCst);
        call_n(&mut failing, 1).await;
        assert!(!is_ready(&mut failing));
        assert_eq!((metrics.ejected.get(), metrics.ejections.get()), (1, 1));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(is_ready(&mut failing), "back on probation");
        assert_eq!(metrics.ejected.get(), 0);

        call_n(&mut failing, 1).await;
        assert_eq!((metrics.ejected.get(), metrics.ejections.get()), (1, 2));
        drop(failing);
        assert_eq!((metrics.endpoints.get(), metrics.ejected.get()), (2, 0));
        drop(others);
        assert_eq!(metrics.endpoints.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_come_back_early_when_the_set_shrinks_under_them() {
        let layer = EjectionLayer::new(&config(1), "users");
        let backend = Backend::default();
        let mut ejected = layer.layer(backend.clone());
        let healthy = layer.layer(Backend::default());
        backend.down.store(true, Ordering::SeqCst);
        call_n(&mut ejected, 1).await;
        assert!(!is_ready(&mut ejected));

        let waiting = tokio::spawn(async move {
            let start = Instant::now();
            let _ = ejected.ready().await;
            start.elapsed()
        });
        tokio::task::yield_now().await;
        drop(healthy);
        let waited = waiting.await.ok();
        assert_eq!(
            waited,
            Some(Duration::ZERO),
            "let back without waiting out the interval"
        );
    }
}
