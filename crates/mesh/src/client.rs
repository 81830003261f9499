//! The one client builder: a channel to a downstream service, built from its [`ClientConfig`],
//! through the mesh client stack, outermost first:
//!
//! 1. deadline: a default per call, sent on as `grpc-timeout` ([`crate::deadline`]);
//! 2. balancing: power of two choices over PeakEWMA latency across the endpoints;
//! 3. per endpoint: a lazily (re)connecting HTTP/2 channel with a connect timeout, over
//!    mutual TLS that checks the server is the service we meant ([`crate::transport`]).
//!
//! Every generated client in the mesh is an `XClient<MeshChannel>`. Connections are made
//! lazily, so a service starts even when its downstream is not up yet; a call made while it is
//! unreachable fails UNAVAILABLE (or DEADLINE_EXCEEDED), never hangs.

use std::{
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{
    BoxError, Service, ServiceBuilder, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::ServiceList,
    load::{CompleteOnResponse, PeakEwma},
    util::BoxCloneSyncService,
};

use crate::{
    config::ClientConfig, deadline::DeadlineLayer, tls::MeshTls, transport::MeshConnector,
};

/// The stack every mesh client sends through. A named type (not a bare boxed service) so that
/// generated clients' futures stay provably `Send` inside async handlers.
#[derive(Clone)]
pub struct MeshChannel {
    inner: BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>,
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel").finish_non_exhaustive()
    }
}

/// The response future of [`MeshChannel`].
pub struct ResponseFuture {
    inner: futures::future::BoxFuture<'static, Result<Response<Body>, BoxError>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<Request<Body>> for MeshChannel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        ResponseFuture {
            inner: Box::pin(self.inner.call(request)),
        }
    }
}

/// What PeakEWMA assumes of an endpoint before it has measured one response.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How quickly PeakEWMA forgets a latency peak.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Calls waiting for the balancer; beyond this, callers wait for room (backpressure).
const BALANCER_QUEUE: usize = 1024;

/// Why a channel could not be built (only ever bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint `{endpoint}`: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("no endpoints configured")]
    NoEndpoints,
}

/// Builds the mutual-TLS channel to `service` (its name in the mesh: `users`, `billing`...).
/// Must be called inside a tokio runtime.
pub fn connect(
    config: &ClientConfig,
    tls: &MeshTls,
    service: &str,
) -> Result<MeshChannel, ClientError> {
    let connector = MeshConnector::new(tls.clone(), service);
    let channels = endpoints(config)?
        .into_iter()
        .map(|endpoint| endpoint.connect_with_connector_lazy(connector.clone()))
        .collect();
    stack(channels, config)
}

/// A plaintext channel: only for callers outside the mesh's mutual TLS (none in production).
pub fn channel(config: &ClientConfig) -> Result<MeshChannel, ClientError> {
    let channels = endpoints(config)?
        .into_iter()
        .map(|endpoint| endpoint.connect_lazy())
        .collect();
    stack(channels, config)
}

/// The configured endpoints. TLS is the connector's job, so tonic always sees `http://`.
fn endpoints(config: &ClientConfig) -> Result<Vec<Endpoint>, ClientError> {
    if config.endpoints.is_empty() {
        return Err(ClientError::NoEndpoints);
    }
    config
        .endpoints
        .iter()
        .map(|uri| {
            let plain = uri
                .strip_prefix("https://")
                .map_or_else(|| uri.clone(), |rest| format!("http://{rest}"));
            Endpoint::from_shared(plain)
                .map(|endpoint| {
                    endpoint
                        .connect_timeout(config.connect_timeout)
                        .tcp_nodelay(true)
                })
                .map_err(|source| ClientError::Endpoint {
                    endpoint: uri.clone(),
                    source,
                })
        })
        .collect()
}

fn stack(channels: Vec<Channel>, config: &ClientConfig) -> Result<MeshChannel, ClientError> {
    let loads = channels.into_iter().map(|channel| {
        PeakEwma::new(
            channel,
            DEFAULT_RTT,
            EWMA_DECAY.as_secs_f64() * 1e9,
            CompleteOnResponse::default(),
        )
    });
    let balancer = Buffer::new(Balance::new(ServiceList::new(loads)), BALANCER_QUEUE);
    let inner = ServiceBuilder::new()
        .layer(BoxCloneSyncService::layer())
        .layer(DeadlineLayer::new(config.default_deadline))
        .service(balancer.map_err(Into::<BoxError>::into));
    Ok(MeshChannel { inner })
}
