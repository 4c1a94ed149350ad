//! The broker's gRPC services: issuance and bundle distribution for nodes (TLS, node SVIDs;
//! attestation is the one anonymous call) and local administration (Unix socket).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::broker::broker_admin_server::BrokerAdmin;
use isthmus_api::broker::issuance_server::Issuance;
use isthmus_api::broker::{self as pb};
use isthmus_api::transport::PeerIdentity;
use isthmus_core::jwt::{DEFAULT_JWT_TTL, JwtError, JwtSvid};
use isthmus_core::{SpiffeId, TrustDomain, TrustStore};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, AuthorityError};
use crate::metrics::{AttestLabels, BrokerMetrics};
use crate::model::{FederatedTrustDomain, JoinToken, RegistrationEntry, Selector};
use crate::store::{BrokerStore, StoreError};

/// Path prefix of node SVIDs: `spiffe://<td>/isthmus/node/<name>`.
pub const NODE_PATH_PREFIX: &str = "/isthmus/node/";
/// Default lifetime of a join token.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Why node attestation failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The evidence was refused (unknown, used or expired token…).
    #[error("attestation refused: {0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

/// Proves a node's identity from evidence it presents. Standalone mode uses join tokens; the
/// Kubernetes attestor arrives with the Kubernetes source.
pub trait NodeAttestor: Send + Sync {
    /// The attestor's name in `AttestNodeRequest.attestor`.
    fn name(&self) -> &'static str;
    /// Returns the attested node name.
    fn attest(&self, evidence: &[u8], now: OffsetDateTime) -> Result<String, AttestError>;
}

/// One-time join tokens bound to a node name.
#[derive(Debug)]
pub struct JoinTokenAttestor {
    store: Arc<BrokerStore>,
}

impl JoinTokenAttestor {
    /// Attests against the tokens in `store`.
    pub fn new(store: Arc<BrokerStore>) -> Self {
        Self { store }
    }
}

impl NodeAttestor for JoinTokenAttestor {
    fn name(&self) -> &'static str {
        "join_token"
    }

    fn attest(&self, evidence: &[u8], now: OffsetDateTime) -> Result<String, AttestError> {
        let secret = std::str::from_utf8(evidence)
            .map_err(|_| AttestError::Refused("join token is not UTF-8".into()))?;
        match self.store.consume_join_token(secret, now) {
            Ok(token) => Ok(token.node),
            Err(
                e @ (StoreError::UnknownToken
                | StoreError::TokenUsed { .. }
                | StoreError::TokenExpired { .. }),
            ) => Err(AttestError::Refused(e.to_string())),
            Err(e) => Err(AttestError::Store(e)),
        }
    }
}

/// A fresh random join token.
pub fn new_join_token_secret() -> Result<String, Status> {
    let mut bytes = [0u8; 24];
    isthmus_core::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Status::internal("no randomness"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "broker API failure");
    Status::internal(e.to_string())
}

fn authority_status(e: AuthorityError) -> Status {
    match e {
        AuthorityError::Ca(isthmus_core::ca::CaError::BadCsr(e)) => {
            Status::invalid_argument(format!("invalid CSR: {e}"))
        }
        AuthorityError::Jwt(
            e @ (JwtError::NoAudience | JwtError::NotAWorkloadId(_) | JwtError::BadTtl(_)),
        ) => Status::invalid_argument(e.to_string()),
        e @ AuthorityError::ForeignJwtSubject { .. } => Status::invalid_argument(e.to_string()),
        other => internal(other),
    }
}

/// The audience of a JWT-SVID request: at least one value (SPIRE's message when there is
/// none), and no empty value.
fn check_audience(audience: &[String]) -> Result<(), Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument(
            "audience must not contain empty values",
        ));
    }
    Ok(())
}

fn to_pb_jwt(svid: &JwtSvid) -> pb::JwtSvid {
    pb::JwtSvid {
        spiffe_id: svid.spiffe_id.to_string(),
        token: svid.token.clone(),
        expires_at: svid.expiry.unix_timestamp(),
    }
}

