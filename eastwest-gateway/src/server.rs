//! The QUIC front end: mTLS with the core verifiers (peers from our own or a federated trust
//! domain), one tunnelled TCP connection per bidirectional stream, graceful drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::tunnel::{
    self, MAX_REQUEST_HEADER, ReadError, ResultCode, StreamResponse, decode_request,
    encode_response,
};
use isthmus_core::lifecycle::{DrainOutcome, DrainTrigger, DrainWatch};
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_core::tls::{AllowTrustDomains, MtlsSettings, RejectionObserver};
use isthmus_core::{SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::config::{GatewayConfig, LimitsConfig};
use crate::dispatch::{Backend, Dispatcher, Refusal};
use crate::metrics::{GatewayMetrics, PeerLabels};
use crate::peering::{ExportLog, ImportStore, ImportedPeer, PEER_ALPN};

/// QUIC application error code: the gateway is shutting down.
pub const CLOSE_DRAINED: u32 = 0x1;
/// QUIC stream error code: the other side of the tunnelled connection reset it.
pub const RESET_PEER: u32 = 0x2;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is incomplete.
    #[error("configuration: {0}")]
    Config(#[from] isthmus_core::config::ConfigError),
    /// TLS material is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The import store (`peering.data_dir`) cannot be used.
    #[error("import store: {0}")]
    Store(String),
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The gateway's identity: its SVID and the bundles it trusts (own and federated).
pub type GatewayIdentity = isthmus_api::identity::Identity;

/// The peer of a verified connection.
fn peer_id(conn: &quinn::Connection) -> Option<SpiffeId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    isthmus_core::tls::peer_id(&certs)
}

/// The stream credit a new connection starts with.
fn initial_stream_credit(limits: &LimitsConfig) -> u32 {
    limits.max_streams_per_connection.min(16)
}

fn transport_config(limits: &LimitsConfig) -> Result<quinn::TransportConfig, GatewayError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        // Start with a small stream credit and raise it as streams are used (serve_connection):
        // quinn reserves per-stream state for the whole credit, which dominated the memory of
        // idle connections (115 KiB each at 1,024).
        .max_concurrent_bidi_streams(initial_stream_credit(limits).into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(limits.stream_window.into())
        .receive_window(limits.connection_window.into())
        .send_window(u64::from(limits.connection_window))
        .max_idle_timeout(Some(
            limits
                .idle_timeout
                .get()
                .try_into()
                .map_err(|_| GatewayError::Tls("idle_timeout too large".into()))?,
        ));
    Ok(transport)
}

/// The shared TLS and QUIC server configuration of both front ends.
pub(crate) fn tls_server_config(
    own: &TrustDomain,
    federated: &[TrustDomain],
    identity: &GatewayIdentity,
    alpn: Vec<Vec<u8>>,
    metrics: &GatewayMetrics,
) -> Result<rustls::ServerConfig, GatewayError> {
    let mut allowed = vec![own.clone()];
    allowed.extend(federated.iter().cloned());
    let failures = metrics.clone();
    let observer: RejectionObserver = Arc::new(move |e| failures.handshake_failed(e.reason()));
    isthmus_core::tls::server_config(&MtlsSettings {
        svid: identity.svid.clone(),
        trust: identity.trust.clone(),
        authorizer: Arc::new(AllowTrustDomains(allowed)),
        alpn,
        observer: Some(observer),
    })
    .map_err(|e| GatewayError::Tls(e.to_string()))
}

/// A running gateway.
pub struct Gateway {
    catalog_addr: Option<SocketAddr>,
    view: CatalogView,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    dispatcher: Dispatcher,
    drain: DrainTrigger,
    tasks: JoinSet<()>,
    registry: Arc<std::sync::Mutex<MetricsRegistry>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds QUIC (UDP) and the HTTP/2 fallback (TCP) on `config.listen` and starts serving.
    pub async fn start(
        config: &GatewayConfig,
        identity: GatewayIdentity,
    ) -> Result<Self, GatewayError> {
        let own = config.trust_domain()?.clone();
        let mut registry = MetricsRegistry::new();
        let metrics = GatewayMetrics::register(&mut registry);
        let dispatcher = Dispatcher::new(
            config.cluster.clone(),
            &config.services,
            config.limits.clone(),
            metrics.clone(),
        );
        let tls = tls_server_config(
            &own,
            &config.federated_trust_domains,
            &identity,
            vec![tunnel::ALPN.to_vec(), PEER_ALPN.to_vec()],
            &metrics,
        )?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config(&config.limits)?));
        let h2_tls = tls_server_config(
            &own,
            &config.federated_trust_domains,
            &identity,
            vec![isthmus_api::transport::ALPN_H2.to_vec()],
            &metrics,
        )?;
        // UDP first, then TCP on the same IP and the UDP socket's actual port. With port 0 that
        // TCP port may be taken: pick another pair a few times before giving up.
        let mut attempts_left = if config.listen.port() == 0 { 8 } else { 1 };
        let (endpoint, addr, tcp) = loop {
            attempts_left -= 1;
            let endpoint =
                quinn::Endpoint::server(server.clone(), config.listen).map_err(|source| {
                    GatewayError::Listen {
                        address: config.listen,
                        source,
                    }
                })?;
            let addr = endpoint
                .local_addr()
                .map_err(|source| GatewayError::Listen {
                    address: config.listen,
                    source,
                })?;
            match crate::h2::bind(addr).await {
                Ok(tcp) => break (endpoint, addr, tcp),
                Err(e) if attempts_left > 0 => {
                    tracing::debug!(error = %e, "TCP twin of the QUIC port is taken; rebinding");
                    endpoint.close(0u32.into(), b"");
                }
                Err(e) => return Err(e),
            }
        };
        let (drain, watch) = DrainTrigger::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::h2::serve(
            tcp,
            Arc::new(h2_tls),
            dispatcher.clone(),
            drain.watch(),
        ));
        let exports = ExportLog::new(time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64);
        let peering = Arc::new(PeeringServe {
            cluster: config.cluster.clone(),
            log: exports.clone(),
            heartbeat: config.peering.heartbeat.get(),
            peers: config
                .peering
                .peers
                .iter()
                .map(|p| p.trust_domain.clone())
                .collect(),
        });
        let store = match &config.peering.data_dir {
            Some(dir) => {
                Some(ImportStore::open(dir).map_err(|e| GatewayError::Store(e.to_string()))?)
            }
            None => None,
        };
        let mut vips = isthmus_core::catalog::VipAllocator::new(&config.peering.vip_range)
            .map_err(|e| {
                GatewayError::Config(isthmus_core::config::ConfigError::validation(
                    "peering.vip_range",
                    e.to_string(),
                ))
            })?;
        if let Some(store) = &store {
            vips.restore(
                store
                    .load_vips()
                    .map_err(|e| GatewayError::Store(e.to_string()))?,
            );
        }
        let created: BTreeMap<_, _> = match &store {
            Some(store) => store
                .load_created()
                .map_err(|e| GatewayError::Store(e.to_string()))?
                .into_iter()
                .collect(),
            None => BTreeMap::new(),
        };
        let mut imports = BTreeMap::new();
        for peer in &config.peering.peers {
            let stored = match &store {
                Some(store) => store
                    .load(&peer.trust_domain)
                    .map_err(|e| GatewayError::Store(e.to_string()))?,
                None => None,
            };
            let initial = stored.unwrap_or(ImportedPeer {
                cluster: String::new(),
                resume: None,
                exports: BTreeMap::new(),
                last_seen: None,
                connected: false,
            });
            // Imports restored from disk get a fresh staleness budget from this start: this
            // gateway, not the peer, was away, and the peer has that long to reconnect.
            let restored_at = initial.last_seen.map(|_| time::OffsetDateTime::now_utc());
            let (tx, rx) = tokio::sync::watch::channel(ImportedPeer {
                connected: false,
                last_seen: restored_at,
                ..initial
            });
            let client_tls = isthmus_core::tls::client_config(&MtlsSettings {
                svid: identity.svid.clone(),
                trust: identity.trust.clone(),
                authorizer: Arc::new(isthmus_core::tls::AllowIds(vec![
                    peer.gateway_id()
                        .map_err(|e| GatewayError::Tls(e.to_string()))?,
                ])),
                alpn: vec![PEER_ALPN.to_vec()],
                observer: None,
            })
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
                .map_err(|e| GatewayError::Tls(e.to_string()))?;
            let mut client = quinn::ClientConfig::new(Arc::new(crypto));
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(config.peering.heartbeat.get()));
            client.transport_config(Arc::new(transport));
            tasks.spawn(crate::peering::follow_peer(
                config.cluster.clone(),
                peer.clone(),
                endpoint.clone(),
                client,
                store.clone(),
                tx,
                config.peering.heartbeat.get(),
                drain.watch(),
            ));
            imports.insert(peer.trust_domain.clone(), rx);
        }
        // Every import or export change wakes the catalog's watchers.
        let changed = Arc::new(tokio::sync::Notify::new());
        for rx in imports.values() {
            tasks.spawn(forward_changes(rx.clone(), changed.clone(), drain.watch()));
        }
        tasks.spawn(forward_changes(
            exports.subscribe(),
            changed.clone(),
            drain.watch(),
        ));
        tasks.spawn(accept_loop(
            endpoint.clone(),
            dispatcher.clone(),
            config.limits.clone(),
            peering,
            watch,
        ));
        tracing::info!(address = %addr, trust_domain = %own, cluster = %config.cluster, "gateway listening (QUIC on UDP, HTTP/2 CONNECT fallback on TCP)");
        let view = CatalogView {
            cluster: config.cluster.clone(),
            addr,
            trust_domain: own.clone(),
            target_ports: Arc::default(),
            peer_addresses: config
                .peering
                .peers
                .iter()
                .map(|p| (p.trust_domain.clone(), p.address))
                .collect(),
            dispatcher: dispatcher.clone(),
            vips: Arc::new(std::sync::Mutex::new(vips)),
            store,
            exports,
            imports,
            staleness_budget: config.peering.staleness_budget.get(),
            changed,
            created: Arc::new(std::sync::Mutex::new(created)),
        };
        view.replace_exports(&config.services);
        let catalog_addr = match config.catalog_listen {
            Some(listen) => Some(
                crate::catalog_api::serve(listen, &own, &identity, view.clone(), drain.watch())
                    .await?,
            ),
            None => None,
        };
        Ok(Self {
            catalog_addr,
            view,
            endpoint,
            addr,
            dispatcher,
            drain,
            tasks,
            registry: Arc::new(std::sync::Mutex::new(registry)),
        })
    }

    /// The bound address: UDP for QUIC and TCP for the HTTP/2 fallback share its port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dispatcher (service table, limits, metrics).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Where the local catalog API listens, if enabled.
    pub fn catalog_addr(&self) -> Option<SocketAddr> {
        self.catalog_addr
    }

    /// A cheap, cloneable view of the catalog and status (for admin endpoints and APIs).
    pub fn view(&self) -> CatalogView {
        self.view.clone()
    }

    /// Replaces the exported services: new streams use them at once, and peers receive the
    /// changes as deltas.
    pub fn replace_exports(&self, services: &[crate::config::ExportedService]) {
        self.view.replace_exports(services);
    }

    /// What this gateway holds of each peer, with `connected` as of now.
    pub fn imports(&self) -> BTreeMap<TrustDomain, ImportedPeer> {
        self.view.imports()
    }

    /// See [`CatalogView::catalog`].
    pub fn catalog(&self, now: time::OffsetDateTime) -> Vec<isthmus_core::catalog::GlobalService> {
        self.view.catalog(now)
    }

    /// See [`CatalogView::status`].
    pub fn status(&self, now: time::OffsetDateTime) -> crate::status::GatewayStatus {
        self.view.status(now)
    }

    /// The metrics registry, for an admin HTTP endpoint.
    pub fn metrics_registry(&self) -> Arc<std::sync::Mutex<MetricsRegistry>> {
        self.registry.clone()
    }

    /// Metrics text.
    pub fn metrics_text(&self) -> String {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .encode_text()
            .unwrap_or_default()
    }

    /// Graceful shutdown: stop accepting connections and streams, let streams in flight finish
    /// until `deadline`, then close every connection with [`CLOSE_DRAINED`].
    pub async fn shutdown(mut self, deadline: Duration) -> DrainOutcome {
        self.endpoint.set_server_config(None);
        self.dispatcher.start_draining();
        // Both accept loops (QUIC and the TCP fallback) stop at once; streams in flight get
        // until the deadline. Aborting the tasks below closes the fallback's TCP connections.
        let _ = self.drain.drain(Duration::from_secs(1)).await;
        let outcome = match self.dispatcher.wait_idle(deadline).await {
            0 => DrainOutcome::Complete,
            remaining => DrainOutcome::DeadlineExceeded { remaining },
        };
        self.endpoint
            .close(CLOSE_DRAINED.into(), b"gateway shutting down");
        self.tasks.abort_all();
        // Wait for the aborted tasks so their sockets (the TCP listener, peering followers'
        // endpoint handles) are really closed when shutdown returns.
        while self.tasks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        outcome
    }
}

