//! gRPC over SPIFFE mutual TLS: an incoming stream of verified TLS connections for tonic
//! servers (each carrying the peer's SPIFFE ID as connect info), and a connector for tonic
//! channels.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use isthmus_core::SpiffeId;
use isthmus_core::tls;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// ALPN for gRPC (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Who is on the other end of a server-side connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's verified SPIFFE ID; `None` when the listener admits anonymous clients and
    /// this one presented no certificate.
    pub spiffe_id: Option<SpiffeId>,
    /// The peer's socket address.
    pub remote_addr: SocketAddr,
}

/// A server-side TLS connection whose client certificate (if any) already verified.
#[derive(Debug)]
pub struct SpiffeTlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl Connected for SpiffeTlsStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for SpiffeTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpiffeTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow or failing client
/// never blocks the others); yields only verified connections. Failed handshakes are logged.
/// The stream ends when the listener fails or the receiver is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<SpiffeTlsStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while !tx.is_closed() {
            let (tcp, remote_addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(inner) => {
                        let spiffe_id =
                            tls::peer_id(inner.get_ref().1.peer_certificates().unwrap_or_default());
                        let peer = PeerIdentity {
                            spiffe_id,
                            remote_addr,
                        };
                        // The server is gone when the receiver is dropped; nothing to do.
                        let _closed = conn_tx.send(Ok(SpiffeTlsStream { inner, peer })).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, peer = %remote_addr, "TLS handshake failed");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A lazily connecting tonic channel to `addr` over TLS with `config` (which must offer ALPN
/// `h2`). The TLS server name is irrelevant: SPIFFE verification authorizes by SPIFFE ID.
pub fn tls_channel(addr: SocketAddr, config: Arc<ClientConfig>) -> Channel {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("isthmus.invalid")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://isthmus.invalid").connect_with_connector_lazy(connector)
}

/// A lazily connecting tonic channel over a Unix socket (the broker's admin API).
pub fn unix_channel(path: std::path::PathBuf) -> Channel {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://isthmus-admin.invalid").connect_with_connector_lazy(connector)
}
