//! Assembles a running broker from its configuration: store, CA, bundle endpoint, federation
//! fetchers, the issuance API (TLS) and the admin API (Unix socket), plus the background tasks
//! that rotate the CA and renew the broker's own SVIDs. The lab runs several in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::broker::broker_admin_server::BrokerAdminServer;
use isthmus_api::broker::issuance_server::IssuanceServer;
use isthmus_api::transport::{ALPN_H2, tls_incoming};
use isthmus_core::lifecycle::{DrainOutcome, DrainTrigger, DrainWatch, Readiness};
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_core::tls::{AllowTrustDomains, MtlsSettings};
use isthmus_core::{SpiffeId, SvidSource, TrustDomain, TrustStore};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use crate::api::{
    AdminService, FederationControl, IssuanceService, JoinTokenAttestor, StatusSource,
};
use crate::authority::{Authority, AuthorityError, AuthorityOptions, RootStatus};
use crate::config::{BrokerConfig, EndpointProfile};
use crate::endpoint::{BundleEndpoint, EndpointIdentity, EndpointMetrics, bundle_endpoint_id};
use crate::federation::{Federation, FederationContext, FederationMetrics, FetchSettings};
use crate::metrics::BrokerMetrics;
use crate::model::{FederatedTrustDomain, FederationStatus};
use crate::store::{BrokerStore, StoreError};

/// Path of the broker API's own SVID: `spiffe://<td>/isthmus/broker`.
pub const BROKER_PATH: [&str; 2] = ["isthmus", "broker"];

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration is incomplete.
    #[error("configuration: {0}")]
    Config(#[from] isthmus_core::config::ConfigError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA failed.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {address}: {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// The address or path.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS or certificate material is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A federation relationship could not start.
    #[error(transparent)]
    Federation(#[from] crate::federation::FederationError),
}

/// The broker's status document (`isthmus broker status -o json`).
#[derive(Debug, Clone, Serialize)]
pub struct BrokerStatus {
    /// This trust domain.
    pub trust_domain: String,
    /// Published bundle sequence.
    pub sequence: u64,
    /// Roots in the bundle.
    pub roots: Vec<RootStatus>,
    /// Bundle endpoint address and profile.
    pub bundle_endpoint: String,
    /// Bundle endpoint profile.
    pub bundle_endpoint_profile: &'static str,
    /// Issuance API address.
    pub api: String,
    /// Every federation relationship and what its fetcher last saw.
    pub federation: Vec<FederationStatus>,
    /// When this status was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub now: OffsetDateTime,
}

/// A running broker.
pub struct Broker {
    trust_domain: TrustDomain,
    authority: Arc<Authority>,
    store: Arc<BrokerStore>,
    trust: TrustStore,
    federation: Arc<Federation>,
    bundle_endpoint_addr: SocketAddr,
    profile: &'static str,
    api_addr: SocketAddr,
    admin_socket: PathBuf,
    configured: Vec<FederatedTrustDomain>,
    metrics_addr: Option<SocketAddr>,
    jwt_ttl: Duration,
    drain: DrainTrigger,
    tasks: JoinSet<()>,
    metrics: Arc<std::sync::Mutex<MetricsRegistry>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("trust_domain", &self.trust_domain)
            .field("bundle_endpoint", &self.bundle_endpoint_addr)
            .field("api", &self.api_addr)
            .finish_non_exhaustive()
    }
}

