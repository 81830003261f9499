//! Traffic across the whole mesh: how the client stack carries a call from one service to the
//! next.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use mesh::{
    client::MeshChannel,
    config::ServerConfig,
    deadline::{GRPC_TIMEOUT, decode_timeout},
    server::{MeshServer, always_ready},
};
use meshwork::{
    auth::v1::RegisterRequest,
    billing::v1::TopUpRequest,
    common::v1::Money,
    orders::v1::{CreateOrderRequest, OrderItem, OrderStatus},
};
use support::TestMesh;
use tokio::sync::oneshot;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Context, Poll, Service, http},
    server::NamedService,
    service::Routes,
};

/// The deadline the test gives CreateOrder.
const ORDER_DEADLINE: Duration = Duration::from_secs(3);
/// What orders may spend before it charges (checking the user, storing the order) on a loaded
/// machine. Without propagation billing would be given orders' 5 s client default instead.
const BEFORE_CHARGE: Duration = Duration::from_millis(1500);
const CHARGE: &str = "/meshwork.billing.v1.BillingService/Charge";

/// A call that reached billing: its method's path and its `grpc-timeout`.
type Arrival = (String, Option<Duration>);

/// What arrives at billing's port: each call's method and `grpc-timeout`, recorded, then
/// forwarded to the real billing unchanged. It serves as billing (billing's certificate), so
/// orders cannot tell it from billing.
#[derive(Clone)]
struct BillingWire {
    billing: MeshChannel,
    seen: Arc<Mutex<Vec<Arrival>>>,
}

impl NamedService for BillingWire {
    const NAME: &'static str = "meshwork.billing.v1.BillingService";
}

impl Service<http::Request<Body>> for BillingWire {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let timeout = request.headers().get(GRPC_TIMEOUT).and_then(decode_timeout);
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((request.uri().path().to_owned(), timeout));
        }
        let mut billing = self.billing.clone();
        Box::pin(async move {
            let forwarded = async {
                std::future::poll_fn(|cx| billing.poll_ready(cx)).await?;
                billing.call(request).await
            };
            Ok(forwarded
                .await
                .unwrap_or_else(|error| Status::from_error(error).into_http()))
        })
    }
}

struct Wire {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Arrival>>>,
    _stop: oneshot::Sender<()>,
}

impl Wire {
    /// Serves as billing, forwarding to the mesh's billing as orders would call it.
    async fn start(mesh: &TestMesh) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let wire = BillingWire {
            billing: mesh.channel_as("orders", "billing")?,
            seen: seen.clone(),
        };
        let server = MeshServer::bind(&ServerConfig::default())
            .await?
            .with_tls(mesh.pki.tls("billing")?);
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.serve(
            Routes::new(wire),
            &[BillingWire::NAME],
            always_ready(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            seen,
            _stop: stop,
        })
    }

    /// The `grpc-timeout` of each call of `method` that arrived.
    fn timeouts(&self, method: &str) -> Vec<Option<Duration>> {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        seen.into_iter()
            .filter(|(path, _)| path == method)
            .map(|(_, timeout)| timeout)
            .collect()
    }
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

#[tokio::test]
async fn orders_gives_billing_what_is_left_of_its_callers_deadline() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let wire = Wire::start(&mesh).await?;
    mesh.restart_orders_with_billing_at(wire.addr).await?;
    let user_id = mesh
        .auth_client()?
        .register(RegisterRequest {
            email: "deadline@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Deadline".into(),
        })
        .await?
        .into_inner()
        .user_id;
    mesh.billing_client()?
        .top_up(TopUpRequest {
            user_id: user_id.clone(),
            amount: eur(10_000),
            idempotency_key: "deadline-top-up".into(),
        })
        .await?;

    let mut order = tonic::Request::new(CreateOrderRequest {
        user_id,
        items: vec![OrderItem {
            sku: "book".into(),
            quantity: 1,
            unit_price: eur(1_000),
        }],
        idempotency_key: "deadline-order".into(),
    });
    order.set_timeout(ORDER_DEADLINE);
    let placed = tokio::time::timeout(
        ORDER_DEADLINE * 2,
        mesh.orders_client()?.create_order(order),
    )
    .await
    .context("CreateOrder did not end")??
    .into_inner()
    .order;
    assert_eq!(placed.map(|o| o.status()), Some(OrderStatus::Paid));

    // The charge CreateOrder made reached billing with what was left of CreateOrder's deadline
    // (recovery's own charges of the order, if any, carry orders' default instead).
    let charges = wire.timeouts(CHARGE);
    let inherited = charges
        .iter()
        .flatten()
        .any(|timeout| *timeout <= ORDER_DEADLINE && *timeout > ORDER_DEADLINE - BEFORE_CHARGE);
    assert!(inherited, "billing saw Charge calls with {charges:?}");
    Ok(())
}
