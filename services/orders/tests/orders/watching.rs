//! WatchOrder: the order at once, then each status change (whichever replica made it), ending
//! after a final status or at server shutdown.

use meshwork::orders::v1::{CancelOrderRequest, OrderStatus, WatchOrderRequest};
use tokio::time::Instant;
use tonic::Code;

use crate::test_mesh::{
    Options, TestMesh, WATCH_TIMEOUT, expect_code, item, next_update, order_request, status_of,
};

fn watch_request(id: &str) -> WatchOrderRequest {
    WatchOrderRequest { id: id.to_owned() }
}

fn cancel_request(id: &str) -> CancelOrderRequest {
    CancelOrderRequest { id: id.to_owned() }
}

#[tokio::test]
async fn watch_sees_pending_then_paid_and_ends_after_cancelled() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_with(Options {
        billing_down: true,
        ..Options::default()
    })
    .await?;
    let user = mesh.create_user().await?;
    let order = mesh
        .place(order_request(&user, vec![item("a", 1, 10)], "k1"))
        .await?;
    let mut stream = mesh
        .orders
        .clone()
        .watch_order(watch_request(&order.id))
        .await?
        .into_inner();
    let first = next_update(&mut stream).await?;
    assert_eq!(first.as_ref().map(status_of), Some(OrderStatus::Pending));

    mesh.start_billing().await?;
    mesh.top_up(&user, 100).await?;
    mesh.recovery.sweep().await?;
    let paid = next_update(&mut stream).await?;
    assert_eq!(paid.as_ref().map(status_of), Some(OrderStatus::Paid));

    mesh.orders
        .clone()
        .cancel_order(cancel_request(&order.id))
        .await?;
    let cancelled = next_update(&mut stream).await?;
    assert_eq!(
        cancelled.as_ref().map(status_of),
        Some(OrderStatus::Cancelled)
    );
    assert_eq!(next_update(&mut stream).await?, None);
    Ok(())
}

#[tokio::test]
async fn watch_sees_a_change_made_by_another_replica() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let order = mesh
        .place(order_request(&user, vec![item("a", 1, 10)], "k1"))
        .await?;
    let replica = mesh.start_orders_replica().await?;
    let mut stream = replica
        .client
        .clone()
        .watch_order(watch_request(&order.id))
        .await?
        .into_inner();
    let first = next_update(&mut stream).await?;
    assert_eq!(first.as_ref().map(status_of), Some(OrderStatus::Paid));

    mesh.orders
        .clone()
        .cancel_order(cancel_request(&order.id))
        .await?;

    let cancelled = next_update(&mut stream).await?;
    assert_eq!(
        cancelled.as_ref().map(status_of),
        Some(OrderStatus::Cancelled)
    );
    Ok(())
}

#[tokio::test]
async fn a_watch_of_a_failed_order_sends_it_and_ends() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1).await?;
    let order = mesh
        .place(order_request(&user, vec![item("a", 1, 10)], "k1"))
        .await?;

    let mut stream = mesh
        .orders
        .clone()
        .watch_order(watch_request(&order.id))
        .await?
        .into_inner();

    let only = next_update(&mut stream).await?;
    assert_eq!(
        only.as_ref().map(status_of),
        Some(OrderStatus::PaymentFailed)
    );
    assert_eq!(next_update(&mut stream).await?, None);
    Ok(())
}

#[tokio::test]
async fn watch_of_an_unknown_order_is_not_found() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;

    let result = mesh
        .orders
        .clone()
        .watch_order(watch_request("no-such-order"))
        .await;

    expect_code(result.map(|_| ()), Code::NotFound)?;
    Ok(())
}

#[tokio::test]
async fn watch_ends_unavailable_when_the_server_shuts_down() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let order = mesh
        .place(order_request(&user, vec![item("a", 1, 10)], "k1"))
        .await?;
    let replica = mesh.start_orders_replica().await?;
    let mut stream = replica
        .client
        .clone()
        .watch_order(watch_request(&order.id))
        .await?
        .into_inner();
    next_update(&mut stream).await?;

    let stopping = Instant::now();
    replica.server.stop().await?;

    // The open watch did not hold the drain until its timeout.
    let drain_timeout = mesh::config::ServerConfig::default().drain_timeout;
    assert!(
        stopping.elapsed() < drain_timeout,
        "{:?}",
        stopping.elapsed()
    );
    let end = tokio::time::timeout(WATCH_TIMEOUT, stream.message()).await?;
    expect_code(end, Code::Unavailable)?;
    Ok(())
}
