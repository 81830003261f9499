//! The real services under load: users, billing and orders started from their release
//! binaries (each pinned to the server CPU, configured through the environment as the chart
//! does), on SQLite files or on fresh PostgreSQL databases, with the data the calls need (users,
//! and a balance for each in billing). Auth is not started: the load calls as the operator
//! (mutual TLS, no end-user token), so no service needs auth's key set.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use mesh::tls::{MeshTls, TlsConfig};
use meshwork::{
    billing::v1::{TopUpRequest, billing_service_client::BillingServiceClient},
    common::v1::Money,
    users::v1::{CreateUserRequest, user_service_client::UserServiceClient},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    procs::{Proc, Spec, free_addr},
    targets::{self, Security},
};

/// Users created for the load (calls go to them in turn).
pub const USERS: usize = 64;
/// Each user's balance: enough for every order a run can make.
const BALANCE_MINOR: i64 = 1_000_000_000_000;
/// Between health polls while a service starts.
const READY_POLL: Duration = Duration::from_millis(100);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the services keep their data.
#[derive(Debug, Clone)]
pub enum Database {
    /// A file per service in this directory.
    Sqlite(PathBuf),
    /// A fresh database per service on this server (the admin URL the databases are made from).
    Postgres(String),
}

impl Database {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// The database URL of each service, made once and kept for every start of the mesh.
#[derive(Debug, Clone)]
pub struct Urls {
    users: String,
    billing: String,
    orders: String,
    /// PostgreSQL databases to drop at the end: (admin URL, name).
    created: Vec<(String, String)>,
}

impl Urls {
    pub async fn prepare(database: &Database) -> anyhow::Result<Self> {
        match database {
            Database::Sqlite(dir) => {
                std::fs::create_dir_all(dir)?;
                let url = |service: &str| format!("sqlite://{}/{service}.db", dir.display());
                Ok(Self {
                    users: url("users"),
                    billing: url("billing"),
                    orders: url("orders"),
                    created: Vec::new(),
                })
            }
            Database::Postgres(admin) => {
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                let mut created = Vec::new();
                let mut urls = Vec::new();
                for service in ["users", "billing", "orders"] {
                    let name = format!("bench_{service}_{}", &suffix[..12]);
                    urls.push(mesh::store::create_postgres_database(admin, &name).await?);
                    created.push((admin.clone(), name));
                }
                let [users, billing, orders] = <[String; 3]>::try_from(urls)
                    .map_err(|_| anyhow::anyhow!("three databases expected"))?;
                Ok(Self {
                    users,
                    billing,
                    orders,
                    created,
                })
            }
        }
    }

    /// Drops the PostgreSQL databases made for the run.
    pub async fn drop_databases(&self) -> anyhow::Result<()> {
        for (admin, name) in &self.created {
            let pool = sqlx::any::AnyPoolOptions::new()
                .max_connections(1)
                .connect(admin)
                .await?;
            let statement = format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                name.replace('"', "")
            );
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await
                .with_context(|| format!("dropping {name}"))?;
            pool.close().await;
        }
        Ok(())
    }
}

/// users, billing and orders, serving.
pub struct RealMesh {
    pub users: SocketAddr,
    pub billing: SocketAddr,
    pub orders: SocketAddr,
    pub procs: Vec<Proc>,
}

/// How to start the services.
pub struct Start<'a> {
    pub launcher: &'a Path,
    pub bin_dir: &'a Path,
    pub certs_dir: &'a Path,
    pub log_dir: &'a Path,
    pub cpu: usize,
    pub operator: &'a MeshTls,
    /// The tracing environment (`OTEL_*`: endpoint, sampler, batching).
    pub tracing: &'a [(String, String)],
    /// Process and log file names get this suffix (`-sqlite-traced`).
    pub label: String,
}

