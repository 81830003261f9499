//! Auth as a caller sees it: the real [`auth::App`] and the real [`users::App`] it calls,
//! started in-process on ephemeral ports with their own SQLite files, called through generated
//! clients over the mesh's client channel. Each test asserts what the caller gets back: a status
//! code and message, the fields a violation names, tokens that verify (or stop working).

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use auth::{
    App, BAD_CREDENTIALS, Config,
    tokens::{Claims, Verifier, VerifyError},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use mesh::{
    client::MeshChannel,
    config::{ClientConfig, DatabaseConfig, ServerConfig},
    status::field_violations,
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

const AUTH_SERVICE: &str = "meshwork.auth.v1.AuthService";
const USERS_SERVICE: &str = "meshwork.users.v1.UserService";
/// How long a freshly started service may take to report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "correct horse battery staple";
/// The default access token lifetime (15 minutes), as the contract reports it.
const ACCESS_TTL_SECS: i64 = 15 * 60;

/// A running service; dropping it stops the service.
struct Running {
    channel: MeshChannel,
    _stop: oneshot::Sender<()>,
}

/// Auth and the users service it calls, each with its own database, and clients to both.
struct TestMesh {
    auth: AuthServiceClient<MeshChannel>,
    users: UserServiceClient<MeshChannel>,
    auth_database: DatabaseConfig,
    _running: Vec<Running>,
    _data: tempfile::TempDir,
}

impl TestMesh {
    /// Starts users, then auth pointing at it, and waits until both report SERVING.
    async fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let users = start_users(&data).await?;
        let users_endpoint = ClientConfig::to(format!("http://{}", users.1));
        let auth_database = mesh::store::testing::sqlite(data.path(), "auth");
        let auth = start_auth(auth_config(&auth_database, users_endpoint)?).await?;
        Ok(Self {
            auth: AuthServiceClient::new(auth.channel.clone()),
            users: UserServiceClient::new(users.0.channel.clone()),
            auth_database,
            _running: vec![users.0, auth],
            _data: data,
        })
    }

    async fn register(&mut self, email: &str, password: &str) -> Result<String, Status> {
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

    async fn login(&mut self, email: &str, password: &str) -> Result<(String, TokenPair), Status> {
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

    async fn refresh(&mut self, refresh_token: &str) -> Result<TokenPair, Status> {
        self.auth
            .refresh(RefreshRequest {
                refresh_token: refresh_token.into(),
            })
            .await?
            .into_inner()
            .tokens
            .ok_or_else(|| Status::data_loss("Refresh answered without tokens"))
    }

    async fn logout(&mut self, refresh_token: &str) -> Result<(), Status> {
        self.auth
            .logout(LogoutRequest {
                refresh_token: refresh_token.into(),
            })
            .await?;
        Ok(())
    }

    async fn jwks(&mut self) -> Result<GetJwksResponse, Status> {
        Ok(self.auth.get_jwks(GetJwksRequest {}).await?.into_inner())
    }

    /// A verifier for the default issuer and audience over the key set auth publishes now.
    async fn verifier(&mut self) -> anyhow::Result<Verifier> {
        let defaults = Config::default().tokens;
        Ok(Verifier::new(
            &self.jwks().await?,
            &defaults.issuer,
            &defaults.audience,
        )?)
    }

    async fn user_count(&mut self) -> Result<usize, Status> {
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

fn local() -> anyhow::Result<ServerConfig> {
    Ok(ServerConfig {
        listen_addr: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    })
}

fn auth_config(database: &DatabaseConfig, users: ClientConfig) -> anyhow::Result<Config> {
    Ok(Config {
        server: local()?,
        database: database.clone(),
        users,
        ..Config::default()
    })
}

async fn start_users(data: &tempfile::TempDir) -> anyhow::Result<(Running, std::net::SocketAddr)> {
    let config = users::Config {
        server: local()?,
        database: mesh::store::testing::sqlite(data.path(), "users"),
    };
    let app = users::App::build(config).await?;
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let running = serving(addr, USERS_SERVICE, stop).await?;
    Ok((running, addr))
}

async fn start_auth(config: Config) -> anyhow::Result<Running> {
    let app = App::build(config).await?;
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        // Resolves when the sender is dropped, that is when the test (or the service) ends.
        let _ = stopped.await;
    }));
    serving(addr, AUTH_SERVICE, stop).await
}

/// Connects to `addr` and waits until health reports `service` SERVING.
async fn serving(
    addr: std::net::SocketAddr,
    service: &str,
    stop: oneshot::Sender<()>,
) -> anyhow::Result<Running> {
    let channel = mesh::client::channel(&ClientConfig::to(format!("http://{addr}")))?;
    let mut health = HealthClient::new(channel.clone());
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
        channel,
        _stop: stop,
    })
}

