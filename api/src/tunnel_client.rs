//! The client side of the tunnel protocol, used by node agents and tests: a pool of
//! connections to remote gateways for one local identity, one stream per tunnelled TCP
//! connection.
//!
//! QUIC (`isthmus/1`) is the primary transport. When a gateway's QUIC handshake does not
//! complete within [`TunnelClientOptions::handshake_timeout`] (UDP blocked on the path), the
//! client falls back to TLS over TCP to the same address and port, ALPN `h2`, one HTTP/2
//! connection per gateway carrying one `CONNECT` stream per tunnelled TCP connection
//! (HBONE-style `:authority`, see [`connect_authority`]). It remembers the failure and goes
//! straight to TCP for [`TunnelClientOptions::quic_retry_after`] before trying QUIC again.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_core::tls::MtlsSettings;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::tunnel::{
    self, HeaderError, ReadError, ResultCode, StreamRequest, Target, decode_response,
    encode_request,
};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The client configuration is unusable.
    #[error("tunnel client configuration: {0}")]
    Config(String),
    /// No connection to the gateway (handshake failure, timeout, unreachable).
    #[error("cannot connect to gateway {gateway}: {reason}")]
    Connect {
        /// The gateway.
        gateway: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The gateway answered with a refusal.
    #[error("gateway refused the stream: {code}: {message}")]
    Refused {
        /// The result code.
        code: ResultCode,
        /// The gateway's detail.
        message: String,
    },
    /// The stream failed before the gateway answered.
    #[error("tunnel stream failed: {0}")]
    Stream(String),
    /// The header could not be encoded or the answer decoded.
    #[error(transparent)]
    Header(#[from] HeaderError),
}

impl TunnelError {
    /// The refusal code, if the gateway refused.
    pub fn refusal(&self) -> Option<ResultCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Options of the client.
#[derive(Debug, Clone)]
pub struct TunnelClientOptions {
    /// Time a QUIC handshake may take.
    pub handshake_timeout: Duration,
    /// Keep-alive on idle connections.
    pub keep_alive: Duration,
    /// Idle timeout of connections.
    pub idle_timeout: Duration,
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window.
    pub connection_window: u32,
}

impl Default for TunnelClientOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            stream_window: 8 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
        }
    }
}

/// A tunnelled connection: read and write like a TCP stream. Shutting down the write side
/// sends FIN; dropping it mid-stream resets the stream.
#[derive(Debug)]
pub struct TunnelStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl TunnelStream {
    /// Resets both directions (the far side sees a TCP reset).
    pub fn reset(mut self) {
        let _ = self.send.reset(2u32.into());
        let _ = self.recv.stop(2u32.into());
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send)
            .poll_write(cx, buf)
            .map_err(io::Error::from)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// Opens tunnels to gateways for one local identity, reusing one QUIC connection per gateway.
#[derive(Debug, Clone)]
pub struct TunnelClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    options: TunnelClientOptions,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    next_request_id: Arc<std::sync::atomic::AtomicU64>,
}

impl TunnelClient {
    /// A client presenting `settings.svid` and accepting gateways `settings.authorizer` allows.
    /// `bind` is the local UDP address (`127.0.0.1:0`, `0.0.0.0:0`, …).
    pub fn new(
        settings: &MtlsSettings,
        bind: SocketAddr,
        options: TunnelClientOptions,
    ) -> Result<Self, TunnelError> {
        let mut settings = settings.clone();
        settings.alpn = vec![tunnel::ALPN.to_vec()];
        let tls = isthmus_core::tls::client_config(&settings)
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(options.keep_alive))
            .stream_receive_window(options.stream_window.into())
            .receive_window(options.connection_window.into())
            .send_window(u64::from(options.connection_window))
            .max_idle_timeout(Some(
                options
                    .idle_timeout
                    .try_into()
                    .map_err(|_| TunnelError::Config("idle timeout too large".into()))?,
            ));
        config.transport_config(Arc::new(transport));
        let endpoint =
            quinn::Endpoint::client(bind).map_err(|e| TunnelError::Config(e.to_string()))?;
        Ok(Self {
            endpoint,
            config,
            options,
            connections: Arc::new(Mutex::new(HashMap::new())),
            next_request_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    /// A live connection to `gateway`, reused when possible.
    pub async fn connection(&self, gateway: SocketAddr) -> Result<quinn::Connection, TunnelError> {
        if let Some(conn) = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&gateway)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let connect_err = |reason: String| TunnelError::Connect { gateway, reason };
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), gateway, "isthmus-gateway.invalid")
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(self.options.handshake_timeout, connecting)
            .await
            .map_err(|_| connect_err("QUIC handshake timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(gateway, conn.clone());
        Ok(conn)
    }

    /// Opens a tunnel to `target` through `gateway`; returns once the gateway accepted it.
    pub async fn open(
        &self,
        gateway: SocketAddr,
        target: Target,
    ) -> Result<TunnelStream, TunnelError> {
        let request = StreamRequest {
            target,
            request_id: u128::from(
                self.next_request_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ),
            traceparent: None,
        };
        self.open_request(gateway, &request).await
    }

    /// [`Self::open`] with a caller-built request (request ID, trace context).
    pub async fn open_request(
        &self,
        gateway: SocketAddr,
        request: &StreamRequest,
    ) -> Result<TunnelStream, TunnelError> {
        let header = encode_request(request)?;
        let conn = self.connection(gateway).await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                // The pooled connection died: forget it and try once on a fresh one.
                self.connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&gateway);
                tracing::debug!(gateway = %gateway, error = %e, "reconnecting");
                self.connection(gateway)
                    .await?
                    .open_bi()
                    .await
                    .map_err(|e| TunnelError::Stream(e.to_string()))?
            }
        };
        send.write_all(&header)
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        let response =
            tunnel::read_header(&mut recv, 4 + tunnel::MAX_RESPONSE_MESSAGE, decode_response)
                .await
                .map_err(|e| match e {
                    ReadError::Io(e) => TunnelError::Stream(e.to_string()),
                    ReadError::Header(e) => TunnelError::Header(e),
                })?;
        if response.code != ResultCode::Accepted {
            let _ = send.finish();
            return Err(TunnelError::Refused {
                code: response.code,
                message: response.message,
            });
        }
        Ok(TunnelStream { send, recv })
    }

    /// Closes every connection (with code 0) and waits briefly for the peers to acknowledge.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"client closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Writes a raw (possibly malformed) header and reads the gateway's answer: for tests of the
/// gateway's header handling.
pub async fn send_raw_header(
    conn: &quinn::Connection,
    header: &[u8],
) -> Result<tunnel::StreamResponse, TunnelError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    send.write_all(header)
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    send.flush()
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    let response =
        tunnel::read_header(&mut recv, 4 + tunnel::MAX_RESPONSE_MESSAGE, decode_response)
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
    Ok(response)
}
