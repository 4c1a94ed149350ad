//! The model of global services: what each cluster exports, how exports of the same
//! service merge across clusters (the MCS API rules: namespace sameness, ports as a union,
//! conflicts resolved to the oldest export and kept visible), which cluster a connection
//! should go to, and the ClusterSetIP (VIP) each importing cluster assigns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A service across the cluster set: the same namespace and name mean the same service in
/// every cluster (namespace sameness).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// A key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    /// Port name (may be empty for a single-port service).
    #[serde(default)]
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number.
    pub port: u16,
}

/// ClusterSetIP (one VIP per importing cluster) or Headless (endpoint addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ServiceType {
    /// A virtual IP per importing cluster.
    #[default]
    ClusterSetIP,
    /// No VIP; DNS answers the ready endpoints.
    Headless,
}

/// Which clusters a connection prefers (Cilium's `service.cilium.io/affinity` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Local healthy endpoints first; remote clusters only when none is healthy.
    #[default]
    Local,
    /// Remote clusters first; local endpoints only when no remote one is healthy.
    Remote,
    /// Spread over every cluster by endpoint count.
    None,
}

/// One endpoint of an export.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its address.
    pub address: IpAddr,
    /// Ready to receive traffic.
    pub ready: bool,
    /// Topology zone, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Hostname (headless services: `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// What one cluster exports for one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExport {
    /// The service.
    pub key: ServiceKey,
    /// The exporting cluster.
    pub cluster: String,
    /// When the export was created (the oldest wins conflicts).
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Ports.
    pub ports: Vec<PortSpec>,
    /// ClusterSetIP or Headless.
    pub service_type: ServiceType,
    /// Cluster preference of connections to this service.
    pub affinity: Affinity,
    /// `false`: this cluster imports the service but contributes no endpoints.
    pub shared: bool,
    /// Endpoints (ignored when `shared` is false).
    pub endpoints: Vec<Endpoint>,
}

/// A property on which exports disagree; the oldest export's value is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conflict {
    /// A port with the same name (or number) but another protocol or number.
    Port {
        /// The port as the oldest export declares it.
        kept: PortSpec,
        /// The disagreeing cluster.
        cluster: String,
        /// Its declaration.
        theirs: PortSpec,
    },
    /// Headless in one cluster, ClusterSetIP in another.
    ServiceType {
        /// The type kept.
        kept: ServiceType,
        /// The disagreeing cluster.
        cluster: String,
        /// Its type.
        theirs: ServiceType,
    },
    /// Another affinity.
    Affinity {
        /// The affinity kept.
        kept: Affinity,
        /// The disagreeing cluster.
        cluster: String,
        /// Its affinity.
        theirs: Affinity,
    },
}

/// A service as the whole cluster set sees it: merged properties, conflicts, and every
/// cluster's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalService {
    /// The service.
    pub key: ServiceKey,
    /// Union of the exports' ports.
    pub ports: Vec<PortSpec>,
    /// From the oldest export.
    pub service_type: ServiceType,
    /// From the oldest export.
    pub affinity: Affinity,
    /// Disagreements, resolved to the oldest export.
    pub conflicts: Vec<Conflict>,
    /// Endpoints by cluster (clusters with `shared = false` contribute none).
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
}

fn port_key(port: &PortSpec) -> (bool, String, u16) {
    // Named ports merge by name; unnamed ones by number.
    if port.name.is_empty() {
        (false, String::new(), port.port)
    } else {
        (true, port.name.clone(), 0)
    }
}

