//! The node agent's outbound side, explicit mode (no root): a workload in "west" connects to
//! the VIP west's gateway assigned to `echo.demo`, exported only by "east"; the agent names
//! the workload (this process, by uid), opens a tunnel to east's gateway with the workload's
//! own SVID, and east's gateway, which allows only that SPIFFE ID, splices it to the backend.
//! A withdrawn service stops being listened on; a workload without an identity is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::transport::{ALPN_H2, tls_channel};
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::{SpiffeId, SvidSource, TrustStore};
use isthmus_gateway::config::{
    AllowRule, EndpointConfig, ExportedService, GatewayConfig, ServicePort,
};
use isthmus_gateway::peering::PeerConfig;
use isthmus_gateway::server::{Gateway, GatewayIdentity};
use isthmus_node_agent::attest::{Selector, UnixAttestor};
use isthmus_node_agent::identities::RegisteredEntry;
use isthmus_node_agent::outbound::follow_catalog;
use isthmus_node_agent::{IdentitySnapshot, Mode, Outbound, OutboundSettings, WorkloadIdentities};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::eventually;
use crate::gateway::{echo_backend, id, now, td};

pub(crate) const WORKLOAD: &str = "spiffe://west.example/ns/demo/sa/client";
pub(crate) const SERVICE_PORT: u16 = 18080;

fn echo_export(backend: SocketAddr, allow: Vec<AllowRule>) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: "echo".into(),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: SERVICE_PORT,
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

fn gateway_identity(ca: &CertificateAuthority, trust: &TrustStore) -> GatewayIdentity {
    let gateway = id(&format!(
        "spiffe://{}/ns/isthmus-system/sa/eastwest-gateway",
        ca.trust_domain()
    ));
    GatewayIdentity {
        svid: SvidSource::new(ca.issue_svid(&gateway, DEFAULT_LEAF_TTL, now()).unwrap()).unwrap(),
        trust: trust.clone(),
    }
}

/// Two clusters: east exports echo (allowing only `allowed`), west imports it and serves its
/// catalog API with VIPs from 127.77.<subnet>.0/24.
pub(crate) struct Clusters {
    pub(crate) west_ca: CertificateAuthority,
    pub(crate) trust: TrustStore,
    pub(crate) east: Gateway,
    pub(crate) west: Gateway,
}

/// `subnet` keeps the VIPs of concurrently running tests apart (127.77.<subnet>.0/24).
async fn clusters(allowed: &str, subnet: u8) -> Clusters {
    clusters_with_vips(allowed, &format!("127.77.{subnet}.0/24")).await
}

/// [`clusters`] with west's VIPs from `vip_range`.
pub(crate) async fn clusters_with_vips(allowed: &str, vip_range: &str) -> Clusters {
    let west_ca =
        CertificateAuthority::generate(td("west.example"), now(), DEFAULT_CA_TTL).unwrap();
    let east_ca =
        CertificateAuthority::generate(td("east.example"), now(), DEFAULT_CA_TTL).unwrap();
    let trust = TrustStore::from_bundles([west_ca.bundle(), east_ca.bundle()]);
    let backend = echo_backend().await;
    let mut east_cfg = GatewayConfig {
        trust_domain: Some(td("east.example")),
        cluster: "east".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        federated_trust_domains: vec![td("west.example")],
        services: vec![echo_export(backend, vec![AllowRule::SpiffeId(id(allowed))])],
        ..GatewayConfig::default()
    };
    east_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("west.example"),
        address: "127.0.0.1:9".parse().unwrap(),
    }];
    let east = Gateway::start(&east_cfg, gateway_identity(&east_ca, &trust))
        .await
        .unwrap();
    let mut west_cfg = GatewayConfig {
        trust_domain: Some(td("west.example")),
        cluster: "west".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        federated_trust_domains: vec![td("east.example")],
        catalog_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..GatewayConfig::default()
    };
    west_cfg.peering.vip_range = vip_range.into();
    west_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("east.example"),
        address: east.addr(),
    }];
    let west = Gateway::start(&west_cfg, gateway_identity(&west_ca, &trust))
        .await
        .unwrap();
    Clusters {
        west_ca,
        trust,
        east,
        west,
    }
}

