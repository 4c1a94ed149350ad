//! Fetching the bundles of federated trust domains (SPIFFE Federation §4–6) and keeping the
//! last good one.
//!
//! One [`BundleFetcher`] per [`FederatedTrustDomain`]:
//! - **Bootstrap**: the persisted bundle, else the configured `trustDomainBundle`, goes into
//!   the live [`TrustStore`] (and is persisted).
//! - **Fetch** ([`BundleFetcher::fetch_once`]): `GET` the configured URL over TLS authenticated
//!   per profile, never falling back from one to the other. `https_spiffe`: the endpoint's
//!   certificate must be an X509-SVID for `endpointSPIFFEID`, valid against the bundle held
//!   for that ID's trust domain (for a self-serving endpoint, the latest fetched one).
//!   `https_web`: Web PKI validation with host-name checking against configured roots. At most
//!   [`FetchSettings::max_redirects`] redirects to https URLs, with the same TLS rules; every
//!   fetch starts again from the configured URL (FED §7.5.1).
//! - **Accept** only a well-formed bundle for this trust domain whose sequence does not go
//!   backwards; persist it durably, then publish it to the trust store. An empty `keys` array
//!   is the foreign domain revoking its keys and is honoured. On any failure the held bundle
//!   stays, and the failure is logged, counted by reason ([`FederationMetrics`]) and shown in
//!   the [`FederationStatusBoard`].
//! - **Schedule** ([`BundleFetcher::run`]): every `spiffe_refresh_hint` of the held bundle
//!   (5 min when absent) clamped to `[min_refresh, max_refresh]`; after a failure, the next
//!   attempt waits the same interval (FED §6.2: no aggressive retries).
//!
//! [`Federation`] runs one fetcher per relationship and terminates a relationship (stop
//! polling, delete the bundle from the trust store and the store, FED §6.3).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use isthmus_core::bundle::BundleError;
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_core::tls::{self, AllowIds, SpiffeServerCertVerifier};
use isthmus_core::{Bundle, SpiffeId, TrustDomain, TrustStore};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::model::{BundleEndpointProfile, FederatedTrustDomain, FederationStatus};
use crate::store::{FederatedBundleStore, StoreError};

/// Polling interval when the held bundle carries no `spiffe_refresh_hint` (FED §4.1).
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(5 * 60);
/// Default lower bound of the polling interval.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Default upper bound of the polling interval.
pub const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(60 * 60);
/// Default time limit of one fetch, redirects included.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a bundle document's size.
pub const DEFAULT_MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// Default number of redirects followed.
pub const DEFAULT_MAX_REDIRECTS: usize = 3;

const USER_AGENT: &str = concat!("isthmus-trust-broker/", env!("CARGO_PKG_VERSION"));

/// How fetchers poll and what they accept.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// Lower bound of the polling interval (also used when the hint is 0).
    pub min_refresh: Duration,
    /// Upper bound of the polling interval; wins over `min_refresh` if they cross.
    pub max_refresh: Duration,
    /// Time limit of one fetch: connect, handshake, redirects and body.
    pub timeout: Duration,
    /// Largest bundle document accepted.
    pub max_body_bytes: usize,
    /// Redirects followed before giving up.
    pub max_redirects: usize,
    /// Trust anchors for `https_web` endpoints (default: the Mozilla roots of `webpki-roots`).
    pub web_roots: Arc<RootCertStore>,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            min_refresh: DEFAULT_MIN_REFRESH,
            max_refresh: DEFAULT_MAX_REFRESH,
            timeout: DEFAULT_FETCH_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            web_roots: Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
        }
    }
}

impl FetchSettings {
    /// The wait before the next fetch: the held bundle's refresh hint (5 min when absent)
    /// clamped to `[min_refresh, max_refresh]`. The same after a failure (FED §6.2).
    pub fn refresh_interval(&self, held: Option<&Bundle>) -> Duration {
        held.and_then(Bundle::refresh_hint)
            .unwrap_or(DEFAULT_REFRESH_HINT)
            .max(self.min_refresh)
            .min(self.max_refresh)
    }
}

