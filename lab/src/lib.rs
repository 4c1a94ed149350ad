//! The Isthmus lab: several clusters in one process on loopback addresses, no Kubernetes and
//! no root. Each cluster has its own trust domain (`<name>.lab`), trust broker, east-west
//! gateway, `clusterset.local` DNS server (forwarding off: nothing leaves the machine), node
//! agent in explicit mode, and the demo service `echo.demo`, exported from every cluster. The
//! brokers federate in a full mesh and the gateways peer in a full mesh.
//!
//! Start with [`Lab::start`]; [`Lab::status`] is what `isthmus lab status` shows;
//! [`Lab::shutdown`] stops everything. The cluster runtime is in `cluster`, the demo service
//! in `echo`, the status document in [`status`].

mod cluster;
pub mod demo;
mod echo;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_core::TrustDomain;
use isthmus_trust_broker::runtime::Broker;

pub use cluster::{CLIENT_PATH, DEMO_NAMESPACE, DEMO_PORT, DEMO_SERVICE, own_service};
pub use echo::body as echo_body;
pub use isthmus_node_agent::outbound::OutboundStats;
pub use status::{ClusterInfo, ClusterStatus, LabStatus};

use cluster::{ClusterPlan, Neighbours, RunningCluster};

/// Names of the first clusters; later ones are `cluster6`, `cluster7`, …
pub const CLUSTER_NAMES: [&str; 5] = ["west", "east", "north", "south", "central"];
/// The largest lab: cluster `i` takes VIPs from `127.<100+i>.0.0/16`.
pub const MAX_CLUSTERS: usize = 32;
/// How long a broker may take to stop.
const BROKER_DEADLINE: Duration = Duration::from_secs(3);

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSettings {
    /// How many clusters (1 to [`MAX_CLUSTERS`]).
    pub clusters: usize,
    /// Brokers' data, sockets and `status.json` live here; created when missing.
    pub state_dir: PathBuf,
}

impl Default for LabSettings {
    fn default() -> Self {
        Self {
            clusters: 2,
            state_dir: std::env::temp_dir().join("isthmus-lab"),
        }
    }
}

/// Why the lab could not start.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The cluster count is out of range.
    #[error("clusters: {0} is out of range (1 to {MAX_CLUSTERS})")]
    ClusterCount(usize),
    /// A file, socket or listener failed.
    #[error("{cluster}: {what}: {source}")]
    Io {
        /// The cluster (or `lab`).
        cluster: String,
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A trust broker failed to start or to attest a node.
    #[error("{cluster}: trust broker: {message}")]
    Broker {
        /// The cluster.
        cluster: String,
        /// What failed.
        message: String,
    },
    /// A broker admin call failed.
    #[error("{cluster}: broker admin {what}: {message}")]
    Admin {
        /// The cluster.
        cluster: String,
        /// The call.
        what: String,
        /// The broker's answer.
        message: String,
    },
    /// A gateway failed to start.
    #[error("{cluster}: gateway: {message}")]
    Gateway {
        /// The cluster.
        cluster: String,
        /// What failed.
        message: String,
    },
    /// A DNS server failed to start.
    #[error("{cluster}: DNS: {message}")]
    Dns {
        /// The cluster.
        cluster: String,
        /// What failed.
        message: String,
    },
    /// A node agent failed to start.
    #[error("{cluster}: node agent: {message}")]
    Agent {
        /// The cluster.
        cluster: String,
        /// What failed.
        message: String,
    },
    /// An invariant broke.
    #[error("BUG: {0}")]
    Bug(String),
}

/// The name of cluster `i` (0-based).
pub fn cluster_name(i: usize) -> String {
    CLUSTER_NAMES
        .get(i)
        .map_or_else(|| format!("cluster{}", i + 1), |n| (*n).to_owned())
}