/// The gateway's catalog state, shareable: local exports, imports, VIPs and status.
#[derive(Debug, Clone)]
pub struct CatalogView {
    cluster: String,
    addr: SocketAddr,
    trust_domain: TrustDomain,
    peer_addresses: BTreeMap<TrustDomain, SocketAddr>,
    target_ports: Arc<std::sync::Mutex<crate::catalog_api::TargetPorts>>,
    dispatcher: Dispatcher,
    vips: Arc<std::sync::Mutex<isthmus_core::catalog::VipAllocator>>,
    store: Option<ImportStore>,
    exports: ExportLog,
    imports: BTreeMap<TrustDomain, tokio::sync::watch::Receiver<ImportedPeer>>,
    staleness_budget: Duration,
    changed: Arc<tokio::sync::Notify>,
    created:
        Arc<std::sync::Mutex<BTreeMap<isthmus_core::catalog::ServiceKey, time::OffsetDateTime>>>,
}

impl CatalogView {
    /// Resolves when the catalog may have changed (local exports or any peer's imports), or
    /// after `at_most` (staleness is a matter of time, not of messages).
    pub async fn changed(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changed.notified()).await;
    }

    /// This cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The target ports of this cluster's exports that differ from their service ports.
    pub fn target_ports(&self) -> crate::catalog_api::TargetPorts {
        self.target_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The gateways of this cluster and of every peer that has identified its cluster, as
    /// (cluster, trust domain, address), sorted by cluster.
    pub fn gateways(&self) -> Vec<(String, TrustDomain, SocketAddr)> {
        let mut gateways = vec![(self.cluster.clone(), self.trust_domain.clone(), self.addr)];
        for (td, import) in &self.imports {
            let cluster = import.borrow().cluster.clone();
            if let (false, Some(addr)) = (cluster.is_empty(), self.peer_addresses.get(td)) {
                gateways.push((cluster, td.clone(), *addr));
            }
        }
        gateways.sort_by(|a, b| a.0.cmp(&b.0));
        gateways
    }

    /// Replaces the exported services: new streams use them at once, and peers receive the
    /// changes as deltas.
    ///
    /// An export's creation time (the oldest export wins conflicts across clusters) is when
    /// this gateway first exported it, persisted with the imports; a service that stops being
    /// exported and comes back is a new export.
    pub fn replace_exports(&self, services: &[crate::config::ExportedService]) {
        self.dispatcher.replace_services(services);
        *self
            .target_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = services
            .iter()
            .flat_map(|s| {
                s.ports.iter().filter_map(|p| {
                    let target = p.target_port.filter(|t| *t != p.port)?;
                    Some(((s.namespace.clone(), s.name.clone(), p.port), target))
                })
            })
            .collect();
        let now = time::OffsetDateTime::now_utc();
        let mut created = self
            .created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = created.clone();
        let exports: Vec<_> = services
            .iter()
            .map(|s| {
                let mut export = s.to_catalog(&self.cluster);
                export.created = *created.entry(export.key.clone()).or_insert(now);
                export
            })
            .collect();
        created.retain(|key, _| exports.iter().any(|e| &e.key == key));
        if *created != before
            && let Some(store) = &self.store
        {
            let list: Vec<_> = created.iter().map(|(k, t)| (k.clone(), *t)).collect();
            if let Err(e) = store.save_created(&list) {
                tracing::warn!(error = %e, "cannot persist export creation times");
            }
        }
        drop(created);
        self.exports.replace_all(exports);
    }

    /// What this gateway holds of each peer, with `connected` as of now.
    pub fn imports(&self) -> BTreeMap<TrustDomain, ImportedPeer> {
        self.imports
            .iter()
            .map(|(td, rx)| (td.clone(), rx.borrow().clone()))
            .collect()
    }

    /// The global services as this cluster sees them: its own exports merged with the
    /// imports of every peer that is connected or within the staleness budget.
    pub fn catalog(&self, now: time::OffsetDateTime) -> Vec<isthmus_core::catalog::GlobalService> {
        let (_, _, local) = self.exports.snapshot();
        let mut by_key: BTreeMap<_, Vec<isthmus_core::catalog::ServiceExport>> = BTreeMap::new();
        for export in local {
            by_key.entry(export.key.clone()).or_default().push(export);
        }
        for peer in self.imports().into_values() {
            if !peer.is_fresh(now, self.staleness_budget) {
                continue;
            }
            for export in peer.exports.into_values() {
                by_key.entry(export.key.clone()).or_default().push(export);
            }
        }
        by_key
            .values()
            .filter_map(isthmus_core::catalog::merge)
            .collect()
    }

    /// The catalog with this cluster's ClusterSetIPs: a VIP is assigned to every
    /// ClusterSetIP service (stable across restarts when `peering.data_dir` is set) and
    /// released when the service is gone everywhere.
    pub fn catalog_with_vips(
        &self,
        now: time::OffsetDateTime,
    ) -> Vec<(
        isthmus_core::catalog::GlobalService,
        Option<std::net::Ipv4Addr>,
    )> {
        use isthmus_core::catalog::ServiceType;
        let services = self.catalog(now);
        let mut vips = self
            .vips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = vips.assignments().clone();
        let live: std::collections::BTreeSet<_> = services
            .iter()
            .filter(|s| s.service_type == ServiceType::ClusterSetIP)
            .map(|s| s.key.clone())
            .collect();
        let gone: Vec<_> = vips
            .assignments()
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            vips.release(&key);
        }
        let out = services
            .into_iter()
            .map(|s| {
                let vip = if s.service_type == ServiceType::ClusterSetIP {
                    match vips.assign(&s.key) {
                        Ok(ip) => Some(ip),
                        Err(e) => {
                            tracing::error!(service = %s.key, error = %e, "no ClusterSetIP left");
                            None
                        }
                    }
                } else {
                    None
                };
                (s, vip)
            })
            .collect();
        if vips.assignments() != &before
            && let Some(store) = &self.store
        {
            let list: Vec<_> = vips
                .assignments()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            if let Err(e) = store.save_vips(&list) {
                tracing::warn!(error = %e, "cannot persist VIP assignments");
            }
        }
        out
    }

    /// The status document.
    pub fn status(&self, now: time::OffsetDateTime) -> crate::status::GatewayStatus {
        use crate::status::{GatewayStatus, PeerStatus, ServiceStatus};
        let peers = self
            .imports()
            .into_iter()
            .map(|(td, p)| PeerStatus {
                trust_domain: td.to_string(),
                cluster: p.cluster.clone(),
                connected: p.connected,
                fresh: p.is_fresh(now, self.staleness_budget),
                last_sync: p.last_seen,
                age_seconds: p.last_seen.map(|t| (now - t).whole_seconds()),
                epoch: p.resume.map(|r| r.epoch),
                version: p.resume.map(|r| r.version),
                services: p.exports.len(),
            })
            .collect();
        let services = self
            .catalog_with_vips(now)
            .iter()
            .map(|(s, vip)| ServiceStatus::of(s, *vip, &self.cluster))
            .collect();
        GatewayStatus {
            cluster: self.cluster.clone(),
            address: self.addr.to_string(),
            active_streams: self.dispatcher.active_streams(),
            peers,
            services,
        }
    }
}