/// Why a relationship could not be set up, or why one fetch was not accepted. Every fetch
/// failure leaves the held bundle in place.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The configured bundle endpoint URL cannot be used.
    #[error("bundle endpoint URL {url:?} is unusable: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured `trustDomainBundle` does not parse.
    #[error("configured trustDomainBundle for {trust_domain} is malformed: {error}")]
    BadBootstrapBundle {
        /// The trust domain it was parsed for.
        trust_domain: TrustDomain,
        /// The parser's error.
        error: BundleError,
    },
    /// The relationship is already running.
    #[error("federation with {0} is already running")]
    AlreadyRunning(TrustDomain),
    /// rustls refused the client configuration.
    #[error("cannot build the bundle endpoint client TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// `https_spiffe`: no bundle is held for the endpoint's trust domain, so its SVID cannot
    /// be authenticated.
    #[error(
        "no bundle of {trust_domain} is held to authenticate bundle endpoint {endpoint_id}; \
         federate with {trust_domain} first (or, for a self-serving endpoint, set trustDomainBundle)"
    )]
    NoEndpointBundle {
        /// The endpoint ID's trust domain.
        trust_domain: TrustDomain,
        /// The configured endpoint ID.
        endpoint_id: SpiffeId,
    },
    /// The TCP connection failed.
    #[error("cannot connect to bundle endpoint {url}: {source}")]
    Connect {
        /// The URL being fetched.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (unknown root, wrong SPIFFE ID, wrong host name, alert…).
    #[error("TLS handshake with bundle endpoint {url} failed: {error}")]
    Tls {
        /// The URL being fetched.
        url: String,
        /// rustls's error, or the SPIFFE verifier's.
        error: String,
        /// The SPIFFE verifier's reason (`unauthorized`, `unknown_issuer`…), when it decided.
        verify_reason: Option<&'static str>,
    },
    /// The fetch did not finish within [`FetchSettings::timeout`].
    #[error("fetching bundle endpoint {url} timed out after {after:?}")]
    Timeout {
        /// The configured URL.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The HTTP exchange failed after the handshake.
    #[error("HTTP exchange with bundle endpoint {url} failed: {error}")]
    Http {
        /// The URL being fetched.
        url: String,
        /// hyper's error.
        error: String,
    },
    /// The endpoint answered something other than 200 (or a redirect).
    #[error("bundle endpoint {url} answered HTTP {status}")]
    HttpStatus {
        /// The URL being fetched.
        url: String,
        /// The status code.
        status: u16,
    },
    /// A redirect was refused (not https, unparseable, too many).
    #[error("redirect from bundle endpoint {url} refused: {reason}")]
    Redirect {
        /// The URL that redirected.
        url: String,
        /// Why it was not followed.
        reason: String,
    },
    /// The document is larger than [`FetchSettings::max_body_bytes`].
    #[error("bundle from {url} exceeds {limit} bytes")]
    TooLarge {
        /// The URL being fetched.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The document is not a SPIFFE bundle.
    #[error("bundle fetched for {trust_domain} is malformed: {error}")]
    Malformed {
        /// The federated trust domain.
        trust_domain: TrustDomain,
        /// The parser's error.
        error: BundleError,
    },
    /// An X.509 authority names another trust domain: a bundle for the wrong domain.
    #[error("bundle fetched for {expected} holds an authority of {found}")]
    WrongTrustDomain {
        /// The federated trust domain.
        expected: TrustDomain,
        /// The SPIFFE URI SAN found on the authority.
        found: String,
    },
    /// The fetched sequence is lower than the held one.
    #[error("bundle fetched for {trust_domain} has sequence {fetched}, lower than the held {held}")]
    StaleSequence {
        /// The federated trust domain.
        trust_domain: TrustDomain,
        /// The held sequence.
        held: u64,
        /// The fetched sequence.
        fetched: u64,
    },
    /// The fetched bundle reuses the held sequence with different authorities.
    #[error(
        "bundle fetched for {trust_domain} reuses sequence {sequence} with different authorities"
    )]
    SequenceReused {
        /// The federated trust domain.
        trust_domain: TrustDomain,
        /// The sequence.
        sequence: u64,
    },
    /// The bundle could not be persisted (so it was not published either).
    #[error("cannot persist the bundle of {trust_domain}: {source}")]
    Store {
        /// The federated trust domain.
        trust_domain: TrustDomain,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

impl FederationError {
    /// A short, stable, low-cardinality label for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadUrl { .. }
            | Self::BadBootstrapBundle { .. }
            | Self::AlreadyRunning(_)
            | Self::TlsConfig(_) => "config",
            Self::NoEndpointBundle { .. } => "no_endpoint_bundle",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::Timeout { .. } => "timeout",
            Self::Http { .. } => "http",
            Self::HttpStatus { .. } => "http_status",
            Self::Redirect { .. } => "redirect",
            Self::TooLarge { .. } => "too_large",
            Self::Malformed { .. } => "malformed",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::StaleSequence { .. } => "stale_sequence",
            Self::SequenceReused { .. } => "sequence_reused",
            Self::Store { .. } => "store",
        }
    }
}

/// What an accepted fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// A different bundle was stored and published.
    Updated {
        /// Sequence of the bundle held before.
        previous: Option<u64>,
        /// Sequence of the new bundle.
        sequence: Option<u64>,
    },
    /// The endpoint served exactly the held bundle; nothing was rewritten.
    Unchanged {
        /// Its sequence.
        sequence: Option<u64>,
    },
}

impl FetchOutcome {
    /// `updated` or `unchanged`, the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Updated { .. } => "updated",
            Self::Unchanged { .. } => "unchanged",
        }
    }
}

/// The status of every relationship, shared by fetchers and readers (`broker status`).
/// Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FederationStatusBoard {
    inner: Arc<RwLock<BTreeMap<TrustDomain, FederationStatus>>>,
}

impl FederationStatusBoard {
    /// A copy of every relationship's status, ordered by trust domain.
    pub fn snapshot(&self) -> BTreeMap<TrustDomain, FederationStatus> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The status of one relationship.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<FederationStatus> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(trust_domain)
            .cloned()
    }

    fn update(&self, trust_domain: &TrustDomain, change: impl FnOnce(&mut FederationStatus)) {
        let mut board = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        change(board.entry(trust_domain.clone()).or_default());
    }

    fn remove(&self, trust_domain: &TrustDomain) {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(trust_domain);
    }
}

/// Labels of [`FederationMetrics::fetches`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// The federated trust domain (one per relationship: low cardinality).
    pub trust_domain: String,
    /// `updated`, `unchanged`, or a [`FederationError::reason`].
    pub result: &'static str,
}

/// Labels of per-relationship gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    /// The federated trust domain.
    pub trust_domain: String,
}

/// The fetchers' metrics, registered as `isthmus_federation_*`.
#[derive(Debug, Clone, Default)]
pub struct FederationMetrics {
    /// Fetch attempts by trust domain and result.
    pub fetches: Family<FetchLabels, Counter>,
    /// `spiffe_sequence` of the held bundle.
    pub bundle_sequence: Family<TrustDomainLabels, Gauge>,
    /// When the held bundle was fetched, Unix seconds (bundle age = now − this).
    pub bundle_fetched: Family<TrustDomainLabels, Gauge>,
}

impl FederationMetrics {
    /// Metrics registered in the process registry under `federation`.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry("federation");
        sub.register(
            "fetches",
            "Federated bundle fetch attempts, by trust domain and result",
            metrics.fetches.clone(),
        );
        sub.register(
            "bundle_sequence",
            "spiffe_sequence of the held federated bundle",
            metrics.bundle_sequence.clone(),
        );
        sub.register_with_unit(
            "bundle_fetched_timestamp",
            "When the held federated bundle was fetched (Unix time)",
            Unit::Seconds,
            metrics.bundle_fetched.clone(),
        );
        metrics
    }

    /// Fetch attempts of `trust_domain` that ended with `result` so far.
    pub fn fetches_with(&self, trust_domain: &TrustDomain, result: &'static str) -> u64 {
        self.fetches
            .get_or_create(&FetchLabels {
                trust_domain: trust_domain.name().to_owned(),
                result,
            })
            .get()
    }

    fn record_held(&self, bundle: &Bundle, fetched_at: OffsetDateTime) {
        let labels = TrustDomainLabels {
            trust_domain: bundle.trust_domain().name().to_owned(),
        };
        if let Some(sequence) = bundle.sequence() {
            self.bundle_sequence
                .get_or_create(&labels)
                .set(i64::try_from(sequence).unwrap_or(i64::MAX));
        }
        self.bundle_fetched
            .get_or_create(&labels)
            .set(fetched_at.unix_timestamp());
    }

    fn forget(&self, trust_domain: &TrustDomain) {
        let labels = TrustDomainLabels {
            trust_domain: trust_domain.name().to_owned(),
        };
        self.bundle_sequence.remove(&labels);
        self.bundle_fetched.remove(&labels);
    }
}

