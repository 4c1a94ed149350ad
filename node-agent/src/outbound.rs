//! Outbound connections to global services: the agent accepts a workload's connection to a
//! service's VIP:port, names the workload (the process behind the TCP peer, attested like a
//! Workload API caller), picks a cluster by the service's affinity among those with ready
//! endpoints, and either connects straight to a local endpoint or opens a tunnel stream to
//! that cluster's east-west gateway with *the workload's own* SVID, so the gateway sees the
//! workload's SPIFFE ID. A cluster that fails is skipped and the next one tried.
//!
//! Two ways in:
//! - **explicit**: one listener per VIP:port of every ClusterSetIP service (in the lab, VIPs are
//!   127.x addresses, so no privilege is needed); listeners follow the catalog.
//! - **transparent** (root): one listener, and the [`Redirector`]'s cgroup connect hooks send
//!   connects to any VIP:port to it; the original VIP comes from the sockops map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use isthmus_api::catalog as pb;
use isthmus_api::tunnel::Target;
use isthmus_api::tunnel_client::{TunnelClient, TunnelClientOptions};
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::tls::{Authorizer, MtlsSettings};
use isthmus_core::trust::TrustStore;
use isthmus_core::{SpiffeId, TrustDomain};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::attest::WorkloadAttestor;
use crate::identities::{WorkloadIdentities, WorkloadSvid};
use crate::redirect::{RedirectError, Redirector};

/// The path of every east-west gateway's SPIFFE ID within its trust domain.
const GATEWAY_PATH: &str = "/ns/isthmus-system/sa/eastwest-gateway";

/// Errors starting outbound handling.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The transparent-mode listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The eBPF redirect could not be attached.
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// How workload connections reach the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A listener on every VIP:port.
    Explicit,
    /// One listener on `listen`; connects from processes in `cgroup` to any VIP:port are
    /// redirected to it.
    Transparent {
        /// The cgroup (v2 directory) whose processes are redirected.
        cgroup: PathBuf,
        /// The agent's listener (loopback).
        listen: SocketAddr,
    },
}

/// Outbound settings.
#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// Explicit or transparent.
    pub mode: Mode,
    /// How long a direct connect to a local endpoint may take.
    pub connect_timeout: Duration,
    /// Tunnel client options (handshake timeout, windows, transport policy).
    pub tunnel: TunnelClientOptions,
    /// The local UDP address tunnel clients bind.
    pub quic_bind: SocketAddr,
}

impl Default for OutboundSettings {
    fn default() -> Self {
        Self {
            mode: Mode::Explicit,
            connect_timeout: Duration::from_secs(3),
            tunnel: TunnelClientOptions::default(),
            quic_bind: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// One global service port as the agent routes it.
#[derive(Debug, Clone)]
struct Route {
    service: pb::GlobalService,
    global: isthmus_core::catalog::GlobalService,
    port: u16,
    /// The port local endpoints listen on.
    local_port: u16,
}

/// The routing table built from one catalog snapshot.
#[derive(Debug, Default)]
struct Table {
    cluster: String,
    routes: BTreeMap<SocketAddr, Route>,
    gateways: BTreeMap<String, (TrustDomain, SocketAddr)>,
}

impl Table {
    fn from_snapshot(snapshot: &pb::CatalogSnapshot) -> Self {
        let mut routes = BTreeMap::new();
        for service in &snapshot.services {
            let Ok(vip) = service.vip.parse::<IpAddr>() else {
                continue;
            };
            let Some(global) = to_global(service) else {
                continue;
            };
            for port in &service.ports {
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                if port.protocol != "TCP" {
                    continue;
                }
                routes.insert(
                    SocketAddr::new(vip, number),
                    Route {
                        service: service.clone(),
                        global: global.clone(),
                        port: number,
                        local_port: u16::try_from(port.local_target_port)
                            .ok()
                            .filter(|p| *p != 0)
                            .unwrap_or(number),
                    },
                );
            }
        }
        let gateways = snapshot
            .gateways
            .iter()
            .filter_map(|g| {
                Some((
                    g.cluster.clone(),
                    (
                        g.trust_domain.parse().ok()?,
                        g.address.parse::<SocketAddr>().ok()?,
                    ),
                ))
            })
            .collect();
        Self {
            cluster: snapshot.cluster.clone(),
            routes,
            gateways,
        }
    }
}

/// The core catalog model of a wire service (for endpoint selection).
fn to_global(service: &pb::GlobalService) -> Option<isthmus_core::catalog::GlobalService> {
    use isthmus_core::catalog::{Affinity, Endpoint, GlobalService, ServiceKey, ServiceType};
    Some(GlobalService {
        key: ServiceKey::new(&service.namespace, &service.name),
        ports: Vec::new(),
        service_type: ServiceType::ClusterSetIP,
        affinity: match service.affinity.as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            _ => Affinity::None,
        },
        conflicts: Vec::new(),
        endpoints: service
            .clusters
            .iter()
            .map(|c| {
                let endpoints = c
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        Some(Endpoint {
                            address: e.address.parse().ok()?,
                            ready: e.ready,
                            zone: None,
                            hostname: None,
                        })
                    })
                    .collect();
                (c.cluster.clone(), endpoints)
            })
            .collect(),
    })
}

