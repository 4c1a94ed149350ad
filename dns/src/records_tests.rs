//! Table-driven conformance of [`ClusterSetZone::answer`] to the MCS DNS specification v1.0.0;
//! each case cites the section it checks ("spec 2.x").

use super::*;

fn port(name: &str, protocol: &str, number: u32) -> pb::Port {
    pb::Port {
        local_target_port: 0,
        name: name.into(),
        protocol: protocol.into(),
        port: number,
    }
}

fn endpoint(address: &str, ready: bool, hostname: &str) -> pb::Endpoint {
    pb::Endpoint {
        address: address.into(),
        ready,
        zone: String::new(),
        hostname: hostname.into(),
    }
}

fn cluster(name: &str, endpoints: Vec<pb::Endpoint>) -> pb::ClusterEndpoints {
    pb::ClusterEndpoints {
        cluster: name.into(),
        local: false,
        endpoints,
    }
}

fn service(
    name: &str,
    kind: &str,
    vip: &str,
    ports: Vec<pb::Port>,
    clusters: Vec<pb::ClusterEndpoints>,
) -> pb::GlobalService {
    pb::GlobalService {
        namespace: "test".into(),
        name: name.into(),
        vip: vip.into(),
        r#type: kind.into(),
        affinity: "none".into(),
        ports,
        clusters,
        conflicts: vec![],
    }
}

/// The catalog every case is asked against.
pub(crate) fn snapshot() -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        gateways: vec![],
        cluster: "clustera".into(),
        services: vec![
            service(
                "myservice",
                "ClusterSetIP",
                "10.42.42.42",
                vec![
                    port("https", "TCP", 443),
                    port("dns", "UDP", 53),
                    port("", "TCP", 8080),
                ],
                vec![cluster(
                    "clustera",
                    vec![endpoint("10.3.0.1", true, "pod-a")],
                )],
            ),
            service(
                "v6svc",
                "ClusterSetIP",
                "2001:db8::1",
                vec![port("http", "TCP", 80)],
                vec![],
            ),
            service("pending", "ClusterSetIP", "", vec![], vec![]),
            service(
                "headless",
                "Headless",
                "",
                vec![port("https", "TCP", 443)],
                vec![
                    cluster(
                        "clusterA",
                        vec![
                            endpoint("10.3.0.100", true, "my-pet-1"),
                            endpoint("10.3.0.101", true, ""),
                            endpoint("10.3.0.102", false, "my-pet-3"),
                        ],
                    ),
                    cluster(
                        "clusterB",
                        vec![
                            endpoint("2001:db8::2", true, "my-pet-1"),
                            endpoint("10.4.0.1", true, "my-pet-1"),
                        ],
                    ),
                ],
            ),
            service(
                "empty-headless",
                "Headless",
                "",
                vec![port("https", "TCP", 443)],
                vec![cluster(
                    "clustera",
                    vec![endpoint("10.5.0.1", false, "sleepy")],
                )],
            ),
            service("Bad_Name", "ClusterSetIP", "10.42.0.9", vec![], vec![]),
        ],
    }
}

