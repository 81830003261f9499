//! Auth's use cases, between the gRPC edge and the store: registering (a small saga across
//! users and auth's own database), logging in (throttled), rotating and revoking refresh
//! tokens, and publishing the key set. Inputs arrive already parsed into domain types.

use std::{net::IpAddr, sync::Arc, time::Duration};

use mesh::{client::MeshChannel, timestamp::now_millis};
use meshwork::{
    auth::v1::Jwk,
    users::v1::{CreateUserRequest, DeleteUserRequest, user_service_client::UserServiceClient},
};

use crate::{
    domain::{LoginEmail, Password, RefreshToken},
    error::DomainError,
    issuer::{AccessToken, Issuer},
    keyring::KeyRing,
    login_limits::LoginLimiter,
    password,
    store::{NewRefreshToken, Rotation, Store},
};

/// A signed-in session: the user, a fresh access token and the refresh token that renews it.
/// Its `Debug` shows neither token.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub access: AccessToken,
    pub refresh: RefreshToken,
}

/// The auth use cases. Cheap to clone: it is shared by every call.
#[derive(Clone)]
pub struct Accounts {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    users: UserServiceClient<MeshChannel>,
    keys: KeyRing,
    issuer: Issuer,
    limiter: Arc<LoginLimiter>,
    refresh_ttl: Duration,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("keys", &self.inner.keys)
            .field("issuer", &self.inner.issuer)
            .field("limiter", &self.inner.limiter)
            .field("refresh_ttl", &self.inner.refresh_ttl)
            .finish_non_exhaustive()
    }
}

/// What [`Accounts`] works with.
pub struct Parts {
    pub store: Store,
    pub users: UserServiceClient<MeshChannel>,
    /// The signing keys (shared with the periodic key check).
    pub keys: KeyRing,
    pub issuer: Issuer,
    /// The login limits (shared with the periodic clean-up).
    pub limiter: Arc<LoginLimiter>,
    pub refresh_ttl: Duration,
}

