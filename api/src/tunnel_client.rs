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

/// Which transports [`TunnelClient::open`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportPolicy {
    /// QUIC, falling back to HTTP/2 CONNECT over TLS/TCP when the QUIC handshake times out.
    #[default]
    Auto,
    /// QUIC only (a handshake timeout is an error).
    QuicOnly,
    /// HTTP/2 CONNECT over TLS/TCP only.
    TcpOnly,
}

/// The transport that carries one [`TunnelStream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A QUIC bidirectional stream (`isthmus/1`).
    Quic,
    /// An HTTP/2 `CONNECT` stream over TLS/TCP.
    H2,
}

/// Options of the client.
#[derive(Debug, Clone)]
pub struct TunnelClientOptions {
    /// Time a QUIC handshake may take (and, separately, a TCP connect plus TLS handshake).
    pub handshake_timeout: Duration,
    /// Keep-alive on idle connections.
    pub keep_alive: Duration,
    /// Idle timeout of connections.
    pub idle_timeout: Duration,
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window.
    pub connection_window: u32,
    /// Which transports to use.
    pub transport: TransportPolicy,
    /// After a QUIC handshake to a gateway timed out, [`TransportPolicy::Auto`] uses TCP
    /// directly for this long before trying QUIC again.
    pub quic_retry_after: Duration,
}

impl Default for TunnelClientOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            stream_window: 8 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            transport: TransportPolicy::Auto,
            quic_retry_after: Duration::from_secs(30),
        }
    }
}

/// The response header naming the result of an HTTP/2 `CONNECT` (a [`ResultCode::label`]).
pub const RESULT_HEADER: &str = "isthmus-result";
/// The request header carrying the request ID (32 lowercase hex digits) over HTTP/2.
pub const REQUEST_ID_HEADER: &str = "isthmus-request-id";
/// The request header carrying W3C trace context over HTTP/2.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The DNS suffix of HTTP/2 `CONNECT` authorities.
pub const AUTHORITY_SUFFIX: &str = "svc.clusterset.local";

/// The HTTP/2 `CONNECT` `:authority` of `target`:
/// `[<cluster>.]<service>.<namespace>.svc.clusterset.local:<port>`.
pub fn connect_authority(target: &Target) -> String {
    match &target.cluster {
        Some(cluster) => format!(
            "{cluster}.{}.{}.{AUTHORITY_SUFFIX}:{}",
            target.service, target.namespace, target.port
        ),
        None => format!(
            "{}.{}.{AUTHORITY_SUFFIX}:{}",
            target.service, target.namespace, target.port
        ),
    }
}

/// The result code whose [`ResultCode::label`] is `label`.
pub fn result_code_from_label(label: &str) -> Option<ResultCode> {
    [
        ResultCode::Accepted,
        ResultCode::UnknownService,
        ResultCode::Denied,
        ResultCode::NoHealthyEndpoint,
        ResultCode::Overloaded,
        ResultCode::Malformed,
    ]
    .into_iter()
    .find(|code| code.label() == label)
}

#[derive(Debug)]
enum StreamInner {
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    H2(TokioIo<Upgraded>),
}

/// A tunnelled connection: read and write like a TCP stream. Shutting down the write side
/// sends FIN (QUIC) or `END_STREAM` (HTTP/2); dropping it mid-stream resets the stream.
#[derive(Debug)]
pub struct TunnelStream {
    inner: StreamInner,
}

impl TunnelStream {
    /// Resets both directions (the far side sees a TCP reset). Over HTTP/2 the stream is
    /// cancelled, which hyper's `CONNECT` support delivers to the gateway as a close: the
    /// backend sees FIN, not RST.
    pub fn reset(self) {
        match self.inner {
            StreamInner::Quic { mut send, mut recv } => {
                let _ = send.reset(2u32.into());
                let _ = recv.stop(2u32.into());
            }
            StreamInner::H2(io) => drop(io),
        }
    }

