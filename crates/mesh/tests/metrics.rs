//! The admin port as Prometheus and the kubelet see it: `GET /metrics` over plain HTTP/1.1 is
//! Prometheus text that a real parser reads, and its counters match the calls made, on the
//! server's side and on the client's; `GET /healthz` follows health; gRPC health still answers
//! on the same port.
//!
//! The server is a real mesh server (mutual TLS, an admin port) serving a small in-memory
//! `UserService`; the client is a mesh client (the whole client stack) to it. The process's
//! metrics are shared by every test of this file, so a test reads the difference its own calls
//! made between two scrapes.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use mesh::{
    config::{AdminConfig, ServerConfig},
    server::{MeshServer, Readiness, always_ready},
    testing::TestPki,
};
use meshwork::users::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User,
    user_service_client::UserServiceClient,
    user_service_server::{UserService, UserServiceServer},
};
use prometheus_parse::{Sample, Scrape, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Request, Response, Status, server::NamedService, service::Routes};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// No step of a test waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls that find their user, and calls that do not.
const FOUND: usize = 7;
const MISSING: usize = 4;
const USER_SERVICE: &str = "meshwork.users.v1.UserService";
/// Users the in-memory service knows.
const KNOWN: [&str; 2] = ["ada", "grace"];

/// UserService over a fixed set of users: GetUser finds them or answers NOT_FOUND.
struct Users {
    known: HashSet<String>,
}

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = request.into_inner().id;
        if !self.known.contains(&id) {
            return Err(Status::not_found(format!("no user {id}")));
        }
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

/// A running server with an admin port; dropping it stops the server.
struct TestServer {
    addr: SocketAddr,
    admin: SocketAddr,
    pki: TestPki,
    _stop: tokio::sync::oneshot::Sender<()>,
    _pki_dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(readiness: Readiness) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let server = MeshServer::bind(&ServerConfig::default())
            .await?
            .with_tls(pki.tls("users")?)
            .with_admin(&AdminConfig {
                listen_addr: "127.0.0.1:0".parse().ok(),
            })
            .await?;
        let addr = server.local_addr();
        let admin = server.admin_addr().context("no admin port")?;
        let users = Users {
            known: KNOWN.iter().map(|id| (*id).to_owned()).collect(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(
            Routes::new(UserServiceServer::new(users)),
            &[UserServiceServer::<Users>::NAME],
            readiness,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            admin,
            pki,
            _stop: stop,
            _pki_dir: dir,
        })
    }

    /// Waits (bounded) until gRPC health on the admin port, over HTTP/2 in plaintext as the
    /// kubelet's probes speak it, reports SERVING.
    async fn wait_until_serving(&self) -> anyhow::Result<()> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.admin))?
            .connect_lazy();
        let mut health = HealthClient::new(channel);
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
            bail!("health stream ended before SERVING")
        };
        tokio::time::timeout(STEP_TIMEOUT, watching)
            .await
            .context("the admin port never reported SERVING")?
    }

    async fn scrape(&self) -> anyhow::Result<Scrape> {
        let response = http_get(self.admin, "/metrics", None).await?;
        ensure!(response.status == 200, "GET /metrics: {}", response.status);
        ensure!(
            response
                .content_type
                .starts_with("text/plain; version=0.0.4"),
            "content type {}",
            response.content_type
        );
        Ok(Scrape::parse(
            response.body.lines().map(|line| Ok(line.to_owned())),
        )?)
    }
}

/// What a plain HTTP/1.1 GET brought back.
struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

/// `GET path` over a fresh HTTP/1.1 connection, as a scraper or a kubelet's HTTP probe sends it.
async fn http_get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(String::from_utf8(raw)?)
    };
    let raw = tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .with_context(|| format!("GET {path} did not finish"))??;
    let (head, body) = raw.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP/1.1 response: {head}"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|length| length.parse().ok())
        .with_context(|| format!("no content-length: {head}"))?;
    ensure!(
        body.len() == length,
        "body of {} bytes, said {length}",
        body.len()
    );
    Ok(HttpResponse {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body: body.to_owned(),
    })
}

/// The sample of `metric` whose labels are exactly `labels`.
fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape.samples.iter().find(|sample| {
        sample.metric == metric
            && sample.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(name, value)| sample.labels.get(name) == Some(*value))
    })
}

/// A counter's value; 0 when it has no sample yet; an error when the sample is not a counter.
fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    match find(scrape, metric, labels).map(|sample| &sample.value) {
        None => Ok(0.0),
        Some(Value::Counter(value)) => Ok(*value),
        Some(other) => bail!("{metric} {labels:?} is not a counter: {other:?}"),
    }
}