/// Merges the exports of one service (all with the same key) by the MCS rules.
/// Returns `None` for no exports.
pub fn merge<'a>(exports: impl IntoIterator<Item = &'a ServiceExport>) -> Option<GlobalService> {
    let mut exports: Vec<&ServiceExport> = exports.into_iter().collect();
    exports.sort_by(|a, b| (a.created, &a.cluster).cmp(&(b.created, &b.cluster)));
    let oldest = *exports.first()?;
    let mut service = GlobalService {
        key: oldest.key.clone(),
        ports: Vec::new(),
        service_type: oldest.service_type,
        affinity: oldest.affinity,
        conflicts: Vec::new(),
        endpoints: BTreeMap::new(),
    };
    let mut ports: BTreeMap<(bool, String, u16), PortSpec> = BTreeMap::new();
    for export in &exports {
        if export.service_type != service.service_type {
            service.conflicts.push(Conflict::ServiceType {
                kept: service.service_type,
                cluster: export.cluster.clone(),
                theirs: export.service_type,
            });
        }
        if export.affinity != service.affinity {
            service.conflicts.push(Conflict::Affinity {
                kept: service.affinity,
                cluster: export.cluster.clone(),
                theirs: export.affinity,
            });
        }
        for port in &export.ports {
            match ports.get(&port_key(port)) {
                None => {
                    ports.insert(port_key(port), port.clone());
                }
                Some(kept) if kept == port => {}
                Some(kept) => service.conflicts.push(Conflict::Port {
                    kept: kept.clone(),
                    cluster: export.cluster.clone(),
                    theirs: port.clone(),
                }),
            }
        }
        if export.shared {
            service
                .endpoints
                .insert(export.cluster.clone(), export.endpoints.clone());
        }
    }
    service.ports = ports.into_values().collect();
    Some(service)
}

impl GlobalService {
    /// Ready endpoints of `cluster` that `is_ejected` does not skip.
    pub fn healthy<'s>(
        &'s self,
        cluster: &str,
        is_ejected: &impl Fn(&str, &Endpoint) -> bool,
    ) -> Vec<&'s Endpoint> {
        self.endpoints
            .get(cluster)
            .map(|eps| {
                eps.iter()
                    .filter(|e| e.ready && !is_ejected(cluster, e))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The clusters a connection from `local` should try, best first, by the service's
    /// affinity: only clusters with at least one healthy endpoint appear. `random` makes
    /// `none` (and the order among remote clusters) spread by endpoint count; callers pass a
    /// fresh random value per connection.
    pub fn plan(
        &self,
        local: &str,
        is_ejected: impl Fn(&str, &Endpoint) -> bool,
        random: u64,
    ) -> Vec<String> {
        let weights: Vec<(String, usize)> = self
            .endpoints
            .keys()
            .map(|c| (c.clone(), self.healthy(c, &is_ejected).len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        let local_healthy = weights.iter().any(|(c, _)| c == local);
        let remote: Vec<(String, usize)> = weights
            .iter()
            .filter(|(c, _)| c != local)
            .cloned()
            .collect();
        match self.affinity {
            Affinity::Local => {
                let mut plan = Vec::new();
                if local_healthy {
                    plan.push(local.to_owned());
                }
                plan.extend(weighted_order(remote, random));
                plan
            }
            Affinity::Remote => {
                let mut plan = weighted_order(remote, random);
                if local_healthy {
                    plan.push(local.to_owned());
                }
                plan
            }
            Affinity::None => weighted_order(weights, random),
        }
    }
}

/// Orders clusters by a weighted random draw without replacement (weight = healthy
/// endpoints), so traffic spreads in proportion to capacity.
fn weighted_order(mut candidates: Vec<(String, usize)>, mut random: u64) -> Vec<String> {
    let mut order = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let total: usize = candidates.iter().map(|(_, w)| *w).sum();
        let mut pick = (random % total.max(1) as u64) as usize;
        random = random.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
        let mut index = 0;
        for (i, (_, w)) in candidates.iter().enumerate() {
            if pick < *w {
                index = i;
                break;
            }
            pick -= w;
        }
        order.push(candidates.remove(index).0);
    }
    order
}

/// Why a VIP range is unusable or full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    /// The range does not parse.
    #[error("VIP range {0:?} is not an IPv4 CIDR like 10.96.200.0/24")]
    BadRange(String),
    /// No free address is left.
    #[error("VIP range {range} is full ({capacity} addresses)")]
    Exhausted {
        /// The range.
        range: String,
        /// How many addresses it has.
        capacity: u32,
    },
}

/// Assigns each global service a stable ClusterSetIP from a range. The same service gets the
/// same address across restarts when the assignments are persisted ([`Self::assignments`])
/// and, even without persistence, usually the same one (the first candidate is a hash of the
/// key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipAllocator {
    range: String,
    base: u32,
    size: u32,
    assigned: BTreeMap<ServiceKey, Ipv4Addr>,
    used: BTreeSet<u32>,
}

