//! One cluster of the lab: its trust broker, gateway (identity from the broker), DNS server,
//! node agent (explicit mode) and the demo service, all on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::broker as pb;
use isthmus_api::broker::broker_admin_client::BrokerAdminClient;
use isthmus_api::broker_client::{BrokerEndpoint, NodeIdentity};
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::identity::Identity;
use isthmus_api::transport::{ALPN_H2, tls_channel, unix_channel};
use isthmus_core::config::HumanDuration;
use isthmus_core::lifecycle::{DrainTrigger, DrainWatch};
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::{Bundle, SpiffeId, TrustDomain};
use isthmus_dns::DnsConfig;
use isthmus_dns::server::{Backoff, DnsServer, ZoneFeed, ZoneHandler};
use isthmus_gateway::config::{
    AllowRule, EndpointConfig, ExportedService, GatewayConfig, ServicePort,
};
use isthmus_gateway::peering::{GATEWAY_PATH, PeerConfig};
use isthmus_gateway::server::Gateway;
use isthmus_node_agent::identities::IdentitySettings;
use isthmus_node_agent::runtime::{Agent, AgentSettings};
use isthmus_node_agent::workload_api::WorkloadApiSettings;
use isthmus_node_agent::{Mode, Outbound, OutboundSettings, WorkloadApiServer};
use isthmus_trust_broker::config::BrokerConfig;
use isthmus_trust_broker::runtime::Broker;

use crate::LabError;
use crate::status::ClusterInfo;

/// The demo service's namespace.
pub const DEMO_NAMESPACE: &str = "demo";
/// The demo service's name.
pub const DEMO_SERVICE: &str = "echo";
/// The demo service's port (the port workloads dial on its VIP).
pub const DEMO_PORT: u16 = 8080;
/// The service only cluster `cluster` exports (same backend as `echo`): `echo-<cluster>`.
pub fn own_service(cluster: &str) -> String {
    format!("{DEMO_SERVICE}-{cluster}")
}
/// The path of the demo client's SPIFFE ID in every trust domain.
pub const CLIENT_PATH: [&str; 4] = ["ns", "demo", "sa", "client"];

/// How long each component may take to drain at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(3);

/// Where one cluster lives before it starts: name, trust domain, VIP range, gateway port.
#[derive(Debug, Clone)]
pub(crate) struct ClusterPlan {
    pub(crate) name: String,
    pub(crate) trust_domain: TrustDomain,
    pub(crate) vip_range: String,
    pub(crate) gateway: SocketAddr,
}

/// A running broker and what the other clusters need from it.
pub(crate) fn broker_config(plan: &ClusterPlan, state_dir: &Path) -> BrokerConfig {
    let mut cfg = BrokerConfig {
        trust_domain: Some(plan.trust_domain.clone()),
        data_dir: state_dir.join(&plan.name).join("broker"),
        ..BrokerConfig::default()
    };
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.bundle_endpoint.listen = loopback;
    // Short refresh: a rotation in one domain reaches the others within seconds.
    cfg.bundle_endpoint.refresh_hint = HumanDuration::from_secs(5);
    cfg.api.listen = loopback;
    cfg.federation_fetch.min_refresh = HumanDuration::from_secs(1);
    cfg.federation_fetch.timeout = HumanDuration::from_secs(2);
    cfg
}

pub(crate) fn admin(broker: &Broker) -> BrokerAdminClient<tonic::transport::Channel> {
    BrokerAdminClient::new(unix_channel(broker.admin_socket().to_path_buf()))
}

fn admin_error(what: &str, cluster: &str) -> impl FnOnce(tonic::Status) -> LabError {
    let (what, cluster) = (what.to_owned(), cluster.to_owned());
    move |status| LabError::Admin {
        cluster,
        what,
        message: status.message().to_owned(),
    }
}

/// `from` trusts `to` (its bundle endpoint and initial bundle) through the admin API.
pub(crate) async fn federate(from: &Broker, to: &Broker, from_name: &str) -> Result<(), LabError> {
    let offer = to.federation_offer().map_err(|e| LabError::Broker {
        cluster: from_name.to_owned(),
        message: e.to_string(),
    })?;
    let json = serde_json::to_string(&offer).map_err(|e| LabError::Admin {
        cluster: from_name.to_owned(),
        what: "federation offer".into(),
        message: e.to_string(),
    })?;
    admin(from)
        .add_federation(pb::FederationRelationship { json })
        .await
        .map_err(admin_error("AddFederation", from_name))?;
    Ok(())
}

