//! Billing's storage: accounts and the ledger of payments, in SQLite or PostgreSQL through one
//! sqlx `AnyPool` and portable SQL. Every money movement is one transaction that changes the
//! balance and records the payment together, or changes nothing.
//!
//! Two rules keep concurrent movements correct on both backends:
//! - a transaction's first statement writes the account row it is about to read (or updates it
//!   conditionally), so PostgreSQL queues concurrent movements of one account on the row lock and
//!   SQLite takes its write lock before reading anything (a deferred transaction that reads first
//!   could not upgrade later);
//! - the unique index on `idempotency_key` decides which of two concurrent requests with one key
//!   wins; the loser rolls back and answers with the winner's payment.

use mesh::{
    config::DatabaseConfig,
    pagination::Page,
    status::is_unique_violation,
    trace::{DbSystem, db_span},
};
use sqlx::{Any, AnyConnection, AnyPool, Executor, Transaction, migrate::Migrator};
use tracing::Instrument;

use crate::{
    domain::{
        Account, Charge, CurrencyCode, IdempotencyKey, IdempotentRequest, Money, Payment,
        PaymentId, PaymentKind, Refund, TopUp, UserId,
    },
    error::DomainError,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// What a money movement leaves behind: its payment and the account after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub payment: Payment,
    pub account: Account,
}

/// Billing's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The pool's database, for the query spans.
    db: DbSystem,
}

impl Store {
    /// Opens the database `config` names and applies billing's migrations.
    pub async fn open(config: &DatabaseConfig) -> Result<Self, mesh::store::StoreError> {
        let pool = mesh::store::open(config, &MIGRATOR).await?;
        Ok(Self {
            db: DbSystem::of(&pool),
            pool,
        })
    }

    /// The pool, for readiness checks.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A user's account; NOT_FOUND until the first top-up opens it.
    pub async fn account(&self, user_id: &UserId) -> Result<Account, DomainError> {
        find_account(self.db, &self.pool, user_id)
            .await?
            .ok_or_else(|| DomainError::AccountNotFound(user_id.clone()))
    }