/// The node name of a node SVID of `own`, if `id` is one.
pub fn node_name<'a>(own: &TrustDomain, id: &'a SpiffeId) -> Option<&'a str> {
    if id.trust_domain_name() != own.name() {
        return None;
    }
    let name = id.path().strip_prefix(NODE_PATH_PREFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

fn to_svid(chain: &[CertificateDer<'_>]) -> Result<pb::Svid, Status> {
    let leaf = chain.first().ok_or_else(|| internal("BUG: empty chain"))?;
    let facts = isthmus_core::x509::facts(leaf, 0).map_err(internal)?;
    let id = isthmus_core::svid::leaf_id(&facts).map_err(internal)?;
    Ok(pb::Svid {
        spiffe_id: id.to_string(),
        cert_chain: chain.iter().flat_map(|c| c.iter().copied()).collect(),
        expires_at: facts.not_after.unix_timestamp(),
    })
}

/// The bundle set message: our own bundle as the CA publishes it, and every federated bundle
/// the trust store holds.
pub fn bundle_set(own: &isthmus_core::Bundle, trust: &TrustStore) -> Result<pb::BundleSet, Status> {
    let snapshot = trust.snapshot();
    let mut bundles = Vec::with_capacity(snapshot.len());
    let others = snapshot
        .iter()
        .filter(|b| b.trust_domain() != own.trust_domain())
        .map(|b| b.as_ref());
    for bundle in std::iter::once(own).chain(others) {
        bundles.push(pb::TrustDomainBundle {
            trust_domain: bundle.trust_domain().name().to_owned(),
            spiffe_bundle: bundle.to_json().map_err(internal)?.into_bytes(),
        });
    }
    Ok(pb::BundleSet {
        own_trust_domain: own.trust_domain().name().to_owned(),
        bundles,
    })
}

fn to_pb_entry(entry: &RegistrationEntry) -> pb::Entry {
    pb::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        node: entry.node.clone(),
        selectors: entry
            .selectors
            .iter()
            .map(|s| pb::Selector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect(),
        ttl_seconds: entry.ttl_seconds.unwrap_or(0),
        federates_with: entry
            .federates_with
            .iter()
            .map(|td| td.to_string())
            .collect(),
    }
}

fn from_pb_entry(entry: pb::Entry, own: &TrustDomain) -> Result<RegistrationEntry, Status> {
    let spiffe_id = SpiffeId::parse(&entry.spiffe_id)
        .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
    if spiffe_id.trust_domain_name() != own.name() || spiffe_id.is_trust_domain_id() {
        return Err(Status::invalid_argument(format!(
            "spiffe_id: {spiffe_id} is not a workload ID of {own}"
        )));
    }
    if entry.node.is_empty() {
        return Err(Status::invalid_argument("node: required"));
    }
    let federates_with = entry
        .federates_with
        .iter()
        .map(|td| {
            TrustDomain::new(td)
                .map_err(|e| Status::invalid_argument(format!("federates_with: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let id = if entry.id.is_empty() {
        new_join_token_secret()?[..16].to_owned()
    } else {
        entry.id
    };
    Ok(RegistrationEntry {
        id,
        spiffe_id,
        node: entry.node,
        selectors: entry
            .selectors
            .into_iter()
            .map(|s| Selector {
                kind: s.r#type,
                value: s.value,
            })
            .collect(),
        ttl_seconds: (entry.ttl_seconds > 0).then_some(entry.ttl_seconds),
        federates_with,
    })
}

/// The `Issuance` service.
pub struct IssuanceService {
    authority: Arc<Authority>,
    store: Arc<BrokerStore>,
    trust: TrustStore,
    attestors: Vec<Arc<dyn NodeAttestor>>,
    node_ttl: Duration,
    jwt_ttl: Duration,
    metrics: BrokerMetrics,
}

impl IssuanceService {
    /// A service signing with `authority`, attesting with `attestors`.
    pub fn new(
        authority: Arc<Authority>,
        store: Arc<BrokerStore>,
        trust: TrustStore,
        attestors: Vec<Arc<dyn NodeAttestor>>,
        node_ttl: Duration,
        metrics: BrokerMetrics,
    ) -> Self {
        Self {
            authority,
            store,
            trust,
            attestors,
            node_ttl,
            jwt_ttl: DEFAULT_JWT_TTL,
            metrics,
        }
    }

    /// Sets the lifetime of JWT-SVIDs for entries without their own TTL (default
    /// [`DEFAULT_JWT_TTL`], 5 minutes).
    #[must_use]
    pub fn with_jwt_ttl(mut self, ttl: Duration) -> Self {
        self.jwt_ttl = ttl;
        self
    }

    fn calling_node<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let Some(peer) = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.spiffe_id.clone())
        else {
            self.metrics.denied("not_a_node");
            return Err(Status::unauthenticated("a node SVID is required"));
        };
        node_name(self.authority.trust_domain(), &peer)
            .map(str::to_owned)
            .ok_or_else(|| {
                self.metrics.denied("not_a_node");
                Status::permission_denied(format!("{peer} is not a node of this trust domain"))
            })
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::BundleSetUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Issuance for IssuanceService {
    async fn attest_node(
        &self,
        request: Request<pb::AttestNodeRequest>,
    ) -> Result<Response<pb::AttestNodeResponse>, Status> {
        let req = request.into_inner();
        let attestor = self
            .attestors
            .iter()
            .find(|a| a.name() == req.attestor)
            .ok_or_else(|| {
                Status::invalid_argument(format!("unknown attestor {:?}", req.attestor))
            })?;
        let now = OffsetDateTime::now_utc();
        // Check the CSR before the evidence: a bad request must not burn a one-time token.
        if let Err(e) = rcgen::CertificateSigningRequestParams::from_der(
            &rustls_pki_types::CertificateSigningRequestDer::from(req.csr.as_slice()),
        ) {
            self.metrics.denied("bad_csr");
            return Err(Status::invalid_argument(format!("invalid CSR: {e}")));
        }
        let result = attestor.attest(&req.evidence, now);
        let label = |result: &'static str| AttestLabels {
            attestor: attestor.name().to_owned(),
            result,
        };
        let node = match result {
            Ok(node) => {
                self.metrics.attestations.get_or_create(&label("ok")).inc();
                node
            }
            Err(AttestError::Refused(reason)) => {
                self.metrics
                    .attestations
                    .get_or_create(&label("refused"))
                    .inc();
                tracing::warn!(attestor = attestor.name(), %reason, "node attestation refused");
                return Err(Status::permission_denied(reason));
            }
            Err(AttestError::Store(e)) => {
                self.metrics
                    .attestations
                    .get_or_create(&label("error"))
                    .inc();
                return Err(internal(e));
            }
        };
        let id = self
            .authority
            .trust_domain()
            .workload_id(&["isthmus", "node", &node])
            .map_err(|e| Status::invalid_argument(format!("node name {node:?}: {e}")))?;
        let chain = self
            .authority
            .sign_csr(&req.csr, &id, Some(self.node_ttl), now)
            .map_err(authority_status)?;
        self.metrics.issued("node");
        tracing::info!(node = %node, spiffe_id = %id, "node attested");
        Ok(Response::new(pb::AttestNodeResponse {
            svid: Some(to_svid(&chain)?),
            bundles: Some(bundle_set(&self.authority.bundle(), &self.trust)?),
        }))
    }

    async fn renew_node_svid(
        &self,
        request: Request<pb::RenewNodeSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let node = self.calling_node(&request)?;
        let id = self
            .authority
            .trust_domain()
            .workload_id(&["isthmus", "node", &node])
            .map_err(internal)?;
        let chain = self
            .authority
            .sign_csr(
                &request.into_inner().csr,
                &id,
                Some(self.node_ttl),
                OffsetDateTime::now_utc(),
            )
            .map_err(authority_status)?;
        self.metrics.issued("node");
        Ok(Response::new(pb::SvidResponse {
            svid: Some(to_svid(&chain)?),
        }))
    }

    async fn list_assigned_entries(
        &self,
        request: Request<pb::ListAssignedEntriesRequest>,
    ) -> Result<Response<pb::ListAssignedEntriesResponse>, Status> {
        let node = self.calling_node(&request)?;
        let entries = self.store.entries().map_err(internal)?;
        Ok(Response::new(pb::ListAssignedEntriesResponse {
            entries: entries
                .iter()
                .filter(|e| e.node == node)
                .map(to_pb_entry)
                .collect(),
        }))
    }

    async fn sign_workload_svids(
        &self,
        request: Request<pb::SignWorkloadSvidsRequest>,
    ) -> Result<Response<pb::SignWorkloadSvidsResponse>, Status> {
        let node = self.calling_node(&request)?;
        let entries = self.store.entries().map_err(internal)?;
        let now = OffsetDateTime::now_utc();
        let mut svids = Vec::new();
        for req in request.into_inner().requests {
            let entry = entries
                .iter()
                .find(|e| e.id == req.entry_id && e.node == node)
                .ok_or_else(|| {
                    self.metrics.denied("entry_not_assigned");
                    tracing::warn!(node = %node, entry = %req.entry_id, "SVID refused: entry not assigned to node");
                    Status::permission_denied(format!("entry {:?} is not assigned to node {node}", req.entry_id))
                })?;
            let ttl = entry.ttl_seconds.map(Duration::from_secs);
            let chain = self
                .authority
                .sign_csr(&req.csr, &entry.spiffe_id, ttl, now)
                .map_err(authority_status)?;
            svids.push(to_svid(&chain)?);
            self.metrics.issued("workload");
        }
        Ok(Response::new(pb::SignWorkloadSvidsResponse { svids }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let node = self.calling_node(&request)?;
        let req = request.into_inner();
        if let Err(status) = check_audience(&req.audience) {
            self.metrics.denied("no_audience");
            return Err(status);
        }
        let entries = self.store.entries().map_err(internal)?;
        let entry = entries
            .iter()
            .find(|e| e.id == req.entry_id && e.node == node)
            .ok_or_else(|| {
                self.metrics.denied("entry_not_assigned");
                tracing::warn!(node = %node, entry = %req.entry_id, "JWT-SVID refused: entry not assigned to node");
                Status::permission_denied(format!(
                    "entry {:?} is not assigned to node {node}",
                    req.entry_id
                ))
            })?;
        let ttl = entry.ttl_seconds.map_or(self.jwt_ttl, Duration::from_secs);
        let svid = self
            .authority
            .mint_jwt_svid(
                &entry.spiffe_id,
                &req.audience,
                ttl,
                OffsetDateTime::now_utc(),
            )
            .map_err(authority_status)?;
        self.metrics.issued("jwt");
        tracing::debug!(node = %node, entry = %entry.id, spiffe_id = %svid.spiffe_id, kid = %svid.key_id, "minted JWT-SVID");
        Ok(Response::new(pb::MintJwtSvidResponse {
            svid: Some(to_pb_jwt(&svid)),
        }))
    }

    type WatchBundlesStream = BundleStream;

    async fn watch_bundles(
        &self,
        request: Request<pb::WatchBundlesRequest>,
    ) -> Result<Response<Self::WatchBundlesStream>, Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.spiffe_id.clone())
            .ok_or_else(|| Status::unauthenticated("an SVID is required"))?;
        tracing::debug!(peer = %peer, "bundle watch started");
        let trust = self.trust.clone();
        let authority = self.authority.clone();
        let mut trust_rx = trust.subscribe();
        let mut authority_rx = authority.subscribe();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<pb::BundleSetUpdate> = None;
            loop {
                let update = pb::BundleSetUpdate {
                    bundles: Some(bundle_set(&authority.bundle(), &trust)?),
                    signing_root_generation: authority.signing_root_generation(),
                };
                // Every message carries the full state; identical states are not resent.
                if last.as_ref() != Some(&update) {
                    if tx.send(Ok(update.clone())).await.is_err() {
                        return Ok(());
                    }
                    last = Some(update);
                }
                tokio::select! {
                    changed = trust_rx.changed() => if changed.is_err() { return Ok(()) },
                    changed = authority_rx.changed() => if changed.is_err() { return Ok(()) },
                    () = tx.closed() => return Ok(()),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Runs `body` feeding a channel and exposes the channel as a stream; an error returned by the
/// body becomes the stream's last item.
fn async_stream<F, Fut>(
    body: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<pb::BundleSetUpdate, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::BundleSetUpdate, Status>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let fut = body(tx.clone());
    tokio::spawn(async move {
        if let Err(status) = fut.await {
            let _closed = tx.send(Err(status)).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Federation relationships, as the admin API changes them at runtime.
#[tonic::async_trait]
pub trait FederationControl: Send + Sync {
    /// Adds or replaces a relationship and starts fetching its bundle.
    async fn add(&self, relationship: FederatedTrustDomain) -> Result<(), String>;
    /// Ends a relationship: stops fetching, deletes its bundle. Returns whether it existed.
    async fn remove(&self, trust_domain: &TrustDomain) -> Result<bool, String>;
    /// Every relationship.
    fn list(&self) -> Vec<FederatedTrustDomain>;
}

/// Builds the broker status document.
pub trait StatusSource: Send + Sync {
    /// The status as JSON.
    fn status_json(&self) -> String;
}

/// The `BrokerAdmin` service (serve it only on the owner-only Unix socket).
pub struct AdminService {
    authority: Arc<Authority>,
    store: Arc<BrokerStore>,
    federation: Arc<dyn FederationControl>,
    status: Arc<dyn StatusSource>,
    jwt_ttl: Duration,
}

impl AdminService {
    /// An admin service over the broker's parts.
    pub fn new(
        authority: Arc<Authority>,
        store: Arc<BrokerStore>,
        federation: Arc<dyn FederationControl>,
        status: Arc<dyn StatusSource>,
    ) -> Self {
        Self {
            authority,
            store,
            federation,
            status,
            jwt_ttl: DEFAULT_JWT_TTL,
        }
    }

    /// Sets the default lifetime of minted JWT-SVIDs (default [`DEFAULT_JWT_TTL`]).
    #[must_use]
    pub fn with_jwt_ttl(mut self, ttl: Duration) -> Self {
        self.jwt_ttl = ttl;
        self
    }
}

#[tonic::async_trait]
impl BrokerAdmin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let req = request.into_inner();
        // The node name becomes a path segment of the node's SPIFFE ID.
        self.authority
            .trust_domain()
            .workload_id(&["isthmus", "node", &req.node])
            .map_err(|e| Status::invalid_argument(format!("node: {e}")))?;
        let ttl = if req.ttl_seconds == 0 {
            DEFAULT_JOIN_TOKEN_TTL
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let token = JoinToken {
            token: new_join_token_secret()?,
            node: req.node,
            expires_at: OffsetDateTime::now_utc() + ttl,
        };
        self.store.create_join_token(&token).map_err(internal)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token: token.token,
            expires_at: token.expires_at.unix_timestamp(),
        }))
    }

    async fn create_entry(
        &self,
        request: Request<pb::Entry>,
    ) -> Result<Response<pb::Entry>, Status> {
        let entry = from_pb_entry(request.into_inner(), self.authority.trust_domain())?;
        self.store.create_entry(&entry).map_err(|e| match e {
            StoreError::EntryExists(id) => Status::already_exists(format!("entry {id} exists")),
            other => internal(other),
        })?;
        Ok(Response::new(to_pb_entry(&entry)))
    }

    async fn list_entries(
        &self,
        _request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let entries = self.store.entries().map_err(internal)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(to_pb_entry).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let deleted = self
            .store
            .delete_entry(&request.into_inner().id)
            .map_err(internal)?;
        Ok(Response::new(pb::DeleteEntryResponse { deleted }))
    }

    async fn add_federation(
        &self,
        request: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let json = request.into_inner().json;
        let relationship: FederatedTrustDomain = serde_json::from_str(&json)
            .map_err(|e| Status::invalid_argument(format!("relationship: {e}")))?;
        relationship
            .validate(self.authority.trust_domain())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.federation
            .add(relationship.clone())
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::FederationRelationship {
            json: serde_json::to_string(&relationship).map_err(internal)?,
        }))
    }

    async fn list_federations(
        &self,
        _request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        let relationships = self
            .federation
            .list()
            .iter()
            .map(|r| serde_json::to_string(r).map(|json| pb::FederationRelationship { json }))
            .collect::<Result<_, _>>()
            .map_err(internal)?;
        Ok(Response::new(pb::ListFederationsResponse { relationships }))
    }

    async fn remove_federation(
        &self,
        request: Request<pb::RemoveFederationRequest>,
    ) -> Result<Response<pb::RemoveFederationResponse>, Status> {
        let td = TrustDomain::new(&request.into_inner().trust_domain)
            .map_err(|e| Status::invalid_argument(format!("trust_domain: {e}")))?;
        let removed = self
            .federation
            .remove(&td)
            .await
            .map_err(Status::internal)?;
        Ok(Response::new(pb::RemoveFederationResponse { removed }))
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        let now = OffsetDateTime::now_utc();
        let rotation = if request.into_inner().now {
            self.authority.rotate_now(now)
        } else {
            self.authority.rotate(now)
        }
        .map_err(authority_status)?;
        tracing::info!(sequence = rotation.sequence, activates_at = %rotation.activates_at, "CA rotation requested");
        Ok(Response::new(pb::RotateCaResponse {
            sequence: rotation.sequence,
            activates_at: rotation.activates_at.unix_timestamp(),
            old_root_remove_after: rotation
                .old_root_remove_after
                .map_or(0, OffsetDateTime::unix_timestamp),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            json: self.status.status_json(),
        }))
    }

    async fn mint_x509_svid(
        &self,
        request: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let req = request.into_inner();
        let id = SpiffeId::parse(&req.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let svid = self
            .authority
            .issue_svid(&id, ttl, OffsetDateTime::now_utc())
            .map_err(|e| match e {
                AuthorityError::Ca(e @ isthmus_core::ca::CaError::BadId { .. }) => {
                    Status::invalid_argument(e.to_string())
                }
                other => authority_status(other),
            })?;
        tracing::info!(spiffe_id = %id, "minted X509-SVID");
        Ok(Response::new(pb::MintX509SvidResponse {
            cert_chain_pem: isthmus_core::x509::certs_to_pem(svid.chain()),
            key_pem: pkcs8_pem(svid.key().secret_pkcs8_der()),
            bundle_json: self.authority.bundle().to_json().map_err(internal)?,
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::AdminMintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let req = request.into_inner();
        let id = SpiffeId::parse(&req.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        check_audience(&req.audience)?;
        let ttl = if req.ttl_seconds == 0 {
            self.jwt_ttl
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let svid = self
            .authority
            .mint_jwt_svid(&id, &req.audience, ttl, OffsetDateTime::now_utc())
            .map_err(authority_status)?;
        tracing::info!(spiffe_id = %id, kid = %svid.key_id, "minted JWT-SVID");
        Ok(Response::new(pb::MintJwtSvidResponse {
            svid: Some(to_pb_jwt(&svid)),
        }))
    }

    async fn show_bundle(
        &self,
        request: Request<pb::ShowBundleRequest>,
    ) -> Result<Response<pb::ShowBundleResponse>, Status> {
        let bundle = self.authority.bundle();
        let document = match request.into_inner().format.as_str() {
            "" | "spiffe" => bundle.to_json().map_err(internal)?,
            "pem" => bundle.to_pem(),
            other => {
                return Err(Status::invalid_argument(format!(
                    "format: {other:?} is not spiffe or pem"
                )));
            }
        };
        Ok(Response::new(pb::ShowBundleResponse { document }))
    }
}

fn pkcs8_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}
