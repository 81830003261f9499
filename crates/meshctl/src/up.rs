//! `meshctl up`: the local mesh. Writes the development PKI if it is missing (`meshctl certs`),
//! starts each service binary (found beside `meshctl`) as its own process on the embedded
//! defaults (SQLite files under the data directory, its own certificate, mutual TLS to its
//! downstreams), users with two replicas so balancing is visible, waits until each reports
//! SERVING through `grpc.health.v1` (asked over mutual TLS as the operator), prints grpcurl
//! commands that work, and on Ctrl-C / SIGTERM stops them all with SIGTERM (then SIGKILL after a
//! grace period). If a service dies, the whole mesh is stopped.
//!
//! Traces: unless `--otlp-endpoint` names a collector of the user's, `meshctl up` runs a small
//! OTLP receiver of its own ([`crate::collector`]) and points every service at it, sampling
//! every trace, so that `meshctl trace` can show the last ones.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use mesh::{
    config::ClientConfig,
    pki::OPERATOR,
    tls::{DEFAULT_TRUST_DOMAIN, MeshTls, TlsConfig},
};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::collector::Collector;

/// How long each service gets to report SERVING after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Between health polls while waiting.
const READY_POLL: Duration = Duration::from_millis(200);
/// After SIGTERM, how long a service gets to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Printed once every service is SERVING; scripts wait for it.
pub const READY_LINE: &str = "meshwork: all services SERVING";
/// Where the SQLite files (and the last traces) live by default.
pub const DEFAULT_DATA_DIR: &str = ".meshwork/data";
/// Locally every trace is kept: nobody is paying for the volume.
const TRACES_SAMPLER: &str = "parentbased_always_on";
/// How often the services send their finished spans, in milliseconds: soon enough that
/// `meshctl trace` right after a call shows it whole (the SDK's default is 5 s).
const TRACES_EXPORT_DELAY_MS: &str = "500";

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where the SQLite files (and the last traces) live.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Where the service binaries are; defaults to meshctl's own directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the mesh certificates are; written there first if missing (as `meshctl certs`).
    #[arg(long, default_value = crate::certs::DEFAULT_DIR)]
    certs_dir: PathBuf,
    /// Send the services' traces to this OTLP/gRPC collector (`http://host:4317`) instead of
    /// receiving them here (`meshctl trace` then has none: look in that collector).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Where the built-in trace receiver listens (plaintext OTLP/gRPC).
    #[arg(long, default_value = crate::collector::DEFAULT_LISTEN)]
    otlp_listen: SocketAddr,
    /// How many of the last traces the built-in receiver keeps for `meshctl trace`.
    #[arg(long, default_value_t = crate::collector::DEFAULT_KEPT)]
    keep_traces: usize,
}

/// One process of the local mesh.
struct Instance {
    /// Name in logs, e.g. `users-2`.
    name: &'static str,
    /// The binary: a service package's name, which is also its name in the mesh (its identity,
    /// its certificate's file name, the name clients expect the server to present).
    binary: &'static str,
    addr: SocketAddr,
    /// The gRPC service health is asked about, and that grpcurl calls.
    service: &'static str,
    /// An example RPC call, as grpcurl arguments after the address.
    example: &'static str,
}

const USERS_1: &str = "127.0.0.1:50051";
const USERS_2: &str = "127.0.0.1:50061";
const AUTH: &str = "127.0.0.1:50052";
const BILLING: &str = "127.0.0.1:50053";
const ORDERS: &str = "127.0.0.1:50054";

