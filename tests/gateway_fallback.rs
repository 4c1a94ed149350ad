//! The gateway's TCP fallback on 127.0.0.1: TLS with the gateway SVID plus HTTP/2 `CONNECT`
//! on the TCP twin of the QUIC port. Auto fallback after a QUIC timeout and its memory, QUIC-only
//! not falling back, refusals mapped back to result codes, half-close both ways, a 96 MiB echo
//! through the HTTP/2 windows, a non-federated peer refused at the TLS handshake, and drain.
//!
//! "UDP unavailable" without privileges: the client dials a port number whose UDP side is a
//! plain socket that never answers (QUIC handshakes time out) and whose TCP side is a byte
//! relay to the gateway's TCP listener. The relay only copies bytes, so TLS and HTTP/2 run end
//! to end between client and gateway; no seam in the gateway or the client is needed.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_api::tunnel::{ResultCode, Target};
use isthmus_api::tunnel_client::{
    Transport, TransportPolicy, TunnelClient, TunnelClientOptions, TunnelError,
};
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL};
use isthmus_gateway::config::AllowRule;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::gateway::{CLIENT_ID, World, echo_backend, id, now, service, target, td};

/// A port number whose UDP side swallows every datagram and whose TCP side relays to
/// `gateway`'s TCP fallback. Returns the address and the black-hole socket (keep it alive).
async fn udp_blackhole_with_tcp_relay(gateway: SocketAddr) -> (SocketAddr, std::net::UdpSocket) {
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        // The TCP twin of a random UDP port may be taken: try another.
        let Ok(listener) = TcpListener::bind(addr).await else {
            continue;
        };
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(gateway).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        return (addr, udp);
    }
    panic!("no free UDP/TCP port pair on 127.0.0.1");
}

/// A west workload client with `transport`.
fn west_client(world: &World, transport: TransportPolicy) -> TunnelClient {
    world.client_with(
        &world.west,
        CLIENT_ID,
        world.trust.clone(),
        options(transport),
    )
}

/// A client for any identity with explicit options.
fn client_as(
    world: &World,
    ca: &CertificateAuthority,
    spiffe_id: &str,
    options: TunnelClientOptions,
) -> TunnelClient {
    world.client_with(ca, spiffe_id, world.trust.clone(), options)
}

fn options(transport: TransportPolicy) -> TunnelClientOptions {
    TunnelClientOptions {
        // Short: the fallback test waits for one QUIC timeout.
        handshake_timeout: Duration::from_millis(500),
        transport,
        ..TunnelClientOptions::default()
    }
}

async fn echo_round(client: &TunnelClient, gateway: SocketAddr, payload: &[u8]) -> Transport {
    let mut stream = client.open(gateway, target("echo")).await.unwrap();
    let transport = stream.transport();
    stream.write_all(payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload);
    transport
}

