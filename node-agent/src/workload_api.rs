//! The SPIFFE Workload API on a Unix socket (default [`DEFAULT_SOCKET`]).
//!
//! Every request must carry the `workload.spiffe.io: true` metadata ([`check_security_header`],
//! otherwise `InvalidArgument`). The caller is identified out of band: tonic hands each request
//! the connection's `SO_PEERCRED` ([`UdsConnectInfo`]), a [`WorkloadAttestor`] turns it into
//! selectors, and the caller gets the identities of the entries whose selectors all match
//! ([`IdentitySnapshot::matching`]); none is `PermissionDenied`. Streams send the full state at
//! once and again whenever it changes (SVID rotation, bundle change, entry change), never the
//! same message twice in a row.
//!
//! Start with [`WorkloadApiServer::start`].

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::endpoint::WorkloadEndpoint;
use isthmus_core::jwt;
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::{Bundle, BundleSet, SpiffeId};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::attest::{PeerCredentials, Selector, UnixAttestor, WorkloadAttestor};
use crate::identities::{IdentitySnapshot, WorkloadIdentities, WorkloadSvid};

/// The generated Workload API messages, client and server (package-less, as the spec requires:
/// the paths are `/SpiffeWorkloadAPI/<Method>`).
pub mod pb {
    #![expect(missing_docs, clippy::allow_attributes, reason = "generated code")]
    tonic::include_proto!("_");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// Where the agent serves the Workload API unless configured otherwise. Clients find it through
/// `SPIFFE_ENDPOINT_SOCKET=unix:///run/isthmus/agent.sock`.
pub const DEFAULT_SOCKET: &str = "/run/isthmus/agent.sock";

/// The metadata key every Workload API request must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Why the Workload API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    /// The socket's directory could not be created.
    #[error("cannot create the socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The configured socket path.
        path: PathBuf,
    },
    /// Another process answers on the socket.
    #[error("{path} is in use by a running server")]
    InUse {
        /// The configured socket path.
        path: PathBuf,
    },
    /// The stale socket could not be removed, or the new one bound.
    #[error("cannot bind the Workload API socket {path}: {source}")]
    Bind {
        /// The configured socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket's mode could not be set.
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// Why.
        source: std::io::Error,
    },
}

/// Where and how the Workload API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiSettings {
    /// The socket path; its directory is created when missing.
    pub socket: PathBuf,
    /// The socket's file mode; 0666 lets every local user connect (identities are decided by
    /// attestation, not by file permissions).
    pub socket_mode: u32,
    /// How long a request waits for the agent's first entry list before `Unavailable`.
    pub sync_wait: Duration,
}

impl Default for WorkloadApiSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o666,
            sync_wait: Duration::from_secs(5),
        }
    }
}

/// Rejects a request without `workload.spiffe.io: true` (Workload Endpoint §3, §6), with
/// SPIRE's message.
pub fn check_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(value) if value.as_bytes() == b"true" => Ok(request),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The header check as a tonic interceptor function.
pub type SecurityHeaderCheck = fn(Request<()>) -> Result<Request<()>, Status>;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API service: identities, the attestor that names callers, and the drain that
/// ends open streams.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    identities: WorkloadIdentities,
    attestor: Arc<dyn WorkloadAttestor>,
    drain: DrainWatch,
    sync_wait: Duration,
}

impl WorkloadApi {
    /// The service over `identities`, attesting callers with `attestor`; open streams end when
    /// `drain` signals.
    pub fn new(
        identities: WorkloadIdentities,
        attestor: Arc<dyn WorkloadAttestor>,
        drain: DrainWatch,
    ) -> Self {
        Self {
            identities,
            attestor,
            drain,
            sync_wait: WorkloadApiSettings::default().sync_wait,
        }
    }

    /// Sets how long a request waits for the first entry list (default 5 s).
    pub fn with_sync_wait(mut self, wait: Duration) -> Self {
        self.sync_wait = wait;
        self
    }

