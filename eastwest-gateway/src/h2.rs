//! The TCP fallback front end, for peers whose UDP is blocked: TLS 1.3 with the same SVID and
//! verifiers as QUIC (ALPN `h2`), then HTTP/2 where each `CONNECT` stream carries one TCP
//! connection. The `:authority` names the target HBONE-style,
//! `[<cluster>.]<service>.<namespace>.svc.clusterset.local:<port>` ([`parse_authority`]); the
//! stream then goes through the same [`Dispatcher::open`] as QUIC (policy, limits,
//! forwarding). Refusals are HTTP statuses with an `isthmus-result` header naming the
//! [`ResultCode`] and the detail as body.
//!
//! Differences from QUIC: a reset of the tunnelled connection reaches the other side as a
//! close (hyper delivers `RST_STREAM(CANCEL)` on a `CONNECT` stream as end of stream), and
//! there is no per-connection idle timeout beyond HTTP/2 keep-alive pings.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use isthmus_api::tunnel::{ResultCode, Target, is_dns_label};
use isthmus_api::tunnel_client::{
    AUTHORITY_SUFFIX, REQUEST_ID_HEADER, RESULT_HEADER, TRACEPARENT_HEADER,
};
use isthmus_core::SpiffeId;
use isthmus_core::lifecycle::DrainWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::dispatch::{Backend, Dispatcher, Refusal};
use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::server::GatewayError;

/// The transport label of this front end in [`GatewayMetrics`].
const TRANSPORT: &str = "h2";
/// HTTP/2 frames of up to 64 KiB: fewer frames per bulk transfer than the 16 KiB default.
const MAX_FRAME: u32 = 64 * 1024;
/// Relay buffer per direction of one stream.
const RELAY_BUFFER: usize = 64 * 1024;

/// Why a `CONNECT` authority does not name a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// The request has no `:authority`.
    #[error("CONNECT request without :authority")]
    Missing,
    /// No `:<port>` (or a port that is not a number from 1 to 65535).
    #[error("authority {0:?} has no valid port")]
    BadPort(String),
    /// The host is not `[<cluster>.]<service>.<namespace>.svc.clusterset.local`.
    #[error("authority host {0:?} is not [<cluster>.]<service>.<namespace>.svc.clusterset.local")]
    BadHost(String),
    /// A label is not a DNS label.
    #[error("{field} {value:?} in the authority is not a DNS label")]
    BadName {
        /// Which label.
        field: &'static str,
        /// The offending value.
        value: String,
    },
}

/// Parses a `CONNECT` `:authority`, `[<cluster>.]<service>.<namespace>.svc.clusterset.local:<port>`
/// (case-insensitive, as DNS names are), into a target. Pure and bounded by the input.
pub fn parse_authority(authority: &str) -> Result<Target, AuthorityError> {
    let (host, digits) = authority
        .rsplit_once(':')
        .ok_or_else(|| AuthorityError::BadPort(authority.to_owned()))?;
    let port = match digits.parse::<u16>() {
        Ok(port) if port != 0 && digits.bytes().all(|b| b.is_ascii_digit()) => port,
        _ => return Err(AuthorityError::BadPort(authority.to_owned())),
    };
    let host = host.to_ascii_lowercase();
    let bad_host = || AuthorityError::BadHost(host.clone());
    let prefix = host
        .strip_suffix(AUTHORITY_SUFFIX)
        .and_then(|p| p.strip_suffix('.'))
        .ok_or_else(bad_host)?;
    let labels: Vec<&str> = prefix.split('.').collect();
    let (cluster, service, namespace) = match labels.as_slice() {
        [service, namespace] => (None, *service, *namespace),
        [cluster, service, namespace] => (Some(*cluster), *service, *namespace),
        _ => return Err(bad_host()),
    };
    let label = |field: &'static str, value: &str| {
        if is_dns_label(value) {
            Ok(value.to_owned())
        } else {
            Err(AuthorityError::BadName {
                field,
                value: value.to_owned(),
            })
        }
    };
    Ok(Target {
        namespace: label("namespace", namespace)?,
        service: label("service", service)?,
        port,
        cluster: cluster.map(|c| label("cluster", c)).transpose()?,
    })
}

/// The HTTP status of a refusal. `Overloaded` is 429 (too many streams from this peer or in
/// total) or 503 while the gateway drains.
fn status_of(code: ResultCode, draining: bool) -> StatusCode {
    match code {
        ResultCode::Accepted => StatusCode::OK,
        ResultCode::UnknownService => StatusCode::NOT_FOUND,
        ResultCode::Denied => StatusCode::FORBIDDEN,
        ResultCode::NoHealthyEndpoint => StatusCode::SERVICE_UNAVAILABLE,
        ResultCode::Overloaded if draining => StatusCode::SERVICE_UNAVAILABLE,
        ResultCode::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ResultCode::Malformed => StatusCode::BAD_REQUEST,
    }
}

