//! The DNS server on 127.0.0.1 (port 0), asked with hickory's client over UDP and TCP: every
//! record kind of the MCS DNS specification v1.0.0 with its negative cases, truncation of
//! large answers over UDP, catalog changes visible on the next query, and the catalog
//! follower reconnecting to a catalog API that goes away.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{DnsResponse, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use isthmus_api::catalog as pb;
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::catalog::catalog_server::{Catalog, CatalogServer};
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_dns::{
    Backoff, DnsServer, ServerSettings, ZoneFeed, ZoneReceiver, ZoneSettings, follow_catalog,
};
use tokio_stream::Stream;

fn endpoint(address: &str, ready: bool, hostname: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: address.into(),
        ready,
        zone: String::new(),
        hostname: hostname.into(),
    }
}

fn service(
    name: &str,
    kind: &str,
    vip: &str,
    ports: &[(&str, &str, u32)],
    clusters: Vec<(&str, Vec<pb::Endpoint>)>,
) -> pb::GlobalService {
    pb::GlobalService {
        namespace: "test".into(),
        name: name.into(),
        vip: vip.into(),
        r#type: kind.into(),
        affinity: "none".into(),
        ports: ports
            .iter()
            .map(|(name, protocol, port)| pb::Port {
                name: (*name).into(),
                protocol: (*protocol).into(),
                port: *port,
            })
            .collect(),
        clusters: clusters
            .into_iter()
            .map(|(cluster, endpoints)| pb::ClusterEndpoints {
                cluster: cluster.into(),
                local: cluster == "clustera",
                endpoints,
            })
            .collect(),
        conflicts: vec![],
    }
}

fn snapshot() -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        cluster: "clustera".into(),
        services: vec![
            service(
                "myservice",
                "ClusterSetIP",
                "10.42.42.42",
                &[("https", "TCP", 443), ("", "TCP", 8080)],
                vec![("clustera", vec![endpoint("10.3.0.1", true, "pod-a")])],
            ),
            service("v6svc", "ClusterSetIP", "2001:db8::1", &[], vec![]),
            service(
                "headless",
                "Headless",
                "",
                &[("https", "TCP", 443)],
                vec![
                    (
                        "clustera",
                        vec![
                            endpoint("10.3.0.100", true, "my-pet-1"),
                            endpoint("10.3.0.102", false, "my-pet-3"),
                        ],
                    ),
                    (
                        "clusterb",
                        vec![
                            endpoint("10.4.0.1", true, "my-pet-1"),
                            endpoint("2001:db8::2", true, "my-pet-2"),
                        ],
                    ),
                ],
            ),
            service(
                "empty-headless",
                "Headless",
                "",
                &[],
                vec![("clustera", vec![endpoint("10.5.0.1", false, "x")])],
            ),
        ],
    }
}

/// A headless service `name` with `endpoints` ready endpoints in one cluster.
fn big_headless(name: &str, endpoints: usize) -> pb::GlobalService {
    service(
        name,
        "Headless",
        "",
        &[("http", "TCP", 80)],
        vec![(
            "clustera",
            (0..endpoints)
                .map(|i| endpoint(&format!("10.9.{}.{}", i / 200, i % 200 + 1), true, ""))
                .collect(),
        )],
    )
}

async fn start(zone: ZoneReceiver) -> DnsServer {
    let settings = ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerSettings::default()
    };
    DnsServer::start(&settings, zone).await.unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

async fn client(addr: SocketAddr, transport: Transport) -> Client<TokioRuntimeProvider> {
    let provider = TokioRuntimeProvider::default();
    match transport {
        Transport::Udp => {
            let stream = UdpClientStream::builder(addr, provider).build();
            let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
            tokio::spawn(background);
            client
        }
        Transport::Tcp => {
            let (connect, sender) =
                TcpClientStream::new(addr, None, Some(Duration::from_secs(5)), provider);
            let stream = connect.await.unwrap();
            let (client, background) = Client::<TokioRuntimeProvider>::new(stream, sender);
            tokio::spawn(background);
            client
        }
    }
}

async fn ask(
    client: &mut Client<TokioRuntimeProvider>,
    name: &str,
    query_type: RecordType,
) -> DnsResponse {
    tokio::time::timeout(
        Duration::from_secs(5),
        client.query(Name::from_ascii(name).unwrap(), DNSClass::IN, query_type),
    )
    .await
    .unwrap()
    .unwrap()
}

