//! Forwarding of names outside the clusterset zone, against an upstream this test starts on
//! loopback (another Isthmus DNS server, authoritative for `upstream.test`): answers pass
//! through with RA and without AA, repeated questions are answered from the cache (the
//! upstream's own query counter proves it), NXDOMAIN carries the upstream's SOA, zone names
//! are never forwarded, forwarding off means REFUSED, and a silent upstream means SERVFAIL.
//! Also: the "catalog sync" readiness blocker and the query metrics.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{DnsResponse, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use isthmus_api::catalog as pb;
use isthmus_core::lifecycle::Readiness;
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_dns::server::ZoneHandler;
use isthmus_dns::{
    DnsMetrics, DnsServer, ForwardSettings, Forwarder, ServerSettings, ZoneFeed, ZoneSettings,
};

fn service(namespace: &str, name: &str, vip: &str) -> pb::GlobalService {
    pb::GlobalService {
        namespace: namespace.into(),
        name: name.into(),
        vip: vip.into(),
        r#type: "ClusterSetIP".into(),
        affinity: "none".into(),
        ports: vec![pb::Port {
            local_target_port: 0,
            name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
        }],
        clusters: vec![pb::ClusterEndpoints {
            cluster: "east".into(),
            local: false,
            endpoints: vec![pb::Endpoint {
                address: "10.1.0.1".into(),
                ready: true,
                zone: String::new(),
                hostname: String::new(),
            }],
        }],
        conflicts: vec![],
    }
}

fn snapshot(services: Vec<pb::GlobalService>) -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        gateways: vec![],
        cluster: "west".into(),
        services,
    }
}

fn loopback() -> ServerSettings {
    ServerSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerSettings::default()
    }
}

/// A DNS server authoritative for `upstream.test` with `web.demo.svc.upstream.test` at
/// 10.77.0.7, counting what it is asked.
struct Upstream {
    server: DnsServer,
    metrics: DnsMetrics,
    _feed: ZoneFeed,
}

impl Upstream {
    async fn start() -> Self {
        let (mut feed, zone) = ZoneFeed::new(ZoneSettings::new("upstream.test", 30, 100).unwrap());
        feed.publish(&snapshot(vec![service("demo", "web", "10.77.0.7")]));
        let metrics = DnsMetrics::default();
        let settings = loopback();
        let handler =
            ZoneHandler::new(zone, settings.max_udp_payload).with_metrics(metrics.clone());
        let server = DnsServer::start_with(&settings, handler).await.unwrap();
        Self {
            server,
            metrics,
            _feed: feed,
        }
    }

    /// Queries the upstream has answered so far. (One `get_or_create` per statement: its guard
    /// holds the family's lock until the statement ends.)
    fn queries(&self) -> u64 {
        let mut total = 0;
        for rcode in ["NOERROR", "NXDOMAIN"] {
            let labels = isthmus_dns::metrics::QueryLabels {
                qtype: "A",
                rcode,
                source: "zone",
            };
            total += self.metrics.queries.get_or_create(&labels).get();
        }
        total
    }
}

/// The server under test: `clusterset.local` with `api.prod` at 10.96.0.1, forwarding the
/// rest to `upstreams` (or refusing it when `None`).
async fn server_under_test(
    upstreams: Option<ForwardSettings>,
) -> (DnsServer, ZoneFeed, DnsMetrics, MetricsRegistry) {
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::new("clusterset.local", 5, 100).unwrap());
    feed.publish(&snapshot(vec![service("prod", "api", "10.96.0.1")]));
    let mut registry = MetricsRegistry::new();
    let metrics = DnsMetrics::register(&mut registry);
    let settings = loopback();
    let mut handler =
        ZoneHandler::new(zone, settings.max_udp_payload).with_metrics(metrics.clone());
    if let Some(upstreams) = upstreams {
        handler = handler.with_forwarder(Forwarder::new(&upstreams).unwrap());
    }
    let server = DnsServer::start_with(&settings, handler).await.unwrap();
    (server, feed, metrics, registry)
}

fn to(upstream: SocketAddr) -> ForwardSettings {
    ForwardSettings {
        servers: vec![upstream],
        timeout: Duration::from_millis(300),
        attempts: 1,
        ..ForwardSettings::default()
    }
}

async fn client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
    let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(background);
    client
}

async fn ask(addr: SocketAddr, name: &str, query_type: RecordType) -> DnsResponse {
    let mut client = client(addr).await;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.query(Name::from_ascii(name).unwrap(), DNSClass::IN, query_type),
    )
    .await
    .unwrap_or_else(|_| panic!("query for {name} timed out"))
    .unwrap()
}

