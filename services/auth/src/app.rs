//! The auth application: its database, its signing keys, its login limits, its client to users
//! and its gRPC server (mutual TLS, per-method authorization), built from a [`Config`] and run
//! until a shutdown signal. The binary, the tests and `meshctl up` all start auth through
//! [`App`].

use std::{future::Future, net::SocketAddr, sync::Arc};

use mesh::{
    authz::AuthzLayer,
    client::ClientError,
    server::{MeshServer, ServerError},
    store::StoreError,
    timestamp::now_millis,
    tls::{MeshTls, TlsError},
};
use meshwork::{
    auth::v1::auth_service_server::AuthServiceServer,
    users::v1::user_service_client::UserServiceClient,
};
use tokio::time::MissedTickBehavior;
use tonic::server::NamedService;

use crate::{
    accounts::{Accounts, Parts},
    config::{Config, MESH_NAME},
    error::DomainError,
    grpc::AuthGrpc,
    issuer::Issuer,
    keyring::KeyRing,
    login_limits::LoginLimiter,
    store::{MIGRATOR, Store},
};

/// Why auth could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("mesh TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("users client: {0}")]
    Client(#[from] ClientError),
    #[error("signing key: {0}")]
    KeyStorage(DomainError),
}

/// A built, bound, not yet serving auth service.
pub struct App {
    server: MeshServer,
    store: Store,
    keys: KeyRing,
    limiter: Arc<LoginLimiter>,
    grpc: AuthGrpc,
    max_message_bytes: usize,
}

impl App {
    /// Loads the mesh certificate, opens (and migrates) the database, makes sure a current
    /// signing key exists, prepares the users client (mutual TLS, connected lazily) and binds
    /// the listeners.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let tls = MeshTls::load(&config.tls)?;
        if tls.identity().service() != MESH_NAME {
            // Not fatal (a deployment may name it otherwise), but users admits only `auth`.
            tracing::warn!(identity = %tls.identity(), "auth's certificate does not carry the `auth` identity");
        }
        let pool = mesh::store::open(&config.database, &MIGRATOR).await?;
        let store = Store::new(pool);
        let keys = KeyRing::load(store.clone(), &config.tokens, now_millis())
            .await
            .map_err(AppError::KeyStorage)?;
        let limiter = Arc::new(LoginLimiter::new(&config.login_limits));
        let users = UserServiceClient::new(mesh::client::connect(&config.users, &tls, "users")?);
        let accounts = Accounts::new(Parts {
            store: store.clone(),
            users,
            keys: keys.clone(),
            issuer: Issuer::new(&config.tokens),
            limiter: limiter.clone(),
            refresh_ttl: config.tokens.refresh_ttl,
        });
        // Auth's methods take no end-user tokens: it is where users get them.
        let authz = AuthzLayer::new(config.authz.clone(), None);
        let server = MeshServer::bind_mesh(&config.server, &config.admin, tls, authz).await?;
        Ok(Self {
            server,
            store,
            keys,
            limiter,
            grpc: AuthGrpc::new(accounts),
            max_message_bytes: config.server.max_message_bytes,
        })
    }

    /// The address the gRPC server listens on (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The plaintext health port, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` resolves, then drains in-flight calls. Meanwhile the signing key
    /// is rotated when due and retired keys and idle login counts are dropped.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let service =
            AuthServiceServer::new(self.grpc).max_decoding_message_size(self.max_message_bytes);
        let readiness = mesh::server::database_ready(self.store.pool().clone());
        let upkeep = tokio::spawn(upkeep(self.keys, self.limiter));
        let served = self
            .server
            .serve(
                tonic::service::Routes::new(service),
                &[<AuthServiceServer<AuthGrpc> as NamedService>::NAME],
                readiness,
                shutdown,
            )
            .await;
        upkeep.abort();
        served?;
        Ok(())
    }
}

/// The periodic work beside serving: the key check (rotation even when nothing signs,
/// retirement) and forgetting login counts that have refilled.
async fn upkeep(keys: KeyRing, limiter: Arc<LoginLimiter>) {
    let mut ticks = tokio::time::interval(keys.check_interval());
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate, and `build` has just checked the key.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if let Err(error) = keys.maintain(now_millis()).await {
            tracing::warn!(%error, "signing key check failed; retrying at the next one");
        }
        limiter.forget_idle();
    }
}