/// Accepts any verified gateway: the chain already verified against the bundle of the
/// gateway's trust domain; its ID must be that domain's east-west gateway.
#[derive(Debug)]
struct AnyGateway;

impl Authorizer for AnyGateway {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        if peer.path() == GATEWAY_PATH {
            Ok(())
        } else {
            Err(format!("{peer} is not an east-west gateway"))
        }
    }
}

/// Counters of what happened to accepted connections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutboundStats {
    /// Connections spliced to a local endpoint.
    pub direct: u64,
    /// Connections spliced into a tunnel.
    pub tunnelled: u64,
    /// Connections whose workload had no identity (closed).
    pub no_identity: u64,
    /// Connections to a VIP:port the catalog does not know (closed).
    pub unknown_service: u64,
    /// Connections no cluster could take (closed).
    pub failed: u64,
}

struct State {
    settings: OutboundSettings,
    identities: WorkloadIdentities,
    attestor: Arc<dyn WorkloadAttestor>,
    trust: TrustStore,
    table: watch::Receiver<Arc<Table>>,
    tunnels: Mutex<HashMap<String, TunnelClient>>,
    stats: Mutex<OutboundStats>,
    redirector: Option<Mutex<Redirector>>,
}

impl State {
    fn count(&self, f: impl FnOnce(&mut OutboundStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The tunnel client presenting `workload`'s SVID (one per entry, reused).
    fn tunnel_client(&self, workload: &WorkloadSvid) -> Result<TunnelClient, String> {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = tunnels.get(&workload.entry.id) {
            return Ok(client.clone());
        }
        let settings = MtlsSettings {
            svid: workload.source.clone(),
            trust: self.trust.clone(),
            authorizer: Arc::new(AnyGateway),
            alpn: Vec::new(),
            observer: None,
        };
        let client = TunnelClient::new(
            &settings,
            self.settings.quic_bind,
            self.settings.tunnel.clone(),
        )
        .map_err(|e| e.to_string())?;
        tunnels.insert(workload.entry.id.clone(), client.clone());
        Ok(client)
    }
}

/// The running outbound side of the agent.
pub struct Outbound {
    state: Arc<State>,
    listeners: Arc<Mutex<BTreeMap<SocketAddr, JoinHandle<()>>>>,
    transparent: Option<SocketAddr>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("mode", &self.state.settings.mode)
            .field("listeners", &self.listening())
            .finish()
    }
}

impl Outbound {
    /// Starts outbound handling: routes follow `catalog` (the latest snapshot of the local
    /// gateway's catalog API), workloads are named by `attestor` against `identities`, and
    /// gateways are verified against `trust`. Runs until `drain` signals.
    pub async fn start(
        settings: OutboundSettings,
        identities: WorkloadIdentities,
        attestor: Arc<dyn WorkloadAttestor>,
        trust: TrustStore,
        mut catalog: watch::Receiver<Option<Arc<pb::CatalogSnapshot>>>,
        drain: DrainWatch,
    ) -> Result<Self, OutboundError> {
        let (table_tx, table) = watch::channel(Arc::new(Table::default()));
        let mut transparent = None;
        let mut redirector = None;
        let mut transparent_listener = None;
        if let Mode::Transparent { cgroup, listen } = &settings.mode {
            let listener =
                TcpListener::bind(listen)
                    .await
                    .map_err(|source| OutboundError::Listen {
                        address: *listen,
                        source,
                    })?;
            let address = listener
                .local_addr()
                .map_err(|source| OutboundError::Listen {
                    address: *listen,
                    source,
                })?;
            redirector = Some(Mutex::new(Redirector::attach(cgroup, address)?));
            transparent = Some(address);
            transparent_listener = Some(listener);
        }
        let state = Arc::new(State {
            settings,
            identities,
            attestor,
            trust,
            table,
            tunnels: Mutex::new(HashMap::new()),
            stats: Mutex::new(OutboundStats::default()),
            redirector,
        });
        let outbound = Self {
            state: state.clone(),
            listeners: Arc::new(Mutex::new(BTreeMap::new())),
            transparent,
        };
        if let Some(listener) = transparent_listener {
            tokio::spawn(accept_loop(listener, state.clone(), None, drain.clone()));
        }
        let listeners = outbound.listeners.clone();
        tokio::spawn(async move {
            loop {
                let snapshot = catalog.borrow_and_update().clone();
                if let Some(snapshot) = snapshot {
                    let table = Arc::new(Table::from_snapshot(&snapshot));
                    apply(&state, &listeners, &table, &drain).await;
                    table_tx.send_replace(table);
                }
                tokio::select! {
                    () = drain.signaled() => break,
                    changed = catalog.changed() => if changed.is_err() { break },
                }
            }
            for (_, task) in
                std::mem::take(&mut *listeners.lock().unwrap_or_else(PoisonError::into_inner))
            {
                task.abort();
            }
        });
        Ok(outbound)
    }

