//! Billing over gRPC, as a client sees it: the real `App` started in-process on port 0 with a
//! throw-away PKI, called through the generated client over the mesh's mutual-TLS channel (as
//! the operator unless a test says otherwise). These tests check the outcome a caller sees
//! (status codes, balances, the ledger), not internals.

use std::net::SocketAddr;

use billing::{App, Config};
use mesh::{client::MeshChannel, config::ServerConfig, status::field_violations, testing::TestPki};
use meshwork::{
    billing::v1::{
        ChargeRequest, ChargeResponse, GetAccountRequest, GetPaymentRequest, ListPaymentsRequest,
        PaymentKind, RefundRequest, RefundResponse, TopUpRequest,
        billing_service_client::BillingServiceClient,
    },
    common::v1::Money,
};
use tokio::sync::oneshot;
use tonic::{Code, Status};

/// A billing server running in this process on its own database, and a client to it as the
/// operator; stops when dropped.
struct TestBilling {
    client: BillingServiceClient<MeshChannel>,
    addr: SocketAddr,
    pki: TestPki,
    _stop: oneshot::Sender<()>,
    /// The certificates.
    _certs: tempfile::TempDir,
    /// The SQLite file's directory, when this server made its own.
    _dir: Option<tempfile::TempDir>,
}

impl TestBilling {
    /// Billing on a fresh SQLite file.
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let database = mesh::store::testing::sqlite(dir.path(), "billing");
        Self::start_on(database, Some(dir)).await
    }

    /// Billing on `database`; `dir`, if any, is kept until the server stops.
    async fn start_on(
        database: mesh::config::DatabaseConfig,
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let certs = tempfile::tempdir()?;
        let pki = TestPki::new(certs.path())?;
        let config = Config {
            server: ServerConfig {
                listen_addr: "127.0.0.1:0".parse()?,
                ..ServerConfig::default()
            },
            database,
            tls: pki.config("billing"),
            ..Config::default()
        };
        let app = App::build(config).await?;
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        // The port is bound before `build` returns, so the connection is accepted at once.
        let client = BillingServiceClient::new(pki.channel(addr, "billing")?);
        Ok(Self {
            client,
            addr,
            pki,
            _stop: stop,
            _certs: certs,
            _dir: dir,
        })
    }

    /// A client presenting the mesh identity of `service` instead of the operator's.
    fn client_as(&self, service: &str) -> anyhow::Result<BillingServiceClient<MeshChannel>> {
        Ok(BillingServiceClient::new(
            self.pki.channel_as(service, self.addr, "billing")?,
        ))
    }

    async fn top_up(&mut self, user_id: &str, amount_minor: i64, key: &str) -> Result<i64, Status> {
        let response = self
            .client
            .top_up(TopUpRequest {
                user_id: user_id.to_owned(),
                amount: Some(eur(amount_minor)),
                idempotency_key: key.to_owned(),
            })
            .await?;
        Ok(balance_of(response.get_ref().account.as_ref()))
    }

    async fn charge(
        &mut self,
        user_id: &str,
        amount_minor: i64,
        key: &str,
    ) -> Result<ChargeResponse, Status> {
        let response = self
            .client
            .charge(charge_request(user_id, amount_minor, key))
            .await?;
        Ok(response.into_inner())
    }

    async fn refund(
        &mut self,
        payment_id: &str,
        amount_minor: Option<i64>,
        key: &str,
    ) -> Result<RefundResponse, Status> {
        let response = self
            .client
            .refund(RefundRequest {
                payment_id: payment_id.to_owned(),
                amount: amount_minor.map(eur),
                idempotency_key: key.to_owned(),
            })
            .await?;
        Ok(response.into_inner())
    }

    async fn balance(&mut self, user_id: &str) -> Result<i64, Status> {
        let response = self
            .client
            .get_account(GetAccountRequest {
                user_id: user_id.to_owned(),
            })
            .await?;
        Ok(balance_of(response.get_ref().account.as_ref()))
    }

    /// Every payment of `user_id`, newest first, read one page of `page_size` at a time.
    async fn all_payments(
        &mut self,
        user_id: &str,
        page_size: i32,
    ) -> Result<Vec<meshwork::billing::v1::Payment>, Status> {
        let mut payments = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client
                .list_payments(ListPaymentsRequest {
                    user_id: user_id.to_owned(),
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            assert!(page.payments.len() <= usize::try_from(page_size).unwrap_or(usize::MAX));
            payments.extend(page.payments);
            if page.next_page_token.is_empty() {
                return Ok(payments);
            }
            page_token = page.next_page_token;
        }
    }
}

fn eur(amount_minor: i64) -> Money {
    Money {
        currency_code: "EUR".to_owned(),
        amount_minor,
    }
}