/// The fields an INVALID_ARGUMENT names, or an error saying what came back instead.
fn violated_fields<T: std::fmt::Debug>(result: Result<T, Status>) -> anyhow::Result<Vec<String>> {
    match result {
        Err(status) if status.code() == Code::InvalidArgument => Ok(field_violations(&status)
            .into_iter()
            .map(|(field, _)| field)
            .collect()),
        other => bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

fn code<T>(result: &Result<T, Status>) -> Option<Code> {
    result.as_ref().err().map(Status::code)
}

#[tokio::test]
async fn registered_user_logs_in_with_a_token_that_verifies_against_the_jwks() -> anyhow::Result<()>
{
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("ada@example.com", PASSWORD).await?;
    let (login_user, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    ensure!(
        login_user == user_id,
        "login names {login_user}, not {user_id}"
    );
    ensure!(tokens.token_type == "Bearer");
    ensure!(tokens.expires_in_seconds == ACCESS_TTL_SECS);
    ensure!(!tokens.refresh_token.is_empty());

    let claims = mesh.verifier().await?.verify(&tokens.access_token)?;
    let now = mesh::timestamp::now_millis() / 1000;
    ensure!(claims.sub == user_id, "sub is {}", claims.sub);
    ensure!(
        claims.iss == "meshwork-auth" && claims.aud == "meshwork",
        "{claims:?}"
    );
    ensure!(claims.exp - claims.iat == ACCESS_TTL_SECS, "{claims:?}");
    ensure!(
        (claims.iat - now).abs() <= 5,
        "iat {} is not now ({now})",
        claims.iat
    );
    Ok(())
}

#[tokio::test]
async fn login_finds_the_email_however_it_is_cased() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("  Ada@Example.com ", PASSWORD).await?;
    let (login_user, _) = mesh.login("ADA@example.COM", PASSWORD).await?;
    ensure!(login_user == user_id);
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_unauthenticated() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let result = mesh.login("ada@example.com", "not the password").await;
    ensure!(code(&result) == Some(Code::Unauthenticated), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn unknown_email_is_unauthenticated_with_the_same_message() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let wrong_password = mesh.login("ada@example.com", "not the password").await;
    let unknown = mesh.login("nobody@example.com", PASSWORD).await;
    let (Err(wrong_password), Err(unknown)) = (wrong_password, unknown) else {
        bail!("both logins should fail");
    };
    ensure!(unknown.code() == Code::Unauthenticated, "{unknown:?}");
    ensure!(
        unknown.message() == wrong_password.message(),
        "{unknown:?} / {wrong_password:?}"
    );
    ensure!(unknown.message() == BAD_CREDENTIALS);
    Ok(())
}

#[tokio::test]
async fn duplicate_email_on_register_is_already_exists() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let again = mesh.register(" ADA@example.com", "another password").await;
    ensure!(code(&again) == Some(Code::AlreadyExists), "{again:?}");
    // The first registration's password still works.
    mesh.login("ada@example.com", PASSWORD).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_email_on_register_is_users_own_invalid_argument() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let fields = violated_fields(mesh.register("not an email", PASSWORD).await)?;
    ensure!(fields == ["email"], "{fields:?}");
    Ok(())
}

#[tokio::test]
async fn short_password_is_invalid_argument_and_creates_no_user() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let fields = violated_fields(mesh.register("ada@example.com", "short").await)?;
    ensure!(fields == ["password"], "{fields:?}");
    ensure!(mesh.user_count().await? == 0);
    Ok(())
}

#[tokio::test]
async fn refresh_rotates_and_the_old_token_is_refused() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("ada@example.com", PASSWORD).await?;
    let (_, first) = mesh.login("ada@example.com", PASSWORD).await?;

    let second = mesh.refresh(&first.refresh_token).await?;
    ensure!(second.refresh_token != first.refresh_token);
    let claims = mesh.verifier().await?.verify(&second.access_token)?;
    ensure!(claims.sub == user_id);

    let replay = mesh.refresh(&first.refresh_token).await;
    ensure!(code(&replay) == Some(Code::Unauthenticated), "{replay:?}");
    Ok(())
}