/// How many observations a histogram holds (its `+Inf` bucket); 0 when it has none yet.
fn observations(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    match find(scrape, metric, labels).map(|sample| &sample.value) {
        None => Ok(0.0),
        Some(Value::Histogram(buckets)) => buckets
            .iter()
            .find(|bucket| bucket.less_than.is_infinite())
            .map(|bucket| bucket.count)
            .with_context(|| format!("{metric} {labels:?} has no +Inf bucket")),
        Some(other) => bail!("{metric} {labels:?} is not a histogram: {other:?}"),
    }
}

/// The calls of one side of GetUser, as counted in a scrape: (OK, NOT_FOUND, observed).
fn get_user_counts(scrape: &Scrape, side: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut labels = vec![("service", USER_SERVICE), ("method", "GetUser")];
    if side == "client" {
        labels.push(("target", "users"));
    }
    let with_code = |code: &'static str| {
        let mut labels = labels.clone();
        labels.push(("code", code));
        counter(scrape, &format!("meshwork_{side}_requests_total"), &labels)
    };
    Ok((
        with_code("OK")?,
        with_code("NOT_FOUND")?,
        observations(
            scrape,
            &format!("meshwork_{side}_request_duration_seconds"),
            &labels,
        )?,
    ))
}

#[tokio::test]
async fn metrics_count_every_call_on_both_sides_by_code() -> anyhow::Result<()> {
    let server = TestServer::start(always_ready()).await?;
    server.wait_until_serving().await?;
    let before = server.scrape().await?;

    let mut users = UserServiceClient::new(server.pki.channel(server.addr, "users")?);
    for n in 0..FOUND {
        let id = KNOWN[n % KNOWN.len()].to_owned();
        tokio::time::timeout(STEP_TIMEOUT, users.get_user(GetUserRequest { id })).await??;
    }
    for n in 0..MISSING {
        let id = format!("nobody-{n}");
        let missing =
            tokio::time::timeout(STEP_TIMEOUT, users.get_user(GetUserRequest { id })).await?;
        ensure!(
            missing.as_ref().is_err_and(|s| s.code() == Code::NotFound),
            "{missing:?}"
        );
    }

    let after = server.scrape().await?;
    let expected = (FOUND as f64, MISSING as f64, (FOUND + MISSING) as f64);
    for side in ["server", "client"] {
        let (ok, not_found, observed) = get_user_counts(&after, side)?;
        let (ok_before, not_found_before, observed_before) = get_user_counts(&before, side)?;
        let counted = (
            ok - ok_before,
            not_found - not_found_before,
            observed - observed_before,
        );
        ensure!(
            counted == expected,
            "{side}: counted (OK, NOT_FOUND, observed) = {counted:?}, made {expected:?}"
        );
    }
    let in_flight = find(
        &after,
        "meshwork_server_in_flight",
        &[("service", USER_SERVICE)],
    )
    .map(|sample| &sample.value);
    ensure!(
        matches!(in_flight, Some(Value::Gauge(value)) if *value == 0.0),
        "in flight after every call ended: {in_flight:?}"
    );
    let endpoints = find(&after, "meshwork_client_endpoints", &[("target", "users")])
        .map(|sample| &sample.value);
    ensure!(
        matches!(endpoints, Some(Value::Gauge(value)) if *value >= 1.0),
        "endpoints of users: {endpoints:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_scraper_asking_for_openmetrics_gets_openmetrics() -> anyhow::Result<()> {
    let server = TestServer::start(always_ready()).await?;
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let response = http_get(server.admin, "/metrics", Some(accept)).await?;
    ensure!(response.status == 200, "GET /metrics: {}", response.status);
    ensure!(
        response
            .content_type
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "content type {}",
        response.content_type
    );
    ensure!(
        response.body.ends_with("# EOF\n"),
        "no EOF marker:\n{}",
        response.body
    );
    ensure!(
        response
            .body
            .contains("# TYPE meshwork_server_shed counter"),
        "{}",
        response.body
    );
    Ok(())
}

#[tokio::test]
async fn healthz_is_unavailable_until_the_server_is_ready_then_ok() -> anyhow::Result<()> {
    let ready = Arc::new(AtomicBool::new(false));
    let readiness: Readiness = {
        let ready = Arc::clone(&ready);
        Arc::new(move || {
            let ready = ready.load(Ordering::SeqCst);
            Box::pin(async move { ready })
        })
    };
    let server = TestServer::start(readiness).await?;

    let waiting = http_get(server.admin, "/healthz", None).await?;
    ensure!(
        waiting.status == 503,
        "/healthz before ready: {} {}",
        waiting.status,
        waiting.body
    );

    ready.store(true, Ordering::SeqCst);
    server.wait_until_serving().await?;
    let serving = http_get(server.admin, "/healthz", None).await?;
    ensure!(
        serving.status == 200,
        "/healthz when serving: {} {}",
        serving.status,
        serving.body
    );
    Ok(())
}