/// Wakes the catalog's watchers whenever `rx` changes.
async fn forward_changes<T>(
    mut rx: tokio::sync::watch::Receiver<T>,
    changed: Arc<tokio::sync::Notify>,
    drain: DrainWatch,
) {
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                changed.notify_waiters();
            }
        }
    }
}

/// What the server needs to answer peering subscriptions.
#[derive(Debug)]
struct PeeringServe {
    cluster: String,
    log: ExportLog,
    heartbeat: Duration,
    peers: Vec<TrustDomain>,
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    dispatcher: Dispatcher,
    limits: LimitsConfig,
    peering: Arc<PeeringServe>,
    drain: DrainWatch,
) {
    loop {
        let incoming = tokio::select! {
            () = drain.signaled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let (dispatcher, limits, peering) = (dispatcher.clone(), limits.clone(), peering.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            if alpn.as_deref() == Some(PEER_ALPN) {
                serve_peer(conn, &peering).await;
            } else {
                serve_connection(conn, dispatcher, limits).await;
            }
        });
    }
}

/// Serves catalog subscriptions of a peer gateway: only the gateway SVID of a configured peer
/// trust domain may subscribe.
async fn serve_peer(conn: quinn::Connection, peering: &PeeringServe) {
    let Some(peer) = peer_id(&conn) else {
        conn.close(0u32.into(), b"no SPIFFE ID");
        return;
    };
    let allowed = peering.peers.iter().any(|td| {
        td.workload_id(&crate::peering::GATEWAY_PATH)
            .is_ok_and(|gateway| gateway == peer)
    });
    if !allowed {
        tracing::warn!(peer = %peer, "peering refused: not the gateway of a configured peer");
        conn.close(0x3u32.into(), b"not a configured peer gateway");
        return;
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (cluster, log, heartbeat) = (
            peering.cluster.clone(),
            peering.log.clone(),
            peering.heartbeat,
        );
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) =
                crate::peering::serve_subscriber(&cluster, &log, send, recv, heartbeat).await
            {
                tracing::debug!(peer = %peer, error = %e, "peering stream ended");
            }
        });
    }
}

