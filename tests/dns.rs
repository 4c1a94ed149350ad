//! The DNS server on 127.0.0.1 (port 0), asked from outside the process the way resolvers and
//! people ask it.
//!
//! The conformance table ([`conformance_cases`]) lists every record kind of the MCS DNS
//! specification v1.0.0 with its negative cases (NXDOMAIN versus NODATA, no per-cluster names
//! for ClusterSetIP services, names outside the zone), truncation over UDP with the retry over
//! TCP, and EDNS0. Every case is asked with hickory's client and with `dig`, each over UDP
//! with EDNS, UDP without EDNS, and TCP, and both answers are held to the same exact
//! expectations: response code, header flags, OPT record, and every record of every section.
//! `dig` (Debian `bind9-dnsutils`) is skipped with a message when absent, except under
//! `CI=true`, where its absence fails the test.
//!
//! The other tests: catalog changes visible on the next query, the catalog follower
//! reconnecting to a catalog API that goes away, protocol edge cases, and a gateway's catalog
//! feeding the server over mTLS.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequestOptions, DnsResponse, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use isthmus_api::catalog as pb;
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::catalog::catalog_server::{Catalog, CatalogServer};
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_dns::{
    Backoff, DnsServer, ServerSettings, ZoneFeed, ZoneReceiver, ZoneSettings, follow_catalog,
};
use tokio_stream::{Stream, StreamExt};

use crate::support::in_ci;

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
                local_target_port: 0,
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

/// The catalog the conformance table is asked against. `myservice` comes first: the other
/// tests change it by index.
fn snapshot() -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        gateways: vec![],
        cluster: "clustera".into(),
        services: vec![
            service(
                "myservice",
                "ClusterSetIP",
                "10.42.42.42",
                &[("https", "TCP", 443), ("dns", "UDP", 53), ("", "TCP", 8080)],
                vec![("clustera", vec![endpoint("10.3.0.1", true, "pod-a")])],
            ),
            service(
                "v6svc",
                "ClusterSetIP",
                "2001:db8::1",
                &[("http", "TCP", 80)],
                vec![],
            ),
            service("pending", "ClusterSetIP", "", &[], vec![]),
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
                            endpoint("10.3.0.101", true, ""),
                            endpoint("10.3.0.102", false, "my-pet-3"),
                        ],
                    ),
                    (
                        "clusterb",
                        vec![
                            endpoint("10.4.0.1", true, "my-pet-1"),
                            endpoint("2001:db8::2", true, "my-pet-1"),
                        ],
                    ),
                ],
            ),
            service(
                "empty-headless",
                "Headless",
                "",
                &[("https", "TCP", 443)],
                vec![("clustera", vec![endpoint("10.5.0.1", false, "sleepy")])],
            ),
            // Sized against the UDP limits: 40 A records need more than 512 bytes and less
            // than 1232, 300 need more than 1232, and 16 SRV records fit 1232 bytes while
            // their 16 addresses in the additional section do not.
            many_endpoints("forty", 7, 40),
            many_endpoints("big", 9, 300),
            many_endpoints("mid", 8, 16),
        ],
    }
}

/// The addresses of [`many_endpoints`]: `10.<octet>.<i / 200>.<i % 200 + 1>`.
fn many_address(octet: u8, i: usize) -> String {
    format!("10.{octet}.{}.{}", i / 200, i % 200 + 1)
}

