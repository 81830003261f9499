//! How a mesh client spreads calls over a service's replicas: power of two choices over
//! PeakEWMA latency, endpoints that join and leave while it runs, and outlier ejection.
//!
//! Each replica is a real mesh server (mutual TLS, health, reflection) serving a small in-memory
//! `UserService` whose GetUser counts its calls and takes a fixed time. Each replica runs on its
//! own tokio runtime, so that killing it (shutting the runtime down) closes its port and every
//! connection to it at once, as a crashed process would.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, ensure};
use futures::{StreamExt, stream};
use mesh::{
    client::{MeshChannel, connect, connect_discovered},
    config::{ClientConfig, EjectionConfig, ServerConfig},
    discovery::Discovery,
    server::{MeshServer, always_ready},
    testing::TestPki,
};
use meshwork::users::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tokio::{runtime::Runtime, sync::oneshot, time::Instant};
use tonic::{Code, Request, Response, Status, server::NamedService, service::Routes};

/// GetUser on a normal replica.
const FAST: Duration = Duration::from_millis(5);
/// GetUser on the slow replica: ten times [`FAST`].
const SLOW: Duration = Duration::from_millis(50);
/// Calls in flight at once in the load tests: enough that load differences show.
const CONCURRENCY: usize = 8;
/// No test runs longer than this, even when the behaviour under test is broken.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// UserService whose GetUser counts its calls and takes `delay`.
struct CountingUsers {
    calls: Arc<AtomicUsize>,
    delay: Duration,
}

#[tonic::async_trait]
impl UserService for CountingUsers {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(GetUserResponse {
            user: Some(User {
                id: request.into_inner().id,
                ..User::default()
            }),
        }))
    }

    async fn create_user(
        &self,
        _: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        Err(Status::failed_precondition("this test serves GetUser only"))
    }

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(Status::failed_precondition("this test serves GetUser only"))
    }

    async fn update_user(
        &self,
        _: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        Err(Status::failed_precondition("this test serves GetUser only"))
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        Err(Status::failed_precondition("this test serves GetUser only"))
    }
}

/// One users replica, on its own runtime. Dropping it kills it.
struct Replica {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    runtime: Option<Runtime>,
}

impl Replica {
    /// A replica whose GetUser takes `delay`, listening on a free loopback port.
    async fn start(pki: &TestPki, delay: Duration) -> anyhow::Result<Self> {
        Self::start_on(pki, delay, &[SocketAddr::from(([127, 0, 0, 1], 0))]).await
    }

