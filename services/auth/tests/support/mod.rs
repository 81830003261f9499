//! Auth as a caller sees it: the real [`auth::App`] and the real [`users::App`] it calls,
//! started in-process on ephemeral ports with their own SQLite files and their own certificates
//! from a test CA, called over mutual TLS through generated clients (as the operator, or as any
//! mesh identity). Each test asserts what the caller gets back: a status code and message, the
//! fields a violation names, tokens that verify (or stop working).

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use auth::{App, Config, tokens::Verifier};
use mesh::{
    client::MeshChannel,
    config::{DatabaseConfig, ServerConfig},
    status::field_violations,
    testing::TestPki,
};
use meshwork::{
    auth::v1::{
        GetJwksRequest, GetJwksResponse, LoginRequest, LogoutRequest, RefreshRequest,
        RegisterRequest, TokenPair, auth_service_client::AuthServiceClient,
    },
    users::v1::{ListUsersRequest, user_service_client::UserServiceClient},
};
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub const AUTH_SERVICE: &str = "meshwork.auth.v1.AuthService";
pub const USERS_SERVICE: &str = "meshwork.users.v1.UserService";
/// How long a freshly started service may take to report SERVING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
pub const PASSWORD: &str = "correct horse battery staple";
/// The default access token lifetime (15 minutes), as the contract reports it.
pub const ACCESS_TTL_SECS: i64 = 15 * 60;

/// A running service; dropping it stops the service.
pub struct Running {
    pub addr: SocketAddr,
    /// The plaintext health port, when the service was configured with one.
    pub admin_addr: Option<SocketAddr>,
    _stop: oneshot::Sender<()>,
}

/// Auth and the users service it calls, each with its own database and certificate, and
/// clients to both as the operator.
pub struct TestMesh {
    pub auth: AuthServiceClient<MeshChannel>,
    pub users: UserServiceClient<MeshChannel>,
    pub running_auth: Running,
    pub running_users: Running,
    pub auth_database: DatabaseConfig,
    pub pki: TestPki,
    _data: tempfile::TempDir,
}

