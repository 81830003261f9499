//! Deadlines across a hop: a call made while serving another gets no more than what is left of
//! the caller's deadline, and a server stops a handler whose deadline has passed.
//!
//! Two real mesh servers (mutual TLS) in this process: a front (orders' certificate) whose
//! GetUser asks a back (users' certificate) for the same user through the mesh client stack, and
//! the back, which records the `grpc-timeout` each call brought.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use mesh::{
    client::MeshChannel,
    config::ServerConfig,
    deadline::{GRPC_TIMEOUT, decode_timeout},
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
use tokio::{sync::oneshot, time::Instant};
use tonic::{Code, Request, Response, Status, server::NamedService, service::Routes};

/// The deadline the test's caller gives the front.
const CALLER_DEADLINE: Duration = Duration::from_secs(2);
/// A caller that allows far more than any server here takes.
const DEFAULT_CALLER: Duration = Duration::from_secs(5);
/// What the front does before it calls the back: time the back's deadline must lose.
const FRONT_WORK: Duration = Duration::from_millis(300);
/// Scheduling and TLS handshakes on a loaded machine, on top of the time a step should take.
const SLACK: Duration = Duration::from_millis(700);
/// No step of a test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the slow hop works: well past the deadline its caller gives it.
const SLOW_WORK: Duration = Duration::from_secs(1);

/// What one call brought to a hop.
#[derive(Debug, Clone, Copy)]
struct Seen {
    grpc_timeout: Option<Duration>,
    remaining: Option<Duration>,
}

