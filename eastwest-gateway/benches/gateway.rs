//! East-west gateway benchmark: client → gateway (QUIC, mTLS) → TCP backend on 127.0.0.1,
//! beside baselines measured in the same run: direct TCP to the backend, a TLS-over-TCP relay
//! built with the same rustls configuration (`isthmus_core::tls::server_config`), and raw quinn
//! streams with that configuration.
//!
//! Measures 1- and 64-stream bulk throughput, request/response latency (64 B and 1 KiB
//! ping-pong), new streams per second over a warm connection, full mTLS handshakes per second,
//! and the gateway's RSS per idle tunnelled connection at 10,000 connections. For the RSS
//! figure the gateway runs in a child process (this binary re-executed with
//! `--gateway-child`), so the client connections and the backend, which live in this process,
//! are not counted. Everything else runs in one process on one two-worker tokio runtime.
//!
//! ```text
//! cargo bench -p isthmus-gateway --bench gateway [-- --quick] [-- --only <section>]
//! ```
//! Sections: `throughput`, `latency`, `streams`, `handshakes`, `rss`. Results and the way to
//! read them are in docs/benchmarks.md.

use std::error::Error;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use isthmus_api::tunnel::{
    self, ALPN, MAX_RESPONSE_MESSAGE, ResultCode, StreamRequest, Target, decode_response,
    encode_request,
};
use isthmus_api::tunnel_client::{TunnelClient, TunnelClientOptions};
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::tls::{AllowIds, AllowTrustDomains, MtlsSettings};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore, X509Svid};
use isthmus_gateway::config::{
    EndpointConfig, ExportedService, GatewayConfig, LimitsConfig, ServicePort,
};
use isthmus_gateway::server::{Gateway, GatewayIdentity};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

type BoxError = Box<dyn Error + Send + Sync>;
type BenchResult<T> = Result<T, BoxError>;

const GATEWAY_ID: &str = "spiffe://east.example/ns/isthmus-system/sa/eastwest-gateway";
const CLIENT_ID: &str = "spiffe://west.example/ns/demo/sa/client";
const SERVER_NAME: &str = "isthmus-gateway.invalid";
const GIB: u64 = 1 << 30;
const BLOCK: usize = 64 * 1024;
/// Environment variables handing the gateway identity and backend to the child process.
const ENV_CHAIN: &str = "ISTHMUS_BENCH_GATEWAY_CHAIN";
const ENV_KEY: &str = "ISTHMUS_BENCH_GATEWAY_KEY";
const ENV_BUNDLES: &str = "ISTHMUS_BENCH_BUNDLES";
const ENV_BACKEND: &str = "ISTHMUS_BENCH_BACKEND";
/// Optional override of `limits.max_streams_per_connection` in the child (for the RSS study;
/// quinn allocates per-stream state for the whole stream limit of every connection).
const ENV_STREAMS_PER_CONNECTION: &str = "ISTHMUS_BENCH_MAX_STREAMS_PER_CONNECTION";

/// Sizes of one run: the full run or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Scale {
    bulk_bytes: u64,
    /// Rounds of the 1-stream measurement (the median is reported); 64 streams run once.
    bulk_rounds: usize,
    pings: usize,
    new_streams: usize,
    handshakes: usize,
    idle_connections: usize,
}

const FULL: Scale = Scale {
    bulk_bytes: GIB,
    bulk_rounds: 3,
    pings: 20_000,
    new_streams: 20_000,
    handshakes: 2_000,
    idle_connections: 10_000,
};

const QUICK: Scale = Scale {
    bulk_bytes: GIB / 8,
    bulk_rounds: 1,
    pings: 2_000,
    new_streams: 4_000,
    handshakes: 300,
    idle_connections: 1_000,
};

fn main() -> BenchResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--gateway-child") {
        return gateway_child();
    }
    let scale = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let only = value("--only");
    // For profiling one path: `--path gateway|direct|tls|quic` (the others report 0).
    let path = value("--path");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load_before = load_average();
    let report = runtime.block_on(run(scale, only.as_deref(), path.as_deref()))?;
    report.print(scale);
    println!(
        "\nCPU: {}; load average before {load_before}, after {}",
        cpu_model(),
        load_average()
    );
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default()
}

fn err(message: impl Into<String>) -> BoxError {
    message.into().into()
}

fn id(s: &str) -> BenchResult<SpiffeId> {
    Ok(SpiffeId::parse(s)?)
}

fn td(s: &str) -> BenchResult<TrustDomain> {
    Ok(TrustDomain::new(s)?)
}

