//! The mesh's transport: TCP wrapped in mutual TLS on both sides.
//!
//! - [`tls_incoming`] accepts TCP connections and completes the TLS handshake of each in its own
//!   task (a slow or hostile client cannot stall the accept loop), handing tonic only connections
//!   whose client certificate chains to the mesh CA, tagged with the caller's [`PeerInfo`].
//! - [`MeshConnector`] is the client's connector: TCP, then TLS presenting our certificate, then a
//!   check that the server's certificate names the service we meant to reach.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tower::BoxError;

use crate::{
    identity::{PeerInfo, SpiffeId},
    tls::MeshTls,
};

/// A connection (TCP and TLS) that a client has not established by then has failed.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed accept (e.g. out of file descriptors), pause before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPT_QUEUE: usize = 128;

/// A server-side mutual-TLS connection, with the verified peer it came from.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener`, handshakes with the current server configuration of `tls`, and yields
/// the connections that passed. The returned task stops accepting when aborted.
pub fn tls_incoming(
    listener: TcpListener,
    tls: MeshTls,
) -> (
    ReceiverStream<Result<TlsConnection, io::Error>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = peer_identity(stream.get_ref().1.peer_certificates());
                        let peer = PeerInfo {
                            remote_addr: Some(remote),
                            identity,
                        };
                        let _ = tx.send(Ok(TlsConnection { stream, peer })).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

fn peer_identity(
    certificates: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Option<SpiffeId> {
    let leaf = certificates?.first()?;
    match SpiffeId::from_certificate(leaf) {
        Ok(identity) => Some(identity),
        Err(error) => {
            tracing::info!(%error, "peer certificate carries no mesh identity");
            None
        }
    }
}

/// Why a mesh connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("endpoint {0} has no host")]
    NoHost(Uri),
    #[error("connecting to {target} took longer than {timeout:?}")]
    TimedOut { target: Uri, timeout: Duration },
    #[error("connecting to {addr}: {source}")]
    Tcp { addr: String, source: io::Error },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: String, source: io::Error },
    #[error(
        "{addr} presented identity {found:?}, expected service `{expected}` in trust domain `{trust_domain}`"
    )]
    WrongPeer {
        addr: String,
        found: Option<String>,
        expected: String,
        trust_domain: String,
    },
}

/// The client side of the mesh transport for one downstream service.
#[derive(Clone)]
pub struct MeshConnector {
    tls: MeshTls,
    /// The downstream's service name: the TLS server name, and the identity it must present.
    service: String,
    /// TCP and TLS together must finish within this. Enforced here rather than by tonic's
    /// `Endpoint::connect_timeout`, so that a timeout is a connect error (never sent, safe to
    /// retry) and not an anonymous one.
    connect_timeout: Duration,
}

impl MeshConnector {
    pub fn new(tls: MeshTls, service: &str) -> Self {
        Self {
            tls,
            service: service.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Bounds TCP connect plus TLS handshake.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

impl tower::Service<Uri> for MeshConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.tls.client_config());
        let trust_domain = self.tls.trust_domain().to_owned();
        let service = self.service.clone();
        let timeout = self.connect_timeout;
        let target = uri.clone();
        let attempt = async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| ConnectError::NoHost(uri.clone()))?;
            let port = uri.port_u16().unwrap_or(443);
            let addr = format!("{host}:{port}");
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|source| ConnectError::Tcp {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let server_name =
                ServerName::try_from(service.clone()).map_err(|e| ConnectError::Tls {
                    addr: addr.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, e),
                })?;
            let stream = connector
                .connect(server_name, tcp)
                .await
                .map_err(|source| ConnectError::Tls {
                    addr: addr.clone(),
                    source,
                })?;
            let found = peer_identity(stream.get_ref().1.peer_certificates());
            let expected = found
                .as_ref()
                .is_some_and(|id| id.service() == service && id.trust_domain() == trust_domain);
            if !expected {
                return Err(ConnectError::WrongPeer {
                    addr,
                    found: found.map(|id| id.to_string()),
                    expected: service,
                    trust_domain,
                }
                .into());
            }
            Ok(TokioIo::new(stream))
        };
        Box::pin(async move {
            tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| Err(ConnectError::TimedOut { target, timeout }.into()))
        })
    }
}