    /// The transport carrying this stream.
    pub fn transport(&self) -> Transport {
        match self.inner {
            StreamInner::Quic { .. } => Transport::Quic,
            StreamInner::H2(_) => Transport::H2,
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            StreamInner::H2(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            StreamInner::Quic { send, .. } => {
                Pin::new(send).poll_write(cx, buf).map_err(io::Error::from)
            }
            StreamInner::H2(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { send, .. } => Pin::new(send).poll_flush(cx),
            StreamInner::H2(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamInner::Quic { send, .. } => Pin::new(send).poll_shutdown(cx),
            StreamInner::H2(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Why a QUIC connection attempt failed: only a timeout triggers the TCP fallback (a refused
/// handshake is an answer, not a blocked path).
enum QuicFailure {
    HandshakeTimeout(TunnelError),
    Other(TunnelError),
}

impl From<QuicFailure> for TunnelError {
    fn from(failure: QuicFailure) -> Self {
        match failure {
            QuicFailure::HandshakeTimeout(e) | QuicFailure::Other(e) => e,
        }
    }
}

type H2Sender = SendRequest<Empty<Bytes>>;

/// Opens tunnels to gateways for one local identity, reusing one QUIC connection (or one
/// HTTP/2 connection, on the TCP fallback) per gateway.
#[derive(Debug, Clone)]
pub struct TunnelClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    tcp_tls: Arc<rustls::ClientConfig>,
    options: TunnelClientOptions,
    connections: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    // An async lock: concurrent opens on the fallback wait for one TCP+TLS handshake instead of
    // each making their own.
    h2_connections: Arc<tokio::sync::Mutex<HashMap<SocketAddr, H2Sender>>>,
    quic_failed: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
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
        settings.alpn = vec![crate::transport::ALPN_H2.to_vec()];
        let tcp_tls = isthmus_core::tls::client_config(&settings)
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
            tcp_tls: Arc::new(tcp_tls),
            options,
            connections: Arc::new(Mutex::new(HashMap::new())),
            h2_connections: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            quic_failed: Arc::new(Mutex::new(HashMap::new())),
            next_request_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    /// A live QUIC connection to `gateway`, reused when possible.
    pub async fn connection(&self, gateway: SocketAddr) -> Result<quinn::Connection, TunnelError> {
        self.quic_connection(gateway).await.map_err(Into::into)
    }

    async fn quic_connection(&self, gateway: SocketAddr) -> Result<quinn::Connection, QuicFailure> {
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
            .map_err(|e| QuicFailure::Other(connect_err(e.to_string())))?;
        let conn = tokio::time::timeout(self.options.handshake_timeout, connecting)
            .await
            .map_err(|_| {
                QuicFailure::HandshakeTimeout(connect_err("QUIC handshake timed out".into()))
            })?
            .map_err(|e| QuicFailure::Other(connect_err(e.to_string())))?;
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(gateway, conn.clone());
        Ok(conn)
    }

    /// When QUIC to `gateway` last timed out and [`TransportPolicy::Auto`] is still using TCP
    /// for it: the instant QUIC will be tried again. `None` when QUIC is in use.
    pub fn quic_retry_at(&self, gateway: SocketAddr) -> Option<Instant> {
        let mut failed = self
            .quic_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match failed.get(&gateway) {
            Some(until) if Instant::now() < *until => Some(*until),
            Some(_) => {
                failed.remove(&gateway);
                None
            }
            None => None,
        }
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
        match self.options.transport {
            TransportPolicy::QuicOnly => self.open_quic(gateway, request).await.map_err(Into::into),
            TransportPolicy::TcpOnly => self.open_h2(gateway, request).await,
            TransportPolicy::Auto => {
                if self.quic_retry_at(gateway).is_some() {
                    return self.open_h2(gateway, request).await;
                }
                match self.open_quic(gateway, request).await {
                    Ok(stream) => Ok(stream),
                    Err(QuicFailure::HandshakeTimeout(e)) => {
                        tracing::info!(gateway = %gateway, error = %e, retry_after = ?self.options.quic_retry_after, "QUIC unavailable; falling back to HTTP/2 over TCP");
                        self.quic_failed
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(gateway, Instant::now() + self.options.quic_retry_after);
                        self.open_h2(gateway, request).await
                    }
                    Err(QuicFailure::Other(e)) => Err(e),
                }
            }
        }
    }

    async fn open_quic(
        &self,
        gateway: SocketAddr,
        request: &StreamRequest,
    ) -> Result<TunnelStream, QuicFailure> {
        let header = encode_request(request).map_err(|e| QuicFailure::Other(e.into()))?;
        let conn = self.quic_connection(gateway).await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                // The pooled connection died: forget it and try once on a fresh one.
                self.connections
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&gateway);
                tracing::debug!(gateway = %gateway, error = %e, "reconnecting");
                self.quic_connection(gateway)
                    .await?
                    .open_bi()
                    .await
                    .map_err(|e| QuicFailure::Other(TunnelError::Stream(e.to_string())))?
            }
        };
        let stream_err = |e: String| QuicFailure::Other(TunnelError::Stream(e));
        send.write_all(&header)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let response =
            tunnel::read_header(&mut recv, 4 + tunnel::MAX_RESPONSE_MESSAGE, decode_response)
                .await
                .map_err(|e| match e {
                    ReadError::Io(e) => stream_err(e.to_string()),
                    ReadError::Header(e) => QuicFailure::Other(TunnelError::Header(e)),
                })?;
        if response.code != ResultCode::Accepted {
            let _ = send.finish();
            return Err(QuicFailure::Other(TunnelError::Refused {
                code: response.code,
                message: response.message,
            }));
        }
        Ok(TunnelStream {
            inner: StreamInner::Quic { send, recv },
        })
    }

    /// A live HTTP/2 connection to `gateway` over TLS/TCP, and whether it was just made.
    async fn h2_sender(&self, gateway: SocketAddr) -> Result<(H2Sender, bool), TunnelError> {
        let mut pool = self.h2_connections.lock().await;
        if let Some(sender) = pool.get(&gateway)
            && !sender.is_closed()
        {
            return Ok((sender.clone(), false));
        }
        pool.remove(&gateway);
        let sender = tokio::time::timeout(self.options.handshake_timeout, self.h2_connect(gateway))
            .await
            .map_err(|_| TunnelError::Connect {
                gateway,
                reason: "TCP connect and TLS handshake timed out".into(),
            })??;
        pool.insert(gateway, sender.clone());
        Ok((sender, true))
    }

    async fn h2_connect(&self, gateway: SocketAddr) -> Result<H2Sender, TunnelError> {
        let connect_err = |reason: String| TunnelError::Connect { gateway, reason };
        let tcp = tokio::net::TcpStream::connect(gateway)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("isthmus-gateway.invalid")
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tcp_tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| connect_err(format!("TLS: {e}")))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.options.stream_window)
            .initial_connection_window_size(self.options.connection_window)
            .max_frame_size(H2_MAX_FRAME)
            .keep_alive_interval(self.options.keep_alive)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| connect_err(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(gateway = %gateway, error = %e, "HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    async fn open_h2(
        &self,
        gateway: SocketAddr,
        request: &StreamRequest,
    ) -> Result<TunnelStream, TunnelError> {
        // Validate the target as the QUIC header would (DNS labels, non-zero port).
        encode_request(request)?;
        let (mut sender, fresh) = self.h2_sender(gateway).await?;
        let response = match send_connect(&mut sender, request).await {
            Ok(response) => response,
            // The pooled connection died: forget it and try once on a fresh one.
            Err(e) if !fresh => {
                tracing::debug!(gateway = %gateway, error = %e, "reconnecting over HTTP/2");
                self.h2_connections.lock().await.remove(&gateway);
                let (mut sender, _) = self.h2_sender(gateway).await?;
                send_connect(&mut sender, request)
                    .await
                    .map_err(|e| TunnelError::Connect {
                        gateway,
                        reason: format!("HTTP/2: {e}"),
                    })?
            }
            // A fresh connection that fails at once: usually the gateway rejected our SVID
            // (TLS 1.3 reports that after the client's handshake completed).
            Err(e) => {
                self.h2_connections.lock().await.remove(&gateway);
                return Err(TunnelError::Connect {
                    gateway,
                    reason: format!("HTTP/2: {e}"),
                });
            }
        };
        if response.status() == http::StatusCode::OK {
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(|e| TunnelError::Stream(e.to_string()))?;
            return Ok(TunnelStream {
                inner: StreamInner::H2(TokioIo::new(upgraded)),
            });
        }
        Err(refusal(response).await)
    }

    /// Closes every connection (QUIC with code 0, HTTP/2 with GOAWAY once its streams end) and
    /// waits briefly for the QUIC peers to acknowledge.
    pub async fn close(&self) {
        self.h2_connections.lock().await.clear();
        self.endpoint.close(0u32.into(), b"client closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// HTTP/2 frames of up to 64 KiB: fewer frames per bulk transfer than the 16 KiB default.
const H2_MAX_FRAME: u32 = 64 * 1024;

async fn send_connect(
    sender: &mut H2Sender,
    request: &StreamRequest,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
    let mut builder = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(connect_authority(&request.target))
        .header(REQUEST_ID_HEADER, format!("{:032x}", request.request_id));
    if let Some(traceparent) = &request.traceparent {
        builder = builder.header(TRACEPARENT_HEADER, traceparent);
    }
    // The authority is built from DNS labels and a port, and the header values are hex or
    // printable ASCII: the request is always valid.
    let connect = match builder.body(Empty::new()) {
        Ok(connect) => connect,
        Err(e) => {
            tracing::error!(error = %e, "BUG: invalid CONNECT request");
            http::Request::new(Empty::new())
        }
    };
    sender.ready().await?;
    sender.send_request(connect).await
}

/// The refusal an HTTP/2 `CONNECT` answer carries: the [`RESULT_HEADER`] code and the body.
async fn refusal(response: http::Response<hyper::body::Incoming>) -> TunnelError {
    let status = response.status();
    let code = response
        .headers()
        .get(RESULT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(result_code_from_label);
    let message = match Limited::new(response.into_body(), 4 * tunnel::MAX_RESPONSE_MESSAGE)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(e) => format!("(unreadable body: {e})"),
    };
    match code {
        Some(code) if code != ResultCode::Accepted => TunnelError::Refused { code, message },
        _ => TunnelError::Stream(format!(
            "gateway answered CONNECT with {status} and no {RESULT_HEADER}: {message}"
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_labels_round_trip() {
        for code in [
            ResultCode::Accepted,
            ResultCode::UnknownService,
            ResultCode::Denied,
            ResultCode::NoHealthyEndpoint,
            ResultCode::Overloaded,
            ResultCode::Malformed,
        ] {
            assert_eq!(result_code_from_label(code.label()), Some(code));
        }
        assert_eq!(result_code_from_label("nope"), None);
    }

    #[test]
    fn authorities_are_hbone_style() {
        let mut target = Target {
            namespace: "demo".into(),
            service: "echo".into(),
            port: 80,
            cluster: None,
        };
        assert_eq!(
            connect_authority(&target),
            "echo.demo.svc.clusterset.local:80"
        );
        target.cluster = Some("east".into());
        assert_eq!(
            connect_authority(&target),
            "east.echo.demo.svc.clusterset.local:80"
        );
    }
}
