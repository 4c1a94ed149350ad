//! The east-west gateway on 127.0.0.1: a `west.example` workload tunnels through the
//! `east.example` gateway to TCP backends. Echo with 1 and 100 streams, a 1 GiB transfer
//! verified by checksum, half-close both ways, every refusal reason, policy denial, SVID
//! rotation under a live stream, drain, and a non-federated peer refused at the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::tunnel::{ResultCode, Target};
use isthmus_api::tunnel_client::{TunnelClient, TunnelClientOptions, TunnelError, send_raw_header};
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::{SpiffeId, SvidSource, TrustDomain, TrustStore};
use isthmus_gateway::config::{
    AllowRule, EndpointConfig, ExportedService, GatewayConfig, ServicePort,
};
use isthmus_gateway::server::{Gateway, GatewayIdentity};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub(crate) const GATEWAY_ID: &str = "spiffe://east.example/ns/isthmus-system/sa/eastwest-gateway";
pub(crate) const CLIENT_ID: &str = "spiffe://west.example/ns/demo/sa/client";

pub(crate) fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

pub(crate) fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

pub(crate) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A backend that echoes until EOF, then closes.
pub(crate) async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A backend that reads everything, then answers with the byte count and checksum.
async fn checksum_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut sum = Checksum::default();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sum.update(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(format!("{} {:016x}", sum.len, sum.value()).as_bytes())
                    .await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// Adler-style running checksum over 8-byte words (order-sensitive, cheap in debug builds).
#[derive(Default)]
struct Checksum {
    a: u64,
    b: u64,
    len: u64,
    pending: Vec<u8>,
}

impl Checksum {
    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let need = 8 - self.pending.len();
            let take = need.min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == 8 {
                let word = u64::from_le_bytes(self.pending[..].try_into().unwrap());
                self.word(word);
                self.pending.clear();
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    fn word(&mut self, w: u64) {
        self.a = self.a.wrapping_add(w);
        self.b = self.b.wrapping_add(self.a);
    }

    fn value(&self) -> u64 {
        let mut tail = [0u8; 8];
        tail[..self.pending.len()].copy_from_slice(&self.pending);
        self.a.wrapping_add(u64::from_le_bytes(tail)) ^ self.b.rotate_left(17)
    }
}

pub(crate) struct World {
    pub(crate) west: CertificateAuthority,
    pub(crate) east: CertificateAuthority,
    pub(crate) trust: TrustStore,
    pub(crate) gateway_svid: SvidSource,
}

impl World {
    pub(crate) fn new() -> Self {
        let west =
            CertificateAuthority::generate(td("west.example"), now(), DEFAULT_CA_TTL).unwrap();
        let east =
            CertificateAuthority::generate(td("east.example"), now(), DEFAULT_CA_TTL).unwrap();
        let trust = TrustStore::from_bundles([west.bundle(), east.bundle()]);
        let gateway_svid = SvidSource::new(
            east.issue_svid(&id(GATEWAY_ID), DEFAULT_LEAF_TTL, now())
                .unwrap(),
        )
        .unwrap();
        Self {
            west,
            east,
            trust,
            gateway_svid,
        }
    }

    pub(crate) fn config(&self, services: Vec<ExportedService>) -> GatewayConfig {
        GatewayConfig {
            trust_domain: Some(td("east.example")),
            cluster: "east".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            federated_trust_domains: vec![td("west.example")],
            services,
            ..GatewayConfig::default()
        }
    }

    pub(crate) async fn gateway(&self, config: &GatewayConfig) -> Gateway {
        Gateway::start(
            config,
            GatewayIdentity {
                svid: self.gateway_svid.clone(),
                trust: self.trust.clone(),
            },
        )
        .await
        .unwrap()
    }

    /// A client for `spiffe_id` (issued by `ca`) trusting `trust`, with `options`.
    pub(crate) fn client_with(
        &self,
        ca: &CertificateAuthority,
        spiffe_id: &str,
        trust: TrustStore,
        options: TunnelClientOptions,
    ) -> TunnelClient {
        let settings = MtlsSettings {
            svid: SvidSource::new(
                ca.issue_svid(&id(spiffe_id), DEFAULT_LEAF_TTL, now())
                    .unwrap(),
            )
            .unwrap(),
            trust,
            authorizer: Arc::new(AllowIds(vec![id(GATEWAY_ID)])),
            alpn: vec![],
            observer: None,
        };
        TunnelClient::new(&settings, "127.0.0.1:0".parse().unwrap(), options).unwrap()
    }

    fn client_as(
        &self,
        ca: &CertificateAuthority,
        spiffe_id: &str,
        trust: TrustStore,
    ) -> TunnelClient {
        self.client_with(ca, spiffe_id, trust, TunnelClientOptions::default())
    }

    fn client(&self) -> TunnelClient {
        self.client_as(&self.west, CLIENT_ID, self.trust.clone())
    }
}

pub(crate) fn service(name: &str, backend: SocketAddr, allow: Vec<AllowRule>) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
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
        allow,
    }
}