/// Registers `entries` (entry id, SPIFFE ID, federates with) for a new node and attests it with
/// a fresh join token.
async fn attest_node(
    broker: &Broker,
    cluster: &str,
    node: &str,
    entries: &[(&str, &SpiffeId, &[TrustDomain])],
    uid: u32,
) -> Result<NodeIdentity, LabError> {
    let mut admin = admin(broker);
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            node: node.to_owned(),
            ttl_seconds: 300,
        })
        .await
        .map_err(admin_error("CreateJoinToken", cluster))?
        .into_inner()
        .token;
    for (id, spiffe_id, federates_with) in entries {
        admin
            .create_entry(pb::Entry {
                id: (*id).to_owned(),
                spiffe_id: spiffe_id.to_string(),
                node: node.to_owned(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                federates_with: federates_with.iter().map(ToString::to_string).collect(),
                ..Default::default()
            })
            .await
            .map_err(admin_error("CreateEntry", cluster))?;
    }
    let endpoint = BrokerEndpoint {
        address: broker.api_addr(),
        trust_domain: broker.trust_domain().clone(),
        bootstrap_bundle: Bundle::clone(&broker.authority().bundle()),
    };
    NodeIdentity::attest(endpoint, &token)
        .await
        .map_err(|e| LabError::Broker {
            cluster: cluster.to_owned(),
            message: format!("attesting node {node}: {e}"),
        })
}

/// The SPIFFE ID `spiffe://<td>/<path…>`.
fn workload_id(td: &TrustDomain, path: &[&str]) -> Result<SpiffeId, LabError> {
    td.workload_id(path)
        .map_err(|e| LabError::Bug(e.to_string()))
}

/// mTLS client settings for the local catalog API: `svid`/`trust` as the client, the cluster's
/// gateway as the only acceptable server.
fn catalog_client(
    identity: &Identity,
    own: &TrustDomain,
    catalog: SocketAddr,
) -> Result<CatalogClient<tonic::transport::Channel>, LabError> {
    let tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: identity.svid.clone(),
        trust: identity.trust.clone(),
        authorizer: Arc::new(AllowIds(vec![workload_id(own, &GATEWAY_PATH)?])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .map_err(|e| LabError::Bug(format!("catalog client TLS: {e}")))?;
    Ok(CatalogClient::new(tls_channel(catalog, Arc::new(tls))))
}

/// A running cluster (everything but its broker, which [`crate::Lab`] starts first so that
/// the brokers can federate before any SVID is issued).
pub(crate) struct RunningCluster {
    pub(crate) info: ClusterInfo,
    pub(crate) gateway: Gateway,
    /// The echo service's own address (what the demo calls directly).
    pub(crate) backend: SocketAddr,
    dns: DnsServer,
    workload_api: WorkloadApiServer,
    outbound: Outbound,
    /// Stops the agent, the DNS catalog watch, the echo service and SVID renewals.
    drain: DrainTrigger,
}

impl std::fmt::Debug for RunningCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningCluster")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A cluster's parts once started (its drain trigger is kept by [`RunningCluster::start`]).
struct Components {
    info: ClusterInfo,
    gateway: Gateway,
    backend: SocketAddr,
    dns: DnsServer,
    workload_api: WorkloadApiServer,
    outbound: Outbound,
}

/// What a cluster needs from the others to start.
pub(crate) struct Neighbours<'a> {
    pub(crate) others: &'a [ClusterPlan],
    pub(crate) uid: u32,
    pub(crate) state_dir: &'a Path,
}

impl RunningCluster {
    /// Starts the demo service, gateway, DNS server and node agent of `plan` against `broker`.
    pub(crate) async fn start(
        plan: &ClusterPlan,
        broker: &Broker,
        neighbours: &Neighbours<'_>,
        progress: &dyn Fn(&str),
    ) -> Result<Self, LabError> {
        let (drain, watch) = DrainTrigger::new();
        match Self::start_inner(plan, broker, neighbours, progress, watch).await {
            Ok(c) => Ok(Self {
                info: c.info,
                gateway: c.gateway,
                backend: c.backend,
                dns: c.dns,
                workload_api: c.workload_api,
                outbound: c.outbound,
                drain,
            }),
            Err(e) => {
                // Stop whatever this cluster had started before the failure.
                let _ = drain.drain(DRAIN_DEADLINE).await;
                Err(e)
            }
        }
    }

