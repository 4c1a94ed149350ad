//! The SPIFFE bundle endpoint (SPIFFE Federation §4–5): an HTTPS server answering `GET /` with
//! this trust domain's bundle as SPIFFE bundle JSON, so other trust domains can federate with
//! us.
//!
//! Behaviour follows SPIRE's bundle endpoint: only `GET /` (405 for other methods on `/`, 404
//! for other paths), `Content-Type: application/json`, no client authentication (FED §5: a
//! bundle endpoint MUST NOT require it). Two profiles: `https_spiffe` serves the
//! bundle-endpoint SVID from an [`SvidSource`], rotated in place; `https_web` serves a
//! configured certificate and key.
//!
//! The bundle arrives on a `watch` channel; its JSON is cached and serialized again only when
//! a different bundle is published, so a request costs a pointer comparison and a copy of a
//! reference-counted buffer.

use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use isthmus_core::bundle::BundleError;
use isthmus_core::id::IdError;
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_core::tls::{self, SvidCertResolver};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// The path of the bundle-endpoint SVID under the trust domain:
/// `spiffe://<td>/isthmus/bundle-endpoint`.
pub const BUNDLE_ENDPOINT_PATH: [&str; 2] = ["isthmus", "bundle-endpoint"];

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait before accepting again after `accept` failed (for example out of file
/// descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The SPIFFE ID the bundle endpoint presents under the `https_spiffe` profile.
pub fn bundle_endpoint_id(trust_domain: &TrustDomain) -> Result<SpiffeId, IdError> {
    trust_domain.workload_id(&BUNDLE_ENDPOINT_PATH)
}

/// Why the bundle endpoint could not be set up or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// rustls refused the TLS configuration (for `https_web`: a key that does not match the
    /// certificate, an unsupported key type).
    #[error("cannot build the bundle endpoint TLS configuration ({profile}): {source}")]
    Tls {
        /// `https_spiffe` or `https_web`.
        profile: &'static str,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The `https_web` certificate chain is empty.
    #[error("https_web profile needs at least one certificate; the configured chain is empty")]
    EmptyChain,
    /// The listener's address cannot be read.
    #[error("cannot read the bundle endpoint listener address: {0}")]
    Listener(#[source] std::io::Error),
}

/// How the bundle endpoint authenticates itself to clients (SPIFFE Federation §5).
pub enum EndpointIdentity {
    /// `https_spiffe`: the bundle-endpoint X509-SVID (`spiffe://<td>/isthmus/bundle-endpoint`),
    /// read from the source on every handshake so rotation needs no restart.
    Spiffe(SvidSource),
    /// `https_web`: a certificate (leaf first) and key from a Web PKI CA.
    Web {
        /// The certificate chain, leaf first.
        chain: Vec<CertificateDer<'static>>,
        /// The leaf's private key.
        key: PrivateKeyDer<'static>,
    },
}

impl EndpointIdentity {
    /// `https_spiffe` or `https_web`.
    pub fn profile(&self) -> &'static str {
        match self {
            Self::Spiffe(_) => "https_spiffe",
            Self::Web { .. } => "https_web",
        }
    }
}

impl fmt::Debug for EndpointIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spiffe(source) => f
                .debug_tuple("Spiffe")
                .field(&source.current().svid.id())
                .finish(),
            // Never print the key.
            Self::Web { chain, .. } => f
                .debug_struct("Web")
                .field("certificates", &chain.len())
                .finish_non_exhaustive(),
        }
    }
}

