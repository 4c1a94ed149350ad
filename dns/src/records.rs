//! The clusterset zone as the Multi-Cluster Services DNS specification v1.0.0 defines it
//! (kubernetes/enhancements `keps/sig-multicluster/1645-multi-cluster-services-api/
//! specification.md`, "the spec" below), built once per catalog snapshot and then asked one
//! question at a time by [`ClusterSetZone::answer`], a pure function.
//!
//! Names the zone holds (`<zone>` is `clusterset.local.` unless configured):
//!
//! - `<zone>`: SOA and NS (the apex);
//! - `dns-version.<zone>`: TXT with the schema version (spec 2.2);
//! - `<svc>.<ns>.svc.<zone>`: the ClusterSetIP (spec 2.3.1), or every ready endpoint of a
//!   headless service across the clusterset (spec 2.4.1);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV per named port (spec 2.3.2, 2.4.2);
//! - `<hostname>.<clusterid>.<svc>.<ns>.svc.<zone>`: ready endpoints of headless services
//!   (spec 2.4.1);
//! - `svc.<zone>`, `<ns>.svc.<zone>`, `_<proto>.<svc>...` and `<clusterid>.<svc>...` of
//!   headless services exist only as empty non-terminals (RFC 8020: NODATA, not NXDOMAIN).
//!
//! Reverse names (`in-addr.arpa.`, `ip6.arpa.`) of ClusterSetIPs and ready headless endpoint
//! addresses answer PTR (spec 2.3.3, 2.4.3); every other name is outside the zone.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use isthmus_api::catalog as pb;

/// The schema version of the spec this zone implements (spec 1, answered per spec 2.2).
pub const DNS_SCHEMA_VERSION: &str = "1.0.0";

/// The zone the MCS API requires (spec 2.1, `<clustersetzone>`).
pub const DEFAULT_ZONE: &str = "clusterset.local.";

/// Default TTL of every record, in seconds: short, because endpoints move.
pub const DEFAULT_TTL: u32 = 5;

/// Default bound on the records of one answer (answer plus additional sections).
pub const DEFAULT_MAX_RECORDS: usize = 512;

/// SRV priority and weight: RFC 2782 numbers the spec leaves open; every target is equal.
const SRV_PRIORITY: u16 = 10;
const SRV_WEIGHT: u16 = 100;

/// SOA timers (seconds) for secondaries; nothing transfers this zone, so they are nominal.
const SOA_REFRESH: i32 = 7200;
const SOA_RETRY: i32 = 1800;
const SOA_EXPIRE: i32 = 86400;

/// Errors in the zone settings.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The zone is not a valid absolute DNS name, or too long to hold the spec's names.
    #[error("zone {zone:?} is not usable: {reason}")]
    InvalidZone {
        /// The zone as configured.
        zone: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The record bound is zero: no answer could ever be given.
    #[error("max_records must be at least 1, got {0}")]
    NoRecordsAllowed(usize),
}

/// How the zone is named and answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSettings {
    origin: Name,
    ttl: u32,
    max_records: usize,
    version_name: Name,
    nameserver: Name,
    hostmaster: Name,
}

impl ZoneSettings {
    /// Settings for `zone` (absolute or not; `clusterset.local` and `clusterset.local.` are
    /// the same), record TTL `ttl` seconds, and at most `max_records` records per answer.
    pub fn new(zone: &str, ttl: u32, max_records: usize) -> Result<Self, RecordsError> {
        let invalid = |reason: String| RecordsError::InvalidZone {
            zone: zone.to_owned(),
            reason,
        };
        if max_records == 0 {
            return Err(RecordsError::NoRecordsAllowed(max_records));
        }
        let mut origin = Name::from_ascii(zone)
            .map_err(|e| invalid(e.to_string()))?
            .to_lowercase();
        origin.set_fqdn(true);
        if origin.is_root() {
            return Err(invalid("the root cannot be the clusterset zone".into()));
        }
        let under = |prefix: &str| {
            Name::from_ascii(prefix)
                .and_then(|p| p.append_domain(&origin))
                .map_err(|e| invalid(e.to_string()))
        };
        // The longest names the zone builds are endpoint names under `svc`; leave them room.
        let version_name = under("dns-version")?;
        let nameserver = under("ns.dns")?;
        let hostmaster = under("hostmaster")?;
        Ok(Self {
            origin,
            ttl,
            max_records,
            version_name,
            nameserver,
            hostmaster,
        })
    }

