//! The whole user journey across the four services, as a user sees it: register, log in, top up,
//! order (PAID, seen on WatchOrder), cancel (CANCELLED, money back).

mod support;

use std::time::Duration;

use meshwork::{
    auth::v1::{LoginRequest, RegisterRequest},
    billing::v1::{GetAccountRequest, TopUpRequest},
    common::v1::Money,
    orders::v1::{
        CancelOrderRequest, CreateOrderRequest, OrderItem, OrderStatus, WatchOrderRequest,
    },
};
use support::TestMesh;
use tokio_stream::StreamExt;

const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

async fn balance(mesh: &TestMesh, user_id: &str) -> anyhow::Result<i64> {
    let account = mesh
        .billing_client()?
        .get_account(GetAccountRequest {
            user_id: user_id.to_owned(),
        })
        .await?
        .into_inner()
        .account;
    Ok(account
        .and_then(|a| a.balance)
        .map(|b| b.amount_minor)
        .unwrap_or_default())
}

async fn journey(mesh: TestMesh) -> anyhow::Result<()> {
    let mut auth = mesh.auth_client()?;
    let user_id = auth
        .register(RegisterRequest {
            email: " Ada@Example.com ".into(),
            password: "correct horse battery".into(),
            display_name: "Ada".into(),
        })
        .await?
        .into_inner()
        .user_id;
    let login = auth
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
        })
        .await?
        .into_inner();
    assert_eq!(login.user_id, user_id);
    assert!(login.tokens.is_some_and(|t| !t.access_token.is_empty()));

    mesh.billing_client()?
        .top_up(TopUpRequest {
            user_id: user_id.clone(),
            amount: eur(5000),
            idempotency_key: "journey-topup".into(),
        })
        .await?;

    let mut orders = mesh.orders_client()?;
    let order = orders
        .create_order(CreateOrderRequest {
            user_id: user_id.clone(),
            items: vec![OrderItem {
                sku: "book".into(),
                quantity: 2,
                unit_price: eur(1250),
            }],
            idempotency_key: "journey-order".into(),
        })
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order in the response"))?;

    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await?
        .into_inner();
    let paid = tokio::time::timeout(WATCH_TIMEOUT, async {
        while let Some(update) = watch.next().await {
            if update?
                .order
                .is_some_and(|o| o.status() == OrderStatus::Paid)
            {
                return anyhow::Ok(true);
            }
        }
        Ok(false)
    })
    .await??;
    assert!(paid, "WatchOrder never showed PAID");
    assert_eq!(balance(&mesh, &user_id).await?, 2500);

    let cancelled = orders
        .cancel_order(CancelOrderRequest {
            id: order.id.clone(),
        })
        .await?
        .into_inner()
        .order
        .map(|o| o.status());
    assert_eq!(cancelled, Some(OrderStatus::Cancelled));

    let last = tokio::time::timeout(WATCH_TIMEOUT, async {
        let mut last = None;
        while let Some(update) = watch.next().await {
            last = update?.order.map(|o| o.status());
        }
        anyhow::Ok(last)
    })
    .await??;
    assert_eq!(
        last,
        Some(OrderStatus::Cancelled),
        "the watch ends on CANCELLED"
    );
    assert_eq!(balance(&mesh, &user_id).await?, 5000);
    Ok(())
}

#[tokio::test]
async fn register_login_top_up_order_cancel_on_sqlite() -> anyhow::Result<()> {
    journey(TestMesh::start().await?).await
}

#[tokio::test]
async fn register_login_top_up_order_cancel_on_postgres() -> anyhow::Result<()> {
    match TestMesh::start_on_postgres().await? {
        Some(mesh) => journey(mesh).await,
        None => {
            eprintln!("skipped: TEST_POSTGRES_URL is not set (CI sets it)");
            Ok(())
        }
    }
}