// ---------------------------------------------------------------------------------------------
// Identities and TLS configuration, shared by the gateway and every baseline.

/// Two trust domains: the gateway's (`east.example`) and the client's (`west.example`).
struct Pki {
    trust: TrustStore,
    bundles: Vec<Bundle>,
    gateway_svid: X509Svid,
    client: MtlsSettings,
    server: MtlsSettings,
}

impl Pki {
    fn new() -> BenchResult<Self> {
        let now = time::OffsetDateTime::now_utc();
        let west = CertificateAuthority::generate(td("west.example")?, now, DEFAULT_CA_TTL)?;
        let east = CertificateAuthority::generate(td("east.example")?, now, DEFAULT_CA_TTL)?;
        let bundles = vec![west.bundle(), east.bundle()];
        let trust = TrustStore::from_bundles(bundles.clone());
        let gateway_svid = east.issue_svid(&id(GATEWAY_ID)?, DEFAULT_LEAF_TTL, now)?;
        let client = MtlsSettings {
            svid: SvidSource::new(west.issue_svid(&id(CLIENT_ID)?, DEFAULT_LEAF_TTL, now)?)?,
            trust: trust.clone(),
            authorizer: Arc::new(AllowIds(vec![id(GATEWAY_ID)?])),
            alpn: vec![ALPN.to_vec()],
            observer: None,
        };
        // What the gateway builds: own and federated trust domains admitted at the handshake.
        let server = MtlsSettings {
            svid: SvidSource::new(gateway_svid.clone())?,
            trust: trust.clone(),
            authorizer: Arc::new(AllowTrustDomains(vec![
                td("east.example")?,
                td("west.example")?,
            ])),
            alpn: vec![ALPN.to_vec()],
            observer: None,
        };
        Ok(Self {
            trust,
            bundles,
            gateway_svid,
            client,
            server,
        })
    }

    fn gateway_identity(&self) -> BenchResult<GatewayIdentity> {
        Ok(GatewayIdentity {
            svid: SvidSource::new(self.gateway_svid.clone())?,
            trust: self.trust.clone(),
        })
    }

    fn tunnel_client(&self) -> BenchResult<TunnelClient> {
        Ok(TunnelClient::new(
            &self.client,
            "127.0.0.1:0".parse()?,
            TunnelClientOptions::default(),
        )?)
    }

    /// The quinn client configuration the tunnel client builds, for raw quinn baselines and
    /// for clients that open many connections from one endpoint.
    fn quic_client_config(&self) -> BenchResult<quinn::ClientConfig> {
        let tls = isthmus_core::tls::client_config(&self.client)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let options = TunnelClientOptions::default();
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(options.keep_alive))
            .stream_receive_window(options.stream_window.into())
            .receive_window(options.connection_window.into())
            .send_window(u64::from(options.connection_window))
            .max_idle_timeout(Some(
                options.idle_timeout.try_into().map_err(|_| err("idle"))?,
            ));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// The quinn server configuration the gateway builds (same TLS, same default limits).
    fn quic_server_config(&self) -> BenchResult<quinn::ServerConfig> {
        let tls = isthmus_core::tls::server_config(&self.server)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let limits = LimitsConfig::default();
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(limits.max_streams_per_connection.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(limits.stream_window.into())
            .receive_window(limits.connection_window.into())
            .send_window(u64::from(limits.connection_window))
            .max_idle_timeout(Some(
                limits
                    .idle_timeout
                    .get()
                    .try_into()
                    .map_err(|_| err("idle"))?,
            ));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    fn tls_connector(&self) -> BenchResult<tokio_rustls::TlsConnector> {
        let config = isthmus_core::tls::client_config(&self.client)?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    fn tls_acceptor(&self) -> BenchResult<tokio_rustls::TlsAcceptor> {
        let config = isthmus_core::tls::server_config(&self.server)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

fn gateway_config(services: Vec<ExportedService>) -> BenchResult<GatewayConfig> {
    Ok(GatewayConfig {
        trust_domain: Some(td("east.example")?),
        cluster: "east".into(),
        listen: "127.0.0.1:0".parse()?,
        federated_trust_domains: vec![td("west.example")?],
        services,
        ..GatewayConfig::default()
    })
}

fn service(name: &str, backend: SocketAddr) -> ExportedService {
    ExportedService {
        namespace: "bench".into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: 80,
            target_port: Some(backend.port()),
            protocol: "TCP".into(),
        }],
        endpoints: vec![EndpointConfig {
            address: backend.ip(),
            ready: true,
        }],
        allow: vec![],
    }
}

fn target(name: &str) -> Target {
    Target {
        namespace: "bench".into(),
        service: name.into(),
        port: 80,
        cluster: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Backends and baselines.

/// What a TCP backend does with each connection.
#[derive(Debug, Clone, Copy)]
enum BackendKind {
    /// Reads to EOF, then answers with the byte count (8 bytes, big endian).
    Sink,
    /// Echoes until EOF.
    Echo,
    /// Accepts and closes at once.
    Close,
}

async fn tcp_backend(kind: BackendKind) -> BenchResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = serve_backend(kind, tcp).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_backend(kind: BackendKind, mut tcp: TcpStream) -> BenchResult<()> {
    tcp.set_nodelay(true)?;
    match kind {
        BackendKind::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match tcp.read(&mut buf).await? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            tcp.write_all(&total.to_be_bytes()).await?;
            tcp.shutdown().await?;
        }
        BackendKind::Echo => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tcp.read(&mut buf).await? {
                    0 => break,
                    n => tcp.write_all(&buf[..n]).await?,
                }
            }
            tcp.shutdown().await?;
        }
        BackendKind::Close => drop(tcp),
    }
    Ok(())
}

/// A TLS-over-TCP relay: terminates TLS with the gateway's rustls configuration, connects to
/// `backend` and copies both ways (one tunnelled connection per TCP connection).
async fn tls_relay(
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
) -> BenchResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = relay_one(acceptor, tcp, backend).await;
            });
        }
    });
    Ok(addr)
}