    /// One payment by id.
    pub async fn payment(&self, id: &PaymentId) -> Result<Payment, DomainError> {
        let row: Option<PaymentRow> = sqlx::query_as(
            "SELECT id, user_id, kind, currency_code, amount_minor, idempotency_key, \
             refunded_payment_id, reference, create_ms FROM payments WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .instrument(db_span(self.db, "SELECT", "payments"))
        .await
        .map_err(DomainError::storage("reading a payment"))?;
        row.map(Payment::try_from)
            .transpose()?
            .ok_or_else(|| DomainError::PaymentNotFound(id.clone()))
    }

    /// One page of a user's payments, newest first, and the token of the next page (empty after
    /// the last). A user without payments has an empty list, not an error.
    pub async fn payments(
        &self,
        user_id: &UserId,
        page: &Page,
    ) -> Result<(Vec<Payment>, String), DomainError> {
        let query = match &page.after {
            None => sqlx::query_as(
                "SELECT id, user_id, kind, currency_code, amount_minor, idempotency_key, \
                 refunded_payment_id, reference, create_ms FROM payments \
                 WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(user_id.as_str())
            .bind(page.fetch_limit()),
            Some(after) => sqlx::query_as(
                "SELECT id, user_id, kind, currency_code, amount_minor, idempotency_key, \
                 refunded_payment_id, reference, create_ms FROM payments \
                 WHERE user_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .bind(user_id.as_str())
            .bind(after.as_str())
            .bind(page.fetch_limit()),
        };
        let rows: Vec<PaymentRow> = query
            .fetch_all(&self.pool)
            .instrument(db_span(self.db, "SELECT", "payments"))
            .await
            .map_err(DomainError::storage("listing payments"))?;
        let mut payments = rows
            .into_iter()
            .map(Payment::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next_page_token = page.finish(&mut payments, |p| p.id.as_str().to_owned());
        Ok((payments, next_page_token))
    }

    /// Adds money to an account, opening it in the amount's currency on first use.
    pub async fn top_up(&self, request: &TopUp) -> Result<Receipt, DomainError> {
        if let Some(receipt) = self.replay(request).await? {
            return Ok(receipt);
        }
        let now = mesh::timestamp::now_millis();
        let mut tx = self.begin("starting a top-up").await?;
        sqlx::query(
            "INSERT INTO accounts (user_id, currency_code, balance_minor, create_ms, update_ms) \
             VALUES ($1, $2, 0, $3, $3) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(request.user_id.as_str())
        .bind(request.amount.currency().as_str())
        .bind(now)
        .execute(&mut *tx)
        .instrument(db_span(self.db, "INSERT", "accounts"))
        .await
        .map_err(DomainError::storage("opening an account"))?;
        let account = lock_account(self.db, &mut tx, &request.user_id, now).await?;
        let balance_minor = account.balance_after_credit(&request.amount)?;
        set_balance(self.db, &mut tx, &account.user_id, balance_minor).await?;
        let payment = Payment {
            id: PaymentId::generate(),
            user_id: request.user_id.clone(),
            kind: PaymentKind::TopUp,
            amount: request.amount.clone(),
            idempotency_key: request.idempotency_key.clone(),
            refunded_payment_id: None,
            reference: String::new(),
            create_ms: now,
        };
        let account = Account {
            balance_minor,
            ..account
        };
        self.record(tx, request, payment, account).await
    }

    /// Takes money from an account when its balance covers it; otherwise nothing is written, so
    /// the same idempotency key may succeed later.
    pub async fn charge(&self, request: &Charge) -> Result<Receipt, DomainError> {
        if let Some(receipt) = self.replay(request).await? {
            return Ok(receipt);
        }
        let now = mesh::timestamp::now_millis();
        let mut tx = self.begin("starting a charge").await?;
        let debited = sqlx::query(
            "UPDATE accounts SET balance_minor = balance_minor - $1, update_ms = $2 \
             WHERE user_id = $3 AND currency_code = $4 AND balance_minor >= $1",
        )
        .bind(request.amount.amount_minor())
        .bind(now)
        .bind(request.user_id.as_str())
        .bind(request.amount.currency().as_str())
        .execute(&mut *tx)
        .instrument(db_span(self.db, "UPDATE", "accounts"))
        .await
        .map_err(DomainError::storage("debiting an account"))?;
        if debited.rows_affected() == 0 {
            let account = find_account(self.db, &mut *tx, &request.user_id).await?;
            return Err(request.refusal(account.as_ref()));
        }
        let account = find_account(self.db, &mut *tx, &request.user_id)
            .await?
            .ok_or_else(|| DomainError::AccountNotFound(request.user_id.clone()))?;
        let payment = Payment {
            id: PaymentId::generate(),
            user_id: request.user_id.clone(),
            kind: PaymentKind::Charge,
            amount: request.amount.clone(),
            idempotency_key: request.idempotency_key.clone(),
            refunded_payment_id: None,
            reference: request.reference.clone(),
            create_ms: now,
        };
        self.record(tx, request, payment, account).await
    }

    /// Gives back (part of) a charge to the account it was taken from; the refunds of a charge
    /// never add up to more than it.
    pub async fn refund(&self, request: &Refund) -> Result<Receipt, DomainError> {
        if let Some(receipt) = self.replay(request).await? {
            return Ok(receipt);
        }
        // Payments never change once written, so the charge can be read outside the transaction.
        let charge = self.payment(&request.payment_id).await?;
        let now = mesh::timestamp::now_millis();
        let mut tx = self.begin("starting a refund").await?;
        // Locking the account first also serialises concurrent refunds of this charge, so the
        // sum read below cannot miss one.
        let account = lock_account(self.db, &mut tx, &charge.user_id, now).await?;
        let refunded_minor: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) FROM payments \
             WHERE refunded_payment_id = $1",
        )
        .bind(charge.id.as_str())
        .fetch_one(&mut *tx)
        .instrument(db_span(self.db, "SELECT", "payments"))
        .await
        .map_err(DomainError::storage("summing refunds"))?;
        let amount = request.amount_from(&charge, refunded_minor)?;
        let balance_minor = account.balance_after_credit(&amount)?;
        set_balance(self.db, &mut tx, &account.user_id, balance_minor).await?;
        let payment = Payment {
            id: PaymentId::generate(),
            user_id: charge.user_id.clone(),
            kind: PaymentKind::Refund,
            amount,
            idempotency_key: request.idempotency_key.clone(),
            refunded_payment_id: Some(charge.id.clone()),
            reference: charge.reference.clone(),
            create_ms: now,
        };
        let account = Account {
            balance_minor,
            ..account
        };
        self.record(tx, request, payment, account).await
    }

    async fn begin(&self, context: &'static str) -> Result<Transaction<'static, Any>, DomainError> {
        self.pool
            .begin()
            .await
            .map_err(DomainError::storage(context))
    }

    /// The first result of `request` when its idempotency key was used before: the stored
    /// payment and the account as it is now. `None` when the key is new.
    async fn replay(
        &self,
        request: &impl IdempotentRequest,
    ) -> Result<Option<Receipt>, DomainError> {
        let key = request.idempotency_key();
        let Some(stored) = find_payment_by_key(self.db, &self.pool, key).await? else {
            return Ok(None);
        };
        if !request.is_repeated_by(&stored) {
            return Err(DomainError::IdempotencyKeyReused(key.clone()));
        }
        let account = self.account(&stored.user_id).await?;
        Ok(Some(Receipt {
            payment: stored,
            account,
        }))
    }

    /// Writes `payment` and commits `tx`; when a concurrent request with the same key committed
    /// first, rolls `tx` back (no money moves) and answers with that request's result.
    async fn record(
        &self,
        mut tx: Transaction<'static, Any>,
        request: &impl IdempotentRequest,
        payment: Payment,
        account: Account,
    ) -> Result<Receipt, DomainError> {
        match insert_payment(self.db, &mut tx, &payment).await {
            Ok(()) => {
                tx.commit()
                    .await
                    .map_err(DomainError::storage("committing a payment"))?;
                Ok(Receipt { payment, account })
            }
            Err(error) if is_unique_violation(&error) => {
                tx.rollback()
                    .await
                    .map_err(DomainError::storage("rolling back a duplicate payment"))?;
                match self.replay(request).await? {
                    Some(receipt) => Ok(receipt),
                    // Not the idempotency key that clashed: report the original failure.
                    None => Err(DomainError::storage("recording a payment")(error)),
                }
            }
            Err(error) => Err(DomainError::storage("recording a payment")(error)),
        }
    }
}

/// Locks `user_id`'s account row for the rest of the transaction and reads it, so that the
/// balance read is the one this transaction's update replaces (see the module doc).
async fn lock_account(
    db: DbSystem,
    conn: &mut AnyConnection,
    user_id: &UserId,
    now: i64,
) -> Result<Account, DomainError> {
    sqlx::query("UPDATE accounts SET update_ms = $1 WHERE user_id = $2")
        .bind(now)
        .bind(user_id.as_str())
        .execute(&mut *conn)
        .instrument(db_span(db, "UPDATE", "accounts"))
        .await
        .map_err(DomainError::storage("locking an account"))?;
    find_account(db, &mut *conn, user_id)
        .await?
        .ok_or_else(|| DomainError::AccountNotFound(user_id.clone()))
}

async fn set_balance(
    db: DbSystem,
    conn: &mut AnyConnection,
    user_id: &UserId,
    balance_minor: i64,
) -> Result<(), DomainError> {
    sqlx::query("UPDATE accounts SET balance_minor = $1 WHERE user_id = $2")
        .bind(balance_minor)
        .bind(user_id.as_str())
        .execute(conn)
        .instrument(db_span(db, "UPDATE", "accounts"))
        .await
        .map_err(DomainError::storage("crediting an account"))?;
    Ok(())
}

async fn insert_payment(
    db: DbSystem,
    conn: &mut AnyConnection,
    payment: &Payment,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (id, user_id, kind, currency_code, amount_minor, idempotency_key, \
         refunded_payment_id, reference, create_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(payment.id.as_str())
    .bind(payment.user_id.as_str())
    .bind(payment.kind.as_str())
    .bind(payment.amount.currency().as_str())
    .bind(payment.amount.amount_minor())
    .bind(payment.idempotency_key.as_str())
    .bind(payment.refunded_payment_id.as_ref().map(PaymentId::as_str))
    .bind(payment.reference.as_str())
    .bind(payment.create_ms)
    .execute(conn)
    .instrument(db_span(db, "INSERT", "payments"))
    .await?;
    Ok(())
}

async fn find_account<'e>(
    db: DbSystem,
    executor: impl Executor<'e, Database = Any>,
    user_id: &UserId,
) -> Result<Option<Account>, DomainError> {
    let row: Option<AccountRow> = sqlx::query_as(
        "SELECT user_id, currency_code, balance_minor, update_ms FROM accounts WHERE user_id = $1",
    )
    .bind(user_id.as_str())
    .fetch_optional(executor)
    .instrument(db_span(db, "SELECT", "accounts"))
    .await
    .map_err(DomainError::storage("reading an account"))?;
    row.map(Account::try_from).transpose()
}

async fn find_payment_by_key<'e>(
    db: DbSystem,
    executor: impl Executor<'e, Database = Any>,
    key: &IdempotencyKey,
) -> Result<Option<Payment>, DomainError> {
    let row: Option<PaymentRow> = sqlx::query_as(
        "SELECT id, user_id, kind, currency_code, amount_minor, idempotency_key, \
         refunded_payment_id, reference, create_ms FROM payments WHERE idempotency_key = $1",
    )
    .bind(key.as_str())
    .fetch_optional(executor)
    .instrument(db_span(db, "SELECT", "payments"))
    .await
    .map_err(DomainError::storage("looking up an idempotency key"))?;
    row.map(Payment::try_from).transpose()
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    user_id: String,
    currency_code: String,
    balance_minor: i64,
    update_ms: i64,
}

impl TryFrom<AccountRow> for Account {
    type Error = DomainError;

    fn try_from(row: AccountRow) -> Result<Self, Self::Error> {
        let corrupt = |reason: &str| DomainError::CorruptRow {
            table: "accounts",
            key: row.user_id.clone(),
            reason: reason.to_owned(),
        };
        Ok(Self {
            user_id: UserId::parse(&row.user_id).map_err(corrupt)?,
            currency: CurrencyCode::parse(&row.currency_code).map_err(corrupt)?,
            balance_minor: row.balance_minor,
            update_ms: row.update_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
struct PaymentRow {
    id: String,
    user_id: String,
    kind: String,
    currency_code: String,
    amount_minor: i64,
    idempotency_key: String,
    refunded_payment_id: Option<String>,
    reference: String,
    create_ms: i64,
}

impl TryFrom<PaymentRow> for Payment {
    type Error = DomainError;

    fn try_from(row: PaymentRow) -> Result<Self, Self::Error> {
        let corrupt = |reason: &str| DomainError::CorruptRow {
            table: "payments",
            key: row.id.clone(),
            reason: reason.to_owned(),
        };
        let currency = CurrencyCode::parse(&row.currency_code).map_err(corrupt)?;
        Ok(Self {
            id: PaymentId::parse(&row.id).map_err(corrupt)?,
            user_id: UserId::parse(&row.user_id).map_err(corrupt)?,
            kind: PaymentKind::parse(&row.kind).map_err(corrupt)?,
            amount: Money::new(currency, row.amount_minor).map_err(corrupt)?,
            idempotency_key: IdempotencyKey::parse(&row.idempotency_key)
                .map_err(|reason| corrupt(&reason))?,
            refunded_payment_id: row
                .refunded_payment_id
                .as_deref()
                .map(PaymentId::parse)
                .transpose()
                .map_err(corrupt)?,
            reference: row.reference,
            create_ms: row.create_ms,
        })
    }
}