    async fn start_inner(
        plan: &ClusterPlan,
        broker: &Broker,
        neighbours: &Neighbours<'_>,
        progress: &dyn Fn(&str),
        watch: DrainWatch,
    ) -> Result<Components, LabError> {
        let name = plan.name.as_str();
        let own = &plan.trust_domain;
        let others: Vec<TrustDomain> = neighbours
            .others
            .iter()
            .map(|p| p.trust_domain.clone())
            .collect();
        let io = |what: &str| {
            let (what, cluster) = (what.to_owned(), name.to_owned());
            move |source| LabError::Io {
                cluster,
                what,
                source,
            }
        };

        let backend = crate::echo::start(name.to_owned(), watch.clone())
            .await
            .map_err(io("echo service"))?;

        // The gateway and DNS server share one attested "control-plane" node.
        let gateway_id = workload_id(own, &GATEWAY_PATH)?;
        let dns_id = workload_id(own, &["ns", "isthmus-system", "sa", "dns"])?;
        let control = attest_node(
            broker,
            name,
            "control-plane",
            &[
                ("eastwest-gateway", &gateway_id, &others),
                ("dns", &dns_id, &others),
            ],
            neighbours.uid,
        )
        .await?;
        let broker_failure = |what: &'static str| {
            let cluster = name.to_owned();
            move |e: isthmus_api::broker_client::BrokerClientError| LabError::Broker {
                cluster,
                message: format!("{what}: {e}"),
            }
        };
        let gateway_identity = Identity {
            svid: control
                .workload_source("eastwest-gateway", watch.clone())
                .await
                .map_err(broker_failure("gateway SVID"))?,
            trust: control.trust().clone(),
        };
        let dns_identity = Identity {
            svid: control
                .workload_source("dns", watch.clone())
                .await
                .map_err(broker_failure("DNS SVID"))?,
            trust: control.trust().clone(),
        };
        let maintain = watch.clone();
        tokio::spawn(async move { control.maintain(maintain).await });

        let gateway = Self::start_gateway(plan, neighbours, backend, gateway_identity).await?;
        let catalog = gateway
            .catalog_addr()
            .ok_or_else(|| LabError::Bug(format!("gateway of {name} has no catalog API")))?;
        progress(&format!(
            "{name}: gateway {} (catalog API {catalog}), echo.demo backend {backend}",
            gateway.addr()
        ));

        let dns = match Self::start_dns(name, own, &dns_identity, catalog, &watch).await {
            Ok(dns) => dns,
            Err(e) => {
                gateway.shutdown(DRAIN_DEADLINE).await;
                return Err(e);
            }
        };
        progress(&format!(
            "{name}: DNS {} (forwarding off)",
            dns.local_addr()
        ));

        let agent = Self::start_agent(plan, broker, neighbours, catalog, &watch).await;
        let (workload_api, outbound) = match agent {
            Ok(agent) => agent,
            Err(e) => {
                let _ = dns.shutdown().await;
                gateway.shutdown(DRAIN_DEADLINE).await;
                return Err(e);
            }
        };
        progress(&format!(
            "{name}: node agent (explicit mode), Workload API {}",
            workload_api.endpoint()
        ));

