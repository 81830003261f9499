//! `TestMesh`: the whole mesh in this test process. users, billing, auth and orders run as real
//! tonic servers on ephemeral ports, each with its own database (SQLite files in a temp dir, or
//! fresh PostgreSQL databases when `TEST_POSTGRES_URL` is set and asked for) and its own
//! certificate from a test CA, wired to each other through the mesh client stack over mutual TLS
//! exactly as in production, and handed back as ready clients (as the operator, or as any
//! identity). Any service can be stopped and started again on the same port and database.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use mesh::pki::OPERATOR;
use mesh::{
    client::MeshChannel,
    config::{ClientConfig, DatabaseConfig, ServerConfig},
    store::testing,
    testing::TestPki,
};
use meshwork::{
    auth::v1::auth_service_client::AuthServiceClient,
    billing::v1::billing_service_client::BillingServiceClient,
    orders::v1::order_service_client::OrderServiceClient,
    users::v1::user_service_client::UserServiceClient,
};
use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a service may take to report SERVING in a test.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);
/// Recovery runs often in tests so that "eventually PAID" arrives quickly.
pub const TEST_RECOVERY_INTERVAL: Duration = Duration::from_millis(200);

/// Which databases the mesh runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Sqlite,
    Postgres,
}

/// A running service: its address, and the handle that stops it.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops the service gracefully and waits until it has exited.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(READY_TIMEOUT, &mut self.task)
            .await
            .context("service did not stop")?
            .context("service task failed")?;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The four services, their databases and clients to each.
pub struct TestMesh {
    pub dir: TempDir,
    pub pki: Arc<TestPki>,
    pub storage: Storage,
    pub users: Running,
    pub billing: Running,
    pub auth: Running,
    pub orders: Running,
    databases: Databases,
}

/// Each service's database, kept so a service can restart on the same data.
#[derive(Clone)]
struct Databases {
    users: DatabaseConfig,
    billing: DatabaseConfig,
    auth: DatabaseConfig,
    orders: DatabaseConfig,
}

