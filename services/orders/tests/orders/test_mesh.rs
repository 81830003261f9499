//! `TestMesh`: users, auth, billing and orders started in-process on ephemeral ports, each on its
//! own SQLite database in one temporary directory, speaking mutual TLS with certificates from a
//! test CA in the same directory. It hands back ready clients (as the operator, whom every
//! service admits) and a few shorthands for the steps every test takes (a user, a top-up, a
//! balance, an order request).

use std::{
    future::Future,
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use mesh::{
    client::MeshChannel,
    config::{AdminConfig, DatabaseConfig, ServerConfig},
    testing::TestPki,
};
use meshwork::{
    billing::v1::{GetAccountRequest, TopUpRequest, billing_service_client::BillingServiceClient},
    common::v1::Money,
    orders::v1::{
        CreateOrderRequest, Order, OrderItem, OrderStatus, WatchOrderResponse,
        order_service_client::OrderServiceClient,
    },
    users::v1::{CreateUserRequest, user_service_client::UserServiceClient},
};
use orders::{Recovery, RecoveryConfig};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tonic::{Code, Streaming};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a server may take to report SERVING, or to stop.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two health checks while a server starts.
const HEALTH_RETRY: Duration = Duration::from_millis(50);
/// How long a test waits for a watched order to change.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The currency every test account and order uses.
pub const CURRENCY: &str = "EUR";

/// Recovery as tests want it: every PENDING order is due at once, and the background task
/// sweeps only at start, so that tests call [`Recovery::sweep`] when they choose.
fn on_demand_recovery() -> RecoveryConfig {
    RecoveryConfig {
        interval: Duration::from_secs(3600),
        min_age: Duration::ZERO,
    }
}

/// Which downstream services are up when orders starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Orders points at a port where nothing listens (until [`TestMesh::start_billing`]).
    pub billing_down: bool,
    /// Orders points at a port where nothing listens, for good.
    pub users_down: bool,
}

/// A server task and the switch that stops it (dropping it stops the server too).
pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    fn spawn<F, E>(
        run: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    ) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = run(Box::pin(async move {
            let _ = stopped.await;
        }));
        let task = tokio::spawn(async move { Ok(serving.await?) });
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Signals shutdown and waits until the server has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stop.take());
        tokio::time::timeout(STOP_TIMEOUT, &mut self.task)
            .await
            .context("server did not stop in time")??
    }
}

/// A started orders server.
pub struct OrdersServer {
    /// Its mesh port (mutual TLS only).
    pub addr: SocketAddr,
    /// Its plaintext admin port (health only).
    pub admin_addr: SocketAddr,
    /// A client calling it as the operator.
    pub client: OrderServiceClient<MeshChannel>,
    pub recovery: Recovery,
    pub server: Server,
}

/// Where orders reaches the services it calls.
#[derive(Debug, Clone, Copy)]
struct Downstream {
    users: SocketAddr,
    billing: SocketAddr,
    auth: SocketAddr,
}

pub struct TestMesh {
    dir: TempDir,
    /// The mesh's certificates: [`TestPki::channel_as`] calls a server as any service.
    pub pki: TestPki,
    downstream: Downstream,
    pub users: UserServiceClient<MeshChannel>,
    pub billing: BillingServiceClient<MeshChannel>,
    pub orders: OrderServiceClient<MeshChannel>,
    /// The first orders server's mesh and admin ports.
    pub orders_addr: SocketAddr,
    pub orders_admin_addr: SocketAddr,
    /// The first orders server's recovery.
    pub recovery: Recovery,
    servers: Vec<Server>,
}