fn zone() -> ClusterSetZone {
    ClusterSetZone::from_snapshot(&snapshot(), &ZoneSettings::default(), 7)
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// The answer's records as text, sorted, for comparison with the table.
fn rendered(records: &[Record]) -> Vec<String> {
    let mut out: Vec<String> = records.iter().map(|r| r.data.to_string()).collect();
    out.sort();
    out
}

use AnswerKind::{NoData, NxDomain, OutOfZone, Records};
use RecordType as T;

const Z: &str = "clusterset.local.";

#[test]
fn every_record_kind_and_negative_case() {
    let zone = zone();
    let cases: &[(&str, &str, RecordType, AnswerKind, &[&str])] = &[
        // spec 2.2: the schema version.
        ("2.2", "dns-version", T::TXT, Records, &["1.0.0"]),
        ("2.2 (NODATA)", "dns-version", T::A, NoData, &[]),
        // Zone apex (RFC 1035): SOA and NS; any other type is NODATA.
        (
            "apex SOA",
            "",
            T::SOA,
            Records,
            &["ns.dns.clusterset.local. hostmaster.clusterset.local. 7 7200 1800 86400 5"],
        ),
        ("apex NS", "", T::NS, Records, &["ns.dns.clusterset.local."]),
        ("apex A", "", T::A, NoData, &[]),
        // spec 2.3.1: A for an IPv4 ClusterSetIP, AAAA for IPv6, nothing of the other family.
        (
            "2.3.1 A",
            "myservice.test.svc",
            T::A,
            Records,
            &["10.42.42.42"],
        ),
        (
            "2.3.1 case-insensitive",
            "MyService.TEST.svc",
            T::A,
            Records,
            &["10.42.42.42"],
        ),
        (
            "2.3.1 no AAAA for v4",
            "myservice.test.svc",
            T::AAAA,
            NoData,
            &[],
        ),
        (
            "2.3.1 AAAA",
            "v6svc.test.svc",
            T::AAAA,
            Records,
            &["2001:db8::1"],
        ),
        ("2.3.1 no A for v6", "v6svc.test.svc", T::A, NoData, &[]),
        (
            "2.3.1 other type",
            "myservice.test.svc",
            T::TXT,
            NoData,
            &[],
        ),
        (
            "2.3.1 ANY",
            "myservice.test.svc",
            T::ANY,
            Records,
            &["10.42.42.42"],
        ),
        (
            "2.3.1 VIP not allocated yet",
            "pending.test.svc",
            T::A,
            NoData,
            &[],
        ),
        // spec 2.3.2: SRV per named port, target the service name; unnamed ports have none.
        (
            "2.3.2 SRV tcp",
            "_https._tcp.myservice.test.svc",
            T::SRV,
            Records,
            &["10 100 443 myservice.test.svc.clusterset.local."],
        ),
        (
            "2.3.2 SRV udp",
            "_dns._udp.myservice.test.svc",
            T::SRV,
            Records,
            &["10 100 53 myservice.test.svc.clusterset.local."],
        ),
        (
            "2.3.2 wrong protocol",
            "_https._udp.myservice.test.svc",
            T::SRV,
            NxDomain,
            &[],
        ),
        (
            "2.3.2 unknown port",
            "_grpc._tcp.myservice.test.svc",
            T::SRV,
            NxDomain,
            &[],
        ),
        (
            "2.3.2 SRV name, A asked",
            "_https._tcp.myservice.test.svc",
            T::A,
            NoData,
            &[],
        ),
        (
            "2.3.2 _proto is a non-terminal",
            "_tcp.myservice.test.svc",
            T::SRV,
            NoData,
            &[],
        ),
        // spec 2.3.4: no per-cluster names for ClusterSetIP services.
        (
            "2.3.4 cluster name",
            "clustera.myservice.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
        (
            "2.3.4 endpoint name",
            "pod-a.clustera.myservice.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
        // spec 2.4.1: every ready endpoint of every cluster; unready ones never appear.
        (
            "2.4.1 A",
            "headless.test.svc",
            T::A,
            Records,
            &["10.3.0.100", "10.3.0.101", "10.4.0.1"],
        ),
        (
            "2.4.1 AAAA",
            "headless.test.svc",
            T::AAAA,
            Records,
            &["2001:db8::2"],
        ),
        (
            "2.4.1 hostname A",
            "my-pet-1.clustera.headless.test.svc",
            T::A,
            Records,
            &["10.3.0.100"],
        ),
        (
            "2.4.1 dual-stack hostname A",
            "my-pet-1.clusterb.headless.test.svc",
            T::A,
            Records,
            &["10.4.0.1"],
        ),
        (
            "2.4.1 dual-stack hostname AAAA",
            "my-pet-1.clusterb.headless.test.svc",
            T::AAAA,
            Records,
            &["2001:db8::2"],
        ),
        // spec 2.1 "hostname" (b): a system-assigned identifier when the endpoint has none.
        (
            "2.1 assigned hostname",
            "10-3-0-101.clustera.headless.test.svc",
            T::A,
            Records,
            &["10.3.0.101"],
        ),
        (
            "2.4.1 unready hostname",
            "my-pet-3.clustera.headless.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
        (
            "2.4.1 hostname, other family",
            "my-pet-1.clustera.headless.test.svc",
            T::AAAA,
            NoData,
            &[],
        ),
        (
            "2.4.1 no ready endpoint: NXDOMAIN",
            "empty-headless.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
        (
            "2.4.1 no ready endpoint: nothing below",
            "_https._tcp.empty-headless.test.svc",
            T::SRV,
            NxDomain,
            &[],
        ),
        // spec 2.4.2: SRV per (ready endpoint hostname, cluster) and named port.
        (
            "2.4.2 SRV",
            "_https._tcp.headless.test.svc",
            T::SRV,
            Records,
            &[
                "10 100 443 10-3-0-101.clustera.headless.test.svc.clusterset.local.",
                "10 100 443 my-pet-1.clustera.headless.test.svc.clusterset.local.",
                "10 100 443 my-pet-1.clusterb.headless.test.svc.clusterset.local.",
            ],
        ),
        // spec 2.4.4: no records for a single cluster; the name exists only as the parent of
        // endpoint names (RFC 8020), so NODATA, never an address.
        (
            "2.4.4 cluster name",
            "clustera.headless.test.svc",
            T::A,
            NoData,
            &[],
        ),
        (
            "2.4.4 unknown cluster",
            "clusterc.headless.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
        // Names above services: empty non-terminals while something lives below them.
        ("svc non-terminal", "svc", T::A, NoData, &[]),
        ("namespace non-terminal", "test.svc", T::A, NoData, &[]),
        ("unknown namespace", "nope.svc", T::A, NxDomain, &[]),
        ("unknown service", "missing.test.svc", T::A, NxDomain, &[]),
        ("unknown top label", "pods", T::A, NxDomain, &[]),
        ("too deep", "a.b.c.headless.test.svc", T::A, NxDomain, &[]),
        // A service that is not a DNS label has no records.
        (
            "unnameable service",
            "bad_name.test.svc",
            T::A,
            NxDomain,
            &[],
        ),
    ];
    for (spec, relative, query_type, kind, expected) in cases {
        let fqdn = if relative.is_empty() {
            Z.to_owned()
        } else {
            format!("{relative}.{Z}")
        };
        let answer = zone.answer(&name(&fqdn), *query_type);
        assert_eq!(
            answer.kind, *kind,
            "{spec}: {fqdn} {query_type}: {answer:?}"
        );
        assert_eq!(
            rendered(&answer.answers),
            *expected,
            "{spec}: {fqdn} {query_type}"
        );
        for record in &answer.answers {
            assert_eq!(record.ttl, DEFAULT_TTL, "{spec}: TTL");
            assert_eq!(record.name, name(&fqdn), "{spec}: owner");
        }
        // RFC 2308: negative answers carry the zone's SOA so they can be cached.
        let soa_in_authority = answer
            .authority
            .iter()
            .any(|r| r.record_type() == RecordType::SOA);
        assert_eq!(
            soa_in_authority,
            matches!(kind, NoData | NxDomain),
            "{spec}: SOA in authority"
        );
    }
}

#[test]
fn reverse_names_of_addresses_the_zone_owns() {
    let zone = zone();
    let cases: &[(&str, &str, AnswerKind, &[&str])] = &[
        // spec 2.3.3: PTR of an IPv4 and an IPv6 ClusterSetIP.
        (
            "2.3.3 v4",
            "42.42.42.10.in-addr.arpa.",
            Records,
            &["myservice.test.svc.clusterset.local."],
        ),
        (
            "2.3.3 v6",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            Records,
            &["v6svc.test.svc.clusterset.local."],
        ),
        // spec 2.4.3: PTR of ready headless endpoints, to the endpoint name.
        (
            "2.4.3 v4",
            "100.0.3.10.in-addr.arpa.",
            Records,
            &["my-pet-1.clustera.headless.test.svc.clusterset.local."],
        ),
        (
            "2.4.3 v6",
            "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            Records,
            &["my-pet-1.clusterb.headless.test.svc.clusterset.local."],
        ),
        // Unready endpoints, ClusterSetIP endpoints and strangers are not ours (forwarded
        // once forwarding exists; REFUSED until then).
        ("2.4.3 unready", "102.0.3.10.in-addr.arpa.", OutOfZone, &[]),
        (
            "2.3.3 backend of a ClusterSetIP",
            "1.0.3.10.in-addr.arpa.",
            OutOfZone,
            &[],
        ),
        ("stranger", "1.1.1.1.in-addr.arpa.", OutOfZone, &[]),
        ("partial reverse name", "10.in-addr.arpa.", OutOfZone, &[]),
    ];
    for (spec, fqdn, kind, expected) in cases {
        let answer = zone.answer(&name(fqdn), RecordType::PTR);
        assert_eq!(answer.kind, *kind, "{spec}: {answer:?}");
        assert_eq!(rendered(&answer.answers), *expected, "{spec}");
    }
    // An owned reverse name asked for another type: exists, NODATA, and no SOA of ours.
    let answer = zone.answer(&name("42.42.42.10.in-addr.arpa."), RecordType::A);
    assert_eq!(answer.kind, NoData);
    assert!(answer.authority.is_empty());
}

#[test]
fn srv_answers_carry_target_addresses_in_additional() {
    let zone = zone();
    let answer = zone.answer(
        &name("_https._tcp.myservice.test.svc.clusterset.local."),
        T::SRV,
    );
    assert_eq!(rendered(&answer.additionals), ["10.42.42.42"]);
    assert_eq!(
        answer.additionals[0].name,
        name("myservice.test.svc.clusterset.local.")
    );
    let answer = zone.answer(
        &name("_https._tcp.headless.test.svc.clusterset.local."),
        T::SRV,
    );
    assert_eq!(
        rendered(&answer.additionals),
        ["10.3.0.100", "10.3.0.101", "10.4.0.1", "2001:db8::2"]
    );
}

#[test]
fn outside_the_zone_is_refused_for_now() {
    let answer = zone().answer(&name("example.com."), T::A);
    assert_eq!(answer, Answer::empty(OutOfZone));
    assert_eq!(OutOfZone.response_code(), ResponseCode::Refused);
    assert!(!OutOfZone.authoritative());
    assert_eq!(NxDomain.response_code(), ResponseCode::NXDomain);
    assert_eq!(NoData.response_code(), ResponseCode::NoError);
}

#[test]
fn zone_and_ttl_are_configurable() {
    let settings = ZoneSettings::new("MCS.Example", 30, DEFAULT_MAX_RECORDS).unwrap();
    let zone = ClusterSetZone::from_snapshot(&snapshot(), &settings, 1);
    let answer = zone.answer(&name("myservice.test.svc.mcs.example."), T::A);
    assert_eq!(rendered(&answer.answers), ["10.42.42.42"]);
    assert_eq!(answer.answers[0].ttl, 30);
    let answer = zone.answer(&name("_https._tcp.myservice.test.svc.mcs.example."), T::SRV);
    assert_eq!(
        rendered(&answer.answers),
        ["10 100 443 myservice.test.svc.mcs.example."]
    );
    // The default zone is now someone else's.
    let answer = zone.answer(&name("myservice.test.svc.clusterset.local."), T::A);
    assert_eq!(answer.kind, OutOfZone);
    // The SOA minimum (negative-caching TTL) follows the TTL.
    let answer = zone.answer(&name("missing.test.svc.mcs.example."), T::A);
    assert_eq!(answer.authority[0].ttl, 30);
}

#[test]
fn default_settings() {
    let settings = ZoneSettings::default();
    assert_eq!(settings.origin(), &name(DEFAULT_ZONE));
    assert_eq!(settings.ttl(), DEFAULT_TTL);
    assert_eq!(settings.max_records(), DEFAULT_MAX_RECORDS);
}

#[test]
fn invalid_settings_are_rejected() {
    assert!(matches!(
        ZoneSettings::new(".", 5, 10),
        Err(RecordsError::InvalidZone { .. })
    ));
    assert!(matches!(
        ZoneSettings::new("clusterset.local", 5, 0),
        Err(RecordsError::NoRecordsAllowed(0))
    ));
}

#[test]
fn answers_are_bounded() {
    let endpoints = (0..200)
        .map(|i| endpoint(&format!("10.9.{}.{}", i / 250, i % 250 + 1), true, ""))
        .collect();
    let snapshot = pb::CatalogSnapshot {
        gateways: vec![],
        cluster: "clustera".into(),
        services: vec![service(
            "big",
            "Headless",
            "",
            vec![port("http", "TCP", 80)],
            vec![cluster("clustera", endpoints)],
        )],
    };
    let settings = ZoneSettings::new(DEFAULT_ZONE, 5, 50).unwrap();
    let zone = ClusterSetZone::from_snapshot(&snapshot, &settings, 1);
    let answer = zone.answer(&name("big.test.svc.clusterset.local."), T::A);
    assert_eq!(answer.answers.len(), 50);
    let answer = zone.answer(&name("_http._tcp.big.test.svc.clusterset.local."), T::SRV);
    assert_eq!(answer.answers.len() + answer.additionals.len(), 50);
    assert_eq!(answer.answers.len(), 50);
}

#[test]
fn unnameable_entries_are_reported_and_first_ptr_wins() {
    let mut snapshot = snapshot();
    // A second service with myservice's VIP, sorting after it.
    snapshot.services.push(service(
        "zz-alias",
        "ClusterSetIP",
        "10.42.42.42",
        vec![],
        vec![],
    ));
    let zone = ClusterSetZone::from_snapshot(&snapshot, &ZoneSettings::default(), 1);
    assert!(
        zone.skipped().iter().any(|s| s.contains("Bad_Name")),
        "{:?}",
        zone.skipped()
    );
    let answer = zone.answer(&name("42.42.42.10.in-addr.arpa."), T::PTR);
    assert_eq!(
        rendered(&answer.answers),
        ["myservice.test.svc.clusterset.local."]
    );
    // Headless services without a ready endpoint do not count as existing.
    assert_eq!(zone.service_count(), 5);
}

#[test]
fn an_empty_catalog_still_has_its_apex() {
    let zone = ClusterSetZone::empty(&ZoneSettings::default(), 1);
    assert_eq!(zone.answer(&name(Z), T::SOA).kind, Records);
    assert_eq!(
        zone.answer(&name("dns-version.clusterset.local."), T::TXT)
            .kind,
        Records
    );
    assert_eq!(
        zone.answer(&name("svc.clusterset.local."), T::A).kind,
        NxDomain
    );
}