/// The agent of a west node whose one entry gives processes of `uid` the workload ID.
async fn agent(clusters: &Clusters, uid: u32, drain: &DrainTrigger) -> Outbound {
    agent_with(
        clusters,
        vec![Selector::unix(format!("uid:{uid}"))],
        Mode::Explicit,
        drain,
    )
    .await
}

/// The agent of a west node in `mode` whose one entry gives workloads with `selectors` the
/// workload ID.
pub(crate) async fn agent_with(
    clusters: &Clusters,
    selectors: Vec<Selector>,
    mode: Mode,
    drain: &DrainTrigger,
) -> Outbound {
    let entry = RegisteredEntry {
        id: "entry-client".into(),
        spiffe_id: id(WORKLOAD),
        selectors,
        federates_with: vec![td("east.example")],
        ttl_seconds: 0,
    };
    let svid = clusters
        .west_ca
        .issue_svid(&id(WORKLOAD), DEFAULT_LEAF_TTL, now())
        .unwrap();
    let snapshot = IdentitySnapshot::from_parts(
        td("west.example"),
        vec![(entry, svid)],
        (*clusters.trust.snapshot()).clone(),
    )
    .unwrap();
    let (identities, keep) = WorkloadIdentities::fixed(snapshot);
    // The snapshot never changes in these tests; keep its sender alive with the agent.
    tokio::spawn(async move {
        keep.closed().await;
    });

    // The agent's own SVID reaches west's catalog API.
    let agent_id =
        SpiffeId::parse("spiffe://west.example/ns/isthmus-system/sa/node-agent").unwrap();
    let tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: SvidSource::new(
            clusters
                .west_ca
                .issue_svid(&agent_id, DEFAULT_LEAF_TTL, now())
                .unwrap(),
        )
        .unwrap(),
        trust: clusters.trust.clone(),
        authorizer: Arc::new(AllowIds(vec![id(
            "spiffe://west.example/ns/isthmus-system/sa/eastwest-gateway",
        )])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .unwrap();
    let (sender, catalog) = tokio::sync::watch::channel(None);
    tokio::spawn(follow_catalog(
        CatalogClient::new(tls_channel(
            clusters.west.catalog_addr().unwrap(),
            Arc::new(tls),
        )),
        sender,
        drain.watch(),
    ));
    Outbound::start(
        OutboundSettings {
            mode,
            quic_bind: "127.0.0.1:0".parse().unwrap(),
            ..OutboundSettings::default()
        },
        identities,
        Arc::new(UnixAttestor::default()),
        clusters.trust.clone(),
        catalog,
        drain.watch(),
    )
    .await
    .unwrap()
}

async fn echo_through(vip: SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(vip).await?;
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .map_err(|_| std::io::Error::other("no reply within 5 s"))??;
    Ok(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_reaches_a_remote_service_through_its_vip_with_its_own_identity() {
    let clusters = clusters(WORKLOAD, 1).await;
    let (drain, _) = DrainTrigger::new();
    let uid = nix_uid();
    let outbound = agent(&clusters, uid, &drain).await;
    eventually(
        "the agent listens on echo's VIP",
        Duration::from_secs(10),
        || !outbound.listening().is_empty(),
    )
    .await;
    let vip = outbound.listening()[0];
    assert!(vip.ip().to_string().starts_with("127.77.1."), "{vip}");
    assert_eq!(vip.port(), SERVICE_PORT);

    // The west gateway's status reports the same VIP, and the snapshot named east's gateway.
    let status = clusters.west.status(time::OffsetDateTime::now_utc());
    let echo = status
        .services
        .iter()
        .find(|s| s.name == "echo")
        .expect("west imports echo");
    assert_eq!(echo.vip.map(std::net::IpAddr::V4), Some(vip.ip()));

    let reply = echo_through(vip, b"hello from west").await.unwrap();
    assert_eq!(reply, b"hello from west");
    let stats = outbound.stats();
    assert_eq!(stats.tunnelled, 1, "{stats:?}");
    assert_eq!(stats.no_identity, 0, "{stats:?}");

    // East withdraws echo: west's catalog drops it and the agent stops listening on its VIP.
    clusters.east.view().replace_exports(&[]);
    eventually("the agent stops listening", Duration::from_secs(10), || {
        outbound.listening().is_empty()
    })
    .await;
    assert!(tokio::net::TcpStream::connect(vip).await.is_err());
    drain.start_drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_east_gateway_refuses_an_identity_it_does_not_allow() {
    // East allows someone else: the workload's own SVID reaches the gateway and is refused,
    // so the connection is closed without data (no other identity was used instead).
    let clusters = clusters("spiffe://west.example/ns/demo/sa/someone-else", 2).await;
    let (drain, _) = DrainTrigger::new();
    let outbound = agent(&clusters, nix_uid(), &drain).await;
    eventually("the agent listens", Duration::from_secs(10), || {
        !outbound.listening().is_empty()
    })
    .await;
    let vip = outbound.listening()[0];
    let reply = echo_through(vip, b"hello").await.unwrap_or_default();
    assert!(reply.is_empty(), "got {reply:?}");
    eventually("the failure is counted", Duration::from_secs(5), || {
        outbound.stats().failed == 1
    })
    .await;
    assert_eq!(outbound.stats().tunnelled, 0);
    drain.start_drain();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_without_an_identity_is_closed() {
    let clusters = clusters(WORKLOAD, 3).await;
    let (drain, _) = DrainTrigger::new();
    // The only entry is for another uid.
    let outbound = agent(&clusters, nix_uid().wrapping_add(4242), &drain).await;
    eventually("the agent listens", Duration::from_secs(10), || {
        !outbound.listening().is_empty()
    })
    .await;
    let reply = echo_through(outbound.listening()[0], b"hello")
        .await
        .unwrap_or_default();
    assert!(reply.is_empty(), "got {reply:?}");
    eventually("counted as no identity", Duration::from_secs(5), || {
        outbound.stats().no_identity == 1
    })
    .await;
    drain.start_drain();
}

fn nix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// A backend that answers every connection with `tag` followed by what it read.
async fn tagged_backend(tag: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let _ = tcp.read_to_end(&mut request).await;
                let _ = tcp.write_all(tag).await;
                let _ = tcp.write_all(&request).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_endpoint_is_connected_directly_without_a_tunnel() {
    let clusters = clusters(WORKLOAD, 4).await;
    // West exports echo too (affinity local, the default): the agent prefers its endpoint.
    let local = tagged_backend(b"west:").await;
    clusters
        .west
        .view()
        .replace_exports(&[echo_export(local, vec![])]);
    let (drain, _) = DrainTrigger::new();
    let outbound = agent(&clusters, nix_uid(), &drain).await;
    eventually(
        "west's own endpoint is in the catalog",
        Duration::from_secs(10),
        || {
            clusters
                .west
                .status(time::OffsetDateTime::now_utc())
                .services
                .iter()
                .any(|s| s.name == "echo" && s.exported)
                && !outbound.listening().is_empty()
        },
    )
    .await;
    // The agent's table follows the catalog; give it the snapshot with west's endpoint.
    let vip = outbound.listening()[0];
    let mut reply = Vec::new();
    for _ in 0..50 {
        reply = echo_through(vip, b"hello").await.unwrap_or_default();
        if reply == b"west:hello" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reply, b"west:hello", "stats: {:?}", outbound.stats());
    assert!(outbound.stats().direct >= 1, "{:?}", outbound.stats());
    drain.start_drain();
}