fn rendered(response: &DnsResponse) -> Vec<String> {
    let mut out: Vec<String> = response
        .answers
        .iter()
        .map(|r| r.data.to_string())
        .collect();
    out.sort();
    out
}

/// (spec section, name, type, rcode, answer data, SOA in authority).
type Case = (
    &'static str,
    &'static str,
    RecordType,
    ResponseCode,
    &'static [&'static str],
    bool,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_every_record_kind_over_udp_and_tcp() {
    use RecordType as T;
    use ResponseCode::{NXDomain, NoError, Refused};
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    feed.publish(&snapshot());
    let server = start(zone).await;

    let cases: &[Case] = &[
        (
            "2.2",
            "dns-version.clusterset.local.",
            T::TXT,
            NoError,
            &["1.0.0"],
            false,
        ),
        (
            "apex",
            "clusterset.local.",
            T::NS,
            NoError,
            &["ns.dns.clusterset.local."],
            false,
        ),
        (
            "apex",
            "clusterset.local.",
            T::SOA,
            NoError,
            &["ns.dns.clusterset.local. hostmaster.clusterset.local. 1 7200 1800 86400 5"],
            false,
        ),
        (
            "2.3.1",
            "myservice.test.svc.clusterset.local.",
            T::A,
            NoError,
            &["10.42.42.42"],
            false,
        ),
        (
            "2.3.1",
            "v6svc.test.svc.clusterset.local.",
            T::AAAA,
            NoError,
            &["2001:db8::1"],
            false,
        ),
        (
            "2.3.1 NODATA",
            "myservice.test.svc.clusterset.local.",
            T::AAAA,
            NoError,
            &[],
            true,
        ),
        (
            "2.3.2",
            "_https._tcp.myservice.test.svc.clusterset.local.",
            T::SRV,
            NoError,
            &["10 100 443 myservice.test.svc.clusterset.local."],
            false,
        ),
        (
            "2.3.2 unknown port",
            "_http._tcp.myservice.test.svc.clusterset.local.",
            T::SRV,
            NXDomain,
            &[],
            true,
        ),
        (
            "2.3.3",
            "42.42.42.10.in-addr.arpa.",
            T::PTR,
            NoError,
            &["myservice.test.svc.clusterset.local."],
            false,
        ),
        (
            "2.3.4",
            "clustera.myservice.test.svc.clusterset.local.",
            T::A,
            NXDomain,
            &[],
            true,
        ),
        (
            "2.4.1",
            "headless.test.svc.clusterset.local.",
            T::A,
            NoError,
            &["10.3.0.100", "10.4.0.1"],
            false,
        ),
        (
            "2.4.1",
            "headless.test.svc.clusterset.local.",
            T::AAAA,
            NoError,
            &["2001:db8::2"],
            false,
        ),
        (
            "2.4.1",
            "my-pet-1.clusterb.headless.test.svc.clusterset.local.",
            T::A,
            NoError,
            &["10.4.0.1"],
            false,
        ),
        (
            "2.4.1 unready",
            "my-pet-3.clustera.headless.test.svc.clusterset.local.",
            T::A,
            NXDomain,
            &[],
            true,
        ),
        (
            "2.4.1 no ready endpoint",
            "empty-headless.test.svc.clusterset.local.",
            T::A,
            NXDomain,
            &[],
            true,
        ),
        (
            "2.4.2",
            "_https._tcp.headless.test.svc.clusterset.local.",
            T::SRV,
            NoError,
            &[
                "10 100 443 my-pet-1.clustera.headless.test.svc.clusterset.local.",
                "10 100 443 my-pet-1.clusterb.headless.test.svc.clusterset.local.",
                "10 100 443 my-pet-2.clusterb.headless.test.svc.clusterset.local.",
            ],
            false,
        ),
        (
            "2.4.3",
            "100.0.3.10.in-addr.arpa.",
            T::PTR,
            NoError,
            &["my-pet-1.clustera.headless.test.svc.clusterset.local."],
            false,
        ),
        (
            "2.4.4",
            "clustera.headless.test.svc.clusterset.local.",
            T::A,
            NoError,
            &[],
            true,
        ),
        (
            "missing",
            "missing.test.svc.clusterset.local.",
            T::A,
            NXDomain,
            &[],
            true,
        ),
        (
            "outside the zone",
            "example.com.",
            T::A,
            Refused,
            &[],
            false,
        ),
        (
            "unowned reverse name",
            "1.1.1.1.in-addr.arpa.",
            T::PTR,
            Refused,
            &[],
            false,
        ),
    ];
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut client = client(server.local_addr(), transport).await;
        for (spec, name, query_type, rcode, expected, soa) in cases {
            let response = ask(&mut client, name, *query_type).await;
            let what = format!("{transport:?} {spec}: {name} {query_type}");
            assert_eq!(
                response.metadata.response_code, *rcode,
                "{what}: {response:?}"
            );
            assert_eq!(rendered(&response), *expected, "{what}");
            assert_eq!(
                response.metadata.authoritative,
                *rcode != Refused,
                "{what}: AA"
            );
            assert!(!response.metadata.truncation, "{what}: TC");
            let has_soa = response
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA);
            assert_eq!(has_soa, *soa, "{what}: SOA in authority");
            // EDNS0: the client sent an OPT record, so the answer carries one (RFC 6891).
            assert!(response.edns.is_some(), "{what}: OPT");
        }
        // SRV targets' addresses come along in the additional section.
        let response = ask(
            &mut client,
            "_https._tcp.myservice.test.svc.clusterset.local.",
            T::SRV,
        )
        .await;
        assert_eq!(response.additionals.len(), 1, "{transport:?}");
    }
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    let mut catalog = snapshot();
    catalog.services.push(big_headless("big", 300));
    catalog.services.push(big_headless("mid", 16));
    feed.publish(&catalog);
    let server = start(zone).await;
    let name = "big.test.svc.clusterset.local.";

    // With EDNS (the client offers 1232 bytes): truncated, TC set.
    let mut udp = client(server.local_addr(), Transport::Udp).await;
    let response = ask(&mut udp, name, RecordType::A).await;
    assert!(response.metadata.truncation);
    assert!(response.answers.len() < 300);
    // Without EDNS, RFC 1035's 512 bytes bound the message.
    udp.disable_edns();
    let response = ask(&mut udp, name, RecordType::A).await;
    assert!(response.metadata.truncation);
    assert!(response.edns.is_none());
    assert!(
        response.answers.len() < 512 / 16,
        "{}",
        response.answers.len()
    );

    let mut tcp = client(server.local_addr(), Transport::Tcp).await;
    let response = ask(&mut tcp, name, RecordType::A).await;
    assert!(!response.metadata.truncation);
    assert_eq!(response.answers.len(), 300);

    // 16 SRV records fit 1232 bytes, their 16 addresses do not: the optional additional
    // section is dropped over UDP (RFC 2181 9) instead of setting TC, and sent over TCP.
    let srv = "_http._tcp.mid.test.svc.clusterset.local.";
    udp.enable_edns();
    let response = ask(&mut udp, srv, RecordType::SRV).await;
    assert!(!response.metadata.truncation);
    assert_eq!(response.answers.len(), 16);
    assert!(response.additionals.is_empty());
    let response = ask(&mut tcp, srv, RecordType::SRV).await;
    assert_eq!(response.answers.len(), 16);
    assert_eq!(response.additionals.len(), 16);

    // Small answers over UDP are not truncated.
    let response = ask(
        &mut udp,
        "myservice.test.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert!(!response.metadata.truncation);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_are_answered_from_the_next_query() {
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    let server = start(zone).await;
    let mut udp = client(server.local_addr(), Transport::Udp).await;
    let name = "myservice.test.svc.clusterset.local.";

    // Before the first snapshot: SERVFAIL, never an NXDOMAIN a resolver would cache.
    let response = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);

    feed.publish(&snapshot());
    let response = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(rendered(&response), ["10.42.42.42"]);

    let mut changed = snapshot();
    changed.services[0].vip = "10.42.42.43".into();
    feed.publish(&changed);
    let response = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(rendered(&response), ["10.42.42.43"]);

    changed.services.remove(0);
    feed.publish(&changed);
    let response = ask(&mut udp, name, RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    server.shutdown().await.unwrap();
}

