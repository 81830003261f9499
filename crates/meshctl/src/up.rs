//! `meshctl up`: the local mesh. Starts each service binary (found beside `meshctl`) as its own
//! process on the embedded defaults (SQLite files under the data directory), users with two
//! replicas so balancing is visible, waits until each reports SERVING through `grpc.health.v1`,
//! prints grpcurl commands that work, and on Ctrl-C / SIGTERM stops them all with SIGTERM (then
//! SIGKILL after a grace period). If a service dies, the whole mesh is stopped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long each service gets to report SERVING after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Between health polls while waiting.
const READY_POLL: Duration = Duration::from_millis(200);
/// After SIGTERM, how long a service gets to drain before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Printed once every service is SERVING; scripts wait for it.
pub const READY_LINE: &str = "meshwork: all services SERVING";

#[derive(clap::Args)]
pub struct UpArgs {
    /// Where the SQLite files live.
    #[arg(long, default_value = ".meshwork/data")]
    data_dir: PathBuf,
    /// Where the service binaries are; defaults to meshctl's own directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// One process of the local mesh.
struct Instance {
    /// Name in logs, e.g. `users-2`.
    name: &'static str,
    /// The binary (a service package's name).
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

/// The environment that configures one instance: its port, its database, its downstreams.
fn environment(instance: &Instance, data_dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "MESHWORK_SERVER__LISTEN_ADDR".to_owned(),
            instance.addr.to_string(),
        ),
        (
            "MESHWORK_DATABASE__URL".to_owned(),
            format!("sqlite://{}/{}.db", data_dir.display(), instance.binary),
        ),
    ];
    let users = format!(r#"["http://{USERS_1}","http://{USERS_2}"]"#);
    match instance.binary {
        "auth" => env.push(("MESHWORK_USERS__ENDPOINTS".to_owned(), users)),
        "orders" => {
            env.push(("MESHWORK_USERS__ENDPOINTS".to_owned(), users));
            env.push((
                "MESHWORK_BILLING__ENDPOINTS".to_owned(),
                format!(r#"["http://{BILLING}"]"#),
            ));
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

    let instances = instances()?;
    let mut children: Vec<(&'static str, Child)> = Vec::new();
    let started = start_all(&instances, &bin_dir, &data_dir, &mut children).await;
    if let Err(error) = started {
        stop_all(&mut children).await;
        return Err(error);
    }
    print_commands(&instances);
    println!("{READY_LINE}");

    let outcome = tokio::select! {
        () = mesh::shutdown::signal() => Ok(()),
        exited = first_exit(&mut children) => Err(exited),
    };
    stop_all(&mut children).await;
    outcome
}

async fn start_all(
    instances: &[Instance],
    bin_dir: &Path,
    data_dir: &Path,
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
            .envs(environment(instance, data_dir))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        forward_output(instance.name, &mut child);
        children.push((instance.name, child));
        wait_serving(instance)
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

/// Polls `grpc.health.v1` until the instance's service reports SERVING.
async fn wait_serving(instance: &Instance) -> anyhow::Result<()> {
    let uri = format!("http://{}", instance.addr);
    let poll = async {
        loop {
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(uri.clone())?
                .connect()
                .await
            {
                let mut health = HealthClient::new(channel);
                let request = HealthCheckRequest {
                    service: instance.service.to_owned(),
                };
                if let Ok(response) = health.check(request).await
                    && response.into_inner().status() == ServingStatus::Serving
                {
                    return anyhow::Ok(());
                }
            }
            tokio::time::sleep(READY_POLL).await;
        }
    };
    tokio::time::timeout(READY_TIMEOUT, poll)
        .await
        .with_context(|| format!("no SERVING within {READY_TIMEOUT:?}"))?
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

fn print_commands(instances: &[Instance]) {
    println!();
    println!("The mesh is up. Try it with grpcurl (reflection is on, no .proto files needed):");
    println!();
    for instance in instances {
        println!("  # {} ({})", instance.name, instance.service);
        println!("  grpcurl -plaintext {} list", instance.addr);
        println!(
            "  grpcurl -plaintext {} describe {}",
            instance.addr, instance.service
        );
        println!(
            "  grpcurl -plaintext {} {}",
            instance.addr, instance.example
        );
        println!();
    }
    println!(
        "Or walk the journey: meshctl register --email ada@example.com --password 'correct horse'"
    );
    println!("Press Ctrl-C to stop every service.");
}
