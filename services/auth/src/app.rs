//! The auth application: its database, its signing key, its client to users and its gRPC
//! server, built from a [`Config`] and run until a shutdown signal. The binary, the tests and
//! `meshctl up` all start auth through [`App`].

use std::{future::Future, net::SocketAddr};

use mesh::{
    client::ClientError,
    server::{MeshServer, ServerError},
    store::StoreError,
};
use meshwork::{
    auth::v1::auth_service_server::AuthServiceServer,
    users::v1::user_service_client::UserServiceClient,
};
use tonic::server::NamedService;

use crate::{
    accounts::Accounts,
    config::Config,
    error::DomainError,
    grpc::AuthGrpc,
    issuer::Issuer,
    keys::{KeyError, KeyRecord, SigningKey},
    store::{MIGRATOR, Store},
};

/// Why auth could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("users client: {0}")]
    Client(#[from] ClientError),
    #[error("signing key: {0}")]
    Key(#[from] KeyError),
    #[error("signing key: {0}")]
    KeyStorage(DomainError),
}

/// A built, bound, not yet serving auth service.
pub struct App {
    server: MeshServer,
    store: Store,
    grpc: AuthGrpc,
    max_message_bytes: usize,
}

impl App {
    /// Opens (and migrates) the database, makes sure a signing key exists, prepares the users
    /// client (connected lazily) and binds the listener.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let pool = mesh::store::open(&config.database, &MIGRATOR).await?;
        let store = Store::new(pool);
        let key = signing_key(&store).await?;
        tracing::info!(kid = key.kid(), "signing access tokens");
        let users = UserServiceClient::new(mesh::client::channel(&config.users)?);
        let issuer = Issuer::new(key, &config.tokens);
        let accounts = Accounts::new(store.clone(), users, issuer, config.tokens.refresh_ttl);
        let server = MeshServer::bind(&config.server).await?;
        Ok(Self {
            server,
            store,
            grpc: AuthGrpc::new(accounts),
            max_message_bytes: config.server.max_message_bytes,
        })
    }

    /// The address the gRPC server listens on (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let service =
            AuthServiceServer::new(self.grpc).max_decoding_message_size(self.max_message_bytes);
        let readiness = mesh::server::database_ready(self.store.pool().clone());
        self.server
            .serve(
                tonic::service::Routes::new(service),
                &[<AuthServiceServer<AuthGrpc> as NamedService>::NAME],
                readiness,
                shutdown,
            )
            .await?;
        Ok(())
    }
}

/// The newest stored key, after generating the first one if there is none. Replicas starting
/// together may each generate one: every key is published, and each replica signs with the
/// newest it saw, so their tokens all verify.
async fn signing_key(store: &Store) -> Result<SigningKey, AppError> {
    let newest = match store
        .newest_signing_key()
        .await
        .map_err(AppError::KeyStorage)?
    {
        Some(record) => record,
        None => {
            let record = KeyRecord::generate(mesh::timestamp::now_millis())?;
            store
                .insert_signing_key(&record)
                .await
                .map_err(AppError::KeyStorage)?;
            tracing::info!(kid = %record.kid, "generated the first signing key");
            store
                .newest_signing_key()
                .await
                .map_err(AppError::KeyStorage)?
                .unwrap_or(record)
        }
    };
    Ok(newest.signing_key()?)
}
