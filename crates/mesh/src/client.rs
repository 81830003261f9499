//! The one client builder: a channel to a downstream service, built from its [`ClientConfig`],
//! through the mesh client stack, outermost first:
//!
//! 1. tracing: a client span, its context sent on as `traceparent` ([`crate::trace`]);
//! 2. metrics: calls by method and status code, and their duration, retries included
//!    ([`crate::metrics`], like the retry and ejection counters below, in the process's
//!    [`crate::metrics::global`] registry under `target` = the service's name);
//! 3. deadline: a default per call, never more than what is left of the call being served, sent
//!    on as `grpc-timeout` ([`crate::deadline`]);
//! 4. retries where safe, within a budget, with jittered backoff ([`crate::retry`]);
//! 5. balancing: power of two choices over PeakEWMA latency across the endpoints that discovery
//!    reports ([`crate::discovery`]), which join and leave while the client runs;
//! 6. per endpoint: outlier ejection ([`crate::eject`]), and one lazily (re)connecting HTTP/2
//!    connection with a connect timeout, over mutual TLS that checks the server is the service
//!    we meant ([`crate::transport`]).
//!
//! Every generated client in the mesh is an `XClient<MeshChannel>`. Connections are made
//! lazily, so a service starts even when its downstream is not up yet; a call made while it is
//! unreachable fails UNAVAILABLE (or DEADLINE_EXCEEDED), never hangs.

use std::{
    convert::Infallible,
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use futures::StreamExt;
use http::{Request, Response};
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{
    BoxError, Layer, Service, ServiceBuilder, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    load::{CompleteOnResponse, PeakEwma},
    util::BoxCloneSyncService,
};

use crate::{
    config::ClientConfig,
    deadline::{DeadlineLayer, MethodDeadlines},
    discovery::{self, Address, Discovery, DiscoveryError},
    eject::{Eject, EjectionLayer},
    metrics,
    retry::RetryLayer,
    tls::MeshTls,
    trace::ClientTraceLayer,
    transport::MeshConnector,
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
/// What the logs of a plaintext channel name its service.
const PLAINTEXT: &str = "plaintext";
/// Calls waiting for the balancer; beyond this, callers wait for room (backpressure).
const BALANCER_QUEUE: usize = 1024;

/// Why a channel could not be built (only ever bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Builds the mutual-TLS channel to `service` (its name in the mesh: `users`, `billing`...),
/// finding its replicas with the static and DNS sources named by `config.endpoints`.
/// Must be called inside a tokio runtime.
pub fn connect(
    config: &ClientConfig,
    tls: &MeshTls,
    service: &str,
) -> Result<MeshChannel, ClientError> {
    let discovery = Discovery::from_config(config)?;
    connect_discovered(config, tls, service, discovery)
}

/// Builds the mutual-TLS channel to `service` over the replicas `discovery` reports (tests pass
/// [`Discovery::in_process`]); `config.endpoints` is not read. Must be called inside a tokio
/// runtime.
pub fn connect_discovered(
    config: &ClientConfig,
    tls: &MeshTls,
    service: &str,
    discovery: Discovery,
) -> Result<MeshChannel, ClientError> {
    // One connector for every endpoint: for an IP address too, TLS names (and checks) the
    // service, not the address.
    let connector =
        MeshConnector::new(tls.clone(), service).with_connect_timeout(config.connect_timeout);
    stack(config, service, discovery, move |endpoint| {
        endpoint.connect_with_connector_lazy(connector.clone())
    })
}

/// A plaintext channel: only for callers outside the mesh's mutual TLS (none in production).
pub fn channel(config: &ClientConfig) -> Result<MeshChannel, ClientError> {
    let discovery = Discovery::from_config(config)?;
    stack(config, PLAINTEXT, discovery, |endpoint| {
        endpoint.connect_lazy()
    })
}

/// One endpoint as the balancer sees it.
type EndpointService = PeakEwma<Eject<Channel>, CompleteOnResponse>;

/// The whole client stack, in the order of the module doc.
fn stack(
    config: &ClientConfig,
    service: &str,
    discovery: Discovery,
    connect: impl Fn(Endpoint) -> Channel + Send + 'static,
) -> Result<MeshChannel, ClientError> {
    let metrics = metrics::global().target(service);
    // One retry layer (so one budget) per downstream service.
    let retry = RetryLayer::observed(&config.retry, metrics.retry())?;
    let service_name = service.to_owned();
    let ejection = EjectionLayer::observed(&config.ejection, service, metrics.ejection());
    let connect_timeout = config.connect_timeout;
    let service = service.to_owned();
    let endpoints = discovery.filter_map(move |change| {
        match &change {
            discovery::Change::Insert(address) => {
                tracing::info!(%service, endpoint = %address, "endpoint joined");
            }
            discovery::Change::Remove(address) => {
                tracing::info!(%service, endpoint = %address, "endpoint left");
            }
        }
        let change = match change {
            discovery::Change::Insert(address) => {
                endpoint(&address, connect_timeout).map(|endpoint| {
                    let channel = connect(endpoint);
                    let service = per_endpoint(&ejection, &address, channel);
                    tower::discover::Change::Insert(address, service)
                })
            }
            discovery::Change::Remove(address) => Some(tower::discover::Change::Remove(address)),
        };
        futures::future::ready(change.map(Ok::<_, Infallible>))
    });
    let balancer = Buffer::new(Balance::new(Box::pin(endpoints)), BALANCER_QUEUE);
    let inner = ServiceBuilder::new()
        .layer(BoxCloneSyncService::layer())
        .layer(ClientTraceLayer::new(&service_name))
        .layer(metrics.layer())
        .layer(DeadlineLayer::per_method(MethodDeadlines {
            default: config.default_deadline,
            methods: config
                .method_deadlines
                .iter()
                .map(|(method, deadline)| (method.clone(), **deadline))
                .collect(),
        }))
        // Inside the deadline (every attempt shares it), outside the balancer (each attempt is
        // balanced afresh, so it can land on another endpoint).
        .layer(retry)
        .service(balancer.map_err(Into::<BoxError>::into));
    Ok(MeshChannel { inner })
}

/// The per-endpoint stack: the load the balancer compares, over ejection, over the connection.
fn per_endpoint(ejection: &EjectionLayer, address: &Address, channel: Channel) -> EndpointService {
    PeakEwma::new(
        ejection.for_endpoint(address).layer(channel),
        DEFAULT_RTT,
        EWMA_DECAY.as_secs_f64() * 1e9,
        CompleteOnResponse::default(),
    )
}

/// The tonic endpoint for `address`. TLS is the connector's job, so tonic always sees `http://`.
fn endpoint(address: &Address, connect_timeout: Duration) -> Option<Endpoint> {
    match Endpoint::from_shared(format!("http://{address}")) {
        // The mesh connector bounds connecting itself (see `MeshConnector::with_connect_timeout`);
        // tonic's own timeout only covers the plaintext channel.
        Ok(endpoint) => Some(endpoint.connect_timeout(connect_timeout).tcp_nodelay(true)),
        Err(error) => {
            // Discovery only reports addresses it parsed: this is a bug, not an outage.
            tracing::error!(%address, %error, "endpoint not usable; skipped");
            None
        }
    }
}
