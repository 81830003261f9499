//! The order saga, and the only code that talks to users and billing.
//!
//! Placing an order: check the user exists (users.GetUser), persist the order PENDING with its
//! items, charge the total (billing.Charge, idempotency key `order:<id>:charge`), then move it
//! to PAID or PAYMENT_FAILED with a conditional update. When billing's answer is unknown
//! (unreachable, deadline) the order stays PENDING and recovery charges it again later with the
//! same key, so billing moves the money at most once however often the charge is sent.
//! Cancelling refunds a paid order (key `order:<id>:refund`) before marking it CANCELLED.
//!
//! Each step runs in its own span (`saga.check_user`, `saga.persist_pending`, `saga.charge`,
//! `saga.mark_paid` / `saga.mark_payment_failed`, `saga.refund`, `saga.mark_cancelled`), and
//! each store call in a database span inside it, so a trace shows where an order spent its time.

use std::time::Duration;

use mesh::{
    client::MeshChannel,
    trace::{DbSystem, db_span},
};
use meshwork::{
    billing::v1::{ChargeRequest, RefundRequest, billing_service_client::BillingServiceClient},
    common::v1::Money,
    users::v1::{GetUserRequest, user_service_client::UserServiceClient},
};
use tonic::Code;
use tracing::{Instrument, Span, field::Empty};

use crate::{
    domain::{NewOrder, Order, OrderStatus},
    error::DomainError,
    store::{Inserted, Store, Transition},
};

/// Most PENDING orders one query of a sweep loads; a sweep keeps going batch after batch, so
/// this only bounds memory.
const SWEEP_BATCH: i64 = 100;
/// The orders table, as database spans name it.
const ORDERS_TABLE: &str = "orders";

/// How billing answered a charge.
#[derive(Debug)]
enum Charge {
    /// Charged (or nothing to charge, for a free order).
    Paid { payment_id: Option<String> },
    /// Billing refused: final.
    Declined { reason: String },
    /// No answer we can act on (unreachable, timed out, failed): try again later.
    Unsettled { reason: String },
}

/// Billing refusals that retrying the same charge will not change.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound
    )
}

/// What one recovery sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Orders the sweep found PENDING and moved to PAID.
    pub paid: usize,
    /// Orders the sweep found PENDING and moved to PAYMENT_FAILED.
    pub payment_failed: usize,
    /// Orders still PENDING after the sweep (billing still unreachable).
    pub still_pending: usize,
}

/// Runs sagas. Cheap to clone (the clients share their channels).
#[derive(Clone)]
pub struct Saga {
    store: Store,
    /// The store's database, for its spans.
    db: DbSystem,
    users: UserServiceClient<MeshChannel>,
    billing: BillingServiceClient<MeshChannel>,
}

impl Saga {
    pub fn new(
        store: Store,
        users: UserServiceClient<MeshChannel>,
        billing: BillingServiceClient<MeshChannel>,
    ) -> Self {
        Self {
            db: DbSystem::of(store.pool()),
            store,
            users,
            billing,
        }
    }

    /// The span of one store call, inside the current step's.
    fn query(&self, operation: &'static str) -> Span {
        db_span(self.db, operation, ORDERS_TABLE)
    }

    /// Places `order`: a repeated idempotency key returns the order first placed with it
    /// (resuming its saga when it is still PENDING, which charges nothing twice).
    pub async fn create(&self, order: NewOrder) -> Result<Order, DomainError> {
        if let Some(existing) = self
            .store
            .find_by_key(order.user_id(), order.idempotency_key())
            .instrument(self.query("SELECT"))
            .await?
        {
            return self.resume(existing).await;
        }
        self.check_user(order.user_id()).await?;
        match self.persist_pending(&order).await? {
            Inserted::Created(order) => self.settle(order).await,
            Inserted::Existing(existing) => self.resume(existing).await,
        }
    }

    async fn resume(&self, order: Order) -> Result<Order, DomainError> {
        if order.status == OrderStatus::Pending {
            self.settle(order).await
        } else {
            Ok(order)
        }
    }