fn respond(status: StatusCode, code: ResultCode, message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        RESULT_HEADER,
        header::HeaderValue::from_static(code.label()),
    );
    response
}

/// Binds the fallback's TCP listener on `addr` (the QUIC socket's IP and actual port).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Listen {
            address: addr,
            source,
        })
}

/// Accepts TLS connections until the drain starts, then stops listening (dropping `drain`)
/// while connections already accepted keep serving: their in-flight streams finish and new
/// `CONNECT`s get a typed 503, as on QUIC. `Gateway::shutdown` aborts this task, and with it
/// every connection, once the dispatcher is idle or the deadline passed.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dispatcher: Dispatcher,
    drain: DrainWatch,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let draining = Arc::new(AtomicBool::new(false));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    connections.spawn(serve_connection(
                        tcp,
                        remote,
                        acceptor.clone(),
                        dispatcher.clone(),
                        draining.clone(),
                    ));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    draining.store(true, Ordering::Relaxed);
    drop(listener);
    drop(drain);
    tracing::debug!(
        connections = connections.len(),
        "HTTP/2 fallback stopped accepting"
    );
    while connections.join_next().await.is_some() {}
}

/// Decrements the open-connection gauge however the connection task ends (even aborted).
struct ConnectionGauge(GatewayMetrics);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.active_connections.dec();
    }
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    dispatcher: Dispatcher,
    draining: Arc<AtomicBool>,
) {
    let _ = tcp.set_nodelay(true);
    let limits = dispatcher.limits().clone();
    // The header timeout also bounds the TLS handshake: a silent peer cannot hold a task.
    let tls = match tokio::time::timeout(limits.header_timeout.get(), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, remote = %remote, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(remote = %remote, "TLS handshake timed out");
            return;
        }
    };
    let Some(peer) =
        isthmus_core::tls::peer_id(tls.get_ref().1.peer_certificates().unwrap_or_default())
    else {
        tracing::debug!(remote = %remote, "no SPIFFE ID in the client certificate");
        return;
    };
    let metrics = dispatcher.metrics().clone();
    metrics
        .connections
        .get_or_create(&PeerLabels {
            trust_domain: peer.trust_domain_name().to_owned(),
        })
        .inc();
    metrics.active_connections.inc();
    let _gauge = ConnectionGauge(metrics);
    tracing::debug!(peer = %peer, remote = %remote, "HTTP/2 connection accepted");
    let streams = Arc::new(StreamContext {
        dispatcher,
        peer: peer.clone(),
        draining,
    });
    let service = hyper::service::service_fn(move |request| {
        let streams = streams.clone();
        async move { Ok::<_, Infallible>(streams.handle(request).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_frame_size(MAX_FRAME)
        // Dead peers are found by pings; half the idle timeout leaves room for one lost ping.
        .keep_alive_interval(limits.idle_timeout.get() / 2)
        .keep_alive_timeout(limits.header_timeout.get())
        .auto_date_header(false);
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(peer = %peer, remote = %remote, error = %e, "HTTP/2 connection ended");
    }
}

/// What every stream of one connection shares.
struct StreamContext {
    dispatcher: Dispatcher,
    peer: SpiffeId,
    draining: Arc<AtomicBool>,
}

impl StreamContext {
    async fn handle(&self, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
        let metrics = self.dispatcher.metrics();
        let td = self.peer.trust_domain_name();
        if request.method() != Method::CONNECT {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"the isthmus gateway only tunnels CONNECT requests",
            )));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("CONNECT"));
            return response;
        }
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u128::from_str_radix(v, 16).ok())
            .unwrap_or_default();
        let traceparent = request
            .headers()
            .get(TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let target = match request
            .uri()
            .authority()
            .ok_or(AuthorityError::Missing)
            .and_then(|a| parse_authority(a.as_str()))
        {
            Ok(target) => target,
            Err(e) => {
                tracing::info!(peer = %self.peer, request_id, error = %e, "stream refused: malformed authority");
                metrics.stream(td, ResultCode::Malformed.label(), TRANSPORT);
                return respond(
                    StatusCode::BAD_REQUEST,
                    ResultCode::Malformed,
                    e.to_string(),
                );
            }
        };
        let backend = match self.dispatcher.open(&self.peer, &target).await {
            Ok(backend) => backend,
            Err(Refusal { code, message }) => {
                tracing::info!(peer = %self.peer, target = %target, request_id, traceparent, result = code.label(), reason = %message, transport = TRANSPORT, "stream refused");
                metrics.stream(td, code.label(), TRANSPORT);
                let status = status_of(
                    code,
                    self.draining.load(Ordering::Relaxed) || self.dispatcher.is_draining(),
                );
                return respond(status, code, message);
            }
        };
        metrics.stream(td, ResultCode::Accepted.label(), TRANSPORT);
        tracing::debug!(peer = %self.peer, target = %target, endpoint = %backend.endpoint, request_id, traceparent, transport = TRANSPORT, "stream accepted");
        // The upgrade resolves once hyper has sent the 200 below.
        let upgrade = hyper::upgrade::on(&mut request);
        let metrics = metrics.clone();
        let peer = self.peer.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => splice(TokioIo::new(upgraded), backend, &metrics).await,
                Err(e) => tracing::debug!(peer = %peer, error = %e, "CONNECT upgrade failed"),
            }
        });
        respond(StatusCode::OK, ResultCode::Accepted, String::new())
    }
}

