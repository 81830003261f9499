//! Orders in the database (SQLite or PostgreSQL through one `AnyPool`, portable SQL).
//!
//! Every status change is a conditional update (`WHERE id = $1 AND status = $2`): of two workers
//! finishing the same order (the saga and a recovery sweep, or two replicas), exactly one moves
//! it. A successful change also wakes this process's watchers early; watchers in other
//! processes see it by polling (see [`crate::watch`]).

use std::sync::Arc;

use mesh::{config::DatabaseConfig, pagination::Page, store::StoreError};
use sqlx::{AnyPool, migrate::Migrator};
use tokio::sync::watch;

use crate::{
    domain::{Item, NewOrder, Order, OrderStatus},
    error::DomainError,
};

/// This service's schema, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// `SELECT` of orders joined with their items, one row per item, from `$from` (a table or a
/// sub-query aliased `o`) followed by `$rest` (a `WHERE` and an `ORDER BY` that keeps an
/// order's rows together, items by position).
macro_rules! select_orders {
    ($from:literal, $rest:literal) => {
        concat!(
            "SELECT o.id, o.user_id, o.status, o.currency_code, o.total_minor, o.failure_reason, \
             o.payment_id, o.idempotency_key, o.create_ms, o.update_ms, \
             i.sku, i.quantity, i.unit_price_minor \
             FROM ",
            $from,
            " o JOIN order_items i ON i.order_id = o.id ",
            $rest
        )
    };
}

/// One row of [`select_orders!`]: an order's columns and one of its items.
#[derive(sqlx::FromRow)]
struct OrderItemRow {
    id: String,
    user_id: String,
    status: String,
    currency_code: String,
    total_minor: i64,
    failure_reason: Option<String>,
    payment_id: Option<String>,
    idempotency_key: String,
    create_ms: i64,
    update_ms: i64,
    sku: String,
    quantity: i32,
    unit_price_minor: i64,
}

/// A change of status, with what it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Paid; no payment for a free order (nothing was charged).
    Paid {
        payment_id: Option<String>,
    },
    PaymentFailed {
        reason: String,
    },
    Cancelled,
}

impl Transition {
    pub fn status(&self) -> OrderStatus {
        match self {
            Self::Paid { .. } => OrderStatus::Paid,
            Self::PaymentFailed { .. } => OrderStatus::PaymentFailed,
            Self::Cancelled => OrderStatus::Cancelled,
        }
    }
}

/// What [`Store::insert_pending`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// A new PENDING order.
    Created(Order),
    /// The user already placed an order with this idempotency key: that one.
    Existing(Order),
}

/// The orders database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    changes: Arc<watch::Sender<()>>,
}

impl Store {
    /// Opens (and migrates) the database `config` names.
    pub async fn open(config: &DatabaseConfig) -> Result<Self, StoreError> {
        Ok(Self::new(mesh::store::open(config, &MIGRATOR).await?))
    }