fn refusal(result: Result<isthmus_api::tunnel_client::TunnelStream, TunnelError>) -> TunnelError {
    result.map(|_| ()).unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_is_unavailable_and_remembers() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let (blocked, _blackhole) = udp_blackhole_with_tcp_relay(gateway.addr()).await;
    let client = west_client(&world, TransportPolicy::Auto);
    assert_eq!(client.quic_retry_at(blocked), None);

    let transport = echo_round(&client, blocked, b"over TCP after the QUIC timeout").await;
    assert_eq!(transport, Transport::H2);
    let remembered = client
        .quic_retry_at(blocked)
        .expect("the QUIC failure is remembered");

    // The second open goes straight to TCP: a new QUIC attempt would have timed out and
    // moved the remembered instant.
    let transport = echo_round(&client, blocked, b"straight to TCP").await;
    assert_eq!(transport, Transport::H2);
    assert_eq!(client.quic_retry_at(blocked), Some(remembered));

    // Many streams share the one HTTP/2 connection.
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..20u32 {
        let client = client.clone();
        streams.spawn(async move {
            let payload: Vec<u8> = (0..8192u32).map(|j| (i ^ j) as u8).collect();
            echo_round(&client, blocked, &payload).await
        });
    }
    while let Some(done) = streams.join_next().await {
        assert_eq!(done.unwrap(), Transport::H2);
    }

    // The same gateway, reachable over UDP, is used over QUIC.
    assert_eq!(
        echo_round(&client, gateway.addr(), b"quic").await,
        Transport::Quic
    );
    assert_eq!(client.quic_retry_at(gateway.addr()), None);

    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains("isthmus_gateway_streams_total{trust_domain=\"west.example\",result=\"accepted\",transport=\"h2\"} 22"),
        "{metrics}"
    );
    assert!(
        metrics.contains("isthmus_gateway_connections_total{trust_domain=\"west.example\"} 2"),
        "one HTTP/2 and one QUIC connection:\n{metrics}"
    );
    assert!(metrics.contains("isthmus_gateway_bytes_total{direction=\"to_backend\"}"));
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_only_does_not_fall_back() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let (blocked, _blackhole) = udp_blackhole_with_tcp_relay(gateway.addr()).await;
    let client = west_client(&world, TransportPolicy::QuicOnly);
    let e = refusal(client.open(blocked, target("echo")).await);
    assert!(matches!(e, TunnelError::Connect { .. }), "{e}");
    assert_eq!(client.quic_retry_at(blocked), None);
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_h2_carry_the_result_code() {
    let world = World::new();
    let echo = echo_backend().await;
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
    let client = west_client(&world, TransportPolicy::TcpOnly);
    let addr = gateway.addr();

    let e = refusal(client.open(addr, target("nope")).await);
    assert_eq!(e.refusal(), Some(ResultCode::UnknownService), "{e}");
    assert!(e.to_string().contains("demo/nope is not exported"), "{e}");
    let pinned_elsewhere = Target {
        cluster: Some("west".into()),
        ..target("echo")
    };
    let e = refusal(client.open(addr, pinned_elsewhere).await);
    assert_eq!(e.refusal(), Some(ResultCode::UnknownService), "{e}");
    let e = refusal(client.open(addr, target("private")).await);
    assert_eq!(e.refusal(), Some(ResultCode::Denied), "{e}");
    let e = refusal(client.open(addr, target("dead")).await);
    assert_eq!(e.refusal(), Some(ResultCode::NoHealthyEndpoint), "{e}");
    let first = client.open(addr, target("echo")).await.unwrap();
    assert_eq!(first.transport(), Transport::H2);
    let e = refusal(client.open(addr, target("echo")).await);
    assert_eq!(e.refusal(), Some(ResultCode::Overloaded), "{e}");
    drop(first);
    // A cluster pin naming this cluster is accepted over HTTP/2 too.
    let mut pinned_here = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match client
                .open(
                    addr,
                    Target {
                        cluster: Some("east".into()),
                        ..target("echo")
                    },
                )
                .await
            {
                Ok(stream) => break stream,
                // The dropped stream's slot is released once the gateway saw it end.
                Err(e) if e.refusal() == Some(ResultCode::Overloaded) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    pinned_here.write_all(b"pinned").await.unwrap();
    pinned_here.shutdown().await.unwrap();
    let mut back = Vec::new();
    pinned_here.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"pinned");

    let metrics = gateway.metrics_text();
    for result in [
        "accepted",
        "unknown_service",
        "denied",
        "no_healthy_endpoint",
        "overloaded",
    ] {
        let line = format!(
            "isthmus_gateway_streams_total{{trust_domain=\"west.example\",result=\"{result}\",transport=\"h2\"}}"
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_each_direction_over_h2() {
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
    let client = west_client(&world, TransportPolicy::TcpOnly);

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
async fn unfederated_peers_are_refused_at_the_tls_handshake_over_tcp() {
    let world = World::new();
    let south = CertificateAuthority::generate(td("south.example"), now(), DEFAULT_CA_TTL).unwrap();
    // The gateway even holds south's bundle, but south is not a federated trust domain.
    world.trust.set(south.bundle());
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let intruder = client_as(
        &world,
        &south,
        "spiffe://south.example/ns/demo/sa/client",
        options(TransportPolicy::TcpOnly),
    );
    let e = refusal(intruder.open(gateway.addr(), target("echo")).await);
    assert!(matches!(e, TunnelError::Connect { .. }), "{e}");
    let metrics = gateway.metrics_text();
    assert!(
        metrics.contains("isthmus_gateway_handshake_failures_total{reason=\"unauthorized\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("south.example"),
        "no connection or stream was counted for the intruder:\n{metrics}"
    );
    // A west workload still gets in over TCP.
    let client = west_client(&world, TransportPolicy::TcpOnly);
    assert_eq!(
        echo_round(&client, gateway.addr(), b"federated").await,
        Transport::H2
    );
    intruder.close().await;
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_h2_streams_and_refuses_new_ones() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let addr = gateway.addr();
    let client = west_client(&world, TransportPolicy::TcpOnly);
    let mut live = client.open(addr, target("echo")).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let shutdown = tokio::spawn(gateway.shutdown(Duration::from_secs(10)));
    // New streams on the existing HTTP/2 connection get a typed refusal once draining began.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match client.open(addr, target("echo")).await {
                Err(e) => break e,
                Ok(s) => {
                    drop(s);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.refusal(), Some(ResultCode::Overloaded), "{refused}");
    // New TCP connections are not accepted.
    let late = west_client(&world, TransportPolicy::TcpOnly);
    let e = refusal(late.open(addr, target("echo")).await);
    assert!(matches!(e, TunnelError::Connect { .. }), "{e}");
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
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_over_h2_respects_flow_control() {
    let world = World::new();
    let gateway = world
        .gateway(&world.config(vec![service("echo", echo_backend().await, vec![])]))
        .await;
    let client = west_client(&world, TransportPolicy::TcpOnly);
    let stream = client.open(gateway.addr(), target("echo")).await.unwrap();
    // More than both HTTP/2 windows in flight, written and read concurrently.
    const TOTAL: usize = 96 * 1024 * 1024;
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let block: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..TOTAL / block.len() {
            w.write_all(&block).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0usize;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (k, byte) in buf[..n].iter().enumerate() {
            assert_eq!(*byte, (((received + k) % (1024 * 1024)) % 251) as u8);
        }
        received += n;
    }
    writer.await.unwrap();
    assert_eq!(received, TOTAL);
    client.close().await;
    gateway.shutdown(Duration::from_secs(5)).await;
}
