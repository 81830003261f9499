//! Cancelling: a paid order is refunded, a failed one just closed, a pending one refused.

use meshwork::orders::v1::{CancelOrderRequest, Order, OrderStatus};
use tonic::Code;

use crate::test_mesh::{Options, TestMesh, expect_code, item, order_request, status_of};

async fn cancel(mesh: &TestMesh, id: &str) -> Result<Order, tonic::Status> {
    mesh.orders
        .clone()
        .cancel_order(CancelOrderRequest { id: id.to_owned() })
        .await?
        .into_inner()
        .order
        .ok_or_else(|| tonic::Status::internal("CancelOrder returned no order"))
}

#[tokio::test]
async fn cancelling_a_paid_order_refunds_it() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let order = mesh
        .place(order_request(&user, vec![item("lamp", 2, 200)], "k1"))
        .await?;
    assert_eq!(mesh.balance(&user).await?, 600);

    let cancelled = cancel(&mesh, &order.id).await?;

    assert_eq!(status_of(&cancelled), OrderStatus::Cancelled);
    assert_eq!(mesh.balance(&user).await?, 1_000);
    Ok(())
}

#[tokio::test]
async fn cancelling_twice_refunds_once() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let order = mesh
        .place(order_request(&user, vec![item("lamp", 1, 400)], "k1"))
        .await?;

    cancel(&mesh, &order.id).await?;
    let again = cancel(&mesh, &order.id).await?;

    assert_eq!(status_of(&again), OrderStatus::Cancelled);
    assert_eq!(mesh.balance(&user).await?, 1_000);
    Ok(())
}

#[tokio::test]
async fn cancelling_a_failed_order_closes_it_without_a_refund() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(10).await?;
    let order = mesh
        .place(order_request(&user, vec![item("car", 1, 9_999)], "k1"))
        .await?;
    assert_eq!(status_of(&order), OrderStatus::PaymentFailed);

    let cancelled = cancel(&mesh, &order.id).await?;

    assert_eq!(status_of(&cancelled), OrderStatus::Cancelled);
    assert_eq!(mesh.balance(&user).await?, 10);
    Ok(())
}

#[tokio::test]
async fn cancelling_a_pending_order_is_failed_precondition() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(Options {
        billing_down: true,
        ..Options::default()
    })
    .await?;
    let user = mesh.create_user().await?;
    let order = mesh
        .place(order_request(&user, vec![item("a", 1, 10)], "k1"))
        .await?;
    assert_eq!(status_of(&order), OrderStatus::Pending);

    let status = expect_code(cancel(&mesh, &order.id).await, Code::FailedPrecondition)?;

    assert!(status.message().contains("payment still in progress"));
    Ok(())
}

#[tokio::test]
async fn cancelling_an_unknown_order_is_not_found() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;

    expect_code(cancel(&mesh, "no-such-order").await, Code::NotFound)?;
    Ok(())
}