/// Serves the streams of one connection. It keeps accepting streams while draining (the
/// dispatcher refuses them with a typed answer); the drain waits for streams, not connections.
async fn serve_connection(conn: quinn::Connection, dispatcher: Dispatcher, limits: LimitsConfig) {
    let Some(peer) = peer_id(&conn) else {
        conn.close(0u32.into(), b"no SPIFFE ID");
        return;
    };
    let metrics = dispatcher.metrics().clone();
    metrics
        .connections
        .get_or_create(&PeerLabels {
            trust_domain: peer.trust_domain_name().to_owned(),
        })
        .inc();
    metrics.active_connections.inc();
    tracing::debug!(peer = %peer, remote = %conn.remote_address(), "connection accepted");
    let in_flight = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut credit = initial_stream_credit(&limits);
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(peer = %peer, reason = %e, "connection ended");
                break;
            }
        };
        let open = in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // Double the credit once half of it is in use, up to the configured limit.
        if open * 2 >= credit && credit < limits.max_streams_per_connection {
            credit = (credit * 2).min(limits.max_streams_per_connection);
            conn.set_max_concurrent_bi_streams(credit.into());
        }
        let (dispatcher, limits, peer, in_flight) = (
            dispatcher.clone(),
            limits.clone(),
            peer.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            serve_stream(send, recv, &dispatcher, &limits, &peer).await;
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    metrics.active_connections.dec();
}

