//! Who may call what, across the whole mesh over mutual TLS: service identities against each
//! service's policy, end users against their own data, and certificates replaced under load.

mod support;

use std::time::Duration;

use meshwork::{
    auth::v1::{LoginRequest, RegisterRequest},
    billing::v1::{ListPaymentsRequest, TopUpRequest},
    common::v1::Money,
    orders::v1::{
        CancelOrderRequest, CreateOrderRequest, GetOrderRequest, OrderItem, OrderStatus,
        WatchOrderRequest,
    },
    users::v1::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use support::{TestMesh, eventually};
use tokio_stream::StreamExt;
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        amount_minor,
    })
}

/// A request carrying an end user's access token.
fn as_user<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Registers and logs in; returns (user id, access token).
async fn user(mesh: &TestMesh, email: &str) -> anyhow::Result<(String, String)> {
    let mut auth = mesh.auth_client()?;
    let password = "correct horse battery";
    auth.register(RegisterRequest {
        email: email.into(),
        password: password.into(),
        display_name: "Test".into(),
    })
    .await?;
    let login = auth
        .login(LoginRequest {
            email: email.into(),
            password: password.into(),
        })
        .await?
        .into_inner();
    let token = login
        .tokens
        .map(|t| t.access_token)
        .ok_or_else(|| anyhow::anyhow!("login gave no tokens"))?;
    Ok((login.user_id, token))
}

#[tokio::test]
async fn a_service_outside_the_policy_is_permission_denied() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let mut as_billing = UserServiceClient::new(mesh.channel_as("billing", "users")?);
    let code = as_billing
        .create_user(CreateUserRequest {
            email: "x@example.com".into(),
            display_name: "X".into(),
        })
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(code, Some(Code::PermissionDenied));
    Ok(())
}

#[tokio::test]
async fn plaintext_clients_are_refused_by_every_service() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    for addr in [
        mesh.users.addr,
        mesh.billing.addr,
        mesh.auth.addr,
        mesh.orders.addr,
    ] {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
        let mut health = HealthClient::new(channel);
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            health.check(HealthCheckRequest::default()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(!answered, "{addr} answered a plaintext client");
    }
    Ok(())
}

#[tokio::test]
async fn a_user_reads_their_own_profile_and_not_another() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let (ada, ada_token) = user(&mesh, "ada@example.com").await?;
    let (grace, _) = user(&mesh, "grace@example.com").await?;
    let mut users = mesh.users_client()?;
    let own = users
        .get_user(as_user(GetUserRequest { id: ada.clone() }, &ada_token)?)
        .await;
    assert!(own.is_ok(), "{own:?}");
    let other = users
        .get_user(as_user(GetUserRequest { id: grace }, &ada_token)?)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(other, Some(Code::PermissionDenied));
    Ok(())
}

#[tokio::test]
async fn a_user_reaches_only_their_own_orders_and_payments() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let (ada, ada_token) = user(&mesh, "ada@example.com").await?;
    let (_, grace_token) = user(&mesh, "grace@example.com").await?;
    mesh.billing_client()?
        .top_up(as_user(
            TopUpRequest {
                user_id: ada.clone(),
                amount: eur(5000),
                idempotency_key: "ada-topup".into(),
            },
            &ada_token,
        )?)
        .await?;
    let mut orders = mesh.orders_client()?;
    let order = orders
        .create_order(as_user(
            CreateOrderRequest {
                user_id: ada.clone(),
                items: vec![OrderItem {
                    sku: "book".into(),
                    quantity: 1,
                    unit_price: eur(1000),
                }],
                idempotency_key: "ada-order".into(),
            },
            &ada_token,
        )?)
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order"))?;

    let codes = [
        orders
            .get_order(as_user(
                GetOrderRequest {
                    id: order.id.clone(),
                },
                &grace_token,
            )?)
            .await
            .err()
            .map(|s| s.code()),
        orders
            .cancel_order(as_user(
                CancelOrderRequest {
                    id: order.id.clone(),
                },
                &grace_token,
            )?)
            .await
            .err()
            .map(|s| s.code()),
        orders
            .create_order(as_user(
                CreateOrderRequest {
                    user_id: ada.clone(),
                    items: vec![OrderItem {
                        sku: "book".into(),
                        quantity: 1,
                        unit_price: eur(1000),
                    }],
                    idempotency_key: "grace-pays-with-ada".into(),
                },
                &grace_token,
            )?)
            .await
            .err()
            .map(|s| s.code()),
        mesh.billing_client()?
            .list_payments(as_user(
                ListPaymentsRequest {
                    user_id: ada.clone(),
                    page_size: 10,
                    page_token: String::new(),
                },
                &grace_token,
            )?)
            .await
            .err()
            .map(|s| s.code()),
    ];
    assert_eq!(codes, [Some(Code::PermissionDenied); 4]);
    let own = orders
        .get_order(as_user(GetOrderRequest { id: order.id }, &ada_token)?)
        .await;
    assert!(own.is_ok(), "{own:?}");
    Ok(())
}

