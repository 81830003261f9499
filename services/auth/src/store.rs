//! Auth's database: credentials, signing keys and refresh tokens, in portable SQL that runs on
//! SQLite and PostgreSQL alike. Every write that touches more than one row is one transaction.

use mesh::trace::{DbSystem, db_span};
use meshwork::auth::v1::Jwk;
use sqlx::AnyPool;
use tracing::Instrument;

use crate::{
    domain::RefreshTokenHash,
    error::DomainError,
    keys::{self, KeyRecord},
};

/// The embedded migrations, applied by [`mesh::store::open`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A user's stored credentials.
#[derive(Clone, sqlx::FromRow)]
pub struct Credentials {
    pub user_id: String,
    pub password_hash: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

/// A new refresh token to store.
#[derive(Debug, Clone)]
pub struct NewRefreshToken<'a> {
    pub hash: &'a RefreshTokenHash,
    pub user_id: &'a str,
    pub family_id: &'a str,
    pub expires_ms: i64,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// It was current: it is now revoked and its successor stored in the same family.
    Rotated { user_id: String },
    /// It had already been rotated: someone replayed it, so its whole family is now revoked.
    Reused { user_id: String, family_id: String },
    /// Unknown, expired, or revoked by logout: nothing changed.
    Refused,
}

#[derive(sqlx::FromRow)]
struct TokenOwner {
    user_id: String,
    family_id: String,
    replaced_by_hash: Option<String>,
}

#[derive(sqlx::FromRow)]
struct PublicKey {
    kid: String,
    public_key: String,
}

/// Auth's storage, over one pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The pool's database, for the query spans.
    db: DbSystem,
}