/// A boxed fetch, so transports can be swapped behind `dyn`.
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Bytes, FederationError>> + Send + 'a>>;

/// Gets a bundle document from a URL over TLS: the seam between the fetcher's accept rules and
/// the network ([`HttpsTransport`] in production, scripted answers in tests).
pub trait BundleTransport: Send + Sync + fmt::Debug {
    /// `GET url` with `tls` (which authenticates the endpoint per profile) and returns the
    /// body of a 200 answer.
    fn get<'a>(&'a self, url: &'a Uri, tls: Arc<ClientConfig>) -> TransportFuture<'a>;
}

/// HTTP/1.1 over TLS with hyper: total timeout, bounded redirects, capped body.
#[derive(Debug, Clone)]
pub struct HttpsTransport {
    timeout: Duration,
    max_body_bytes: usize,
    max_redirects: usize,
}

enum Reply {
    Body(Bytes),
    Redirect(String),
}

impl HttpsTransport {
    /// A transport with the limits of `settings`.
    pub fn new(settings: &FetchSettings) -> Self {
        Self {
            timeout: settings.timeout,
            max_body_bytes: settings.max_body_bytes,
            max_redirects: settings.max_redirects,
        }
    }

    async fn follow(
        &self,
        configured: &Uri,
        tls: Arc<ClientConfig>,
    ) -> Result<Bytes, FederationError> {
        let connector = TlsConnector::from(tls);
        let mut current = configured.clone();
        let mut redirects = 0;
        loop {
            match self.get_one(&current, &connector).await? {
                Reply::Body(body) => return Ok(body),
                Reply::Redirect(location) => {
                    if redirects == self.max_redirects {
                        return Err(FederationError::Redirect {
                            url: current.to_string(),
                            reason: format!("more than {} redirects", self.max_redirects),
                        });
                    }
                    redirects += 1;
                    let next = resolve_redirect(&current, &location)?;
                    debug!(from = %current, to = %next, "following bundle endpoint redirect");
                    current = next;
                }
            }
        }
    }

    async fn get_one(&self, url: &Uri, connector: &TlsConnector) -> Result<Reply, FederationError> {
        let url_text = url.to_string();
        let bad_url = |reason: &str| FederationError::BadUrl {
            url: url_text.clone(),
            reason: reason.to_owned(),
        };
        let authority = url.authority().ok_or_else(|| bad_url("no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = url.port_u16().unwrap_or(443);
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|e| bad_url(&e.to_string()))?;
        let tcp =
            TcpStream::connect((host, port))
                .await
                .map_err(|source| FederationError::Connect {
                    url: url_text.clone(),
                    source,
                })?;
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| tls_failure(&url_text, &e))?;
        let http_err = |e: &dyn fmt::Display| FederationError::Http {
            url: url_text.clone(),
            error: e.to_string(),
        };
        let (mut sender, connection) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(&e))?;
        let request = Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| http_err(&e))?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| http_err(&e))?;
            self.read_reply(response, &url_text).await
        };
        // Drive the connection and the exchange together; the connection ends with them.
        tokio::pin!(connection);
        tokio::pin!(exchange);
        tokio::select! {
            biased;
            reply = &mut exchange => reply,
            closed = &mut connection => match closed {
                Ok(()) => exchange.await,
                Err(e) => Err(http_err(&e)),
            },
        }
    }

    /// A redirect's target, or the body of a 200 answer within the size cap.
    async fn read_reply(
        &self,
        response: http::Response<hyper::body::Incoming>,
        url: &str,
    ) -> Result<Reply, FederationError> {
        let status = response.status();
        if matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        ) {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| FederationError::Redirect {
                    url: url.to_owned(),
                    reason: format!("HTTP {} without a usable Location", status.as_u16()),
                })?;
            return Ok(Reply::Redirect(location.to_owned()));
        }
        if status != StatusCode::OK {
            return Err(FederationError::HttpStatus {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let too_large = || FederationError::TooLarge {
            url: url.to_owned(),
            limit: self.max_body_bytes,
        };
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), self.max_body_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    too_large()
                } else {
                    FederationError::Http {
                        url: url.to_owned(),
                        error: e.to_string(),
                    }
                }
            })?;
        Ok(Reply::Body(body.to_bytes()))
    }
}

impl BundleTransport for HttpsTransport {
    fn get<'a>(&'a self, url: &'a Uri, tls: Arc<ClientConfig>) -> TransportFuture<'a> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.follow(url, tls))
                .await
                .unwrap_or_else(|_elapsed| {
                    Err(FederationError::Timeout {
                        url: url.to_string(),
                        after: self.timeout,
                    })
                })
        })
    }
}

/// Classifies a failed handshake, keeping the SPIFFE verifier's reason when it decided.
fn tls_failure(url: &str, error: &std::io::Error) -> FederationError {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let verify_error = rustls_error.and_then(tls::verify_error);
    // rustls prints a verifier's own error with Debug; ours has a Display naming the ID.
    let message = match (verify_error, rustls_error) {
        (Some(verify), _) => format!("invalid peer certificate: {verify}"),
        (None, Some(rustls)) => rustls.to_string(),
        (None, None) => error.to_string(),
    };
    FederationError::Tls {
        url: url.to_owned(),
        error: message,
        verify_reason: verify_error.map(|e| e.reason()),
    }
}

/// Checks a URL is `https://host[:port]/…` without userinfo.
fn check_https_url(url: &Uri, text: &str) -> Result<(), FederationError> {
    let bad = |reason: &str| FederationError::BadUrl {
        url: text.to_owned(),
        reason: reason.to_owned(),
    };
    if url.scheme_str() != Some("https") {
        return Err(bad("scheme must be https"));
    }
    match url.authority() {
        None => Err(bad("no host")),
        Some(a) if a.as_str().contains('@') => Err(bad("userinfo is not allowed")),
        Some(a) if a.host().is_empty() => Err(bad("no host")),
        Some(_) => Ok(()),
    }
}