/// A running lab.
pub struct Lab {
    brokers: Vec<Broker>,
    clusters: Vec<RunningCluster>,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("clusters", &self.clusters)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Starts every cluster; `progress` receives one line per step. On failure, whatever had
    /// started is stopped again.
    pub async fn start(settings: LabSettings, progress: impl Fn(&str)) -> Result<Self, LabError> {
        if settings.clusters == 0 || settings.clusters > MAX_CLUSTERS {
            return Err(LabError::ClusterCount(settings.clusters));
        }
        let lab_io = |what: String| {
            move |source| LabError::Io {
                cluster: "lab".into(),
                what,
                source,
            }
        };
        std::fs::create_dir_all(&settings.state_dir)
            .map_err(lab_io(format!("creating {}", settings.state_dir.display())))?;
        let plans = plan(settings.clusters)?;
        let mut lab = Self {
            brokers: Vec::new(),
            clusters: Vec::new(),
            state_dir: settings.state_dir.clone(),
        };
        match lab.start_all(&plans, &progress).await {
            Ok(()) => {
                progress("lab is up");
                Ok(lab)
            }
            Err(e) => {
                lab.shutdown().await;
                Err(e)
            }
        }
    }

    async fn start_all(
        &mut self,
        plans: &[ClusterPlan],
        progress: &dyn Fn(&str),
    ) -> Result<(), LabError> {
        for plan in plans {
            let cfg = cluster::broker_config(plan, &self.state_dir);
            let broker = Broker::start(&cfg).await.map_err(|e| LabError::Broker {
                cluster: plan.name.clone(),
                message: e.to_string(),
            })?;
            progress(&format!(
                "{}: trust broker for {} (API {}, bundle endpoint {})",
                plan.name,
                plan.trust_domain,
                broker.api_addr(),
                broker.bundle_endpoint_addr()
            ));
            self.brokers.push(broker);
        }
        // Full mesh: every broker holds every other domain's bundle before any SVID is issued.
        for (i, from) in self.brokers.iter().enumerate() {
            for (j, to) in self.brokers.iter().enumerate() {
                if i != j {
                    cluster::federate(from, to, &plans[i].name).await?;
                }
            }
        }
        if plans.len() > 1 {
            progress("trust brokers federated (full mesh)");
        }
        let uid = nix::unistd::geteuid().as_raw();
        for (i, plan) in plans.iter().enumerate() {
            let others: Vec<ClusterPlan> = plans
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| p.clone())
                .collect();
            let neighbours = Neighbours {
                others: &others,
                uid,
                state_dir: &self.state_dir,
            };
            let running =
                RunningCluster::start(plan, &self.brokers[i], &neighbours, progress).await?;
            self.clusters.push(running);
        }
        Ok(())
    }

    /// Names and addresses of every cluster.
    pub fn clusters(&self) -> Vec<ClusterInfo> {
        self.clusters.iter().map(|c| c.info.clone()).collect()
    }

    /// The addresses cluster `name`'s node agent listens on (the VIPs of global service
    /// ports), or none for an unknown cluster.
    pub fn agent_listening(&self, name: &str) -> Vec<SocketAddr> {
        self.clusters
            .iter()
            .find(|c| c.info.name == name)
            .map(RunningCluster::agent_listening)
            .unwrap_or_default()
    }

    /// The demo service's own address in cluster `name` (bypassing agent and gateway).
    pub fn echo_backend(&self, name: &str) -> Option<SocketAddr> {
        self.cluster(name).map(|c| c.backend)
    }

    /// What cluster `name`'s node agent did with the connections it accepted.
    pub fn agent_stats(&self, name: &str) -> Option<OutboundStats> {
        self.cluster(name).map(RunningCluster::agent_stats)
    }

    /// Rotates cluster `name`'s CA through its broker's admin API (`now`: the new root signs
    /// at once). Returns the bundle sequence that publishes the new root.
    pub async fn rotate_ca(&self, name: &str, now: bool) -> Result<u64, LabError> {
        let index = self
            .clusters
            .iter()
            .position(|c| c.info.name == name)
            .ok_or_else(|| LabError::Bug(format!("no cluster named {name}")))?;
        let broker = self
            .brokers
            .get(index)
            .ok_or_else(|| LabError::Bug(format!("no broker for cluster {name}")))?;
        let response = cluster::admin(broker)
            .rotate_ca(isthmus_api::broker::RotateCaRequest { now })
            .await
            .map_err(|status| LabError::Admin {
                cluster: name.to_owned(),
                what: "RotateCa".into(),
                message: status.message().to_owned(),
            })?;
        Ok(response.into_inner().sequence)
    }

    fn cluster(&self, name: &str) -> Option<&RunningCluster> {
        self.clusters.iter().find(|c| c.info.name == name)
    }

    /// Health of every cluster: federation links, peerings, services and their VIPs.
    pub fn status(&self) -> LabStatus {
        let now = time::OffsetDateTime::now_utc();
        let clusters = self
            .clusters
            .iter()
            .zip(&self.brokers)
            .map(|(cluster, broker)| {
                let broker_status = broker.status();
                ClusterStatus {
                    info: cluster.info.clone(),
                    bundle_sequence: broker_status.sequence,
                    federation: broker_status.federation,
                    gateway: cluster.gateway.status(now),
                }
            })
            .collect();
        LabStatus {
            taken_at: now,
            clusters,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Stops every agent, DNS server and gateway, then every broker. The state directory is
    /// left in place.
    pub async fn shutdown(self) {
        // Clusters stop together: one by one, each gateway would see its peers go first.
        let mut stopping = tokio::task::JoinSet::new();
        for cluster in self.clusters {
            stopping.spawn(cluster.shutdown());
        }
        while stopping.join_next().await.is_some() {}
        for broker in self.brokers {
            stopping.spawn(async move {
                let outcome = broker.shutdown(BROKER_DEADLINE).await;
                tracing::debug!(?outcome, "broker stopped");
            });
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// Names, trust domains, VIP ranges and gateway ports of `count` clusters. Gateways must know
/// each other's addresses before they start (each dials every peer), so their ports are
/// chosen here: a port free for both UDP (QUIC) and TCP (the fallback) on 127.0.0.1.
fn plan(count: usize) -> Result<Vec<ClusterPlan>, LabError> {
    let mut plans = Vec::with_capacity(count);
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let name = cluster_name(i);
        let trust_domain = TrustDomain::new(&format!("{name}.lab"))
            .map_err(|e| LabError::Bug(format!("trust domain of {name}: {e}")))?;
        let (port, sockets) = free_port(&name)?;
        // Keep the sockets until every port is chosen so no two clusters get the same one.
        held.push(sockets);
        plans.push(ClusterPlan {
            name,
            trust_domain,
            vip_range: format!("127.{}.0.0/16", 100 + i),
            gateway: SocketAddr::from(([127, 0, 0, 1], port)),
        });
    }
    drop(held);
    Ok(plans)
}

fn free_port(
    cluster: &str,
) -> Result<(u16, (std::net::UdpSocket, std::net::TcpListener)), LabError> {
    let mut last = None;
    for _ in 0..20 {
        let udp = std::net::UdpSocket::bind(("127.0.0.1", 0)).map_err(|source| LabError::Io {
            cluster: cluster.to_owned(),
            what: "choosing the gateway port".into(),
            source,
        })?;
        let port = udp
            .local_addr()
            .map_err(|source| LabError::Io {
                cluster: cluster.to_owned(),
                what: "choosing the gateway port".into(),
                source,
            })?
            .port();
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(tcp) => return Ok((port, (udp, tcp))),
            Err(e) => last = Some(e),
        }
    }
    Err(LabError::Io {
        cluster: cluster.to_owned(),
        what: "choosing a gateway port free for UDP and TCP".into(),
        source: last.unwrap_or_else(|| std::io::Error::other("no attempt made")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_are_named_and_get_distinct_vip_ranges_and_ports() {
        let plans = plan(7).unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "west", "east", "north", "south", "central", "cluster6", "cluster7"
            ]
        );
        assert_eq!(plans[0].trust_domain.name(), "west.lab");
        assert_eq!(plans[0].vip_range, "127.100.0.0/16");
        assert_eq!(plans[6].vip_range, "127.106.0.0/16");
        let mut ports: Vec<u16> = plans.iter().map(|p| p.gateway.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 7);
    }

    #[test]
    fn a_lab_needs_between_one_and_the_maximum_clusters() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for count in [0, MAX_CLUSTERS + 1] {
            let settings = LabSettings {
                clusters: count,
                ..LabSettings::default()
            };
            let result = runtime.block_on(Lab::start(settings, |_| {}));
            assert!(matches!(result, Err(LabError::ClusterCount(c)) if c == count));
        }
    }
}