async fn relay_one(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    backend: SocketAddr,
) -> BenchResult<()> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let mut upstream = TcpStream::connect(backend).await?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut upstream, BLOCK, BLOCK).await?;
    Ok(())
}

/// A raw quinn server with the gateway's TLS and transport configuration. Each stream starts
/// with one mode byte: `S` (sink: read to FIN, answer the byte count) or `E` (echo).
fn raw_quic_server(pki: &Pki) -> BenchResult<SocketAddr> {
    let endpoint = quinn::Endpoint::server(pki.quic_server_config()?, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = raw_quic_stream(send, recv).await;
                    });
                }
            });
        }
    });
    Ok(addr)
}

async fn raw_quic_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> BenchResult<()> {
    let mut mode = [0u8; 1];
    recv.read_exact(&mut mode).await?;
    if mode[0] == b'S' {
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            total += chunk.bytes.len() as u64;
        }
        send.write_all(&total.to_be_bytes()).await?;
    } else {
        let mut buf = vec![0u8; 16 * 1024];
        while let Some(n) = recv.read(&mut buf).await? {
            send.write_all(&buf[..n]).await?;
        }
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// A quinn stream pair as one `AsyncRead + AsyncWrite`.
struct QuicDuplex {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl AsyncRead for QuicDuplex {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicDuplex {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

/// Opens a raw quinn stream in `mode` (`S` or `E`).
async fn raw_quic_open(conn: &quinn::Connection, mode: u8) -> BenchResult<QuicDuplex> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&[mode]).await?;
    Ok(QuicDuplex { send, recv })
}

async fn tls_open(
    connector: &tokio_rustls::TlsConnector,
    relay: SocketAddr,
) -> BenchResult<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(relay).await?;
    tcp.set_nodelay(true)?;
    Ok(connector
        .connect(ServerName::try_from(SERVER_NAME)?, tcp)
        .await?)
}

async fn tcp_open(addr: SocketAddr) -> BenchResult<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Everything the in-process measurements talk to.
struct Rig {
    pki: Pki,
    gateway: Gateway,
    client: TunnelClient,
    quic_endpoint: quinn::Endpoint,
    quic_config: quinn::ClientConfig,
    raw_quic: SocketAddr,
    raw_conn: quinn::Connection,
    tls: tokio_rustls::TlsConnector,
    sink: SocketAddr,
    echo: SocketAddr,
    relay_sink: SocketAddr,
    relay_echo: SocketAddr,
}

impl Rig {
    async fn new() -> BenchResult<Self> {
        let pki = Pki::new()?;
        let sink = tcp_backend(BackendKind::Sink).await?;
        let echo = tcp_backend(BackendKind::Echo).await?;
        // Separate backends for the connection-rate runs, so no destination runs out of
        // ephemeral ports to TIME_WAIT.
        let services = vec![
            service("sink", sink),
            service("echo", echo),
            service("rate-echo", tcp_backend(BackendKind::Echo).await?),
            service("rate-close", tcp_backend(BackendKind::Close).await?),
            service("hs-echo", tcp_backend(BackendKind::Echo).await?),
        ];
        let gateway = Gateway::start(&gateway_config(services)?, pki.gateway_identity()?).await?;
        let client = pki.tunnel_client()?;
        let quic_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let quic_config = pki.quic_client_config()?;
        let raw_quic = raw_quic_server(&pki)?;
        let raw_conn = quic_endpoint
            .connect_with(quic_config.clone(), raw_quic, SERVER_NAME)?
            .await?;
        let acceptor = pki.tls_acceptor()?;
        let relay_sink = tls_relay(acceptor.clone(), sink).await?;
        let relay_echo = tls_relay(acceptor, echo).await?;
        let tls = pki.tls_connector()?;
        Ok(Self {
            pki,
            gateway,
            client,
            quic_endpoint,
            quic_config,
            raw_quic,
            raw_conn,
            tls,
            sink,
            echo,
            relay_sink,
            relay_echo,
        })
    }

    fn gw(&self) -> SocketAddr {
        self.gateway.addr()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput.

/// The four paths every measurement compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Gateway,
    DirectTcp,
    TlsRelay,
    RawQuic,
}

const PATHS: [Path; 4] = [
    Path::Gateway,
    Path::DirectTcp,
    Path::TlsRelay,
    Path::RawQuic,
];

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Opens one connection or stream along `path` to the sink (`sink = true`) or the echo
/// backend.
async fn open(rig: &Rig, path: Path, sink: bool) -> BenchResult<Box<dyn Duplex>> {
    Ok(match path {
        Path::Gateway => Box::new(
            rig.client
                .open(rig.gw(), target(if sink { "sink" } else { "echo" }))
                .await?,
        ),
        Path::DirectTcp => Box::new(tcp_open(if sink { rig.sink } else { rig.echo }).await?),
        Path::TlsRelay => {
            Box::new(tls_open(&rig.tls, if sink { rig.relay_sink } else { rig.relay_echo }).await?)
        }
        Path::RawQuic => {
            Box::new(raw_quic_open(&rig.raw_conn, if sink { b'S' } else { b'E' }).await?)
        }
    })
}

/// Writes `bytes`, half-closes, and waits for the sink's byte count.
async fn bulk(mut stream: Box<dyn Duplex>, bytes: u64, block: Arc<Vec<u8>>) -> BenchResult<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        stream.write_all(&block[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).await?;
    if u64::from_be_bytes(ack) != bytes {
        return Err(err(format!(
            "sink got {} bytes, sent {bytes}",
            u64::from_be_bytes(ack)
        )));
    }
    Ok(())
}

/// Gbit/s moving `total` bytes over `streams` concurrent streams (opened before the clock).
async fn throughput(rig: &Rig, path: Path, streams: usize, total: u64) -> BenchResult<f64> {
    let block: Arc<Vec<u8>> = Arc::new((0..BLOCK).map(|i| (i * 7) as u8).collect());
    let mut opened = Vec::with_capacity(streams);
    for _ in 0..streams {
        opened.push(open(rig, path, true).await?);
    }
    let per_stream = total / streams as u64;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for stream in opened {
        set.spawn(bulk(stream, per_stream, block.clone()));
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok((per_stream * streams as u64 * 8) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// The median of `rounds` measurements.
async fn median<F, Fut>(rounds: usize, mut measure: F) -> BenchResult<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = BenchResult<f64>>,
{
    let mut values = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        values.push(measure().await?);
    }
    values.sort_by(f64::total_cmp);
    Ok(values[values.len() / 2])
}

// ---------------------------------------------------------------------------------------------
// 2. Latency.

/// p50 and p99 round trips, µs.
#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
}

async fn ping_pong(rig: &Rig, path: Path, size: usize, pings: usize) -> BenchResult<Percentiles> {
    let mut stream = open(rig, path, false).await?;
    let message: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut back = vec![0u8; size];
    let warmup = pings / 10;
    let mut samples = Vec::with_capacity(pings);
    for i in 0..warmup + pings {
        let start = Instant::now();
        stream.write_all(&message).await?;
        stream.flush().await?;
        stream.read_exact(&mut back).await?;
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    if back != message {
        return Err(err("echo mismatch"));
    }
    stream.shutdown().await?;
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok(Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    })
}

// ---------------------------------------------------------------------------------------------
// 3 and 4. New streams and new connections per second.

/// One unit of work of a rate measurement.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Tunnel stream on the warm connection, 1-byte echo, close.
    GatewayStreamEcho,
    /// Tunnel stream to a backend that accepts and closes at once.
    GatewayStreamClose,
    /// Raw quinn stream on a warm connection, 1-byte echo, close.
    RawQuicStreamEcho,
    /// New TCP connection to the backend, 1-byte echo, close.
    DirectTcpEcho,
    /// New QUIC connection to the gateway (full mTLS handshake), one tunnel stream with a
    /// 1-byte echo, close.
    GatewayHandshake,
    /// New raw quinn connection (full mTLS handshake), one stream with a 1-byte echo, close.
    RawQuicHandshake,
    /// New TCP connection and TLS handshake to the relay, 1-byte echo, close.
    TlsRelayHandshake,
}

async fn echo_one(mut stream: Box<dyn Duplex>) -> BenchResult<()> {
    stream.write_all(b"x").await?;
    stream.shutdown().await?;
    let mut back = Vec::with_capacity(1);
    stream.read_to_end(&mut back).await?;
    if back != b"x" {
        return Err(err(format!("echo answered {back:?}")));
    }
    Ok(())
}

/// A new connection to the gateway carrying one tunnel stream, as the tunnel client opens it.
async fn gateway_handshake(rig: &Rig, service: &str) -> BenchResult<()> {
    let conn = rig
        .quic_endpoint
        .connect_with(rig.quic_config.clone(), rig.gw(), SERVER_NAME)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_request(&StreamRequest {
        target: target(service),
        request_id: 1,
        traceparent: None,
    })?)
    .await?;
    let response =
        tunnel::read_header(&mut recv, 4 + MAX_RESPONSE_MESSAGE, decode_response).await?;
    if response.code != ResultCode::Accepted {
        return Err(err(format!("refused: {}", response.code)));
    }
    echo_one(Box::new(QuicDuplex { send, recv })).await?;
    conn.close(0u32.into(), b"done");
    Ok(())
}

async fn run_op(rig: &Rig, op: Op) -> BenchResult<()> {
    match op {
        Op::GatewayStreamEcho => {
            echo_one(Box::new(
                rig.client.open(rig.gw(), target("rate-echo")).await?,
            ))
            .await
        }
        Op::GatewayStreamClose => {
            let mut stream = rig.client.open(rig.gw(), target("rate-close")).await?;
            stream.shutdown().await?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await?;
            Ok(())
        }
        Op::RawQuicStreamEcho => {
            echo_one(Box::new(raw_quic_open(&rig.raw_conn, b'E').await?)).await
        }
        Op::DirectTcpEcho => echo_one(Box::new(tcp_open(rig.echo).await?)).await,
        Op::GatewayHandshake => gateway_handshake(rig, "hs-echo").await,
        Op::RawQuicHandshake => {
            let conn = rig
                .quic_endpoint
                .connect_with(rig.quic_config.clone(), rig.raw_quic, SERVER_NAME)?
                .await?;
            echo_one(Box::new(raw_quic_open(&conn, b'E').await?)).await?;
            conn.close(0u32.into(), b"done");
            Ok(())
        }
        Op::TlsRelayHandshake => {
            echo_one(Box::new(tls_open(&rig.tls, rig.relay_echo).await?)).await
        }
    }
}

/// Operations per second: `total` operations by `concurrency` workers, after a warm-up of a
/// tenth as many.
async fn rate(rig: &Arc<Rig>, op: Op, total: usize, concurrency: usize) -> BenchResult<f64> {
    let mut result = 0.0;
    for count in [total / 10, total] {
        let per_worker = count.div_ceil(concurrency);
        let start = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..concurrency {
            let rig = rig.clone();
            set.spawn(async move {
                for _ in 0..per_worker {
                    run_op(&rig, op).await?;
                }
                Ok::<_, BoxError>(())
            });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
        result = (per_worker * concurrency) as f64 / start.elapsed().as_secs_f64();
    }
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// 5. RSS per idle tunnelled connection (gateway in a child process).

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> BenchResult<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| {
            let pair = s.get(i..i + 2).ok_or_else(|| err("odd hex length"))?;
            Ok(u8::from_str_radix(pair, 16)?)
        })
        .collect()
}

fn env(name: &str) -> BenchResult<String> {
    std::env::var(name).map_err(|_| err(format!("{name} is not set")))
}

/// The child process: a gateway exporting `idle` → the parent's backend, with the per-peer
/// stream limit raised above the connection count. Prints its address, serves until stdin
/// closes.
fn gateway_child() -> BenchResult<()> {
    let svid = X509Svid::from_der(&from_hex(&env(ENV_CHAIN)?)?, &from_hex(&env(ENV_KEY)?)?)?;
    let mut bundles = Vec::new();
    for entry in env(ENV_BUNDLES)?.split(',') {
        let (name, der) = entry
            .split_once('=')
            .ok_or_else(|| err("bad bundle entry"))?;
        bundles.push(Bundle::from_der(td(name)?, &from_hex(der)?)?);
    }
    let backend: SocketAddr = env(ENV_BACKEND)?.parse()?;
    let mut config = gateway_config(vec![service("idle", backend)])?;
    config.limits.max_streams_per_peer = 1_000_000;
    config.limits.max_streams = 1_000_000;
    if let Ok(limit) = std::env::var(ENV_STREAMS_PER_CONNECTION) {
        config.limits.max_streams_per_connection = limit.parse()?;
    }
    let identity = GatewayIdentity {
        svid: SvidSource::new(svid)?,
        trust: TrustStore::from_bundles(bundles),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let gateway = runtime.block_on(Gateway::start(&config, identity))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", gateway.addr())?;
    stdout.flush()?;
    // The parent closes our stdin when it is done (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(gateway);
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The gateway child process; killed when dropped.
struct ChildGateway {
    child: Child,
    addr: SocketAddr,
}

impl ChildGateway {
    fn spawn(pki: &Pki, backend: SocketAddr) -> BenchResult<Self> {
        let bundles: Vec<String> = pki
            .bundles
            .iter()
            .map(|b| format!("{}={}", b.trust_domain().name(), to_hex(&b.to_der())))
            .collect();
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--gateway-child")
            .env(ENV_CHAIN, to_hex(&pki.gateway_svid.chain_der()))
            .env(ENV_KEY, to_hex(pki.gateway_svid.key().secret_pkcs8_der()))
            .env(ENV_BUNDLES, bundles.join(","))
            .env(ENV_BACKEND, backend.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| err("no child stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .parse()
            .map_err(|_| err(format!("child gateway said {line:?}")))?;
        Ok(Self { child, addr })
    }

    /// The child's resident set, KiB.
    fn rss_kib(&self) -> BenchResult<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| err("no VmRSS"))
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gateway RSS per idle connection (KiB) without a stream and with one idle tunnelled stream.
#[derive(Debug, Clone, Copy, Default)]
struct RssFigures {
    connections: usize,
    baseline_kib: u64,
    per_connection: f64,
    per_tunnelled_connection: f64,
}

/// Opens `n` connections to `gateway` from `endpoints`, `batch` at a time.
async fn connect_many(
    endpoints: &[quinn::Endpoint],
    config: &quinn::ClientConfig,
    gateway: SocketAddr,
    n: usize,
) -> BenchResult<Vec<quinn::Connection>> {
    let mut connections = Vec::with_capacity(n);
    while connections.len() < n {
        let mut set = JoinSet::new();
        for i in connections.len()..(connections.len() + 64).min(n) {
            let connecting = endpoints[i % endpoints.len()].connect_with(
                config.clone(),
                gateway,
                SERVER_NAME,
            )?;
            set.spawn(connecting);
        }
        while let Some(done) = set.join_next().await {
            connections.push(done??);
        }
    }
    Ok(connections)
}

/// Opens one idle tunnel stream (header, accepted, no payload) on each connection.
async fn idle_streams(
    connections: &[quinn::Connection],
) -> BenchResult<Vec<(quinn::SendStream, quinn::RecvStream)>> {
    let header = encode_request(&StreamRequest {
        target: target("idle"),
        request_id: 7,
        traceparent: None,
    })?;
    let mut streams = Vec::with_capacity(connections.len());
    for batch in connections.chunks(64) {
        let mut set = JoinSet::new();
        for conn in batch {
            let (conn, header) = (conn.clone(), header.clone());
            set.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&header).await?;
                let response =
                    tunnel::read_header(&mut recv, 4 + MAX_RESPONSE_MESSAGE, decode_response)
                        .await?;
                if response.code != ResultCode::Accepted {
                    return Err(err(format!("refused: {}", response.code)));
                }
                Ok::<_, BoxError>((send, recv))
            });
        }
        while let Some(done) = set.join_next().await {
            streams.push(done??);
        }
    }
    Ok(streams)
}

async fn settled_rss(child: &ChildGateway) -> BenchResult<u64> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    child.rss_kib()
}

async fn rss(n: usize) -> BenchResult<RssFigures> {
    let pki = Pki::new()?;
    let backend = tcp_backend(BackendKind::Echo).await?;
    let child = ChildGateway::spawn(&pki, backend)?;
    let config = pki.quic_client_config()?;
    let endpoints = (0..8)
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse()?).map_err(BoxError::from))
        .collect::<BenchResult<Vec<_>>>()?;
    // Warm up: one connection with one stream, so lazily built state is in the baseline.
    let warm = connect_many(&endpoints, &config, child.addr, 1).await?;
    let warm_streams = idle_streams(&warm).await?;
    let before = settled_rss(&child).await?;
    let connections = connect_many(&endpoints, &config, child.addr, n).await?;
    let with_connections = settled_rss(&child).await?;
    let streams = idle_streams(&connections).await?;
    let with_streams = settled_rss(&child).await?;
    drop((streams, warm_streams));
    for conn in connections.iter().chain(&warm) {
        conn.close(0u32.into(), b"done");
    }
    let kib = |after: u64, before: u64| after.saturating_sub(before) as f64 / n as f64;
    Ok(RssFigures {
        connections: n,
        baseline_kib: before,
        per_connection: kib(with_connections, before),
        per_tunnelled_connection: kib(with_streams, before),
    })
}