impl TestMesh {
    /// Starts users, then auth pointing at it, and waits until both report SERVING.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`Self::start`], with auth's configuration changed by `configure` first.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        Self::start_with_users_as("users", configure).await
    }

    /// Like [`Self::start_with`], with the users service presenting `identity`'s certificate.
    pub async fn start_with_users_as(
        identity: &str,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let pki = TestPki::new(data.path())?;
        let users = start_users(&pki, data.path(), identity).await?;
        let auth_database = mesh::store::testing::sqlite(data.path(), "auth");
        let mut config = auth_config(&pki, &auth_database, users.addr)?;
        configure(&mut config);
        let auth = start_auth(&pki, config).await?;
        Ok(Self {
            auth: AuthServiceClient::new(pki.channel(auth.addr, "auth")?),
            users: UserServiceClient::new(pki.channel(users.addr, identity)?),
            running_auth: auth,
            running_users: users,
            auth_database,
            pki,
            _data: data,
        })
    }

    /// A client of auth presenting `identity`'s certificate.
    pub fn auth_as(&self, identity: &str) -> anyhow::Result<AuthServiceClient<MeshChannel>> {
        let channel = self
            .pki
            .channel_as(identity, self.running_auth.addr, "auth")?;
        Ok(AuthServiceClient::new(channel))
    }

    pub async fn register(&mut self, email: &str, password: &str) -> Result<String, Status> {
        let response = self
            .auth
            .register(RegisterRequest {
                email: email.into(),
                password: password.into(),
                display_name: "Ada Lovelace".into(),
            })
            .await?;
        Ok(response.into_inner().user_id)
    }

    pub async fn login(
        &mut self,
        email: &str,
        password: &str,
    ) -> Result<(String, TokenPair), Status> {
        let response = self
            .auth
            .login(LoginRequest {
                email: email.into(),
                password: password.into(),
            })
            .await?
            .into_inner();
        let tokens = response
            .tokens
            .ok_or_else(|| Status::data_loss("Login answered without tokens"))?;
        Ok((response.user_id, tokens))
    }

    pub async fn refresh(&mut self, refresh_token: &str) -> Result<TokenPair, Status> {
        self.auth
            .refresh(RefreshRequest {
                refresh_token: refresh_token.into(),
            })
            .await?
            .into_inner()
            .tokens
            .ok_or_else(|| Status::data_loss("Refresh answered without tokens"))
    }

    pub async fn logout(&mut self, refresh_token: &str) -> Result<(), Status> {
        self.auth
            .logout(LogoutRequest {
                refresh_token: refresh_token.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn jwks(&mut self) -> Result<GetJwksResponse, Status> {
        Ok(self.auth.get_jwks(GetJwksRequest {}).await?.into_inner())
    }

    /// A verifier for the default issuer and audience over the key set auth publishes now.
    pub async fn verifier(&mut self) -> anyhow::Result<Verifier> {
        let defaults = Config::default().tokens;
        Ok(Verifier::new(
            &self.jwks().await?,
            &defaults.issuer,
            &defaults.audience,
        )?)
    }

    pub async fn user_count(&mut self) -> Result<usize, Status> {
        let page = self
            .users
            .list_users(ListUsersRequest {
                page_size: 0,
                page_token: String::new(),
            })
            .await?;
        Ok(page.into_inner().users.len())
    }
}

pub fn local() -> anyhow::Result<ServerConfig> {
    Ok(ServerConfig {
        listen_addr: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    })
}

/// Auth on an ephemeral port with its test certificate, calling users at `users`.
pub fn auth_config(
    pki: &TestPki,
    database: &DatabaseConfig,
    users: SocketAddr,
) -> anyhow::Result<Config> {
    Ok(Config {
        server: local()?,
        tls: pki.config("auth"),
        database: database.clone(),
        users: TestPki::client_config(users),
        ..Config::default()
    })
}

/// Users with its database in `data`, presenting `identity`'s certificate (normally `users`).
pub async fn start_users(pki: &TestPki, data: &Path, identity: &str) -> anyhow::Result<Running> {
    let config = users::Config {
        server: local()?,
        database: mesh::store::testing::sqlite(data, "users"),
        tls: pki.config(identity),
        ..users::Config::default()
    };
    let app = users::App::build(config).await?;
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    serving(pki, addr, identity, USERS_SERVICE, stop, None).await
}

pub async fn start_auth(pki: &TestPki, config: Config) -> anyhow::Result<Running> {
    let app = App::build(config).await?;
    let addr = app.local_addr();
    let admin_addr = app.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        // Resolves when the sender is dropped, that is when the test (or the service) ends.
        let _ = stopped.await;
    }));
    serving(pki, addr, "auth", AUTH_SERVICE, stop, admin_addr).await
}

/// Connects to `addr` (which must present `identity`) as the operator and waits until health
/// reports `service` SERVING.
async fn serving(
    pki: &TestPki,
    addr: SocketAddr,
    identity: &str,
    service: &str,
    stop: oneshot::Sender<()>,
    admin_addr: Option<SocketAddr>,
) -> anyhow::Result<Running> {
    let mut health = HealthClient::new(pki.channel(addr, identity)?);
    tokio::time::timeout(READY_TIMEOUT, async {
        let mut updates = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        while let Some(update) = updates.message().await? {
            if update.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        bail!("health stream ended before {service} was SERVING")
    })
    .await
    .with_context(|| format!("{service} did not report SERVING in time"))??;
    Ok(Running {
        addr,
        admin_addr,
        _stop: stop,
    })
}

/// The fields an INVALID_ARGUMENT names, or an error saying what came back instead.
pub fn violated_fields<T: std::fmt::Debug>(
    result: Result<T, Status>,
) -> anyhow::Result<Vec<String>> {
    match result {
        Err(status) if status.code() == Code::InvalidArgument => Ok(field_violations(&status)
            .into_iter()
            .map(|(field, _)| field)
            .collect()),
        other => bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

pub fn code<T>(result: &Result<T, Status>) -> Option<Code> {
    result.as_ref().err().map(Status::code)
}

/// The `kid` in an access token's header.
pub fn kid(access_token: &str) -> anyhow::Result<String> {
    jsonwebtoken::decode_header(access_token)?
        .kid
        .context("access token names no key")
}
