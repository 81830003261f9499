//! The one server builder. Every service binds a [`MeshServer`] and serves its routes through
//! it, and gets the same behaviour:
//!
//! - `grpc.health.v1`: NOT_SERVING until the service's readiness check (its database) passes,
//!   re-checked periodically, and NOT_SERVING again as soon as shutdown begins;
//! - gRPC reflection, both `v1` and `v1alpha` (grpcurl 1.8 speaks only v1alpha);
//! - `grpc-timeout` honoured, capped by `max_call_duration`: the handler runs in its deadline's
//!   scope and is stopped with DEADLINE_EXCEEDED when it passes ([`crate::deadline`]);
//! - a concurrency limit that sheds instead of queueing (`max_concurrent_calls`, see
//!   [`crate::shed`]), and per connection HTTP/2 `max_concurrent_streams` and keepalive PINGs;
//! - graceful shutdown (drain), in this order on the signal: new calls are refused as not
//!   processed (UNAVAILABLE + [`crate::retry::NOT_PROCESSED_HEADER`], so callers retry
//!   elsewhere), health turns NOT_SERVING, the listener closes (new connections are refused),
//!   every connection gets an HTTP/2 GOAWAY, and in-flight calls get `drain_timeout` to finish;
//!   then `serve` returns, even if some are still running (a long-lived server stream holds its
//!   connection, hence the drain, until it ends: a service ends its streams on shutdown, as
//!   orders' WatchOrder does);
//! - metrics of every call (requests by method and code, latency, calls in flight, shedding:
//!   [`crate::metrics`]), outermost but for tracing;
//! - an admin port, when configured ([`MeshServer::with_admin`]), in plaintext for the kubelet
//!   (which has no mesh certificate): `grpc.health.v1` over HTTP/2 for its gRPC probes, and over
//!   HTTP/1.1 `GET /metrics` (Prometheus text, or OpenMetrics when the scraper's `Accept` asks
//!   for it, of the process's [`crate::metrics::global`] registry) and `GET /healthz` (200 while
//!   SERVING, 503 otherwise);
//! - a line at INFO every [`CALL_REPORT_INTERVAL`] in which calls were served ("served N calls
//!   in the last 10s"), to see load spread across replicas in the logs alone.
//!
//! Why refuse calls during drain when GOAWAY exists: HTTP/2's graceful GOAWAY first announces
//! the last stream id as 2^31-1 and only narrows it one round trip later, so calls the client
//! sends in that window are accepted by the transport. Started, they would lengthen the drain and
//! be cut by the exit if they outlast it; refused as not processed, they are safely retried on
//! another replica.
//!
//! ```text
//! let server = MeshServer::bind(&config.server).await?;
//! let addr = server.local_addr();
//! server.serve(Routes::new(svc), &[UserServiceServer::<Svc>::NAME], readiness, shutdown).await?;
//! ```
//! The request size limit is set on each generated server (`max_decoding_message_size`), from
//! [`ServerConfig::max_message_bytes`], since only the codec knows a message's size.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{response::IntoResponse, routing::get};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest,
        health_check_response::ServingStatus as CheckedStatus,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{
    authz::AuthzLayer,
    config::{AdminConfig, ServerConfig},
    deadline::InboundDeadlineLayer,
    metrics::{self, Format, Metrics},
    shed::{CallCounts, ShedLayer},
    tls::MeshTls,
    trace::ServerTraceLayer,
    transport::{TlsConnection, tls_incoming},
};

type ServeFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// How often readiness is re-checked while NOT_SERVING, and while SERVING.
const READINESS_RETRY: Duration = Duration::from_millis(250);
const READINESS_RECHECK: Duration = Duration::from_secs(5);
/// Interval and timeout of HTTP/2 PINGs that detect dead peers on idle connections.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the number of calls served is logged (when it is not zero): often enough to watch
/// load move between replicas, rarely enough not to flood the log.
pub const CALL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// A check that the service can do its work (typically: its database answers).
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, gRPC listener.
pub struct MeshServer {
    config: ServerConfig,
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<MeshTls>,
    authz: Option<AuthzLayer>,
    admin: Option<(TcpListener, SocketAddr)>,
}