/// A UserService whose GetUser works for `work`, then asks `downstream` (if any) for the user.
struct Hop {
    work: Duration,
    downstream: Option<UserServiceClient<MeshChannel>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    finished: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl UserService for Hop {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let seen = Seen {
            grpc_timeout: request
                .metadata()
                .as_ref()
                .get(GRPC_TIMEOUT)
                .and_then(decode_timeout),
            remaining: mesh::deadline::remaining(),
        };
        if let Ok(mut all) = self.seen.lock() {
            all.push(seen);
        }
        tokio::time::sleep(self.work).await;
        let response = match self.downstream.clone() {
            Some(mut downstream) => downstream.get_user(request.into_inner()).await?,
            None => Response::new(GetUserResponse {
                user: Some(User {
                    id: request.into_inner().id,
                    ..User::default()
                }),
            }),
        };
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(response)
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

/// A running hop: where it listens and what it saw. It stops when dropped.
struct Running {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    finished: Arc<AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl Running {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Serves a [`Hop`] as `identity` that works for `work`, then calls `downstream` (users).
async fn start(
    pki: &TestPki,
    identity: &str,
    work: Duration,
    downstream: Option<SocketAddr>,
) -> anyhow::Result<Running> {
    start_with(pki, identity, work, downstream, ServerConfig::default()).await
}

async fn start_with(
    pki: &TestPki,
    identity: &str,
    work: Duration,
    downstream: Option<SocketAddr>,
    config: ServerConfig,
) -> anyhow::Result<Running> {
    let downstream = match downstream {
        Some(addr) => Some(UserServiceClient::new(
            pki.channel_as(identity, addr, "users")?,
        )),
        None => None,
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    let hop = Hop {
        work,
        downstream,
        seen: seen.clone(),
        finished: finished.clone(),
    };
    let server = MeshServer::bind(&config)
        .await?
        .with_tls(pki.tls(identity)?);
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(
        Routes::new(UserServiceServer::new(hop)),
        &[UserServiceServer::<Hop>::NAME],
        always_ready(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Running {
        addr,
        seen,
        finished,
        _stop: stop,
    })
}

fn get_user(deadline: Duration) -> Request<GetUserRequest> {
    let mut request = Request::new(GetUserRequest { id: "u-1".into() });
    request.set_timeout(deadline);
    request
}

#[tokio::test]
async fn a_call_made_while_serving_gets_what_is_left_of_the_callers_deadline() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let back = start(&pki, "users", Duration::ZERO, None).await?;
    let front = start(&pki, "orders", FRONT_WORK, Some(back.addr)).await?;

    let mut caller = UserServiceClient::new(pki.channel(front.addr, "orders")?);
    let answered = tokio::time::timeout(STEP_TIMEOUT, caller.get_user(get_user(CALLER_DEADLINE)))
        .await
        .context("the call did not end")??;
    assert_eq!(answered.into_inner().user.map(|u| u.id), Some("u-1".into()));

    // The front's handler ran inside its caller's deadline...
    let front_seen = front.seen();
    let remaining = front_seen.first().and_then(|s| s.remaining);
    assert!(
        remaining.is_some_and(|left| left <= CALLER_DEADLINE && left > CALLER_DEADLINE - SLACK),
        "{front_seen:?}"
    );
    // ...and the back was given what was left of it after the front's work (not the client's
    // 5 s default), at most the front's own remaining time, and close to it.
    let back_seen = back.seen();
    let sent = back_seen.first().and_then(|s| s.grpc_timeout);
    let most = CALLER_DEADLINE - FRONT_WORK;
    assert!(
        sent.is_some_and(|sent| sent <= most && sent > most - SLACK),
        "front saw {front_seen:?}, back saw {back_seen:?}"
    );
    Ok(())
}

#[tokio::test]
async fn calls_whose_deadline_passes_end_deadline_exceeded_and_their_handlers_stop()
-> anyhow::Result<()> {
    const CALLS: usize = 5;
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let slow = start(&pki, "users", SLOW_WORK, None).await?;
    let caller = UserServiceClient::new(pki.channel(slow.addr, "users")?);

    let deadline = Duration::from_millis(200);
    let started = Instant::now();
    let calls = (0..CALLS).map(|_| {
        let mut caller = caller.clone();
        async move { caller.get_user(get_user(deadline)).await }
    });
    let answered = tokio::time::timeout(STEP_TIMEOUT, futures::future::join_all(calls))
        .await
        .context("the calls did not end")?;
    let elapsed = started.elapsed();

    let codes: Vec<_> = answered
        .iter()
        .map(|a| a.as_ref().err().map(Status::code))
        .collect();
    assert_eq!(codes, vec![Some(Code::DeadlineExceeded); CALLS]);
    assert!(elapsed < deadline + SLACK, "answered after {elapsed:?}");
    // The server stopped the handlers too, rather than let them finish work nobody waits for
    // (waiting out that work is the point here, not synchronisation).
    tokio::time::sleep_until(started + SLOW_WORK + SLACK).await;
    assert_eq!(slow.finished.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn a_handler_still_running_at_the_servers_longest_call_is_stopped_with_deadline_exceeded()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let longest = Duration::from_millis(300);
    let config = ServerConfig {
        max_call_duration: longest,
        ..ServerConfig::default()
    };
    let slow = start_with(&pki, "users", SLOW_WORK, None, config).await?;

    // The caller allows far more (its 5 s default): the answer is the server's own.
    let mut caller = UserServiceClient::new(pki.channel(slow.addr, "users")?);
    let started = Instant::now();
    let answered = tokio::time::timeout(STEP_TIMEOUT, caller.get_user(get_user(DEFAULT_CALLER)))
        .await
        .context("the call did not end")?;
    let elapsed = started.elapsed();

    // DEADLINE_EXCEEDED, not the CANCELLED tonic's own server timeout would answer.
    assert_eq!(
        answered.err().map(|s| s.code()),
        Some(Code::DeadlineExceeded)
    );
    assert!(elapsed < longest + SLACK, "answered after {elapsed:?}");
    tokio::time::sleep_until(started + SLOW_WORK + SLACK).await;
    assert_eq!(slow.finished.load(Ordering::SeqCst), 0);
    Ok(())
}
