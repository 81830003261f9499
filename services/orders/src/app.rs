//! The orders service assembled: its mesh TLS identity, database, clients to users and billing
//! (and to auth, for the keys that verify end users' tokens), the gRPC server behind the
//! authorization layer, and the recovery task. Tests, `meshctl up` and the binary all start it
//! through [`App`].

use std::{future::Future, net::SocketAddr};

use mesh::{
    authz::AuthzLayer,
    client::ClientError,
    jwt::JwksVerifier,
    server::{MeshServer, ServerError},
    store::StoreError,
    tls::{MeshTls, TlsError},
};
use meshwork::{
    billing::v1::billing_service_client::BillingServiceClient,
    orders::v1::order_service_server::OrderServiceServer,
    users::v1::user_service_client::UserServiceClient,
};
use tokio::sync::watch;
use tonic::server::NamedService;

use crate::{config::Config, grpc::OrderApi, recovery::Recovery, saga::Saga, store::Store};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("mesh TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The orders service, bound and ready to serve.
pub struct App {
    config: Config,
    server: MeshServer,
    store: Store,
    saga: Saga,
}

impl App {
    /// Loads the mesh certificate, opens (and migrates) the database, builds the mutual-TLS
    /// clients (they connect lazily, so users, billing and auth need not be up yet) and binds
    /// the gRPC port (and the admin port, when configured).
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let tls = MeshTls::load(&config.tls)?;
        let store = Store::open(&config.database).await?;
        let users = UserServiceClient::new(mesh::client::connect(&config.users, &tls, "users")?);
        let billing =
            BillingServiceClient::new(mesh::client::connect(&config.billing, &tls, "billing")?);
        let verifier = JwksVerifier::over_mesh(&config.tokens, &config.auth, &tls)?;
        let saga = Saga::new(store.clone(), users, billing);
        let authz = AuthzLayer::new(config.authz.clone(), Some(verifier));
        let server = MeshServer::bind_mesh(&config.server, &config.admin, tls, authz).await?;
        Ok(Self {
            config,
            server,
            store,
            saga,
        })
    }

    /// The address the gRPC server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The plaintext admin port's address (health only), when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// A handle to run a recovery sweep on demand (the background task sweeps on its own).
    pub fn recovery(&self) -> Recovery {
        Recovery::new(self.saga.clone(), self.config.recovery)
    }

    /// Serves, with recovery running in the background, until `shutdown` resolves; then ends
    /// open watches and recovery, and drains in-flight calls.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let (stopping, stop) = watch::channel(false);
        let recovery = tokio::spawn(self.recovery().run(stop.clone()));
        let api = OrderApi::new(self.saga, self.store.clone(), stop);
        let routes = tonic::service::Routes::new(
            OrderServiceServer::new(api)
                .max_decoding_message_size(self.config.server.max_message_bytes),
        );
        // `stopping` lives in this future: if serving ends without a signal, dropping it stops
        // recovery and the watches all the same.
        let shutdown = async move {
            shutdown.await;
            let _ = stopping.send(true);
        };
        let served = self
            .server
            .serve(
                routes,
                &[<OrderServiceServer<OrderApi> as NamedService>::NAME],
                mesh::server::database_ready(self.store.pool().clone()),
                shutdown,
            )
            .await;
        if let Err(error) = recovery.await {
            tracing::error!(%error, "recovery task failed");
        }
        Ok(served?)
    }
}