    /// The addresses accepting workload connections now: every VIP:port in explicit mode,
    /// the redirect target in transparent mode.
    pub fn listening(&self) -> Vec<SocketAddr> {
        match self.transparent {
            Some(address) => vec![address],
            None => self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .copied()
                .collect(),
        }
    }

    /// The VIP:ports currently routed.
    pub fn routes(&self) -> Vec<SocketAddr> {
        self.state.table.borrow().routes.keys().copied().collect()
    }

    /// What happened to accepted connections so far.
    pub fn stats(&self) -> OutboundStats {
        self.state
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Brings listeners (explicit) or the redirect map (transparent) in line with `table`.
async fn apply(
    state: &Arc<State>,
    listeners: &Mutex<BTreeMap<SocketAddr, JoinHandle<()>>>,
    table: &Table,
    drain: &DrainWatch,
) {
    let wanted: BTreeSet<SocketAddr> = table.routes.keys().copied().collect();
    if let Some(redirector) = &state.redirector {
        let mut redirector = redirector.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = redirector.set_vips(&wanted) {
            tracing::error!(error = %e, "cannot update the redirected VIPs");
        }
        return;
    }
    let stale: Vec<SocketAddr> = listeners
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .filter(|a| !wanted.contains(a))
        .copied()
        .collect();
    for address in stale {
        if let Some(task) = listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&address)
        {
            task.abort();
            tracing::info!(vip = %address, "stopped listening on a withdrawn VIP");
        }
    }
    for address in wanted {
        if listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&address)
        {
            continue;
        }
        match TcpListener::bind(address).await {
            Ok(listener) => {
                let task = tokio::spawn(accept_loop(
                    listener,
                    state.clone(),
                    Some(address),
                    drain.clone(),
                ));
                listeners
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(address, task);
                tracing::info!(vip = %address, "listening for a global service");
            }
            Err(e) => tracing::warn!(vip = %address, error = %e, "cannot listen on a VIP"),
        }
    }
}

/// Accepts workload connections; `vip` is the listener's VIP:port in explicit mode, `None`
/// in transparent mode (the original destination comes from the redirect map).
async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    vip: Option<SocketAddr>,
    drain: DrainWatch,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let (stream, peer) = tokio::select! {
            () = drain.signaled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let destination = vip.or_else(|| {
            state.redirector.as_ref().and_then(|r| {
                r.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .original_destination(peer)
            })
        });
        let state = state.clone();
        tokio::spawn(async move {
            let Some(destination) = destination else {
                tracing::debug!(peer = %peer, "connection without a redirected destination");
                state.count(|s| s.unknown_service += 1);
                return;
            };
            handle(&state, stream, peer, local, destination).await;
        });
    }
}

