//! The users service assembled: its database opened and migrated, its port bound, its handlers
//! served through the mesh's one server builder. The binary, `meshctl up` and the tests all
//! start the service through [`App`].

use std::{future::Future, net::SocketAddr};

use mesh::server::{MeshServer, database_ready};
use meshwork::users::v1::user_service_server::UserServiceServer;
use sqlx::AnyPool;
use tonic::{server::NamedService, service::Routes};

use crate::{
    config::Config,
    error::AppError,
    grpc::UserGrpc,
    store::{MIGRATOR, UserStore},
};

/// A users service that is ready to serve: database open, port bound.
pub struct App {
    config: Config,
    pool: AnyPool,
    server: MeshServer,
}

impl App {
    /// Opens (creating and migrating when needed) the database and binds the gRPC port.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let pool = mesh::store::open(&config.database, &MIGRATOR).await?;
        let server = MeshServer::bind(&config.server).await?;
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
