//! `isthmus gateway status`: peers (connected, last sync, version, age) and services
//! (exported here, imported from where, VIP, conflicts), as served on the admin endpoint's
//! `/status`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use isthmus_core::catalog::{Conflict, GlobalService, PortSpec, ServiceType};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One peer gateway as this gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's trust domain.
    pub trust_domain: String,
    /// The peer's cluster name (once a snapshot arrived).
    pub cluster: String,
    /// Whether the peering stream is up.
    pub connected: bool,
    /// Whether its endpoints are in use (connected or within the staleness budget).
    pub fresh: bool,
    /// When it was last heard from.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_sync: Option<OffsetDateTime>,
    /// Seconds since then.
    pub age_seconds: Option<i64>,
    /// The peer's epoch and the version applied.
    pub epoch: Option<u64>,
    /// The version applied.
    pub version: Option<u64>,
    /// Services imported from it.
    pub services: usize,
}

/// One global service as this cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its ClusterSetIP in this cluster (none for headless services).
    pub vip: Option<Ipv4Addr>,
    /// ClusterSetIP or Headless.
    pub service_type: ServiceType,
    /// Merged ports.
    pub ports: Vec<PortSpec>,
    /// Whether this cluster exports it.
    pub exported: bool,
    /// Ready endpoints by cluster (this one included).
    pub ready_endpoints: BTreeMap<String, usize>,
    /// Disagreements between clusters, resolved to the oldest export.
    pub conflicts: Vec<Conflict>,
}

/// The whole status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    /// This cluster.
    pub cluster: String,
    /// The gateway's address.
    pub address: String,
    /// Streams in flight.
    pub active_streams: usize,
    /// Peer gateways.
    pub peers: Vec<PeerStatus>,
    /// Global services.
    pub services: Vec<ServiceStatus>,
}

impl ServiceStatus {
    /// Builds the status of one merged service.
    pub fn of(service: &GlobalService, vip: Option<Ipv4Addr>, local_cluster: &str) -> Self {
        Self {
            namespace: service.key.namespace.clone(),
            name: service.key.name.clone(),
            vip,
            service_type: service.service_type,
            ports: service.ports.clone(),
            exported: service.endpoints.contains_key(local_cluster),
            ready_endpoints: service
                .endpoints
                .iter()
                .map(|(c, eps)| (c.clone(), eps.iter().filter(|e| e.ready).count()))
                .collect(),
            conflicts: service.conflicts.clone(),
        }
    }
}

impl GatewayStatus {
    /// A table for humans.
    pub fn table(&self) -> String {
        let mut out = format!(
            "cluster {}  gateway {}  active streams {}\n\nPEERS\n{:<20} {:<10} {:<10} {:<6} {:<8} {:<9} SERVICES\n",
            self.cluster,
            self.address,
            self.active_streams,
            "TRUST DOMAIN",
            "CLUSTER",
            "CONNECTED",
            "FRESH",
            "VERSION",
            "AGE"
        );
        for p in &self.peers {
            out.push_str(&format!(
                "{:<20} {:<10} {:<10} {:<6} {:<8} {:<9} {}\n",
                p.trust_domain,
                if p.cluster.is_empty() {
                    "-"
                } else {
                    &p.cluster
                },
                p.connected,
                p.fresh,
                p.version.map_or("-".into(), |v| v.to_string()),
                p.age_seconds.map_or("never".into(), |a| format!("{a}s")),
                p.services
            ));
        }
        out.push_str(&format!(
            "\nSERVICES\n{:<28} {:<15} {:<9} {:<30} CONFLICTS\n",
            "SERVICE", "VIP", "EXPORTED", "READY ENDPOINTS"
        ));
        for s in &self.services {
            let ready: Vec<String> = s
                .ready_endpoints
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            out.push_str(&format!(
                "{:<28} {:<15} {:<9} {:<30} {}\n",
                format!("{}/{}", s.namespace, s.name),
                s.vip.map_or("-".into(), |v| v.to_string()),
                s.exported,
                ready.join(","),
                s.conflicts.len()
            ));
        }
        out
    }
}
