//! Recovery: orders left PENDING by a billing outage or a crash are charged again with the same
//! idempotency key, so they end PAID (or PAYMENT_FAILED) and are never charged twice.

use meshwork::{
    billing::v1::{ListPaymentsRequest, PaymentKind},
    orders::v1::{GetOrderRequest, OrderStatus, WatchOrderRequest},
};
use orders::{
    SweepReport,
    domain::NewOrder,
    store::{Inserted, Store},
};

use crate::test_mesh::{Options, TestMesh, item, next_update, order_request, status_of};

/// How many charges billing recorded for the user.
async fn charges(mesh: &TestMesh, user_id: &str) -> anyhow::Result<usize> {
    let payments = mesh
        .billing
        .clone()
        .list_payments(ListPaymentsRequest {
            user_id: user_id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .payments;
    Ok(payments
        .iter()
        .filter(|p| p.kind() == PaymentKind::Charge)
        .count())
}

#[tokio::test]
async fn billing_outage_leaves_the_order_pending_and_recovery_pays_it_once() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_with(Options {
        billing_down: true,
        ..Options::default()
    })
    .await?;
    let user = mesh.create_user().await?;

    let order = mesh
        .place(order_request(&user, vec![item("desk", 1, 250)], "k1"))
        .await?;
    assert_eq!(status_of(&order), OrderStatus::Pending);
    let still_down = mesh.recovery.sweep().await?;
    assert_eq!(still_down.still_pending, 1);

    mesh.start_billing().await?;
    mesh.top_up(&user, 1_000).await?;
    let report = mesh.recovery.sweep().await?;
    let again = mesh.recovery.sweep().await?;

    assert_eq!(report.paid, 1);
    assert_eq!(again, SweepReport::default());
    let stored = mesh
        .orders
        .clone()
        .get_order(GetOrderRequest {
            id: order.id.clone(),
        })
        .await?
        .into_inner()
        .order;
    assert_eq!(stored.as_ref().map(status_of), Some(OrderStatus::Paid));
    assert_eq!(mesh.balance(&user).await?, 750);
    assert_eq!(charges(&mesh, &user).await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_pending_order_left_by_a_crash_is_resumed_at_start() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    // As if an orders process stored the order and died before charging it.
    let store = Store::open(&mesh.orders_database()).await?;
    let request = order_request(&user, vec![item("chair", 2, 100)], "k1");
    let Inserted::Created(order) = store.insert_pending(&NewOrder::parse(&request)?).await? else {
        anyhow::bail!("a fresh key found an existing order");
    };

    let restarted = mesh.start_orders_replica().await?;

    let mut stream = restarted
        .client
        .clone()
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await?
        .into_inner();
    let mut status = OrderStatus::Pending;
    while status == OrderStatus::Pending {
        let update = next_update(&mut stream).await?;
        status = update.as_ref().map_or(OrderStatus::Unspecified, status_of);
    }
    assert_eq!(status, OrderStatus::Paid);
    assert_eq!(mesh.balance(&user).await?, 800);
    assert_eq!(charges(&mesh, &user).await?, 1);
    Ok(())
}
