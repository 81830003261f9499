//! One test per way a call can go wrong, each asserting what the caller sees: the status code,
//! the field named, the order's state, the balance.

mod support;

use std::time::Duration;

use meshwork::{
    auth::v1::{LoginRequest, RegisterRequest},
    billing::v1::{
        GetAccountRequest, GetPaymentRequest, ListPaymentsRequest, PaymentKind, TopUpRequest,
    },
    common::v1::Money,
    orders::v1::{
        CancelOrderRequest, CreateOrderRequest, GetOrderRequest, Order, OrderItem, OrderStatus,
        WatchOrderRequest,
    },
    users::v1::{CreateUserRequest, GetUserRequest},
};
use support::{TestMesh, dead_addr, eventually};
use tonic::Code;

/// Long enough for the recovery loop (every 200 ms in tests) to finish a saga.
const SAGA_TIMEOUT: Duration = Duration::from_secs(20);

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

async fn register(mesh: &TestMesh, email: &str) -> anyhow::Result<String> {
    Ok(mesh
        .auth_client()?
        .register(RegisterRequest {
            email: email.into(),
            password: "correct horse battery".into(),
            display_name: "Test".into(),
        })
        .await?
        .into_inner()
        .user_id)
}

async fn top_up(mesh: &TestMesh, user_id: &str, amount: i64) -> anyhow::Result<()> {
    mesh.billing_client()?
        .top_up(TopUpRequest {
            user_id: user_id.into(),
            amount: eur(amount),
            idempotency_key: format!("topup-{user_id}-{amount}"),
        })
        .await?;
    Ok(())
}

async fn balance(mesh: &TestMesh, user_id: &str) -> anyhow::Result<i64> {
    let account = mesh
        .billing_client()?
        .get_account(GetAccountRequest {
            user_id: user_id.into(),
        })
        .await?
        .into_inner()
        .account;
    Ok(account
        .and_then(|a| a.balance)
        .map(|b| b.amount_minor)
        .unwrap_or_default())
}

/// The user's charges, as billing records them.
async fn charges(mesh: &TestMesh, user_id: &str) -> anyhow::Result<usize> {
    let payments = mesh
        .billing_client()?
        .list_payments(ListPaymentsRequest {
            user_id: user_id.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .payments;
    Ok(payments
        .iter()
        .filter(|p| p.kind() == PaymentKind::Charge)
        .count())
}

fn order_request(user_id: &str, key: &str, quantity: i32, unit_price: i64) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.into(),
        items: vec![OrderItem {
            sku: "book".into(),
            quantity,
            unit_price: eur(unit_price),
        }],
        idempotency_key: key.into(),
    }
}

async fn create_order(mesh: &TestMesh, request: CreateOrderRequest) -> anyhow::Result<Order> {
    mesh.orders_client()?
        .create_order(request)
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order in the response"))
}

async fn order_status(mesh: &TestMesh, id: &str) -> anyhow::Result<OrderStatus> {
    let order = mesh
        .orders_client()?
        .get_order(GetOrderRequest { id: id.into() })
        .await?
        .into_inner()
        .order;
    Ok(order.map(|o| o.status()).unwrap_or_default())
}

async fn wait_for_status(mesh: &TestMesh, id: &str, wanted: OrderStatus) -> anyhow::Result<()> {
    eventually(SAGA_TIMEOUT, || async {
        Ok((order_status(mesh, id).await? == wanted).then_some(()))
    })
    .await
}