/// The target of a redirect: an absolute https URL, or an absolute path on the same host.
fn resolve_redirect(current: &Uri, location: &str) -> Result<Uri, FederationError> {
    let refuse = |reason: String| FederationError::Redirect {
        url: current.to_string(),
        reason,
    };
    let target: Uri = location
        .parse()
        .map_err(|e| refuse(format!("Location {location:?} is not a URL: {e}")))?;
    if target.scheme().is_some() {
        check_https_url(&target, location)
            .map_err(|e| refuse(format!("Location {location:?}: {e}")))?;
        return Ok(target);
    }
    if location.starts_with('/') && !location.starts_with("//") {
        let mut parts = current.clone().into_parts();
        parts.path_and_query = target.path_and_query().cloned();
        return Uri::from_parts(parts).map_err(|e| refuse(format!("Location {location:?}: {e}")));
    }
    Err(refuse(format!(
        "Location {location:?} is neither an https URL nor an absolute path"
    )))
}

/// The client TLS configuration of an `https_spiffe` endpoint: its certificate must be an
/// X509-SVID for `endpoint_id`, valid against `bundle` alone; no client certificate.
fn spiffe_client_config(
    bundle: Bundle,
    endpoint_id: &SpiffeId,
) -> Result<Arc<ClientConfig>, FederationError> {
    let verifier = SpiffeServerCertVerifier::new(
        TrustStore::from_bundles([bundle]),
        Arc::new(AllowIds(vec![endpoint_id.clone()])),
        None,
    );
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(FederationError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every fetch must authenticate against the bundle held now.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The client TLS configuration of an `https_web` endpoint: Web PKI path validation and
/// host-name checking against `roots`.
fn web_client_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, FederationError> {
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(FederationError::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Rejects a bundle whose X.509 authorities carry a SPIFFE ID of another trust domain.
fn check_authorities_trust_domain(bundle: &Bundle) -> Result<(), FederationError> {
    let expected = bundle.trust_domain();
    for (index, cert) in bundle.x509_authorities().iter().enumerate() {
        let facts =
            isthmus_core::x509::facts(cert, index).map_err(|e| FederationError::Malformed {
                trust_domain: expected.clone(),
                error: BundleError::Cert(e),
            })?;
        for uri in &facts.uri_sans {
            if !uri
                .get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
            {
                continue;
            }
            let ours =
                SpiffeId::parse(uri).is_ok_and(|id| id.trust_domain_name() == expected.name());
            if !ours {
                return Err(FederationError::WrongTrustDomain {
                    expected: expected.clone(),
                    found: uri.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The endpoint URL (https, host, no userinfo) and the configured bootstrap bundle, parsed
/// for the endpoint's trust domain.
fn parse_relationship(
    relationship: &FederatedTrustDomain,
) -> Result<(Uri, Option<Bundle>), FederationError> {
    let text = &relationship.bundle_endpoint_url;
    let url: Uri = text
        .parse()
        .map_err(|e: http::uri::InvalidUri| FederationError::BadUrl {
            url: text.clone(),
            reason: e.to_string(),
        })?;
    check_https_url(&url, text)?;
    // As SPIRE's ClusterFederatedTrustDomain: the initial bundle of the federated domain.
    let td = &relationship.trust_domain;
    let configured = relationship
        .trust_domain_bundle
        .as_deref()
        .map(|json| {
            Bundle::parse_json(td.clone(), json.as_bytes()).map_err(|error| {
                FederationError::BadBootstrapBundle {
                    trust_domain: td.clone(),
                    error,
                }
            })
        })
        .transpose()?;
    Ok((url, configured))
}

/// What every fetcher shares: the live trust store, the durable store, limits, status,
/// metrics and the transport.
#[derive(Clone)]
pub struct FederationContext {
    /// The live bundles every verifier reads.
    pub trust: TrustStore,
    /// Durable storage of fetched bundles.
    pub store: Arc<dyn FederatedBundleStore>,
    /// Polling and acceptance limits.
    pub settings: FetchSettings,
    /// Status of every relationship.
    pub status: FederationStatusBoard,
    /// Fetch metrics.
    pub metrics: FederationMetrics,
    /// How documents are fetched.
    pub transport: Arc<dyn BundleTransport>,
}

impl fmt::Debug for FederationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederationContext")
            .field("settings", &self.settings)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl FederationContext {
    /// A context fetching over [`HttpsTransport`], with unregistered metrics and an empty
    /// status board (replace the public fields to share them).
    pub fn new(
        trust: TrustStore,
        store: Arc<dyn FederatedBundleStore>,
        settings: FetchSettings,
    ) -> Self {
        let transport = Arc::new(HttpsTransport::new(&settings));
        Self {
            trust,
            store,
            settings,
            status: FederationStatusBoard::default(),
            metrics: FederationMetrics::default(),
            transport,
        }
    }
}

/// Fetches the bundle of one federated trust domain and keeps the last good one.
#[derive(Debug)]
pub struct BundleFetcher {
    relationship: FederatedTrustDomain,
    url: Uri,
    ctx: FederationContext,
    /// The bundle of the federated domain we hold (and publish), if any.
    held: Option<Bundle>,
    /// `https_web` only: built once from the configured roots.
    web_tls: Option<Arc<ClientConfig>>,
}

impl BundleFetcher {
    /// Bootstraps a relationship: the persisted bundle, else the configured
    /// `trustDomainBundle`, is published to the trust store (and persisted).
    pub fn new(
        relationship: FederatedTrustDomain,
        ctx: FederationContext,
    ) -> Result<Self, FederationError> {
        let td = relationship.trust_domain.clone();
        let (url, configured) = parse_relationship(&relationship)?;
        let store_err = |source| FederationError::Store {
            trust_domain: td.clone(),
            source,
        };
        let (held, fetched_at, origin) = match ctx.store.load_federated(&td).map_err(store_err)? {
            Some(stored) => (Some(stored.bundle), Some(stored.fetched_at), "store"),
            None => match configured {
                Some(bundle) => {
                    let now = OffsetDateTime::now_utc();
                    ctx.store.save_federated(&bundle, now).map_err(store_err)?;
                    (Some(bundle), Some(now), "configuration")
                }
                None => (None, None, "none"),
            },
        };
        let web_tls = match relationship.bundle_endpoint_profile {
            BundleEndpointProfile::HttpsWeb => {
                Some(web_client_config(ctx.settings.web_roots.clone())?)
            }
            BundleEndpointProfile::HttpsSpiffe { .. } => None,
        };
        if let (Some(bundle), Some(at)) = (&held, fetched_at) {
            ctx.trust.set(bundle.clone());
            ctx.metrics.record_held(bundle, at);
        }
        ctx.status.update(&td, |status| {
            *status = FederationStatus {
                trust_domain: td.name().to_owned(),
                url: relationship.bundle_endpoint_url.clone(),
                profile: relationship.bundle_endpoint_profile.name().to_owned(),
                sequence: held.as_ref().and_then(Bundle::sequence),
                x509_authorities: held.as_ref().map_or(0, |b| b.x509_authorities().len()),
                jwt_authorities: held.as_ref().map_or(0, |b| b.jwt_authorities().len()),
                fetched_at,
                ..FederationStatus::default()
            };
        });
        info!(
            trust_domain = %td,
            url = %relationship.bundle_endpoint_url,
            profile = relationship.bundle_endpoint_profile.name(),
            bootstrap = origin,
            sequence = ?held.as_ref().and_then(Bundle::sequence),
            "federation relationship bootstrapped"
        );
        Ok(Self {
            relationship,
            url,
            ctx,
            held,
            web_tls,
        })
    }

    /// The federated trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.relationship.trust_domain
    }

    /// The bundle held (and published) now.
    pub fn held(&self) -> Option<&Bundle> {
        self.held.as_ref()
    }

    /// The wait before the next fetch, from the held bundle's refresh hint.
    pub fn refresh_interval(&self) -> Duration {
        self.ctx.settings.refresh_interval(self.held.as_ref())
    }

    /// One fetch: get, check, persist, publish. On error nothing held changes; either way the
    /// attempt is logged, counted and recorded in the status board.
    pub async fn fetch_once(&mut self) -> Result<FetchOutcome, FederationError> {
        let result = self.attempt().await;
        self.record(&result);
        result
    }

    async fn attempt(&mut self) -> Result<FetchOutcome, FederationError> {
        let tls = self.client_config()?;
        let body = self.ctx.transport.get(&self.url, tls).await?;
        self.accept(&body)
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, FederationError> {
        match &self.relationship.bundle_endpoint_profile {
            BundleEndpointProfile::HttpsWeb => match &self.web_tls {
                Some(config) => Ok(config.clone()),
                None => web_client_config(self.ctx.settings.web_roots.clone()),
            },
            BundleEndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                let endpoint_td = endpoint_spiffe_id.trust_domain();
                // Self-serving: the latest bundle we fetched (FED §5.2.2.4). Otherwise the
                // bundle the trust store holds for the endpoint's domain.
                let bundle = if endpoint_td == self.relationship.trust_domain {
                    self.held.clone()
                } else {
                    self.ctx.trust.get(&endpoint_td).map(|b| Bundle::clone(&b))
                };
                let bundle = bundle.ok_or_else(|| FederationError::NoEndpointBundle {
                    trust_domain: endpoint_td,
                    endpoint_id: endpoint_spiffe_id.clone(),
                })?;
                spiffe_client_config(bundle, endpoint_spiffe_id)
            }
        }
    }

    /// The accept rules: never replace a good bundle with a bad one.
    fn accept(&mut self, body: &[u8]) -> Result<FetchOutcome, FederationError> {
        let td = &self.relationship.trust_domain;
        let fetched =
            Bundle::parse_json(td.clone(), body).map_err(|error| FederationError::Malformed {
                trust_domain: td.clone(),
                error,
            })?;
        check_authorities_trust_domain(&fetched)?;
        if let Some(held) = &self.held {
            if held == &fetched {
                return Ok(FetchOutcome::Unchanged {
                    sequence: held.sequence(),
                });
            }
            // Without a sequence on either side, the most recent fetch wins (FED §4.2).
            if let (Some(held_seq), Some(fetched_seq)) = (held.sequence(), fetched.sequence()) {
                if fetched_seq < held_seq {
                    return Err(FederationError::StaleSequence {
                        trust_domain: td.clone(),
                        held: held_seq,
                        fetched: fetched_seq,
                    });
                }
                if fetched_seq == held_seq && !held.same_authorities(&fetched) {
                    return Err(FederationError::SequenceReused {
                        trust_domain: td.clone(),
                        sequence: held_seq,
                    });
                }
            }
        }
        // Durable first, then visible: a crash never leaves verifiers trusting a bundle the
        // store would forget.
        let now = OffsetDateTime::now_utc();
        self.ctx
            .store
            .save_federated(&fetched, now)
            .map_err(|source| FederationError::Store {
                trust_domain: td.clone(),
                source,
            })?;
        self.ctx.trust.set(fetched.clone());
        self.ctx.metrics.record_held(&fetched, now);
        let sequence = fetched.sequence();
        let x509_authorities = fetched.x509_authorities().len();
        let jwt_authorities = fetched.jwt_authorities().len();
        let previous = self.held.replace(fetched).and_then(|b| b.sequence());
        self.ctx.status.update(td, |status| {
            status.sequence = sequence;
            status.x509_authorities = x509_authorities;
            status.jwt_authorities = jwt_authorities;
            status.fetched_at = Some(now);
        });
        Ok(FetchOutcome::Updated { previous, sequence })
    }

    fn record(&self, result: &Result<FetchOutcome, FederationError>) {
        let td = &self.relationship.trust_domain;
        let url = &self.relationship.bundle_endpoint_url;
        let now = OffsetDateTime::now_utc();
        let label = match result {
            Ok(outcome) => outcome.label(),
            Err(error) => error.reason(),
        };
        self.ctx
            .metrics
            .fetches
            .get_or_create(&FetchLabels {
                trust_domain: td.name().to_owned(),
                result: label,
            })
            .inc();
        let mut failures = 0;
        self.ctx.status.update(td, |status| {
            status.last_attempt = Some(now);
            match result {
                Ok(_) => {
                    status.last_success = Some(now);
                    status.last_error = None;
                    status.last_error_reason = None;
                    status.consecutive_failures = 0;
                }
                Err(error) => {
                    status.last_error = Some(error.to_string());
                    status.last_error_reason = Some(error.reason().to_owned());
                    status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                    failures = status.consecutive_failures;
                }
            }
        });
        match result {
            Ok(FetchOutcome::Updated { previous, sequence }) => info!(
                trust_domain = %td,
                %url,
                previous_sequence = ?previous,
                sequence = ?sequence,
                x509_authorities = self.held.as_ref().map_or(0, |b| b.x509_authorities().len()),
                "federated bundle updated"
            ),
            Ok(FetchOutcome::Unchanged { sequence }) => {
                debug!(trust_domain = %td, %url, sequence = ?sequence, "federated bundle unchanged");
            }
            Err(error) => warn!(
                trust_domain = %td,
                %url,
                reason = error.reason(),
                error = %error,
                consecutive_failures = failures,
                held_sequence = ?self.held.as_ref().and_then(Bundle::sequence),
                "bundle refresh failed; keeping previous bundle"
            ),
        }
    }

    /// Fetches now, then every [`BundleFetcher::refresh_interval`], until `drain` signals.
    /// A fetch in flight is abandoned on drain; it never leaves a half-applied bundle.
    pub async fn run(self, drain: DrainWatch) {
        self.run_until(drain, std::future::pending()).await;
    }

    async fn run_until(mut self, drain: DrainWatch, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                () = &mut stop => break,
                _ = self.fetch_once() => {}
            }
            let delay = self.refresh_interval();
            let due = OffsetDateTime::now_utc() + delay;
            self.ctx
                .status
                .update(&self.relationship.trust_domain, |s| {
                    s.next_fetch = Some(due)
                });
            debug!(trust_domain = %self.relationship.trust_domain, delay = ?delay, "next bundle fetch scheduled");
            tokio::select! {
                () = drain.signaled() => break,
                () = &mut stop => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        info!(trust_domain = %self.relationship.trust_domain, "federation fetcher stopped");
    }
}

/// A running relationship.
#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Runs one [`BundleFetcher`] per federated trust domain; starts and terminates
/// relationships. Dropping it stops every fetcher.
#[derive(Debug)]
pub struct Federation {
    ctx: FederationContext,
    running: Mutex<BTreeMap<TrustDomain, Running>>,
}

impl Federation {
    /// A federation with no relationship running yet.
    pub fn new(ctx: FederationContext) -> Self {
        Self {
            ctx,
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// The shared context (trust store, status board, metrics).
    pub fn context(&self) -> &FederationContext {
        &self.ctx
    }

    /// The status board.
    pub fn status(&self) -> FederationStatusBoard {
        self.ctx.status.clone()
    }

    /// The trust domains with a running fetcher.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TrustDomain, Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bootstraps `relationship` and starts polling it until `drain` signals or it is
    /// removed. Must be called inside a Tokio runtime.
    pub fn start(
        &self,
        relationship: FederatedTrustDomain,
        drain: DrainWatch,
    ) -> Result<(), FederationError> {
        let td = relationship.trust_domain.clone();
        if self.lock().contains_key(&td) {
            return Err(FederationError::AlreadyRunning(td));
        }
        let fetcher = BundleFetcher::new(relationship, self.ctx.clone())?;
        let (stop, stopped) = oneshot::channel();
        let span = info_span!("federation", trust_domain = %td);
        let task = tokio::spawn(
            fetcher
                .run_until(drain, async move {
                    // A dropped sender (the federation is gone) stops the fetcher too.
                    let _ = stopped.await;
                })
                .instrument(span),
        );
        let mut running = self.lock();
        if running.contains_key(&td) {
            task.abort();
            return Err(FederationError::AlreadyRunning(td));
        }
        running.insert(td, Running { stop, task });
        Ok(())
    }

    /// Terminates the relationship with `trust_domain` (FED §6.3): stops polling, then
    /// deletes its bundle from the trust store and the store, and its status. Returns
    /// whether it was running; an unknown trust domain is left untouched.
    pub async fn remove(&self, trust_domain: &TrustDomain) -> Result<bool, FederationError> {
        let Some(running) = self.lock().remove(trust_domain) else {
            return Ok(false);
        };
        // The fetcher may have finished already (drain); then there is nobody to tell.
        let _ = running.stop.send(());
        if let Err(error) = running.task.await {
            warn!(trust_domain = %trust_domain, %error, "federation fetcher task failed");
        }
        self.ctx
            .store
            .remove_federated(trust_domain)
            .map_err(|source| FederationError::Store {
                trust_domain: trust_domain.clone(),
                source,
            })?;
        self.ctx.trust.remove(trust_domain);
        self.ctx.status.remove(trust_domain);
        self.ctx.metrics.forget(trust_domain);
        info!(trust_domain = %trust_domain, "federation terminated; bundle removed");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use isthmus_core::CertificateAuthority;
    use isthmus_core::ca::DEFAULT_CA_TTL;
    use isthmus_core::lifecycle::DrainTrigger;
    use tokio::time::Instant;

    use super::*;
    use crate::store::StoredBundle;

    /// An in-memory bundle store that can be told to fail writes.
    #[derive(Debug, Default)]
    struct MemoryStore {
        bundles: Mutex<BTreeMap<TrustDomain, StoredBundle>>,
        fail_saves: std::sync::atomic::AtomicBool,
        saves: std::sync::atomic::AtomicUsize,
    }

    impl FederatedBundleStore for MemoryStore {
        fn load_federated(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, StoreError> {
            Ok(self.bundles.lock().unwrap().get(td).cloned())
        }

        fn save_federated(&self, bundle: &Bundle, at: OffsetDateTime) -> Result<(), StoreError> {
            if self.fail_saves.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Corrupt {
                    what: "test".into(),
                    message: "disk full".into(),
                });
            }
            self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.bundles.lock().unwrap().insert(
                bundle.trust_domain().clone(),
                StoredBundle {
                    bundle: bundle.clone(),
                    fetched_at: at,
                },
            );
            Ok(())
        }

        fn remove_federated(&self, td: &TrustDomain) -> Result<(), StoreError> {
            self.bundles.lock().unwrap().remove(td);
            Ok(())
        }
    }

    impl MemoryStore {
        fn get(&self, td: &TrustDomain) -> Option<Bundle> {
            self.bundles
                .lock()
                .unwrap()
                .get(td)
                .map(|s| s.bundle.clone())
        }
    }

    /// Answers from a script; records when it was asked.
    #[derive(Debug, Default)]
    struct ScriptedTransport {
        answers: Mutex<VecDeque<Result<Bytes, FederationError>>>,
        fallback: Mutex<Option<Bytes>>,
        calls: Mutex<Vec<Instant>>,
    }

    impl ScriptedTransport {
        fn push(&self, answer: Result<Bytes, FederationError>) {
            self.answers.lock().unwrap().push_back(answer);
        }

        fn calls(&self) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            let Some(first) = calls.first().copied() else {
                return vec![];
            };
            calls.iter().map(|c| *c - first).collect()
        }
    }

    impl BundleTransport for ScriptedTransport {
        fn get<'a>(&'a self, url: &'a Uri, _tls: Arc<ClientConfig>) -> TransportFuture<'a> {
            self.calls.lock().unwrap().push(Instant::now());
            let answer = self.answers.lock().unwrap().pop_front();
            let answer = answer.unwrap_or_else(|| match self.fallback.lock().unwrap().clone() {
                Some(body) => Ok(body),
                None => Err(FederationError::HttpStatus {
                    url: url.to_string(),
                    status: 503,
                }),
            });
            Box::pin(async move { answer })
        }
    }

    struct Fixture {
        east: CertificateAuthority,
        trust: TrustStore,
        store: Arc<MemoryStore>,
        transport: Arc<ScriptedTransport>,
        ctx: FederationContext,
    }

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn fixture() -> Fixture {
        let east = CertificateAuthority::generate(
            td("east.example"),
            OffsetDateTime::now_utc(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        let trust = TrustStore::default();
        let store = Arc::new(MemoryStore::default());
        let transport = Arc::new(ScriptedTransport::default());
        let settings = FetchSettings {
            min_refresh: Duration::from_secs(10),
            max_refresh: Duration::from_secs(600),
            ..FetchSettings::default()
        };
        let mut ctx = FederationContext::new(trust.clone(), store.clone(), settings);
        ctx.transport = transport.clone();
        Fixture {
            east,
            trust,
            store,
            transport,
            ctx,
        }
    }

    impl Fixture {
        fn bundle(&self, sequence: u64, hint: Option<u64>) -> Bundle {
            let mut bundle = self.east.bundle();
            bundle.set_sequence(Some(sequence));
            bundle.set_refresh_hint(hint.map(Duration::from_secs));
            bundle
        }

        fn relationship(&self, initial: Option<&Bundle>) -> FederatedTrustDomain {
            FederatedTrustDomain {
                trust_domain: td("east.example"),
                bundle_endpoint_url: "https://127.0.0.1:8443/".into(),
                bundle_endpoint_profile: BundleEndpointProfile::HttpsSpiffe {
                    endpoint_spiffe_id: SpiffeId::parse(
                        "spiffe://east.example/isthmus/bundle-endpoint",
                    )
                    .unwrap(),
                },
                trust_domain_bundle: initial.map(|b| b.to_json().unwrap()),
            }
        }

        fn fetcher(&self, initial: &Bundle) -> BundleFetcher {
            BundleFetcher::new(self.relationship(Some(initial)), self.ctx.clone()).unwrap()
        }
    }

    fn json(bundle: &Bundle) -> Result<Bytes, FederationError> {
        Ok(Bytes::from(bundle.to_json().unwrap()))
    }

    #[test]
    fn refresh_interval_is_the_clamped_hint() {
        let settings = FetchSettings {
            min_refresh: Duration::from_secs(10),
            max_refresh: Duration::from_secs(600),
            ..FetchSettings::default()
        };
        let mut bundle = Bundle::new(td("east.example"));
        assert_eq!(settings.refresh_interval(None), DEFAULT_REFRESH_HINT);
        assert_eq!(
            settings.refresh_interval(Some(&bundle)),
            DEFAULT_REFRESH_HINT
        );
        bundle.set_refresh_hint(Some(Duration::from_secs(0)));
        assert_eq!(
            settings.refresh_interval(Some(&bundle)),
            Duration::from_secs(10)
        );
        bundle.set_refresh_hint(Some(Duration::from_secs(60)));
        assert_eq!(
            settings.refresh_interval(Some(&bundle)),
            Duration::from_secs(60)
        );
        bundle.set_refresh_hint(Some(Duration::from_secs(86_400)));
        assert_eq!(
            settings.refresh_interval(Some(&bundle)),
            Duration::from_secs(600)
        );
    }

    #[tokio::test]
    async fn bootstrap_prefers_the_persisted_bundle() {
        let f = fixture();
        let configured = f.bundle(1, None);
        let fetcher = f.fetcher(&configured);
        assert_eq!(fetcher.held(), Some(&configured));
        assert_eq!(
            f.trust.get(&td("east.example")).as_deref(),
            Some(&configured)
        );
        assert_eq!(f.store.get(&td("east.example")), Some(configured.clone()));

        let persisted = f.bundle(5, None);
        f.store
            .save_federated(&persisted, OffsetDateTime::now_utc())
            .unwrap();
        let fetcher = f.fetcher(&configured);
        assert_eq!(fetcher.held(), Some(&persisted));
        assert_eq!(
            f.trust.get(&td("east.example")).as_deref(),
            Some(&persisted)
        );
        let status = f.ctx.status.get(&td("east.example")).unwrap();
        assert_eq!(status.sequence, Some(5));
        assert_eq!(status.profile, "https_spiffe");
    }

    #[test]
    fn bad_configuration_is_refused_by_field() {
        let f = fixture();
        let mut relationship = f.relationship(None);
        relationship.trust_domain_bundle = Some("{".into());
        let err = BundleFetcher::new(relationship.clone(), f.ctx.clone()).unwrap_err();
        assert_eq!(err.reason(), "config");
        assert!(err.to_string().contains("east.example"), "{err}");
        relationship.trust_domain_bundle = None;
        relationship.bundle_endpoint_url = "http://127.0.0.1/".into();
        let err = BundleFetcher::new(relationship, f.ctx.clone()).unwrap_err();
        assert!(err.to_string().contains("http://127.0.0.1/"), "{err}");
    }

    #[tokio::test]
    async fn accept_rules_keep_the_last_good_bundle() {
        let f = fixture();
        let initial = f.bundle(3, None);
        let mut fetcher = f.fetcher(&initial);
        let east = td("east.example");

        // Identical → unchanged, no rewrite.
        let saves = f.store.saves.load(std::sync::atomic::Ordering::SeqCst);
        f.transport.push(json(&initial));
        assert_eq!(
            fetcher.fetch_once().await.unwrap(),
            FetchOutcome::Unchanged { sequence: Some(3) }
        );
        assert_eq!(
            f.store.saves.load(std::sync::atomic::Ordering::SeqCst),
            saves
        );

        let other_ca = CertificateAuthority::generate(
            td("west.example"),
            OffsetDateTime::now_utc(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        let mut foreign =
            Bundle::with_x509_authorities(east.clone(), vec![other_ca.certificate().clone()]);
        foreign.set_sequence(Some(9));
        let mut reused = f.bundle(3, None);
        let second_east =
            CertificateAuthority::generate(east.clone(), OffsetDateTime::now_utc(), DEFAULT_CA_TTL)
                .unwrap();
        reused.add_x509_authority(second_east.certificate().clone());
        let faults: Vec<(Result<Bytes, FederationError>, &str)> = vec![
            (Ok(Bytes::from_static(b"<html>")), "malformed"),
            (Ok(Bytes::from_static(b"{\"keys\":{}}")), "malformed"),
            (json(&foreign), "wrong_trust_domain"),
            (json(&f.bundle(2, None)), "stale_sequence"),
            (json(&reused), "sequence_reused"),
        ];
        let mut seen = Vec::new();
        for (count, (answer, reason)) in faults.into_iter().enumerate() {
            f.transport.push(answer);
            let err = fetcher.fetch_once().await.unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
            assert_eq!(f.trust.get(&east).as_deref(), Some(&initial));
            assert_eq!(f.store.get(&east), Some(initial.clone()));
            let status = f.ctx.status.get(&east).unwrap();
            assert_eq!(status.last_error_reason.as_deref(), Some(reason));
            assert_eq!(
                status.consecutive_failures,
                u32::try_from(count + 1).unwrap()
            );
            assert_eq!(status.sequence, Some(3));
            seen.push(reason);
            let times = seen.iter().filter(|r| **r == reason).count();
            assert_eq!(f.ctx.metrics.fetches_with(&east, reason), times as u64);
        }

        // A store failure publishes nothing.
        f.store
            .fail_saves
            .store(true, std::sync::atomic::Ordering::SeqCst);
        f.transport.push(json(&f.bundle(4, None)));
        assert_eq!(fetcher.fetch_once().await.unwrap_err().reason(), "store");
        assert_eq!(f.trust.get(&east).as_deref(), Some(&initial));
        f.store
            .fail_saves
            .store(false, std::sync::atomic::Ordering::SeqCst);

        // A higher sequence is stored, then published; the status clears.
        let next = f.bundle(4, Some(60));
        f.transport.push(json(&next));
        assert_eq!(
            fetcher.fetch_once().await.unwrap(),
            FetchOutcome::Updated {
                previous: Some(3),
                sequence: Some(4)
            }
        );
        assert_eq!(f.trust.get(&east).as_deref(), Some(&next));
        assert_eq!(f.store.get(&east), Some(next.clone()));
        let status = f.ctx.status.get(&east).unwrap();
        assert_eq!(status.last_error_reason, None);
        assert_eq!(status.consecutive_failures, 0);
        assert_eq!(status.sequence, Some(4));
        assert!(status.last_success.is_some());

        // Empty keys: the foreign domain revoked everything; honoured.
        let mut revoked = Bundle::new(east.clone());
        revoked.set_sequence(Some(5));
        f.transport.push(json(&revoked));
        fetcher.fetch_once().await.unwrap();
        let held = f.trust.get(&east).unwrap();
        assert!(held.is_empty());
        assert_eq!(held.sequence(), Some(5));
    }

    #[tokio::test(start_paused = true)]
    async fn polls_at_the_clamped_hint_and_retries_without_hurry() {
        let f = fixture();
        // Hint 1 s is below the 10 s floor.
        let initial = f.bundle(1, Some(1));
        let fetcher = f.fetcher(&initial);
        *f.transport.fallback.lock().unwrap() = Some(json(&initial).unwrap());
        f.transport.push(Err(FederationError::HttpStatus {
            url: "https://127.0.0.1:8443/".into(),
            status: 500,
        }));
        // Second fetch: hint 120 s from now on.
        let slower = f.bundle(2, Some(120));
        f.transport.push(json(&slower));
        *f.transport.fallback.lock().unwrap() = Some(json(&slower).unwrap());

        let (trigger, drain) = DrainTrigger::new();
        let task = tokio::spawn(fetcher.run(drain));
        tokio::time::sleep(Duration::from_secs(400)).await;
        assert_eq!(
            f.transport.calls(),
            [0, 10, 130, 250, 370].map(Duration::from_secs).to_vec()
        );
        let status = f.ctx.status.get(&td("east.example")).unwrap();
        assert_eq!(status.sequence, Some(2));
        assert!(status.next_fetch.is_some());
        assert_eq!(
            trigger.drain(Duration::from_secs(1)).await,
            isthmus_core::lifecycle::DrainOutcome::Complete
        );
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn remove_terminates_the_relationship() {
        let f = fixture();
        let initial = f.bundle(1, Some(60));
        *f.transport.fallback.lock().unwrap() = Some(json(&initial).unwrap());
        let federation = Federation::new(f.ctx.clone());
        let (_trigger, drain) = DrainTrigger::new();
        federation
            .start(f.relationship(Some(&initial)), drain.clone())
            .unwrap();
        let again = federation.start(f.relationship(Some(&initial)), drain);
        assert!(matches!(again, Err(FederationError::AlreadyRunning(_))));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let east = td("east.example");
        assert!(f.trust.get(&east).is_some());
        assert_eq!(federation.trust_domains(), vec![east.clone()]);

        assert!(federation.remove(&east).await.unwrap());
        assert!(f.trust.get(&east).is_none());
        assert!(f.store.get(&east).is_none());
        assert!(federation.status().get(&east).is_none());
        let calls = f.transport.calls().len();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(f.transport.calls().len(), calls, "fetcher kept polling");
        assert!(!federation.remove(&east).await.unwrap());
    }

    #[test]
    fn redirects_must_stay_on_https() {
        let base: Uri = "https://127.0.0.1:8443/a".parse().unwrap();
        assert_eq!(
            resolve_redirect(&base, "/b").unwrap().to_string(),
            "https://127.0.0.1:8443/b"
        );
        assert_eq!(
            resolve_redirect(&base, "https://127.0.0.1:9443/c")
                .unwrap()
                .to_string(),
            "https://127.0.0.1:9443/c"
        );
        for bad in [
            "http://127.0.0.1/",
            "//evil.example/",
            "relative",
            "https://u@h/",
        ] {
            let err = resolve_redirect(&base, bad).unwrap_err();
            assert_eq!(err.reason(), "redirect", "{bad}: {err}");
        }
    }
}