    /// A store over an already migrated pool.
    pub fn new(pool: AnyPool) -> Self {
        Self {
            pool,
            changes: Arc::new(watch::channel(()).0),
        }
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Ticks each time this process changes an order's status (a hint to look again: it does not
    /// say which order, and changes made by other processes do not tick it).
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Stores `order` as PENDING with its items, in one transaction; or returns the order the
    /// user already placed with the same idempotency key.
    pub async fn insert_pending(&self, order: &NewOrder) -> Result<Inserted, DomainError> {
        let now = mesh::timestamp::now_millis();
        let id = uuid::Uuid::now_v7().to_string();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(DomainError::storage("starting an order"))?;
        let inserted = sqlx::query(
            "INSERT INTO orders (id, user_id, status, currency_code, total_minor, \
             idempotency_key, create_ms, update_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(order.user_id())
        .bind(OrderStatus::Pending.as_str())
        .bind(order.currency_code())
        .bind(order.total_minor())
        .bind(order.idempotency_key())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if mesh::status::is_unique_violation(&error) => {
                // Another call with the same key got there first; the transaction is aborted.
                drop(tx);
                let existing = self
                    .find_by_key(order.user_id(), order.idempotency_key())
                    .await?
                    .ok_or_else(|| DomainError::Storage {
                        context: "reading the order with a duplicate idempotency key",
                        source: error,
                    })?;
                return Ok(Inserted::Existing(existing));
            }
            Err(error) => return Err(DomainError::storage("storing an order")(error)),
        }
        for (position, item) in (0_i32..).zip(order.items()) {
            sqlx::query(
                "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_minor) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&id)
            .bind(position)
            .bind(&item.sku)
            .bind(item.quantity)
            .bind(item.unit_price_minor)
            .execute(&mut *tx)
            .await
            .map_err(DomainError::storage("storing an order's items"))?;
        }
        tx.commit()
            .await
            .map_err(DomainError::storage("committing an order"))?;
        Ok(Inserted::Created(Order {
            id,
            user_id: order.user_id().to_owned(),
            status: OrderStatus::Pending,
            currency_code: order.currency_code().to_owned(),
            total_minor: order.total_minor(),
            items: order.items().to_vec(),
            failure_reason: None,
            payment_id: None,
            idempotency_key: order.idempotency_key().to_owned(),
            create_ms: now,
            update_ms: now,
        }))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Order>, DomainError> {
        let rows = sqlx::query_as::<_, OrderItemRow>(select_orders!(
            "orders",
            "WHERE o.id = $1 ORDER BY i.position"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(DomainError::storage("reading an order"))?;
        Ok(group(rows)?.pop())
    }

    /// The order `user_id` placed with `idempotency_key`, if any.
    pub async fn find_by_key(
        &self,
        user_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<Order>, DomainError> {
        let rows = sqlx::query_as::<_, OrderItemRow>(select_orders!(
            "orders",
            "WHERE o.user_id = $1 AND o.idempotency_key = $2 ORDER BY i.position"
        ))
        .bind(user_id)
        .bind(idempotency_key)
        .fetch_all(&self.pool)
        .await
        .map_err(DomainError::storage("reading an order by idempotency key"))?;
        Ok(group(rows)?.pop())
    }

    /// One page of a user's orders, newest first, and the token of the next page ("" at the end).
    pub async fn list_by_user(
        &self,
        user_id: &str,
        page: &Page,
    ) -> Result<(Vec<Order>, String), DomainError> {
        let rows = match &page.after {
            None => {
                sqlx::query_as::<_, OrderItemRow>(select_orders!(
                    "(SELECT * FROM orders WHERE user_id = $1 ORDER BY id DESC LIMIT $2)",
                    "ORDER BY o.id DESC, i.position"
                ))
                .bind(user_id)
                .bind(page.fetch_limit())
                .fetch_all(&self.pool)
                .await
            }
            Some(after) => {
                sqlx::query_as::<_, OrderItemRow>(select_orders!(
                    "(SELECT * FROM orders WHERE user_id = $1 AND id < $2 \
                     ORDER BY id DESC LIMIT $3)",
                    "ORDER BY o.id DESC, i.position"
                ))
                .bind(user_id)
                .bind(after)
                .bind(page.fetch_limit())
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(DomainError::storage("listing orders"))?;
        let mut orders = group(rows)?;
        let next_page_token = page.finish(&mut orders, |order| order.id.clone());
        Ok((orders, next_page_token))
    }

    /// At most `limit` orders still PENDING that were created at or before `created_by_ms`,
    /// oldest first.
    pub async fn pending_created_by(
        &self,
        created_by_ms: i64,
        limit: i64,
    ) -> Result<Vec<Order>, DomainError> {
        let rows = sqlx::query_as::<_, OrderItemRow>(select_orders!(
            "(SELECT * FROM orders WHERE status = 'PENDING' AND create_ms <= $1 \
             ORDER BY create_ms, id LIMIT $2)",
            "ORDER BY o.create_ms, o.id, i.position"
        ))
        .bind(created_by_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(DomainError::storage("listing pending orders"))?;
        group(rows)
    }

    /// Moves order `id` from `from` to the transition's status, only if it is still in `from`.
    /// Returns whether it moved (`false`: someone else moved it first, or it does not exist).
    pub async fn transition(
        &self,
        id: &str,
        from: OrderStatus,
        transition: &Transition,
    ) -> Result<bool, DomainError> {
        let (payment_id, failure_reason) = match transition {
            Transition::Paid { payment_id } => (payment_id.as_deref(), None),
            Transition::PaymentFailed { reason } => (None, Some(reason.as_str())),
            Transition::Cancelled => (None, None),
        };
        let result = sqlx::query(
            "UPDATE orders SET status = $1, payment_id = COALESCE($2, payment_id), \
             failure_reason = COALESCE($3, failure_reason), update_ms = $4 \
             WHERE id = $5 AND status = $6",
        )
        .bind(transition.status().as_str())
        .bind(payment_id)
        .bind(failure_reason)
        .bind(mesh::timestamp::now_millis())
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await
        .map_err(DomainError::storage("changing an order's status"))?;
        let moved = result.rows_affected() == 1;
        if moved {
            self.changes.send_replace(());
        }
        Ok(moved)
    }
}

/// Folds joined rows (an order's rows adjacent, items in order) into orders.
fn group(rows: Vec<OrderItemRow>) -> Result<Vec<Order>, DomainError> {
    let mut orders: Vec<Order> = Vec::new();
    for row in rows {
        let item = Item {
            sku: row.sku,
            quantity: row.quantity,
            unit_price_minor: row.unit_price_minor,
        };
        match orders.last_mut() {
            Some(order) if order.id == row.id => order.items.push(item),
            _ => {
                let status =
                    OrderStatus::parse(&row.status).ok_or_else(|| DomainError::Corrupt {
                        id: row.id.clone(),
                        reason: format!("unknown status `{}`", row.status),
                    })?;
                orders.push(Order {
                    id: row.id,
                    user_id: row.user_id,
                    status,
                    currency_code: row.currency_code,
                    total_minor: row.total_minor,
                    items: vec![item],
                    failure_reason: row.failure_reason,
                    payment_id: row.payment_id,
                    idempotency_key: row.idempotency_key,
                    create_ms: row.create_ms,
                    update_ms: row.update_ms,
                });
            }
        }
    }
    Ok(orders)
}

#[cfg(test)]
mod tests {
    use mesh::status::FieldViolations;
    use meshwork::{
        common::v1::Money,
        orders::v1::{CreateOrderRequest, OrderItem},
    };

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A fresh store on every database the tests run against (SQLite, and PostgreSQL when
    /// `TEST_POSTGRES_URL` is set), each in its own temporary directory or database.
    async fn stores(dir: &tempfile::TempDir) -> Result<Vec<Store>, StoreError> {
        let mut stores = Vec::new();
        for config in mesh::store::testing::all(dir.path(), "orders").await? {
            stores.push(Store::open(&config).await?);
        }
        Ok(stores)
    }

    fn new_order(user_id: &str, key: &str, prices: &[i64]) -> Result<NewOrder, tonic::Status> {
        NewOrder::parse(&CreateOrderRequest {
            user_id: user_id.to_owned(),
            items: prices
                .iter()
                .enumerate()
                .map(|(i, &amount_minor)| OrderItem {
                    sku: format!("sku-{i}"),
                    quantity: 2,
                    unit_price: Some(Money {
                        currency_code: "EUR".to_owned(),
                        amount_minor,
                    }),
                })
                .collect(),
            idempotency_key: key.to_owned(),
        })
    }

    async fn created(store: &Store, order: &NewOrder) -> Result<Order, Box<dyn std::error::Error>> {
        match store.insert_pending(order).await? {
            Inserted::Created(order) => Ok(order),
            Inserted::Existing(order) => Err(format!("unexpected existing order {order:?}").into()),
        }
    }

    #[tokio::test]
    async fn a_pending_order_is_stored_with_its_items_in_order() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let order = created(&store, &new_order("u1", "k1", &[30, 10, 20])?).await?;

            let stored = store.get(&order.id).await?;

            assert_eq!(stored.as_ref(), Some(&order));
            let skus: Vec<&str> = order.items.iter().map(|i| i.sku.as_str()).collect();
            assert_eq!(skus, vec!["sku-0", "sku-1", "sku-2"]);
            assert_eq!(
                (order.status, order.total_minor),
                (OrderStatus::Pending, 120)
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_repeated_key_returns_the_users_existing_order() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let first = created(&store, &new_order("u1", "k1", &[10])?).await?;

            let again = store.insert_pending(&new_order("u1", "k1", &[99])?).await?;
            let other_user = store.insert_pending(&new_order("u2", "k1", &[10])?).await?;

            assert_eq!(again, Inserted::Existing(first));
            assert!(matches!(other_user, Inserted::Created(_)));
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_status_changes_only_from_the_expected_status() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let order = created(&store, &new_order("u1", "k1", &[10])?).await?;
            let paid = Transition::Paid {
                payment_id: Some("pay-1".to_owned()),
            };
            let failed = Transition::PaymentFailed {
                reason: "declined".to_owned(),
            };

            let first = store
                .transition(&order.id, OrderStatus::Pending, &paid)
                .await?;
            let second = store
                .transition(&order.id, OrderStatus::Pending, &failed)
                .await?;

            assert!(first);
            assert!(!second);
            let stored = store.get(&order.id).await?.ok_or("order vanished")?;
            assert_eq!(stored.status, OrderStatus::Paid);
            assert_eq!(stored.payment_id.as_deref(), Some("pay-1"));
            assert_eq!(stored.failure_reason, None);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_status_change_wakes_subscribers() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let order = created(&store, &new_order("u1", "k1", &[10])?).await?;
            let changes = store.subscribe();

            let failed = Transition::PaymentFailed {
                reason: "declined".to_owned(),
            };
            store
                .transition(&order.id, OrderStatus::Pending, &failed)
                .await?;

            assert!(changes.has_changed()?);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_users_orders_are_listed_newest_first_a_page_at_a_time() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let mut ids = Vec::new();
            for key in ["k1", "k2", "k3"] {
                ids.push(created(&store, &new_order("u1", key, &[10, 20])?).await?.id);
            }
            created(&store, &new_order("u2", "k1", &[10])?).await?;
            let mut violations = FieldViolations::new();

            let (first, token) = store
                .list_by_user("u1", &Page::parse(2, "", &mut violations))
                .await?;
            let (second, last) = store
                .list_by_user("u1", &Page::parse(2, &token, &mut violations))
                .await?;

            assert!(violations.is_empty());
            let listed: Vec<&str> = first.iter().chain(&second).map(|o| o.id.as_str()).collect();
            assert_eq!(listed, vec![&ids[2], &ids[1], &ids[0]]);
            assert!(first.iter().chain(&second).all(|o| o.items.len() == 2));
            assert_eq!(last, "");
        }
        Ok(())
    }

    #[tokio::test]
    async fn only_old_enough_pending_orders_are_due_oldest_first() -> TestResult {
        let dir = tempfile::tempdir()?;
        for store in stores(&dir).await? {
            let older = created(&store, &new_order("u1", "k1", &[10])?).await?;
            let settled = created(&store, &new_order("u1", "k2", &[10])?).await?;
            let newer = created(&store, &new_order("u1", "k3", &[10])?).await?;
            let failed = Transition::PaymentFailed {
                reason: "declined".to_owned(),
            };
            store
                .transition(&settled.id, OrderStatus::Pending, &failed)
                .await?;

            let due = store.pending_created_by(newer.create_ms, 10).await?;
            let none_yet = store.pending_created_by(older.create_ms - 1, 10).await?;

            let due: Vec<&str> = due.iter().map(|o| o.id.as_str()).collect();
            assert_eq!(due, vec![older.id.as_str(), newer.id.as_str()]);
            assert!(none_yet.is_empty());
        }
        Ok(())
    }
}