/// A headless service `name` with `count` ready endpoints without hostnames in `clustera`,
/// named by their addresses under `10.<octet>.`.
fn many_endpoints(name: &str, octet: u8, count: usize) -> pb::GlobalService {
    service(
        name,
        "Headless",
        "",
        &[("http", "TCP", 80)],
        vec![(
            "clustera",
            (0..count)
                .map(|i| endpoint(&many_address(octet, i), true, ""))
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

/// The answers' data as text, sorted.
fn rendered(response: &DnsResponse) -> Vec<String> {
    let mut out: Vec<String> = response
        .answers
        .iter()
        .map(|r| r.data.to_string())
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------
// The conformance table
// ---------------------------------------------------------------------------------------

const ZONE: &str = "clusterset.local.";
/// The TTL of every record, the SOA included (`ZoneSettings::default`).
const TTL: u32 = 5;
/// The payload limit the server announces to EDNS clients (`ServerSettings::default`); both
/// clients offer the same 1232 bytes.
const EDNS_PAYLOAD: u16 = 1232;
/// `AA` column values.
const AA: bool = true;
const NOT_AA: bool = false;
/// The authority section of a negative answer in the zone (RFC 2308): the zone's SOA, serial
/// 1 after the one publication.
const SOA: &[&str] = &[
    "clusterset.local. SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 7200 1800 86400 5",
];
const NONE: &[&str] = &[];

/// What the first UDP response of a case looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Udp {
    /// The whole answer, TC clear.
    Whole,
    /// TC clear, the optional additional section left out (RFC 2181 9).
    NoAdditionals,
    /// TC set with part of the answer; the client asks again over TCP (RFC 7766 5).
    Truncated,
}

/// One question and everything its response must hold.
#[derive(Debug)]
struct Case {
    spec: &'static str,
    /// Absolute, as asked.
    name: String,
    query_type: RecordType,
    rcode: ResponseCode,
    /// The AA flag.
    aa: bool,
    /// `TYPE rdata` in dig's presentation format; every owner is the question's name and
    /// every TTL is [`TTL`].
    answers: Vec<String>,
    /// `owner TYPE rdata`.
    authority: Vec<String>,
    /// `owner TYPE rdata` (the OPT record is checked on its own).
    additional: Vec<String>,
    /// The first UDP response with EDNS (1232 bytes) and without (512 bytes).
    udp: [Udp; 2],
}

/// A row of the table. `name` is relative to the zone unless it ends with a dot.
fn row(
    spec: &'static str,
    name: &str,
    query_type: RecordType,
    rcode: ResponseCode,
    aa: bool,
    answers: &[&str],
    authority: &[&str],
) -> Case {
    let name = if name.ends_with('.') {
        name.to_owned()
    } else if name.is_empty() {
        ZONE.to_owned()
    } else {
        format!("{name}.{ZONE}")
    };
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
    Case {
        spec,
        name,
        query_type,
        rcode,
        aa,
        answers: strings(answers),
        authority: strings(authority),
        additional: Vec::new(),
        udp: [Udp::Whole; 2],
    }
}

impl Case {
    fn additional(mut self, records: impl IntoIterator<Item = String>) -> Self {
        self.additional = records.into_iter().collect();
        self
    }

    fn answers(mut self, records: impl IntoIterator<Item = String>) -> Self {
        self.answers = records.into_iter().collect();
        self
    }

    fn udp(mut self, with_edns: Udp, without_edns: Udp) -> Self {
        self.udp = [with_edns, without_edns];
        self
    }
}

/// Every case of the conformance table; each cites the section of the spec (or the RFC) it
/// checks. Names are relative to the zone unless they end with a dot.
#[rustfmt::skip]
fn conformance_cases() -> Vec<Case> {
    use RecordType::{A, AAAA, ANY, NS, PTR, SOA as Soa, SRV, TXT};
    use ResponseCode::{NXDomain, NoError, Refused};
    let v6 = |host: u8| {
        format!("{host}.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.")
    };
    let v6 = [v6(1), v6(2)];
    let named = |octet: u8, i: usize, service: &str| {
        format!("{}.clustera.{service}.test.svc.{ZONE}", many_address(octet, i).replace('.', "-"))
    };
    let apex_soa = "SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 7200 1800 86400 5";
    vec![
        // spec                  name                                  type  rcode     AA      answers / authority
        // Spec 2.2: the schema version.
        row("2.2",                   "dns-version",                        TXT,  NoError,  AA,     &["TXT \"1.0.0\""], NONE),
        row("2.2 NODATA",            "dns-version",                        A,    NoError,  AA,     NONE, SOA),
        // The zone apex.
        row("apex SOA",              "",                                   Soa,  NoError,  AA,     &[apex_soa], NONE),
        row("apex NS",               "",                                   NS,   NoError,  AA,     &["NS ns.dns.clusterset.local."], NONE),
        row("apex NODATA",           "",                                   A,    NoError,  AA,     NONE, SOA),
        // Spec 2.3.1: the ClusterSetIP, of its own family only.
        row("2.3.1 A",               "myservice.test.svc",                 A,    NoError,  AA,     &["A 10.42.42.42"], NONE),
        row("2.3.1 any case",        "MyService.TEST.svc",                 A,    NoError,  AA,     &["A 10.42.42.42"], NONE),
        row("2.3.1 no AAAA",         "myservice.test.svc",                 AAAA, NoError,  AA,     NONE, SOA),
        row("2.3.1 AAAA",            "v6svc.test.svc",                     AAAA, NoError,  AA,     &["AAAA 2001:db8::1"], NONE),
        row("2.3.1 no A",            "v6svc.test.svc",                     A,    NoError,  AA,     NONE, SOA),
        row("2.3.1 other type",      "myservice.test.svc",                 TXT,  NoError,  AA,     NONE, SOA),
        row("2.3.1 ANY",             "myservice.test.svc",                 ANY,  NoError,  AA,     &["A 10.42.42.42"], NONE),
        row("2.3.1 no VIP yet",      "pending.test.svc",                   A,    NoError,  AA,     NONE, SOA),
        // Spec 2.3.2: SRV per named port, the service as target, its address as additional.
        row("2.3.2 SRV",             "_https._tcp.myservice.test.svc",     SRV,  NoError,  AA,
            &["SRV 10 100 443 myservice.test.svc.clusterset.local."], NONE)
            .additional(["myservice.test.svc.clusterset.local. A 10.42.42.42".to_owned()]),
        row("2.3.2 SRV udp",         "_dns._udp.myservice.test.svc",       SRV,  NoError,  AA,
            &["SRV 10 100 53 myservice.test.svc.clusterset.local."], NONE)
            .additional(["myservice.test.svc.clusterset.local. A 10.42.42.42".to_owned()]),
        row("2.3.2 wrong protocol",  "_https._udp.myservice.test.svc",     SRV,  NXDomain, AA,     NONE, SOA),
        row("2.3.2 unknown port",    "_grpc._tcp.myservice.test.svc",      SRV,  NXDomain, AA,     NONE, SOA),
        row("2.3.2 A at SRV name",   "_https._tcp.myservice.test.svc",     A,    NoError,  AA,     NONE, SOA),
        row("2.3.2 _proto is ENT",   "_tcp.myservice.test.svc",            SRV,  NoError,  AA,     NONE, SOA),
        // Spec 2.3.3: PTR of ClusterSetIPs. Another type there is NODATA without our SOA (the
        // reverse zone is not ours); addresses the zone does not own are not ours at all.
        row("2.3.3 PTR v4",          "42.42.42.10.in-addr.arpa.",          PTR,  NoError,  AA,
            &["PTR myservice.test.svc.clusterset.local."], NONE),
        row("2.3.3 PTR v6",          &v6[0],                               PTR,  NoError,  AA,
            &["PTR v6svc.test.svc.clusterset.local."], NONE),
        row("2.3.3 A at PTR name",   "42.42.42.10.in-addr.arpa.",          A,    NoError,  AA,     NONE, NONE),
        row("2.3.3 backend address", "1.0.3.10.in-addr.arpa.",             PTR,  Refused,  NOT_AA, NONE, NONE),
        // Spec 2.3.4: no per-cluster names for ClusterSetIP services.
        row("2.3.4 cluster name",    "clustera.myservice.test.svc",        A,    NXDomain, AA,     NONE, SOA),
        row("2.3.4 endpoint name",   "pod-a.clustera.myservice.test.svc",  A,    NXDomain, AA,     NONE, SOA),
        // Spec 2.4.1: every ready endpoint across the clusterset; hostnames per cluster.
        row("2.4.1 A",               "headless.test.svc",                  A,    NoError,  AA,
            &["A 10.3.0.100", "A 10.3.0.101", "A 10.4.0.1"], NONE),
        row("2.4.1 AAAA",            "headless.test.svc",                  AAAA, NoError,  AA,     &["AAAA 2001:db8::2"], NONE),
        row("2.4.1 hostname",        "my-pet-1.clustera.headless.test.svc", A,   NoError,  AA,     &["A 10.3.0.100"], NONE),
        row("2.4.1 dual-stack A",    "my-pet-1.clusterb.headless.test.svc", A,   NoError,  AA,     &["A 10.4.0.1"], NONE),
        row("2.4.1 dual-stack AAAA", "my-pet-1.clusterb.headless.test.svc", AAAA, NoError, AA,     &["AAAA 2001:db8::2"], NONE),
        row("2.1 assigned hostname", "10-3-0-101.clustera.headless.test.svc", A, NoError,  AA,     &["A 10.3.0.101"], NONE),
        row("2.4.1 hostname NODATA", "my-pet-1.clustera.headless.test.svc", AAAA, NoError, AA,     NONE, SOA),
        row("2.4.1 unready",         "my-pet-3.clustera.headless.test.svc", A,   NXDomain, AA,     NONE, SOA),
        row("2.4.1 none ready",      "empty-headless.test.svc",            A,    NXDomain, AA,     NONE, SOA),
        row("2.4.1 none ready SRV",  "_https._tcp.empty-headless.test.svc", SRV, NXDomain, AA,     NONE, SOA),
        // Spec 2.4.2: SRV per ready endpoint, endpoint addresses as additionals.
        row("2.4.2 SRV",             "_https._tcp.headless.test.svc",      SRV,  NoError,  AA, &[
                "SRV 10 100 443 10-3-0-101.clustera.headless.test.svc.clusterset.local.",
                "SRV 10 100 443 my-pet-1.clustera.headless.test.svc.clusterset.local.",
                "SRV 10 100 443 my-pet-1.clusterb.headless.test.svc.clusterset.local.",
            ], NONE)
            .additional([
                "10-3-0-101.clustera.headless.test.svc.clusterset.local. A 10.3.0.101",
                "my-pet-1.clustera.headless.test.svc.clusterset.local. A 10.3.0.100",
                "my-pet-1.clusterb.headless.test.svc.clusterset.local. A 10.4.0.1",
                "my-pet-1.clusterb.headless.test.svc.clusterset.local. AAAA 2001:db8::2",
            ].map(str::to_owned)),
        // Spec 2.4.3: PTR of ready endpoints, to their endpoint names.
        row("2.4.3 PTR v4",          "100.0.3.10.in-addr.arpa.",           PTR,  NoError,  AA,
            &["PTR my-pet-1.clustera.headless.test.svc.clusterset.local."], NONE),
        row("2.4.3 PTR v6",          &v6[1],                               PTR,  NoError,  AA,
            &["PTR my-pet-1.clusterb.headless.test.svc.clusterset.local."], NONE),
        row("2.4.3 unready",         "102.0.3.10.in-addr.arpa.",           PTR,  Refused,  NOT_AA, NONE, NONE),
        // Spec 2.4.4: a cluster's name exists only above endpoint names (RFC 8020).
        row("2.4.4 cluster is ENT",  "clustera.headless.test.svc",         A,    NoError,  AA,     NONE, SOA),
        row("2.4.4 other cluster",   "clusterc.headless.test.svc",         A,    NXDomain, AA,     NONE, SOA),
        // Names above services: empty non-terminals while something lives below them.
        row("svc is ENT",            "svc",                                A,    NoError,  AA,     NONE, SOA),
        row("namespace is ENT",      "test.svc",                           A,    NoError,  AA,     NONE, SOA),
        row("unknown namespace",     "nope.svc",                           A,    NXDomain, AA,     NONE, SOA),
        row("unknown service",       "missing.test.svc",                   A,    NXDomain, AA,     NONE, SOA),
        row("unknown top label",     "pods",                               A,    NXDomain, AA,     NONE, SOA),
        row("too deep",              "a.b.c.headless.test.svc",            A,    NXDomain, AA,     NONE, SOA),
        // Outside the zone: not ours (this server has no forwarder).
        row("outside the zone",      "example.com.",                       A,    Refused,  NOT_AA, NONE, NONE),
        row("stranger reverse",      "1.1.1.1.in-addr.arpa.",              PTR,  Refused,  NOT_AA, NONE, NONE),
        // Truncation (RFC 1035 4.2.1, RFC 6891 7, RFC 7766 5): what does not fit the UDP limit
        // sets TC and comes whole over TCP; EDNS raises the limit from 512 to 1232 bytes.
        // Optional additionals are dropped rather than setting TC (RFC 2181 9).
        row("40 A fit with EDNS",    "forty.test.svc",                     A,    NoError,  AA,     NONE, NONE)
            .answers((0..40).map(|i| format!("A {}", many_address(7, i))))
            .udp(Udp::Whole, Udp::Truncated),
        row("300 A never fit UDP",   "big.test.svc",                       A,    NoError,  AA,     NONE, NONE)
            .answers((0..300).map(|i| format!("A {}", many_address(9, i))))
            .udp(Udp::Truncated, Udp::Truncated),
        row("SRV sheds additionals", "_http._tcp.mid.test.svc",            SRV,  NoError,  AA,     NONE, NONE)
            .answers((0..16).map(|i| format!("SRV 10 100 80 {}", named(8, i, "mid"))))
            .additional((0..16).map(|i| format!("{} A {}", named(8, i, "mid"), many_address(8, i))))
            .udp(Udp::NoAdditionals, Udp::Truncated),
    ]
}

/// How a case is asked: the transport, and whether with EDNS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    UdpEdns,
    UdpPlain,
    Tcp,
}

const MODES: [Mode; 3] = [Mode::UdpEdns, Mode::UdpPlain, Mode::Tcp];

/// A resource record as either client shows it.
#[derive(Debug, Clone)]
struct Rr {
    /// Lowercase, absolute.
    owner: String,
    ttl: u32,
    /// `TYPE rdata`.
    text: String,
}

/// A response as either client saw it, after the retry over TCP when the UDP one was
/// truncated.
#[derive(Debug, Default)]
struct Observed {
    /// dig's mnemonic: `NOERROR`, `NXDOMAIN`...
    status: String,
    /// Header flags by dig's names: `qr`, `aa`, `tc`, `rd`, `ra`, `ad`, `cd`.
    flags: BTreeSet<String>,
    /// The OPT record: (version, UDP payload).
    edns: Option<(u8, u16)>,
    answers: Vec<Rr>,
    authority: Vec<Rr>,
    additional: Vec<Rr>,
    /// The UDP response was truncated and the question asked again over TCP.
    retried: bool,
    /// The answers of the truncated UDP response, when the client shows them (hickory).
    truncated_answers: Option<Vec<Rr>>,
}

fn status_mnemonic(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        other => panic!("no mnemonic for {other:?} in this table"),
    }
}

/// Holds `seen` (from client `via`, asked in `mode`) to `case`.
fn check(case: &Case, via: &str, mode: Mode, seen: &Observed) {
    let what = format!(
        "{via} {mode:?} [{}] {} {}",
        case.spec, case.name, case.query_type
    );
    let udp = match mode {
        Mode::UdpEdns => case.udp[0],
        Mode::UdpPlain => case.udp[1],
        Mode::Tcp => Udp::Whole,
    };
    assert_eq!(
        seen.retried,
        udp == Udp::Truncated,
        "{what}: TC on the UDP response"
    );
    assert_eq!(seen.status, status_mnemonic(case.rcode), "{what}: rcode");
    let mut flags = BTreeSet::from(["qr".to_owned()]);
    if case.aa {
        flags.insert("aa".to_owned());
    }
    assert_eq!(seen.flags, flags, "{what}: header flags");
    let edns = (mode != Mode::UdpPlain).then_some((0, EDNS_PAYLOAD));
    assert_eq!(seen.edns, edns, "{what}: OPT record (RFC 6891 6.1.1)");

    // Names compare without regard to case (RFC 4343).
    let owner = case.name.to_ascii_lowercase();
    let answers: Vec<String> = seen
        .answers
        .iter()
        .map(|rr| {
            assert_eq!(rr.owner, owner, "{what}: answer owner");
            rr.text.clone()
        })
        .collect();
    assert_eq!(
        sorted(answers),
        sorted(case.answers.clone()),
        "{what}: answers"
    );
    let owned = |rrs: &[Rr]| sorted(rrs.iter().map(|rr| format!("{} {}", rr.owner, rr.text)));
    assert_eq!(
        owned(&seen.authority),
        sorted(case.authority.clone()),
        "{what}: authority"
    );
    let additional = if udp == Udp::NoAdditionals {
        Vec::new()
    } else {
        sorted(case.additional.clone())
    };
    assert_eq!(owned(&seen.additional), additional, "{what}: additional");
    for rr in seen
        .answers
        .iter()
        .chain(&seen.authority)
        .chain(&seen.additional)
    {
        assert_eq!(rr.ttl, TTL, "{what}: TTL of {rr:?}");
    }
    // A truncated response holds part of the answer, never something else.
    if let Some(partial) = &seen.truncated_answers {
        assert!(
            partial.len() < case.answers.len(),
            "{what}: TC with {} of {} answers",
            partial.len(),
            case.answers.len()
        );
        for rr in partial {
            assert!(case.answers.contains(&rr.text), "{what}: truncated {rr:?}");
        }
    }
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().collect();
    items.sort();
    items
}

// hickory's side of the table.

/// hickory clients for one mode: the first to ask, and the TCP one to retry on TC with the
/// same EDNS setting.
struct HickoryClients {
    first: Client<TokioRuntimeProvider>,
    retry: Client<TokioRuntimeProvider>,
}

impl HickoryClients {
    async fn new(server: SocketAddr, mode: Mode) -> Self {
        let mut first = client(
            server,
            if mode == Mode::Tcp {
                Transport::Tcp
            } else {
                Transport::Udp
            },
        )
        .await;
        let mut retry = client(server, Transport::Tcp).await;
        if mode == Mode::UdpPlain {
            first.disable_edns();
            retry.disable_edns();
        }
        Self { first, retry }
    }
}

/// One question as `dig +norecurse` asks it: RD clear, EDNS as the client is set.
async fn ask_norecurse(
    client: &Client<TokioRuntimeProvider>,
    name: &str,
    query_type: RecordType,
) -> DnsResponse {
    let mut options = DnsRequestOptions::default();
    options.use_edns = client.is_using_edns();
    options.recursion_desired = false;
    let query = Query::query(Name::from_ascii(name).unwrap(), query_type);
    let mut responses = client.lookup(query, options);
    tokio::time::timeout(Duration::from_secs(5), responses.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

fn hickory_rr(record: &Record) -> Rr {
    let data = match &record.data {
        // dig's presentation: each character-string quoted.
        RData::TXT(txt) => txt
            .txt_data
            .iter()
            .map(|s| format!("\"{}\"", String::from_utf8_lossy(s)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    Rr {
        owner: record.name.to_ascii().to_ascii_lowercase(),
        ttl: record.ttl,
        text: format!("{} {data}", record.record_type()),
    }
}

fn hickory_observed(response: &DnsResponse) -> Observed {
    let m = &response.metadata;
    let flags = [
        ("qr", m.message_type == MessageType::Response),
        ("aa", m.authoritative),
        ("tc", m.truncation),
        ("rd", m.recursion_desired),
        ("ra", m.recursion_available),
        ("ad", m.authentic_data),
        ("cd", m.checking_disabled),
    ];
    Observed {
        status: status_mnemonic(m.response_code).to_owned(),
        flags: flags
            .iter()
            .filter(|(_, set)| *set)
            .map(|(flag, _)| (*flag).to_owned())
            .collect(),
        edns: response
            .edns
            .as_ref()
            .map(|edns| (edns.version(), edns.max_payload())),
        answers: response.answers.iter().map(hickory_rr).collect(),
        authority: response.authorities.iter().map(hickory_rr).collect(),
        additional: response.additionals.iter().map(hickory_rr).collect(),
        retried: false,
        truncated_answers: None,
    }
}

async fn hickory_ask(clients: &HickoryClients, case: &Case) -> Observed {
    let first = ask_norecurse(&clients.first, &case.name, case.query_type).await;
    if !first.metadata.truncation {
        return hickory_observed(&first);
    }
    // What a stub resolver does with TC (RFC 7766 5): the same question over TCP.
    let retried = ask_norecurse(&clients.retry, &case.name, case.query_type).await;
    Observed {
        retried: true,
        truncated_answers: Some(first.answers.iter().map(hickory_rr).collect()),
        ..hickory_observed(&retried)
    }
}

// dig's side of the table.

/// Whether `dig` can run here: skipped with a message when it cannot, failed under CI.
fn dig_available() -> bool {
    match std::process::Command::new("dig").arg("-v").output() {
        Ok(output) if output.status.success() => true,
        outcome => {
            let message = format!(
                "dig cannot run ({outcome:?}); install it with `apt-get install -y bind9-dnsutils` \
                 (.ci/run does so when it is missing)"
            );
            assert!(!in_ci(), "{message}");
            eprintln!("SKIPPED the dig half of the DNS conformance table: {message}");
            false
        }
    }
}

/// Asks `case` with `dig +norecurse +time=2 +tries=1 @127.0.0.1 -p PORT`, printing every
/// section with its comments; dig retries over TCP by itself when TC is set.
fn dig_ask(server: SocketAddr, case: &Case, mode: Mode) -> (String, Observed) {
    let mut command = std::process::Command::new("dig");
    command.args(["+norecurse", "+time=2", "+tries=1"]);
    command.arg(format!("@{}", server.ip()));
    command.args(["-p", &server.port().to_string()]);
    command.args([case.name.as_str(), &case.query_type.to_string()]);
    command.args([
        "+noall",
        "+comments",
        "+answer",
        "+authority",
        "+additional",
    ]);
    match mode {
        Mode::UdpEdns => {}
        Mode::UdpPlain => {
            command.arg("+noedns");
        }
        Mode::Tcp => {
            command.arg("+tcp");
        }
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let seen = parse_dig(&stdout);
    (format!("{command:?}\n{stdout}"), seen)
}

/// Parses dig's `+noall +comments +answer +authority +additional` output.
fn parse_dig(output: &str) -> Observed {
    #[derive(Clone, Copy)]
    enum Section {
        None,
        Answer,
        Authority,
        Additional,
    }
    let mut seen = Observed::default();
    let mut section = Section::None;
    for line in output.lines() {
        if line.starts_with(";; Truncated, retrying in TCP mode") {
            seen.retried = true;
        } else if let Some(header) = line.strip_prefix(";; ->>HEADER<<- ") {
            let status = header.split("status: ").nth(1).unwrap();
            seen.status = status.split(',').next().unwrap().trim().to_owned();
        } else if let Some(flags) = line.strip_prefix(";; flags:") {
            seen.flags = flags
                .split(';')
                .next()
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        } else if let Some(edns) = line.strip_prefix("; EDNS: version: ") {
            // `; EDNS: version: 0, flags:; udp: 1232`
            let version = edns.split(',').next().unwrap().trim().parse().unwrap();
            let payload = edns.split("udp: ").nth(1).unwrap().trim().parse().unwrap();
            seen.edns = Some((version, payload));
        } else if line.starts_with(";; ANSWER SECTION:") {
            section = Section::Answer;
        } else if line.starts_with(";; AUTHORITY SECTION:") {
            section = Section::Authority;
        } else if line.starts_with(";; ADDITIONAL SECTION:") {
            section = Section::Additional;
        } else if !line.trim().is_empty() && !line.starts_with(';') {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [owner, ttl, class, rtype, data @ ..] = fields.as_slice() else {
                panic!("unexpected dig line {line:?}");
            };
            assert_eq!(*class, "IN", "{line}");
            let rr = Rr {
                owner: owner.to_ascii_lowercase(),
                ttl: ttl.parse().unwrap(),
                text: format!("{rtype} {}", data.join(" ")),
            };
            match section {
                Section::Answer => seen.answers.push(rr),
                Section::Authority => seen.authority.push(rr),
                Section::Additional => seen.additional.push(rr),
                Section::None => panic!("record outside a section: {line:?}"),
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_table_with_hickory_and_dig() {
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    feed.publish(&snapshot());
    let server = start(zone).await;
    let addr = server.local_addr();
    let cases = Arc::new(conformance_cases());

    for mode in MODES {
        let clients = HickoryClients::new(addr, mode).await;
        for case in cases.iter() {
            let seen = hickory_ask(&clients, case).await;
            check(case, "hickory", mode, &seen);
        }
    }

    if dig_available() {
        let dig_cases = cases.clone();
        tokio::task::spawn_blocking(move || {
            for mode in MODES {
                for case in dig_cases.iter() {
                    let (shown, seen) = dig_ask(addr, case, mode);
                    let outcome = std::panic::catch_unwind(|| check(case, "dig", mode, &seen));
                    if let Err(panic) = outcome {
                        eprintln!("{shown}");
                        std::panic::resume_unwind(panic);
                    }
                }
            }
        })
        .await
        .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// Changes one part of an observed response.
type Breakage = fn(&mut Observed);

/// The table's checks are exact: a response that differs in any one part fails them.
#[test]
fn conformance_checks_catch_every_difference() {
    let case = row(
        "self-test",
        "myservice.test.svc",
        RecordType::A,
        ResponseCode::NoError,
        AA,
        &["A 10.42.42.42"],
        NONE,
    );
    let good = || {
        parse_dig(
            ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1\n\
             ;; flags: qr aa; QUERY: 1, ANSWER: 1, AUTHORITY: 0, ADDITIONAL: 1\n\n\
             ;; OPT PSEUDOSECTION:\n; EDNS: version: 0, flags:; udp: 1232\n\
             ;; ANSWER SECTION:\n\
             myservice.test.svc.clusterset.local.\t5\tIN\tA\t10.42.42.42\n",
        )
    };
    check(&case, "self-test", Mode::UdpEdns, &good());
    let breakages: [(&str, Breakage); 9] = [
        ("rcode", |o| o.status = "NXDOMAIN".into()),
        ("AA", |o| {
            o.flags.remove("aa");
        }),
        ("RA", |o| {
            o.flags.insert("ra".into());
        }),
        ("OPT", |o| o.edns = None),
        ("answer", |o| o.answers[0].text = "A 10.42.42.43".into()),
        ("extra answer", |o| {
            let extra = o.answers[0].clone();
            o.answers.push(extra);
        }),
        ("owner", |o| {
            o.answers[0].owner = "x.test.svc.clusterset.local.".into()
        }),
        ("TTL", |o| o.answers[0].ttl = 30),
        ("TC", |o| o.retried = true),
    ];
    for (what, break_it) in breakages {
        let mut seen = good();
        break_it(&mut seen);
        let outcome = std::panic::catch_unwind(|| check(&case, "self-test", Mode::UdpEdns, &seen));
        assert!(outcome.is_err(), "a wrong {what} passed the check");
    }
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