/// The TLS server configuration of the bundle endpoint: TLS 1.2 and 1.3 (Mozilla
/// "intermediate", FED §5), ALPN `http/1.1`, no client authentication.
pub fn server_config(identity: EndpointIdentity) -> Result<ServerConfig, EndpointError> {
    let profile = identity.profile();
    let tls_err = |source| EndpointError::Tls { profile, source };
    let builder = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?
        .with_no_client_auth();
    let mut config = match identity {
        EndpointIdentity::Spiffe(source) => {
            builder.with_cert_resolver(Arc::new(SvidCertResolver::new(source)))
        }
        EndpointIdentity::Web { chain, key } => {
            if chain.is_empty() {
                return Err(EndpointError::EmptyChain);
            }
            builder.with_single_cert(chain, key).map_err(tls_err)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Labels of [`EndpointMetrics::requests`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP status code answered.
    pub status: u16,
}

/// The bundle endpoint's metrics, registered as `isthmus_bundle_endpoint_*`.
#[derive(Debug, Clone, Default)]
pub struct EndpointMetrics {
    /// Requests answered, by status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Connections that failed or timed out in the TLS handshake.
    pub handshake_failures: Counter,
    /// Times the bundle was serialized (once per published bundle when the cache works).
    pub serializations: Counter,
}

impl EndpointMetrics {
    /// Metrics registered in the process registry under `bundle_endpoint`.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry("bundle_endpoint");
        sub.register(
            "requests",
            "Bundle endpoint requests answered, by HTTP status",
            metrics.requests.clone(),
        );
        sub.register(
            "handshake_failures",
            "Bundle endpoint connections that failed the TLS handshake",
            metrics.handshake_failures.clone(),
        );
        sub.register(
            "serializations",
            "Times the served bundle was serialized to JSON",
            metrics.serializations.clone(),
        );
        metrics
    }

    /// Requests answered with `status` so far.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.requests.get_or_create(&RequestLabels { status }).get()
    }
}

/// The serialized form of the last bundle seen, keyed by the `Arc` that was published.
struct CachedDocument {
    bundle: Arc<Bundle>,
    json: Result<Bytes, BundleError>,
}

/// What every connection shares: the bundle channel, its cached JSON, metrics.
struct Shared {
    bundle: watch::Receiver<Arc<Bundle>>,
    cache: RwLock<Option<CachedDocument>>,
    metrics: EndpointMetrics,
}

impl Shared {
    /// The JSON of the current bundle, serialized once per published bundle.
    fn document(&self) -> Result<Bytes, BundleError> {
        let current = self.bundle.borrow().clone();
        {
            let cache = self.cache.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(cached) = cache.as_ref()
                && Arc::ptr_eq(&cached.bundle, &current)
            {
                return cached.json.clone();
            }
        }
        let json = current.to_json().map(Bytes::from);
        self.metrics.serializations.inc();
        match &json {
            Ok(_) => debug!(
                trust_domain = %current.trust_domain(),
                sequence = ?current.sequence(),
                "serialized bundle for the bundle endpoint"
            ),
            Err(error) => warn!(
                trust_domain = %current.trust_domain(),
                %error,
                "cannot serialize the bundle; answering 500"
            ),
        }
        let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
        *cache = Some(CachedDocument {
            bundle: current,
            json: json.clone(),
        });
        json
    }

    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let (status, body) = if path != "/" {
            (StatusCode::NOT_FOUND, Bytes::new())
        } else if method != Method::GET {
            (StatusCode::METHOD_NOT_ALLOWED, Bytes::new())
        } else {
            match self.document() {
                Ok(json) => (StatusCode::OK, json),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
            }
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        match status {
            StatusCode::OK => {
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            _ => {}
        }
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                status: status.as_u16(),
            })
            .inc();
        debug!(%method, path, status = status.as_u16(), "bundle endpoint request");
        response
    }
}

/// The bundle endpoint server: serves the latest bundle published on its channel.
pub struct BundleEndpoint {
    acceptor: TlsAcceptor,
    profile: &'static str,
    shared: Arc<Shared>,
}

impl fmt::Debug for BundleEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleEndpoint")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl BundleEndpoint {
    /// An endpoint presenting `identity` and serving whatever `bundle` holds at request time
    /// (the bundle already carries `spiffe_sequence` and `spiffe_refresh_hint`).
    pub fn new(
        identity: EndpointIdentity,
        bundle: watch::Receiver<Arc<Bundle>>,
        metrics: EndpointMetrics,
    ) -> Result<Self, EndpointError> {
        let profile = identity.profile();
        let config = server_config(identity)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            profile,
            shared: Arc::new(Shared {
                bundle,
                cache: RwLock::new(None),
                metrics,
            }),
        })
    }

    /// Serves on `listener` until `drain` signals: then stops accepting, lets every in-flight
    /// request finish (idle keep-alive connections close at once) and returns when the last
    /// connection is done, or abandons them when the drain is forced.
    pub async fn serve(
        self,
        listener: TcpListener,
        drain: DrainWatch,
    ) -> Result<(), EndpointError> {
        let local = listener.local_addr().map_err(EndpointError::Listener)?;
        info!(address = %local, profile = self.profile, "bundle endpoint listening");
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let connection = Connection {
                            acceptor: self.acceptor.clone(),
                            shared: self.shared.clone(),
                            drain: drain.clone(),
                        };
                        connections.spawn(
                            connection
                                .run(tcp)
                                .instrument(info_span!("bundle_endpoint_connection", %peer)),
                        );
                    }
                    Err(error) => {
                        warn!(address = %local, %error, "bundle endpoint accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                // Reap finished connections so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(listener);
        info!(
            address = %local,
            in_flight = connections.len(),
            "bundle endpoint stopped accepting; draining connections"
        );
        while connections.join_next().await.is_some() {}
        info!(address = %local, "bundle endpoint drained");
        Ok(())
    }
}

