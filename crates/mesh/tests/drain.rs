//! Drain: what a server under load does with its shutdown signal (the future SIGTERM resolves
//! in production). Health turns NOT_SERVING, the calls in the handlers finish, calls that come
//! after are refused (as not processed, or by the closed port), and serving ends within the
//! drain period — even when a call would outlast it.
//!
//! The server is a real mesh server (mutual TLS, health, reflection) serving a small in-memory
//! `UserService` whose GetUser is slow; clients are bare mutual-TLS channels (no retries, no
//! balancing), so what the test sees is the server's behaviour alone. That a client of several
//! replicas sees no failure at all is the business of the client stack's own tests.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use anyhow::{Context, ensure};
use mesh::{
    config::ServerConfig,
    pki,
    retry::{NOT_PROCESSED_HEADER, NOT_PROCESSED_VALUE},
    server::{MeshServer, ServerError, always_ready},
    testing::TestPki,
    transport::MeshConnector,
};
use meshwork::users::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tonic::{
    Code, Request, Response, Status,
    server::NamedService,
    service::Routes,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};

/// Client loops calling at once.
const LOOPS: usize = 6;
/// How long a GetUser takes: long enough to be surely in flight when the signal comes, short
/// enough that the loops keep sending while the server drains.
const HANDLER_TIME: Duration = Duration::from_millis(100);
/// Calls each loop makes after the signal before it stops.
const CALLS_AFTER_SIGNAL: usize = 3;
/// The drain period of the test servers: several handler times.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Scheduling slack on top of a bound the server promises.
const MARGIN: Duration = Duration::from_millis(500);
/// A client loop whose call failed waits this long before the next, so that it does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// No step of a test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// UserService whose GetUser takes a fixed time and records which calls are in it.
struct SlowUsers {
    handler_time: Duration,
    in_handler: watch::Sender<HashSet<String>>,
}

