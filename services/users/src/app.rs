//! The users service assembled: its database opened and migrated, its mesh certificate loaded,
//! its port bound (mutual TLS, per-method authorization, end users' tokens verified against
//! auth's key set), its handlers served through the mesh's one server builder. The binary,
//! `meshctl up` and the tests all start the service through [`App`].

use std::{future::Future, net::SocketAddr};

use mesh::{
    authz::AuthzLayer,
    jwt::JwksVerifier,
    server::{MeshServer, database_ready},
    tls::MeshTls,
};
use meshwork::users::v1::user_service_server::UserServiceServer;
use sqlx::AnyPool;
use tonic::{server::NamedService, service::Routes};

use crate::{
    config::Config,
    error::AppError,
    grpc::UserGrpc,
    store::{MIGRATOR, UserStore},
};

/// A users service that is ready to serve: database open, certificate loaded, port bound.
pub struct App {
    config: Config,
    pool: AnyPool,
    server: MeshServer,
}

impl App {
    /// Loads the mesh certificate, opens (creating and migrating when needed) the database,
    /// prepares the client to auth (connected lazily, on the first token to verify) and binds
    /// the gRPC port (and the admin port, when configured).
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let tls = MeshTls::load(&config.tls)?;
        let pool = mesh::store::open(&config.database, &MIGRATOR).await?;
        let verifier = JwksVerifier::over_mesh(&config.tokens, &config.auth, &tls)?;
        let authz = AuthzLayer::new(config.authz.clone(), Some(verifier));
        let server = MeshServer::bind_mesh(&config.server, &config.admin, tls, authz).await?;
        Ok(Self {
            config,
            pool,
            server,
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

    /// Serves until `shutdown` resolves, then drains in-flight calls and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let handlers = UserGrpc::new(UserStore::new(self.pool.clone()));
        let service = UserServiceServer::new(handlers)
            .max_decoding_message_size(self.config.server.max_message_bytes);
        let served = self
            .server
            .serve(
                Routes::new(service),
                &[<UserServiceServer<UserGrpc> as NamedService>::NAME],
                database_ready(self.pool.clone()),
                shutdown,
            )
            .await;
        self.pool.close().await;
        Ok(served?)
    }
}
