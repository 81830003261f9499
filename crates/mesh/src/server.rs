//! The one server builder. Every service binds a [`MeshServer`] and serves its routes through
//! it, and gets the same behaviour:
//!
//! - `grpc.health.v1`: NOT_SERVING until the service's readiness check (its database) passes,
//!   re-checked periodically, and NOT_SERVING again as soon as shutdown begins;
//! - gRPC reflection, both `v1` and `v1alpha` (grpcurl 1.8 speaks only v1alpha);
//! - `grpc-timeout` honoured (tonic cancels the handler when it passes), capped by
//!   `max_call_duration`;
//! - graceful shutdown: on the signal, health flips, new connections stop, in-flight calls get
//!   `drain_timeout` to finish.
//!
//! ```text
//! let server = MeshServer::bind(&config.server).await?;
//! let addr = server.local_addr();
//! server.serve(Routes::new(svc), &[UserServiceServer::<Svc>::NAME], readiness, shutdown).await?;
//! ```
//! The request size limit is set on each generated server (`max_decoding_message_size`), from
//! [`ServerConfig::max_message_bytes`], since only the codec knows a message's size.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::{
    authz::AuthzLayer,
    config::{AdminConfig, ServerConfig},
    tls::MeshTls,
    transport::tls_incoming,
};

type ServeFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// How often readiness is re-checked while NOT_SERVING, and while SERVING.
const READINESS_RETRY: Duration = Duration::from_millis(250);
const READINESS_RECHECK: Duration = Duration::from_secs(5);
/// Interval and timeout of HTTP/2 PINGs that detect dead peers on idle connections.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Also serves health, in plaintext, on the admin address (if `admin` has one).
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

        let drain_timeout = self.config.drain_timeout;
        let graceful = {
            let reporter = reporter.clone();
            let names = names.clone();
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
                set_all(&reporter, &names, ServingStatus::NotServing).await;
                tracing::info!(?drain_timeout, "draining in-flight calls");
            }
        };

        let router = tonic::transport::Server::builder()
            .layer(tower::util::option_layer(self.authz))
            .timeout(self.config.max_call_duration)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .tcp_nodelay(true)
            .add_routes(routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let mut background = Vec::new();
        if let Some((listener, addr)) = self.admin {
            tracing::info!(%addr, "serving health on the plaintext admin port");
            let admin = tonic::transport::Server::builder()
                .add_service(HealthServer::new(HealthService::from_health_reporter(
                    reporter.clone(),
                )))
                .serve_with_incoming(TcpListenerStream::new(listener));
            background.push(tokio::spawn(async move {
                if let Err(error) = admin.await {
                    tracing::error!(%error, "admin port failed");
                }
            }));
        }
        let serving: ServeFuture = match self.tls {
            Some(tls) => {
                tracing::info!(addr = %self.local_addr, identity = %tls.identity(), "serving gRPC over mutual TLS");
                background.push(tls.watch());
                let (incoming, acceptor) = tls_incoming(self.listener, tls);
                background.push(acceptor);
                Box::pin(router.serve_with_incoming_shutdown(incoming, graceful))
            }
            None => {
                tracing::info!(addr = %self.local_addr, "serving plaintext gRPC");
                let incoming = TcpListenerStream::new(self.listener);
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
        watcher.abort();
        for task in background {
            task.abort();
        }
        result
    }
}

async fn set_all(reporter: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Keeps health in step with readiness until shutdown begins.
async fn watch_readiness(
    reporter: HealthReporter,
    names: Vec<&'static str>,
    readiness: Readiness,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving = false;
    while !*stop.borrow() {
        let ready = readiness().await;
        if *stop.borrow() {
            break;
        }
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
        tokio::time::sleep(pause).await;
    }
}

/// Readiness that is always true, for servers without dependencies.
pub fn always_ready() -> Readiness {
    Arc::new(|| Box::pin(async { true }))
}

/// Readiness of a service backed by `pool`: the database answers.
pub fn database_ready(pool: sqlx::AnyPool) -> Readiness {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move { crate::store::ping(&pool).await })
    })
}