#[tokio::test]
async fn invalid_email_is_a_field_violation() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let status = mesh
        .auth_client()?
        .register(RegisterRequest {
            email: "not-an-email".into(),
            password: "correct horse battery".into(),
            display_name: "Test".into(),
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an invalid email was accepted"))?;
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = mesh::status::field_violations(&status)
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    assert_eq!(fields, vec!["email"]);
    Ok(())
}

#[tokio::test]
async fn duplicate_email_is_already_exists() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    register(&mesh, "grace@example.com").await?;
    let status = mesh
        .users_client()?
        .create_user(CreateUserRequest {
            email: "GRACE@example.com".into(),
            display_name: "Grace again".into(),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::AlreadyExists));
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_unauthenticated() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    register(&mesh, "alan@example.com").await?;
    let status = mesh
        .auth_client()?
        .login(LoginRequest {
            email: "alan@example.com".into(),
            password: "wrong password".into(),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(status, Some(Code::Unauthenticated));
    Ok(())
}

#[tokio::test]
async fn insufficient_funds_fail_the_order_and_keep_the_balance() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = register(&mesh, "poor@example.com").await?;
    top_up(&mesh, &user, 1000).await?;
    let order = create_order(&mesh, order_request(&user, "too-big", 2, 1250)).await?;
    wait_for_status(&mesh, &order.id, OrderStatus::PaymentFailed).await?;
    assert_eq!(balance(&mesh, &user).await?, 1000);
    assert_eq!(charges(&mesh, &user).await?, 0);
    Ok(())
}

#[tokio::test]
async fn the_same_idempotency_key_twice_charges_once() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = register(&mesh, "twice@example.com").await?;
    top_up(&mesh, &user, 10_000).await?;
    let first = create_order(&mesh, order_request(&user, "same-key", 1, 1000)).await?;
    let second = create_order(&mesh, order_request(&user, "same-key", 1, 1000)).await?;
    assert_eq!(first.id, second.id);
    wait_for_status(&mesh, &first.id, OrderStatus::Paid).await?;
    assert_eq!(charges(&mesh, &user).await?, 1);
    assert_eq!(balance(&mesh, &user).await?, 9000);
    Ok(())
}

#[tokio::test]
async fn unknown_ids_are_not_found() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let unknown = "0190c0de-0000-7000-8000-000000000000".to_owned();
    let codes = [
        mesh.users_client()?
            .get_user(GetUserRequest {
                id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.orders_client()?
            .get_order(GetOrderRequest {
                id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.orders_client()?
            .cancel_order(CancelOrderRequest {
                id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.orders_client()?
            .watch_order(WatchOrderRequest {
                id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.billing_client()?
            .get_payment(GetPaymentRequest {
                id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.billing_client()?
            .get_account(GetAccountRequest {
                user_id: unknown.clone(),
            })
            .await
            .err()
            .map(|s| s.code()),
        mesh.orders_client()?
            .create_order(order_request(&unknown, "k", 1, 100))
            .await
            .err()
            .map(|s| s.code()),
    ];
    assert_eq!(codes, [Some(Code::NotFound); 7]);
    Ok(())
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let huge = "x".repeat(mesh::config::DEFAULT_MAX_MESSAGE_BYTES + 1);
    let status = mesh
        .users_client()?
        .create_user(CreateUserRequest {
            email: "big@example.com".into(),
            display_name: huge,
        })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an oversized message was accepted"))?;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    let created = mesh
        .users_client()?
        .create_user(CreateUserRequest {
            email: "small@example.com".into(),
            display_name: "Small".into(),
        })
        .await;
    assert!(created.is_ok(), "{created:?}");
    Ok(())
}

#[tokio::test]
async fn billing_unreachable_leaves_the_order_pending_until_billing_is_back() -> anyhow::Result<()>
{
    let mut mesh = TestMesh::start().await?;
    let user = register(&mesh, "patient@example.com").await?;
    top_up(&mesh, &user, 5000).await?;
    mesh.stop_billing().await?;

    let order = create_order(&mesh, order_request(&user, "during-outage", 1, 2000)).await?;
    assert_eq!(order.status(), OrderStatus::Pending);
    assert!(order.payment_id.is_empty());
    assert_eq!(order_status(&mesh, &order.id).await?, OrderStatus::Pending);

    mesh.start_billing_again().await?;
    wait_for_status(&mesh, &order.id, OrderStatus::Paid).await?;
    assert_eq!(charges(&mesh, &user).await?, 1);
    assert_eq!(balance(&mesh, &user).await?, 3000);
    Ok(())
}

#[tokio::test]
async fn an_order_left_pending_is_resumed_after_a_restart() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let user = register(&mesh, "restart@example.com").await?;
    top_up(&mesh, &user, 5000).await?;
    // An orders process that cannot reach billing takes the order and is then stopped, as a
    // crash or a deploy would, with the saga unfinished.
    mesh.restart_orders_with_billing_at(dead_addr()?).await?;
    let order = create_order(&mesh, order_request(&user, "across-restart", 1, 1500)).await?;
    assert_eq!(order.status(), OrderStatus::Pending);

    mesh.restart_orders().await?;
    wait_for_status(&mesh, &order.id, OrderStatus::Paid).await?;
    assert_eq!(charges(&mesh, &user).await?, 1);
    assert_eq!(balance(&mesh, &user).await?, 3500);
    Ok(())
}
