//! The billing server as one value: built from its [`Config`] (mesh certificate loaded, database
//! opened and migrated, port bound with mutual TLS and per-method authorization, end users'
//! tokens verified against auth's key set), then run until a shutdown signal. The binary,
//! `meshctl up` and the tests all start billing through this.

use std::{future::Future, net::SocketAddr};

use mesh::{
    authz::AuthzLayer,
    client::ClientError,
    jwt::JwksVerifier,
    server::{MeshServer, ServerError, database_ready},
    tls::{MeshTls, TlsError},
};
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
    #[error("mesh TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("auth client: {0}")]
    Client(#[from] ClientError),
}

/// A built billing server, bound but not yet serving.
pub struct App {
    config: Config,
    server: MeshServer,
    store: Store,
}

impl App {
    /// Loads the mesh certificate, opens and migrates the database, prepares the client to auth
    /// (connected lazily, on the first token to verify) and binds the gRPC port (and the admin
    /// port, when configured).
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let tls = MeshTls::load(&config.tls)?;
        let store = Store::open(&config.database).await?;
        let verifier = JwksVerifier::over_mesh(&config.tokens, &config.auth, &tls)?;
        let authz = AuthzLayer::new(config.authz.clone(), Some(verifier));
        let server = MeshServer::bind_mesh(&config.server, &config.admin, tls, authz).await?;
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

    /// The plaintext admin port's address (health only), when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
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