fn fnv1a(key: &ServiceKey) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in key.namespace.bytes().chain([b'/']).chain(key.name.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

impl VipAllocator {
    /// An allocator over `range` (IPv4 CIDR). The network and broadcast addresses of ranges
    /// larger than /31 are never assigned.
    pub fn new(range: &str) -> Result<Self, VipError> {
        let bad = || VipError::BadRange(range.to_owned());
        let (addr, prefix) = range.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u32 = prefix.parse().map_err(|_| bad())?;
        if !(8..=32).contains(&prefix) {
            return Err(bad());
        }
        let size = 1u32 << (32 - prefix);
        let base = u32::from(addr) & !(size - 1);
        let (base, size) = if size > 2 {
            (base + 1, size - 2)
        } else {
            (base, size)
        };
        Ok(Self {
            range: range.to_owned(),
            base,
            size,
            assigned: BTreeMap::new(),
            used: BTreeSet::new(),
        })
    }

    /// Restores persisted assignments (those outside the range are dropped).
    pub fn restore(&mut self, assignments: impl IntoIterator<Item = (ServiceKey, Ipv4Addr)>) {
        for (key, ip) in assignments {
            let offset = u32::from(ip).wrapping_sub(self.base);
            if offset < self.size && self.used.insert(offset) {
                self.assigned.insert(key, ip);
            }
        }
    }

    /// The VIP of `key`, assigning one if needed.
    pub fn assign(&mut self, key: &ServiceKey) -> Result<Ipv4Addr, VipError> {
        if let Some(ip) = self.assigned.get(key) {
            return Ok(*ip);
        }
        let start = (fnv1a(key) % u64::from(self.size)) as u32;
        for step in 0..self.size {
            let offset = (start + step) % self.size;
            if self.used.insert(offset) {
                let ip = Ipv4Addr::from(self.base + offset);
                self.assigned.insert(key.clone(), ip);
                return Ok(ip);
            }
        }
        Err(VipError::Exhausted {
            range: self.range.clone(),
            capacity: self.size,
        })
    }

    /// Releases the VIP of a service that is gone everywhere.
    pub fn release(&mut self, key: &ServiceKey) -> Option<Ipv4Addr> {
        let ip = self.assigned.remove(key)?;
        self.used.remove(&u32::from(ip).wrapping_sub(self.base));
        Some(ip)
    }

    /// The VIP of `key`, if assigned.
    pub fn get(&self, key: &ServiceKey) -> Option<Ipv4Addr> {
        self.assigned.get(key).copied()
    }

    /// Every assignment, for persistence.
    pub fn assignments(&self) -> &BTreeMap<ServiceKey, Ipv4Addr> {
        &self.assigned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(cluster: &str, age: i64, ports: &[(&str, Protocol, u16)]) -> ServiceExport {
        ServiceExport {
            key: ServiceKey::new("demo", "echo"),
            cluster: cluster.into(),
            created: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(age),
            ports: ports
                .iter()
                .map(|(name, protocol, port)| PortSpec {
                    name: (*name).into(),
                    protocol: *protocol,
                    port: *port,
                })
                .collect(),
            service_type: ServiceType::ClusterSetIP,
            affinity: Affinity::Local,
            shared: true,
            endpoints: vec![Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                ready: true,
                zone: None,
                hostname: None,
            }],
        }
    }

    #[test]
    fn ports_union_and_conflicts_resolve_to_the_oldest() {
        let west = export("west", 10, &[("http", Protocol::Tcp, 80)]);
        let mut east = export(
            "east",
            20,
            &[("http", Protocol::Udp, 80), ("grpc", Protocol::Tcp, 9090)],
        );
        east.service_type = ServiceType::Headless;
        let merged = merge([&east, &west]).unwrap();
        assert_eq!(
            merged
                .ports
                .iter()
                .map(|p| (p.name.as_str(), p.protocol))
                .collect::<Vec<_>>(),
            [("grpc", Protocol::Tcp), ("http", Protocol::Tcp)]
        );
        assert_eq!(
            merged.service_type,
            ServiceType::ClusterSetIP,
            "the oldest export wins"
        );
        assert_eq!(merged.conflicts.len(), 2);
        assert!(
            merged
                .conflicts
                .iter()
                .any(|c| matches!(c, Conflict::Port { cluster, .. } if cluster == "east"))
        );
        assert!(merged.conflicts.iter().any(|c| matches!(
            c,
            Conflict::ServiceType {
                theirs: ServiceType::Headless,
                ..
            }
        )));
        // Ties on creation time break by cluster name, so every cluster merges alike.
        let same_age = export("aaa", 20, &[("http", Protocol::Udp, 80)]);
        let merged = merge([&east, &same_age]).unwrap();
        assert_eq!(
            merged
                .ports
                .iter()
                .find(|p| p.name == "http")
                .unwrap()
                .protocol,
            Protocol::Udp
        );
    }

    #[test]
    fn unshared_exports_contribute_no_endpoints() {
        let west = export("west", 10, &[("http", Protocol::Tcp, 80)]);
        let mut east = export("east", 20, &[("http", Protocol::Tcp, 80)]);
        east.shared = false;
        let merged = merge([&west, &east]).unwrap();
        assert_eq!(merged.endpoints.keys().collect::<Vec<_>>(), ["west"]);
    }

    #[test]
    fn plans_follow_affinity_and_health() {
        let west = export("west", 10, &[("http", Protocol::Tcp, 80)]);
        let east = export("east", 20, &[("http", Protocol::Tcp, 80)]);
        let mut merged = merge([&west, &east]).unwrap();
        let none = |_: &str, _: &Endpoint| false;
        assert_eq!(merged.plan("west", none, 7), ["west", "east"]);
        merged.affinity = Affinity::Remote;
        assert_eq!(merged.plan("west", none, 7), ["east", "west"]);
        // An ejected local endpoint fails over at once.
        merged.affinity = Affinity::Local;
        assert_eq!(
            merged.plan("west", |c: &str, _: &Endpoint| c == "west", 7),
            ["east"]
        );
        // Not ready counts as unhealthy.
        merged.endpoints.get_mut("east").unwrap()[0].ready = false;
        assert_eq!(merged.plan("west", none, 7), ["west"]);
    }

    #[test]
    fn none_spreads_by_endpoint_count() {
        let west = export("west", 10, &[("http", Protocol::Tcp, 80)]);
        let mut east = export("east", 20, &[("http", Protocol::Tcp, 80)]);
        east.endpoints = vec![east.endpoints[0].clone(); 3];
        let mut merged = merge([&west, &east]).unwrap();
        merged.affinity = Affinity::None;
        let mut first = BTreeMap::<String, u32>::new();
        let mut r = 0x1234_5678_9abc_def1u64;
        for _ in 0..4000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            *first
                .entry(merged.plan("west", |_: &str, _: &Endpoint| false, r)[0].clone())
                .or_default() += 1;
        }
        // 3:1 by endpoints; allow generous noise.
        let (east, west) = (first["east"], first["west"]);
        assert!(
            east > 2 * west && east < 4 * west,
            "east {east} west {west}"
        );
    }

    #[test]
    fn vips_are_stable_and_released() {
        let mut a = VipAllocator::new("10.96.200.0/24").unwrap();
        let echo = ServiceKey::new("demo", "echo");
        let web = ServiceKey::new("demo", "web");
        let ip = a.assign(&echo).unwrap();
        assert_eq!(a.assign(&echo).unwrap(), ip);
        assert_ne!(a.assign(&web).unwrap(), ip);
        // A fresh allocator restored from the assignments gives the same addresses.
        let mut b = VipAllocator::new("10.96.200.0/24").unwrap();
        b.restore(a.assignments().clone());
        assert_eq!(b.assign(&echo).unwrap(), ip);
        assert_eq!(a.release(&echo), Some(ip));
        assert_eq!(a.get(&echo), None);
        let mut tiny = VipAllocator::new("10.0.0.0/30").unwrap();
        tiny.assign(&echo).unwrap();
        tiny.assign(&web).unwrap();
        assert!(matches!(
            tiny.assign(&ServiceKey::new("x", "y")),
            Err(VipError::Exhausted { capacity: 2, .. })
        ));
        assert!(VipAllocator::new("10.0.0.0").is_err());
        assert!(VipAllocator::new("fd00::/64").is_err());
    }
}
