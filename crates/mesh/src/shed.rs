//! Admission control on the server: a concurrency limit that sheds instead of queueing.
//!
//! [`ShedLayer`] lets at most `max_concurrent_calls` calls be inside the handlers at once,
//! across every connection of a server. A call beyond the limit is answered at once, without
//! reaching its handler, with UNAVAILABLE and the response header
//! [`NOT_PROCESSED_HEADER`]` = true` ([`not_processed`]): the caller's retry policy knows such a
//! call is safe to send to another replica, and a full replica says so in microseconds instead
//! of letting callers queue behind work it cannot do. Once the server drains
//! ([`ShedLayer::start_draining`]) every new call is refused the same way, so a call that reaches
//! a closing server before its GOAWAY does is retried elsewhere rather than started.
//!
//! [`NOT_PROCESSED_HEADER`]: crate::retry::NOT_PROCESSED_HEADER
//!
//! It is not a rate limiter, and it does not queue: a queue in front of a saturated server only
//! turns overload into latency, and the mesh's clients have other replicas to try.
//!
//! ```text
//! let shed = ShedLayer::new(config.max_concurrent_calls);
//! Server::builder().layer(shed.clone()).add_routes(routes);
//! shed.start_draining(); // on shutdown
//! ```
//!
//! - A permit is held until the handler's response future resolves. For a unary call that is
//!   the whole call; for a server stream (WatchOrder, health Watch) it is until the response
//!   headers, so a long stream does not pin a permit — streams are bounded per connection by
//!   HTTP/2 `max_concurrent_streams` instead.
//! - Health and reflection ([`NEVER_SHED`]) are never shed and take no permit: probes must keep
//!   answering on an overloaded server (they are cheap, and only mesh identities reach them).
//! - It counts the calls it admitted and refused ([`ShedLayer::counts`]), which the server logs
//!   periodically, and exports the refusals by reason (`meshwork_server_shed_total`, when made
//!   with [`ShedLayer::observed`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tower::{Layer, Service};

use crate::{metrics::ShedMetrics, retry::not_processed};

/// Services exempt from shedding: health and reflection.
pub const NEVER_SHED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

const OVERLOADED: &str = "overloaded, try another replica";
const DRAINING: &str = "shutting down, try another replica";

/// How many calls a [`ShedLayer`] admitted to the handlers and refused, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub admitted: u64,
    pub refused: u64,
}

impl CallCounts {
    /// The calls counted since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            admitted: self.admitted.saturating_sub(earlier.admitted),
            refused: self.refused.saturating_sub(earlier.refused),
        }
    }
}

/// The concurrency limit and its shedding: see the module documentation. Clones share one
/// limit, one drain switch and one set of counters.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    admitted: AtomicU64,
    refused: AtomicU64,
    metrics: ShedMetrics,
}

impl ShedLayer {
    /// At most `max_concurrent_calls` calls in the handlers at once (at least one, and no more
    /// than a tokio semaphore can count).
    pub fn new(max_concurrent_calls: usize) -> Self {
        Self::observed(max_concurrent_calls, ShedMetrics::default())
    }

    /// The same, counting its refusals into `metrics`.
    pub fn observed(max_concurrent_calls: usize, metrics: ShedMetrics) -> Self {
        let permits = max_concurrent_calls.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(permits)),
                draining: AtomicBool::new(false),
                admitted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// From now on, every new call (but health and reflection) is refused as not processed;
    /// calls already admitted carry on.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Calls admitted and refused so far.
    pub fn counts(&self) -> CallCounts {
        CallCounts {
            admitted: self.shared.admitted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn never_shed(path: &str) -> bool {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    NEVER_SHED.contains(&service)
}

impl<S, B, ResBody> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never waits for a permit here: waiting is the queueing this layer exists to avoid.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if never_shed(request.uri().path()) {
            return ResponseFuture::admitted(self.inner.call(request), None);
        }
        let metrics = &self.shared.metrics;
        let permit = if self.shared.draining.load(Ordering::SeqCst) {
            Err((DRAINING, &metrics.draining))
        } else {
            self.shared
                .permits
                .clone()
                .try_acquire_owned()
                .map_err(|_| (OVERLOADED, &metrics.overloaded))
        };
        match permit {
            Ok(permit) => {
                self.shared.admitted.fetch_add(1, Ordering::Relaxed);
                ResponseFuture::admitted(self.inner.call(request), Some(permit))
            }
            Err((reason, refusals)) => {
                self.shared.refused.fetch_add(1, Ordering::Relaxed);
                refusals.inc();
                tracing::debug!(method = request.uri().path(), reason, "call refused");
                ResponseFuture::refused(not_processed(reason))
            }
        }
    }
}

pin_project! {
    /// The response future of [`Shed`]: the handler's, holding its permit until it resolves,
    /// or an immediate refusal.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Admitted {
            #[pin]
            inner: F,
            permit: Option<OwnedSemaphorePermit>,
        },
        Refused {
            status: Option<Status>,
        },
    }
}

