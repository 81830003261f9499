//! The AuthService gRPC edge: decode each request into domain values (collecting every field
//! violation), hand it to [`Accounts`], and encode the answer. No decisions are made here.
//!
//! The generated request and response types carry passwords and tokens in plain `String`s and
//! print them in their `Debug`: they are taken apart here at once and never logged.

use std::net::IpAddr;

use mesh::{identity::PeerInfo, status::FieldViolations};
use meshwork::auth::v1::{
    GetJwksRequest, GetJwksResponse, LoginRequest, LoginResponse, LogoutRequest, LogoutResponse,
    RefreshRequest, RefreshResponse, RegisterRequest, RegisterResponse, TokenPair,
    auth_service_server::AuthService,
};
use tonic::{Request, Response, Status};

use crate::{
    accounts::{Accounts, Session},
    domain::{LoginEmail, Password, RefreshToken},
    error::DomainError,
};

/// The `token_type` of every token pair (RFC 6750 bearer tokens).
const TOKEN_TYPE: &str = "Bearer";

/// The tonic service.
#[derive(Debug, Clone)]
pub struct AuthGrpc {
    accounts: Accounts,
}

impl AuthGrpc {
    pub fn new(accounts: Accounts) -> Self {
        Self { accounts }
    }
}

#[tonic::async_trait]
impl AuthService for AuthGrpc {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let RegisterRequest {
            email,
            password,
            display_name,
        } = request.into_inner();
        let mut violations = FieldViolations::new();
        let password = violations.check("password", Password::parse(password));
        let password = valid(violations, password)?;
        let user_id = self
            .accounts
            .register(email, display_name, password)
            .await?;
        Ok(Response::new(RegisterResponse { user_id }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let peer = peer_ip(&request);
        let LoginRequest { email, password } = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = violations.check("email", LoginEmail::parse(&email));
        let password = violations.check("password", Password::presented(password));
        let (email, password) = valid(violations, email.zip(password))?;
        let session = self.accounts.login(email, password, peer).await?;
        let user_id = session.user_id.clone();
        Ok(Response::new(LoginResponse {
            user_id,
            tokens: Some(token_pair(session)),
        }))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let token = refresh_token(request.into_inner().refresh_token)?;
        let session = self.accounts.refresh(token).await?;
        Ok(Response::new(RefreshResponse {
            tokens: Some(token_pair(session)),
        }))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let token = refresh_token(request.into_inner().refresh_token)?;
        self.accounts.logout(token).await?;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn get_jwks(
        &self,
        _request: Request<GetJwksRequest>,
    ) -> Result<Response<GetJwksResponse>, Status> {
        let keys = self.accounts.jwks().await?;
        Ok(Response::new(GetJwksResponse { keys }))
    }
}

/// The parsed value when no violation was recorded.
fn valid<T>(violations: FieldViolations, value: Option<T>) -> Result<T, DomainError> {
    match value {
        Some(value) if violations.is_empty() => Ok(value),
        _ => Err(DomainError::Invalid(violations)),
    }
}

fn refresh_token(raw: String) -> Result<RefreshToken, DomainError> {
    let mut violations = FieldViolations::new();
    let token = violations.check("refresh_token", RefreshToken::presented(raw));
    valid(violations, token)
}

/// The caller's address: from the mesh's TLS transport, else from tonic's own (plaintext).
fn peer_ip<T>(request: &Request<T>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|peer| peer.remote_addr)
        .or_else(|| request.remote_addr())
        .map(|addr| addr.ip())
}

fn token_pair(session: Session) -> TokenPair {
    TokenPair {
        access_token: session.access.expose().to_owned(),
        expires_in_seconds: i64::try_from(session.access.expires_in.as_secs()).unwrap_or(i64::MAX),
        refresh_token: session.refresh.expose().to_owned(),
        token_type: TOKEN_TYPE.to_owned(),
    }
}