impl TestMesh {
    /// Users, billing and orders, all up.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let mut servers = Vec::new();
        let users_addr = if options.users_down {
            unused_port()?
        } else {
            let app = users::App::build(users::Config {
                server: listening_on(loopback_port_zero()),
                database: mesh::store::testing::sqlite(dir.path(), "users"),
                tls: pki.config("users"),
                ..users::Config::default()
            })
            .await?;
            let addr = app.local_addr();
            servers.push(Server::spawn(|stop| app.run_until_stopped(stop)));
            wait_until_serving(&pki, addr, "users").await?;
            addr
        };
        let (auth_addr, auth) = start_auth(&dir, &pki, users_addr).await?;
        servers.push(auth);
        let billing_addr = if options.billing_down {
            unused_port()?
        } else {
            let (addr, server) = start_billing(&dir, &pki, loopback_port_zero()).await?;
            servers.push(server);
            addr
        };
        let downstream = Downstream {
            users: users_addr,
            billing: billing_addr,
            auth: auth_addr,
        };
        let orders = start_orders(&dir, &pki, downstream).await?;
        servers.push(orders.server);
        Ok(Self {
            users: UserServiceClient::new(pki.channel(users_addr, "users")?),
            billing: BillingServiceClient::new(pki.channel(billing_addr, "billing")?),
            orders: orders.client,
            orders_addr: orders.addr,
            orders_admin_addr: orders.admin_addr,
            recovery: orders.recovery,
            downstream,
            pki,
            dir,
            servers,
        })
    }

    /// Starts billing on the port orders was configured with (after `billing_down`).
    pub async fn start_billing(&mut self) -> anyhow::Result<()> {
        let (_, server) = start_billing(&self.dir, &self.pki, self.downstream.billing).await?;
        self.servers.push(server);
        Ok(())
    }

    /// Another orders server sharing the first one's database, users, billing and auth: a
    /// replica, or a restart after a crash. Its recovery sweeps once at start.
    pub async fn start_orders_replica(&self) -> anyhow::Result<OrdersServer> {
        start_orders(&self.dir, &self.pki, self.downstream).await
    }

    /// The orders database, to reach the store directly.
    pub fn orders_database(&self) -> DatabaseConfig {
        mesh::store::testing::sqlite(self.dir.path(), "orders")
    }

    /// A new user's id.
    pub async fn create_user(&self) -> anyhow::Result<String> {
        static USERS: AtomicU32 = AtomicU32::new(0);
        let n = USERS.fetch_add(1, Ordering::Relaxed);
        let user = self
            .users
            .clone()
            .create_user(CreateUserRequest {
                email: format!("buyer{n}@example.com"),
                display_name: format!("Buyer {n}"),
            })
            .await?
            .into_inner()
            .user
            .context("CreateUser returned no user")?;
        Ok(user.id)
    }

    /// A new user with `amount_minor` on their account.
    pub async fn funded_user(&self, amount_minor: i64) -> anyhow::Result<String> {
        let user_id = self.create_user().await?;
        self.top_up(&user_id, amount_minor).await?;
        Ok(user_id)
    }

    /// Adds `amount_minor` to the user's account.
    pub async fn top_up(&self, user_id: &str, amount_minor: i64) -> anyhow::Result<()> {
        static TOP_UPS: AtomicU32 = AtomicU32::new(0);
        let n = TOP_UPS.fetch_add(1, Ordering::Relaxed);
        self.billing
            .clone()
            .top_up(TopUpRequest {
                user_id: user_id.to_owned(),
                amount: Some(money(amount_minor)),
                idempotency_key: format!("test-top-up:{n}"),
            })
            .await?;
        Ok(())
    }

    /// The user's balance in minor units.
    pub async fn balance(&self, user_id: &str) -> anyhow::Result<i64> {
        let account = self
            .billing
            .clone()
            .get_account(GetAccountRequest {
                user_id: user_id.to_owned(),
            })
            .await?
            .into_inner()
            .account
            .context("GetAccount returned no account")?;
        Ok(account
            .balance
            .context("account without balance")?
            .amount_minor)
    }

    /// Places an order and returns it.
    pub async fn place(&self, request: CreateOrderRequest) -> anyhow::Result<Order> {
        self.orders
            .clone()
            .create_order(request)
            .await?
            .into_inner()
            .order
            .context("CreateOrder returned no order")
    }
}

/// A CreateOrder request.
pub fn order_request(
    user_id: &str,
    items: Vec<OrderItem>,
    idempotency_key: &str,
) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.to_owned(),
        items,
        idempotency_key: idempotency_key.to_owned(),
    }
}