fn instances() -> anyhow::Result<Vec<Instance>> {
    // Started in this order: a second users replica only after the first has migrated the
    // shared file, and the callers after what they call.
    Ok(vec![
        Instance {
            name: "users-1",
            binary: "users",
            addr: USERS_1.parse()?,
            service: "meshwork.users.v1.UserService",
            example: r#"-d '{"email":"ada@example.com","display_name":"Ada"}' meshwork.users.v1.UserService/CreateUser"#,
        },
        Instance {
            name: "users-2",
            binary: "users",
            addr: USERS_2.parse()?,
            service: "meshwork.users.v1.UserService",
            example: "-d '{}' meshwork.users.v1.UserService/ListUsers",
        },
        Instance {
            name: "billing",
            binary: "billing",
            addr: BILLING.parse()?,
            service: "meshwork.billing.v1.BillingService",
            example: r#"-d '{"user_id":"<user id>","amount":{"currency_code":"EUR","amount_minor":5000},"idempotency_key":"topup-1"}' meshwork.billing.v1.BillingService/TopUp"#,
        },
        Instance {
            name: "auth",
            binary: "auth",
            addr: AUTH.parse()?,
            service: "meshwork.auth.v1.AuthService",
            example: "-d '{}' meshwork.auth.v1.AuthService/GetJwks",
        },
        Instance {
            name: "orders",
            binary: "orders",
            addr: ORDERS.parse()?,
            service: "meshwork.orders.v1.OrderService",
            example: r#"-d '{"user_id":"<user id>","items":[{"sku":"book","quantity":2,"unit_price":{"currency_code":"EUR","amount_minor":1250}}],"idempotency_key":"order-1"}' meshwork.orders.v1.OrderService/CreateOrder"#,
        },
    ])
}

