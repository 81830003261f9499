//! One CreateOrder journey as an OpenTelemetry backend sees it: an in-process OTLP collector
//! receives the spans of orders, users and billing; they form one trace with the right
//! parent-child links and status codes, a refused charge is recorded as an error, and the log
//! lines written while serving the order carry the trace's id.
//!
//! The whole mesh runs in this process, so it shares one telemetry pipeline: the services are
//! told apart by the spans' `rpc.service`.

#[path = "../crates/mesh/tests/otlp/mod.rs"]
mod otlp;
mod support;

use mesh::telemetry::{LogFormat, Telemetry};
use meshwork::{
    auth::v1::RegisterRequest,
    billing::v1::TopUpRequest,
    common::v1::Money,
    orders::v1::{CreateOrderRequest, OrderItem, OrderStatus},
};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use otlp::{Collector, Lines, attribute, int_attribute, span, status_code};
use support::TestMesh;

const CREATE_ORDER: &str = "meshwork.orders.v1.OrderService/CreateOrder";
const GET_USER: &str = "meshwork.users.v1.UserService/GetUser";
const CHARGE: &str = "meshwork.billing.v1.BillingService/Charge";
/// gRPC's FAILED_PRECONDITION, what billing answers a charge it cannot cover.
const FAILED_PRECONDITION: i64 = 9;

fn order(user_id: &str, key: &str, unit_price: i64) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.into(),
        items: vec![OrderItem {
            sku: "book".into(),
            quantity: 1,
            unit_price: Some(Money {
                currency_code: "EUR".into(),
                amount_minor: unit_price,
            }),
        }],
        idempotency_key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_order_journey_is_one_trace_across_orders_users_and_billing() -> anyhow::Result<()>
{
    let (collector, collector_addr) = Collector::start().await?;
    let lines = Lines::default();
    let telemetry = Telemetry::from_env("meshwork-journey")
        .with_otlp_endpoint(format!("http://{collector_addr}"))
        .with_log_format(LogFormat::Json)
        .with_filter(mesh::telemetry::DEFAULT_FILTER)
        .with_writer(lines.clone())
        .init();
    anyhow::ensure!(telemetry.is_exporting(), "telemetry was not installed");

    let mesh = TestMesh::start().await?;
    let user_id = mesh
        .auth_client()?
        .register(RegisterRequest {
            email: "ada@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Ada".into(),
        })
        .await?
        .into_inner()
        .user_id;
    mesh.billing_client()?
        .top_up(TopUpRequest {
            user_id: user_id.clone(),
            amount: Some(Money {
                currency_code: "EUR".into(),
                amount_minor: 1000,
            }),
            idempotency_key: "topup".into(),
        })
        .await?;
    let mut orders = mesh.orders_client()?;
    let paid = orders
        .create_order(order(&user_id, "paid", 600))
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order"))?;
    assert_eq!(paid.status(), OrderStatus::Paid);
    // 400 left: this one cannot be paid.
    let failed = orders
        .create_order(order(&user_id, "too-dear", 600))
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order"))?;
    assert_eq!(failed.status(), OrderStatus::PaymentFailed);
    telemetry.flush().await;

    // Each CreateOrder: the test's client span, orders' server span, orders' client spans to
    // users and billing, their server spans, the saga's steps and its database spans.
    let traces = collector.traces(2 * 6).await?;
    let create_orders: Vec<&Span> = traces
        .iter()
        .flatten()
        .filter(|s| s.name == CREATE_ORDER && s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(create_orders.len(), 2, "{traces:#?}");

    for (root, charge_code) in [
        (create_orders[0], 0),
        (create_orders[1], FAILED_PRECONDITION),
    ] {
        let trace: Vec<Span> = traces
            .iter()
            .flatten()
            .filter(|s| s.trace_id == root.trace_id)
            .cloned()
            .collect();
        let orders_server = span(&trace, CREATE_ORDER, SpanKind::Server)?;
        let users_client = span(&trace, GET_USER, SpanKind::Client)?;
        let users_server = span(&trace, GET_USER, SpanKind::Server)?;
        let billing_client = span(&trace, CHARGE, SpanKind::Client)?;
        let billing_server = span(&trace, CHARGE, SpanKind::Server)?;

        // One trace, linked hop by hop.
        assert!(
            root.parent_span_id.is_empty(),
            "the test's call is the root"
        );
        assert_eq!(orders_server.parent_span_id, root.span_id);
        assert_eq!(users_server.parent_span_id, users_client.span_id);
        assert_eq!(billing_server.parent_span_id, billing_client.span_id);
        // orders' outgoing calls are made inside its handling of CreateOrder (through saga
        // steps): their ancestry leads back to orders' server span.
        for client in [users_client, billing_client] {
            assert!(
                descends_from(&trace, client, orders_server),
                "{} is not under orders' server span",
                client.name
            );
        }
        assert!(
            trace.iter().any(|s| s.name == "saga.charge"),
            "no saga step spans: {trace:#?}"
        );
        assert!(
            trace
                .iter()
                .any(|s| attribute(s, "db.system.name").is_some()),
            "no database spans: {trace:#?}"
        );

        // Status codes: the order call succeeds both times (a refused payment is an order
        // state, not an RPC error); the charge is FAILED_PRECONDITION the second time.
        for s in [root, orders_server, users_client, users_server] {
            assert_eq!(int_attribute(s, "rpc.grpc.status_code"), Some(0), "{s:#?}");
        }
        for s in [billing_client, billing_server] {
            assert_eq!(
                int_attribute(s, "rpc.grpc.status_code"),
                Some(charge_code),
                "{s:#?}"
            );
        }
        let expected = if charge_code == 0 {
            StatusCode::Unset
        } else {
            StatusCode::Error
        };
        assert_eq!(status_code(billing_client), expected, "{billing_client:#?}");
    }

    // The log line orders writes when an order is paid carries that order's trace id (the
    // first call's: the charge codes above prove which trace is the paid one).
    let paid_trace_id = hex(&create_orders[0].trace_id);
    let logged = lines.with_message("order paid")?;
    assert!(
        logged
            .iter()
            .any(|line| line["trace_id"] == paid_trace_id.as_str()),
        "no 'order paid' line with trace id {paid_trace_id}: {logged:#?}"
    );
    Ok(())
}

/// Whether `span`'s chain of parents within `trace` reaches `ancestor`.
fn descends_from(trace: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut current = span;
    for _ in 0..trace.len() {
        if current.parent_span_id == ancestor.span_id {
            return true;
        }
        match trace.iter().find(|s| s.span_id == current.parent_span_id) {
            Some(parent) => current = parent,
            None => return false,
        }
    }
    false
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