        Ok(Components {
            info: ClusterInfo {
                name: name.to_owned(),
                trust_domain: own.to_string(),
                dns: dns.local_addr(),
                gateway: gateway.addr(),
                broker: broker.api_addr(),
                services: vec![
                    format!("{DEMO_SERVICE}.{DEMO_NAMESPACE}"),
                    format!("{}.{DEMO_NAMESPACE}", own_service(name)),
                ],
            },
            gateway,
            backend,
            dns,
            workload_api,
            outbound,
        })
    }

    async fn start_gateway(
        plan: &ClusterPlan,
        neighbours: &Neighbours<'_>,
        backend: SocketAddr,
        identity: Identity,
    ) -> Result<Gateway, LabError> {
        let own = &plan.trust_domain;
        // Every lab cluster's demo client may call echo; nobody else.
        let mut allow = vec![AllowRule::SpiffeId(workload_id(own, &CLIENT_PATH)?)];
        for other in neighbours.others {
            allow.push(AllowRule::SpiffeId(workload_id(
                &other.trust_domain,
                &CLIENT_PATH,
            )?));
        }
        let mut cfg = GatewayConfig {
            trust_domain: Some(own.clone()),
            cluster: plan.name.clone(),
            listen: plan.gateway,
            federated_trust_domains: neighbours
                .others
                .iter()
                .map(|p| p.trust_domain.clone())
                .collect(),
            // `echo` from every cluster; `echo-<name>` only from this one (so that calling it
            // from another cluster crosses through the tunnel).
            services: [DEMO_SERVICE.to_owned(), own_service(&plan.name)]
                .into_iter()
                .map(|name| ExportedService {
                    namespace: DEMO_NAMESPACE.into(),
                    name,
                    ports: vec![ServicePort {
                        name: "http".into(),
                        port: DEMO_PORT,
                        target_port: Some(backend.port()),
                        protocol: "TCP".into(),
                    }],
                    endpoints: vec![EndpointConfig {
                        address: backend.ip(),
                        ready: true,
                    }],
                    allow: allow.clone(),
                })
                .collect(),
            catalog_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..GatewayConfig::default()
        };
        cfg.peering.vip_range = plan.vip_range.clone();
        cfg.peering.peers = neighbours
            .others
            .iter()
            .map(|p| PeerConfig {
                trust_domain: p.trust_domain.clone(),
                address: p.gateway,
            })
            .collect();
        Gateway::start(&cfg, identity)
            .await
            .map_err(|e| LabError::Gateway {
                cluster: plan.name.clone(),
                message: e.to_string(),
            })
    }

    async fn start_dns(
        name: &str,
        own: &TrustDomain,
        identity: &Identity,
        catalog: SocketAddr,
        watch: &DrainWatch,
    ) -> Result<DnsServer, LabError> {
        let dns_error = |e: String| LabError::Dns {
            cluster: name.to_owned(),
            message: e,
        };
        let cfg = DnsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..DnsConfig::default()
        };
        let zone_settings = cfg.zone_settings().map_err(|e| dns_error(e.to_string()))?;
        let origin = zone_settings.origin().clone();
        let (feed, zone) = ZoneFeed::new(zone_settings);
        let settings = cfg.server_settings();
        // No forwarder: names outside the zone are refused, nothing leaves the machine.
        let handler = ZoneHandler::new(zone, settings.max_udp_payload).with_origin(origin);
        let server = DnsServer::start_with(&settings, handler)
            .await
            .map_err(|e| dns_error(e.to_string()))?;
        tokio::spawn(isthmus_dns::server::follow_catalog(
            catalog_client(identity, own, catalog)?,
            feed,
            Backoff::default(),
            watch.clone(),
        ));
        Ok(server)
    }

    async fn start_agent(
        plan: &ClusterPlan,
        broker: &Broker,
        neighbours: &Neighbours<'_>,
        catalog: SocketAddr,
        watch: &DrainWatch,
    ) -> Result<(WorkloadApiServer, Outbound), LabError> {
        let name = plan.name.as_str();
        let own = &plan.trust_domain;
        let others: Vec<TrustDomain> = neighbours
            .others
            .iter()
            .map(|p| p.trust_domain.clone())
            .collect();
        let client_id = workload_id(own, &CLIENT_PATH)?;
        let node = attest_node(
            broker,
            name,
            "node-1",
            &[("demo-client", &client_id, &others)],
            neighbours.uid,
        )
        .await?;
        let agent = Agent::start(
            Arc::new(node),
            AgentSettings {
                identity: IdentitySettings::default(),
                workload_api: Some(WorkloadApiSettings {
                    socket: neighbours.state_dir.join(name).join("agent.sock"),
                    ..WorkloadApiSettings::default()
                }),
                outbound: Some((
                    OutboundSettings {
                        mode: Mode::Explicit,
                        quic_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                        ..OutboundSettings::default()
                    },
                    catalog,
                )),
            },
            watch.clone(),
        )
        .await
        .map_err(|e| LabError::Agent {
            cluster: name.to_owned(),
            message: e.to_string(),
        })?;
        let (Some(workload_api), Some(outbound)) = (agent.workload_api, agent.outbound) else {
            return Err(LabError::Bug(
                "the agent started without its Workload API or outbound".into(),
            ));
        };
        Ok((workload_api, outbound))
    }

    /// The addresses the node agent listens on (one per global service port VIP).
    pub(crate) fn agent_listening(&self) -> Vec<SocketAddr> {
        self.outbound.listening()
    }

    /// What the node agent did with the connections it accepted.
    pub(crate) fn agent_stats(&self) -> isthmus_node_agent::outbound::OutboundStats {
        self.outbound.stats()
    }

    /// Stops the agent, DNS server and gateway, in that order.
    pub(crate) async fn shutdown(self) {
        let name = self.info.name.clone();
        let outcome = self.drain.drain(DRAIN_DEADLINE).await;
        tracing::debug!(cluster = %name, ?outcome, "agent and feeds drained");
        self.workload_api.stopped().await;
        drop(self.outbound);
        if let Err(error) = self.dns.shutdown().await {
            tracing::warn!(cluster = %name, %error, "DNS server did not stop cleanly");
        }
        let outcome = self.gateway.shutdown(DRAIN_DEADLINE).await;
        tracing::debug!(cluster = %name, ?outcome, "gateway stopped");
    }
}