/// Keeps `source` holding a fresh SVID for `id`: renews at half-life, and also whenever the
/// signing root changes if `follow_root` is set. The bundle endpoint does not follow the root:
/// peers authenticate it with the bundle they last fetched, so its SVID must stay on a root
/// they already hold (the old root stays published until its leaves expire).
async fn maintain_svid(
    authority: Arc<Authority>,
    id: SpiffeId,
    source: SvidSource,
    follow_root: bool,
    drain: DrainWatch,
) {
    let mut changes = authority.subscribe();
    let mut generation = authority.signing_root_generation();
    loop {
        let now = OffsetDateTime::now_utc();
        let due = source.current().svid.refresh_at();
        let wait = Duration::try_from(due - now).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(wait) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = authority.signing_root_generation();
                if !follow_root || current == generation {
                    continue;
                }
                generation = current;
            }
        }
        match authority.issue_svid(&id, None, OffsetDateTime::now_utc()) {
            Ok(svid) => {
                if let Err(e) = source.rotate(svid) {
                    tracing::error!(error = %e, spiffe_id = %id, "BUG: issued SVID rejected");
                } else {
                    tracing::info!(spiffe_id = %id, "renewed own SVID");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, spiffe_id = %id, "SVID renewal failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

fn read_pem_identity(config: &BrokerConfig) -> Result<EndpointIdentity, BrokerError> {
    let (Some(cert_file), Some(key_file)) = (
        config.bundle_endpoint.cert_file.as_ref(),
        config.bundle_endpoint.key_file.as_ref(),
    ) else {
        return Err(BrokerError::Tls(
            "https_web needs cert_file and key_file".into(),
        ));
    };
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))
    };
    let chain = isthmus_core::x509::certs_from_pem(&read(cert_file)?)
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", cert_file.display())))?;
    let key = isthmus_core::x509::first_pkcs8_key(&read(key_file)?)
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", key_file.display())))?
        .ok_or_else(|| BrokerError::Tls(format!("{}: no PKCS#8 key", key_file.display())))?;
    Ok(EndpointIdentity::Web {
        chain,
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()),
    })
}

fn fetch_settings(config: &BrokerConfig) -> Result<FetchSettings, BrokerError> {
    let mut settings = FetchSettings {
        min_refresh: config.federation_fetch.min_refresh.get(),
        max_refresh: config.federation_fetch.max_refresh.get(),
        timeout: config.federation_fetch.timeout.get(),
        ..FetchSettings::default()
    };
    if let Some(path) = &config.federation_fetch.web_roots_file {
        let pem = std::fs::read(path)
            .map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))?;
        let mut roots = rustls::RootCertStore::clone(&settings.web_roots);
        for cert in isthmus_core::x509::certs_from_pem(&pem)
            .map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))?
        {
            roots
                .add(cert)
                .map_err(|e| BrokerError::Tls(format!("{}: {e}", path.display())))?;
        }
        settings.web_roots = Arc::new(roots);
    }
    Ok(settings)
}