    /// The tonic service, header check included, for a server that serves Unix sockets.
    pub fn into_service(
        self,
    ) -> InterceptedService<SpiffeWorkloadApiServer<Self>, SecurityHeaderCheck> {
        SpiffeWorkloadApiServer::with_interceptor(
            self,
            check_security_header as SecurityHeaderCheck,
        )
    }

    /// The caller's selectors, from the connection's peer credentials.
    async fn attest<T>(&self, request: &Request<T>) -> Result<Vec<Selector>, Status> {
        let creds = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(PeerCredentials::from)
            .ok_or_else(|| Status::internal("BUG: the connection carries no peer credentials"))?;
        let attestor = self.attestor.clone();
        let selectors = tokio::task::spawn_blocking(move || attestor.attest(&creds))
            .await
            .map_err(|e| Status::internal(format!("BUG: attestation task failed: {e}")))?
            .map_err(|e| {
                tracing::info!(uid = creds.uid, pid = ?creds.pid, error = %e, "attestation failed");
                Status::permission_denied(format!("cannot attest the caller: {e}"))
            })?;
        tracing::debug!(uid = creds.uid, pid = ?creds.pid, selectors = ?selectors, "caller attested");
        Ok(selectors)
    }

    /// The current snapshot, once the entry list is known.
    async fn synced_snapshot(&self) -> Result<Arc<IdentitySnapshot>, Status> {
        if !self.identities.wait_synced(self.sync_wait).await {
            return Err(Status::unavailable(
                "the agent has not obtained its entries from the trust broker yet",
            ));
        }
        Ok(self.identities.current())
    }