impl Accounts {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            store,
            users,
            keys,
            issuer,
            limiter,
            refresh_ttl,
        } = parts;
        Self {
            inner: Arc::new(Inner {
                store,
                users,
                keys,
                issuer,
                limiter,
                refresh_ttl,
            }),
        }
    }

    /// Creates the user through users, then stores their credentials; returns the user id.
    ///
    /// Email and display name are users' to validate: its refusals come back unchanged. If the
    /// credentials cannot be stored, the user just created is deleted again. Once users has been
    /// asked, the rest runs on its own task, so a caller hanging up cannot leave a user behind
    /// without credentials.
    pub async fn register(
        &self,
        email: String,
        display_name: String,
        password: Password,
    ) -> Result<String, DomainError> {
        let password_hash = password::hash(password).await?;
        let this = self.clone();
        tokio::spawn(async move {
            this.create_user_with(email, display_name, password_hash)
                .await
        })
        .await
        .map_err(|e| DomainError::Internal(format!("registration task: {e}")))?
    }

    async fn create_user_with(
        &self,
        email: String,
        display_name: String,
        password_hash: String,
    ) -> Result<String, DomainError> {
        let user = self
            .inner
            .users
            .clone()
            .create_user(CreateUserRequest {
                email,
                display_name,
            })
            .await
            .map_err(DomainError::from_users)?
            .into_inner()
            .user
            .ok_or_else(|| {
                DomainError::Internal("users created a user but returned none".into())
            })?;
        let stored = self
            .inner
            .store
            .insert_credentials(&user.id, &user.email, &password_hash, now_millis())
            .await;
        if let Err(error) = stored {
            self.delete_user(&user.id).await;
            return Err(error);
        }
        tracing::info!(user_id = %user.id, "registered");
        Ok(user.id)
    }

    /// The compensation of a registration that could not be completed.
    async fn delete_user(&self, user_id: &str) {
        let deleted = self
            .inner
            .users
            .clone()
            .delete_user(DeleteUserRequest {
                id: user_id.to_owned(),
            })
            .await;
        match deleted {
            Ok(_) => {
                tracing::warn!(%user_id, "registration undone: credentials could not be stored")
            }
            Err(status) => tracing::error!(
                %user_id,
                code = ?status.code(),
                message = status.message(),
                "registration failed and the user could not be deleted: it has no credentials"
            ),
        }
    }

    /// A new session when the password matches the account of `email`. An unknown email costs
    /// the same password verification as a known one and fails the same way. Attempts beyond
    /// the login limits (on the account, from `peer`) are refused before anything is verified.
    pub async fn login(
        &self,
        email: LoginEmail,
        password: Password,
        peer: Option<IpAddr>,
    ) -> Result<Session, DomainError> {
        self.inner.limiter.check(&email, peer)?;
        let credentials = self
            .inner
            .store
            .credentials_by_email(email.as_str())
            .await?;
        let (user_id, stored_hash) = match credentials {
            Some(c) => (Some(c.user_id), Some(c.password_hash)),
            None => (None, None),
        };
        let matches = password::verify(password, stored_hash).await?;
        match user_id {
            Some(user_id) if matches => self.start_session(user_id).await,
            _ => Err(DomainError::BadCredentials),
        }
    }

    /// Exchanges a current refresh token for a new session in the same family.
    pub async fn refresh(&self, presented: RefreshToken) -> Result<Session, DomainError> {
        let now = now_millis();
        // The key first: if it cannot be had, the presented token must stay usable.
        let key = self.inner.keys.signing_key(now).await?;
        let successor = RefreshToken::generate();
        let rotation = self
            .inner
            .store
            .rotate_refresh_token(
                &presented.hash(),
                &successor.hash(),
                self.refresh_expiry(now),
                now,
            )
            .await?;
        match rotation {
            Rotation::Rotated { user_id } => {
                let access = self.inner.issuer.issue(&key, &user_id, now)?;
                Ok(Session {
                    user_id,
                    access,
                    refresh: successor,
                })
            }
            Rotation::Reused { user_id, family_id } => {
                tracing::warn!(%user_id, %family_id, "rotated refresh token presented again: session revoked");
                Err(DomainError::RefreshTokenReused)
            }
            Rotation::Refused => Err(DomainError::InvalidRefreshToken),
        }
    }

    /// Revokes a refresh token; an unknown one is already as good as revoked.
    pub async fn logout(&self, token: RefreshToken) -> Result<(), DomainError> {
        self.inner
            .store
            .revoke_refresh_token(&token.hash(), now_millis())
            .await
    }

    /// Every public key that may have signed a live access token.
    pub async fn jwks(&self) -> Result<Vec<Jwk>, DomainError> {
        self.inner.keys.published(now_millis()).await
    }

    /// A new refresh token family for `user_id`, and an access token.
    async fn start_session(&self, user_id: String) -> Result<Session, DomainError> {
        let now = now_millis();
        let key = self.inner.keys.signing_key(now).await?;
        let refresh = RefreshToken::generate();
        let family_id = uuid::Uuid::now_v7().to_string();
        let hash = refresh.hash();
        let new = NewRefreshToken {
            hash: &hash,
            user_id: &user_id,
            family_id: &family_id,
            expires_ms: self.refresh_expiry(now),
        };
        self.inner.store.insert_refresh_token(&new, now).await?;
        let access = self.inner.issuer.issue(&key, &user_id, now)?;
        Ok(Session {
            user_id,
            access,
            refresh,
        })
    }

    fn refresh_expiry(&self, now_ms: i64) -> i64 {
        let ttl_ms = i64::try_from(self.inner.refresh_ttl.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyRecord;

    #[test]
    fn a_session_prints_no_token() -> Result<(), Box<dyn std::error::Error>> {
        let key = KeyRecord::generate(0, 0)?.signing_key()?;
        let access = Issuer::new(&crate::config::TokenConfig::default()).issue(&key, "u1", 0)?;
        let session = Session {
            user_id: "u1".to_owned(),
            access,
            refresh: RefreshToken::generate(),
        };
        let printed = format!("{session:?}");
        assert!(printed.contains("u1"), "{printed}");
        assert!(!printed.contains(session.access.expose()), "{printed}");
        assert!(!printed.contains(session.refresh.expose()), "{printed}");
        Ok(())
    }
}