impl Broker {
    /// Starts every part of the broker; returns once all listeners are bound and the CA,
    /// bundles and own SVIDs are ready.
    pub async fn start(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let trust_domain = config.trust_domain()?.clone();
        let now = OffsetDateTime::now_utc();
        let store = Arc::new(BrokerStore::open(&config.data_dir)?);
        let authority = Arc::new(Authority::open(
            trust_domain.clone(),
            store.clone(),
            AuthorityOptions {
                ca_ttl: config.ca_ttl.get(),
                leaf_ttl: config.leaf_ttl.get(),
                max_leaf_ttl: config.max_leaf_ttl.get(),
                refresh_hint: config.bundle_endpoint.refresh_hint.get(),
                activation_delay: config.rotation_activation_delay.get(),
            },
            now,
        )?);
        let trust = TrustStore::from_bundles([isthmus_core::Bundle::clone(&authority.bundle())]);
        let (drain, drain_watch) = DrainTrigger::new();
        let mut tasks = JoinSet::new();
        let mut registry = MetricsRegistry::new();
        let broker_metrics = BrokerMetrics::register(&mut registry);
        broker_metrics.observe(&authority);
        let readiness = Readiness::default();
        let starting = readiness.register("broker start");

        // Our own bundle follows the CA into the trust store.
        {
            let authority = authority.clone();
            let trust = trust.clone();
            let drain = drain_watch.clone();
            let mut changes = authority.subscribe();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = drain.signaled() => return,
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            trust.set(isthmus_core::Bundle::clone(&changes.borrow_and_update()));
                        }
                    }
                }
            });
        }

        // Scheduled rotation.
        {
            let authority = authority.clone();
            let drain = drain_watch.clone();
            let metrics = broker_metrics.clone();
            let period = (config.ca_ttl.get() / 100)
                .min(config.rotation_activation_delay.get() / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            tasks.spawn(async move {
                let mut ticker = tokio::time::interval(period);
                loop {
                    tokio::select! {
                        () = drain.signaled() => return,
                        _ = ticker.tick() => {
                            if let Err(e) = authority.tick(OffsetDateTime::now_utc()) {
                                tracing::error!(error = %e, "scheduled CA maintenance failed");
                            }
                            metrics.observe(&authority);
                        }
                    }
                }
            });
        }

        // Bundle endpoint.
        let identity = match config.bundle_endpoint.profile {
            EndpointProfile::HttpsSpiffe => {
                let id = bundle_endpoint_id(&trust_domain)
                    .map_err(|e| BrokerError::Tls(e.to_string()))?;
                let source = SvidSource::new(authority.issue_svid(&id, None, now)?)
                    .map_err(|e| BrokerError::Tls(e.to_string()))?;
                tasks.spawn(maintain_svid(
                    authority.clone(),
                    id,
                    source.clone(),
                    false,
                    drain_watch.clone(),
                ));
                EndpointIdentity::Spiffe(source)
            }
            EndpointProfile::HttpsWeb => read_pem_identity(config)?,
        };
        let profile = identity.profile();
        let endpoint = BundleEndpoint::new(
            identity,
            authority.subscribe(),
            EndpointMetrics::register(&mut registry),
        )
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
        let listener = TcpListener::bind(config.bundle_endpoint.listen)
            .await
            .map_err(|source| BrokerError::Listen {
                what: "bundle endpoint",
                address: config.bundle_endpoint.listen.to_string(),
                source,
            })?;
        let bundle_endpoint_addr = listener
            .local_addr()
            .map_err(|source| BrokerError::Listen {
                what: "bundle endpoint",
                address: config.bundle_endpoint.listen.to_string(),
                source,
            })?;
        {
            let drain = drain_watch.clone();
            tasks.spawn(async move {
                if let Err(e) = endpoint.serve(listener, drain).await {
                    tracing::error!(error = %e, "bundle endpoint stopped");
                }
            });
        }

        // Federation: relationships from the file win over those added at runtime.
        let mut ctx = FederationContext::new(trust.clone(), store.clone(), fetch_settings(config)?);
        ctx.metrics = FederationMetrics::register(&mut registry);
        let federation = Arc::new(Federation::new(ctx));
        let mut relationships: Vec<FederatedTrustDomain> = config.federation.clone();
        for stored in store.federations()? {
            if !relationships
                .iter()
                .any(|r| r.trust_domain == stored.trust_domain)
            {
                relationships.push(stored);
            }
        }
        for relationship in relationships {
            federation.start(relationship, drain_watch.clone())?;
        }

        // Issuance API over TLS: nodes of this trust domain, anonymous only for attestation.
        let broker_id = trust_domain
            .workload_id(&BROKER_PATH)
            .map_err(|e| BrokerError::Tls(e.to_string()))?;
        let api_source = SvidSource::new(authority.issue_svid(&broker_id, None, now)?)
            .map_err(|e| BrokerError::Tls(e.to_string()))?;
        tasks.spawn(maintain_svid(
            authority.clone(),
            broker_id,
            api_source.clone(),
            true,
            drain_watch.clone(),
        ));
        let tls = isthmus_core::tls::server_config_optional_client(&MtlsSettings {
            svid: api_source,
            trust: trust.clone(),
            authorizer: Arc::new(AllowTrustDomains(vec![trust_domain.clone()])),
            alpn: vec![ALPN_H2.to_vec()],
            observer: None,
        })
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
        let api_listener = TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| BrokerError::Listen {
                what: "API",
                address: config.api.listen.to_string(),
                source,
            })?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| BrokerError::Listen {
                what: "API",
                address: config.api.listen.to_string(),
                source,
            })?;
        let issuance = IssuanceService::new(
            authority.clone(),
            store.clone(),
            trust.clone(),
            vec![Arc::new(JoinTokenAttestor::new(store.clone()))],
            config.api.node_svid_ttl.get(),
            broker_metrics.clone(),
        )
        .with_jwt_ttl(config.jwt_svid_ttl.get());
        {
            let drain = drain_watch.clone();
            let incoming = tls_incoming(api_listener, Arc::new(tls));
            tasks.spawn(async move {
                let result = tonic::transport::Server::builder()
                    .add_service(IssuanceServer::new(issuance))
                    .serve_with_incoming_shutdown(incoming, async move { drain.signaled().await })
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "issuance API stopped");
                }
            });
        }

        let mut broker = Self {
            trust_domain,
            authority,
            store,
            trust,
            federation,
            bundle_endpoint_addr,
            profile,
            api_addr,
            admin_socket: config.admin_socket(),
            configured: config.federation.clone(),
            metrics_addr: None,
            jwt_ttl: config.jwt_svid_ttl.get(),
            drain,
            tasks,
            metrics: Arc::new(std::sync::Mutex::new(registry)),
        };
        broker.serve_admin(drain_watch.clone()).await?;
        if let Some(listen) = config.api.metrics_listen {
            let listener =
                TcpListener::bind(listen)
                    .await
                    .map_err(|source| BrokerError::Listen {
                        what: "metrics",
                        address: listen.to_string(),
                        source,
                    })?;
            broker.metrics_addr = listener.local_addr().ok();
            let text = isthmus_api::admin_http::registry_text(broker.metrics.clone());
            broker.tasks.spawn(isthmus_api::admin_http::serve(
                listener,
                text,
                readiness.clone(),
                drain_watch,
            ));
        }
        drop(starting);
        tracing::info!(
            trust_domain = %broker.trust_domain,
            bundle_endpoint = %broker.bundle_endpoint_addr,
            api = %broker.api_addr,
            admin = %broker.admin_socket.display(),
            "broker ready"
        );
        Ok(broker)
    }

    async fn serve_admin(&mut self, drain: DrainWatch) -> Result<(), BrokerError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.admin_socket.clone();
        let listen_err = |source| BrokerError::Listen {
            what: "admin socket",
            address: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(listen_err)?;
        }
        // A socket left by a crashed broker; the store's lock already proves we are alone.
        if path.exists() {
            std::fs::remove_file(&path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(listen_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        let admin = AdminService::new(
            self.authority.clone(),
            self.store.clone(),
            Arc::new(FederationHandle {
                federation: self.federation.clone(),
                configured: self.configured.clone(),
                store: self.store.clone(),
                own: self.trust_domain.clone(),
                drain: drain.clone(),
            }),
            Arc::new(self.status_source()),
        )
        .with_jwt_ttl(self.jwt_ttl);
        self.tasks.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let result = tonic::transport::Server::builder()
                .add_service(BrokerAdminServer::new(admin))
                .serve_with_incoming_shutdown(incoming, async move { drain.signaled().await })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
        Ok(())
    }

    fn status_source(&self) -> StatusDoc {
        StatusDoc {
            trust_domain: self.trust_domain.clone(),
            authority: self.authority.clone(),
            federation: self.federation.clone(),
            bundle_endpoint: self.bundle_endpoint_addr,
            profile: self.profile,
            api: self.api_addr,
        }
    }

    /// The status document.
    pub fn status(&self) -> BrokerStatus {
        self.status_source().build()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// The durable store.
    pub fn store(&self) -> &Arc<BrokerStore> {
        &self.store
    }

    /// Every bundle this broker trusts (own and federated), live.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// The federation fetchers.
    pub fn federation(&self) -> &Arc<Federation> {
        &self.federation
    }

    /// Where the bundle endpoint listens.
    pub fn bundle_endpoint_addr(&self) -> SocketAddr {
        self.bundle_endpoint_addr
    }

    /// Where the issuance API listens.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> &std::path::Path {
        &self.admin_socket
    }

    /// Where `/metrics` and `/healthz/*` are served, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The broker's metrics in OpenMetrics text.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .encode_text()
            .unwrap_or_default()
    }

    /// A federation relationship to this broker, `https_spiffe`, for a peer to add
    /// (bootstrapped with our current bundle).
    pub fn federation_offer(&self) -> Result<FederatedTrustDomain, BrokerError> {
        Ok(FederatedTrustDomain {
            trust_domain: self.trust_domain.clone(),
            bundle_endpoint_url: format!("https://{}/", self.bundle_endpoint_addr),
            bundle_endpoint_profile: crate::model::BundleEndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: bundle_endpoint_id(&self.trust_domain)
                    .map_err(|e| BrokerError::Tls(e.to_string()))?,
            },
            trust_domain_bundle: Some(
                self.authority
                    .bundle()
                    .to_json()
                    .map_err(|e| BrokerError::Tls(e.to_string()))?,
            ),
        })
    }

    /// Stops accepting, lets in-flight work finish until `deadline`, then stops every task.
    pub async fn shutdown(mut self, deadline: Duration) -> DrainOutcome {
        let outcome = self.drain.drain(deadline).await;
        let _ = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
        let _ = std::fs::remove_file(&self.admin_socket);
        outcome
    }
}

