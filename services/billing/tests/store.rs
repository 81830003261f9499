//! Billing's storage against real databases: SQLite always, PostgreSQL too when
//! `TEST_POSTGRES_URL` is set. Each test runs on a fresh database per backend.

use billing::{
    DomainError, Store,
    domain::{
        Charge, CurrencyCode, IdempotencyKey, Money, PaymentId, PaymentKind, Refund, TopUp, UserId,
    },
};
use mesh::{pagination::Page, status::FieldViolations};

/// A fresh, migrated store per configured backend.
async fn stores(dir: &tempfile::TempDir) -> anyhow::Result<Vec<Store>> {
    let mut stores = Vec::new();
    for database in mesh::store::testing::all(dir.path(), "billing").await? {
        stores.push(Store::open(&database).await?);
    }
    Ok(stores)
}

fn user(id: &str) -> anyhow::Result<UserId> {
    UserId::parse(id).map_err(anyhow::Error::msg)
}

fn key(key: &str) -> anyhow::Result<IdempotencyKey> {
    IdempotencyKey::parse(key).map_err(anyhow::Error::msg)
}

fn money(currency: &str, amount_minor: i64) -> anyhow::Result<Money> {
    let currency = CurrencyCode::parse(currency).map_err(anyhow::Error::msg)?;
    Money::new(currency, amount_minor).map_err(anyhow::Error::msg)
}

fn top_up(user_id: &str, amount_minor: i64, idempotency_key: &str) -> anyhow::Result<TopUp> {
    Ok(TopUp {
        user_id: user(user_id)?,
        amount: money("EUR", amount_minor)?,
        idempotency_key: key(idempotency_key)?,
    })
}

fn charge(user_id: &str, amount_minor: i64, idempotency_key: &str) -> anyhow::Result<Charge> {
    Ok(Charge {
        user_id: user(user_id)?,
        amount: money("EUR", amount_minor)?,
        idempotency_key: key(idempotency_key)?,
        reference: "order:1".to_owned(),
    })
}

fn refund(
    payment_id: &PaymentId,
    amount_minor: Option<i64>,
    idempotency_key: &str,
) -> anyhow::Result<Refund> {
    Ok(Refund {
        payment_id: payment_id.clone(),
        amount: amount_minor.map(|a| money("EUR", a)).transpose()?,
        idempotency_key: key(idempotency_key)?,
    })
}

fn first_page(size: i32) -> Page {
    Page::parse(size, "", &mut FieldViolations::new())
}

async fn balance(store: &Store, user_id: &str) -> anyhow::Result<i64> {
    Ok(store.account(&user(user_id)?).await?.balance_minor)
}

#[tokio::test]
async fn top_up_opens_the_account_and_a_charge_debits_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let topped = store.top_up(&top_up("u1", 1000, "t1")?).await?;
        assert_eq!(topped.account.balance_minor, 1000);
        assert_eq!(topped.account.currency.as_str(), "EUR");
        let charged = store.charge(&charge("u1", 300, "c1")?).await?;
        assert_eq!(charged.payment.kind, PaymentKind::Charge);
        assert_eq!(charged.payment.reference, "order:1");
        assert_eq!(charged.account.balance_minor, 700);
        assert_eq!(balance(&store, "u1").await?, 700);
    }
    Ok(())
}

#[tokio::test]
async fn account_is_not_found_before_the_first_top_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let result = store.account(&user("nobody")?).await;
        assert!(
            matches!(result, Err(DomainError::AccountNotFound(_))),
            "{result:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn failed_charge_records_nothing_so_its_key_can_succeed_after_a_top_up() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let refused = store.charge(&charge("u1", 500, "c1")?).await;
        assert!(
            matches!(
                refused,
                Err(DomainError::InsufficientFunds {
                    balance_minor: 0,
                    charge_minor: 500,
                    ..
                })
            ),
            "{refused:?}"
        );
        store.top_up(&top_up("u1", 400, "t1")?).await?;
        let refused = store.charge(&charge("u1", 500, "c1")?).await;
        assert!(
            matches!(
                refused,
                Err(DomainError::InsufficientFunds {
                    balance_minor: 400,
                    ..
                })
            ),
            "{refused:?}"
        );
        let (payments, _) = store.payments(&user("u1")?, &first_page(10)).await?;
        assert_eq!(payments.len(), 1, "only the top-up is recorded");

        store.top_up(&top_up("u1", 100, "t2")?).await?;
        let charged = store.charge(&charge("u1", 500, "c1")?).await?;
        assert_eq!(charged.account.balance_minor, 0);
    }
    Ok(())
}

#[tokio::test]
async fn top_up_in_another_currency_names_both() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        store.top_up(&top_up("u1", 1000, "t1")?).await?;
        let usd = TopUp {
            amount: money("USD", 10)?,
            ..top_up("u1", 10, "t2")?
        };
        let error = store
            .top_up(&usd)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("EUR") && error.contains("USD"), "{error}");
        assert_eq!(balance(&store, "u1").await?, 1000);
    }
    Ok(())
}