#[tokio::test]
async fn a_forged_token_is_unauthenticated() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let (ada, _) = user(&mesh, "ada@example.com").await?;
    let code = mesh
        .users_client()?
        .get_user(as_user(GetUserRequest { id: ada }, "not.a.token")?)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(code, Some(Code::Unauthenticated));
    Ok(())
}

#[tokio::test]
async fn a_replaced_certificate_is_served_while_an_open_watch_continues() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let (ada, _) = user(&mesh, "ada@example.com").await?;
    mesh.billing_client()?
        .top_up(TopUpRequest {
            user_id: ada.clone(),
            amount: eur(5000),
            idempotency_key: "topup".into(),
        })
        .await?;
    let mut orders = mesh.orders_client()?;
    let order = orders
        .create_order(CreateOrderRequest {
            user_id: ada,
            items: vec![OrderItem {
                sku: "book".into(),
                quantity: 1,
                unit_price: eur(1000),
            }],
            idempotency_key: "watched".into(),
        })
        .await?
        .into_inner()
        .order
        .ok_or_else(|| anyhow::anyhow!("no order"))?;
    let mut watch = orders
        .watch_order(WatchOrderRequest {
            id: order.id.clone(),
        })
        .await?
        .into_inner();
    let first = watch.next().await.transpose()?.and_then(|r| r.order);
    assert!(first.is_some());

    // cert-manager renews orders' certificate: the files change on disk.
    let before = presented_certificate(&mesh).await?;
    mesh.pki.issue(
        "orders",
        mesh::pki::Validity::starting_now(Duration::from_secs(3600)),
    )?;
    let on_disk = CertificateDer::from_pem_file(mesh.dir.path().join("certs").join("orders.crt"))?;
    eventually(WATCH_TIMEOUT, || {
        let on_disk = on_disk.clone();
        let mesh = &mesh;
        async move { Ok((presented_certificate(mesh).await? == on_disk).then_some(())) }
    })
    .await?;
    assert_ne!(before, on_disk);

    // The stream opened before the renewal still delivers.
    mesh.orders_client()?
        .cancel_order(CancelOrderRequest { id: order.id })
        .await?;
    let last = tokio::time::timeout(WATCH_TIMEOUT, async {
        let mut last = None;
        while let Some(update) = watch.next().await {
            last = update?.order.map(|o| o.status());
        }
        anyhow::Ok(last)
    })
    .await??;
    assert_eq!(last, Some(OrderStatus::Cancelled));
    Ok(())
}

/// The certificate orders presents to a new handshake now.
async fn presented_certificate(mesh: &TestMesh) -> anyhow::Result<CertificateDer<'static>> {
    let tls = mesh.pki.tls("operator")?;
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let tcp = tokio::net::TcpStream::connect(mesh.orders.addr).await?;
    let stream = connector
        .connect(ServerName::try_from("orders")?, tcp)
        .await?;
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| anyhow::anyhow!("no certificate presented"))
}