impl MeshServer {
    /// Binds the configured address (port 0 picks a free port, which [`Self::local_addr`] tells).
    pub async fn bind(config: &ServerConfig) -> Result<Self, ServerError> {
        let addr = config.listen_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            config: config.clone(),
            listener,
            local_addr,
            tls: None,
            authz: None,
            admin: None,
        })
    }

    /// Also serves health and metrics, in plaintext, on the admin address (if `admin` has one):
    /// see the module documentation.
    pub async fn with_admin(mut self, admin: &AdminConfig) -> Result<Self, ServerError> {
        if let Some(addr) = admin.listen_addr {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let local = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            self.admin = Some((listener, local));
        }
        Ok(self)
    }

    /// Where the admin port listens, if it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    /// A service's server as every service builds it: the mesh port (mutual TLS with `tls`,
    /// behind `authz`) and the admin port when `admin` names one.
    pub async fn bind_mesh(
        server: &ServerConfig,
        admin: &AdminConfig,
        tls: MeshTls,
        authz: AuthzLayer,
    ) -> Result<Self, ServerError> {
        Ok(Self::bind(server)
            .await?
            .with_admin(admin)
            .await?
            .with_tls(tls)
            .with_authz(authz))
    }

    /// Serves mutual TLS only, with `tls` (reloaded from its files while serving).
    pub fn with_tls(mut self, tls: MeshTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Puts the authorization layer in front of every service.
    pub fn with_authz(mut self, authz: AuthzLayer) -> Self {
        self.authz = Some(authz);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `routes` plus health and reflection until `shutdown` resolves, then drains.
    /// `services` are the fully-qualified names health reports on (besides the empty name,
    /// which stands for the whole server).
    pub async fn serve(
        self,
        routes: Routes,
        services: &[&'static str],
        readiness: Readiness,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let names: Vec<&'static str> = std::iter::once("")
            .chain(services.iter().copied())
            .collect();
        set_all(&reporter, &names, ServingStatus::NotServing).await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshwork::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshwork::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(watch_readiness(
            reporter.clone(),
            names.clone(),
            readiness,
            stop_rx.clone(),
        ));
        let stop_watcher = watcher.abort_handle();

        let metrics = metrics::global();
        let shed = ShedLayer::observed(self.config.max_concurrent_calls, metrics.shed());
        let mut background = vec![tokio::spawn(report_calls(shed.clone()))];
        if let Some((listener, addr)) = self.admin {
            tracing::info!(%addr, "serving health and metrics on the plaintext admin port");
            // HTTP/1.1 as well as HTTP/2: probes and scrapers speak the former, gRPC the latter.
            let admin = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(admin_routes(&reporter, metrics.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener));
            background.push(tokio::spawn(async move {
                if let Err(error) = admin.await {
                    tracing::error!(%error, "admin port failed");
                }
            }));
        }

        // Outermost first, as DESIGN.md orders the server side: (TLS and peer identity are the
        // incoming connections') -> tracing -> metrics -> authorization -> deadline ->
        // concurrency limit and shedding -> handler. Metrics sit outside authorization and
        // shedding so that refused calls are counted with their codes. tonic's own `timeout`,
        // around all of them, is a backstop that answers CANCELLED; the deadline layer answers
        // DEADLINE_EXCEEDED just before it.
        let router = tonic::transport::Server::builder()
            .layer(ServerTraceLayer::new())
            .layer(metrics.server_layer())
            .layer(tower::util::option_layer(self.authz))
            .layer(InboundDeadlineLayer::new(self.config.max_call_duration))
            .layer(shed.clone())
            .timeout(self.config.max_call_duration)
            .max_concurrent_streams(Some(self.config.max_concurrent_streams))
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .tcp_nodelay(true)
            .add_routes(routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        // With TLS the listener belongs to the acceptor task: stopping it closes the port.
        let (incoming, acceptor) = match self.tls {
            Some(tls) => {
                tracing::info!(addr = %self.local_addr, identity = %tls.identity(), "serving gRPC over mutual TLS");
                background.push(tls.watch());
                let (incoming, acceptor) = tls_incoming(self.listener, tls);
                (Incoming::Tls(incoming), Some(acceptor))
            }
            None => {
                tracing::info!(addr = %self.local_addr, "serving plaintext gRPC");
                (Incoming::Plain(TcpListenerStream::new(self.listener)), None)
            }
        };
        let stop_accepting = acceptor.as_ref().map(|task| task.abort_handle());
        background.extend(acceptor);

        let drain_timeout = self.config.drain_timeout;
        // Resolving hands over to tonic, which stops accepting and sends every connection GOAWAY.
        let graceful = {
            let reporter = reporter.clone();
            let names = names.clone();
            async move {
                shutdown.await;
                shed.start_draining();
                let _ = stop_tx.send(true);
                // Once the watcher has stopped, nothing can set SERVING again.
                let _ = watcher.await;
                set_all(&reporter, &names, ServingStatus::NotServing).await;
                if let Some(acceptor) = stop_accepting {
                    acceptor.abort();
                }
                tracing::info!(?drain_timeout, "draining in-flight calls");
            }
        };
        let serving: ServeFuture = match incoming {
            Incoming::Tls(incoming) => {
                Box::pin(router.serve_with_incoming_shutdown(incoming, graceful))
            }
            Incoming::Plain(incoming) => {
                Box::pin(router.serve_with_incoming_shutdown(incoming, graceful))
            }
        };

        // Serving ends when drained; a call still running `drain_timeout` after the signal is
        // abandoned so that the process always exits.
        let mut stopped = stop_rx;
        let deadline = async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(drain_timeout).await;
        };
        let result = tokio::select! {
            result = serving => result.map_err(ServerError::from),
            () = deadline => {
                tracing::warn!("drain timeout reached with calls still in flight");
                Ok(())
            }
        };
        stop_watcher.abort();
        for task in background {
            task.abort();
        }
        result
    }
}

/// The admin port's routes: gRPC health, `/healthz` and `/metrics`.
fn admin_routes(reporter: &HealthReporter, metrics: Metrics) -> Routes {
    let health = Arc::new(HealthService::from_health_reporter(reporter.clone()));
    let healthz = move || {
        let health = Arc::clone(&health);
        async move { healthz(&health).await }
    };
    let scrape = move |headers: http::HeaderMap| {
        let accept = headers
            .get(http::header::ACCEPT)
            .and_then(|value| value.to_str().ok());
        let format = Format::from_accept(accept);
        let text = metrics.render(format);
        std::future::ready(([(http::header::CONTENT_TYPE, format.content_type())], text))
    };
    let router = Routes::new(HealthServer::new(HealthService::from_health_reporter(
        reporter.clone(),
    )))
    .into_axum_router()
    .route("/healthz", get(healthz))
    .route("/metrics", get(scrape));
    Routes::from(router)
}

/// What the whole server's health (the empty service name) says, as HTTP.
async fn healthz(health: &HealthService) -> impl IntoResponse + use<> {
    let request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    let serving = health
        .check(request)
        .await
        .is_ok_and(|response| response.get_ref().status == CheckedStatus::Serving as i32);
    if serving {
        (http::StatusCode::OK, "SERVING\n")
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}

async fn set_all(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Keeps health in step with readiness until shutdown begins; returns promptly once it has.
async fn watch_readiness(
    reporter: HealthReporter,
    names: Vec<&'static str>,
    readiness: Readiness,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving = false;
    loop {
        let ready = tokio::select! {
            ready = readiness() => ready,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        if ready != serving {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(?status, "health changed");
            set_all(&reporter, &names, status).await;
            serving = ready;
        }
        let pause = if serving {
            READINESS_RECHECK
        } else {
            READINESS_RETRY
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Where connections come from: the mutual-TLS acceptor, or (outside the mesh) plain TCP.
enum Incoming {
    Tls(ReceiverStream<Result<TlsConnection, std::io::Error>>),
    Plain(TcpListenerStream),
}

/// Logs, every [`CALL_REPORT_INTERVAL`] in which there were any, how many calls this server
/// served and refused. Health and reflection are not counted (probes would drown the signal).
async fn report_calls(shed: ShedLayer) {
    let mut ticks = tokio::time::interval(CALL_REPORT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate.
    ticks.tick().await;
    let mut last = shed.counts();
    loop {
        ticks.tick().await;
        let now = shed.counts();
        let calls = now.since(last);
        if calls != CallCounts::default() {
            let seconds = CALL_REPORT_INTERVAL.as_secs();
            tracing::info!(
                served = calls.admitted,
                refused = calls.refused,
                "served {} calls in the last {seconds}s (refused {})",
                calls.admitted,
                calls.refused,
            );
        }
        last = now;
    }
}

/// Readiness that is always true, for servers without dependencies.
pub fn always_ready() -> Readiness {
    Arc::new(|| Box::pin(async { true }))
}

/// Readiness of a service backed by `pool`: the database answers. While the readiness is held
/// (by the server, while it serves), the pool's connections are exported as metrics.
pub fn database_ready(pool: sqlx::AnyPool) -> Readiness {
    let watch = metrics::global().watch_pool(pool.clone());
    Arc::new(move || {
        let _exported = &watch;
        let pool = pool.clone();
        Box::pin(async move { crate::store::ping(&pool).await })
    })
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        io::Write,
        sync::{Arc, Mutex},
    };

    use http::{Request, Response};
    use tower::{Layer, ServiceExt};

    use super::*;

    /// Log lines written by the subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut captured) = self.0.lock() {
                captured.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines_containing(&self, needle: &str) -> Vec<String> {
            let captured = self.0.lock().map(|c| c.clone()).unwrap_or_default();
            String::from_utf8_lossy(&captured)
                .lines()
                .filter(|line| line.contains(needle))
                .map(str::to_owned)
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_served_are_logged_once_per_interval_and_only_when_there_were_some() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);

        let shed = ShedLayer::new(4);
        let service = shed.layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
        let reporter = tokio::spawn(report_calls(shed.clone()));
        // Let the reporter take its first reading.
        tokio::task::yield_now().await;
        for _ in 0..3 {
            let request = Request::builder()
                .uri("/meshwork.users.v1.UserService/GetUser")
                .body(())
                .unwrap_or_default();
            let _ = service.clone().oneshot(request).await;
        }
        // One interval with calls, then a quiet one (waiting for time to pass is the point).
        tokio::time::sleep(CALL_REPORT_INTERVAL * 2 + Duration::from_millis(1)).await;
        reporter.abort();

        let lines = captured.lines_containing("calls in the last");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("served 3 calls in the last 10s"),
            "{lines:?}"
        );
    }
}
