//! Traces across a hop, as a collector sees them: one trace per call through two services, the
//! client span the parent of the next service's server span, status codes on every span, an
//! error on a refused charge; and the JSON logs of the request carrying the trace's id.
//!
//! In this process: an OTLP/gRPC collector (opentelemetry-proto's TraceService), and two mesh
//! servers over mutual TLS (whose stack traces every call): a front (users' certificate) whose
//! GetUser charges the user through a back (billing's certificate), called through a mesh client
//! (whose stack traces every call too). The process's telemetry is installed once, exporting to the
//! collector and logging JSON into a buffer, so the whole story is one test.

mod otlp;

use std::net::SocketAddr;

use mesh::{
    client::MeshChannel,
    config::ServerConfig,
    server::{MeshServer, always_ready},
    telemetry::{LogFormat, Telemetry},
    testing::TestPki,
};
use meshwork::{
    billing::v1::{
        ChargeRequest, ChargeResponse, GetAccountRequest, GetAccountResponse, GetPaymentRequest,
        GetPaymentResponse, ListPaymentsRequest, ListPaymentsResponse, RefundRequest,
        RefundResponse, TopUpRequest, TopUpResponse,
        billing_service_client::BillingServiceClient,
        billing_service_server::{BillingService, BillingServiceServer},
    },
    users::v1::{
        CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse,
        GetUserRequest, GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest,
        UpdateUserResponse, User,
        user_service_client::UserServiceClient,
        user_service_server::{UserService, UserServiceServer},
    },
};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use otlp::{Collector, Lines, attribute, int_attribute, span, status_code};
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status, service::Routes};

/// The user whose account cannot pay.
const BROKE: &str = "broke";
/// What billing says to them.
const INSUFFICIENT_FUNDS: &str = "insufficient funds";
const GET_USER: &str = "meshwork.users.v1.UserService/GetUser";
const CHARGE: &str = "meshwork.billing.v1.BillingService/Charge";

/// The front: GetUser charges the user at the back, and fails as the charge does.
struct Front {
    billing: BillingServiceClient<MeshChannel>,
}

#[tonic::async_trait]
impl UserService for Front {
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = request.into_inner().id;
        self.billing
            .clone()
            .charge(ChargeRequest {
                user_id: id.clone(),
                ..ChargeRequest::default()
            })
            .await?;
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
        Err(Status::failed_precondition("not in this test"))
    }

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn update_user(
        &self,
        _: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn delete_user(
        &self,
        _: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }
}

/// The back: Charge logs, and refuses the broke user.
struct Back;

#[tonic::async_trait]
impl BillingService for Back {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeResponse>, Status> {
        let user_id = request.into_inner().user_id;
        tracing::info!(%user_id, "charging");
        if user_id == BROKE {
            return Err(Status::failed_precondition(INSUFFICIENT_FUNDS));
        }
        Ok(Response::new(ChargeResponse::default()))
    }

    async fn get_account(
        &self,
        _: Request<GetAccountRequest>,
    ) -> Result<Response<GetAccountResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn top_up(&self, _: Request<TopUpRequest>) -> Result<Response<TopUpResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn refund(&self, _: Request<RefundRequest>) -> Result<Response<RefundResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn get_payment(
        &self,
        _: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }

    async fn list_payments(
        &self,
        _: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        Err(Status::failed_precondition("not in this test"))
    }
}