async fn respond(send: &mut quinn::SendStream, response: &StreamResponse) -> bool {
    send.write_all(&encode_response(response)).await.is_ok()
}

async fn refuse(send: &mut quinn::SendStream, refusal: &Refusal) {
    let _ = respond(
        send,
        &StreamResponse {
            code: refusal.code,
            message: refusal.message.clone(),
        },
    )
    .await;
    let _ = send.finish();
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dispatcher: &Dispatcher,
    limits: &LimitsConfig,
    peer: &SpiffeId,
) {
    let td = peer.trust_domain_name();
    let metrics = dispatcher.metrics();
    let header = tokio::time::timeout(
        limits.header_timeout.get(),
        tunnel::read_header(&mut recv, MAX_REQUEST_HEADER, decode_request),
    )
    .await;
    let request = match header {
        Ok(Ok(request)) => request,
        Ok(Err(ReadError::Header(e))) => {
            metrics.stream(td, ResultCode::Malformed.label(), "quic");
            refuse(
                &mut send,
                &Refusal {
                    code: ResultCode::Malformed,
                    message: e.to_string(),
                },
            )
            .await;
            return;
        }
        Ok(Err(ReadError::Io(_))) | Err(_) => {
            metrics.stream(td, ResultCode::Malformed.label(), "quic");
            let _ = send.reset(RESET_PEER.into());
            return;
        }
    };
    let backend = match dispatcher.open(peer, &request.target).await {
        Ok(backend) => backend,
        Err(refusal) => {
            tracing::info!(peer = %peer, target = %request.target, request_id = request.request_id, result = refusal.code.label(), reason = %refusal.message, "stream refused");
            metrics.stream(td, refusal.code.label(), "quic");
            refuse(&mut send, &refusal).await;
            return;
        }
    };
    metrics.stream(td, ResultCode::Accepted.label(), "quic");
    tracing::debug!(peer = %peer, target = %request.target, endpoint = %backend.endpoint, request_id = request.request_id, "stream accepted");
    if !respond(
        &mut send,
        &StreamResponse {
            code: ResultCode::Accepted,
            message: String::new(),
        },
    )
    .await
    {
        return;
    }
    splice(send, recv, backend, metrics).await;
}

