//! The orders service assembled: database, clients to users and billing, the gRPC server and the
//! recovery task. Tests, `meshctl up` and the binary all start it through [`App`].

use std::{future::Future, net::SocketAddr};

use mesh::{
    client::ClientError,
    server::{MeshServer, ServerError},
    store::StoreError,
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
}

/// The orders service, bound and ready to serve.
pub struct App {
    config: Config,
    server: MeshServer,
    store: Store,
    saga: Saga,
}

impl App {
    /// Opens (and migrates) the database, builds the clients (they connect lazily, so users and
    /// billing need not be up yet) and binds the gRPC port.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let store = Store::open(&config.database).await?;
        let users = UserServiceClient::new(mesh::client::channel(&config.users)?);
        let billing = BillingServiceClient::new(mesh::client::channel(&config.billing)?);
        let saga = Saga::new(store.clone(), users, billing);
        let server = MeshServer::bind(&config.server).await?;
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
