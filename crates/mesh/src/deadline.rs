//! Deadlines: every outgoing call has one. [`DeadlineLayer`] gives a call that carries no
//! `grpc-timeout` the configured default, sends it on as `grpc-timeout` so the server can stop
//! work nobody waits for, and fails the call with DEADLINE_EXCEEDED locally when it runs out.
//!
//! ```text
//! let channel = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Duration::from_secs(5)))
//!     .service(channel);
//! ```
//!
//! It also holds the `grpc-timeout` codec (the gRPC over HTTP/2 spec's `TimeoutValue TimeoutUnit`).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
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

/// Applies a default deadline to calls that carry none, and enforces every call's deadline.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            default: self.default,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    default: Duration,
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
        let timeout = match request.headers().get(GRPC_TIMEOUT).and_then(decode_timeout) {
            Some(timeout) => timeout,
            None => {
                request
                    .headers_mut()
                    .insert(GRPC_TIMEOUT, encode_timeout(self.default));
                self.default
            }
        };
        ResponseFuture {
            inner: self.inner.call(request),
            sleep: tokio::time::sleep(timeout),
            timeout,
        }
    }
}

pin_project! {
    /// The response future of [`Deadline`]: the call, raced against its deadline.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
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
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Box::new(tonic::Status::deadline_exceeded(
                format!("deadline of {:?} exceeded", this.timeout),
            )))),
            Poll::Pending => Poll::Pending,
        }
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
            Ok::<_, BoxError>(request.headers().get(GRPC_TIMEOUT).cloned())
        });
        let mut service = DeadlineLayer::new(Duration::from_secs(1)).layer(echo);
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, HeaderValue::from_static("250m"));
        let sent = service.call(request).await.ok().flatten();
        assert_eq!(sent, Some(HeaderValue::from_static("250m")));
    }
}