async fn handle(
    state: &State,
    mut client: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    destination: SocketAddr,
) {
    let table = state.table.borrow().clone();
    let Some(route) = table.routes.get(&destination) else {
        tracing::debug!(destination = %destination, "no global service at this VIP:port");
        state.count(|s| s.unknown_service += 1);
        return;
    };
    // Name the workload behind the connection.
    let selectors = crate::peer::tcp_peer(peer, local)
        .map_err(|e| e.to_string())
        .and_then(|creds| state.attestor.attest(&creds).map_err(|e| e.to_string()));
    let workload = match selectors {
        Ok(selectors) => state
            .identities
            .current()
            .matching(&selectors)
            .into_iter()
            .next(),
        Err(e) => {
            tracing::debug!(peer = %peer, error = %e, "cannot attest the connecting workload");
            None
        }
    };
    let Some(workload) = workload else {
        tracing::info!(peer = %peer, destination = %destination, "connection from a workload without an identity; closed");
        state.count(|s| s.no_identity += 1);
        return;
    };
    let plan = route.global.plan(&table.cluster, |_, _| false, rand_u64());
    for cluster in plan {
        if cluster == table.cluster {
            let Some(endpoint) = pick_endpoint(&route.global, &cluster) else {
                continue;
            };
            let target = SocketAddr::new(endpoint, route.local_port);
            match tokio::time::timeout(state.settings.connect_timeout, TcpStream::connect(target))
                .await
            {
                Ok(Ok(mut backend)) => {
                    state.count(|s| s.direct += 1);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(endpoint = %target, error = %e, "local endpoint refused")
                }
                Err(_) => tracing::debug!(endpoint = %target, "local endpoint timed out"),
            }
            continue;
        }
        let Some((_, gateway)) = table.gateways.get(&cluster) else {
            tracing::debug!(cluster = %cluster, "no gateway known for this cluster");
            continue;
        };
        let tunnels = match state.tunnel_client(&workload) {
            Ok(tunnels) => tunnels,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build a tunnel client");
                break;
            }
        };
        let target = Target {
            namespace: route.service.namespace.clone(),
            service: route.service.name.clone(),
            port: route.port,
            cluster: Some(cluster.clone()),
        };
        match tunnels.open(*gateway, target).await {
            Ok(mut tunnel) => {
                state.count(|s| s.tunnelled += 1);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut tunnel).await;
                return;
            }
            Err(e) => {
                tracing::info!(cluster = %cluster, gateway = %gateway, error = %e, "tunnel failed; trying the next cluster")
            }
        }
    }
    state.count(|s| s.failed += 1);
    tracing::info!(destination = %destination, "no cluster could take the connection");
}

/// A ready endpoint of `cluster`, chosen at random.
fn pick_endpoint(service: &isthmus_core::catalog::GlobalService, cluster: &str) -> Option<IpAddr> {
    let healthy = service.healthy(cluster, &|_, _| false);
    if healthy.is_empty() {
        return None;
    }
    let index = usize::try_from(rand_u64() % healthy.len() as u64).unwrap_or(0);
    healthy.get(index).map(|e| e.address)
}

/// A fresh random value per connection (std's randomly keyed hasher; no RNG crate needed).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into()),
    );
    hasher.finish()
}

/// Keeps `sender` holding the latest snapshot of the catalog API behind `client`.
pub async fn follow_catalog(
    client: isthmus_api::catalog::catalog_client::CatalogClient<tonic::transport::Channel>,
    sender: watch::Sender<Option<Arc<pb::CatalogSnapshot>>>,
    drain: DrainWatch,
) {
    isthmus_api::catalog_watch::follow(
        client,
        move |snapshot| {
            sender.send_replace(Some(Arc::new(snapshot)));
        },
        isthmus_api::catalog_watch::Backoff::default(),
        drain,
    )
    .await;
}
