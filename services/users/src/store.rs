//! The users table: portable SQL (SQLite and PostgreSQL through one sqlx `AnyPool`), one
//! statement per operation, so every write is atomic without an explicit transaction. Takes
//! parsed domain values and returns stored [`User`]s; it knows nothing of gRPC.

use mesh::{
    pagination::Page,
    trace::{DbSystem, db_span},
};
use sqlx::AnyPool;
use tracing::Instrument;

use crate::{
    domain::{NewUser, User, UserChanges, UserId},
    error::DomainError,
};

/// The migrations that create the users table, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A user row as the database returns it.
#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    email: String,
    display_name: String,
    create_time: i64,
    update_time: i64,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        Self {
            id: row.id,
            email: row.email,
            display_name: row.display_name,
            create_time: row.create_time,
            update_time: row.update_time,
        }
    }
}

/// Reads and writes users.
#[derive(Debug, Clone)]
pub struct UserStore {
    pool: AnyPool,
    /// The pool's database, for the query spans.
    db: DbSystem,
}

impl UserStore {
    pub fn new(pool: AnyPool) -> Self {
        Self {
            db: DbSystem::of(&pool),
            pool,
        }
    }

    /// Stores a new user created at `now` (epoch milliseconds) with a fresh id.
    pub async fn create(&self, new: &NewUser, now: i64) -> Result<User, DomainError> {
        let row: UserRow = sqlx::query_as(
            "INSERT INTO users (id, email, display_name, create_time, update_time) \
             VALUES ($1, $2, $3, $4, $4) \
             RETURNING id, email, display_name, create_time, update_time",
        )
        .bind(UserId::generate().as_str())
        .bind(new.email.as_str())
        .bind(new.display_name.as_str())
        .bind(now)
        .fetch_one(&self.pool)
        .instrument(db_span(self.db, "INSERT", "users"))
        .await
        .map_err(|source| email_conflict(source, new.email.as_str(), "creating a user"))?;
        Ok(row.into())
    }

    pub async fn get(&self, id: &UserId) -> Result<User, DomainError> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, email, display_name, create_time, update_time FROM users WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .instrument(db_span(self.db, "SELECT", "users"))
        .await
        .map_err(|source| DomainError::Storage {
            context: "reading a user",
            source,
        })?;
        row.map(User::from).ok_or_else(|| not_found(id))
    }

    /// One page of users in id (so creation) order, and the token of the next page (empty when
    /// this is the last one).
    pub async fn list(&self, page: &Page) -> Result<(Vec<User>, String), DomainError> {
        // With no cursor, "" sorts before every id: the first page starts at the beginning.
        let after = page.after.as_deref().unwrap_or_default();
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT id, email, display_name, create_time, update_time FROM users \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(page.fetch_limit())
        .fetch_all(&self.pool)
        .instrument(db_span(self.db, "SELECT", "users"))
        .await
        .map_err(|source| DomainError::Storage {
            context: "listing users",
            source,
        })?;
        let mut users: Vec<User> = rows.into_iter().map(User::from).collect();
        let next_page_token = page.finish(&mut users, |user| user.id.clone());
        Ok((users, next_page_token))
    }

    /// Applies `changes` (fields left `None` keep their value) and sets the update time to
    /// `now`, in one statement.
    pub async fn update(
        &self,
        id: &UserId,
        changes: &UserChanges,
        now: i64,
    ) -> Result<User, DomainError> {
        let email = changes.email.as_ref().map(|e| e.as_str().to_owned());
        let display_name = changes.display_name.as_ref().map(|n| n.as_str().to_owned());
        let row: Option<UserRow> = sqlx::query_as(
            "UPDATE users SET email = COALESCE($2, email), \
             display_name = COALESCE($3, display_name), update_time = $4 \
             WHERE id = $1 \
             RETURNING id, email, display_name, create_time, update_time",
        )
        .bind(id.as_str())
        .bind(email.clone())
        .bind(display_name)
        .bind(now)
        .fetch_optional(&self.pool)
        .instrument(db_span(self.db, "UPDATE", "users"))
        .await
        .map_err(|source| {
            email_conflict(
                source,
                email.as_deref().unwrap_or_default(),
                "updating a user",
            )
        })?;
        row.map(User::from).ok_or_else(|| not_found(id))
    }

    pub async fn delete(&self, id: &UserId) -> Result<(), DomainError> {
        let result = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .instrument(db_span(self.db, "DELETE", "users"))
            .await
            .map_err(|source| DomainError::Storage {
                context: "deleting a user",
                source,
            })?;
        if result.rows_affected() == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}

fn not_found(id: &UserId) -> DomainError {
    DomainError::NotFound {
        id: id.as_str().to_owned(),
    }
}