    /// The zone apex, lowercase and absolute.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The TTL of every record, in seconds.
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// The bound on records per answer.
    pub fn max_records(&self) -> usize {
        self.max_records
    }
}

impl Default for ZoneSettings {
    fn default() -> Self {
        #[expect(
            clippy::expect_used,
            reason = "a constant zone; covered by the default_settings test"
        )]
        Self::new(DEFAULT_ZONE, DEFAULT_TTL, DEFAULT_MAX_RECORDS)
            .expect("BUG: the default zone is valid")
    }
}

/// A named port of a service: the only ports with SRV records (spec 2.3.2, 2.4.2).
#[derive(Debug, Clone)]
struct NamedPort {
    name: String,
    /// Lowercase: `tcp`, `udp`, `sctp`.
    protocol: String,
    port: u16,
}

/// A ready endpoint of a headless service, under its cluster.
#[derive(Debug, Clone)]
struct ReadyEndpoint {
    cluster: String,
    hostname: String,
    address: IpAddr,
    /// `<hostname>.<clusterid>.<svc>.<ns>.svc.<zone>`.
    name: Name,
}

#[derive(Debug, Clone)]
enum ServiceKind {
    /// `None` while the gateway has not allocated an address.
    ClusterSetIp(Option<IpAddr>),
    /// Only ready endpoints are kept: unready ones have no records at all.
    Headless(Vec<ReadyEndpoint>),
}

#[derive(Debug, Clone)]
struct Service {
    /// `<svc>.<ns>.svc.<zone>`.
    name: Name,
    ports: Vec<NamedPort>,
    kind: ServiceKind,
}

impl Service {
    /// Spec 2.4.1: a headless service with no ready endpoint answers NXDOMAIN; the names below
    /// it go with it (RFC 8020).
    fn exists(&self) -> bool {
        match &self.kind {
            ServiceKind::ClusterSetIp(_) => true,
            ServiceKind::Headless(endpoints) => !endpoints.is_empty(),
        }
    }
}

/// The zone built from one catalog snapshot, indexed for answering.
#[derive(Debug, Clone)]
pub struct ClusterSetZone {
    settings: ZoneSettings,
    serial: u32,
    /// By (namespace, name), lowercase.
    services: HashMap<(String, String), Service>,
    namespaces: HashSet<String>,
    /// One PTR target per address (spec 2.3.3 "Limitations": only one PTR may exist).
    reverse: HashMap<IpAddr, Name>,
    skipped: Vec<String>,
}

/// How a question was answered; maps to the response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// The name holds records of the asked type.
    Records,
    /// The name exists but holds no record of the asked type (NOERROR, empty answer).
    NoData,
    /// The name does not exist in the zone.
    NxDomain,
    /// The name is not ours to answer (outside the zone, or an address we do not own).
    OutOfZone,
}

impl AnswerKind {
    /// The DNS response code: REFUSED outside the zone (the server forwards those names instead
    /// when it has a forwarder).
    pub fn response_code(self) -> ResponseCode {
        match self {
            Self::Records | Self::NoData => ResponseCode::NoError,
            Self::NxDomain => ResponseCode::NXDomain,
            Self::OutOfZone => ResponseCode::Refused,
        }
    }

    /// Whether the answer is authoritative (AA): everything but names outside the zone.
    pub fn authoritative(self) -> bool {
        self != Self::OutOfZone
    }
}