/// One item priced in [`CURRENCY`].
pub fn item(sku: &str, quantity: i32, unit_price_minor: i64) -> OrderItem {
    OrderItem {
        sku: sku.to_owned(),
        quantity,
        unit_price: Some(money(unit_price_minor)),
    }
}

pub fn money(amount_minor: i64) -> Money {
    Money {
        currency_code: CURRENCY.to_owned(),
        amount_minor,
    }
}

/// The status of an order as the client sees it.
pub fn status_of(order: &Order) -> OrderStatus {
    OrderStatus::try_from(order.status).unwrap_or(OrderStatus::Unspecified)
}

/// The next order a watch sends, within [`WATCH_TIMEOUT`]; `None` when the stream ended.
pub async fn next_update(
    stream: &mut Streaming<WatchOrderResponse>,
) -> anyhow::Result<Option<Order>> {
    let message = tokio::time::timeout(WATCH_TIMEOUT, stream.message())
        .await
        .context("no update from the watch in time")??;
    Ok(message.and_then(|m| m.order))
}

/// Whether `result` failed with `code`; otherwise an error saying what came instead.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
) -> anyhow::Result<tonic::Status> {
    match result {
        Err(status) if status.code() == code => Ok(status),
        other => bail!("expected {code:?}, got {other:?}"),
    }
}

/// Auth, so that orders can fetch the keys that verify end users' tokens.
async fn start_auth(
    dir: &TempDir,
    pki: &TestPki,
    users_addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, Server)> {
    let app = auth::App::build(auth::Config {
        server: listening_on(loopback_port_zero()),
        database: mesh::store::testing::sqlite(dir.path(), "auth"),
        users: TestPki::client_config(users_addr),
        tls: pki.config("auth"),
        ..auth::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    let server = Server::spawn(|stop| app.run_until_stopped(stop));
    wait_until_serving(pki, addr, "auth").await?;
    Ok((addr, server))
}

async fn start_billing(
    dir: &TempDir,
    pki: &TestPki,
    addr: SocketAddr,
) -> anyhow::Result<(SocketAddr, Server)> {
    let app = billing::App::build(billing::Config {
        server: listening_on(addr),
        database: mesh::store::testing::sqlite(dir.path(), "billing"),
        tls: pki.config("billing"),
        ..billing::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    let server = Server::spawn(|stop| app.run_until_stopped(stop));
    wait_until_serving(pki, addr, "billing").await?;
    Ok((addr, server))
}

async fn start_orders(
    dir: &TempDir,
    pki: &TestPki,
    downstream: Downstream,
) -> anyhow::Result<OrdersServer> {
    let app = orders::App::build(orders::Config {
        server: listening_on(loopback_port_zero()),
        admin: AdminConfig {
            listen_addr: Some(loopback_port_zero()),
        },
        tls: pki.config("orders"),
        database: mesh::store::testing::sqlite(dir.path(), "orders"),
        users: TestPki::client_config(downstream.users),
        billing: TestPki::client_config(downstream.billing),
        auth: TestPki::client_config(downstream.auth),
        recovery: on_demand_recovery(),
        ..orders::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    let admin_addr = app
        .admin_addr()
        .context("orders was configured with an admin port")?;
    let recovery = app.recovery();
    let server = Server::spawn(|stop| app.run_until_stopped(stop));
    wait_until_serving(pki, addr, "orders").await?;
    Ok(OrdersServer {
        addr,
        admin_addr,
        client: OrderServiceClient::new(pki.channel(addr, "orders")?),
        recovery,
        server,
    })
}

fn loopback_port_zero() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn listening_on(addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        listen_addr: addr,
        ..ServerConfig::default()
    }
}

/// A loopback port where nothing listens: bound, then released.
fn unused_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind(loopback_port_zero())?.local_addr()?)
}

/// Waits until `service`'s server at `addr` reports SERVING (its database is up).
async fn wait_until_serving(pki: &TestPki, addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let mut health = HealthClient::new(pki.channel(addr, service)?);
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        if let Ok(response) = health.check(request).await
            && response.into_inner().status() == ServingStatus::Serving
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{addr} is not SERVING after {STARTUP_TIMEOUT:?}");
        }
        tokio::time::sleep(HEALTH_RETRY).await;
    }
}
