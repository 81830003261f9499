//! The synthetic servers: the in-memory [`Directory`] served five ways, each in a process of its
//! own (`meshwork-bench serve --shape ...`), pinned to the server core. Each prints
//! `LISTENING <addr>` on stdout once its port is bound, and serves until SIGTERM.
//!
//! | shape        | what                                                                      |
//! |--------------|---------------------------------------------------------------------------|
//! | `bare`       | bare tonic, plaintext                                                     |
//! | `bare-mtls`  | bare tonic over the same rustls mutual TLS as the mesh                    |
//! | `mesh`       | the full mesh server stack ([`MeshServer`]): mTLS, authorization, tracing, |
//! |              | metrics, deadline, concurrency limit; traces exported when the            |
//! |              | environment names an OTLP endpoint                                        |
//! | `front-bare` | plaintext front whose GetUser calls `--backend`s through a bare tonic     |
//! |              | `Channel` (tonic's own balancer over the list)                            |
//! | `front-mesh` | the same front, calling through the mesh client stack (p2c balancer,      |
//! |              | ejection, retries, deadlines, tracing, metrics) over mutual TLS           |

use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use mesh::{
    authz::AuthzLayer,
    config::{ClientConfig, ServerConfig},
    server::MeshServer,
    tls::{MeshTls, TlsConfig},
};
use meshwork::users::v1::{
    user_service_client::UserServiceClient, user_service_server::UserServiceServer,
};
use tokio::net::TcpListener;
use tonic::{
    server::NamedService,
    service::Routes,
    transport::{Channel, Endpoint, Server, server::TcpIncoming},
};

use crate::directory::{Directory, Front};

/// What the process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    Bare,
    BareMtls,
    Mesh,
    FrontBare,
    FrontMesh,
}

/// The identity the mesh server and mesh client present (its certificate in the certs dir):
/// the backends are `users`; the front calls them as `orders`, which users' policy admits.
pub const BACKEND_IDENTITY: &str = "users";
pub const FRONT_IDENTITY: &str = "orders";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// Pin the process to this CPU before starting.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Where the mesh certificates are (for the mutual-TLS shapes).
    #[arg(long)]
    pub certs_dir: PathBuf,
    /// The servers a front calls (repeat for each).
    #[arg(long = "backend")]
    pub backends: Vec<SocketAddr>,
}

/// Runs one synthetic server until SIGTERM.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        crate::affinity::pin_self(cpu)?;
    }
    // Like the services' `#[tokio::main]`: one worker per CPU the process may use.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve_shape(args))
}

fn tls(args: &ServeArgs, name: &str) -> anyhow::Result<MeshTls> {
    Ok(MeshTls::load(&TlsConfig::in_dir(&args.certs_dir, name))?)
}

fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LISTENING {addr}")?;
    stdout.flush()?;
    Ok(())
}

async fn listen() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// A plaintext listener whose connections have Nagle's algorithm off, as tonic's own `serve`
/// sets them (`tcp_nodelay` only applies to listeners tonic binds itself).
fn listen_plaintext() -> anyhow::Result<(TcpIncoming, SocketAddr)> {
    let incoming = TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|error| anyhow::anyhow!("binding: {error}"))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    Ok((incoming, addr))
}

async fn serve_shape(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = mesh::shutdown::signal();
    match args.shape {
        Shape::Bare => {
            let (incoming, addr) = listen_plaintext()?;
            announce(addr)?;
            Server::builder()
                .add_service(UserServiceServer::new(Directory::seeded()))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        Shape::BareMtls => {
            let (listener, addr) = listen().await?;
            let (incoming, _acceptor) =
                mesh::transport::tls_incoming(listener, tls(&args, BACKEND_IDENTITY)?);
            announce(addr)?;
            Server::builder()
                .add_service(UserServiceServer::new(Directory::seeded()))
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        Shape::Mesh => {
            // As a service starts: telemetry from the environment, its policy, its stack.
            let telemetry = mesh::telemetry::init(BACKEND_IDENTITY);
            let authz = AuthzLayer::new(users::default_policy(), None);
            let server = MeshServer::bind(&ServerConfig::default())
                .await?
                .with_tls(tls(&args, BACKEND_IDENTITY)?)
                .with_authz(authz);
            announce(server.local_addr())?;
            server
                .serve(
                    Routes::new(UserServiceServer::new(Directory::seeded())),
                    &[<UserServiceServer<Directory> as NamedService>::NAME],
                    mesh::server::always_ready(),
                    shutdown,
                )
                .await?;
            telemetry.shutdown();
        }
        Shape::FrontBare => {
            anyhow::ensure!(!args.backends.is_empty(), "a front needs --backend");
            let endpoints = args
                .backends
                .iter()
                .map(|addr| Endpoint::from_shared(format!("http://{addr}")))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .map(|endpoint| endpoint.tcp_nodelay(true));
            let channel = Channel::balance_list(endpoints);
            serve_front(Front::new(UserServiceClient::new(channel)), shutdown).await?;
        }
        Shape::FrontMesh => {
            anyhow::ensure!(!args.backends.is_empty(), "a front needs --backend");
            let telemetry = mesh::telemetry::init(FRONT_IDENTITY);
            let config = ClientConfig {
                endpoints: args
                    .backends
                    .iter()
                    .map(|addr| format!("https://{addr}"))
                    .collect(),
                ..ClientConfig::default()
            };
            let channel =
                mesh::client::connect(&config, &tls(&args, FRONT_IDENTITY)?, BACKEND_IDENTITY)?;
            serve_front(Front::new(UserServiceClient::new(channel)), shutdown).await?;
            telemetry.shutdown();
        }
    }
    Ok(())
}

/// Serves a front in plaintext (the same front for both hop configurations: only its channel
/// differs).
async fn serve_front<C>(
    front: Front<C>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    Front<C>: meshwork::users::v1::user_service_server::UserService,
{
    let (incoming, addr) = listen_plaintext()?;
    announce(addr)?;
    Server::builder()
        .add_service(UserServiceServer::new(front))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
