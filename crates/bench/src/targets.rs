//! What the load generator calls: channels to a target (bare tonic `Channel`s, plaintext or
//! over the mesh's mutual TLS presenting the operator's certificate, several connections so
//! that the calls spread over several HTTP/2 connections) and the [`Call`]s made on them.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use mesh::{tls::MeshTls, transport::MeshConnector};
use meshwork::{
    common::v1::Money,
    orders::v1::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient},
    users::v1::{GetUserRequest, user_service_client::UserServiceClient},
};
use tonic::transport::{Channel, Endpoint};

use crate::load::{CALL_TIMEOUT, Call};

/// How the load generator reaches a target.
#[derive(Clone)]
pub enum Security {
    Plaintext,
    /// Mutual TLS, presenting this certificate, expecting the server to be `service`.
    Mtls {
        tls: MeshTls,
        service: String,
    },
}

/// `connections` HTTP/2 connections to `addr`, connected now (so a dead target fails here).
pub async fn channels(
    addr: SocketAddr,
    security: &Security,
    connections: usize,
) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = match security {
            Security::Plaintext => endpoint.connect().await,
            Security::Mtls { tls, service } => {
                endpoint
                    .connect_with_connector(MeshConnector::new(tls.clone(), service))
                    .await
            }
        }
        .with_context(|| format!("connecting to {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

fn pick<T: Clone>(items: &[T], n: u64) -> Option<T> {
    let len = u64::try_from(items.len()).ok().filter(|len| *len > 0)?;
    let index = usize::try_from(n % len).ok()?;
    items.get(index).cloned()
}

/// GetUser of `ids` in turn, over the channels in turn.
pub fn get_user(channels: Vec<Channel>, ids: Vec<String>) -> anyhow::Result<Call> {
    anyhow::ensure!(
        !channels.is_empty() && !ids.is_empty(),
        "GetUser needs channels and ids"
    );
    let clients: Arc<Vec<UserServiceClient<Channel>>> =
        Arc::new(channels.into_iter().map(UserServiceClient::new).collect());
    let ids = Arc::new(ids);
    Ok(Arc::new(move |n| {
        let client = pick(&clients, n);
        let id = pick(&ids, n).unwrap_or_default();
        Box::pin(async move {
            let mut client = client.ok_or(tonic::Code::Internal)?;
            let mut request = tonic::Request::new(GetUserRequest { id });
            request.set_timeout(CALL_TIMEOUT);
            client
                .get_user(request)
                .await
                .map(drop)
                .map_err(|status| status.code())
        })
    }))
}

/// The price of the one item every benchmark order holds.
pub const ORDER_PRICE_MINOR: i64 = 250;
pub const CURRENCY: &str = "EUR";

/// CreateOrder for `users` in turn (each with a balance), one item, a fresh idempotency key per
/// call: numbered by the call itself, not by the phase's call number, which starts again at 0
/// in every phase (a repeated key would be answered from the first order, without any write);
/// `run` keeps the keys of different runs apart.
pub fn create_order(
    channels: Vec<Channel>,
    users: Vec<String>,
    run: String,
) -> anyhow::Result<Call> {
    anyhow::ensure!(
        !channels.is_empty() && !users.is_empty(),
        "CreateOrder needs channels and users"
    );
    let clients: Arc<Vec<OrderServiceClient<Channel>>> =
        Arc::new(channels.into_iter().map(OrderServiceClient::new).collect());
    let users = Arc::new(users);
    let run = Arc::new(run);
    let sent = Arc::new(AtomicU64::new(0));
    Ok(Arc::new(move |n| {
        let client = pick(&clients, n);
        let user_id = pick(&users, n).unwrap_or_default();
        let idempotency_key = format!("{run}-{}", sent.fetch_add(1, Ordering::Relaxed));
        Box::pin(async move {
            let mut client = client.ok_or(tonic::Code::Internal)?;
            let mut request = tonic::Request::new(CreateOrderRequest {
                user_id,
                items: vec![OrderItem {
                    sku: "bench-book".to_owned(),
                    quantity: 1,
                    unit_price: Some(Money {
                        currency_code: CURRENCY.to_owned(),
                        amount_minor: ORDER_PRICE_MINOR,
                    }),
                }],
                idempotency_key,
            });
            request.set_timeout(CALL_TIMEOUT);
            client
                .create_order(request)
                .await
                .map(drop)
                .map_err(|status| status.code())
        })
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh::testing::TestPki;
    use meshwork::users::v1::user_service_server::UserServiceServer;
    use tokio::net::TcpListener;

    use super::*;
    use crate::{directory::Directory, load};

    /// The in-memory directory over the mesh's mutual TLS, as `users`, on an ephemeral port.
    async fn directory_over_mtls(pki: &TestPki) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (incoming, _acceptor) = mesh::transport::tls_incoming(listener, pki.tls("users")?);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(UserServiceServer::new(Directory::seeded()))
                .serve_with_incoming(incoming),
        );
        Ok(addr)
    }

    #[tokio::test]
    async fn every_call_is_counted_by_its_status_over_mutual_tls() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let addr = directory_over_mtls(&pki).await?;
        let security = Security::Mtls {
            tls: pki.tls(mesh::pki::OPERATOR)?,
            service: "users".to_owned(),
        };
        let channels = channels(addr, &security, 2).await?;
        // Every other call asks for a user that does not exist.
        let call = get_user(channels, vec!["user-1".to_owned(), "nobody".to_owned()])?;
        let outcome = load::closed(call, 4, Duration::ZERO, Duration::from_millis(300))
            .await?
            .summary();
        let not_found = outcome
            .errors_by_code
            .get("NOT_FOUND")
            .copied()
            .unwrap_or(0);
        assert!(outcome.calls > 10, "{} calls", outcome.calls);
        assert_eq!(outcome.errors, not_found, "{:?}", outcome.errors_by_code);
        let ok = outcome.calls - not_found;
        assert!(
            ok.abs_diff(not_found) <= 4,
            "{ok} OK, {not_found} NOT_FOUND"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = TestPki::new(dir.path())?;
        let addr = directory_over_mtls(&pki).await?;
        let security = Security::Mtls {
            tls: pki.tls(mesh::pki::OPERATOR)?,
            service: "billing".to_owned(),
        };
        assert!(channels(addr, &security, 1).await.is_err());
        Ok(())
    }
}