impl<F> ResponseFuture<F> {
    fn admitted(inner: F, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            kind: Kind::Admitted { inner, permit },
        }
    }

    fn refused(status: Status) -> Self {
        Self {
            kind: Kind::Refused {
                status: Some(status),
            },
        }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Admitted { inner, permit } => {
                let result = ready!(inner.poll(cx));
                // Released at the response head: a stream's body does not hold it.
                drop(permit.take());
                Poll::Ready(result)
            }
            KindProj::Refused { status } => {
                let status = status
                    .take()
                    .unwrap_or_else(|| Status::internal("shed response polled after completion"));
                Poll::Ready(Ok(status.into_http()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, time::Duration};

    use tower::ServiceExt;

    use super::*;
    use crate::retry::{NOT_PROCESSED_HEADER, NOT_PROCESSED_VALUE};

    const GET_USER: &str = "/meshwork.users.v1.UserService/GetUser";
    const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
    const HANDLER_TIME: Duration = Duration::from_secs(1);

    /// A handler that takes [`HANDLER_TIME`] and answers with an empty body.
    fn slow_handler() -> impl Service<
        Request<()>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<String>, Infallible>> + Send,
    > + Clone {
        tower::service_fn(|_: Request<()>| async {
            tokio::time::sleep(HANDLER_TIME).await;
            Ok::<_, Infallible>(Response::new("handled".to_owned()))
        })
    }

    fn request(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap_or_default()
    }

    fn grpc_status(response: &Response<String>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    fn marked_not_processed(response: &Response<String>) -> bool {
        response
            .headers()
            .get(NOT_PROCESSED_HEADER)
            .is_some_and(|v| v == NOT_PROCESSED_VALUE)
    }

    const UNAVAILABLE: &str = "14";

    #[tokio::test(start_paused = true)]
    async fn a_call_beyond_the_limit_is_refused_at_once_without_reaching_the_handler() {
        let layer = ShedLayer::new(1);
        let reached = Arc::new(AtomicU64::new(0));
        let handler = {
            let reached = reached.clone();
            tower::service_fn(move |_: Request<()>| {
                reached.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(HANDLER_TIME).await;
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            })
        };
        let service = layer.layer(handler);
        let first = service.clone().oneshot(request(GET_USER));
        let mut first = tokio::spawn(first);
        tokio::task::yield_now().await;

        let started = tokio::time::Instant::now();
        let second = service.clone().oneshot(request(GET_USER)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        let Ok(second) = second;
        assert_eq!(grpc_status(&second), Some(UNAVAILABLE));
        assert!(marked_not_processed(&second));
        assert_eq!(reached.load(Ordering::SeqCst), 1);

        assert!(matches!((&mut first).await, Ok(Ok(_))));
        assert_eq!(
            layer.counts(),
            CallCounts {
                admitted: 1,
                refused: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_permit_returns_when_the_response_resolves() {
        let layer = ShedLayer::new(1);
        let service = layer.layer(slow_handler());
        let first = service.clone().oneshot(request(GET_USER)).await;
        assert!(first.is_ok_and(|r| grpc_status(&r).is_none()));
        let second = service.clone().oneshot(request(GET_USER)).await;
        assert!(second.is_ok_and(|r| r.body() == "handled"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_call_returns_its_permit() {
        let layer = ShedLayer::new(1);
        let service = layer.layer(slow_handler());
        let abandoned =
            tokio::time::timeout(HANDLER_TIME / 2, service.clone().oneshot(request(GET_USER)))
                .await;
        assert!(abandoned.is_err());
        let next = service.clone().oneshot(request(GET_USER)).await;
        assert!(next.is_ok_and(|r| r.body() == "handled"));
    }

    #[tokio::test(start_paused = true)]
    async fn health_is_answered_on_a_full_server() {
        let layer = ShedLayer::new(1);
        let service = layer.layer(slow_handler());
        let _busy = tokio::spawn(service.clone().oneshot(request(GET_USER)));
        tokio::task::yield_now().await;
        let health = service.clone().oneshot(request(HEALTH_CHECK)).await;
        assert!(health.is_ok_and(|r| r.body() == "handled"));
        assert_eq!(layer.counts().refused, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_server_refuses_new_calls_but_finishes_admitted_ones() {
        let layer = ShedLayer::new(8);
        let service = layer.layer(slow_handler());
        let in_flight = tokio::spawn(service.clone().oneshot(request(GET_USER)));
        tokio::task::yield_now().await;
        layer.start_draining();

        let Ok(refused) = service.clone().oneshot(request(GET_USER)).await;
        assert_eq!(grpc_status(&refused), Some(UNAVAILABLE));
        assert!(marked_not_processed(&refused));
        let health = service.clone().oneshot(request(HEALTH_CHECK)).await;
        assert!(health.is_ok_and(|r| r.body() == "handled"));
        assert!(matches!(in_flight.await, Ok(Ok(r)) if r.body() == "handled"));
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_exported_by_reason() {
        let metrics = ShedMetrics::default();
        let layer = ShedLayer::observed(1, metrics.clone());
        let service = layer.layer(slow_handler());
        let _busy = tokio::spawn(service.clone().oneshot(request(GET_USER)));
        tokio::task::yield_now().await;
        let _ = service.clone().oneshot(request(GET_USER)).await;
        layer.start_draining();
        let _ = service.clone().oneshot(request(GET_USER)).await;
        let _ = service.clone().oneshot(request(GET_USER)).await;
        assert_eq!((metrics.overloaded.get(), metrics.draining.get()), (1, 2));
    }

    #[test]
    fn counts_subtract_an_earlier_reading() {
        let earlier = CallCounts {
            admitted: 3,
            refused: 1,
        };
        let now = CallCounts {
            admitted: 10,
            refused: 1,
        };
        assert_eq!(
            now.since(earlier),
            CallCounts {
                admitted: 7,
                refused: 0
            }
        );
    }
}