/// Relays bytes both ways. End of stream maps to a TCP half-close in each direction; an
/// error on either side aborts both (the backend sees a reset).
async fn splice<C>(client: C, backend: Backend, metrics: &GatewayMetrics)
where
    C: AsyncRead + AsyncWrite,
{
    let Backend {
        stream,
        guard: _slots,
        ..
    } = backend;
    let (mut from_backend, mut to_backend) = stream.into_split();
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (to_backend_bytes, to_client_bytes) = metrics.byte_counters();
    let upstream = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            match from_client.read(&mut buf).await {
                // END_STREAM from the client: half-close towards the backend.
                Ok(0) => {
                    let _ = to_backend.shutdown().await;
                    return Ok(());
                }
                Ok(n) => {
                    to_backend_bytes.inc_by(n as u64);
                    to_backend.write_all(&buf[..n]).await?;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            match from_backend.read(&mut buf).await {
                // FIN from the backend: END_STREAM towards the client (waits until hyper has
                // taken every byte written before it).
                Ok(0) => return to_client.shutdown().await,
                Ok(n) => {
                    to_client_bytes.inc_by(n as u64);
                    to_client.write_all(&buf[..n]).await?;
                }
                Err(e) => return Err(e),
            }
        }
    };
    if let Err(e) = tokio::try_join!(upstream, downstream) {
        tracing::debug!(error = %e, "HTTP/2 stream aborted");
        if let Ok(stream) = from_backend.reunite(to_backend) {
            abort(&stream);
        }
    }
}

/// Makes dropping `stream` send a TCP reset instead of a FIN.
#[expect(
    deprecated,
    reason = "SO_LINGER with a zero timeout sends RST on close and never blocks the thread"
)]
fn abort(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::tunnel_client::connect_authority;

    fn target(cluster: Option<&str>) -> Target {
        Target {
            namespace: "demo".into(),
            service: "echo".into(),
            port: 8080,
            cluster: cluster.map(str::to_owned),
        }
    }

    #[test]
    fn parses_service_and_cluster_pinned_authorities() {
        assert_eq!(
            parse_authority("echo.demo.svc.clusterset.local:8080"),
            Ok(target(None))
        );
        assert_eq!(
            parse_authority("east.echo.demo.svc.clusterset.local:8080"),
            Ok(target(Some("east")))
        );
        assert_eq!(
            parse_authority("Echo.DEMO.svc.ClusterSet.local:8080"),
            Ok(target(None)),
            "DNS names are case-insensitive"
        );
    }

    #[test]
    fn round_trips_with_the_client_encoder() {
        for t in [target(None), target(Some("west-2"))] {
            assert_eq!(parse_authority(&connect_authority(&t)), Ok(t));
        }
    }

    #[test]
    fn rejects_malformed_authorities() {
        let bad_port = [
            "echo.demo.svc.clusterset.local",
            "echo.demo.svc.clusterset.local:0",
            "echo.demo.svc.clusterset.local:65536",
            "echo.demo.svc.clusterset.local:+80",
            "echo.demo.svc.clusterset.local:",
        ];
        for a in bad_port {
            assert!(
                matches!(parse_authority(a), Err(AuthorityError::BadPort(_))),
                "{a}"
            );
        }
        let bad_host = [
            "echo.svc.clusterset.local:80",
            "a.b.echo.demo.svc.clusterset.local:80",
            "echo.demo.svc.cluster.local:80",
            "echo.demosvc.clusterset.local:80",
            "[::1]:80",
            "svc.clusterset.local:80",
        ];
        for a in bad_host {
            assert!(
                matches!(parse_authority(a), Err(AuthorityError::BadHost(_))),
                "{a}"
            );
        }
        assert!(matches!(
            parse_authority("ec_ho.demo.svc.clusterset.local:80"),
            Err(AuthorityError::BadName {
                field: "service",
                ..
            })
        ));
        assert!(matches!(
            parse_authority(".demo.svc.clusterset.local:80"),
            Err(AuthorityError::BadName {
                field: "service",
                ..
            })
        ));
    }

    #[test]
    fn refusals_map_to_http_statuses() {
        assert_eq!(status_of(ResultCode::UnknownService, false), 404);
        assert_eq!(status_of(ResultCode::Denied, false), 403);
        assert_eq!(status_of(ResultCode::NoHealthyEndpoint, false), 503);
        assert_eq!(status_of(ResultCode::Overloaded, false), 429);
        assert_eq!(status_of(ResultCode::Overloaded, true), 503);
        assert_eq!(status_of(ResultCode::Malformed, false), 400);
    }
}
