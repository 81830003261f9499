//! End-user access tokens as every service verifies them: [`JwksVerifier`] against a stand-in
//! for auth that publishes a key set over mutual TLS, with tokens minted here. Each test is one
//! way a token can be wrong, or one rule of how the key set is fetched.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh::{
    config::ServerConfig,
    jwt::{Claims, JwksVerifier, JwtConfig},
    server::{MeshServer, always_ready},
    testing::TestPki,
};
use meshwork::auth::v1::{
    GetJwksRequest, GetJwksResponse, Jwk, LoginRequest, LoginResponse, LogoutRequest,
    LogoutResponse, RefreshRequest, RefreshResponse, RegisterRequest, RegisterResponse,
    auth_service_client::AuthServiceClient,
    auth_service_server::{AuthService, AuthServiceServer},
};
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const HOUR: i64 = 3600;

/// An Ed25519 key as auth holds it.
struct Key {
    kid: String,
    encoding: EncodingKey,
    public: String,
}

impl Key {
    fn generate(kid: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ed_der(key.to_pkcs8_der()?.as_bytes()),
            public: URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes()),
        })
    }

    fn jwk(&self) -> Jwk {
        Jwk {
            kid: self.kid.clone(),
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: self.public.clone(),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }

    fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }
}

fn claims(sub: &str) -> Claims {
    let now = mesh::timestamp::now_millis() / 1000;
    Claims {
        iss: mesh::jwt::DEFAULT_ISSUER.into(),
        aud: mesh::jwt::DEFAULT_AUDIENCE.into(),
        sub: sub.into(),
        iat: now,
        nbf: now,
        exp: now + HOUR,
        jti: jti(),
    }
}

fn jti() -> String {
    format!("jti-{}", mesh::timestamp::now_millis())
}

/// A stand-in for auth: publishes `keys`, counts how often it was asked.
#[derive(Clone, Default)]
struct KeyServer {
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
}

const ONLY_KEYS: &str = "this stand-in for auth only publishes keys";

#[tonic::async_trait]
impl AuthService for KeyServer {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::failed_precondition(ONLY_KEYS))
    }
    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<LoginResponse>, Status> {
        Err(Status::failed_precondition(ONLY_KEYS))
    }
    async fn refresh(
        &self,
        _: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        Err(Status::failed_precondition(ONLY_KEYS))
    }
    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        Err(Status::failed_precondition(ONLY_KEYS))
    }
    async fn get_jwks(
        &self,
        _: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let keys = self
            .keys
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone();
        Ok(Response::new(GetJwksResponse { keys }))
    }
}

impl KeyServer {
    fn publish(&self, keys: &[&Key]) {
        if let Ok(mut published) = self.keys.lock() {
            *published = keys.iter().map(|k| k.jwk()).collect();
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
    server: KeyServer,
    verifier: Arc<JwksVerifier>,
}

async fn setup(config: JwtConfig) -> Result<Setup, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = KeyServer::default();
    let mesh_server = MeshServer::bind(&ServerConfig::default())
        .await?
        .with_tls(pki.tls("auth")?);
    let addr: SocketAddr = mesh_server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(mesh_server.serve(
        tonic::service::Routes::new(AuthServiceServer::new(server.clone())),
        &[],
        always_ready(),
        async move {
            let _ = stopped.await;
        },
    ));
    let auth = AuthServiceClient::new(pki.channel_as("users", addr, "auth")?);
    Ok(Setup {
        _dir: dir,
        _stop: stop,
        server,
        verifier: JwksVerifier::new(&config, auth),
    })
}

/// A configuration that refetches an unknown key at most once an hour: fetch counts are exact.
fn rarely_refetching() -> JwtConfig {
    JwtConfig {
        jwks_min_refetch: Duration::from_secs(3600),
        ..JwtConfig::default()
    }
}

async fn refused_code(setup: &Setup, token: &str) -> Option<Code> {
    setup.verifier.claims(token).await.err().map(|s| s.code())
}

#[tokio::test]
async fn a_valid_token_names_its_user() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let verified = setup.verifier.claims(&key.sign(&claims("user-1"))?).await?;
    assert_eq!(verified.sub, "user-1");
    Ok(())
}

#[tokio::test]
async fn the_key_set_is_cached() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    for user in ["a", "b", "c"] {
        setup.verifier.claims(&key.sign(&claims(user))?).await?;
    }
    assert_eq!(setup.server.fetches(), 1);
    Ok(())
}

#[tokio::test]
async fn an_unknown_kid_is_refetched_then_accepted_if_auth_now_has_it() -> TestResult {
    let setup = setup(rarely_refetching()).await?;
    let old = Key::generate("old")?;
    setup.server.publish(&[&old]);
    setup.verifier.claims(&old.sign(&claims("u"))?).await?;
    let new = Key::generate("new")?;
    setup.server.publish(&[&old, &new]);
    let verified = setup.verifier.claims(&new.sign(&claims("u"))?).await?;
    assert_eq!(verified.sub, "u");
    assert_eq!(setup.server.fetches(), 2);
    Ok(())
}

#[tokio::test]
async fn an_unknown_kid_is_refetched_once_then_rejected() -> TestResult {
    let setup = setup(rarely_refetching()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    setup.verifier.claims(&key.sign(&claims("u"))?).await?;
    let forged = Key::generate("forged")?;
    let token = forged.sign(&claims("u"))?;
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    // A flood of unknown kids does not become a flood of fetches.
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    assert_eq!(setup.server.fetches(), 2);
    Ok(())
}

#[tokio::test]
async fn an_expired_token_is_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let mut expired = claims("u");
    expired.exp -= 3 * HOUR;
    expired.nbf -= 4 * HOUR;
    let token = key.sign(&expired)?;
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let mut other = claims("u");
    other.aud = "another-mesh".into();
    let token = key.sign(&other)?;
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn a_bad_signature_is_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let impostor = Key::generate("k1")?;
    let token = impostor.sign(&claims("u"))?;
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn tampered_claims_are_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let token = key.sign(&claims("victim"))?;
    let parts: Vec<&str> = token.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("attacker"))?);
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(
        refused_code(&setup, &tampered).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn alg_none_is_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims("u"))?);
    let token = format!("{header}.{payload}.");
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() -> TestResult {
    let setup = setup(JwtConfig::default()).await?;
    let key = Key::generate("k1")?;
    setup.server.publish(&[&key]);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let secret = EncodingKey::from_secret(key.public.as_bytes());
    let token = jsonwebtoken::encode(&header, &claims("u"), &secret)?;
    assert_eq!(
        refused_code(&setup, &token).await,
        Some(Code::Unauthenticated)
    );
    Ok(())
}

#[tokio::test]
async fn without_auth_and_without_a_cached_key_set_verification_is_unavailable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let auth = AuthServiceClient::new(pki.channel_as("users", nowhere, "auth")?);
    let verifier = JwksVerifier::new(&JwtConfig::default(), auth);
    let key = Key::generate("k1")?;
    let code = verifier
        .claims(&key.sign(&claims("u"))?)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(code, Some(Code::Unavailable));
    Ok(())
}