impl Start<'_> {
    fn environment(
        &self,
        service: &str,
        listen: SocketAddr,
        database_url: &str,
        downstreams: &[(&str, SocketAddr)],
    ) -> Vec<(String, String)> {
        let tls = TlsConfig::in_dir(self.certs_dir, service);
        let mut env: Vec<(String, String)> = [
            ("MESHWORK_SERVER__LISTEN_ADDR", listen.to_string()),
            ("MESHWORK_DATABASE__URL", database_url.to_owned()),
            (
                "MESHWORK_TLS__CERT_FILE",
                tls.cert_file.display().to_string(),
            ),
            ("MESHWORK_TLS__KEY_FILE", tls.key_file.display().to_string()),
            ("MESHWORK_TLS__CA_FILE", tls.ca_file.display().to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        for (name, addr) in downstreams {
            env.push((
                format!("MESHWORK_{}__ENDPOINTS", name.to_uppercase()),
                format!(r#"["https://{addr}"]"#),
            ));
        }
        env.extend(self.tracing.iter().cloned());
        env.push(("OTEL_SERVICE_NAME".to_owned(), service.to_owned()));
        env
    }

    async fn service(
        &self,
        service: &str,
        grpc_service: &str,
        database_url: &str,
        downstreams: &[(&str, SocketAddr)],
    ) -> anyhow::Result<Proc> {
        let listen = free_addr()?;
        let binary = self.bin_dir.join(service);
        if !binary.exists() {
            bail!(
                "{} not found: build the services first (`cargo build --release --bins`)",
                binary.display()
            );
        }
        let mut args = vec![
            "pinned".to_owned(),
            "--cpu".to_owned(),
            self.cpu.to_string(),
            "--".to_owned(),
        ];
        args.push(binary.display().to_string());
        let spec = Spec {
            name: format!("{service}{}", self.label),
            program: self.launcher,
            args,
            env: self.environment(service, listen, database_url, downstreams),
            log_dir: self.log_dir,
        };
        let mut proc = Proc::listening_on(spec, listen)?;
        wait_serving(&mut proc, service, grpc_service, self.operator).await?;
        proc.mark_idle()?;
        Ok(proc)
    }

    /// Starts users, billing and orders (in that order: orders calls the other two) on `urls`.
    pub async fn mesh(&self, urls: &Urls) -> anyhow::Result<RealMesh> {
        // Auth is not running: nothing calls it unless an end-user token arrives. Its endpoint
        // points at a closed port so that a call that did need it would fail, not hang.
        let auth = free_addr()?;
        let users = self
            .service(
                "users",
                "meshwork.users.v1.UserService",
                &urls.users,
                &[("auth", auth)],
            )
            .await?;
        let billing = self
            .service(
                "billing",
                "meshwork.billing.v1.BillingService",
                &urls.billing,
                &[("auth", auth)],
            )
            .await?;
        let orders = self
            .service(
                "orders",
                "meshwork.orders.v1.OrderService",
                &urls.orders,
                &[
                    ("users", users.addr),
                    ("billing", billing.addr),
                    ("auth", auth),
                ],
            )
            .await?;
        Ok(RealMesh {
            users: users.addr,
            billing: billing.addr,
            orders: orders.addr,
            procs: vec![users, billing, orders],
        })
    }
}

async fn wait_serving(
    proc: &mut Proc,
    service: &str,
    grpc_service: &str,
    operator: &MeshTls,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < READY_TIMEOUT {
        proc.check_alive()?;
        match operator_channel(proc.addr, service, operator).await {
            Ok(channel) => {
                let request = HealthCheckRequest {
                    service: grpc_service.to_owned(),
                };
                match HealthClient::new(channel).check(request).await {
                    Ok(response) if response.get_ref().status() == ServingStatus::Serving => {
                        return Ok(());
                    }
                    Ok(response) => last = format!("{:?}", response.get_ref().status()),
                    Err(status) => last = status.to_string(),
                }
            }
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(READY_POLL).await;
    }
    bail!(
        "{} not SERVING within {READY_TIMEOUT:?} (last: {last})",
        proc.name
    )
}

/// Creates [`USERS`] users, each with a balance: their ids.
pub async fn seed(mesh: &RealMesh, operator: &MeshTls) -> anyhow::Result<Vec<String>> {
    let users_channel = operator_channel(mesh.users, "users", operator).await?;
    let billing_channel = operator_channel(mesh.billing, "billing", operator).await?;
    let mut users = UserServiceClient::new(users_channel);
    let mut billing = BillingServiceClient::new(billing_channel);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut ids = Vec::with_capacity(USERS);
    for i in 0..USERS {
        let user = users
            .create_user(CreateUserRequest {
                email: format!("bench-{i}-{run}@bench.example"),
                display_name: format!("Bench User {i}"),
            })
            .await
            .context("creating a user")?
            .into_inner()
            .user
            .context("CreateUser answered no user")?;
        billing
            .top_up(TopUpRequest {
                user_id: user.id.clone(),
                amount: Some(Money {
                    currency_code: targets::CURRENCY.to_owned(),
                    amount_minor: BALANCE_MINOR,
                }),
                idempotency_key: format!("bench-top-up-{run}-{i}"),
            })
            .await
            .context("topping up a balance")?;
        ids.push(user.id);
    }
    Ok(ids)
}

async fn operator_channel(
    addr: SocketAddr,
    service: &str,
    operator: &MeshTls,
) -> anyhow::Result<tonic::transport::Channel> {
    let security = Security::Mtls {
        tls: operator.clone(),
        service: service.to_owned(),
    };
    targets::channels(addr, &security, 1)
        .await?
        .pop()
        .context("no channel")
}