impl TestMesh {
    /// The mesh on SQLite files in a temp dir.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(Storage::Sqlite).await
    }

    /// The mesh on PostgreSQL if `TEST_POSTGRES_URL` is set; `None` otherwise (the test is
    /// then a no-op for that backend, and CI always sets the URL).
    pub async fn start_on_postgres() -> anyhow::Result<Option<Self>> {
        if std::env::var(testing::POSTGRES_URL_VAR).is_err() {
            return Ok(None);
        }
        Self::start_on(Storage::Postgres).await.map(Some)
    }

    async fn start_on(storage: Storage) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let database = |service: &'static str| {
            let dir = dir.path().to_path_buf();
            async move {
                match storage {
                    Storage::Sqlite => Ok(testing::sqlite(&dir, service)),
                    Storage::Postgres => testing::postgres(service)
                        .await?
                        .context("TEST_POSTGRES_URL vanished"),
                }
            }
        };
        let databases = Databases {
            users: database("users").await?,
            billing: database("billing").await?,
            auth: database("auth").await?,
            orders: database("orders").await?,
        };
        let pki = Arc::new(TestPki::new(&dir.path().join("certs"))?);
        // users and billing verify end-user tokens against auth, which itself calls users: auth's
        // address is chosen first so that each can be told where the other is.
        let auth_addr = dead_addr()?;
        let users = start_users(&pki, any_port(), databases.users.clone(), auth_addr).await?;
        let billing = start_billing(&pki, any_port(), databases.billing.clone(), auth_addr).await?;
        let auth = start_auth(&pki, auth_addr, databases.auth.clone(), users.addr).await?;
        let orders = start_orders(
            &pki,
            any_port(),
            databases.orders.clone(),
            Downstreams {
                users: users.addr,
                billing: billing.addr,
                auth: auth.addr,
            },
        )
        .await?;
        Ok(Self {
            dir,
            pki,
            storage,
            users,
            billing,
            auth,
            orders,
            databases,
        })
    }

    /// A channel to `service` presenting `identity`'s certificate.
    pub fn channel_as(&self, identity: &str, service: &str) -> anyhow::Result<MeshChannel> {
        let addr = match service {
            "users" => self.users.addr,
            "billing" => self.billing.addr,
            "auth" => self.auth.addr,
            "orders" => self.orders.addr,
            other => anyhow::bail!("no service {other} in the test mesh"),
        };
        Ok(self.pki.channel_as(identity, addr, service)?)
    }

    pub fn users_client(&self) -> anyhow::Result<UserServiceClient<MeshChannel>> {
        Ok(UserServiceClient::new(self.channel_as(OPERATOR, "users")?))
    }

    pub fn billing_client(&self) -> anyhow::Result<BillingServiceClient<MeshChannel>> {
        Ok(BillingServiceClient::new(
            self.channel_as(OPERATOR, "billing")?,
        ))
    }

    pub fn auth_client(&self) -> anyhow::Result<AuthServiceClient<MeshChannel>> {
        Ok(AuthServiceClient::new(self.channel_as(OPERATOR, "auth")?))
    }

    pub fn orders_client(&self) -> anyhow::Result<OrderServiceClient<MeshChannel>> {
        Ok(OrderServiceClient::new(
            self.channel_as(OPERATOR, "orders")?,
        ))
    }

    fn downstreams(&self) -> Downstreams {
        Downstreams {
            users: self.users.addr,
            billing: self.billing.addr,
            auth: self.auth.addr,
        }
    }

    /// Stops billing; its port stays known so [`Self::start_billing_again`] can reuse it.
    pub async fn stop_billing(&mut self) -> anyhow::Result<()> {
        let placeholder = Running::finished(self.billing.addr);
        std::mem::replace(&mut self.billing, placeholder)
            .stop()
            .await
    }

    pub async fn start_billing_again(&mut self) -> anyhow::Result<()> {
        self.billing = start_billing(
            &self.pki,
            self.billing.addr,
            self.databases.billing.clone(),
            self.auth.addr,
        )
        .await?;
        Ok(())
    }

    /// Stops orders (as a crash or a deploy would) and starts a fresh process on its data.
    pub async fn restart_orders(&mut self) -> anyhow::Result<()> {
        let addr = self.orders.addr;
        let placeholder = Running::finished(addr);
        std::mem::replace(&mut self.orders, placeholder)
            .stop()
            .await?;
        self.orders = start_orders(
            &self.pki,
            addr,
            self.databases.orders.clone(),
            self.downstreams(),
        )
        .await?;
        Ok(())
    }

    /// Stops orders and starts it again with billing pointed at `billing` (e.g. a dead port).
    pub async fn restart_orders_with_billing_at(
        &mut self,
        billing: SocketAddr,
    ) -> anyhow::Result<()> {
        let addr = self.orders.addr;
        let placeholder = Running::finished(addr);
        std::mem::replace(&mut self.orders, placeholder)
            .stop()
            .await?;
        let downstreams = Downstreams {
            billing,
            ..self.downstreams()
        };
        self.orders =
            start_orders(&self.pki, addr, self.databases.orders.clone(), downstreams).await?;
        Ok(())
    }
}