/// The environment that configures one instance: its port, its database, its certificate, its
/// downstreams, where its traces go.
fn environment(
    instance: &Instance,
    data_dir: &Path,
    certs_dir: &Path,
    otlp_endpoint: Option<&str>,
) -> Vec<(String, String)> {
    let tls = TlsConfig::in_dir(certs_dir, instance.binary);
    let mut env = vec![
        (
            "MESHWORK_SERVER__LISTEN_ADDR".to_owned(),
            instance.addr.to_string(),
        ),
        (
            "MESHWORK_ADMIN__LISTEN_ADDR".to_owned(),
            admin_addr(instance.addr).to_string(),
        ),
        (
            "MESHWORK_DATABASE__URL".to_owned(),
            format!("sqlite://{}/{}.db", data_dir.display(), instance.binary),
        ),
        (
            "MESHWORK_TLS__CERT_FILE".to_owned(),
            tls.cert_file.display().to_string(),
        ),
        (
            "MESHWORK_TLS__KEY_FILE".to_owned(),
            tls.key_file.display().to_string(),
        ),
        (
            "MESHWORK_TLS__CA_FILE".to_owned(),
            tls.ca_file.display().to_string(),
        ),
    ];
    if let Some(endpoint) = otlp_endpoint {
        env.extend(
            [
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_SERVICE_NAME", instance.binary),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    &format!("service.instance.id={}", instance.name),
                ),
                ("OTEL_TRACES_SAMPLER", TRACES_SAMPLER),
                ("OTEL_BSP_SCHEDULE_DELAY", TRACES_EXPORT_DELAY_MS),
            ]
            .map(|(key, value)| (key.to_owned(), value.to_owned())),
        );
    }
    let users = format!(r#"["https://{USERS_1}","https://{USERS_2}"]"#);
    // Users, billing and orders verify end users' tokens against auth's key set.
    let auth = (
        "MESHWORK_AUTH__ENDPOINTS".to_owned(),
        format!(r#"["https://{AUTH}"]"#),
    );
    match instance.binary {
        "auth" => env.push(("MESHWORK_USERS__ENDPOINTS".to_owned(), users)),
        "users" | "billing" => env.push(auth),
        "orders" => {
            env.push(("MESHWORK_USERS__ENDPOINTS".to_owned(), users));
            env.push((
                "MESHWORK_BILLING__ENDPOINTS".to_owned(),
                format!(r#"["https://{BILLING}"]"#),
            ));
            env.push(auth);
        }
        _ => {}
    }
    env
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("locating meshctl")?
            .parent()
            .map(Path::to_path_buf)
            .context("meshctl has no parent directory")?,
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let pki = crate::certs::ensure(
        &args.certs_dir,
        DEFAULT_TRUST_DOMAIN,
        crate::certs::DEFAULT_NAMESPACE,
    )?;
    if pki.new_ca || !pki.issued.is_empty() {
        println!(
            "meshwork: wrote mesh certificates to {} (meshctl certs)",
            pki.dir.display()
        );
    }
    let operator = MeshTls::load(&TlsConfig::in_dir(&pki.dir, OPERATOR)).with_context(|| {
        format!(
            "loading the operator's certificate from {}",
            pki.dir.display()
        )
    })?;

    let (collector, otlp_endpoint) = traces(
        args.otlp_endpoint.as_deref(),
        args.otlp_listen,
        args.keep_traces,
        &data_dir,
    )
    .await;
    let instances = instances()?;
    let mut children: Vec<(&'static str, Child)> = Vec::new();
    let started = start_all(
        &instances,
        &bin_dir,
        &data_dir,
        &pki.dir,
        otlp_endpoint.as_deref(),
        &operator,
        &mut children,
    )
    .await;
    if let Err(error) = started {
        stop_all(&mut children).await;
        return Err(error);
    }
    print_commands(&instances, &pki.dir);
    println!("{READY_LINE}");

    let outcome = tokio::select! {
        () = mesh::shutdown::signal() => Ok(()),
        exited = first_exit(&mut children) => Err(exited),
    };
    stop_all(&mut children).await;
    // The services sent their last spans as they stopped.
    if let Some(collector) = collector
        && let Err(error) = collector.stop().await
    {
        eprintln!("meshwork: {error:#}");
    }
    outcome
}

/// Where the services send their traces: the user's collector, else a receiver of our own.
/// Without either the mesh runs all the same, untraced.
async fn traces(
    external: Option<&str>,
    listen: SocketAddr,
    kept: usize,
    data_dir: &Path,
) -> (Option<Collector>, Option<String>) {
    if let Some(endpoint) = external {
        println!("meshwork: the services send their traces to {endpoint}");
        return (None, Some(endpoint.to_owned()));
    }
    match Collector::start(listen, data_dir, kept).await {
        Ok(collector) => {
            let endpoint = format!("http://{}", collector.addr());
            println!(
                "meshwork: receiving traces on {endpoint}; `meshctl trace` shows the last ones"
            );
            (Some(collector), Some(endpoint))
        }
        Err(error) => {
            eprintln!(
                "meshwork: running without traces: {error:#} (--otlp-endpoint uses a collector \
                 that is already there, --otlp-listen another port)"
            );
            (None, None)
        }
    }
}

async fn start_all(
    instances: &[Instance],
    bin_dir: &Path,
    data_dir: &Path,
    certs_dir: &Path,
    otlp_endpoint: Option<&str>,
    operator: &MeshTls,
    children: &mut Vec<(&'static str, Child)>,
) -> anyhow::Result<()> {
    for instance in instances {
        let binary = bin_dir.join(instance.binary);
        if !binary.exists() {
            bail!(
                "{} not found: build the services first (`cargo build --workspace --bins`)",
                binary.display()
            );
        }
        let mut child = Command::new(&binary)
            .envs(environment(instance, data_dir, certs_dir, otlp_endpoint))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        forward_output(instance.name, &mut child);
        children.push((instance.name, child));
        wait_serving(instance, operator)
            .await
            .with_context(|| format!("{} did not become ready", instance.name))?;
        println!("meshwork: {} SERVING on {}", instance.name, instance.addr);
    }
    Ok(())
}

/// Copies a child's output lines to ours, prefixed with its name.
fn forward_output(name: &'static str, child: &mut Child) {
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[{name}] {line}");
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{name}] {line}");
            }
        });
    }
}

