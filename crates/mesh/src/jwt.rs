//! Access tokens as every service sees them: the [`Claims`] auth puts in them, and the
//! [`Verifier`] that checks a token against the key set auth publishes (`GetJwks`).
//!
//! Verification pins the algorithm to EdDSA (a token naming any other algorithm, `none` or an
//! HMAC one, is refused before its signature is looked at), finds the key by the header's `kid`,
//! and checks the signature, `iss`, `aud`, `exp` and `nbf`.
//!
//! ```text
//! let jwks = auth.get_jwks(GetJwksRequest {}).await?.into_inner();
//! let verifier = Verifier::new(&jwks, "meshwork-auth", "meshwork")?;
//! let claims = verifier.verify(&access_token)?;   // claims.sub is the user id
//! ```
//! An [`VerifyError::UnknownKey`] tells the caller to fetch the key set again: auth may have
//! started signing with a newer key. [`JwksVerifier`] does exactly that for every service: it
//! fetches auth's key set over the mesh, caches it (refreshing it after `jwks_max_age`), refetches
//! it on an unknown `kid` at most once per `jwks_min_refetch`, and is the [`TokenVerifier`] the
//! authorization layer uses for end users.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use meshwork::auth::v1::{
    GetJwksRequest, GetJwksResponse, Jwk, auth_service_client::AuthServiceClient,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::RwLock, time::Instant};
use tonic::Status;

use crate::{authz::TokenVerifier, client::MeshChannel, config::ConfigError};

/// JWK key type and curve of an Ed25519 key (RFC 8037).
pub const KEY_TYPE: &str = "OKP";
pub const CURVE: &str = "Ed25519";
/// JWS algorithm name of Ed25519 signatures.
pub const ALGORITHM: &str = "EdDSA";
/// JWK `use` of a signature key.
pub const USE_SIGNATURE: &str = "sig";

/// Tolerated clock difference between auth and a verifying service when checking `exp` and
/// `nbf`: clocks of machines in one cluster agree within this.
pub const CLOCK_SKEW_LEEWAY_SECS: u64 = 60;
/// Length of an Ed25519 public key.
const ED25519_PUBLIC_KEY_BYTES: usize = 32;
/// Claims a token must carry to be accepted.
const REQUIRED_CLAIMS: [&str; 5] = ["iss", "aud", "sub", "exp", "nbf"];

/// The claims of a Meshwork access token. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who issued the token (auth's configured issuer).
    pub iss: String,
    /// Who the token is for (the mesh's configured audience).
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// Issued at.
    pub iat: i64,
    /// Not valid before.
    pub nbf: i64,
    /// Expires at.
    pub exp: i64,
    /// Unique id of this token.
    pub jti: String,
}

/// Why a token or a key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("key `{kid}` in the key set is not a usable Ed25519 signature key: {reason}")]
    InvalidKey { kid: String, reason: String },
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token header names no key (`kid`)")]
    MissingKeyId,
    #[error("token is signed by unknown key `{0}`")]
    UnknownKey(String),
    #[error("token is not signed with EdDSA")]
    WrongAlgorithm,
    #[error("token signature is invalid")]
    InvalidSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has the wrong issuer")]
    WrongIssuer,
    #[error("token has the wrong audience")]
    WrongAudience,
    #[error("token lacks the `{0}` claim")]
    MissingClaim(String),
}

/// Verifies access tokens against one key set, for one issuer and audience.
#[derive(Clone)]
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Verifier")
            .field("kids", &kids)
            .field("iss", &self.validation.iss)
            .field("aud", &self.validation.aud)
            .finish()
    }
}

impl Verifier {
    /// A verifier trusting every key of `jwks`; each must be an Ed25519 signature key.
    pub fn new(jwks: &GetJwksResponse, issuer: &str, audience: &str) -> Result<Self, VerifyError> {
        let keys = jwks
            .keys
            .iter()
            .map(|jwk| Ok((jwk.kid.clone(), decoding_key(jwk)?)))
            .collect::<Result<HashMap<_, _>, VerifyError>>()?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&REQUIRED_CLAIMS);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.leeway = CLOCK_SKEW_LEEWAY_SECS;
        Ok(Self { keys, validation })
    }

    /// Whether the key set holds `kid`.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The claims of `token` if it is a valid, current access token signed by one of the keys.
    pub fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(from_jwt)?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(VerifyError::MissingKeyId)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(from_jwt)
    }
}

/// The decoding key of one JWK, refusing anything but an Ed25519 signature key. The length is
/// checked here because the signature library would not check it before slicing.
fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, VerifyError> {
    let invalid = |reason: &str| VerifyError::InvalidKey {
        kid: jwk.kid.clone(),
        reason: reason.to_owned(),
    };
    if jwk.kid.is_empty() {
        return Err(invalid("it has no `kid`"));
    }
    if jwk.kty != KEY_TYPE || jwk.crv != CURVE {
        return Err(invalid("kty must be OKP and crv Ed25519"));
    }
    if !(jwk.alg.is_empty() || jwk.alg == ALGORITHM) {
        return Err(invalid("alg must be EdDSA"));
    }
    if !(jwk.r#use.is_empty() || jwk.r#use == USE_SIGNATURE) {
        return Err(invalid("use must be sig"));
    }
    match URL_SAFE_NO_PAD.decode(&jwk.x) {
        Ok(bytes) if bytes.len() == ED25519_PUBLIC_KEY_BYTES => {
            DecodingKey::from_ed_components(&jwk.x).map_err(|e| invalid(&e.to_string()))
        }
        Ok(_) => Err(invalid("x must be 32 bytes")),
        Err(_) => Err(invalid("x must be base64url without padding")),
    }
}