impl Running {
    /// A stand-in for a service that is not running.
    fn finished(addr: SocketAddr) -> Self {
        Self {
            addr,
            stop: None,
            task: tokio::spawn(async {}),
        }
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// An address where nothing listens (a port bound, then released).
pub fn dead_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn server(addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        listen_addr: addr,
        drain_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

fn client(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        default_deadline: Duration::from_secs(5),
        ..TestPki::client_config(addr)
    }
}

/// Where a caller's downstream services listen.
#[derive(Debug, Clone, Copy)]
pub struct Downstreams {
    pub users: SocketAddr,
    pub billing: SocketAddr,
    pub auth: SocketAddr,
}

/// Runs an app until stopped, and waits until it reports SERVING.
async fn spawn<F>(pki: &TestPki, addr: SocketAddr, service: &str, run: F) -> anyhow::Result<Running>
where
    F: FnOnce(oneshot::Receiver<()>) -> JoinHandle<()>,
{
    let (stop, stopped) = oneshot::channel();
    let task = run(stopped);
    wait_serving(pki, addr, service).await?;
    Ok(Running {
        addr,
        stop: Some(stop),
        task,
    })
}

async fn until(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

pub async fn start_users(
    pki: &TestPki,
    addr: SocketAddr,
    database: DatabaseConfig,
    auth: SocketAddr,
) -> anyhow::Result<Running> {
    let app = users::App::build(users::Config {
        server: server(addr),
        database,
        tls: pki.config("users"),
        auth: client(auth),
        ..users::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    spawn(pki, addr, "users", |stopped| {
        tokio::spawn(async move {
            if let Err(error) = app.run_until_stopped(until(stopped)).await {
                eprintln!("users stopped with an error: {error}");
            }
        })
    })
    .await
}

pub async fn start_billing(
    pki: &TestPki,
    addr: SocketAddr,
    database: DatabaseConfig,
    auth: SocketAddr,
) -> anyhow::Result<Running> {
    let app = billing::App::build(billing::Config {
        server: server(addr),
        database,
        tls: pki.config("billing"),
        auth: client(auth),
        ..billing::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    spawn(pki, addr, "billing", |stopped| {
        tokio::spawn(async move {
            if let Err(error) = app.run_until_stopped(until(stopped)).await {
                eprintln!("billing stopped with an error: {error}");
            }
        })
    })
    .await
}

pub async fn start_auth(
    pki: &TestPki,
    addr: SocketAddr,
    database: DatabaseConfig,
    users: SocketAddr,
) -> anyhow::Result<Running> {
    let app = auth::App::build(auth::Config {
        server: server(addr),
        database,
        tls: pki.config("auth"),
        users: client(users),
        ..auth::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    spawn(pki, addr, "auth", |stopped| {
        tokio::spawn(async move {
            if let Err(error) = app.run_until_stopped(until(stopped)).await {
                eprintln!("auth stopped with an error: {error}");
            }
        })
    })
    .await
}

pub async fn start_orders(
    pki: &TestPki,
    addr: SocketAddr,
    database: DatabaseConfig,
    downstreams: Downstreams,
) -> anyhow::Result<Running> {
    let app = orders::App::build(orders::Config {
        server: server(addr),
        database,
        tls: pki.config("orders"),
        users: client(downstreams.users),
        billing: client(downstreams.billing),
        auth: client(downstreams.auth),
        recovery: orders::RecoveryConfig {
            interval: TEST_RECOVERY_INTERVAL,
            min_age: Duration::ZERO,
        },
        ..orders::Config::default()
    })
    .await?;
    let addr = app.local_addr();
    spawn(pki, addr, "orders", |stopped| {
        tokio::spawn(async move {
            if let Err(error) = app.run_until_stopped(until(stopped)).await {
                eprintln!("orders stopped with an error: {error}");
            }
        })
    })
    .await
}

/// Polls `grpc.health.v1` of `service` (users, billing, auth, orders) at `addr`, over mutual
/// TLS as the operator, until the whole server reports SERVING.
pub async fn wait_serving(pki: &TestPki, addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let mut health = HealthClient::new(pki.channel(addr, service)?);
    let poll = async {
        loop {
            let serving = health
                .check(HealthCheckRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving);
            if serving {
                return anyhow::Ok(());
            }
            tokio::time::sleep(READY_POLL).await;
        }
    };
    tokio::time::timeout(READY_TIMEOUT, poll)
        .await
        .with_context(|| format!("{service} at {addr} not SERVING in time"))?
}

/// Waits until `check` returns `Some`, polling; fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let poll = async {
        loop {
            if let Some(value) = check().await? {
                return anyhow::Ok(value);
            }
            tokio::time::sleep(READY_POLL).await;
        }
    };
    tokio::time::timeout(timeout, poll)
        .await
        .context("condition not reached in time")?
}
