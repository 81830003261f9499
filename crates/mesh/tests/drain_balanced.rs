//! SIGTERM to a replica under load: zero failed calls, and it exits within the drain period.
//!
//! Three replicas of a small in-memory `UserService` (a real mesh server each: mutual TLS,
//! health, reflection, shedding, drain), each on its own tokio runtime as if it were its own
//! process, behind one mesh client (orders calling users: balancing, retries, ejection) that
//! several loops keep busy with GetUser calls. Then one replica gets its shutdown signal — the
//! future that `mesh::shutdown::signal()` resolves on SIGTERM in the binaries.
//!
//! What the draining replica does to calls that reach it after the signal (refuses them as not
//! processed, then GOAWAY and a closed port) is `drain.rs`'s business; here the point is that a
//! caller with other replicas sees none of it: no call fails before, during or after the drain,
//! the replica stops within its drain period, and the others carry the load on.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, ensure};
use mesh::{
    client::{MeshChannel, connect_discovered},
    config::{ClientConfig, ServerConfig},
    discovery::Discovery,
    server::{MeshServer, ServerError, always_ready},
    testing::TestPki,
};
use meshwork::users::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tokio::{
    runtime::Runtime,
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tonic::{Request, Response, Status, server::NamedService, service::Routes};

/// Replicas of users behind the client.
const REPLICAS: usize = 3;
/// How long a GetUser takes: long enough that the replica has calls in flight when the signal
/// comes, short against the drain period.
const HANDLER_TIME: Duration = Duration::from_millis(10);
/// Client loops calling at once.
const LOOPS: usize = 8;
/// The replicas' drain period.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling slack on top of a bound the server promises.
const MARGIN: Duration = Duration::from_millis(500);
/// Calls the drained replica must have started before it gets the signal.
const CALLS_BEFORE_SIGNAL: usize = 30;
/// How long the load goes on once the drained replica has stopped: longer than the client's
/// first ejection of it (1 s), so that probing its closed port happens under load too.
const LOAD_AFTER_DRAIN: Duration = Duration::from_millis(1500);
/// Calls the remaining replicas must serve, together, after the drained one has stopped.
const CALLS_AFTER_DRAIN: usize = 100;
/// A loop whose call failed waits this long before the next, so that a broken stack does not
/// make it spin (the failure fails the test anyway).
const FAILURE_PAUSE: Duration = Duration::from_millis(10);
/// No step of the test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Nor does the whole test, even when the behaviour under test is broken.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What one replica's GetUser handler has seen.
#[derive(Default)]
struct Load {
    /// Calls that entered the handler.
    started: AtomicUsize,
    /// Calls whose handler ran to the end (a call cut short is never counted here).
    finished: AtomicUsize,
}

impl Load {
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    fn in_handler(&self) -> usize {
        self.started().saturating_sub(self.finished())
    }
}

/// UserService whose GetUser takes [`HANDLER_TIME`] and counts its calls; the other methods are
/// not what this test is about.
struct CountingUsers {
    load: Arc<Load>,
}

#[tonic::async_trait]
impl UserService for CountingUsers {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        self.load.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(HANDLER_TIME).await;
        self.load.finished.fetch_add(1, Ordering::SeqCst);
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

/// How a replica's `serve` ended, and when.
type Stopped = (Result<(), ServerError>, Instant);

/// One users replica on its own runtime, serving until its shutdown signal. Dropping it kills it.
struct Replica {
    addr: SocketAddr,
    load: Arc<Load>,
    signal: Option<oneshot::Sender<()>>,
    stopped: Option<oneshot::Receiver<Stopped>>,
    runtime: Option<Runtime>,
}

impl Replica {
    async fn start(pki: &TestPki) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let load = Arc::new(Load::default());
        let users = CountingUsers {
            load: Arc::clone(&load),
        };
        let tls = pki.tls("users")?;
        let (bound_tx, bound) = oneshot::channel();
        let (signal, signalled) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = oneshot::channel();
        runtime.spawn(async move {
            let config = ServerConfig {
                drain_timeout: DRAIN_TIMEOUT,
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
            let result = server
                .serve(
                    Routes::new(UserServiceServer::new(users)),
                    &[UserServiceServer::<CountingUsers>::NAME],
                    always_ready(),
                    async move {
                        let _ = signalled.await;
                    },
                )
                .await;
            let _ = stopped_tx.send((result, Instant::now()));
        });
        let addr = bound.await.context("replica runtime")??;
        Ok(Self {
            addr,
            load,
            signal: Some(signal),
            stopped: Some(stopped),
            runtime: Some(runtime),
        })
    }

    /// What SIGTERM does in production.
    fn send_shutdown_signal(&mut self) {
        if let Some(signal) = self.signal.take() {
            let _ = signal.send(());
        }
    }

    /// Waits, at most `timeout`, for `serve` to return; how it ended and when.
    async fn stopped(&mut self, timeout: Duration) -> anyhow::Result<Stopped> {
        let stopped = self.stopped.take().context("already waited for")?;
        tokio::time::timeout(timeout, stopped)
            .await
            .context("serve did not return in time")?
            .context("the replica's runtime went away")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One call a client loop made.
struct Outcome {
    loop_index: usize,
    sent: Instant,
    took: Duration,
    result: Result<(), Status>,
}

/// Calls GetUser again and again, each call with its own id, until `stop` turns true.
fn client_loop(
    client: UserServiceClient<MeshChannel>,
    loop_index: usize,
    stop: watch::Receiver<bool>,
) -> JoinHandle<Vec<Outcome>> {
    tokio::spawn(async move {
        let mut client = client;
        let mut outcomes = Vec::new();
        for call in 0.. {
            if *stop.borrow() {
                break;
            }
            let sent = Instant::now();
            let result = client
                .get_user(GetUserRequest {
                    id: format!("loop-{loop_index}-call-{call}"),
                })
                .await
                .map(|_| ());
            let failed = result.is_err();
            outcomes.push(Outcome {
                loop_index,
                sent,
                took: sent.elapsed(),
                result,
            });
            if failed {
                tokio::time::sleep(FAILURE_PAUSE).await;
            }
        }
        outcomes
    })
}

/// Waits (polling, at most [`STEP_TIMEOUT`]) until `condition` holds.
async fn wait_until(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
    let waiting = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, waiting)
        .await
        .with_context(|| format!("timed out waiting until {what}"))
}

#[tokio::test]
async fn sigterm_to_a_replica_under_load_fails_no_call_and_it_exits_within_the_drain_period()
-> anyhow::Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, drain_one_of_three())
        .await
        .context("the test took too long")?
}

async fn drain_one_of_three() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(Replica::start(&pki).await?);
    }
    let (source, discovery) = Discovery::in_process();
    for replica in &replicas {
        source.add(replica.addr);
    }
    // TestPki's client settings (its endpoint is unused: discovery says where the replicas are).
    let config: ClientConfig = TestPki::client_config(SocketAddr::from(([127, 0, 0, 1], 0)));
    let client = UserServiceClient::new(connect_discovered(
        &config,
        &pki.tls("orders")?,
        "users",
        discovery,
    )?);

    let (stop, stopping) = watch::channel(false);
    let loops: Vec<_> = (0..LOOPS)
        .map(|i| client_loop(client.clone(), i, stopping.clone()))
        .collect();

    // The signal comes once the replica has served its share for a while and has calls in its
    // handler.
    let (victim, survivors) = replicas.split_at_mut(1);
    let victim = &mut victim[0];
    wait_until("the replica to drain is under load", || {
        victim.load.started() >= CALLS_BEFORE_SIGNAL && victim.load.in_handler() > 0
    })
    .await?;
    let signalled = Instant::now();
    let started_at_signal = victim.load.started();
    let in_handler_at_signal = victim.load.in_handler();
    victim.send_shutdown_signal();

    let (served, stopped_at) = victim
        .stopped(DRAIN_TIMEOUT + MARGIN)
        .await
        .context("the drained replica did not stop within its drain period")?;
    let stopped_after = stopped_at.saturating_duration_since(signalled);
    let drained = Instant::now();
    let victim_started_at_stop = victim.load.started();
    let victim_finished_at_stop = victim.load.finished();

    // The others carry the load on, through the client's probes of the closed port.
    let survivors_served = || survivors.iter().map(|r| r.load.finished()).sum::<usize>();
    let survivors_at_stop = survivors_served();
    wait_until(
        "the remaining replicas have served calls after the drain",
        || survivors_served() >= survivors_at_stop + CALLS_AFTER_DRAIN,
    )
    .await?;
    tokio::time::sleep_until(drained + LOAD_AFTER_DRAIN).await;
    stop.send_replace(true);
    let mut outcomes = Vec::new();
    for client in loops {
        outcomes.extend(
            tokio::time::timeout(STEP_TIMEOUT, client)
                .await
                .context("a client loop did not stop")??,
        );
    }

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let (before, during, after) = outcomes.iter().fold((0, 0, 0), |(b, d, a), o| {
        if o.sent < signalled {
            (b + 1, d, a)
        } else if o.sent < drained {
            (b, d + 1, a)
        } else {
            (b, d, a + 1)
        }
    });
    let succeeded_after = outcomes
        .iter()
        .filter(|o| o.sent >= drained && o.result.is_ok())
        .count();
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    let per_replica: Vec<usize> = std::iter::once(&*victim)
        .chain(survivors.iter())
        .map(|r| r.load.finished())
        .collect();
    eprintln!(
        "drained replica: {started_at_signal} calls started before the signal, \
         {in_handler_at_signal} in its handler at it; stopped {stopped_after:?} after it \
         (drain period {DRAIN_TIMEOUT:?}) having finished {victim_finished_at_stop} of \
         {victim_started_at_stop} started. Calls sent before the signal: {before}, during the \
         drain: {during}, after it: {after}; failed: {}; slowest took {slowest:?}; served per \
         replica: {per_replica:?}",
        failed.len(),
    );

    // (1) No call failed, before, during or after the drain.
    if !failed.is_empty() {
        let shown: Vec<String> = failed
            .iter()
            .take(10)
            .map(|o| {
                let when = if o.sent >= signalled {
                    format!("{:?} after the signal", o.sent - signalled)
                } else {
                    format!("{:?} before the signal", signalled - o.sent)
                };
                format!("loop {} sent {when}: {:?}", o.loop_index, o.result)
            })
            .collect();
        anyhow::bail!("{} calls failed, e.g.:\n{}", failed.len(), shown.join("\n"));
    }
    // (2) It stopped, cleanly, within its drain period.
    served.context("the drained replica's serve failed")?;
    ensure!(
        stopped_after <= DRAIN_TIMEOUT + MARGIN,
        "stopped {stopped_after:?} after the signal"
    );
    // The calls it had admitted were finished, not cut (they are far shorter than the drain).
    ensure!(
        victim_finished_at_stop == victim_started_at_stop,
        "it stopped with {} calls unfinished",
        victim_started_at_stop - victim_finished_at_stop
    );
    ensure!(
        victim.load.started() == victim_started_at_stop,
        "it started calls after it stopped"
    );
    // (3) Calls went on succeeding on the other replicas.
    ensure!(
        succeeded_after >= CALLS_AFTER_DRAIN,
        "only {succeeded_after} calls succeeded after the drain"
    );
    ensure!(
        survivors.iter().all(|r| r.load.finished() > 0),
        "a remaining replica served nothing: {per_replica:?}"
    );
    // (4) It really was under load when the signal came.
    ensure!(
        started_at_signal >= CALLS_BEFORE_SIGNAL,
        "{started_at_signal} calls"
    );
    Ok(())
}