// ---------------------------------------------------------------------------------------------
// The run and the report.

/// Every figure of one run; `None` for sections not run.
#[derive(Debug, Default)]
struct Report {
    throughput_1: Option<[f64; 4]>,
    throughput_64: Option<[f64; 4]>,
    latency_64: Option<[Percentiles; 4]>,
    latency_1k: Option<[Percentiles; 4]>,
    streams: Option<[f64; 4]>,
    handshakes: Option<[f64; 3]>,
    rss: Option<RssFigures>,
}

fn wants(only: Option<&str>, section: &str) -> bool {
    only.is_none_or(|o| o == section)
}

fn paths(filter: Option<&str>) -> impl Iterator<Item = (usize, Path)> {
    PATHS.into_iter().enumerate().filter(move |(_, path)| {
        filter.is_none_or(|f| {
            f == match path {
                Path::Gateway => "gateway",
                Path::DirectTcp => "direct",
                Path::TlsRelay => "tls",
                Path::RawQuic => "quic",
            }
        })
    })
}

async fn run(scale: Scale, only: Option<&str>, path_filter: Option<&str>) -> BenchResult<Report> {
    isthmus_core::tls::install_default_provider();
    let rig = Arc::new(Rig::new().await?);
    let mut report = Report::default();
    if wants(only, "throughput") {
        let mut one = [0.0; 4];
        let mut many = [0.0; 4];
        for (i, path) in paths(path_filter) {
            eprintln!("throughput: {path:?}");
            throughput(&rig, path, 1, scale.bulk_bytes / 16).await?;
            one[i] = median(scale.bulk_rounds, || {
                throughput(&rig, path, 1, scale.bulk_bytes)
            })
            .await?;
            many[i] = throughput(&rig, path, 64, scale.bulk_bytes).await?;
        }
        report.throughput_1 = Some(one);
        report.throughput_64 = Some(many);
    }
    if wants(only, "latency") {
        let mut small = [Percentiles::default(); 4];
        let mut large = [Percentiles::default(); 4];
        for (i, path) in paths(path_filter) {
            eprintln!("latency: {path:?}");
            small[i] = ping_pong(&rig, path, 64, scale.pings).await?;
            large[i] = ping_pong(&rig, path, 1024, scale.pings).await?;
        }
        report.latency_64 = Some(small);
        report.latency_1k = Some(large);
    }
    if wants(only, "streams") {
        eprintln!("new streams");
        let mut streams = [0.0; 4];
        for (i, op) in [
            Op::GatewayStreamEcho,
            Op::GatewayStreamClose,
            Op::DirectTcpEcho,
            Op::RawQuicStreamEcho,
        ]
        .into_iter()
        .enumerate()
        {
            streams[i] = rate(&rig, op, scale.new_streams, 64).await?;
        }
        report.streams = Some(streams);
    }
    if wants(only, "handshakes") {
        eprintln!("handshakes");
        let mut handshakes = [0.0; 3];
        for (i, op) in [
            Op::GatewayHandshake,
            Op::TlsRelayHandshake,
            Op::RawQuicHandshake,
        ]
        .into_iter()
        .enumerate()
        {
            handshakes[i] = rate(&rig, op, scale.handshakes, 16).await?;
        }
        report.handshakes = Some(handshakes);
    }
    if let Ok(rig) = Arc::try_unwrap(rig) {
        rig.client.close().await;
        rig.gateway.shutdown(Duration::from_secs(1)).await;
        drop(rig.pki);
    }
    if wants(only, "rss") {
        eprintln!("rss: {} connections", scale.idle_connections);
        report.rss = Some(rss(scale.idle_connections).await?);
    }
    Ok(report)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

impl Report {
    fn print(&self, scale: Scale) {
        println!(
            "\n| Measurement | Gateway (client → gateway → backend) | Direct TCP | TLS-over-TCP relay | Raw quinn |"
        );
        println!("|---|---:|---:|---:|---:|");
        let row = |name: &str, v: [String; 4]| {
            println!("| {name} | {} | {} | {} | {} |", v[0], v[1], v[2], v[3])
        };
        let gbit = |v: &[f64; 4]| v.map(|x| format!("{x:.2}"));
        let mib = scale.bulk_bytes >> 20;
        if let Some(v) = &self.throughput_1 {
            row(
                &format!("Throughput, 1 stream, {mib} MiB upload (Gbit/s)"),
                gbit(v),
            );
        }
        if let Some(v) = &self.throughput_64 {
            row(
                &format!("Throughput, 64 streams, {mib} MiB total (Gbit/s)"),
                gbit(v),
            );
        }
        for (size, lat) in [("64 B", &self.latency_64), ("1 KiB", &self.latency_1k)] {
            if let Some(v) = lat {
                row(
                    &format!("Round trip {size}, p50 (µs)"),
                    v.map(|p| format!("{:.1}", p.p50)),
                );
                row(
                    &format!("Round trip {size}, p99 (µs)"),
                    v.map(|p| format!("{:.1}", p.p99)),
                );
            }
        }
        if let Some(v) = &self.streams {
            let f = |x: f64| format!("{x:.0}");
            row(
                "New streams/s, 1-byte echo (gateway/raw quinn: warm connection; TCP: new connection)",
                [f(v[0]), f(v[2]), "—".into(), f(v[3])],
            );
            row(
                "New streams/s, backend accepts and closes at once",
                [f(v[1]), "—".into(), "—".into(), "—".into()],
            );
        }
        if let Some(v) = &self.handshakes {
            let f = |x: f64| format!("{x:.0}");
            row(
                "Full mTLS handshakes/s (new connection, one 1-byte echo)",
                [f(v[0]), "—".into(), f(v[1]), f(v[2])],
            );
        }
        if let Some(r) = &self.rss {
            row(
                &format!(
                    "Gateway RSS per idle connection, no stream ({} conns, KiB)",
                    r.connections
                ),
                [
                    format!("{:.2}", r.per_connection),
                    "—".into(),
                    "—".into(),
                    "—".into(),
                ],
            );
            row(
                &format!(
                    "Gateway RSS per idle tunnelled connection ({} conns, KiB)",
                    r.connections
                ),
                [
                    format!("{:.2}", r.per_tunnelled_connection),
                    "—".into(),
                    "—".into(),
                    "—".into(),
                ],
            );
        }
        self.print_targets();
    }

    fn print_targets(&self) {
        println!("\nTargets:");
        if let Some(v) = &self.throughput_1 {
            let ratio = v[0] / v[3];
            println!(
                "- 1-stream throughput ≥ 80% of raw quinn: {:.0}% ({:.2} / {:.2} Gbit/s): {}",
                ratio * 100.0,
                v[0],
                v[3],
                verdict(ratio >= 0.8)
            );
        }
        for (size, lat) in [("64 B", &self.latency_64), ("1 KiB", &self.latency_1k)] {
            if let Some(v) = lat {
                let (p50, p99) = (v[0].p50 - v[1].p50, v[0].p99 - v[1].p99);
                println!(
                    "- added latency {size}: p50 +{p50:.1} µs (≤ +50): {}; p99 +{p99:.1} µs (≤ +80): {}",
                    verdict(p50 <= 50.0),
                    verdict(p99 <= 80.0)
                );
            }
        }
        if let Some(v) = &self.streams {
            println!(
                "- new streams/s over a warm connection ≥ 20,000: {:.0} with an echo, {:.0} with a backend that closes at once: {}",
                v[0],
                v[1],
                verdict(v[0] >= 20_000.0)
            );
        }
        if let Some(r) = &self.rss {
            println!(
                "- ≤ 6 KiB per idle tunnelled connection: {:.2} KiB ({:.2} connection + {:.2} stream; gateway baseline {} KiB): {}",
                r.per_tunnelled_connection,
                r.per_connection,
                r.per_tunnelled_connection - r.per_connection,
                r.baseline_kib,
                verdict(r.per_tunnelled_connection <= 6.0)
            );
        }
    }
}
