//! The gateway's configuration: defaults < TOML file < `ISTHMUS_GATEWAY_*` environment < flags.
//! Until the catalog lands, exported services come from this file.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use isthmus_api::tunnel::is_dns_label;
use isthmus_core::config::{ConfigError, EnvBinding, HumanDuration, Validate};
use isthmus_core::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

/// One authorization rule; a stream is allowed when any rule of its service matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AllowRule {
    /// Exactly this SPIFFE ID.
    SpiffeId(SpiffeId),
    /// This ID or any ID below it (`spiffe://td/ns/demo` matches `spiffe://td/ns/demo/sa/x`).
    SpiffeIdPrefix(SpiffeId),
    /// Any ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl AllowRule {
    /// Whether `peer` matches.
    pub fn matches(&self, peer: &SpiffeId) -> bool {
        match self {
            Self::SpiffeId(id) => id == peer,
            Self::SpiffeIdPrefix(prefix) => peer.is_under(prefix),
            Self::TrustDomain(td) => td.name() == peer.trust_domain_name(),
        }
    }
}

/// A port of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (`http`, `grpc`, …).
    #[serde(default)]
    pub name: String,
    /// The service port clients ask for.
    pub port: u16,
    /// The port endpoints listen on (defaults to `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// `TCP`, `UDP` or `SCTP`. Only TCP ports are tunnelled; the others are published in the
    /// catalog (DNS SRV records) but have no data path yet.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".into()
}

/// An endpoint of an exported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its address.
    pub address: IpAddr,
    /// Whether it receives traffic.
    #[serde(default = "default_true")]
    pub ready: bool,
}

fn default_true() -> bool {
    true
}

/// A service this cluster exports through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedService {
    /// Namespace (namespace sameness across clusters).
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Who may reach it; empty means any peer the handshake admitted (a federated trust
    /// domain or our own).
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

impl ExportedService {
    /// This export in the catalog model, as `cluster` publishes it to peers. The creation time
    /// is left at the Unix epoch here; the gateway replaces it with the time it first exported
    /// the service (`CatalogView::replace_exports`).
    pub fn to_catalog(&self, cluster: &str) -> isthmus_core::catalog::ServiceExport {
        use isthmus_core::catalog::{
            Affinity, Endpoint, PortSpec, Protocol, ServiceKey, ServiceType,
        };
        isthmus_core::catalog::ServiceExport {
            key: ServiceKey::new(&self.namespace, &self.name),
            cluster: cluster.to_owned(),
            created: time::OffsetDateTime::UNIX_EPOCH,
            ports: self
                .ports
                .iter()
                .map(|p| PortSpec {
                    name: p.name.clone(),
                    protocol: match p.protocol.as_str() {
                        "UDP" => Protocol::Udp,
                        "SCTP" => Protocol::Sctp,
                        _ => Protocol::Tcp,
                    },
                    port: p.port,
                })
                .collect(),
            service_type: ServiceType::ClusterSetIP,
            affinity: Affinity::Local,
            shared: true,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.address,
                    ready: e.ready,
                    zone: None,
                    hostname: None,
                })
                .collect(),
        }
    }
}

/// Catalog exchange with peer gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeeringConfig {
    /// Peer gateways to import from (their trust domains must be federated).
    pub peers: Vec<crate::peering::PeerConfig>,
    /// Heartbeat interval on peering streams.
    pub heartbeat: HumanDuration,
    /// How long a disconnected peer's endpoints stay usable.
    pub staleness_budget: HumanDuration,
    /// The range ClusterSetIPs (VIPs) of global services are assigned from, in this cluster.
    pub vip_range: String,
    /// Where imports and VIP assignments are persisted (none: kept in memory only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

impl Default for PeeringConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            heartbeat: HumanDuration::from_secs(5),
            staleness_budget: HumanDuration::from_secs(30),
            vip_range: "10.96.240.0/20".into(),
            data_dir: None,
        }
    }
}

/// Limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Concurrent streams all connections of one peer identity may have.
    pub max_streams_per_peer: usize,
    /// Concurrent streams in total.
    pub max_streams: usize,
    /// Connections closed after this long without traffic.
    pub idle_timeout: HumanDuration,
    /// Time a client has to send the stream header.
    pub header_timeout: HumanDuration,
    /// Time to connect to an endpoint.
    pub connect_timeout: HumanDuration,
    /// How long a failing endpoint is skipped at first (doubles up to 16×).
    pub eject_for: HumanDuration,
    /// On SIGTERM: time in-flight streams get to finish.
    pub drain_deadline: HumanDuration,
    /// Per-stream QUIC receive window, bytes.
    pub stream_window: u32,
    /// Per-connection QUIC receive window, bytes.
    pub connection_window: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 1024,
            max_streams_per_peer: 4096,
            max_streams: 65536,
            idle_timeout: HumanDuration::from_secs(60),
            header_timeout: HumanDuration::from_secs(5),
            connect_timeout: HumanDuration::from_secs(2),
            eject_for: HumanDuration::from_secs(5),
            drain_deadline: HumanDuration::from_secs(30),
            stream_window: 8 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
        }
    }
}

