//! Retries against a real server over mutual TLS: which failures a call is sent again after, and
//! that the request sent again is the same request.
//!
//! The client is the deadline and retry layers over one tonic channel (no balancer, so every
//! attempt reaches the same scripted server, and its connector counts connection attempts).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use http::Uri;
use mesh::{
    config::ServerConfig,
    deadline::DeadlineLayer,
    pki,
    retry::{RetryConfig, RetryLayer, not_processed},
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
use tokio::sync::oneshot;
use tonic::{
    Code, Request, Response, Status, body::Body, server::NamedService, service::Routes,
    transport::Endpoint,
};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, util::BoxCloneService};

/// The client's deadline per call: generous, retries happen well inside it.
const DEADLINE: Duration = Duration::from_secs(5);
/// No call of a test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A UserService that fails each method's first calls the way a test asks, and records the
/// requests it was sent.
#[derive(Default)]
struct Scripted {
    /// GetUser (idempotent): UNAVAILABLE, unmarked, the first time.
    get_calls: AtomicUsize,
    /// CreateUser (not idempotent): turned away as not processed the first time.
    create_calls: AtomicUsize,
    created: Mutex<Vec<String>>,
    /// DeleteUser (not idempotent): UNAVAILABLE, unmarked, every time.
    delete_calls: AtomicUsize,
}

#[tonic::async_trait]
impl UserService for Scripted {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        if self.get_calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Status::unavailable("database unreachable"));
        }
        Ok(Response::new(GetUserResponse {
            user: Some(User {
                id: request.into_inner().id,
                ..User::default()
            }),
        }))
    }

    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        if self.create_calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(not_processed("overloaded"));
        }
        let email = request.into_inner().email;
        if let Ok(mut created) = self.created.lock() {
            created.push(email.clone());
        }
        Ok(Response::new(CreateUserResponse {
            user: Some(User {
                email,
                ..User::default()
            }),
        }))
    }

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(Status::failed_precondition("not scripted"))
    }

    async fn update_user(
        &self,
        _: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        Err(Status::failed_precondition("not scripted"))
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        self.delete_calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("database unreachable"))
    }
}

type Client =
    UserServiceClient<BoxCloneService<http::Request<Body>, http::Response<Body>, BoxError>>;

/// A client of `addr` through the deadline and retry layers; `connects` counts its connection
/// attempts.
fn client(pki: &TestPki, addr: SocketAddr, connects: Arc<AtomicUsize>) -> anyhow::Result<Client> {
    let connector = MeshConnector::new(pki.tls(pki::OPERATOR)?, "users");
    let counting = tower::service_fn(move |uri: Uri| {
        connects.fetch_add(1, Ordering::SeqCst);
        connector.clone().call(uri)
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector_lazy(counting)
        .map_err(BoxError::from);
    let stack = ServiceBuilder::new()
        .layer(BoxCloneService::layer())
        .layer(DeadlineLayer::new(DEADLINE))
        .layer(RetryLayer::new(&RetryConfig::default())?)
        .service(channel);
    Ok(UserServiceClient::new(stack))
}

struct Running {
    addr: SocketAddr,
    script: Arc<Scripted>,
    _stop: oneshot::Sender<()>,
}

async fn serve(pki: &TestPki) -> anyhow::Result<Running> {
    let script = Arc::new(Scripted::default());
    let server = MeshServer::bind(&ServerConfig::default())
        .await?
        .with_tls(pki.tls("users")?);
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(
        Routes::new(UserServiceServer::from_arc(script.clone())),
        &[UserServiceServer::<Scripted>::NAME],
        always_ready(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Running {
        addr,
        script,
        _stop: stop,
    })
}

/// Runs `call` with a bound on its time.
async fn bounded<T>(call: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, call)
        .await
        .context("the call did not end")
}

#[tokio::test]
async fn a_call_turned_away_unprocessed_is_sent_again_whole_and_succeeds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(&pki).await?;
    let mut client = client(&pki, server.addr, Arc::default())?;

    let created = bounded(client.create_user(CreateUserRequest {
        email: "ada@example.com".into(),
        display_name: "Ada".into(),
    }))
    .await??;

    assert_eq!(
        created.into_inner().user.map(|u| u.email),
        Some("ada@example.com".into())
    );
    assert_eq!(server.script.create_calls.load(Ordering::SeqCst), 2);
    let created = server.script.created.lock().map(|c| c.clone()).ok();
    assert_eq!(created, Some(vec!["ada@example.com".to_owned()]));
    Ok(())
}

#[tokio::test]
async fn a_call_that_is_not_idempotent_answered_unavailable_is_not_sent_again() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(&pki).await?;
    let mut client = client(&pki, server.addr, Arc::default())?;

    let deleted = bounded(client.delete_user(DeleteUserRequest { id: "u-1".into() })).await?;

    assert_eq!(deleted.err().map(|s| s.code()), Some(Code::Unavailable));
    assert_eq!(server.script.delete_calls.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn an_idempotent_call_answered_unavailable_is_sent_again() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(&pki).await?;
    let mut client = client(&pki, server.addr, Arc::default())?;

    let got = bounded(client.get_user(GetUserRequest { id: "u-1".into() })).await??;

    assert_eq!(got.into_inner().user.map(|u| u.id), Some("u-1".into()));
    assert_eq!(server.script.get_calls.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn a_refused_connection_is_tried_again_up_to_the_attempt_limit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    // A port where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let connects = Arc::new(AtomicUsize::new(0));
    let mut client = client(&pki, dead, connects.clone())?;

    // Not idempotent, but a refused connection proves nothing was sent.
    let created = bounded(client.create_user(CreateUserRequest {
        email: "ada@example.com".into(),
        display_name: "Ada".into(),
    }))
    .await?;

    assert_eq!(created.err().map(|s| s.code()), Some(Code::Unavailable));
    assert_eq!(
        connects.load(Ordering::SeqCst),
        RetryConfig::default().max_attempts as usize
    );
    Ok(())
}