fn addresses(response: &DnsResponse) -> Vec<String> {
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn names_outside_the_zone_are_forwarded_and_cached() {
    let upstream = Upstream::start().await;
    let (server, _feed, _metrics, registry) =
        server_under_test(Some(to(upstream.server.local_addr()))).await;
    let addr = server.local_addr();

    let response = ask(addr, "web.demo.svc.upstream.test.", RecordType::A).await;
    assert_eq!(response.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&response), vec!["10.77.0.7"]);
    assert!(response.recursion_available, "forwarding server offers RA");
    assert!(
        !response.authoritative,
        "forwarded answers are not authoritative"
    );
    assert_eq!(upstream.queries(), 1);

    for _ in 0..5 {
        let again = ask(addr, "web.demo.svc.upstream.test.", RecordType::A).await;
        assert_eq!(addresses(&again), vec!["10.77.0.7"]);
    }
    assert_eq!(upstream.queries(), 1, "repeats are answered from the cache");

    // NXDOMAIN passes through with the upstream's SOA, and is cached too.
    let missing = ask(addr, "nothing.demo.svc.upstream.test.", RecordType::A).await;
    assert_eq!(missing.response_code, ResponseCode::NXDomain);
    assert!(
        missing
            .authorities
            .iter()
            .any(|r| r.record_type() == RecordType::SOA && r.name.to_ascii() == "upstream.test."),
        "negative answer carries the SOA: {:?}",
        missing.authorities
    );
    assert_eq!(upstream.queries(), 2);
    let missing = ask(addr, "nothing.demo.svc.upstream.test.", RecordType::A).await;
    assert_eq!(missing.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 2, "negative answers are cached");

    // Names of our zone are answered here, authoritatively, never forwarded.
    let own = ask(addr, "api.prod.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(addresses(&own), vec!["10.96.0.1"]);
    assert!(own.authoritative);
    assert!(own.recursion_available);
    let own_missing = ask(addr, "nope.prod.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(own_missing.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries(), 2, "zone names never reach the upstream");

    // The metrics saw both sources.
    let text = registry.encode_text().unwrap();
    assert!(
        text.contains(
            "isthmus_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",source=\"forward\"} 6"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "isthmus_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\",source=\"forward\"} 2"
        ),
        "{text}"
    );
    assert!(
        text.contains("isthmus_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",source=\"zone\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("isthmus_dns_query_duration_seconds_count{source=\"forward\"} 8"),
        "{text}"
    );
    server.shutdown().await.unwrap();
    upstream.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn forwarding_off_refuses_names_outside_the_zone() {
    let (server, _feed, _metrics, registry) = server_under_test(None).await;
    let response = ask(
        server.local_addr(),
        "web.demo.svc.upstream.test.",
        RecordType::A,
    )
    .await;
    assert_eq!(response.response_code, ResponseCode::Refused);
    assert!(!response.recursion_available);
    let text = registry.encode_text().unwrap();
    assert!(
        text.contains(
            "isthmus_dns_queries_total{qtype=\"A\",rcode=\"REFUSED\",source=\"server\"} 1"
        ),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_upstream_is_servfail_and_the_zone_still_answers() {
    // A UDP socket that never answers stands in for a dead upstream.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (server, _feed, _metrics, _registry) =
        server_under_test(Some(to(silent.local_addr().unwrap()))).await;
    let addr = server.local_addr();
    let response = ask(addr, "web.demo.svc.upstream.test.", RecordType::A).await;
    assert_eq!(response.response_code, ResponseCode::ServFail);
    let own = ask(addr, "api.prod.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(addresses(&own), vec!["10.96.0.1"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn catalog_sync_blocks_readiness_until_the_first_zone() {
    let readiness = Readiness::new();
    let (feed, zone) = ZoneFeed::new(ZoneSettings::new("clusterset.local", 5, 100).unwrap());
    let mut feed = feed.with_readiness(readiness.register("catalog sync"));
    assert_eq!(readiness.pending(), vec!["catalog sync".to_owned()]);
    let server = DnsServer::start(&loopback(), zone).await.unwrap();
    // Before the first snapshot the zone is unknown: SERVFAIL, never NXDOMAIN.
    let early = ask(
        server.local_addr(),
        "api.prod.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(early.response_code, ResponseCode::ServFail);
    feed.publish(&snapshot(vec![service("prod", "api", "10.96.0.1")]));
    assert!(readiness.is_ready(), "pending: {:?}", readiness.pending());
    let answered = ask(
        server.local_addr(),
        "api.prod.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&answered), vec!["10.96.0.1"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn names_outside_the_zone_are_forwarded_before_the_first_catalog_snapshot() {
    let upstream = Upstream::start().await;
    let settings = ZoneSettings::new("clusterset.local", 5, 100).unwrap();
    let origin = settings.origin().clone();
    let (_feed, zone) = ZoneFeed::new(settings);
    let loopback = loopback();
    let handler = ZoneHandler::new(zone, loopback.max_udp_payload)
        .with_forwarder(Forwarder::new(&to(upstream.server.local_addr())).unwrap())
        .with_origin(origin);
    let server = DnsServer::start_with(&loopback, handler).await.unwrap();
    let outside = ask(
        server.local_addr(),
        "web.demo.svc.upstream.test.",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&outside), vec!["10.77.0.7"]);
    // Names of the zone stay unknown (SERVFAIL, never NXDOMAIN) until the catalog arrives.
    let inside = ask(
        server.local_addr(),
        "api.prod.svc.clusterset.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(inside.response_code, ResponseCode::ServFail);
    server.shutdown().await.unwrap();
}