/// The only unique column besides the (generated) id is the email, so a unique violation on a
/// write means the email belongs to another user.
fn email_conflict(source: sqlx::Error, email: &str, context: &'static str) -> DomainError {
    if mesh::status::is_unique_violation(&source) {
        DomainError::EmailTaken {
            email: email.to_owned(),
        }
    } else {
        DomainError::Storage { context, source }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use mesh::{config::DatabaseConfig, status::FieldViolations};

    use super::*;
    use crate::domain::{DisplayName, Email};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const T0: i64 = 1_700_000_000_000;
    const T1: i64 = T0 + 60_000;

    /// A store on each database the tests run against (SQLite, and PostgreSQL when configured),
    /// with the directory that keeps the SQLite file alive.
    async fn stores() -> Result<(tempfile::TempDir, Vec<UserStore>), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let mut stores = Vec::new();
        for config in mesh::store::testing::all(dir.path(), "users").await? {
            stores.push(open(&config).await?);
        }
        Ok((dir, stores))
    }

    async fn open(config: &DatabaseConfig) -> Result<UserStore, mesh::store::StoreError> {
        Ok(UserStore::new(mesh::store::open(config, &MIGRATOR).await?))
    }

    fn new_user(email: &str, name: &str) -> Result<NewUser, Box<dyn std::error::Error>> {
        Ok(NewUser {
            email: Email::parse(email)?,
            display_name: DisplayName::parse(name)?,
        })
    }

    #[tokio::test]
    async fn created_user_reads_back_unchanged() -> TestResult {
        let (_dir, stores) = stores().await?;
        for store in stores {
            let created = store
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            assert_eq!(created.email, "ada@example.com");
            assert_eq!(created.display_name, "Ada");
            assert_eq!((created.create_time, created.update_time), (T0, T0));
            let read = store.get(&UserId::parse(&created.id)?).await?;
            assert_eq!(read, created);
        }
        Ok(())
    }

    #[tokio::test]
    async fn duplicate_email_is_email_taken() -> TestResult {
        let (_dir, stores) = stores().await?;
        for store in stores {
            store
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            let second = store
                .create(&new_user("ada@example.com", "Other")?, T0)
                .await;
            assert!(
                matches!(&second, Err(DomainError::EmailTaken { email }) if email == "ada@example.com"),
                "{second:?}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn unknown_id_is_not_found_for_get_update_and_delete() -> TestResult {
        let (_dir, stores) = stores().await?;
        let id = UserId::parse("no-such-user")?;
        for store in stores {
            assert!(matches!(
                store.get(&id).await,
                Err(DomainError::NotFound { .. })
            ));
            let update = store.update(&id, &UserChanges::default(), T1).await;
            assert!(matches!(update, Err(DomainError::NotFound { .. })));
            assert!(matches!(
                store.delete(&id).await,
                Err(DomainError::NotFound { .. })
            ));
        }
        Ok(())
    }

    #[tokio::test]
    async fn update_changes_only_the_given_fields_and_the_update_time() -> TestResult {
        let (_dir, stores) = stores().await?;
        for store in stores {
            let created = store
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            let id = UserId::parse(&created.id)?;
            let changes = UserChanges {
                display_name: Some(DisplayName::parse("Countess")?),
                ..UserChanges::default()
            };
            let updated = store.update(&id, &changes, T1).await?;
            assert_eq!(updated.email, "ada@example.com");
            assert_eq!(updated.display_name, "Countess");
            assert_eq!((updated.create_time, updated.update_time), (T0, T1));
            assert_eq!(store.get(&id).await?, updated);
        }
        Ok(())
    }

    #[tokio::test]
    async fn update_to_another_users_email_is_email_taken() -> TestResult {
        let (_dir, stores) = stores().await?;
        for store in stores {
            store
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            let bob = store
                .create(&new_user("bob@example.com", "Bob")?, T0)
                .await?;
            let changes = UserChanges {
                email: Some(Email::parse("ada@example.com")?),
                ..UserChanges::default()
            };
            let result = store.update(&UserId::parse(&bob.id)?, &changes, T1).await;
            assert!(
                matches!(&result, Err(DomainError::EmailTaken { email }) if email == "ada@example.com"),
                "{result:?}"
            );
            assert_eq!(
                store.get(&UserId::parse(&bob.id)?).await?.email,
                "bob@example.com"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn deleted_user_is_gone() -> TestResult {
        let (_dir, stores) = stores().await?;
        for store in stores {
            let created = store
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            let id = UserId::parse(&created.id)?;
            store.delete(&id).await?;
            assert!(matches!(
                store.get(&id).await,
                Err(DomainError::NotFound { .. })
            ));
        }
        Ok(())
    }

    #[tokio::test]
    async fn pages_walk_every_user_once_in_creation_order() -> TestResult {
        const USERS: usize = 7;
        const PAGE_SIZE: i32 = 3;
        let (_dir, stores) = stores().await?;
        for store in stores {
            let mut created = Vec::new();
            for n in 0..USERS {
                let user = new_user(&format!("user{n}@example.com"), "User")?;
                created.push(store.create(&user, T0).await?.id);
            }
            let mut seen = Vec::new();
            let mut token = String::new();
            loop {
                let mut violations = FieldViolations::new();
                let page = Page::parse(PAGE_SIZE, &token, &mut violations);
                violations.into_result()?;
                let (users, next) = store.list(&page).await?;
                assert!(users.len() <= usize::try_from(PAGE_SIZE)?);
                seen.extend(users.into_iter().map(|u| u.id));
                if next.is_empty() {
                    break;
                }
                assert!(seen.len() < USERS, "a token after the last user");
                token = next;
            }
            assert_eq!(seen, created);
            assert_eq!(seen.iter().collect::<HashSet<_>>().len(), USERS);
        }
        Ok(())
    }

    #[tokio::test]
    async fn migrations_can_run_twice_on_one_database() -> TestResult {
        let dir = tempfile::tempdir()?;
        for config in mesh::store::testing::all(dir.path(), "users").await? {
            let first = open(&config).await?;
            first
                .create(&new_user("ada@example.com", "Ada")?, T0)
                .await?;
            let second = open(&config).await?;
            let first_page = Page::parse(0, "", &mut FieldViolations::new());
            let (users, _) = second.list(&first_page).await?;
            assert_eq!(users.len(), 1);
        }
        Ok(())
    }
}
