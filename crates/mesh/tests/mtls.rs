//! The mesh port speaks mutual TLS only: who gets through the handshake, and who does not.
//! Each test runs a real mesh server (health and reflection only) on an ephemeral port.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use mesh::{
    config::ServerConfig,
    pki::Validity,
    server::{MeshServer, always_ready},
    testing::TestPki,
    tls::MeshTls,
    transport::MeshConnector,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::sync::oneshot;
use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Long enough for a handshake on a loaded CI machine, short enough to fail fast.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

struct Server {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve(tls: MeshTls) -> Result<Server, Box<dyn std::error::Error>> {
    let server = MeshServer::bind(&ServerConfig::default())
        .await?
        .with_tls(tls);
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(
        tonic::service::Routes::default(),
        &[],
        always_ready(),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Server { addr, _stop: stop })
}

/// A health check over `channel`: whether the server answered at all.
async fn answers(channel: tonic::transport::Channel) -> bool {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest::default());
    matches!(tokio::time::timeout(CALL_TIMEOUT, call).await, Ok(Ok(_)))
}

fn endpoint(addr: SocketAddr) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
}

#[tokio::test]
async fn a_mesh_identity_gets_through() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;
    let channel = endpoint(server.addr)?
        .connect_with_connector_lazy(MeshConnector::new(pki.tls("orders")?, "users"));
    assert!(answers(channel).await);
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;
    let channel = endpoint(server.addr)?.connect_lazy();
    assert!(!answers(channel).await);
    Ok(())
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(
        pki.ca().cert_pem().as_bytes(),
    )?)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let refused = match connector.connect(ServerName::try_from("users")?, tcp).await {
        // TLS 1.3 reports the missing certificate after the client's Finished: on first read.
        Ok(mut stream) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(CALL_TIMEOUT, stream.read(&mut buf)).await,
                Ok(Err(_) | Ok(0))
            )
        }
        Err(_) => true,
    };
    assert!(refused, "a client without certificate was served");
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;
    let other_dir = tempfile::tempdir()?;
    let other = TestPki::new(other_dir.path())?;
    // The stranger trusts our CA (so its own check passes) but its certificate is not ours.
    std::fs::copy(dir.path().join("ca.crt"), other_dir.path().join("ca.crt"))?;
    let channel = endpoint(server.addr)?
        .connect_with_connector_lazy(MeshConnector::new(other.tls("orders")?, "users"));
    assert!(!answers(channel).await);
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;
    pki.issue("orders", Validity::expired())?;
    let channel = endpoint(server.addr)?
        .connect_with_connector_lazy(MeshConnector::new(pki.tls("orders")?, "users"));
    assert!(!answers(channel).await);
    Ok(())
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused_by_the_client() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    // billing's certificate answering where the client expects users.
    let server = serve(pki.tls("billing")?).await?;
    let channel = endpoint(server.addr)?
        .connect_with_connector_lazy(MeshConnector::new(pki.tls("orders")?, "users"));
    assert!(!answers(channel).await);
    Ok(())
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_the_next_handshake() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    let server = serve(pki.tls("users")?).await?;
    let first = presented_certificate(&pki, server.addr).await?;

    pki.issue("users", Validity::starting_now(Duration::from_secs(3600)))?;
    let on_disk = CertificateDer::from_pem_file(dir.path().join("users.crt"))?;
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    loop {
        let now = presented_certificate(&pki, server.addr).await?;
        if now == on_disk {
            assert_ne!(now, first);
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leaf certificate the server at `addr` presents in a fresh handshake.
async fn presented_certificate(
    pki: &TestPki,
    addr: SocketAddr,
) -> Result<CertificateDer<'static>, Box<dyn std::error::Error>> {
    let connector = tokio_rustls::TlsConnector::from(pki.tls("orders")?.client_config());
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = connector
        .connect(ServerName::try_from("users")?, tcp)
        .await?;
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().cloned())
        .ok_or_else(|| "no certificate presented".into())
}

#[tokio::test]
async fn a_server_is_verified_by_its_identity_not_its_dns_names() -> TestResult {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::new(dir.path())?;
    // As cert-manager issues it in a cluster: DNS names of the Kubernetes Service only, while
    // the client reaches a pod by its address.
    let identity = mesh::identity::SpiffeId::new(mesh::tls::DEFAULT_TRUST_DOMAIN, "shop", "users")?;
    let leaf = pki.ca().issue(
        &identity,
        &["meshwork-users.shop.svc"],
        Validity::starting_now(Duration::from_secs(3600)),
    )?;
    mesh::pki::write(&dir.path().join("users.crt"), &leaf.cert_pem, false)?;
    mesh::pki::write(&dir.path().join("users.key"), &leaf.key_pem, true)?;
    let server = serve(pki.tls("users")?).await?;
    let channel = endpoint(server.addr)?
        .connect_with_connector_lazy(MeshConnector::new(pki.tls("orders")?, "users"));
    assert!(answers(channel).await);
    Ok(())
}