fn from_jwt(error: jsonwebtoken::errors::Error) -> VerifyError {
    match error.kind() {
        ErrorKind::InvalidSignature => VerifyError::InvalidSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::InvalidAudience => VerifyError::WrongAudience,
        ErrorKind::InvalidAlgorithm => VerifyError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) => VerifyError::MissingClaim(claim.clone()),
        _ => VerifyError::Malformed(error.to_string()),
    }
}

/// Who issues access tokens by default (auth's `tokens.issuer`).
pub const DEFAULT_ISSUER: &str = "meshwork-auth";
/// Whom access tokens are for by default (auth's `tokens.audience`).
pub const DEFAULT_AUDIENCE: &str = "meshwork";

/// How a service verifies end users' access tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// A cached key set older than this is fetched again before use.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// An unknown `kid` triggers a refetch at most this often (a flood of forged `kid`s cannot
    /// turn into a flood of calls to auth).
    #[serde(with = "humantime_serde")]
    pub jwks_min_refetch: Duration,
}

impl JwtConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.issuer.is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.issuer"),
                "must be set",
            ));
        }
        if self.audience.is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.audience"),
                "must be set",
            ));
        }
        if self.jwks_min_refetch.is_zero() {
            return Err(ConfigError::invalid(
                format!("{prefix}.jwks_min_refetch"),
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            jwks_max_age: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(5),
        }
    }
}

struct Cached {
    verifier: Arc<Verifier>,
    fetched: Instant,
}

/// Verifies access tokens against auth's key set, fetched over the mesh and cached.
pub struct JwksVerifier {
    config: JwtConfig,
    auth: AuthServiceClient<MeshChannel>,
    cache: RwLock<Option<Cached>>,
    refetch: DefaultDirectRateLimiter,
}

impl JwksVerifier {
    /// The verifier every service uses for end users: auth's key set fetched over the mesh,
    /// with `tls`'s identity, from the auth replicas `auth` names.
    pub fn over_mesh(
        tokens: &JwtConfig,
        auth: &crate::config::ClientConfig,
        tls: &crate::tls::MeshTls,
    ) -> Result<Arc<dyn TokenVerifier>, crate::client::ClientError> {
        let client = AuthServiceClient::new(crate::client::connect(auth, tls, "auth")?);
        Ok(Self::new(tokens, client))
    }

    pub fn new(config: &JwtConfig, auth: AuthServiceClient<MeshChannel>) -> Arc<Self> {
        let period = config.jwks_min_refetch.max(Duration::from_millis(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN);
        Arc::new(Self {
            config: config.clone(),
            auth,
            cache: RwLock::new(None),
            refetch: RateLimiter::direct(quota),
        })
    }

    /// The claims of a valid access token.
    pub async fn claims(&self, token: &str) -> Result<Claims, Status> {
        let verifier = self.current().await?;
        match verifier.verify(token) {
            Err(VerifyError::UnknownKey(kid)) => {
                if self.refetch.check().is_err() {
                    return Err(refused(&VerifyError::UnknownKey(kid)));
                }
                tracing::info!(%kid, "unknown signing key, fetching auth's key set again");
                self.fetch().await?.verify(token).map_err(|e| refused(&e))
            }
            result => result.map_err(|e| refused(&e)),
        }
    }

    /// The cached key set, fetched first if there is none or it is too old. A stale set is
    /// still used when auth cannot be reached: its keys stay valid until their tokens expire.
    async fn current(&self) -> Result<Arc<Verifier>, Status> {
        let stale = match &*self.cache.read().await {
            Some(cached) if cached.fetched.elapsed() < self.config.jwks_max_age => {
                return Ok(cached.verifier.clone());
            }
            Some(cached) => Some(cached.verifier.clone()),
            None => None,
        };
        match (self.fetch().await, stale) {
            (Ok(fresh), _) => Ok(fresh),
            (Err(status), Some(stale)) => {
                tracing::warn!(error = %status.message(), "cannot refresh auth's key set; using the cached one");
                Ok(stale)
            }
            (Err(status), None) => Err(status),
        }
    }

    async fn fetch(&self) -> Result<Arc<Verifier>, Status> {
        let jwks = self
            .auth
            .clone()
            .get_jwks(GetJwksRequest {})
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), error = %status.message(), "fetching auth's key set failed");
                Status::unavailable("cannot verify the access token now: auth's keys are unavailable")
            })?
            .into_inner();
        let verifier = Arc::new(
            Verifier::new(&jwks, &self.config.issuer, &self.config.audience).map_err(|error| {
                tracing::error!(%error, "auth published an unusable key set");
                Status::unavailable("cannot verify the access token now: auth's keys are unusable")
            })?,
        );
        *self.cache.write().await = Some(Cached {
            verifier: verifier.clone(),
            fetched: Instant::now(),
        });
        Ok(verifier)
    }
}

fn refused(error: &VerifyError) -> Status {
    Status::unauthenticated(format!("access token refused: {error}"))
}

impl TokenVerifier for JwksVerifier {
    fn verify(&self, token: &str) -> BoxFuture<'_, Result<String, Status>> {
        let token = token.to_owned();
        Box::pin(async move { self.claims(&token).await.map(|claims| claims.sub) })
    }
}