    #[tracing::instrument(name = "saga.check_user", skip_all, fields(user.id = user_id))]
    async fn check_user(&self, user_id: &str) -> Result<(), DomainError> {
        let request = GetUserRequest {
            id: user_id.to_owned(),
        };
        match self.users.clone().get_user(request).await {
            Ok(_) => Ok(()),
            // An id users cannot even parse names no user either.
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                Err(DomainError::UserNotFound(user_id.to_owned()))
            }
            Err(status) => Err(DomainError::UsersUnavailable(describe(&status))),
        }
    }

    #[tracing::instrument(name = "saga.persist_pending", skip_all)]
    async fn persist_pending(&self, order: &NewOrder) -> Result<Inserted, DomainError> {
        self.store
            .insert_pending(order)
            .instrument(self.query("INSERT"))
            .await
    }

    /// Charges a PENDING order and records the outcome; leaves it PENDING when the outcome is
    /// unknown. Returns the order as stored afterwards.
    pub async fn settle(&self, order: Order) -> Result<Order, DomainError> {
        let transition = match self.charge(&order).await {
            Charge::Paid { payment_id } => Transition::Paid { payment_id },
            Charge::Declined { reason } => Transition::PaymentFailed { reason },
            Charge::Unsettled { reason } => {
                tracing::warn!(order_id = %order.id, %reason, "charge unsettled, the order stays PENDING");
                return self.current(&order.id).await;
            }
        };
        let moved = self
            .transition(&order.id, OrderStatus::Pending, &transition)
            .await?;
        match &transition {
            Transition::Paid { .. } if moved => tracing::info!(order_id = %order.id, "order paid"),
            Transition::PaymentFailed { reason } if moved => {
                tracing::info!(order_id = %order.id, %reason, "order payment failed");
            }
            _ => {}
        }
        let current = self.current(&order.id).await?;
        if !moved
            && let Transition::Paid {
                payment_id: Some(payment_id),
            } = &transition
            && current.payment_id.as_ref() != Some(payment_id)
        {
            // Another worker finished this order first with a refusal (its charge was declined,
            // then a top-up let ours through): give the money back.
            self.compensate(&current, payment_id).await;
        }
        Ok(current)
    }

    #[tracing::instrument(
        name = "saga.charge",
        skip_all,
        fields(order.id = %order.id, charge.outcome = Empty)
    )]
    async fn charge(&self, order: &Order) -> Charge {
        let charge = self.ask_billing(order).await;
        let outcome = match &charge {
            Charge::Paid { .. } => "paid",
            Charge::Declined { .. } => "declined",
            Charge::Unsettled { .. } => "unsettled",
        };
        Span::current().record("charge.outcome", outcome);
        charge
    }

    async fn ask_billing(&self, order: &Order) -> Charge {
        if order.total_minor == 0 {
            return Charge::Paid { payment_id: None };
        }
        let request = ChargeRequest {
            user_id: order.user_id.clone(),
            amount: Some(Money {
                currency_code: order.currency_code.clone(),
                amount_minor: order.total_minor,
            }),
            idempotency_key: order.charge_key(),
            reference: order.payment_reference(),
        };
        match self.billing.clone().charge(request).await {
            Ok(response) => match response.into_inner().payment {
                Some(payment) => Charge::Paid {
                    payment_id: Some(payment.id),
                },
                None => Charge::Unsettled {
                    reason: "billing answered without a payment".to_owned(),
                },
            },
            Err(status) if is_refusal(status.code()) => Charge::Declined {
                reason: status.message().to_owned(),
            },
            Err(status) => Charge::Unsettled {
                reason: describe(&status),
            },
        }
    }

    async fn compensate(&self, order: &Order, payment_id: &str) {
        match self.refund(order, payment_id).await {
            Ok(()) => {
                tracing::warn!(order_id = %order.id, payment_id, "refunded a charge that lost the race to a payment failure")
            }
            Err(error) => {
                tracing::error!(order_id = %order.id, payment_id, %error, "a charge for an order that is not PAID could not be refunded: refund it by hand")
            }
        }
    }

    /// Cancels order `id`: refunds it first when it was paid. Cancelling twice is harmless.
    pub async fn cancel(&self, id: &str) -> Result<Order, DomainError> {
        let order = self.current(id).await?;
        match order.status {
            OrderStatus::Pending => Err(DomainError::PaymentInProgress(order.id)),
            OrderStatus::Cancelled => Ok(order),
            OrderStatus::PaymentFailed => self.mark_cancelled(order).await,
            OrderStatus::Paid => {
                if let Some(payment_id) = &order.payment_id {
                    self.refund(&order, payment_id).await?;
                }
                self.mark_cancelled(order).await
            }
        }
    }

    #[tracing::instrument(name = "saga.refund", skip_all, fields(order.id = %order.id))]
    async fn refund(&self, order: &Order, payment_id: &str) -> Result<(), DomainError> {
        let request = RefundRequest {
            payment_id: payment_id.to_owned(),
            amount: None,
            idempotency_key: order.refund_key(),
        };
        match self.billing.clone().refund(request).await {
            Ok(_) => Ok(()),
            Err(status) if is_refusal(status.code()) => {
                Err(DomainError::RefundRefused(status.message().to_owned()))
            }
            Err(status) => Err(DomainError::BillingUnavailable(describe(&status))),
        }
    }

    async fn mark_cancelled(&self, order: Order) -> Result<Order, DomainError> {
        // From PAID or PAYMENT_FAILED the only move is to CANCELLED, so when this loses a race
        // the order is CANCELLED all the same.
        self.transition(&order.id, order.status, &Transition::Cancelled)
            .await?;
        self.current(&order.id).await
    }

    /// Moves order `id` from `from` as `transition` says, in the span of that step; whether it
    /// moved.
    async fn transition(
        &self,
        id: &str,
        from: OrderStatus,
        transition: &Transition,
    ) -> Result<bool, DomainError> {
        let step = match transition {
            Transition::Paid { .. } => tracing::info_span!("saga.mark_paid", order.id = id),
            Transition::PaymentFailed { .. } => {
                tracing::info_span!("saga.mark_payment_failed", order.id = id)
            }
            Transition::Cancelled => tracing::info_span!("saga.mark_cancelled", order.id = id),
        };
        let query = step.in_scope(|| self.query("UPDATE"));
        self.store
            .transition(id, from, transition)
            .instrument(query)
            .instrument(step)
            .await
    }

    /// Resumes every order PENDING for at least `min_age`: charges it again with its own key
    /// and records the outcome. Stops early, leaving the rest for the next sweep, as soon as
    /// billing cannot be reached.
    pub async fn sweep(&self, min_age: Duration) -> Result<SweepReport, DomainError> {
        let min_age_ms = i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX);
        let created_by = mesh::timestamp::now_millis().saturating_sub(min_age_ms);
        let mut report = SweepReport::default();
        loop {
            let batch = self
                .store
                .pending_created_by(created_by, SWEEP_BATCH)
                .instrument(self.query("SELECT"))
                .await?;
            let full = i64::try_from(batch.len()).is_ok_and(|n| n == SWEEP_BATCH);
            let mut orders = batch.into_iter();
            while let Some(order) = orders.next() {
                match self.settle(order).await?.status {
                    OrderStatus::Paid => report.paid += 1,
                    OrderStatus::PaymentFailed => report.payment_failed += 1,
                    // Cancelled can only follow a payment outcome that another worker recorded.
                    OrderStatus::Cancelled => {}
                    OrderStatus::Pending => {
                        report.still_pending += 1 + orders.len();
                        return Ok(report);
                    }
                }
            }
            if !full {
                return Ok(report);
            }
        }
    }

    /// The stored order `id`, or NOT_FOUND.
    async fn current(&self, id: &str) -> Result<Order, DomainError> {
        self.store
            .get(id)
            .instrument(self.query("SELECT"))
            .await?
            .ok_or_else(|| DomainError::OrderNotFound(id.to_owned()))
    }
}