type SnapshotStream =
    Pin<Box<dyn Stream<Item = Result<pb::CatalogSnapshot, tonic::Status>> + Send>>;

/// A catalog API whose every watch plays the next script: its snapshots, then the end of the
/// stream, except the last script, which stays open.
#[derive(Clone)]
struct ScriptedCatalog {
    scripts: Arc<Mutex<VecDeque<Vec<pb::CatalogSnapshot>>>>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Catalog for ScriptedCatalog {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        _request: tonic::Request<pb::WatchCatalogRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (script, last) = {
            let mut scripts = self.scripts.lock().unwrap();
            let script = scripts.pop_front().unwrap_or_default();
            (script, scripts.is_empty())
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for snapshot in script {
                let _ = tx.send(Ok(snapshot)).await;
            }
            if last {
                tx.closed().await;
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_feeds_the_zone_and_reconnects() {
    // Reserve a port, then leave it closed: the follower starts before the catalog API.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let first = snapshot();
    let mut second = snapshot();
    second.services[0].vip = "10.42.42.99".into();
    let catalog = ScriptedCatalog {
        scripts: Arc::new(Mutex::new(VecDeque::from([vec![first], vec![second]]))),
        calls: Arc::new(AtomicUsize::new(0)),
    };

    let (feed, mut zone) = ZoneFeed::new(ZoneSettings::default());
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let (drain, drain_watch) = DrainTrigger::new();
    let backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    let follower = tokio::spawn(follow_catalog(
        CatalogClient::new(channel),
        feed,
        backoff,
        drain_watch,
    ));
    // Let it fail to connect a few times.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(zone.borrow().is_none());

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let calls = catalog.calls.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CatalogServer::new(catalog))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The first watch delivers one snapshot and ends; the follower comes back for the second.
    let vip_of_myservice = |zone: &ZoneReceiver| {
        zone.borrow().as_ref().map(|z| {
            z.answer(
                &Name::from_ascii("myservice.test.svc.clusterset.local.").unwrap(),
                RecordType::A,
            )
            .answers
            .iter()
            .map(|r| r.data.to_string())
            .collect::<Vec<_>>()
        })
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if vip_of_myservice(&zone) == Some(vec!["10.42.42.99".to_owned()]) {
                break;
            }
            zone.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(zone.borrow().as_ref().unwrap().serial(), 2);

    // Draining stops the follower.
    drain.start_drain();
    tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .unwrap()
        .unwrap();
    server.abort();
}

/// Sends `message` over UDP as is and returns the decoded response.
async fn exchange_raw(
    server: SocketAddr,
    message: &hickory_proto::op::Message,
) -> hickory_proto::op::Message {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buffer = vec![0; 65_535];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    hickory_proto::op::Message::from_vec(&buffer[..len]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_edge_cases_get_the_right_response_codes() {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    feed.publish(&snapshot());
    let server = start(zone).await;
    let name = Name::from_ascii("myservice.test.svc.clusterset.local.").unwrap();
    let query = |id: u16| {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(name.clone(), RecordType::A));
        message
    };

    // EDNS: our payload limit caps the client's, and the OPT comes back (RFC 6891 6.2.3).
    let mut message = query(1);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.set_edns(edns);
    let response = exchange_raw(server.local_addr(), &message).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(response.edns.as_ref().unwrap().max_payload(), 1232);

    // An EDNS version we do not speak: BADVERS (RFC 6891 6.1.3).
    let mut message = query(2);
    let mut edns = Edns::new();
    edns.set_version(1);
    message.set_edns(edns);
    let response = exchange_raw(server.local_addr(), &message).await;
    // 16 on the wire, which hickory decodes by its TSIG name (BADSIG shares the value).
    assert_eq!(
        u16::from(response.metadata.response_code),
        u16::from(ResponseCode::BADVERS)
    );
    assert!(response.edns.is_some());

    // Another class than IN: not ours.
    let mut message = Message::new(3, MessageType::Query, OpCode::Query);
    let mut chaos = Query::query(name.clone(), RecordType::A);
    chaos.set_query_class(DNSClass::CH);
    message.add_query(chaos);
    let response = exchange_raw(server.local_addr(), &message).await;
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);

    // Two questions in one message: FORMERR.
    let mut message = query(4);
    message.add_query(Query::query(name.clone(), RecordType::AAAA));
    let response = exchange_raw(server.local_addr(), &message).await;
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);

    // Other opcodes (here NOTIFY): not implemented.
    let mut message = Message::new(5, MessageType::Query, OpCode::Notify);
    message.add_query(Query::query(name.clone(), RecordType::SOA));
    let response = exchange_raw(server.local_addr(), &message).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NotImp);
    server.shutdown().await.unwrap();
}

/// End to end: east exports echo, west imports it through peering, and west's DNS server
/// (its own SVID, over mTLS to west's catalog API) answers the ClusterSetIP west assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_catalog_feeds_the_dns_server_over_mtls() {
    use isthmus_api::transport::{ALPN_H2, tls_channel};
    use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
    use isthmus_core::tls::{AllowIds, MtlsSettings};
    use isthmus_core::{SpiffeId, SvidSource, TrustDomain, TrustStore};
    use isthmus_gateway::config::{EndpointConfig, ExportedService, GatewayConfig, ServicePort};
    use isthmus_gateway::peering::PeerConfig;
    use isthmus_gateway::server::{Gateway, GatewayIdentity};

    let now = time::OffsetDateTime::now_utc();
    let trust = TrustStore::default();
    let mut cas = Vec::new();
    let mut identities = Vec::new();
    for name in ["west.example", "east.example"] {
        let ca =
            CertificateAuthority::generate(TrustDomain::new(name).unwrap(), now, DEFAULT_CA_TTL)
                .unwrap();
        trust.set(ca.bundle());
        let id = SpiffeId::parse(&format!(
            "spiffe://{name}/ns/isthmus-system/sa/eastwest-gateway"
        ))
        .unwrap();
        identities.push(GatewayIdentity {
            svid: SvidSource::new(ca.issue_svid(&id, DEFAULT_LEAF_TTL, now).unwrap()).unwrap(),
            trust: trust.clone(),
        });
        cas.push(ca);
    }
    let td = |s: &str| TrustDomain::new(s).unwrap();
    let mut east_cfg = GatewayConfig {
        trust_domain: Some(td("east.example")),
        cluster: "east".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        federated_trust_domains: vec![td("west.example")],
        services: vec![ExportedService {
            namespace: "demo".into(),
            name: "echo".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: None,
                protocol: "TCP".into(),
            }],
            endpoints: vec![EndpointConfig {
                address: "10.1.0.1".parse().unwrap(),
                ready: true,
            }],
            allow: vec![],
        }],
        ..GatewayConfig::default()
    };
    east_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("west.example"),
        address: "127.0.0.1:9".parse().unwrap(),
    }];
    let east = Gateway::start(&east_cfg, identities[1].clone())
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
    west_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("east.example"),
        address: east.addr(),
    }];
    let west = Gateway::start(&west_cfg, identities[0].clone())
        .await
        .unwrap();

    // The DNS server of west, with its own SVID.
    let dns_id = SpiffeId::parse("spiffe://west.example/ns/isthmus-system/sa/dns").unwrap();
    let tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: SvidSource::new(cas[0].issue_svid(&dns_id, DEFAULT_LEAF_TTL, now).unwrap()).unwrap(),
        trust: trust.clone(),
        authorizer: Arc::new(AllowIds(vec![
            SpiffeId::parse("spiffe://west.example/ns/isthmus-system/sa/eastwest-gateway").unwrap(),
        ])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .unwrap();
    let (feed, zone) = ZoneFeed::new(ZoneSettings::default());
    let server = start(zone).await;
    let (drain, watch) = DrainTrigger::new();
    tokio::spawn(follow_catalog(
        CatalogClient::new(tls_channel(west.catalog_addr().unwrap(), Arc::new(tls))),
        feed,
        Backoff::default(),
        watch,
    ));
    let vip = loop {
        let status = west.status(time::OffsetDateTime::now_utc());
        if let Some(vip) = status
            .services
            .iter()
            .find(|s| s.name == "echo")
            .and_then(|s| s.vip)
        {
            break vip;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut udp = client(server.local_addr(), Transport::Udp).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = ask(&mut udp, "echo.demo.svc.clusterset.local.", RecordType::A).await;
        if rendered(&response) == [vip.to_string()] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "DNS never answered {vip}: {response:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain.drain(Duration::from_secs(2)).await;
    server.shutdown().await.unwrap();
    west.shutdown(Duration::from_secs(2)).await;
    east.shutdown(Duration::from_secs(2)).await;
}