/// Polls `grpc.health.v1` over mutual TLS, as the operator, until the instance's service
/// reports SERVING.
async fn wait_serving(instance: &Instance, operator: &MeshTls) -> anyhow::Result<()> {
    // The channel connects lazily and reconnects on the next call after a failure, so one
    // channel serves every poll, including those made before the port is open.
    let config = ClientConfig::to(format!("https://{}", instance.addr));
    let mut health = HealthClient::new(mesh::client::connect(&config, operator, instance.binary)?);
    let mut last = String::from("no answer yet");
    let poll = async {
        loop {
            let request = HealthCheckRequest {
                service: instance.service.to_owned(),
            };
            match health.check(request).await {
                Ok(response) if response.get_ref().status() == ServingStatus::Serving => {
                    return;
                }
                Ok(response) => last = format!("{:?}", response.get_ref().status()),
                Err(status) => last = status.to_string(),
            }
            tracing::debug!(instance = instance.name, %last, "not SERVING yet");
            tokio::time::sleep(READY_POLL).await;
        }
    };
    let outcome = tokio::time::timeout(READY_TIMEOUT, poll).await;
    outcome.map_err(|_| anyhow::anyhow!("no SERVING within {READY_TIMEOUT:?} (last: {last})"))
}

/// Resolves with a description of the first child that exits.
async fn first_exit(children: &mut [(&'static str, Child)]) -> anyhow::Error {
    if children.is_empty() {
        return std::future::pending().await;
    }
    let waits = children.iter_mut().map(|(name, child)| {
        Box::pin(async move {
            let status = child.wait().await;
            anyhow::anyhow!("{name} exited unexpectedly ({status:?}); stopping the mesh")
        })
    });
    futures::future::select_all(waits).await.0
}

/// SIGTERM to every child (so each drains), then SIGKILL whoever outlives the grace period.
async fn stop_all(children: &mut [(&'static str, Child)]) {
    for (name, child) in children.iter() {
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok())
            && let Err(error) = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM)
        {
            tracing::warn!(name, %error, "cannot signal");
        }
    }
    for (name, child) in children.iter_mut() {
        match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(Ok(status)) => println!("meshwork: {name} stopped ({status})"),
            Ok(Err(error)) => eprintln!("meshwork: {name}: {error}"),
            Err(_) => {
                eprintln!("meshwork: {name} did not stop within {STOP_GRACE:?}, killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// The plaintext admin port (health, `/metrics`) of the instance on `addr`: 50051 -> 9051.
fn admin_addr(addr: SocketAddr) -> SocketAddr {
    /// Mesh ports are 500xx; admin ports 90xx, the same last digits.
    const MESH_TO_ADMIN: u16 = 50051 - 9051;
    SocketAddr::new(addr.ip(), addr.port().saturating_sub(MESH_TO_ADMIN))
}

fn print_commands(instances: &[Instance], certs_dir: &Path) {
    let tls = crate::certs::grpcurl_flags(certs_dir);
    println!();
    println!("The mesh is up. Every port speaks mutual TLS only; grpcurl presents the operator's");
    println!("certificate (admitted by every service). Reflection is on, no .proto files needed:");
    println!();
    for instance in instances {
        // `localhost`: the name the development certificates carry for grpcurl to verify.
        let addr = format!("localhost:{}", instance.addr.port());
        println!(
            "  # {} ({}) on {}",
            instance.name, instance.service, instance.addr
        );
        println!("  grpcurl {tls} {addr} list");
        println!("  grpcurl {tls} {addr} describe {}", instance.service);
        println!("  grpcurl {tls} {addr} {}", instance.example);
        println!();
    }
    println!(
        "Or walk the journey as the operator: meshctl register --certs-dir {} --email ada@example.com --password 'correct horse'",
        certs_dir.display()
    );
    println!("(then --token <access token from meshctl login> to act as that user)");
    let metrics: Vec<String> = instances
        .iter()
        .map(|i| format!("{}: curl -s http://{}/metrics", i.name, admin_addr(i.addr)))
        .collect();
    println!("Metrics (plaintext admin ports): {}", metrics.join("; "));
    println!("Traces: meshctl trace --last 3");
    println!("Press Ctrl-C to stop every service.");
}