#[tokio::test]
async fn repeated_key_returns_the_first_payment_and_moves_no_money() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let first = store.top_up(&top_up("u1", 1000, "t1")?).await?;
        let again = store.top_up(&top_up("u1", 1000, "t1")?).await?;
        assert_eq!(again.payment, first.payment);
        assert_eq!(balance(&store, "u1").await?, 1000);

        let other = store.top_up(&top_up("u1", 999, "t1")?).await;
        assert!(
            matches!(other, Err(DomainError::IdempotencyKeyReused(_))),
            "{other:?}"
        );
        let other_kind = store.charge(&charge("u1", 1000, "t1")?).await;
        assert!(
            matches!(other_kind, Err(DomainError::IdempotencyKeyReused(_))),
            "{other_kind:?}"
        );
        assert_eq!(balance(&store, "u1").await?, 1000);
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_with_one_key_charge_once() -> anyhow::Result<()> {
    const REQUESTS: usize = 8;
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        store.top_up(&top_up("u1", 1000, "t1")?).await?;
        let request = charge("u1", 100, "same-key")?;
        let calls = (0..REQUESTS).map(|_| {
            let store = store.clone();
            let request = request.clone();
            tokio::spawn(async move { store.charge(&request).await })
        });
        let mut ids = Vec::new();
        for joined in futures::future::join_all(calls).await {
            ids.push(joined??.payment.id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "every caller sees the one payment: {ids:?}");
        assert_eq!(balance(&store, "u1").await?, 900);
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_refunds_never_add_up_to_more_than_the_charge() -> anyhow::Result<()> {
    const REFUNDS: usize = 5;
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        store.top_up(&top_up("u1", 1000, "t1")?).await?;
        let charged = store.charge(&charge("u1", 1000, "c1")?).await?;
        let calls = (0..REFUNDS).map(|n| {
            let store = store.clone();
            let request = refund(&charged.payment.id, Some(300), &format!("r{n}"));
            tokio::spawn(async move { store.refund(&request?).await.map_err(anyhow::Error::from) })
        });
        let mut refunded = 0;
        for joined in futures::future::join_all(calls).await {
            match joined? {
                Ok(receipt) => refunded += receipt.payment.amount.amount_minor(),
                Err(error) => assert!(
                    matches!(
                        error.downcast_ref(),
                        Some(DomainError::RefundExceedsCharge { .. })
                    ),
                    "{error}"
                ),
            }
        }
        assert_eq!(refunded, 900, "three refunds of 300 fit in 1000");
        assert_eq!(balance(&store, "u1").await?, 900);

        let rest = store
            .refund(&refund(&charged.payment.id, None, "rest")?)
            .await?;
        assert_eq!(rest.payment.amount.amount_minor(), 100);
        assert_eq!(rest.account.balance_minor, 1000);
        let nothing_left = store
            .refund(&refund(&charged.payment.id, None, "more")?)
            .await;
        assert!(
            matches!(nothing_left, Err(DomainError::FullyRefunded(_))),
            "{nothing_left:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn refund_of_an_unknown_payment_is_not_found() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let unknown = PaymentId::parse("no-such-payment").map_err(anyhow::Error::msg)?;
        let result = store.refund(&refund(&unknown, None, "r1")?).await;
        assert!(
            matches!(result, Err(DomainError::PaymentNotFound(_))),
            "{result:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn balance_overflow_is_refused_not_a_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        store.top_up(&top_up("u1", i64::MAX, "t1")?).await?;
        let result = store.top_up(&top_up("u1", 1, "t2")?).await;
        assert!(
            matches!(result, Err(DomainError::BalanceOverflow { .. })),
            "{result:?}"
        );
        assert_eq!(balance(&store, "u1").await?, i64::MAX);
    }
    Ok(())
}

#[tokio::test]
async fn payments_are_listed_newest_first_one_page_at_a_time() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for store in stores(&dir).await? {
        let mut ids = Vec::new();
        for n in 1..=5 {
            ids.push(
                store
                    .top_up(&top_up("u1", n, &format!("t{n}"))?)
                    .await?
                    .payment
                    .id,
            );
        }
        store.top_up(&top_up("someone-else", 1, "t-other")?).await?;
        ids.reverse();

        let mut seen = Vec::new();
        let mut page = first_page(2);
        loop {
            let (payments, token) = store.payments(&user("u1")?, &page).await?;
            assert!(payments.len() <= 2);
            seen.extend(payments.into_iter().map(|p| p.id));
            if token.is_empty() {
                break;
            }
            let mut violations = FieldViolations::new();
            page = Page::parse(2, &token, &mut violations);
            assert!(violations.is_empty());
        }
        assert_eq!(seen, ids);
    }
    Ok(())
}