/// One accepted connection: TLS handshake, then HTTP/1.1 until the client leaves or the drain.
struct Connection {
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    drain: DrainWatch,
}

impl Connection {
    async fn run(self, tcp: TcpStream) {
        let tls = tokio::select! {
            handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)) => {
                match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        self.shared.metrics.handshake_failures.inc();
                        debug!(%error, "bundle endpoint TLS handshake failed");
                        return;
                    }
                    Err(_elapsed) => {
                        self.shared.metrics.handshake_failures.inc();
                        debug!(timeout = ?HANDSHAKE_TIMEOUT, "bundle endpoint TLS handshake timed out");
                        return;
                    }
                }
            }
            () = self.drain.signaled() => return,
        };
        let shared = self.shared.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = shared.respond(request.method(), request.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.drain.signaled() => {
                // Finish the request in flight, then close; idle connections close now.
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    result = connection.as_mut() => result,
                    () = self.drain.forced() => {
                        debug!("drain forced; abandoning bundle endpoint connection");
                        return;
                    }
                }
            }
        };
        if let Err(error) = result {
            debug!(%error, "bundle endpoint connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(bundle: Bundle) -> (watch::Sender<Arc<Bundle>>, Shared) {
        let (tx, rx) = watch::channel(Arc::new(bundle));
        let shared = Shared {
            bundle: rx,
            cache: RwLock::new(None),
            metrics: EndpointMetrics::default(),
        };
        (tx, shared)
    }

    #[test]
    fn routes_like_spire() {
        let td = TrustDomain::new("east.example").unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.set_sequence(Some(7));
        bundle.set_refresh_hint(Some(Duration::from_secs(60)));
        let (_tx, shared) = shared(bundle);
        let ok = shared.respond(&Method::GET, "/");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            shared.respond(&Method::POST, "/").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            shared.respond(&Method::GET, "/bundle").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(shared.metrics.requests_with_status(200), 1);
        assert_eq!(shared.metrics.requests_with_status(405), 1);
        assert_eq!(shared.metrics.requests_with_status(404), 1);
    }

    #[test]
    fn serializes_once_per_published_bundle() {
        let td = TrustDomain::new("east.example").unwrap();
        let mut bundle = Bundle::new(td.clone());
        bundle.set_sequence(Some(1));
        let (tx, shared) = shared(bundle.clone());
        for _ in 0..5 {
            let json = shared.document().unwrap();
            let parsed = Bundle::parse_json(td.clone(), &json).unwrap();
            assert_eq!(parsed.sequence(), Some(1));
        }
        assert_eq!(shared.metrics.serializations.get(), 1);
        bundle.set_sequence(Some(2));
        tx.send_replace(Arc::new(bundle));
        let json = shared.document().unwrap();
        assert_eq!(Bundle::parse_json(td, &json).unwrap().sequence(), Some(2));
        shared.document().unwrap();
        assert_eq!(shared.metrics.serializations.get(), 2);
    }

    #[test]
    fn bundle_endpoint_id_has_the_isthmus_path() {
        let td = TrustDomain::new("east.example").unwrap();
        assert_eq!(
            bundle_endpoint_id(&td).unwrap().as_str(),
            "spiffe://east.example/isthmus/bundle-endpoint"
        );
    }

    #[test]
    fn web_identity_needs_a_certificate() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let err = server_config(EndpointIdentity::Web { chain: vec![], key }).unwrap_err();
        assert!(matches!(err, EndpointError::EmptyChain), "{err}");
    }
}