struct StatusDoc {
    trust_domain: TrustDomain,
    authority: Arc<Authority>,
    federation: Arc<Federation>,
    bundle_endpoint: SocketAddr,
    profile: &'static str,
    api: SocketAddr,
}

impl StatusDoc {
    fn build(&self) -> BrokerStatus {
        BrokerStatus {
            trust_domain: self.trust_domain.to_string(),
            sequence: self.authority.sequence(),
            roots: self.authority.roots(),
            bundle_endpoint: self.bundle_endpoint.to_string(),
            bundle_endpoint_profile: self.profile,
            api: self.api.to_string(),
            federation: self.federation.status().snapshot().into_values().collect(),
            now: OffsetDateTime::now_utc(),
        }
    }
}

impl StatusSource for StatusDoc {
    fn status_json(&self) -> String {
        serde_json::to_string_pretty(&self.build())
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

struct FederationHandle {
    federation: Arc<Federation>,
    configured: Vec<FederatedTrustDomain>,
    store: Arc<BrokerStore>,
    own: TrustDomain,
    drain: DrainWatch,
}

#[tonic::async_trait]
impl FederationControl for FederationHandle {
    async fn add(&self, relationship: FederatedTrustDomain) -> Result<(), String> {
        relationship
            .validate(&self.own)
            .map_err(|e| e.to_string())?;
        // Replace a running relationship: stop it (keeping nothing of its old endpoint).
        self.federation
            .remove(&relationship.trust_domain)
            .await
            .map_err(|e| e.to_string())?;
        self.store
            .put_federation(&relationship)
            .map_err(|e| e.to_string())?;
        self.federation
            .start(relationship, self.drain.clone())
            .map_err(|e| e.to_string())
    }

    async fn remove(&self, trust_domain: &TrustDomain) -> Result<bool, String> {
        let stored = self
            .store
            .remove_federation(trust_domain)
            .map_err(|e| e.to_string())?;
        let running = self
            .federation
            .remove(trust_domain)
            .await
            .map_err(|e| e.to_string())?;
        Ok(stored || running)
    }

    fn list(&self) -> Vec<FederatedTrustDomain> {
        let running = self.federation.trust_domains();
        let mut all: Vec<FederatedTrustDomain> = self
            .configured
            .iter()
            .filter(|r| running.contains(&r.trust_domain))
            .cloned()
            .collect();
        for stored in self.store.federations().unwrap_or_default() {
            if !all.iter().any(|r| r.trust_domain == stored.trust_domain) {
                all.push(stored);
            }
        }
        all
    }
}