/// Relays bytes both ways. Half-close maps to FIN in each direction; a reset on either side
/// resets the other.
async fn splice(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    backend: Backend,
    metrics: &GatewayMetrics,
) {
    let Backend {
        stream,
        guard: _slots,
        ..
    } = backend;
    let (mut from_backend, mut to_backend) = stream.into_split();
    let (to_backend_bytes, to_client_bytes) = metrics.byte_counters();

    let upstream = async {
        loop {
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => {
                    to_backend_bytes.inc_by(chunk.bytes.len() as u64);
                    if to_backend.write_all(&chunk.bytes).await.is_err() {
                        let _ = recv.stop(RESET_PEER.into());
                        return false;
                    }
                }
                // FIN from the client: half-close towards the backend.
                Ok(None) => {
                    let _ = to_backend.shutdown().await;
                    return true;
                }
                // Reset by the client: reset the backend.
                Err(_) => return false,
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_backend.read(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    return true;
                }
                Ok(n) => {
                    to_client_bytes.inc_by(n as u64);
                    if send.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
                Err(_) => {
                    let _ = send.reset(RESET_PEER.into());
                    return false;
                }
            }
        }
    };
    let (up_ok, down_ok) = tokio::join!(upstream, downstream);
    if !(up_ok && down_ok) {
        // Abortive close: the backend sees a reset rather than a clean FIN.
        let stream = from_backend.reunite(to_backend).ok();
        if let Some(stream) = stream {
            abort(&stream);
        }
        let _ = send.reset(RESET_PEER.into());
    } else {
        // Wait until the client has everything before the stream is dropped.
        let _ = send.stopped().await;
    }
}

/// Makes dropping `stream` send a TCP reset instead of a FIN.
#[expect(
    deprecated,
    reason = "SO_LINGER with a zero timeout sends RST on close and never blocks the thread"
)]
fn abort(stream: &tokio::net::TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}