pub(crate) fn target(name: &str) -> Target {
    Target {
        namespace: "demo".into(),
        service: name.into(),
        port: 80,
        cluster: None,
    }
}

async fn echo_round(client: &TunnelClient, gateway: SocketAddr, payload: &[u8]) {
    let mut stream = client.open(gateway, target("echo")).await.unwrap();
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_one_and_a_hundred_streams() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let client = world.client();
    echo_round(&client, gateway.addr(), b"hello through the gateway").await;
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..100u32 {
        let (client, addr) = (client.clone(), gateway.addr());
        streams.spawn(async move {
            let payload: Vec<u8> = (0..4096u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            echo_round(&client, addr, &payload).await;
        });
    }
    while let Some(done) = streams.join_next().await {
        done.unwrap();
    }
    let metrics = gateway.metrics_text();
    assert!(metrics.contains("isthmus_gateway_streams_total{trust_domain=\"west.example\",result=\"accepted\",transport=\"quic\"} 101"), "{metrics}");
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_arrives_intact() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("sink", checksum_backend().await, vec![])]))
        .await;
    let client = world.client();
    let mut stream = client.open(gateway.addr(), target("sink")).await.unwrap();
    const TOTAL: u64 = 1 << 30;
    let block: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut sent = Checksum::default();
    let mut written = 0u64;
    let mut round = 0u8;
    while written < TOTAL {
        // Vary the block so a dropped or reordered chunk changes the checksum.
        let mut chunk = block.clone();
        chunk[0] = round;
        round = round.wrapping_add(1);
        sent.update(&chunk);
        stream.write_all(&chunk).await.unwrap();
        written += chunk.len() as u64;
    }
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, format!("{} {:016x}", TOTAL, sent.value()));
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_each_direction() {
    let world = World::new();
    // Backend A: reads to EOF, then answers (client half-closes first).
    let reader = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reader_addr = reader.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = reader.accept().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        tcp.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
    });
    // Backend B: speaks first and half-closes, then still reads what the client sends.
    let writer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let writer_addr = writer.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = writer.accept().await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        w.write_all(b"banner").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        tx.send(got).unwrap();
    });
    let gateway = world
        .gateway(&world.config(vec![
            service("reader", reader_addr, vec![]),
            service("writer", writer_addr, vec![]),
        ]))
        .await;
    let client = world.client();

    let mut a = client.open(gateway.addr(), target("reader")).await.unwrap();
    a.write_all(b"12345").await.unwrap();
    a.shutdown().await.unwrap();
    let mut answer = String::new();
    a.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 5 bytes");

    let mut b = client.open(gateway.addr(), target("writer")).await.unwrap();
    let mut banner = Vec::new();
    b.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner", "the backend's FIN reached the client");
    b.write_all(b"still open").await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap(),
        b"still open"
    );
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_reason_reaches_the_client() {
    let world = World::new();
    let echo = echo_backend().await;
    // A port nothing listens on.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut config = world.config(vec![
        service("echo", echo, vec![]),
        service(
            "private",
            echo,
            vec![AllowRule::SpiffeIdPrefix(id(
                "spiffe://west.example/ns/ops",
            ))],
        ),
        service("dead", dead, vec![]),
    ]);
    config.limits.max_streams_per_peer = 1;
    let gateway = world.gateway(&config).await;
    let client = world.client();
    let refusal = |r: Result<_, TunnelError>| r.map(|_| ()).unwrap_err();

    let e = refusal(client.open(gateway.addr(), target("nope")).await);
    assert_eq!(e.refusal(), Some(ResultCode::UnknownService), "{e}");
    let e = refusal(
        client
            .open(
                gateway.addr(),
                Target {
                    cluster: Some("west".into()),
                    ..target("echo")
                },
            )
            .await,
    );
    assert_eq!(e.refusal(), Some(ResultCode::UnknownService), "{e}");
    let e = refusal(
        client
            .open(
                gateway.addr(),
                Target {
                    port: 81,
                    ..target("echo")
                },
            )
            .await,
    );
    assert_eq!(e.refusal(), Some(ResultCode::UnknownService), "{e}");
    let e = refusal(client.open(gateway.addr(), target("private")).await);
    assert_eq!(e.refusal(), Some(ResultCode::Denied), "{e}");
    let e = refusal(client.open(gateway.addr(), target("dead")).await);
    assert_eq!(e.refusal(), Some(ResultCode::NoHealthyEndpoint), "{e}");
    // One stream per peer: a second one is refused while the first lives.
    let first = client.open(gateway.addr(), target("echo")).await.unwrap();
    let e = refusal(client.open(gateway.addr(), target("echo")).await);
    assert_eq!(e.refusal(), Some(ResultCode::Overloaded), "{e}");
    drop(first);
    // A malformed header (bad version) gets a typed answer too.
    let conn = client.connection(gateway.addr()).await.unwrap();
    let answer = send_raw_header(&conn, &[1, 0, 3, 0, 0, 0]).await.unwrap();
    assert_eq!(answer.code, ResultCode::Malformed);

    let metrics = gateway.metrics_text();
    for result in [
        "unknown_service",
        "denied",
        "no_healthy_endpoint",
        "overloaded",
        "malformed",
    ] {
        let line = format!(
            "isthmus_gateway_streams_total{{trust_domain=\"west.example\",result=\"{result}\",transport=\"quic\"}}"
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    // The endpoint that refused connections is ejected: a retry is refused without waiting.
    let e = refusal(client.open(gateway.addr(), target("dead")).await);
    assert_eq!(e.refusal(), Some(ResultCode::NoHealthyEndpoint));
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_by_id_prefix_and_trust_domain() {
    let world = World::new();
    let echo = echo_backend().await;
    let gateway = world
        .gateway(&world.config(vec![
            service(
                "echo",
                echo,
                vec![AllowRule::SpiffeIdPrefix(id(
                    "spiffe://west.example/ns/demo",
                ))],
            ),
            service(
                "other",
                echo,
                vec![AllowRule::TrustDomain(td("east.example"))],
            ),
        ]))
        .await;
    let client = world.client();
    echo_round(&client, gateway.addr(), b"allowed").await;
    let e = client
        .open(gateway.addr(), target("other"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.refusal(), Some(ResultCode::Denied));
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_keeps_live_streams() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let client = world.client();
    let mut live = client.open(gateway.addr(), target("echo")).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).await.unwrap();
    // The gateway's SVID rotates (new key, new certificate) under the live stream.
    let rotated = world
        .east
        .issue_svid(&id(GATEWAY_ID), DEFAULT_LEAF_TTL, now())
        .unwrap();
    world.gateway_svid.rotate(rotated.clone()).unwrap();
    live.write_all(b"after!").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    live.shutdown().await.unwrap();
    // A new connection presents the new certificate.
    let fresh = world.client();
    let conn = fresh.connection(gateway.addr()).await.unwrap();
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(certs[0], *rotated.leaf());
    client.close().await;
    fresh.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_streams_and_refuses_new_ones() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let addr = gateway.addr();
    let dispatcher = gateway.dispatcher().clone();
    let client = world.client();
    let mut live = client.open(addr, target("echo")).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let shutdown = tokio::spawn(gateway.shutdown(Duration::from_secs(10)));
    // Wait until draining has begun (the dispatcher refuses new streams).
    let mut refused = None;
    for _ in 0..100 {
        match client.open(addr, target("echo")).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(s) => {
                s.reset();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let refused = refused.expect("a new stream during the drain");
    assert_eq!(refused.refusal(), Some(ResultCode::Overloaded), "{refused}");
    // The in-flight stream still works and completes.
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    live.write_all(b"pong").await.unwrap();
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"pong");
    drop(live);
    let outcome = tokio::time::timeout(Duration::from_secs(15), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.is_complete(), "{outcome:?}");
    assert_eq!(dispatcher.active_streams(), 0);
    // New connections are refused after shutdown.
    let late = world.client();
    assert!(late.open(addr, target("echo")).await.is_err());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_unfederated_trust_domains_are_refused_at_the_handshake() {
    let world = World::new();
    let south = CertificateAuthority::generate(td("south.example"), now(), DEFAULT_CA_TTL).unwrap();
    // The gateway even holds south's bundle, but south is not a federated trust domain.
    world.trust.set(south.bundle());
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let intruder = world.client_as(
        &south,
        "spiffe://south.example/ns/demo/sa/client",
        world.trust.clone(),
    );
    let e = intruder
        .open(gateway.addr(), target("echo"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(e, TunnelError::Connect { .. } | TunnelError::Stream(_)),
        "{e}"
    );
    // Every handshake the intruder attempted (the client retries a fresh connection once) was
    // refused as unauthorized, and no stream of south.example was ever counted.
    let metrics = gateway.metrics_text();
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("isthmus_gateway_handshake_failures_total{reason=\"unauthorized\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
    assert!(!metrics.contains("south.example"), "{metrics}");
    // A west workload still gets in.
    let client = world.client();
    echo_round(&client, gateway.addr(), b"federated").await;
    intruder.close().await;
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}
