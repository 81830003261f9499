//! Placing orders: the saga's happy path, billing's refusal, unknown users, idempotency,
//! validation, reading and listing.

use meshwork::orders::v1::{GetOrderRequest, ListOrdersRequest, OrderStatus};
use tonic::Code;

use crate::test_mesh::{CURRENCY, Options, TestMesh, expect_code, item, order_request, status_of};

#[tokio::test]
async fn order_with_enough_funds_is_paid_and_charges_the_total() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(10_000).await?;

    let order = mesh
        .place(order_request(
            &user,
            vec![item("apple", 3, 150), item("pear", 2, 75)],
            "k1",
        ))
        .await?;

    assert_eq!(status_of(&order), OrderStatus::Paid);
    assert!(!order.payment_id.is_empty());
    let total = order
        .total
        .as_ref()
        .map(|t| (t.currency_code.as_str(), t.amount_minor));
    assert_eq!(total, Some((CURRENCY, 600)));
    assert_eq!(mesh.balance(&user).await?, 10_000 - 600);
    Ok(())
}

#[tokio::test]
async fn insufficient_funds_is_payment_failed_and_moves_no_money() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(100).await?;

    let order = mesh
        .place(order_request(&user, vec![item("tv", 1, 50_000)], "k1"))
        .await?;

    assert_eq!(status_of(&order), OrderStatus::PaymentFailed);
    assert!(!order.failure_reason.is_empty());
    assert!(order.payment_id.is_empty());
    assert_eq!(mesh.balance(&user).await?, 100);
    Ok(())
}

#[tokio::test]
async fn unknown_user_is_not_found_and_nothing_is_stored() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let ghost = "01890000-0000-7000-8000-000000000000";

    let status = expect_code(
        mesh.orders
            .clone()
            .create_order(order_request(ghost, vec![item("a", 1, 1)], "k1"))
            .await,
        Code::NotFound,
    )?;

    assert!(status.message().contains(ghost), "{}", status.message());
    let listed = mesh
        .orders
        .clone()
        .list_orders(ListOrdersRequest {
            user_id: ghost.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.orders.is_empty());
    Ok(())
}

#[tokio::test]
async fn users_unreachable_is_unavailable_and_nothing_is_stored() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(Options {
        users_down: true,
        ..Options::default()
    })
    .await?;

    let result = mesh
        .orders
        .clone()
        .create_order(order_request("someone", vec![item("a", 1, 1)], "k1"))
        .await;

    expect_code(result, Code::Unavailable)?;
    let listed = mesh
        .orders
        .clone()
        .list_orders(ListOrdersRequest {
            user_id: "someone".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(listed.orders.is_empty());
    Ok(())
}

#[tokio::test]
async fn repeated_idempotency_key_returns_the_same_order_and_charges_once() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let request = order_request(&user, vec![item("book", 1, 300)], "same-key");

    let first = mesh.place(request.clone()).await?;
    let second = mesh.place(request).await?;

    assert_eq!(first.id, second.id);
    assert_eq!(status_of(&second), OrderStatus::Paid);
    assert_eq!(first.payment_id, second.payment_id);
    assert_eq!(mesh.balance(&user).await?, 700);
    Ok(())
}

#[tokio::test]
async fn invalid_items_are_invalid_argument_naming_each_field() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut euro_less = item("b", 1, 10);
    if let Some(price) = euro_less.unit_price.as_mut() {
        price.currency_code = "usd".to_owned();
    }

    let status = expect_code(
        mesh.orders
            .clone()
            .create_order(order_request("user", vec![item("a", 0, 10), euro_less], ""))
            .await,
        Code::InvalidArgument,
    )?;

    let fields: Vec<String> = mesh::status::field_violations(&status)
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "items[0].quantity",
            "items[1].unit_price.currency_code",
            "idempotency_key"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_overflowing_total_is_invalid_argument() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1).await?;

    let result = mesh
        .orders
        .clone()
        .create_order(order_request(
            &user,
            vec![item("gold", 1000, i64::MAX / 10)],
            "k1",
        ))
        .await;

    expect_code(result, Code::InvalidArgument)?;
    Ok(())
}

#[tokio::test]
async fn a_free_order_is_paid_without_a_charge() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(500).await?;

    let order = mesh
        .place(order_request(&user, vec![item("sample", 2, 0)], "k1"))
        .await?;

    assert_eq!(status_of(&order), OrderStatus::Paid);
    assert!(order.payment_id.is_empty());
    assert_eq!(mesh.balance(&user).await?, 500);
    Ok(())
}

#[tokio::test]
async fn get_returns_the_stored_order() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let placed = mesh
        .place(order_request(
            &user,
            vec![item("a", 2, 10), item("b", 1, 5)],
            "k1",
        ))
        .await?;

    let got = mesh
        .orders
        .clone()
        .get_order(GetOrderRequest {
            id: placed.id.clone(),
        })
        .await?
        .into_inner()
        .order;

    assert_eq!(got, Some(placed));
    Ok(())
}

#[tokio::test]
async fn get_of_an_unknown_order_is_not_found() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;

    let result = mesh
        .orders
        .clone()
        .get_order(GetOrderRequest {
            id: "no-such-order".to_owned(),
        })
        .await;

    let status = expect_code(result, Code::NotFound)?;
    assert!(status.message().contains("no-such-order"));
    Ok(())
}

#[tokio::test]
async fn orders_are_listed_newest_first_one_page_at_a_time() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let user = mesh.funded_user(1_000).await?;
    let mut placed = Vec::new();
    for key in ["k1", "k2", "k3"] {
        placed.push(
            mesh.place(order_request(&user, vec![item("a", 1, 1)], key))
                .await?
                .id,
        );
    }
    let other = mesh.funded_user(1_000).await?;
    mesh.place(order_request(&other, vec![item("a", 1, 1)], "k1"))
        .await?;

    let list = |page_token: String| {
        let mut client = mesh.orders.clone();
        let user_id = user.clone();
        async move {
            client
                .list_orders(ListOrdersRequest {
                    user_id,
                    page_size: 2,
                    page_token,
                })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = list(String::new()).await?;
    let second = list(first.next_page_token.clone()).await?;

    let ids = |orders: &[meshwork::orders::v1::Order]| -> Vec<String> {
        orders.iter().map(|o| o.id.clone()).collect()
    };
    assert_eq!(
        ids(&first.orders),
        vec![placed[2].clone(), placed[1].clone()]
    );
    assert_eq!(ids(&second.orders), vec![placed[0].clone()]);
    assert!(second.next_page_token.is_empty());
    Ok(())
}