/// A downstream failure, for messages and logs.
fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use mesh::{config::ServerConfig, testing::TestPki};
    use meshwork::{
        billing::v1::{GetAccountRequest, TopUpRequest},
        orders::v1::{CreateOrderRequest, OrderItem},
    };
    use tokio::sync::oneshot;

    use super::*;

    fn euros(amount_minor: i64) -> Money {
        Money {
            currency_code: "EUR".to_owned(),
            amount_minor,
        }
    }

    #[tokio::test]
    async fn a_charge_that_loses_to_a_recorded_payment_failure_is_refunded() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let billing_app = billing::App::build(billing::Config {
            server: ServerConfig::default(),
            database: mesh::store::testing::sqlite(dir.path(), "billing"),
            tls: pki.config("billing"),
            ..billing::Config::default()
        })
        .await?;
        let billing_addr = billing_app.local_addr();
        let (_stop_billing, stopped) = oneshot::channel::<()>();
        tokio::spawn(billing_app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        // The saga calls billing as orders; the test tops up and reads the balance as the
        // operator (billing admits orders only to charge and refund).
        let billing =
            BillingServiceClient::new(pki.channel_as("orders", billing_addr, "billing")?);
        let operator = BillingServiceClient::new(pki.channel(billing_addr, "billing")?);
        // Never called here: the order is already stored.
        let nowhere = SocketAddr::from(([127, 0, 0, 1], 1));
        let users = UserServiceClient::new(pki.channel_as("orders", nowhere, "users")?);
        let store = Store::open(&mesh::store::testing::sqlite(dir.path(), "orders")).await?;
        let saga = Saga::new(store.clone(), users, billing);
        operator
            .clone()
            .top_up(TopUpRequest {
                user_id: "u1".to_owned(),
                amount: Some(euros(1_000)),
                idempotency_key: "top-up".to_owned(),
            })
            .await?;
        let request = CreateOrderRequest {
            user_id: "u1".to_owned(),
            items: vec![OrderItem {
                sku: "lamp".to_owned(),
                quantity: 1,
                unit_price: Some(euros(300)),
            }],
            idempotency_key: "k1".to_owned(),
        };
        let Inserted::Created(snapshot) = store.insert_pending(&NewOrder::parse(&request)?).await?
        else {
            anyhow::bail!("a fresh key found an existing order");
        };
        // Another worker read the same PENDING order, was declined, and recorded it first.
        let declined = Transition::PaymentFailed {
            reason: "insufficient funds".to_owned(),
        };
        store
            .transition(&snapshot.id, OrderStatus::Pending, &declined)
            .await?;

        let settled = saga.settle(snapshot).await?;

        assert_eq!(settled.status, OrderStatus::PaymentFailed);
        let account = operator
            .clone()
            .get_account(GetAccountRequest {
                user_id: "u1".to_owned(),
            })
            .await?
            .into_inner()
            .account;
        let balance = account.and_then(|a| a.balance).map(|b| b.amount_minor);
        assert_eq!(balance, Some(1_000));
        Ok(())
    }
}