/// Serves `routes` over mutual TLS as `name` until the returned sender is dropped.
async fn serve(
    pki: &TestPki,
    name: &str,
    routes: Routes,
) -> anyhow::Result<(SocketAddr, oneshot::Sender<()>)> {
    let server = MeshServer::bind(&ServerConfig::default())
        .await?
        .with_tls(pki.tls(name)?);
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(routes, &[], always_ready(), async move {
        let _ = stopped.await;
    }));
    Ok((addr, stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_across_two_services_is_one_trace_and_its_logs_carry_the_trace_id()
-> anyhow::Result<()> {
    let (collector, collector_addr) = Collector::start().await?;
    let lines = Lines::default();
    let telemetry = Telemetry::from_env("meshwork-test")
        .with_otlp_endpoint(format!("http://{collector_addr}"))
        .with_log_format(LogFormat::Json)
        .with_filter(mesh::telemetry::DEFAULT_FILTER)
        .with_writer(lines.clone())
        .init();
    anyhow::ensure!(
        telemetry.is_exporting(),
        "the test's telemetry was not installed"
    );

    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let (back_addr, _stop_back) = serve(
        &pki,
        "billing",
        Routes::new(BillingServiceServer::new(Back)),
    )
    .await?;
    let billing = pki.channel_as("users", back_addr, "billing")?;
    let front = Front {
        billing: BillingServiceClient::new(billing),
    };
    let (front_addr, _stop_front) =
        serve(&pki, "users", Routes::new(UserServiceServer::new(front))).await?;
    let mut users = UserServiceClient::new(pki.channel(front_addr, "users")?);

    // A call that goes through.
    let paid = users
        .get_user(GetUserRequest {
            id: "ada".to_owned(),
        })
        .await;
    assert!(paid.is_ok(), "{paid:?}");
    // A call whose charge is refused.
    let refused = users
        .get_user(GetUserRequest {
            id: BROKE.to_owned(),
        })
        .await;
    assert_eq!(
        refused.as_ref().err().map(Status::code),
        Some(Code::FailedPrecondition)
    );
    telemetry.flush().await;

    // Two calls, two traces of four spans: the test's client -> front server -> front's client
    // -> back server (every mesh client and server traces its calls).
    let traces = collector.traces(8).await?;
    assert_eq!(traces.len(), 2, "{traces:#?}");
    let [trace, refused] = [&traces[0], &traces[1]];
    let caller = span(trace, GET_USER, SpanKind::Client)?;
    let front_server = span(trace, GET_USER, SpanKind::Server)?;
    let client = span(trace, CHARGE, SpanKind::Client)?;
    let back_server = span(trace, CHARGE, SpanKind::Server)?;
    assert!(
        caller.parent_span_id.is_empty(),
        "the test's call is the root"
    );
    assert_eq!(front_server.parent_span_id, caller.span_id);
    assert_eq!(client.parent_span_id, front_server.span_id);
    assert_eq!(back_server.parent_span_id, client.span_id);
    for (s, service, method) in [
        (front_server, "meshwork.users.v1.UserService", "GetUser"),
        (client, "meshwork.billing.v1.BillingService", "Charge"),
        (back_server, "meshwork.billing.v1.BillingService", "Charge"),
    ] {
        assert_eq!(attribute(s, "rpc.system").as_deref(), Some("grpc"));
        assert_eq!(attribute(s, "rpc.service").as_deref(), Some(service));
        assert_eq!(attribute(s, "rpc.method").as_deref(), Some(method));
        assert_eq!(int_attribute(s, "rpc.grpc.status_code"), Some(0), "{s:#?}");
        assert_eq!(status_code(s), StatusCode::Unset, "{s:#?}");
    }
    assert_eq!(
        attribute(client, "server.address").as_deref(),
        Some("billing")
    );
    assert_eq!(
        attribute(back_server, "client.address").as_deref(),
        Some("127.0.0.1")
    );
    assert!(back_server.start_time_unix_nano >= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= front_server.end_time_unix_nano);

    // The refused charge: FAILED_PRECONDITION everywhere, an error where the call failed.
    let failed_front = span(refused, GET_USER, SpanKind::Server)?;
    let failed_client = span(refused, CHARGE, SpanKind::Client)?;
    let failed_back = span(refused, CHARGE, SpanKind::Server)?;
    assert_eq!(failed_client.parent_span_id, failed_front.span_id);
    assert_eq!(failed_back.parent_span_id, failed_client.span_id);
    for s in [failed_front, failed_client, failed_back] {
        assert_eq!(
            int_attribute(s, "rpc.grpc.status_code"),
            Some(i64::from(i32::from(Code::FailedPrecondition)))
        );
    }
    assert_eq!(status_code(failed_client), StatusCode::Error);
    assert_eq!(
        failed_client.status.as_ref().map(|s| s.message.as_str()),
        Some(INSUFFICIENT_FUNDS)
    );
    // A refusal is the caller's problem, not the servers' fault.
    assert_eq!(status_code(failed_back), StatusCode::Unset);
    assert_eq!(status_code(failed_front), StatusCode::Unset);

    // The back's log line of each call carries its trace and its server span.
    let logged = lines.with_message("charging")?;
    assert_eq!(logged.len(), 2, "{logged:#?}");
    for (line, back) in logged.iter().zip([back_server, failed_back]) {
        assert_eq!(line["trace_id"], hex(&back.trace_id), "{line}");
        assert_eq!(line["span_id"], hex(&back.span_id), "{line}");
    }
    telemetry.shutdown();
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