pub use isthmus_api::identity::{BrokerIdentity, IdentityFiles};

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This cluster's trust domain (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// This cluster's name.
    pub cluster: String,
    /// QUIC (UDP) and the HTTP/2 fallback (TCP) both listen on this address.
    pub listen: SocketAddr,
    /// Foreign trust domains whose workloads may connect (their bundles must be held).
    pub federated_trust_domains: Vec<TrustDomain>,
    /// Identity material for standalone runs.
    pub identity: IdentityFiles,
    /// Limits and timeouts.
    pub limits: LimitsConfig,
    /// Exported services.
    pub services: Vec<ExportedService>,
    /// Catalog exchange with peer gateways.
    pub peering: PeeringConfig,
    /// Plain-HTTP `/metrics` and `/healthz/*` (disabled when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// The local catalog API (gRPC over mTLS, own trust domain only) for DNS servers and node
    /// agents (disabled when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog_listen: Option<SocketAddr>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            trust_domain: None,
            cluster: "default".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 15008)),
            federated_trust_domains: Vec::new(),
            identity: IdentityFiles::default(),
            limits: LimitsConfig::default(),
            services: Vec::new(),
            peering: PeeringConfig::default(),
            metrics_listen: None,
            catalog_listen: None,
        }
    }
}

/// Environment variables the gateway reads.
pub const GATEWAY_ENV: &[EnvBinding] = &[
    EnvBinding {
        name: "ISTHMUS_GATEWAY_TRUST_DOMAIN",
        field: "trust_domain",
    },
    EnvBinding {
        name: "ISTHMUS_GATEWAY_CLUSTER",
        field: "cluster",
    },
    EnvBinding {
        name: "ISTHMUS_GATEWAY_LISTEN",
        field: "listen",
    },
];

impl GatewayConfig {
    /// The configured trust domain.
    pub fn trust_domain(&self) -> Result<&TrustDomain, ConfigError> {
        self.trust_domain
            .as_ref()
            .ok_or_else(|| ConfigError::validation("trust_domain", "required"))
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let own = self.trust_domain()?;
        if !is_dns_label(&self.cluster) {
            return Err(ConfigError::validation(
                "cluster",
                format!("{:?} is not a DNS label", self.cluster),
            ));
        }
        for (i, td) in self.federated_trust_domains.iter().enumerate() {
            if td == own {
                return Err(ConfigError::validation(
                    format!("federated_trust_domains[{i}]"),
                    "is this gateway's own trust domain",
                ));
            }
        }
        let limits = &self.limits;
        for (field, zero) in [
            (
                "limits.max_streams_per_connection",
                limits.max_streams_per_connection == 0,
            ),
            (
                "limits.max_streams_per_peer",
                limits.max_streams_per_peer == 0,
            ),
            ("limits.max_streams", limits.max_streams == 0),
            ("limits.idle_timeout", limits.idle_timeout.get().is_zero()),
            (
                "limits.header_timeout",
                limits.header_timeout.get().is_zero(),
            ),
            (
                "limits.connect_timeout",
                limits.connect_timeout.get().is_zero(),
            ),
            ("limits.stream_window", limits.stream_window < 16 * 1024),
            (
                "limits.connection_window",
                limits.connection_window < limits.stream_window,
            ),
        ] {
            if zero {
                return Err(ConfigError::validation(field, "is too small"));
            }
        }
        for (i, peer) in self.peering.peers.iter().enumerate() {
            if !self.federated_trust_domains.contains(&peer.trust_domain) {
                return Err(ConfigError::validation(
                    format!("peering.peers[{i}].trust_domain"),
                    format!("{} is not in federated_trust_domains", peer.trust_domain),
                ));
            }
        }
        if self.peering.heartbeat.get().is_zero()
            || self.peering.staleness_budget < self.peering.heartbeat
        {
            return Err(ConfigError::validation(
                "peering.staleness_budget",
                "must be at least one heartbeat interval",
            ));
        }
        isthmus_core::catalog::VipAllocator::new(&self.peering.vip_range)
            .map_err(|e| ConfigError::validation("peering.vip_range", e.to_string()))?;
        let mut seen = BTreeSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let field = |f: &str| format!("services[{i}].{f}");
            if !is_dns_label(&svc.namespace) {
                return Err(ConfigError::validation(
                    field("namespace"),
                    "is not a DNS label",
                ));
            }
            if !is_dns_label(&svc.name) {
                return Err(ConfigError::validation(field("name"), "is not a DNS label"));
            }
            if !seen.insert((svc.namespace.clone(), svc.name.clone())) {
                return Err(ConfigError::validation(
                    field("name"),
                    format!("{}/{} is exported twice", svc.namespace, svc.name),
                ));
            }
            if svc.ports.is_empty() {
                return Err(ConfigError::validation(
                    field("ports"),
                    "needs at least one port",
                ));
            }
            for (j, port) in svc.ports.iter().enumerate() {
                if port.port == 0 {
                    return Err(ConfigError::validation(
                        field(&format!("ports[{j}].port")),
                        "must not be 0",
                    ));
                }
                if port.target_port == Some(0) {
                    return Err(ConfigError::validation(
                        field(&format!("ports[{j}].target_port")),
                        "must not be 0",
                    ));
                }
                if !matches!(port.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                    return Err(ConfigError::validation(
                        field(&format!("ports[{j}].protocol")),
                        format!("{:?} is not TCP, UDP or SCTP", port.protocol),
                    ));
                }
            }
        }
        Ok(())
    }
}
