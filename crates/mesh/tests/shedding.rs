//! A server over its concurrency limit sheds at once instead of queueing: the calls beyond the
//! limit come back UNAVAILABLE, marked as not processed, in a few milliseconds, without reaching
//! a handler, while the admitted ones run to completion and health keeps answering.
//!
//! The server is a real mesh server (mutual TLS, health, reflection) serving a small in-memory
//! `UserService` whose GetUser is slow; the client is a bare mutual-TLS channel (no retries, no
//! balancing) so that what the test sees is the server's answer.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, ensure};
use mesh::{
    config::ServerConfig,
    pki,
    retry::{NOT_PROCESSED_HEADER, NOT_PROCESSED_VALUE},
    server::{MeshServer, always_ready},
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
use tokio::{sync::watch, time::Instant};
use tonic::{
    Code, Request, Response, Status,
    server::NamedService,
    service::Routes,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Calls the server lets into its handlers at once.
const LIMIT: usize = 2;
/// Calls fired at once: `LIMIT` are admitted, the rest must be shed.
const CALLS: usize = 10;
/// How long an admitted GetUser takes: long enough that every shed call arrives while the
/// admitted ones still hold their permits.
const HANDLER_TIME: Duration = Duration::from_millis(500);
/// A shed call answers in a few milliseconds; this bound is generous for a loaded CI machine
/// and still far below `HANDLER_TIME`, which a queued call would have to wait.
const SHED_BOUND: Duration = Duration::from_millis(250);
/// No step of a test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// UserService whose GetUser takes [`HANDLER_TIME`] and counts how many calls reached it.
struct SlowUsers {
    entered: watch::Sender<usize>,
}

#[tonic::async_trait]
impl UserService for SlowUsers {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        self.entered.send_modify(|entered| *entered += 1);
        tokio::time::sleep(HANDLER_TIME).await;
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

/// A running server; dropping it stops the server.
struct TestServer {
    channel: Channel,
    entered: watch::Receiver<usize>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _pki_dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(max_concurrent_calls: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let server = MeshServer::bind(&ServerConfig {
            max_concurrent_calls,
            ..ServerConfig::default()
        })
        .await?
        .with_tls(pki.tls("users")?);
        let addr = server.local_addr();
        let (entered_tx, entered) = watch::channel(0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(
            Routes::new(UserServiceServer::new(SlowUsers {
                entered: entered_tx,
            })),
            &[UserServiceServer::<SlowUsers>::NAME],
            always_ready(),
            async move {
                let _ = stopped.await;
            },
        ));
        let channel = channel(&pki, addr)?;
        Ok(Self {
            channel,
            entered,
            _stop: stop,
            _pki_dir: dir,
        })
    }
}

/// One HTTP/2 connection over mutual TLS, as the operator.
fn channel(pki: &TestPki, addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector_lazy(MeshConnector::new(pki.tls(pki::OPERATOR)?, "users")))
}

/// Waits (bounded) until the server reports SERVING; this also opens the connection, so that
/// the calls a test times do not include the TLS handshake.
async fn wait_until_serving(health: &mut HealthClient<Channel>) -> anyhow::Result<()> {
    let watching = async {
        let mut updates = health
            .watch(HealthCheckRequest::default())
            .await?
            .into_inner();
        while let Some(update) = updates.message().await? {
            if update.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        anyhow::bail!("health stream ended before SERVING")
    };
    tokio::time::timeout(STEP_TIMEOUT, watching)
        .await
        .context("server never reported SERVING")?
}

/// Whether the server refused the call before any handler ran (and said so).
fn was_not_processed(status: &Status) -> bool {
    status
        .metadata()
        .get(NOT_PROCESSED_HEADER.as_str())
        .is_some_and(|value| value == NOT_PROCESSED_VALUE)
}

#[tokio::test]
async fn calls_beyond_the_limit_are_shed_at_once_while_admitted_ones_complete() -> anyhow::Result<()>
{
    let mut server = TestServer::start(LIMIT).await?;
    let mut health = HealthClient::new(server.channel.clone());
    wait_until_serving(&mut health).await?;

    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut client = UserServiceClient::new(server.channel.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client
                    .get_user(GetUserRequest {
                        id: format!("user-{i}"),
                    })
                    .await;
                (result, started.elapsed())
            })
        })
        .collect();

    // While the admitted calls are in their handlers, the server is full: health still answers.
    tokio::time::timeout(STEP_TIMEOUT, server.entered.wait_for(|n| *n >= LIMIT))
        .await
        .context("admitted calls never reached their handler")??;
    let probed = Instant::now();
    let status = health
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status;
    let probe_time = probed.elapsed();
    ensure!(
        status == ServingStatus::Serving as i32,
        "health said {status}"
    );
    ensure!(probe_time < SHED_BOUND, "health took {probe_time:?}");

    let mut admitted = Vec::new();
    let mut shed = Vec::new();
    for call in calls {
        let (result, elapsed) = tokio::time::timeout(STEP_TIMEOUT, call).await??;
        match result {
            Ok(_) => admitted.push(elapsed),
            Err(status) => {
                ensure!(
                    status.code() == Code::Unavailable && was_not_processed(&status),
                    "a call beyond the limit failed with {status:?}"
                );
                shed.push(elapsed);
            }
        }
    }
    eprintln!("admitted: {admitted:?}\nshed: {shed:?}\nhealth under load: {probe_time:?}");

    ensure!(admitted.len() == LIMIT, "admitted {admitted:?}");
    ensure!(shed.len() == CALLS - LIMIT, "shed {shed:?}");
    ensure!(
        shed.iter().all(|elapsed| *elapsed < SHED_BOUND),
        "shed calls were slow: {shed:?}"
    );
    ensure!(
        admitted.iter().all(|elapsed| *elapsed >= HANDLER_TIME),
        "admitted calls did not run their handler: {admitted:?}"
    );
    let reached = *server.entered.borrow();
    ensure!(reached == LIMIT, "{reached} calls reached the handler");
    Ok(())
}

#[tokio::test]
async fn a_shed_server_admits_calls_again_once_its_handlers_are_done() -> anyhow::Result<()> {
    let mut server = TestServer::start(1).await?;
    let mut client = UserServiceClient::new(server.channel.clone());
    let first = {
        let mut client = client.clone();
        tokio::spawn(async move { client.get_user(GetUserRequest::default()).await })
    };
    tokio::time::timeout(STEP_TIMEOUT, server.entered.wait_for(|n| *n >= 1))
        .await
        .context("the first call never reached its handler")??;

    let refused = client.get_user(GetUserRequest::default()).await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|s| s.code() == Code::Unavailable && was_not_processed(s)),
        "{refused:?}"
    );
    tokio::time::timeout(STEP_TIMEOUT, first).await???;
    tokio::time::timeout(STEP_TIMEOUT, client.get_user(GetUserRequest::default())).await??;
    Ok(())
}