#[tonic::async_trait]
impl UserService for SlowUsers {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = request.into_inner().id;
        self.in_handler.send_modify(|calls| {
            calls.insert(id.clone());
        });
        tokio::time::sleep(self.handler_time).await;
        self.in_handler.send_modify(|calls| {
            calls.remove(&id);
        });
        Ok(Response::new(GetUserResponse {
            user: Some(User {
                id,
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

/// A serving server, its shutdown signal not yet sent.
struct TestServer {
    pki: TestPki,
    addr: SocketAddr,
    in_handler: watch::Receiver<HashSet<String>>,
    signal: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    _pki_dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(handler_time: Duration) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let server = MeshServer::bind(&ServerConfig {
            drain_timeout: DRAIN_TIMEOUT,
            ..ServerConfig::default()
        })
        .await?
        .with_tls(pki.tls("users")?);
        let addr = server.local_addr();
        let (in_handler_tx, in_handler) = watch::channel(HashSet::new());
        let (signal, signalled) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(
            Routes::new(UserServiceServer::new(SlowUsers {
                handler_time,
                in_handler: in_handler_tx,
            })),
            &[UserServiceServer::<SlowUsers>::NAME],
            always_ready(),
            async move {
                let _ = signalled.await;
            },
        ));
        Ok(Self {
            pki,
            addr,
            in_handler,
            signal: Some(signal),
            task,
            _pki_dir: dir,
        })
    }

    /// What SIGTERM does in production.
    fn send_shutdown_signal(&mut self) {
        if let Some(signal) = self.signal.take() {
            let _ = signal.send(());
        }
    }

    /// A new HTTP/2 connection over mutual TLS, as the operator.
    fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_with_connector_lazy(MeshConnector::new(self.pki.tls(pki::OPERATOR)?, "users")))
    }

    /// Watches health on a connection of its own, once the server reports SERVING.
    async fn watch_health(&self) -> anyhow::Result<tonic::Streaming<HealthCheckResponse>> {
        let mut health = HealthClient::new(self.channel()?);
        let mut updates =
            tokio::time::timeout(STEP_TIMEOUT, health.watch(HealthCheckRequest::default()))
                .await??
                .into_inner();
        next_status(&mut updates, ServingStatus::Serving).await?;
        Ok(updates)
    }
}

/// Waits (bounded) for `wanted` on a health stream.
async fn next_status(
    updates: &mut tonic::Streaming<HealthCheckResponse>,
    wanted: ServingStatus,
) -> anyhow::Result<()> {
    let waiting = async {
        while let Some(update) = updates.message().await? {
            if update.status == wanted as i32 {
                return Ok(());
            }
        }
        anyhow::bail!("health stream ended before {wanted:?}")
    };
    tokio::time::timeout(STEP_TIMEOUT, waiting)
        .await
        .with_context(|| format!("health never reported {wanted:?}"))?
}

/// One call a client loop made, and how it ended.
struct Outcome {
    id: String,
    sent: Instant,
    result: Result<(), Status>,
}

/// Calls GetUser again and again, each call with its own id, until it has made
/// [`CALLS_AFTER_SIGNAL`] calls after the signal (whose time `signalled` tells).
fn client_loop(
    channel: Channel,
    loop_index: usize,
    mut signalled: watch::Receiver<Option<Instant>>,
) -> JoinHandle<Vec<Outcome>> {
    tokio::spawn(async move {
        let mut client = UserServiceClient::new(channel);
        let mut outcomes = Vec::new();
        let mut after_signal = 0;
        for call in 0.. {
            let id = format!("loop-{loop_index}-call-{call}");
            let sent = Instant::now();
            let result = client
                .get_user(GetUserRequest { id: id.clone() })
                .await
                .map(|_| ());
            let failed = result.is_err();
            outcomes.push(Outcome { id, sent, result });
            if signalled.borrow_and_update().is_some_and(|at| sent > at) {
                after_signal += 1;
                if after_signal == CALLS_AFTER_SIGNAL {
                    break;
                }
            }
            if failed {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        outcomes
    })
}

/// How a call that did not succeed may fail once the server drains: refused by the server as
/// not processed (safe to retry elsewhere), or never answered at all because its connection was
/// closed or the port refused it (a transport error: UNAVAILABLE, or INTERNAL for a stream an
/// HTTP/2 GOAWAY cut off before the server accepted it).
fn acceptable_failure(status: &Status) -> bool {
    let refused = status.code() == Code::Unavailable && was_not_processed(status);
    // Every gRPC response carries `content-type`; a transport error has no response.
    let unanswered = status.metadata().get("content-type").is_none()
        && matches!(status.code(), Code::Unavailable | Code::Internal);
    refused || unanswered
}

/// Whether the server refused the call before any handler ran (and said so).
fn was_not_processed(status: &Status) -> bool {
    status
        .metadata()
        .get(NOT_PROCESSED_HEADER.as_str())
        .is_some_and(|value| value == NOT_PROCESSED_VALUE)
}

#[tokio::test]
async fn a_server_under_load_drains_its_calls_and_stops_within_the_drain_period()
-> anyhow::Result<()> {
    let mut server = TestServer::start(HANDLER_TIME).await?;
    let mut health = server.watch_health().await?;

    // Each loop has its own connection, like callers from different replicas.
    let (signal_time, signalled_at) = watch::channel(None);
    let loops = (0..LOOPS)
        .map(|i| Ok(client_loop(server.channel()?, i, signalled_at.clone())))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // The signal comes while every loop has a call in its handler.
    let in_flight = tokio::time::timeout(
        STEP_TIMEOUT,
        server.in_handler.wait_for(|calls| calls.len() >= LOOPS),
    )
    .await
    .context("the loops never had their calls in the handlers at once")??
    .clone();
    let signalled = Instant::now();
    signal_time.send_replace(Some(signalled));
    server.send_shutdown_signal();

    next_status(&mut health, ServingStatus::NotServing).await?;
    let not_serving_after = signalled.elapsed();
    // A watch is a call in flight too: ending it lets this connection close.
    drop(health);

    let served = tokio::time::timeout(DRAIN_TIMEOUT + MARGIN, &mut server.task)
        .await
        .context("the server did not stop within its drain period")?;
    let stopped_after = signalled.elapsed();
    served??;

    let mut outcomes = Vec::new();
    for client in loops {
        outcomes.extend(tokio::time::timeout(STEP_TIMEOUT, client).await??);
    }
    // And once the server is gone, a new call fails fast as unreachable.
    let late_started = Instant::now();
    let late = UserServiceClient::new(server.channel()?)
        .get_user(GetUserRequest::default())
        .await;
    let late_time = late_started.elapsed();

    let after_signal: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent > signalled).collect();
    let count = |accept: fn(&Result<(), Status>) -> bool| {
        after_signal.iter().filter(|o| accept(&o.result)).count()
    };
    eprintln!(
        "{} calls in flight at the signal; NOT_SERVING after {not_serving_after:?}; stopped \
         after {stopped_after:?}; of {} calls sent after the signal, {} succeeded, {} were \
         refused as not processed, {} found no server; after the exit a call failed in \
         {late_time:?}: {late:?}",
        in_flight.len(),
        after_signal.len(),
        count(|r| r.is_ok()),
        count(|r| r.as_ref().is_err_and(was_not_processed)),
        count(|r| r.as_ref().is_err_and(|s| !was_not_processed(s))),
    );

    for outcome in outcomes.iter().filter(|o| in_flight.contains(&o.id)) {
        ensure!(
            outcome.result.is_ok(),
            "{} was in flight at the signal and failed: {:?}",
            outcome.id,
            outcome.result
        );
    }
    ensure!(
        outcomes
            .iter()
            .filter(|o| in_flight.contains(&o.id))
            .count()
            == in_flight.len(),
        "some calls in flight never came back to their client"
    );
    for outcome in &outcomes {
        if let Err(status) = &outcome.result {
            ensure!(
                acceptable_failure(status),
                "{} failed with {status:?}",
                outcome.id
            );
        }
    }
    ensure!(
        late.as_ref().is_err_and(|s| s.code() == Code::Unavailable),
        "{late:?}"
    );
    ensure!(
        stopped_after >= HANDLER_TIME / 2,
        "stopped after {stopped_after:?}, before its calls could finish"
    );
    Ok(())
}

#[tokio::test]
async fn a_call_outlasting_the_drain_period_does_not_hold_the_exit() -> anyhow::Result<()> {
    let mut server = TestServer::start(DRAIN_TIMEOUT * 10).await?;
    let mut client = UserServiceClient::new(server.channel()?);
    let _stuck = tokio::spawn(async move { client.get_user(GetUserRequest::default()).await });
    tokio::time::timeout(
        STEP_TIMEOUT,
        server.in_handler.wait_for(|calls| !calls.is_empty()),
    )
    .await
    .context("the call never reached its handler")??;

    let signalled = Instant::now();
    server.send_shutdown_signal();
    let served = tokio::time::timeout(DRAIN_TIMEOUT + MARGIN, &mut server.task)
        .await
        .context("the server did not stop within its drain period")?;
    served??;
    let stopped_after = signalled.elapsed();
    eprintln!("stopped {stopped_after:?} after the signal, drain period {DRAIN_TIMEOUT:?}");
    ensure!(
        stopped_after >= DRAIN_TIMEOUT,
        "stopped after {stopped_after:?}, without giving the call its drain period"
    );
    Ok(())
}