    /// Answers at once with `build`'s message, then again on every snapshot that changes it.
    /// An error (the caller lost its last identity) ends the stream.
    async fn stream<R, F>(
        &self,
        selectors: Vec<Selector>,
        build: F,
    ) -> Result<Response<ResponseStream<R>>, Status>
    where
        R: PartialEq + Clone + Send + 'static,
        F: Fn(&IdentitySnapshot, &[Selector]) -> Result<R, Status> + Send + 'static,
    {
        let mut updates = self.identities.subscribe();
        let snapshot = self.synced_snapshot().await?;
        let first = build(&snapshot, &selectors)?;
        let (tx, rx) = mpsc::channel(4);
        let drain = self.drain.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = drain.signaled() => return,
                    () = tx.closed() => return,
                    changed = updates.changed() => if changed.is_err() { return },
                }
                let snapshot = updates.borrow_and_update().clone();
                match build(&snapshot, &selectors) {
                    Ok(next) if next == last => {}
                    Ok(next) => {
                        last = next.clone();
                        if tx.send(Ok(next)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        // The client is told why the stream ends; nothing to do if it left.
                        let _gone = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The caller's identities, or `PermissionDenied` (SPIRE's message).
fn identities_of(
    snapshot: &IdentitySnapshot,
    selectors: &[Selector],
) -> Result<Vec<WorkloadSvid>, Status> {
    let identities = snapshot.matching(selectors);
    if identities.is_empty() {
        return Err(Status::permission_denied("no identity issued"));
    }
    Ok(identities)
}

/// The federated bundles the caller's entries ask for, keyed by trust domain SPIFFE ID.
fn federated_of(
    snapshot: &IdentitySnapshot,
    identities: &[WorkloadSvid],
) -> std::collections::BTreeMap<String, Arc<isthmus_core::Bundle>> {
    snapshot
        .federated_bundles(identities.iter().flat_map(|i| &i.entry.federates_with))
        .into_iter()
        .map(|b| (b.trust_domain().id().to_string(), b))
        .collect()
}

fn x509_svid_response(
    snapshot: &IdentitySnapshot,
    selectors: &[Selector],
) -> Result<pb::X509svidResponse, Status> {
    let identities = identities_of(snapshot, selectors)?;
    let svids = identities
        .iter()
        .map(|identity| {
            let svid = &identity.svid.svid;
            let bundle = identity
                .bundle
                .as_ref()
                .filter(|b| !b.x509_authorities().is_empty())
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "no X.509 bundle held for {}",
                        svid.id().trust_domain()
                    ))
                })?;
            Ok(pb::X509svid {
                spiffe_id: svid.id().to_string(),
                x509_svid: svid.chain_der(),
                x509_svid_key: svid.key().secret_pkcs8_der().to_vec(),
                bundle: bundle.to_der(),
                hint: String::new(),
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let federated_bundles = federated_of(snapshot, &identities)
        .into_iter()
        .filter(|(_, b)| !b.x509_authorities().is_empty())
        .map(|(td, b)| (td, b.to_der()))
        .collect();
    Ok(pb::X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles,
    })
}

fn x509_bundles_response(
    snapshot: &IdentitySnapshot,
    selectors: &[Selector],
) -> Result<pb::X509BundlesResponse, Status> {
    let identities = identities_of(snapshot, selectors)?;
    let own = snapshot
        .own_bundle()
        .filter(|b| !b.x509_authorities().is_empty())
        .ok_or_else(|| {
            Status::unavailable(format!(
                "no X.509 bundle held for {}",
                snapshot.own_trust_domain()
            ))
        })?;
    let mut bundles: std::collections::HashMap<String, Vec<u8>> =
        federated_of(snapshot, &identities)
            .into_iter()
            .filter(|(_, b)| !b.x509_authorities().is_empty())
            .map(|(td, b)| (td, b.to_der()))
            .collect();
    bundles.insert(own.trust_domain().id().to_string(), own.to_der());
    Ok(pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

fn jwt_bundles_response(
    snapshot: &IdentitySnapshot,
    selectors: &[Selector],
) -> Result<pb::JwtBundlesResponse, Status> {
    let identities = identities_of(snapshot, selectors)?;
    let own = snapshot.own_bundle().ok_or_else(|| {
        Status::unavailable(format!(
            "no bundle held for {}",
            snapshot.own_trust_domain()
        ))
    })?;
    let mut bundles: std::collections::HashMap<String, Vec<u8>> =
        federated_of(snapshot, &identities)
            .into_iter()
            .map(|(td, b)| (td, b.to_jwt_jwks().into_bytes()))
            .collect();
    bundles.insert(
        own.trust_domain().id().to_string(),
        own.to_jwt_jwks().into_bytes(),
    );
    Ok(pb::JwtBundlesResponse { bundles })
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.attest(&request).await?;
        self.stream(selectors, x509_svid_response).await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.attest(&request).await?;
        self.stream(selectors, x509_bundles_response).await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let wanted = jwt_request(request.get_ref())?;
        let selectors = self.attest(&request).await?;
        let snapshot = self.synced_snapshot().await?;
        let mut identities = identities_of(&snapshot, &selectors)?;
        if let Some(wanted) = &wanted {
            // One token for the asked identity, whichever of its entries comes first.
            identities.retain(|i| i.entry.spiffe_id == *wanted);
            identities.truncate(1);
            if identities.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued for {wanted}"
                )));
            }
        }
        let audience = &request.get_ref().audience;
        let mut svids = Vec::with_capacity(identities.len());
        for identity in &identities {
            let token = self
                .identities
                .jwt_svid(&identity.entry, audience)
                .await
                .map_err(|e| {
                    tracing::warn!(entry = %identity.entry.id, error = %e, "cannot mint a JWT-SVID");
                    Status::unavailable(format!(
                        "cannot mint a JWT-SVID for {}: {e}",
                        identity.entry.spiffe_id
                    ))
                })?;
            svids.push(pb::Jwtsvid {
                spiffe_id: token.spiffe_id.to_string(),
                svid: token.token,
                hint: String::new(),
            });
        }
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let selectors = self.attest(&request).await?;
        self.stream(selectors, jwt_bundles_response).await
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let pb::ValidateJwtsvidRequest { audience, svid } = request.get_ref();
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let selectors = self.attest(&request).await?;
        let snapshot = self.synced_snapshot().await?;
        // Validated only against the bundles this workload receives (its own trust domain and
        // the federated ones of its entries), as SPIRE does.
        let identities = identities_of(&snapshot, &selectors)?;
        let bundles = BundleSet::new(
            snapshot
                .own_bundle()
                .into_iter()
                .chain(federated_of(&snapshot, &identities).values())
                .map(|b| Bundle::clone(b)),
        );
        let token = jwt::validate(svid, audience, &bundles)
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: token.spiffe_id.to_string(),
            claims: Some(claims_struct(&token.claims)),
        }))
    }
}

