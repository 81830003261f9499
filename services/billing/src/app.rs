//! The billing server as one value: built from its [`Config`] (database opened and migrated,
//! port bound), then run until a shutdown signal. The binary, `meshctl up` and the tests all
//! start billing through this.

use std::{future::Future, net::SocketAddr};

use mesh::server::{MeshServer, ServerError, database_ready};
use meshwork::billing::v1::billing_service_server::BillingServiceServer;
use tonic::{server::NamedService, service::Routes};

use crate::{config::Config, grpc::BillingGrpc, store::Store};

/// Why billing could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] mesh::store::StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A built billing server, bound but not yet serving.
pub struct App {
    config: Config,
    server: MeshServer,
    store: Store,
}

impl App {
    /// Opens and migrates the database and binds the gRPC port.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let store = Store::open(&config.database).await?;
        let server = MeshServer::bind(&config.server).await?;
        Ok(Self {
            config,
            server,
            store,
        })
    }

    /// The bound address (the actual port when the configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let readiness = database_ready(self.store.pool().clone());
        let service = BillingServiceServer::new(BillingGrpc::new(self.store))
            .max_decoding_message_size(self.config.server.max_message_bytes);
        self.server
            .serve(
                Routes::new(service),
                &[<BillingServiceServer<BillingGrpc> as NamedService>::NAME],
                readiness,
                shutdown,
            )
            .await?;
        Ok(())
    }
}