fn charge_request(user_id: &str, amount_minor: i64, key: &str) -> ChargeRequest {
    ChargeRequest {
        user_id: user_id.to_owned(),
        amount: Some(eur(amount_minor)),
        idempotency_key: key.to_owned(),
        reference: "order:1".to_owned(),
    }
}

fn balance_of(account: Option<&meshwork::billing::v1::Account>) -> i64 {
    account
        .and_then(|a| a.balance.as_ref())
        .map_or(-1, |b| b.amount_minor)
}

fn payment_id(response: &ChargeResponse) -> String {
    response
        .payment
        .as_ref()
        .map(|p| p.id.clone())
        .unwrap_or_default()
}

/// The error of a call that had to fail.
fn failure<T: std::fmt::Debug>(result: Result<T, Status>) -> anyhow::Result<Status> {
    match result {
        Ok(value) => anyhow::bail!("expected an error, got {value:?}"),
        Err(status) => Ok(status),
    }
}

fn violated_fields(status: &Status) -> Vec<String> {
    field_violations(status)
        .into_iter()
        .map(|(field, _)| field)
        .collect()
}

#[tokio::test]
async fn top_up_then_charge_moves_the_balance() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    assert_eq!(billing.top_up("u1", 1000, "t1").await?, 1000);
    let charged = billing.charge("u1", 250, "c1").await?;
    assert_eq!(balance_of(charged.account.as_ref()), 750);
    assert_eq!(
        charged.payment.as_ref().map(|p| p.kind),
        Some(PaymentKind::Charge.into())
    );
    assert_eq!(billing.balance("u1").await?, 750);
    Ok(())
}

#[tokio::test]
async fn account_is_not_found_before_the_first_top_up() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(billing.balance("u1").await)?;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    Ok(())
}

#[tokio::test]
async fn insufficient_funds_is_failed_precondition_and_leaves_the_balance() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 100, "t1").await?;
    let status = failure(billing.charge("u1", 101, "c1").await)?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("insufficient funds"),
        "{status:?}"
    );
    assert_eq!(billing.balance("u1").await?, 100);
    Ok(())
}

#[tokio::test]
async fn same_idempotency_key_twice_charges_once() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    let first = billing.charge("u1", 300, "c1").await?;
    let second = billing.charge("u1", 300, "c1").await?;
    assert_eq!(payment_id(&second), payment_id(&first));
    assert_eq!(billing.balance("u1").await?, 700);
    let charges = billing
        .all_payments("u1", 10)
        .await?
        .into_iter()
        .filter(|p| p.kind == i32::from(PaymentKind::Charge))
        .count();
    assert_eq!(charges, 1);
    Ok(())
}

#[tokio::test]
async fn same_idempotency_key_with_another_amount_is_rejected() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    billing.charge("u1", 300, "c1").await?;
    let status = failure(billing.charge("u1", 400, "c1").await)?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("different request"), "{status:?}");
    assert_eq!(billing.balance("u1").await?, 700);
    Ok(())
}

#[tokio::test]
async fn refunds_cannot_exceed_the_charge() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    let charge = payment_id(&billing.charge("u1", 600, "c1").await?);
    let first = billing.refund(&charge, Some(200), "r1").await?;
    assert_eq!(balance_of(first.account.as_ref()), 600);
    assert_eq!(
        first
            .payment
            .as_ref()
            .map(|p| p.refunded_payment_id.as_str()),
        Some(charge.as_str())
    );
    billing.refund(&charge, Some(300), "r2").await?;
    let status = failure(billing.refund(&charge, Some(101), "r3").await)?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(billing.balance("u1").await?, 900);
    Ok(())
}

#[tokio::test]
async fn refund_without_amount_returns_what_remains() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    let charge = payment_id(&billing.charge("u1", 600, "c1").await?);
    billing.refund(&charge, Some(200), "r1").await?;
    let rest = billing.refund(&charge, None, "r2").await?;
    assert_eq!(
        rest.payment.and_then(|p| p.amount).map(|a| a.amount_minor),
        Some(400)
    );
    assert_eq!(billing.balance("u1").await?, 1000);
    Ok(())
}

#[tokio::test]
async fn refund_of_a_top_up_is_rejected() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let top_up = billing
        .client
        .top_up(TopUpRequest {
            user_id: "u1".to_owned(),
            amount: Some(eur(1000)),
            idempotency_key: "t1".to_owned(),
        })
        .await?
        .into_inner();
    let top_up_id = top_up.payment.map(|p| p.id).unwrap_or_default();
    let status = failure(billing.refund(&top_up_id, None, "r1").await)?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(billing.balance("u1").await?, 1000);
    Ok(())
}