/// The answer to one question: sections of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// How the question was answered.
    pub kind: AnswerKind,
    /// The answer section.
    pub answers: Vec<Record>,
    /// The authority section: the SOA on negative answers in the zone (RFC 2308).
    pub authority: Vec<Record>,
    /// The additional section: addresses of SRV targets (spec 2.3.2, 2.4.2 "may include").
    pub additionals: Vec<Record>,
}

impl Answer {
    fn empty(kind: AnswerKind) -> Self {
        Self {
            kind,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// Where a question's name lands.
enum Node<'z> {
    Apex,
    SchemaVersion,
    /// An empty non-terminal: exists, holds nothing.
    Interior,
    Service(&'z Service),
    Srv(&'z Service, &'z NamedPort),
    Host(&'z Service, &'z str, &'z str),
    Reverse(&'z Name),
}

enum Lookup<'z> {
    Found(Node<'z>),
    Missing,
    OutOfZone,
}

/// A Kubernetes DNS label (RFC 1123): what a namespace, service, cluster ID or hostname must
/// be to appear in a name.
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// The system-assigned hostname of an endpoint without one (spec 2.1 "hostname", case b):
/// its address with separators as dashes, unique within a cluster, as cluster DNS does.
fn address_label(address: IpAddr) -> String {
    address.to_string().replace(['.', ':'], "-")
}

fn prefixed(labels: &[&str], base: &Name) -> Option<Name> {
    Name::from_labels(labels.iter().copied())
        .and_then(|n| n.append_domain(base))
        .ok()
}

impl ClusterSetZone {
    /// Builds the zone from `snapshot`. Services and endpoints that cannot be named (a
    /// namespace, service, cluster ID or port that is not a DNS label, an unparsable address)
    /// are left out and listed in [`skipped`](Self::skipped). `serial` is the SOA serial.
    pub fn from_snapshot(
        snapshot: &pb::CatalogSnapshot,
        settings: &ZoneSettings,
        serial: u32,
    ) -> Self {
        let mut zone = Self {
            settings: settings.clone(),
            serial,
            services: HashMap::new(),
            namespaces: HashSet::new(),
            reverse: HashMap::new(),
            skipped: Vec::new(),
        };
        // Sorted, so which of two services sharing an address gets its PTR is deterministic.
        let mut services: Vec<&pb::GlobalService> = snapshot.services.iter().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for service in services {
            zone.add_service(service);
        }
        zone
    }

    /// The zone before any catalog arrived: apex records only.
    pub fn empty(settings: &ZoneSettings, serial: u32) -> Self {
        Self::from_snapshot(&pb::CatalogSnapshot::default(), settings, serial)
    }

    fn add_service(&mut self, service: &pb::GlobalService) {
        let namespace = service.namespace.to_ascii_lowercase();
        let short = service.name.to_ascii_lowercase();
        let key = (namespace.clone(), short.clone());
        if !is_dns_label(&namespace) || !is_dns_label(&short) {
            self.skipped.push(format!(
                "service {}/{}: not a DNS label",
                service.namespace, service.name
            ));
            return;
        }
        if self.services.contains_key(&key) {
            self.skipped.push(format!(
                "service {namespace}/{short}: listed twice; first kept"
            ));
            return;
        }
        let Some(name) = prefixed(
            &[short.as_str(), namespace.as_str(), "svc"],
            &self.settings.origin,
        ) else {
            self.skipped
                .push(format!("service {namespace}/{short}: name too long"));
            return;
        };
        let ports = service
            .ports
            .iter()
            .filter(|p| !p.name.is_empty())
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let name = p.name.to_ascii_lowercase();
                let protocol = p.protocol.to_ascii_lowercase();
                if !is_dns_label(&name) || !is_dns_label(&protocol) {
                    self.skipped.push(format!(
                        "port {:?} of {namespace}/{short}: not a DNS label",
                        p.name
                    ));
                    return None;
                }
                Some(NamedPort {
                    name,
                    protocol,
                    port,
                })
            })
            .collect();
        let kind = if service.r#type == "Headless" {
            ServiceKind::Headless(self.ready_endpoints(service, &name))
        } else {
            let vip = service.vip.parse::<IpAddr>().ok();
            if vip.is_none() && !service.vip.is_empty() {
                self.skipped.push(format!(
                    "ClusterSetIP {:?} of {namespace}/{short}: not an address",
                    service.vip
                ));
            }
            ServiceKind::ClusterSetIp(vip)
        };
        let service = Service { name, ports, kind };
        if !service.exists() {
            return;
        }
        match &service.kind {
            ServiceKind::ClusterSetIp(Some(vip)) => {
                self.reverse
                    .entry(*vip)
                    .or_insert_with(|| service.name.clone());
            }
            ServiceKind::ClusterSetIp(None) => {}
            ServiceKind::Headless(endpoints) => {
                for endpoint in endpoints {
                    self.reverse
                        .entry(endpoint.address)
                        .or_insert_with(|| endpoint.name.clone());
                }
            }
        }
        self.namespaces.insert(namespace);
        self.services.insert(key, service);
    }

    fn ready_endpoints(&mut self, service: &pb::GlobalService, name: &Name) -> Vec<ReadyEndpoint> {
        let mut ready = Vec::new();
        for cluster in &service.clusters {
            let cluster_id = cluster.cluster.to_ascii_lowercase();
            if !is_dns_label(&cluster_id) {
                self.skipped.push(format!(
                    "cluster {:?} of {name}: not a DNS label",
                    cluster.cluster
                ));
                continue;
            }
            for endpoint in cluster.endpoints.iter().filter(|e| e.ready) {
                let Ok(address) = endpoint.address.parse::<IpAddr>() else {
                    self.skipped.push(format!(
                        "endpoint {:?} of {name} in {cluster_id}: not an address",
                        endpoint.address
                    ));
                    continue;
                };
                let hostname = endpoint.hostname.to_ascii_lowercase();
                let hostname = if is_dns_label(&hostname) {
                    hostname
                } else {
                    address_label(address)
                };
                let Some(endpoint_name) = prefixed(&[hostname.as_str(), cluster_id.as_str()], name)
                else {
                    self.skipped
                        .push(format!("endpoint {hostname} of {name}: name too long"));
                    continue;
                };
                ready.push(ReadyEndpoint {
                    cluster: cluster_id.clone(),
                    hostname,
                    address,
                    name: endpoint_name,
                });
            }
        }
        ready
    }

    /// The settings the zone was built with.
    pub fn settings(&self) -> &ZoneSettings {
        &self.settings
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Services that exist in the zone (headless ones only with a ready endpoint).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// What the snapshot held that the zone could not name, one line each.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Answers the question `name` / `query_type` (class IN). Case-insensitive.
    pub fn answer(&self, name: &Name, query_type: RecordType) -> Answer {
        let node = match self.lookup(name) {
            Lookup::OutOfZone => return Answer::empty(AnswerKind::OutOfZone),
            Lookup::Missing => {
                let mut answer = Answer::empty(AnswerKind::NxDomain);
                answer.authority.push(self.soa());
                return answer;
            }
            Lookup::Found(node) => node,
        };
        let wanted =
            |record: &Record| query_type == RecordType::ANY || record.record_type() == query_type;
        let (mut answers, mut additionals) = self.records(name, &node, query_type);
        answers.retain(wanted);
        if answers.is_empty() {
            let mut answer = Answer::empty(AnswerKind::NoData);
            // The SOA tells resolvers how long to cache the absence (RFC 2308); reverse names
            // are not in our zone, so they carry none.
            if !matches!(node, Node::Reverse(_)) {
                answer.authority.push(self.soa());
            }
            return answer;
        }
        // Bounded work and size: the answer first, then as many additionals as fit.
        answers.truncate(self.settings.max_records);
        additionals.truncate(self.settings.max_records - answers.len());
        Answer {
            kind: AnswerKind::Records,
            answers,
            authority: Vec::new(),
            additionals,
        }
    }

    fn lookup(&self, name: &Name) -> Lookup<'_> {
        let origin = &self.settings.origin;
        if !origin.zone_of(name) {
            return self.lookup_reverse(name);
        }
        let total = name.iter().count();
        let below = total.saturating_sub(origin.iter().count());
        let mut labels = Vec::with_capacity(below);
        for label in name.iter().take(below) {
            match std::str::from_utf8(label) {
                Ok(label) => labels.push(label.to_ascii_lowercase()),
                Err(_) => return Lookup::Missing,
            }
        }
        // Read from the zone downwards: the last label is the one next to the apex.
        labels.reverse();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        match labels.as_slice() {
            [] => Lookup::Found(Node::Apex),
            ["dns-version"] => Lookup::Found(Node::SchemaVersion),
            ["svc"] if !self.services.is_empty() => Lookup::Found(Node::Interior),
            ["svc", ns] if self.namespaces.contains(*ns) => Lookup::Found(Node::Interior),
            ["svc", ns, svc, rest @ ..] => {
                match self.services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                    Some(service) => Self::lookup_in_service(service, rest),
                    None => Lookup::Missing,
                }
            }
            _ => Lookup::Missing,
        }
    }

    /// `rest` are the labels below `<svc>.<ns>.svc.<zone>`, read downwards.
    fn lookup_in_service<'z>(service: &'z Service, rest: &[&str]) -> Lookup<'z> {
        let endpoints = match &service.kind {
            ServiceKind::Headless(endpoints) => endpoints.as_slice(),
            ServiceKind::ClusterSetIp(_) => &[],
        };
        match rest {
            [] => Lookup::Found(Node::Service(service)),
            [label] => {
                if let Some(protocol) = label.strip_prefix('_') {
                    if service.ports.iter().any(|p| p.protocol == protocol) {
                        return Lookup::Found(Node::Interior);
                    }
                } else if endpoints.iter().any(|e| e.cluster == *label) {
                    // Spec 2.4.4: no records disambiguate a cluster; the name only exists
                    // because endpoint names sit below it. Spec 2.3.4: ClusterSetIP services
                    // have no endpoint names, so the name does not exist there.
                    return Lookup::Found(Node::Interior);
                }
                Lookup::Missing
            }
            [first, second] => {
                if let (Some(protocol), Some(port)) =
                    (first.strip_prefix('_'), second.strip_prefix('_'))
                {
                    return service
                        .ports
                        .iter()
                        .find(|p| p.protocol == protocol && p.name == port)
                        .map_or(Lookup::Missing, |p| Lookup::Found(Node::Srv(service, p)));
                }
                endpoints
                    .iter()
                    .find(|e| e.cluster == *first && e.hostname == *second)
                    .map_or(Lookup::Missing, |e| {
                        Lookup::Found(Node::Host(service, &e.cluster, &e.hostname))
                    })
            }
            _ => Lookup::Missing,
        }
    }

    fn lookup_reverse(&self, name: &Name) -> Lookup<'_> {
        let Ok(network) = name.parse_arpa_name() else {
            return Lookup::OutOfZone;
        };
        if network.prefix_len() != network.max_prefix_len() {
            return Lookup::OutOfZone;
        }
        self.reverse
            .get(&network.addr())
            .map_or(Lookup::OutOfZone, |target| {
                Lookup::Found(Node::Reverse(target))
            })
    }

    /// Every record at `node` (answers) and the additionals that go with them. Only SRV
    /// answers have additionals, so they are built only when SRV could be asked.
    fn records(
        &self,
        owner: &Name,
        node: &Node<'_>,
        query_type: RecordType,
    ) -> (Vec<Record>, Vec<Record>) {
        let ttl = self.settings.ttl;
        let owner = owner.clone();
        let address = |owner: &Name, ip: IpAddr| {
            let data = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            Record::from_rdata(owner.clone(), ttl, data)
        };
        let of_type = |ip: &IpAddr| match query_type {
            RecordType::A => ip.is_ipv4(),
            RecordType::AAAA => ip.is_ipv6(),
            _ => true,
        };
        match node {
            Node::Apex => (vec![self.soa(), self.ns()], Vec::new()),
            Node::SchemaVersion => (
                vec![Record::from_rdata(
                    owner,
                    ttl,
                    RData::TXT(TXT::new(vec![DNS_SCHEMA_VERSION.to_owned()])),
                )],
                Vec::new(),
            ),
            Node::Interior => (Vec::new(), Vec::new()),
            Node::Service(service) => {
                let addresses = match &service.kind {
                    ServiceKind::ClusterSetIp(vip) => vip.iter().copied().collect(),
                    ServiceKind::Headless(endpoints) => {
                        unique(endpoints.iter().map(|e| e.address).filter(of_type))
                    }
                };
                let answers = addresses
                    .into_iter()
                    .take(self.settings.max_records)
                    .map(|ip| address(&owner, ip))
                    .collect();
                (answers, Vec::new())
            }
            Node::Srv(service, port) => {
                if !matches!(query_type, RecordType::SRV | RecordType::ANY) {
                    return (Vec::new(), Vec::new());
                }
                let srv = |target: &Name| {
                    Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::SRV(SRV::new(
                            SRV_PRIORITY,
                            SRV_WEIGHT,
                            port.port,
                            target.clone(),
                        )),
                    )
                };
                match &service.kind {
                    ServiceKind::ClusterSetIp(vip) => (
                        vec![srv(&service.name)],
                        vip.iter().map(|ip| address(&service.name, *ip)).collect(),
                    ),
                    ServiceKind::Headless(endpoints) => {
                        let bound = self.settings.max_records;
                        let mut seen = HashSet::new();
                        let answers = endpoints
                            .iter()
                            .filter(|e| seen.insert(&e.name))
                            .take(bound)
                            .map(|e| srv(&e.name))
                            .collect();
                        let additionals = endpoints
                            .iter()
                            .take(bound)
                            .map(|e| address(&e.name, e.address))
                            .collect();
                        (answers, additionals)
                    }
                }
            }
            Node::Host(service, cluster, hostname) => {
                let endpoints = match &service.kind {
                    ServiceKind::Headless(endpoints) => endpoints.as_slice(),
                    ServiceKind::ClusterSetIp(_) => &[],
                };
                let addresses = unique(
                    endpoints
                        .iter()
                        .filter(|e| e.cluster == *cluster && e.hostname == *hostname)
                        .map(|e| e.address)
                        .filter(of_type),
                );
                (
                    addresses
                        .into_iter()
                        .map(|ip| address(&owner, ip))
                        .collect(),
                    Vec::new(),
                )
            }
            Node::Reverse(target) => (
                vec![Record::from_rdata(
                    owner,
                    ttl,
                    RData::PTR(PTR((*target).clone())),
                )],
                Vec::new(),
            ),
        }
    }

    /// The SOA of the zone; its minimum (the negative-caching TTL) is the record TTL.
    fn soa(&self) -> Record {
        let s = &self.settings;
        Record::from_rdata(
            s.origin.clone(),
            s.ttl,
            RData::SOA(SOA::new(
                s.nameserver.clone(),
                s.hostmaster.clone(),
                self.serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                s.ttl,
            )),
        )
    }

    fn ns(&self) -> Record {
        let s = &self.settings;
        Record::from_rdata(s.origin.clone(), s.ttl, RData::NS(NS(s.nameserver.clone())))
    }
}

/// Addresses in first-seen order without repeats: an RRset holds no duplicate records.
fn unique(addresses: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut seen = HashSet::new();
    addresses.filter(|ip| seen.insert(*ip)).collect()
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