impl Store {
    pub fn new(pool: AnyPool) -> Self {
        Self {
            db: DbSystem::of(&pool),
            pool,
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Stores the credentials of a user users has just created with `email`.
    ///
    /// Users guarantees an email belongs to one user at most, and has just given `email` to
    /// `user_id`; so credentials still filed under `email` for another id are stale (that user
    /// was deleted, or moved to another email) and are replaced rather than blocking the email
    /// forever.
    pub async fn insert_credentials(
        &self,
        user_id: &str,
        email: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> Result<(), DomainError> {
        const CONTEXT: &str = "storing credentials";
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(DomainError::storage(CONTEXT))?;
        sqlx::query("DELETE FROM credentials WHERE email = $1 AND user_id <> $2")
            .bind(email)
            .bind(user_id)
            .execute(&mut *tx)
            .instrument(db_span(self.db, "DELETE", "credentials"))
            .await
            .map_err(DomainError::storage(CONTEXT))?;
        sqlx::query(
            "INSERT INTO credentials (user_id, email, password_hash, create_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(user_id)
        .bind(email)
        .bind(password_hash)
        .bind(now_ms)
        .execute(&mut *tx)
        .instrument(db_span(self.db, "INSERT", "credentials"))
        .await
        .map_err(DomainError::storage(CONTEXT))?;
        tx.commit().await.map_err(DomainError::storage(CONTEXT))
    }

    /// The credentials filed under a normalised email, if any.
    pub async fn credentials_by_email(
        &self,
        email: &str,
    ) -> Result<Option<Credentials>, DomainError> {
        sqlx::query_as::<_, Credentials>(
            "SELECT user_id, password_hash FROM credentials WHERE email = $1",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .instrument(db_span(self.db, "SELECT", "credentials"))
        .await
        .map_err(DomainError::storage("looking up credentials"))
    }

    /// The newest signing key (the highest generation: the one that signs), if any exists yet.
    pub async fn newest_signing_key(&self) -> Result<Option<KeyRecord>, DomainError> {
        sqlx::query_as::<_, KeyRecord>(
            "SELECT kid, private_key_pkcs8, public_key, generation, create_ms FROM signing_keys \
             ORDER BY generation DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .instrument(db_span(self.db, "SELECT", "signing_keys"))
        .await
        .map_err(DomainError::storage("loading the signing key"))
    }

    /// Stores `key` unless a key of its generation exists already; `false` when one did (another
    /// replica generated or rotated at the same moment, and its key is the one to use).
    pub async fn insert_signing_key(&self, key: &KeyRecord) -> Result<bool, DomainError> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_key_pkcs8, public_key, generation, create_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&key.kid)
        .bind(&key.private_key_pkcs8)
        .bind(&key.public_key)
        .bind(key.generation)
        .bind(key.create_ms)
        .execute(&self.pool)
        .instrument(db_span(self.db, "INSERT", "signing_keys"))
        .await
        .map(|done| done.rows_affected() == 1)
        .map_err(DomainError::storage("storing a signing key"))
    }

    /// The public keys that are not retired, oldest first, as JWKs. A key is retired once the
    /// key that replaced it was created before `retired_before_ms`. Read from the database on
    /// each call so that a key another replica created is published too.
    pub async fn public_keys(&self, retired_before_ms: i64) -> Result<Vec<Jwk>, DomainError> {
        let rows = sqlx::query_as::<_, PublicKey>(
            "SELECT kid, public_key FROM signing_keys \
             WHERE NOT EXISTS (SELECT 1 FROM signing_keys AS newer \
                 WHERE newer.generation > signing_keys.generation AND newer.create_ms < $1) \
             ORDER BY generation",
        )
        .bind(retired_before_ms)
        .fetch_all(&self.pool)
        .instrument(db_span(self.db, "SELECT", "signing_keys"))
        .await
        .map_err(DomainError::storage("listing signing keys"))?;
        Ok(rows
            .into_iter()
            .map(|row| keys::jwk(row.kid, row.public_key))
            .collect())
    }

    /// Deletes the keys that [`Self::public_keys`] no longer publishes: no token they signed is
    /// still valid, so their private halves are only a liability. Returns how many went.
    pub async fn delete_retired_signing_keys(
        &self,
        retired_before_ms: i64,
    ) -> Result<u64, DomainError> {
        sqlx::query(
            "DELETE FROM signing_keys \
             WHERE EXISTS (SELECT 1 FROM signing_keys AS newer \
                 WHERE newer.generation > signing_keys.generation AND newer.create_ms < $1)",
        )
        .bind(retired_before_ms)
        .execute(&self.pool)
        .instrument(db_span(self.db, "DELETE", "signing_keys"))
        .await
        .map(|done| done.rows_affected())
        .map_err(DomainError::storage("deleting retired signing keys"))
    }

    /// Stores a refresh token that starts (or continues) a family.
    pub async fn insert_refresh_token(
        &self,
        token: &NewRefreshToken<'_>,
        now_ms: i64,
    ) -> Result<(), DomainError> {
        sqlx::query(INSERT_REFRESH_TOKEN)
            .bind(token.hash.as_str())
            .bind(token.user_id)
            .bind(token.family_id)
            .bind(token.expires_ms)
            .bind(now_ms)
            .execute(&self.pool)
            .instrument(db_span(self.db, "INSERT", "refresh_tokens"))
            .await
            .map(drop)
            .map_err(DomainError::storage("storing a refresh token"))
    }

    /// Exchanges the presented token for `successor` (same user, same family) in one
    /// transaction. The presented token is revoked by a conditional update, so of two
    /// concurrent rotations of one token exactly one succeeds; presenting a token that was
    /// already rotated revokes every token of its family.
    pub async fn rotate_refresh_token(
        &self,
        presented: &RefreshTokenHash,
        successor: &RefreshTokenHash,
        successor_expires_ms: i64,
        now_ms: i64,
    ) -> Result<Rotation, DomainError> {
        const CONTEXT: &str = "rotating a refresh token";
        let storage = DomainError::storage;
        let mut tx = self.pool.begin().await.map_err(storage(CONTEXT))?;
        // Writing first takes SQLite's write lock at once, and PostgreSQL's row lock.
        let revoked = sqlx::query(
            "UPDATE refresh_tokens SET revoked_ms = $2, replaced_by_hash = $3 \
             WHERE token_hash = $1 AND revoked_ms IS NULL AND expires_ms > $2",
        )
        .bind(presented.as_str())
        .bind(now_ms)
        .bind(successor.as_str())
        .execute(&mut *tx)
        .instrument(db_span(self.db, "UPDATE", "refresh_tokens"))
        .await
        .map_err(storage(CONTEXT))?;

        let owner = sqlx::query_as::<_, TokenOwner>(
            "SELECT user_id, family_id, replaced_by_hash FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(presented.as_str())
        .fetch_optional(&mut *tx)
        .instrument(db_span(self.db, "SELECT", "refresh_tokens"))
        .await
        .map_err(storage(CONTEXT))?;

        let rotation = match owner {
            Some(owner) if revoked.rows_affected() == 1 => {
                sqlx::query(INSERT_REFRESH_TOKEN)
                    .bind(successor.as_str())
                    .bind(&owner.user_id)
                    .bind(&owner.family_id)
                    .bind(successor_expires_ms)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .instrument(db_span(self.db, "INSERT", "refresh_tokens"))
                    .await
                    .map_err(storage(CONTEXT))?;
                Rotation::Rotated {
                    user_id: owner.user_id,
                }
            }
            Some(owner) if owner.replaced_by_hash.is_some() => {
                sqlx::query(
                    "UPDATE refresh_tokens SET revoked_ms = $2 \
                     WHERE family_id = $1 AND revoked_ms IS NULL",
                )
                .bind(&owner.family_id)
                .bind(now_ms)
                .execute(&mut *tx)
                .instrument(db_span(self.db, "UPDATE", "refresh_tokens"))
                .await
                .map_err(storage(CONTEXT))?;
                Rotation::Reused {
                    user_id: owner.user_id,
                    family_id: owner.family_id,
                }
            }
            _ => Rotation::Refused,
        };
        tx.commit().await.map_err(storage(CONTEXT))?;
        Ok(rotation)
    }

    /// Revokes one refresh token; an unknown or already revoked token changes nothing.
    pub async fn revoke_refresh_token(
        &self,
        token: &RefreshTokenHash,
        now_ms: i64,
    ) -> Result<(), DomainError> {
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_ms = $2 \
             WHERE token_hash = $1 AND revoked_ms IS NULL",
        )
        .bind(token.as_str())
        .bind(now_ms)
        .execute(&self.pool)
        .instrument(db_span(self.db, "UPDATE", "refresh_tokens"))
        .await
        .map(drop)
        .map_err(DomainError::storage("revoking a refresh token"))
    }
}

const INSERT_REFRESH_TOKEN: &str = "INSERT INTO refresh_tokens \
     (token_hash, user_id, family_id, expires_ms, revoked_ms, replaced_by_hash, create_ms) \
     VALUES ($1, $2, $3, $4, NULL, NULL, $5)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RefreshToken;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const NOW: i64 = 1_700_000_000_000;
    const LATER: i64 = NOW + 60_000;
    const TTL_MS: i64 = 3_600_000;

    /// A store on every configured backend, each in its own fresh database.
    async fn stores(dir: &tempfile::TempDir) -> Result<Vec<Store>, Box<dyn std::error::Error>> {
        let mut stores = Vec::new();
        for config in mesh::store::testing::all(dir.path(), "auth").await? {
            stores.push(Store::new(mesh::store::open(&config, &MIGRATOR).await?));
        }
        Ok(stores)
    }

    fn hash() -> RefreshTokenHash {
        RefreshToken::generate().hash()
    }

    async fn start_family(
        store: &Store,
        user_id: &str,
        family_id: &str,
    ) -> Result<RefreshTokenHash, DomainError> {
        let token = hash();
        let new = NewRefreshToken {
            hash: &token,
            user_id,
            family_id,
            expires_ms: NOW + TTL_MS,
        };
        store.insert_refresh_token(&new, NOW).await?;
        Ok(token)
    }

    #[tokio::test]
    async fn credentials_are_found_by_email() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            store
                .insert_credentials("u1", "ada@example.com", "phc", NOW)
                .await?;
            let found = store.credentials_by_email("ada@example.com").await?;
            assert_eq!(
                found.map(|c| (c.user_id, c.password_hash)),
                Some(("u1".to_owned(), "phc".to_owned()))
            );
            assert!(
                store
                    .credentials_by_email("bob@example.com")
                    .await?
                    .is_none()
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn stale_credentials_of_an_email_are_replaced() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            store
                .insert_credentials("old", "ada@example.com", "old-phc", NOW)
                .await?;
            store
                .insert_credentials("new", "ada@example.com", "new-phc", LATER)
                .await?;
            let found = store.credentials_by_email("ada@example.com").await?;
            assert_eq!(found.map(|c| c.user_id), Some("new".to_owned()));
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_user_has_one_set_of_credentials() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            store
                .insert_credentials("u1", "ada@example.com", "phc", NOW)
                .await?;
            let second = store
                .insert_credentials("u1", "other@example.com", "phc", NOW)
                .await;
            assert!(matches!(second, Err(DomainError::Storage { .. })));
            let kept = store.credentials_by_email("ada@example.com").await?;
            assert_eq!(kept.map(|c| c.user_id), Some("u1".to_owned()));
        }
        Ok(())
    }

    fn kids(keys: Vec<Jwk>) -> Vec<String> {
        keys.into_iter().map(|k| k.kid).collect()
    }

    #[tokio::test]
    async fn newest_signing_key_signs_and_all_are_published() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            assert!(store.newest_signing_key().await?.is_none());
            let old = KeyRecord::generate(0, NOW)?;
            let new = KeyRecord::generate(1, LATER)?;
            assert!(store.insert_signing_key(&old).await?);
            assert!(store.insert_signing_key(&new).await?);
            let newest = store.newest_signing_key().await?;
            assert_eq!(
                newest.as_ref().map(|k| k.kid.as_str()),
                Some(new.kid.as_str())
            );
            // What was stored reads back as a working key.
            assert!(newest.map(|k| k.signing_key()).transpose().is_ok());
            let published = kids(store.public_keys(NOW).await?);
            assert_eq!(published, vec![old.kid, new.kid]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_generation_is_stored_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let first = KeyRecord::generate(0, NOW)?;
            let rival = KeyRecord::generate(0, NOW)?;
            assert!(store.insert_signing_key(&first).await?);
            assert!(!store.insert_signing_key(&rival).await?);
            let newest = store.newest_signing_key().await?;
            assert_eq!(newest.map(|k| k.kid), Some(first.kid.clone()));
            assert_eq!(kids(store.public_keys(NOW).await?), vec![first.kid]);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_key_replaced_before_the_cutoff_is_retired_then_deleted() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let old = KeyRecord::generate(0, NOW)?;
            let new = KeyRecord::generate(1, LATER)?;
            store.insert_signing_key(&old).await?;
            store.insert_signing_key(&new).await?;

            // Replaced at LATER: published while the cutoff is not past LATER.
            assert_eq!(store.public_keys(LATER).await?.len(), 2);
            assert_eq!(store.delete_retired_signing_keys(LATER).await?, 0);
            assert_eq!(
                kids(store.public_keys(LATER + 1).await?),
                vec![new.kid.clone()]
            );
            assert_eq!(store.delete_retired_signing_keys(LATER + 1).await?, 1);
            // The newest key is never retired, however late.
            assert_eq!(
                kids(store.public_keys(i64::MAX).await?),
                vec![new.kid.clone()]
            );
            assert_eq!(store.delete_retired_signing_keys(i64::MAX).await?, 0);
            let newest = store.newest_signing_key().await?;
            assert_eq!(newest.map(|k| k.kid), Some(new.kid));
        }
        Ok(())
    }

    #[tokio::test]
    async fn keys_stored_before_generations_are_numbered_by_age() -> TestResult {
        let dir = tempfile::tempdir()?;
        sqlx::any::install_default_drivers();
        for config in mesh::store::testing::all(dir.path(), "auth").await? {
            // A database as the first version of auth left it, with three keys.
            let url = match mesh::store::Backend::of_url(&config.url)? {
                mesh::store::Backend::Sqlite => format!("{}?mode=rwc", config.url),
                mesh::store::Backend::Postgres => config.url.clone(),
            };
            let pool = AnyPool::connect(&url).await?;
            sqlx::raw_sql(include_str!("../migrations/0001_init.sql"))
                .execute(&pool)
                .await?;
            // Two of the same age (ordered by kid, as the first version did), then a newer one;
            // inserted out of order.
            let (first, second, third) = ("kid-a", "kid-b", "kid-c");
            for (kid, create_ms) in [(third, LATER), (second, NOW), (first, NOW)] {
                let record = KeyRecord::generate(0, create_ms)?;
                sqlx::query(
                    "INSERT INTO signing_keys (kid, private_key_pkcs8, public_key, create_ms) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(kid)
                .bind(&record.private_key_pkcs8)
                .bind(&record.public_key)
                .bind(create_ms)
                .execute(&pool)
                .await?;
            }
            pool.close().await;

            let store = Store::new(mesh::store::open(&config, &MIGRATOR).await?);
            let found = store.newest_signing_key().await?;
            assert_eq!(
                found.map(|k| (k.kid, k.generation)),
                Some((third.to_owned(), 2))
            );
            assert_eq!(
                kids(store.public_keys(NOW).await?),
                vec![first, second, third]
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn rotation_replaces_the_token_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let first = start_family(&store, "u1", "f1").await?;
            let second = hash();
            let rotated = store
                .rotate_refresh_token(&first, &second, LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(
                rotated,
                Rotation::Rotated {
                    user_id: "u1".to_owned()
                }
            );
            let third = hash();
            let next = store
                .rotate_refresh_token(&second, &third, LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(
                next,
                Rotation::Rotated {
                    user_id: "u1".to_owned()
                }
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn reusing_a_rotated_token_revokes_its_family_only() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let first = start_family(&store, "u1", "f1").await?;
            let other_family = start_family(&store, "u1", "f2").await?;
            let second = hash();
            store
                .rotate_refresh_token(&first, &second, LATER + TTL_MS, LATER)
                .await?;

            let replay = store
                .rotate_refresh_token(&first, &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(
                replay,
                Rotation::Reused {
                    user_id: "u1".to_owned(),
                    family_id: "f1".to_owned()
                }
            );
            let newest = store
                .rotate_refresh_token(&second, &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(newest, Rotation::Refused);
            let untouched = store
                .rotate_refresh_token(&other_family, &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(
                untouched,
                Rotation::Rotated {
                    user_id: "u1".to_owned()
                }
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn unknown_and_expired_tokens_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let unknown = store
                .rotate_refresh_token(&hash(), &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(unknown, Rotation::Refused);
            let token = start_family(&store, "u1", "f1").await?;
            let after_expiry = NOW + TTL_MS;
            let expired = store
                .rotate_refresh_token(&token, &hash(), after_expiry + TTL_MS, after_expiry)
                .await?;
            assert_eq!(expired, Rotation::Refused);
        }
        Ok(())
    }

    #[tokio::test]
    async fn revoked_token_is_refused_without_revoking_others() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let token = start_family(&store, "u1", "f1").await?;
            let other = start_family(&store, "u1", "f2").await?;
            store.revoke_refresh_token(&token, LATER).await?;
            store.revoke_refresh_token(&token, LATER).await?;
            store.revoke_refresh_token(&hash(), LATER).await?;
            let refused = store
                .rotate_refresh_token(&token, &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(refused, Rotation::Refused);
            let fine = store
                .rotate_refresh_token(&other, &hash(), LATER + TTL_MS, LATER)
                .await?;
            assert_eq!(
                fine,
                Rotation::Rotated {
                    user_id: "u1".to_owned()
                }
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn migrations_are_safe_to_run_twice() -> TestResult {
        let dir = tempfile::tempdir()?;
        let config = mesh::store::testing::sqlite(dir.path(), "auth");
        mesh::store::open(&config, &MIGRATOR).await?;
        let pool = mesh::store::open(&config, &MIGRATOR).await?;
        assert!(mesh::store::ping(&pool).await);
        Ok(())
    }
}