/// Checks a `FetchJWTSVID` request and returns the SPIFFE ID it asks for, if any.
fn jwt_request(request: &pb::JwtsvidRequest) -> Result<Option<SpiffeId>, Status> {
    if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if request.spiffe_id.is_empty() {
        return Ok(None);
    }
    SpiffeId::parse(&request.spiffe_id).map(Some).map_err(|e| {
        Status::invalid_argument(format!(
            "spiffe_id {:?} is not a SPIFFE ID: {e}",
            request.spiffe_id
        ))
    })
}

/// JWT claims as a `google.protobuf.Struct` (numbers become doubles, as in JSON).
fn claims_struct(claims: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(name, value)| (name.clone(), claim_value(value)))
            .collect(),
    }
}

fn claim_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(claim_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The Workload API served on its Unix socket.
#[derive(Debug)]
pub struct WorkloadApiServer {
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl WorkloadApiServer {
    /// Binds the socket (creating its directory, replacing a stale socket file, setting the
    /// mode) and serves `api` on it until `drain` signals; the socket file is removed then.
    pub async fn start(
        settings: &WorkloadApiSettings,
        api: WorkloadApi,
        drain: DrainWatch,
    ) -> Result<Self, WorkloadApiError> {
        let listener = bind(&settings.socket, settings.socket_mode).await?;
        let socket = settings.socket.clone();
        let service = api.with_sync_wait(settings.sync_wait).into_service();
        let cleanup = socket.clone();
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    drain.signaled().await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "Workload API stopped");
            }
            if let Err(e) = std::fs::remove_file(&cleanup) {
                tracing::debug!(socket = %cleanup.display(), error = %e, "cannot remove the socket");
            }
            drop(drain);
        });
        tracing::info!(socket = %socket.display(), mode = format_args!("{:o}", settings.socket_mode), "Workload API listening");
        Ok(Self { socket, task })
    }

    /// Serves `identities` with the `unix` attestor: the usual way to start the agent's
    /// Workload API.
    pub async fn start_unix(
        settings: &WorkloadApiSettings,
        identities: WorkloadIdentities,
        drain: DrainWatch,
    ) -> Result<Self, WorkloadApiError> {
        let api = WorkloadApi::new(identities, Arc::new(UnixAttestor::default()), drain.clone());
        Self::start(settings, api, drain).await
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The endpoint address for clients, `unix://<absolute path>` (the `SPIFFE_ENDPOINT_SOCKET`
    /// form, Workload Endpoint §4).
    pub fn endpoint(&self) -> String {
        let path = std::path::absolute(&self.socket).unwrap_or_else(|_| self.socket.clone());
        WorkloadEndpoint::Unix(path).to_string()
    }

    /// Waits until the server has stopped (after the drain).
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "BUG: the Workload API task panicked");
        }
    }
}

/// Prepares the socket path and binds it.
async fn bind(socket: &Path, mode: u32) -> Result<UnixListener, WorkloadApiError> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| WorkloadApiError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Err(WorkloadApiError::InUse {
                    path: socket.to_path_buf(),
                });
            }
            std::fs::remove_file(socket).map_err(|source| WorkloadApiError::Bind {
                path: socket.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(WorkloadApiError::NotASocket {
                path: socket.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(WorkloadApiError::Bind {
                path: socket.to_path_buf(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(socket).map_err(|source| WorkloadApiError::Bind {
        path: socket.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        WorkloadApiError::Permissions {
            path: socket.to_path_buf(),
            mode,
            source,
        }
    })?;
    Ok(listener)
}