#[tokio::test]
async fn reusing_a_rotated_token_revokes_its_whole_family() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, first) = mesh.login("ada@example.com", PASSWORD).await?;
    let (_, other_session) = mesh.login("ada@example.com", PASSWORD).await?;
    let second = mesh.refresh(&first.refresh_token).await?;

    let replay = mesh.refresh(&first.refresh_token).await;
    ensure!(code(&replay) == Some(Code::Unauthenticated), "{replay:?}");
    let newest = mesh.refresh(&second.refresh_token).await;
    ensure!(
        code(&newest) == Some(Code::Unauthenticated),
        "newest token still works: {newest:?}"
    );
    // Another login is another family, untouched.
    mesh.refresh(&other_session.refresh_token).await?;
    Ok(())
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    mesh.logout(&tokens.refresh_token).await?;
    let after = mesh.refresh(&tokens.refresh_token).await;
    ensure!(code(&after) == Some(Code::Unauthenticated), "{after:?}");
    Ok(())
}

#[tokio::test]
async fn logout_of_an_unknown_token_is_ok_and_of_an_empty_one_invalid() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.logout("never-issued").await?;
    let fields = violated_fields(mesh.logout("").await)?;
    ensure!(fields == ["refresh_token"], "{fields:?}");
    Ok(())
}

#[tokio::test]
async fn tampered_or_foreign_tokens_fail_verification() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    let verifier = mesh.verifier().await?;
    let genuine: Claims = verifier.verify(&tokens.access_token)?;

    // Same header and signature, another user in the payload.
    let parts: Vec<&str> = tokens.access_token.split('.').collect();
    ensure!(parts.len() == 3, "not a JWS: {}", tokens.access_token);
    let forged = Claims {
        sub: "someone-else".into(),
        ..genuine.clone()
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged)?);
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    ensure!(verifier.verify(&tampered) == Err(VerifyError::InvalidSignature));

    // The same claims under the published kid, signed by a key auth never had.
    let header = jsonwebtoken::decode_header(&tokens.access_token)?;
    let intruder = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let key = jsonwebtoken::EncodingKey::from_ed_der(intruder.to_pkcs8_der()?.as_bytes());
    let foreign = jsonwebtoken::encode(&header, &genuine, &key)?;
    ensure!(verifier.verify(&foreign) == Err(VerifyError::InvalidSignature));
    Ok(())
}

#[tokio::test]
async fn signing_key_survives_a_restart() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    let before = mesh.jwks().await?;

    let users = ClientConfig::to("http://127.0.0.1:1");
    let restarted = start_auth(auth_config(&mesh.auth_database, users)?).await?;
    let mut again = AuthServiceClient::new(restarted.channel.clone());
    let after = again.get_jwks(GetJwksRequest {}).await?.into_inner();
    ensure!(after == before, "{after:?} != {before:?}");
    ensure!(before.keys.len() == 1, "{before:?}");
    mesh.verifier().await?.verify(&tokens.access_token)?;
    Ok(())
}

#[tokio::test]
async fn register_while_users_is_down_is_unavailable() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let users = ClientConfig::to(format!("http://{closed}"));
    let database = mesh::store::testing::sqlite(data.path(), "auth");
    let auth = start_auth(auth_config(&database, users)?).await?;
    let result = AuthServiceClient::new(auth.channel.clone())
        .register(RegisterRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            display_name: "Ada".into(),
        })
        .await;
    ensure!(code(&result) == Some(Code::Unavailable), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn user_is_deleted_again_when_credentials_cannot_be_stored() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    // Make auth's own write fail after users has created the user.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&mesh.auth_database.url).await?;
    sqlx::query(
        "CREATE TRIGGER refuse_credentials BEFORE INSERT ON credentials \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&pool)
    .await?;

    let result = mesh.register("ada@example.com", PASSWORD).await;
    ensure!(result.is_err(), "registration succeeded: {result:?}");
    ensure!(mesh.user_count().await? == 0, "the user was left behind");
    Ok(())
}