    /// A replica listening on every address of `addrs`: the first may have port 0, the others
    /// then take the port it got. Its address is the first.
    async fn start_on(
        pki: &TestPki,
        delay: Duration,
        addrs: &[SocketAddr],
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut port = None;
        let mut first = None;
        for addr in addrs {
            let mut addr = *addr;
            if let Some(port) = port {
                addr.set_port(port);
            }
            let tls = pki.tls("users")?;
            let users = CountingUsers {
                calls: Arc::clone(&calls),
                delay,
            };
            let (bound_tx, bound) = oneshot::channel();
            runtime.spawn(async move {
                let config = ServerConfig {
                    listen_addr: addr,
                    ..ServerConfig::default()
                };
                let server = match MeshServer::bind(&config).await {
                    Ok(server) => server.with_tls(tls),
                    Err(error) => {
                        let _ = bound_tx.send(Err(error));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(server.local_addr()));
                let _ = server
                    .serve(
                        Routes::new(UserServiceServer::new(users)),
                        &[UserServiceServer::<CountingUsers>::NAME],
                        always_ready(),
                        std::future::pending(),
                    )
                    .await;
            });
            let local = bound.await.context("replica runtime")??;
            port = Some(local.port());
            first.get_or_insert(local);
        }
        Ok(Self {
            addr: first.context("no address to listen on")?,
            calls,
            runtime: Some(runtime),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops the replica as a crash would: its port and every connection to it close.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test's PKI, kept in a temporary directory for as long as the test runs.
struct Pki {
    pki: TestPki,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            pki: TestPki::new(dir.path())?,
            _dir: dir,
        })
    }

    /// A client of the users replicas that `discovery` reports, as orders.
    fn client(
        &self,
        config: &ClientConfig,
        discovery: Discovery,
    ) -> anyhow::Result<UserServiceClient<MeshChannel>> {
        let tls = self.pki.tls("orders")?;
        Ok(UserServiceClient::new(connect_discovered(
            config, &tls, "users", discovery,
        )?))
    }

    /// A client of the users replicas named by `config.endpoints`, as orders.
    fn client_from_config(
        &self,
        config: &ClientConfig,
    ) -> anyhow::Result<UserServiceClient<MeshChannel>> {
        let tls = self.pki.tls("orders")?;
        Ok(UserServiceClient::new(connect(config, &tls, "users")?))
    }
}

/// The client settings of these tests: [`TestPki::client_config`]'s (its endpoint unused when
/// discovery is given).
fn client_config() -> ClientConfig {
    TestPki::client_config(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Makes `n` GetUser calls, `concurrency` at a time; the statuses of those that failed.
async fn get_users(
    client: &UserServiceClient<MeshChannel>,
    n: usize,
    concurrency: usize,
) -> Vec<Status> {
    stream::iter(0..n)
        .map(|i| {
            let mut client = client.clone();
            async move {
                client
                    .get_user(GetUserRequest {
                        id: format!("user-{i}"),
                    })
                    .await
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(|result| async move { result.err() })
        .collect()
        .await
}

/// Runs a test body within [`TEST_TIMEOUT`].
async fn bounded(test: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("the test took too long")?
}

#[tokio::test]
async fn a_replica_ten_times_slower_receives_under_a_fifth_of_the_calls() -> anyhow::Result<()> {
    bounded(async {
        let pki = Pki::new()?;
        let fast = [
            Replica::start(&pki.pki, FAST).await?,
            Replica::start(&pki.pki, FAST).await?,
        ];
        let slow = Replica::start(&pki.pki, SLOW).await?;
        let config = ClientConfig {
            endpoints: [&fast[0], &fast[1], &slow]
                .iter()
                .map(|replica| format!("https://{}", replica.addr))
                .collect(),
            ..client_config()
        };
        let client = pki.client_from_config(&config)?;

        const CALLS: usize = 300;
        let failed = get_users(&client, CALLS, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");
        let counts = [fast[0].calls(), fast[1].calls(), slow.calls()];
        ensure!(counts.iter().sum::<usize>() == CALLS, "{counts:?}");
        // Picking at random would give the slow replica a third.
        ensure!(
            slow.calls() * 5 < CALLS,
            "the slow replica got {} of {CALLS} calls ({counts:?})",
            slow.calls()
        );
        ensure!(fast.iter().all(|replica| replica.calls() > 0), "{counts:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_replica_added_at_run_time_gets_calls_and_a_removed_one_none() -> anyhow::Result<()> {
    bounded(async {
        let pki = Pki::new()?;
        let first = Replica::start(&pki.pki, FAST).await?;
        let second = Replica::start(&pki.pki, FAST).await?;
        let (replicas, discovery) = Discovery::in_process();
        replicas.add(first.addr);
        replicas.add(second.addr);
        let client = pki.client(&client_config(), discovery)?;
        let failed = get_users(&client, 50, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");

        let added = Replica::start(&pki.pki, FAST).await?;
        replicas.add(added.addr);
        let failed = get_users(&client, 100, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");
        ensure!(added.calls() > 0, "the added replica got no call");

        replicas.remove(first.addr);
        let before = first.calls();
        let failed = get_users(&client, 100, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");
        ensure!(
            first.calls() == before,
            "the removed replica got {} calls after its removal",
            first.calls() - before
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_replica_killed_during_a_stream_of_calls_fails_no_call() -> anyhow::Result<()> {
    bounded(async {
        let pki = Pki::new()?;
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(Replica::start(&pki.pki, FAST).await?);
        }
        let (source, discovery) = Discovery::in_process();
        for replica in &replicas {
            source.add(replica.addr);
        }
        let client = pki.client(&client_config(), discovery)?;
        let stream = {
            let client = client.clone();
            tokio::spawn(async move { get_users(&client, 600, CONCURRENCY).await })
        };
        // Kill one replica while the stream is flowing through it.
        let victim_serving = async {
            while replicas[1].calls() < 20 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(TEST_TIMEOUT, victim_serving).await?;
        replicas[1].kill();
        let failed = stream.await?;
        // Calls that hit the dead replica were retried on another one (GetUser is idempotent,
        // a refused connection was never sent), and the dead one was ejected.
        ensure!(failed.is_empty(), "failed calls: {failed:?}");
        let after = get_users(&client, 200, CONCURRENCY).await;
        ensure!(after.is_empty(), "calls fail after the kill: {after:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn with_every_replica_down_calls_fail_fast_as_only_half_are_ejected() -> anyhow::Result<()> {
    bounded(async {
        let pki = Pki::new()?;
        let mut replicas = [
            Replica::start(&pki.pki, FAST).await?,
            Replica::start(&pki.pki, FAST).await?,
        ];
        let (source, discovery) = Discovery::in_process();
        for replica in &replicas {
            source.add(replica.addr);
        }
        let config = ClientConfig {
            default_deadline: Duration::from_secs(5),
            ejection: EjectionConfig {
                consecutive_failures: 1,
                base_interval: TEST_TIMEOUT,
                max_interval: TEST_TIMEOUT,
                ..EjectionConfig::default()
            },
            ..client_config()
        };
        let client = pki.client(&config, discovery)?;
        let failed = get_users(&client, 20, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");

        for replica in &mut replicas {
            replica.kill();
        }
        // Had both been ejected, each call would wait out its deadline.
        let start = Instant::now();
        let failed = get_users(&client, 20, 1).await;
        let elapsed = start.elapsed();
        ensure!(failed.len() == 20, "{failed:?}");
        // UNAVAILABLE, or whatever a call caught on a connection as it closed gets.
        ensure!(
            failed
                .iter()
                .all(|status| status.code() != Code::DeadlineExceeded),
            "{failed:?}"
        );
        ensure!(
            elapsed < config.default_deadline,
            "20 calls took {elapsed:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_dns_endpoint_reaches_every_address_its_name_resolves_to() -> anyhow::Result<()> {
    bounded(async {
        let pki = Pki::new()?;
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", 0)).await?.collect();
        addrs.sort();
        addrs.dedup();
        ensure!(
            addrs.iter().all(|addr| addr.ip().is_loopback()),
            "{addrs:?}"
        );
        let replica = match Replica::start_on(&pki.pki, FAST, &addrs).await {
            Ok(replica) => replica,
            Err(error) => {
                // e.g. `localhost` also names ::1 on a machine without IPv6.
                eprintln!("skipped: cannot listen on every address of localhost: {error:#}");
                return Ok(());
            }
        };
        let config = ClientConfig {
            endpoints: vec![format!("dns://localhost:{}", replica.addr.port())],
            ..client_config()
        };
        let client = pki.client_from_config(&config)?;
        let failed = get_users(&client, 50, CONCURRENCY).await;
        ensure!(failed.is_empty(), "failed calls: {failed:?}");
        ensure!(replica.calls() == 50, "{}", replica.calls());
        Ok(())
    })
    .await
}