#[tokio::test]
async fn bad_currency_and_negative_amount_are_invalid_arguments_naming_the_fields()
-> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(
        billing
            .client
            .top_up(TopUpRequest {
                user_id: "u1".to_owned(),
                amount: Some(Money {
                    currency_code: "euro".to_owned(),
                    amount_minor: -5,
                }),
                idempotency_key: "t1".to_owned(),
            })
            .await,
    )?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        vec!["amount.currency_code", "amount.amount_minor"]
    );
    Ok(())
}

#[tokio::test]
async fn missing_amount_user_and_key_are_all_reported() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(billing.client.charge(ChargeRequest::default()).await)?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        violated_fields(&status),
        vec!["user_id", "amount", "idempotency_key"]
    );
    Ok(())
}

#[tokio::test]
async fn unknown_payment_is_not_found() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(
        billing
            .client
            .get_payment(GetPaymentRequest {
                id: "no-such-payment".to_owned(),
            })
            .await,
    )?;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("no-such-payment"), "{status:?}");
    let status = failure(billing.refund("no-such-payment", None, "r1").await)?;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    Ok(())
}

#[tokio::test]
async fn payments_are_listed_newest_first_one_page_at_a_time() -> anyhow::Result<()> {
    const PAYMENTS: i64 = 7;
    let mut billing = TestBilling::start().await?;
    for n in 1..=PAYMENTS {
        billing.top_up("u1", n, &format!("t{n}")).await?;
    }
    billing.top_up("u2", 1, "other-user").await?;
    let amounts: Vec<i64> = billing
        .all_payments("u1", 3)
        .await?
        .into_iter()
        .filter_map(|p| p.amount.map(|a| a.amount_minor))
        .collect();
    assert_eq!(amounts, (1..=PAYMENTS).rev().collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn foreign_page_token_is_an_invalid_argument() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(
        billing
            .client
            .list_payments(ListPaymentsRequest {
                user_id: "u1".to_owned(),
                page_size: 10,
                page_token: "not a token".to_owned(),
            })
            .await,
    )?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), vec!["page_token"]);
    Ok(())
}

/// Ten charges of 100 with distinct keys race for a balance of 450: four succeed, six are
/// refused, and the balance ends at 50, never below zero. Run on every configured backend.
#[tokio::test]
async fn concurrent_charges_never_overdraw_the_account() -> anyhow::Result<()> {
    const CHARGES: usize = 10;
    const CHARGE_MINOR: i64 = 100;
    const BALANCE_MINOR: i64 = 450;
    let dir = tempfile::tempdir()?;
    for database in mesh::store::testing::all(dir.path(), "billing").await? {
        let mut billing = TestBilling::start_on(database, None).await?;
        billing.top_up("u1", BALANCE_MINOR, "t1").await?;
        let calls = (0..CHARGES).map(|n| {
            let mut client = billing.client.clone();
            let request = charge_request("u1", CHARGE_MINOR, &format!("c{n}"));
            tokio::spawn(async move { client.charge(request).await })
        });
        let mut succeeded = 0;
        for joined in futures::future::join_all(calls).await {
            match joined? {
                Ok(_) => succeeded += 1,
                Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
            }
        }
        assert_eq!(succeeded, BALANCE_MINOR / CHARGE_MINOR);
        assert_eq!(billing.balance("u1").await?, BALANCE_MINOR % CHARGE_MINOR);
    }
    Ok(())
}

#[tokio::test]
async fn orders_may_charge_and_refund() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    let mut orders = billing.client_as("orders")?;
    let charged = orders
        .charge(charge_request("u1", 300, "c1"))
        .await?
        .into_inner();
    assert_eq!(balance_of(charged.account.as_ref()), 700);
    orders
        .refund(RefundRequest {
            payment_id: payment_id(&charged),
            amount: None,
            idempotency_key: "r1".to_owned(),
        })
        .await?;
    assert_eq!(billing.balance("u1").await?, 1000);
    Ok(())
}

/// TopUp admits the operator and end users; `orders` is neither, and without an access token it
/// cannot act for a user.
#[tokio::test]
async fn orders_may_not_top_up_without_a_user_token() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    let status = failure(
        billing
            .client_as("orders")?
            .top_up(TopUpRequest {
                user_id: "u1".to_owned(),
                amount: Some(eur(1000)),
                idempotency_key: "t1".to_owned(),
            })
            .await,
    )?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = failure(billing.balance("u1").await)?;
    assert_eq!(
        status.code(),
        Code::NotFound,
        "a refused top-up opened the account"
    );
    Ok(())
}

#[tokio::test]
async fn a_service_outside_the_policy_may_not_charge() -> anyhow::Result<()> {
    let mut billing = TestBilling::start().await?;
    billing.top_up("u1", 1000, "t1").await?;
    let status = failure(
        billing
            .client_as("users")?
            .charge(charge_request("u1", 300, "c1"))
            .await,
    )?;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(billing.balance("u1").await?, 1000);
    Ok(())
}
