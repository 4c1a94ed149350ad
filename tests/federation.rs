//! SPIFFE federation over real sockets on 127.0.0.1: the bundle endpoint (`https_spiffe` and
//! `https_web`) served to a fetcher of another trust domain, then every fault the fetcher must
//! survive without replacing the last good bundle (garbage, a bundle of another trust domain,
//! a lower sequence, HTTP 500, TLS failures, a slow endpoint, the wrong SPIFFE ID), each
//! asserted in the trust store, in the durable store and in the status board.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::lifecycle::{DrainOutcome, DrainTrigger};
use isthmus_core::tls::{self, AllowIds, SpiffeServerCertVerifier};
use isthmus_core::verify::{SvidUsage, VerifyError, verify_svid_chain};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore};
use isthmus_trust_broker::endpoint::{
    BundleEndpoint, EndpointError, EndpointIdentity, EndpointMetrics, bundle_endpoint_id,
    server_config,
};
use isthmus_trust_broker::federation::{
    BundleFetcher, Federation, FederationContext, FetchOutcome, FetchSettings,
};
use isthmus_trust_broker::model::{BundleEndpointProfile, FederatedTrustDomain, FederationStatus};
use isthmus_trust_broker::store::{BrokerStore, FederatedBundleStore};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const EAST: &str = "east.example";
const WEST: &str = "west.example";

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn east_ca() -> CertificateAuthority {
    CertificateAuthority::generate(td(EAST), now(), DEFAULT_CA_TTL).unwrap()
}

fn endpoint_id() -> SpiffeId {
    bundle_endpoint_id(&td(EAST)).unwrap()
}

/// `ca`'s bundle at `sequence`, hinting a refresh every `hint` seconds.
fn bundle_of(cas: &[&CertificateAuthority], sequence: u64, hint: u64) -> Bundle {
    let mut bundle = Bundle::with_x509_authorities(
        cas[0].trust_domain().clone(),
        cas.iter().map(|ca| ca.certificate().clone()).collect(),
    );
    bundle.set_sequence(Some(sequence));
    bundle.set_refresh_hint(Some(Duration::from_secs(hint)));
    bundle
}

fn svid_source(ca: &CertificateAuthority, id: &SpiffeId) -> SvidSource {
    SvidSource::new(ca.issue_svid(id, DEFAULT_LEAF_TTL, now()).unwrap()).unwrap()
}

/// A bundle endpoint served on 127.0.0.1 port 0.
struct RunningEndpoint {
    addr: SocketAddr,
    bundle: watch::Sender<Arc<Bundle>>,
    metrics: EndpointMetrics,
    drain: DrainTrigger,
    task: JoinHandle<Result<(), EndpointError>>,
}

impl RunningEndpoint {
    async fn start(identity: EndpointIdentity, bundle: Bundle) -> Self {
        let (tx, rx) = watch::channel(Arc::new(bundle));
        let metrics = EndpointMetrics::default();
        let endpoint = BundleEndpoint::new(identity, rx, metrics.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (drain, watch) = DrainTrigger::new();
        let task = tokio::spawn(endpoint.serve(listener, watch));
        Self {
            addr,
            bundle: tx,
            metrics,
            drain,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }

    fn publish(&self, bundle: Bundle) {
        self.bundle.send_replace(Arc::new(bundle));
    }
}

/// What a [`FakeEndpoint`] answers.
#[derive(Clone)]
struct Canned {
    status: StatusCode,
    body: Bytes,
    delay: Duration,
    location: Option<String>,
}

impl Canned {
    fn ok(body: impl Into<Bytes>) -> Self {
        Self {
            status: StatusCode::OK,
            body: body.into(),
            delay: Duration::ZERO,
            location: None,
        }
    }
}

/// A purpose-built HTTPS server on 127.0.0.1 answering every request with a canned reply,
/// presenting whatever TLS configuration it is given.
struct FakeEndpoint {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeEndpoint {
    async fn start(tls: rustls::ServerConfig, reply: Canned) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let reply = Arc::new(Mutex::new(reply));
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let reply = reply.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |_request: Request<Incoming>| {
                        let canned = reply.lock().unwrap().clone();
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(canned.delay).await;
                            let mut response = Response::new(Full::new(canned.body));
                            *response.status_mut() = canned.status;
                            if let Some(location) = canned.location {
                                response
                                    .headers_mut()
                                    .insert(http::header::LOCATION, location.parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}/", self.addr)
    }
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fetching side (west): a live trust store and a sled store in a private directory.
struct West {
    trust: TrustStore,
    store: Arc<BrokerStore>,
    dir: PathBuf,
    ctx: FederationContext,
}

impl West {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("isthmus-federation-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self::with_settings(
            dir,
            FetchSettings {
                timeout: Duration::from_secs(5),
                ..FetchSettings::default()
            },
        )
    }

    fn with_settings(dir: PathBuf, settings: FetchSettings) -> Self {
        let trust = TrustStore::default();
        let store = Arc::new(BrokerStore::open(&dir).unwrap());
        let ctx = FederationContext::new(trust.clone(), store.clone(), settings);
        Self {
            trust,
            store,
            dir,
            ctx,
        }
    }

    /// The same fetching side with other limits (the store and trust store are kept).
    fn set_settings(&mut self, settings: FetchSettings) {
        let status = self.ctx.status.clone();
        self.ctx = FederationContext::new(self.trust.clone(), self.store.clone(), settings);
        self.ctx.status = status;
    }

    fn fetcher(&self, relationship: FederatedTrustDomain) -> BundleFetcher {
        BundleFetcher::new(relationship, self.ctx.clone()).unwrap()
    }

    fn status(&self) -> FederationStatus {
        self.ctx.status.get(&td(EAST)).unwrap()
    }

    fn held(&self) -> Option<Bundle> {
        self.trust.get(&td(EAST)).map(|b| Bundle::clone(&b))
    }

    fn stored(&self) -> Option<Bundle> {
        self.store
            .load_federated(&td(EAST))
            .unwrap()
            .map(|s| s.bundle)
    }
}

impl Drop for West {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spiffe_relationship(url: String, initial: Option<&Bundle>) -> FederatedTrustDomain {
    FederatedTrustDomain {
        trust_domain: td(EAST),
        bundle_endpoint_url: url,
        bundle_endpoint_profile: BundleEndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: endpoint_id(),
        },
        trust_domain_bundle: initial.map(|b| b.to_json().unwrap()),
    }
}

fn web_relationship(url: String) -> FederatedTrustDomain {
    FederatedTrustDomain {
        trust_domain: td(EAST),
        bundle_endpoint_url: url,
        bundle_endpoint_profile: BundleEndpointProfile::HttpsWeb,
        trust_domain_bundle: None,
    }
}

fn east_svid_verifies(trust: &TrustStore, ca: &CertificateAuthority) -> Result<(), VerifyError> {
    let id = SpiffeId::parse("spiffe://east.example/ns/demo/sa/server").unwrap();
    let svid = ca.issue_svid(&id, DEFAULT_LEAF_TTL, now()).unwrap();
    verify_svid_chain(
        svid.chain(),
        &trust.snapshot(),
        UnixTime::now(),
        SvidUsage::Any,
    )
    .map(|_| ())
}

#[tokio::test]
async fn https_spiffe_endpoint_feeds_a_fetcher_and_changes_are_picked_up() {
    let east = east_ca();
    let initial = bundle_of(&[&east], 1, 60);
    let endpoint_svid = svid_source(&east, &endpoint_id());
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(endpoint_svid.clone()),
        initial.clone(),
    )
    .await;
    let west = West::new("happy");
    let mut fetcher = west.fetcher(spiffe_relationship(endpoint.url(), Some(&initial)));
    assert_eq!(west.held(), Some(initial.clone()));

    // The endpoint serves exactly what west was bootstrapped with.
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Unchanged { sequence: Some(1) }
    );
    east_svid_verifies(&west.trust, &east).unwrap();

    // East adds a second root (sequence 2): picked up on the next fetch, stored, verifiable.
    let next_root = east_ca();
    let rotated = bundle_of(&[&east, &next_root], 2, 60);
    endpoint.publish(rotated.clone());
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Updated {
            previous: Some(1),
            sequence: Some(2)
        }
    );
    assert_eq!(west.held(), Some(rotated.clone()));
    assert_eq!(west.stored(), Some(rotated.clone()));
    east_svid_verifies(&west.trust, &next_root).unwrap();
    east_svid_verifies(&west.trust, &east).unwrap();
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Unchanged { sequence: Some(2) }
    );

    // The endpoint's SVID rotates in place to one signed by the new root: a self-serving
    // endpoint is authenticated with the latest fetched bundle, not the initial one.
    endpoint_svid
        .rotate(
            next_root
                .issue_svid(&endpoint_id(), DEFAULT_LEAF_TTL, now())
                .unwrap(),
        )
        .unwrap();
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Unchanged { sequence: Some(2) }
    );

    let status = west.status();
    assert_eq!(status.sequence, Some(2));
    assert_eq!(status.x509_authorities, 2);
    assert_eq!(status.last_error_reason, None);
    assert!(status.last_success.is_some());
    assert_eq!(endpoint.metrics.requests_with_status(200), 4);
    assert_eq!(
        endpoint.metrics.serializations.get(),
        2,
        "JSON is cached per bundle"
    );

    // A fresh fetcher (a restarted broker) starts from the persisted bundle, not the config.
    let restarted = west.fetcher(spiffe_relationship(endpoint.url(), Some(&initial)));
    assert_eq!(restarted.held(), Some(&rotated));
}

/// A Web PKI CA and a server certificate for `localhost` and 127.0.0.1 (URLs use the IP so
/// nothing resolves to another address), signed by it.
struct WebPki {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn web_pki(names: &[&str]) -> WebPki {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Isthmus test web CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, names[0].to_owned());
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    WebPki {
        roots,
        chain: vec![leaf_cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

#[tokio::test]
async fn https_web_endpoint_is_verified_against_configured_roots() {
    let east = east_ca();
    let served = bundle_of(&[&east], 3, 60);
    let pki = web_pki(&["localhost", "127.0.0.1"]);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Web {
            chain: pki.chain.clone(),
            key: pki.key.clone_key(),
        },
        served.clone(),
    )
    .await;

    // Default roots (webpki-roots) do not know the test CA: a TLS failure, nothing held.
    let west = West::new("web-default-roots");
    let mut fetcher = west.fetcher(web_relationship(endpoint.url()));
    let err = fetcher.fetch_once().await.unwrap_err();
    assert_eq!(err.reason(), "tls", "{err}");
    assert_eq!(west.held(), None);
    assert_eq!(west.status().last_error_reason.as_deref(), Some("tls"));

    // With the test root configured, the first fetch bootstraps the domain.
    let mut west = West::new("web");
    west.set_settings(FetchSettings {
        web_roots: Arc::new(pki.roots.clone()),
        ..FetchSettings::default()
    });
    let mut fetcher = west.fetcher(web_relationship(endpoint.url()));
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Updated {
            previous: None,
            sequence: Some(3)
        }
    );
    assert_eq!(west.held(), Some(served.clone()));
    assert_eq!(west.stored(), Some(served));
    east_svid_verifies(&west.trust, &east).unwrap();
}

#[tokio::test]
async fn https_web_checks_the_host_name_and_profiles_never_fall_back() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    // A Web PKI certificate for another host name, from a trusted root.
    let pki = web_pki(&["bundles.east.example"]);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Web {
            chain: pki.chain.clone(),
            key: pki.key.clone_key(),
        },
        good.clone(),
    )
    .await;
    let mut west = West::new("web-hostname");
    west.set_settings(FetchSettings {
        web_roots: Arc::new(pki.roots.clone()),
        ..FetchSettings::default()
    });
    let err = west
        .fetcher(web_relationship(endpoint.url()))
        .fetch_once()
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "tls", "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // https_spiffe against a Web PKI certificate: refused, no fallback to Web PKI.
    let west = West::new("spiffe-vs-web");
    let status = assert_fault(&west, endpoint.url(), &good, "tls").await;
    assert!(
        status.last_error.unwrap().contains("not a valid X509-SVID"),
        "a Web PKI certificate is not an SVID"
    );

    // https_web against an SVID endpoint, even with the SPIFFE root among the web roots.
    let spiffe_endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &endpoint_id())),
        good.clone(),
    )
    .await;
    let mut roots = RootCertStore::empty();
    roots.add(east.certificate().clone()).unwrap();
    let mut west = West::new("web-vs-spiffe");
    west.set_settings(FetchSettings {
        web_roots: Arc::new(roots),
        ..FetchSettings::default()
    });
    let err = west
        .fetcher(web_relationship(spiffe_endpoint.url()))
        .fetch_once()
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "tls", "{err}");
}

/// West bootstrapped with east's `good` bundle fetches from `url` once: the fetch must fail
/// with `reason`, the good bundle must stay in the trust store and in the durable store, and
/// the status board must show the reason.
async fn assert_fault(west: &West, url: String, good: &Bundle, reason: &str) -> FederationStatus {
    let mut fetcher = west.fetcher(spiffe_relationship(url, Some(good)));
    let err = fetcher.fetch_once().await.unwrap_err();
    assert_eq!(err.reason(), reason, "{err}");
    assert_eq!(
        west.held().as_ref(),
        Some(good),
        "trust store kept the good bundle"
    );
    assert_eq!(
        west.stored().as_ref(),
        Some(good),
        "store kept the good bundle"
    );
    let status = west.status();
    assert_eq!(status.last_error_reason.as_deref(), Some(reason));
    assert_eq!(status.last_error, Some(err.to_string()));
    assert_eq!(status.consecutive_failures, 1);
    assert_eq!(status.sequence, good.sequence());
    assert_eq!(status.last_success, None);
    status
}

/// A fake endpoint presenting east's genuine bundle-endpoint SVID, answering `reply`.
async fn fake_east_endpoint(east: &CertificateAuthority, reply: Canned) -> FakeEndpoint {
    let tls = server_config(EndpointIdentity::Spiffe(svid_source(east, &endpoint_id()))).unwrap();
    FakeEndpoint::start(tls, reply).await
}

#[tokio::test]
async fn fault_garbage_is_malformed() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let fake = fake_east_endpoint(&east, Canned::ok("<html>maintenance</html>")).await;
    let status = assert_fault(&West::new("garbage"), fake.url(), &good, "malformed").await;
    assert!(status.last_error.unwrap().contains("east.example"));
}

#[tokio::test]
async fn fault_bundle_of_another_trust_domain() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let west_ca = CertificateAuthority::generate(td(WEST), now(), DEFAULT_CA_TTL).unwrap();
    let foreign = bundle_of(&[&west_ca], 6, 60);
    let fake = fake_east_endpoint(&east, Canned::ok(foreign.to_json().unwrap())).await;
    let status = assert_fault(
        &West::new("wrong-td"),
        fake.url(),
        &good,
        "wrong_trust_domain",
    )
    .await;
    assert!(status.last_error.unwrap().contains("spiffe://west.example"));
}

#[tokio::test]
async fn fault_lower_sequence_is_stale() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let older = bundle_of(&[&east, &east_ca()], 4, 60);
    let fake = fake_east_endpoint(&east, Canned::ok(older.to_json().unwrap())).await;
    let status = assert_fault(&West::new("stale"), fake.url(), &good, "stale_sequence").await;
    assert!(status.last_error.unwrap().contains("sequence 4"));
}

#[tokio::test]
async fn fault_http_500() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let reply = Canned {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        ..Canned::ok(good.to_json().unwrap())
    };
    let fake = fake_east_endpoint(&east, reply).await;
    let status = assert_fault(&West::new("http500"), fake.url(), &good, "http_status").await;
    assert!(status.last_error.unwrap().contains("500"));
}

#[tokio::test]
async fn fault_slow_response_times_out() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let newer = bundle_of(&[&east], 6, 60);
    let reply = Canned {
        delay: Duration::from_secs(5),
        ..Canned::ok(newer.to_json().unwrap())
    };
    let fake = fake_east_endpoint(&east, reply).await;
    let mut west = West::new("slow");
    west.set_settings(FetchSettings {
        timeout: Duration::from_millis(300),
        ..FetchSettings::default()
    });
    let started = std::time::Instant::now();
    assert_fault(&west, fake.url(), &good, "timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout bounds the fetch"
    );
}

#[tokio::test]
async fn fault_oversized_body() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let fake = fake_east_endpoint(&east, Canned::ok(vec![b' '; 2 * 1024 * 1024])).await;
    assert_fault(&West::new("too-large"), fake.url(), &good, "too_large").await;
}

#[tokio::test]
async fn fault_certificate_from_an_unknown_root() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    // Claims the right ID, but is signed by a root east never published.
    let rogue = east_ca();
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&rogue, &endpoint_id())),
        bundle_of(&[&rogue], 6, 60),
    )
    .await;
    let status = assert_fault(&West::new("unknown-root"), endpoint.url(), &good, "tls").await;
    assert!(
        status
            .last_error
            .unwrap()
            .contains("not signed by an authority of trust domain east.example")
    );
}

#[tokio::test]
async fn fault_certificate_with_the_wrong_spiffe_id() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let other = SpiffeId::parse("spiffe://east.example/ns/web/sa/frontend").unwrap();
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &other)),
        bundle_of(&[&east], 6, 60),
    )
    .await;
    let status = assert_fault(&West::new("wrong-id"), endpoint.url(), &good, "tls").await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains(other.as_str()) && error.contains("not authorized"),
        "{error}"
    );
}

#[tokio::test]
async fn fault_nothing_listening() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", closed.local_addr().unwrap());
    drop(closed);
    assert_fault(&West::new("connect"), url, &good, "connect").await;
}

#[tokio::test]
async fn redirects_are_followed_with_the_same_tls_rules_and_bounded() {
    let east = east_ca();
    let good = bundle_of(&[&east], 5, 60);
    let newer = bundle_of(&[&east], 6, 60);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &endpoint_id())),
        newer.clone(),
    )
    .await;
    let redirect = |location: String| Canned {
        status: StatusCode::FOUND,
        location: Some(location),
        ..Canned::ok(Bytes::new())
    };
    let hop = fake_east_endpoint(&east, redirect(endpoint.url())).await;
    let west = West::new("redirect");
    let mut fetcher = west.fetcher(spiffe_relationship(hop.url(), Some(&good)));
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Updated {
            previous: Some(5),
            sequence: Some(6)
        }
    );
    // The next fetch starts again from the configured URL.
    fetcher.fetch_once().await.unwrap();
    assert_eq!(hop.requests.load(Ordering::SeqCst), 2);

    // A redirect to a server with the wrong SPIFFE ID fails like a direct fetch would.
    let impostor = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(
            &east,
            &SpiffeId::parse("spiffe://east.example/impostor").unwrap(),
        )),
        bundle_of(&[&east], 7, 60),
    )
    .await;
    let to_impostor = fake_east_endpoint(&east, redirect(impostor.url())).await;
    assert_fault(&West::new("redirect-tls"), to_impostor.url(), &good, "tls").await;

    // Plain http and endless loops are refused.
    let to_http = fake_east_endpoint(&east, redirect(format!("http://{}/", endpoint.addr))).await;
    assert_fault(
        &West::new("redirect-http"),
        to_http.url(),
        &good,
        "redirect",
    )
    .await;
    let looping = fake_east_endpoint(&east, redirect("/again".into())).await;
    let status = assert_fault(
        &West::new("redirect-loop"),
        looping.url(),
        &good,
        "redirect",
    )
    .await;
    assert!(status.last_error.unwrap().contains("more than 3 redirects"));
    assert_eq!(looping.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn empty_keys_revoke_the_foreign_domain() {
    let east = east_ca();
    let initial = bundle_of(&[&east], 1, 60);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &endpoint_id())),
        initial.clone(),
    )
    .await;
    let west = West::new("revoke");
    let mut fetcher = west.fetcher(spiffe_relationship(endpoint.url(), Some(&initial)));
    east_svid_verifies(&west.trust, &east).unwrap();

    let mut revoked = Bundle::new(td(EAST));
    revoked.set_sequence(Some(2));
    endpoint.publish(revoked.clone());
    assert_eq!(
        fetcher.fetch_once().await.unwrap(),
        FetchOutcome::Updated {
            previous: Some(1),
            sequence: Some(2)
        }
    );
    assert_eq!(west.held(), Some(revoked.clone()));
    assert_eq!(west.stored(), Some(revoked.clone()));
    assert!(matches!(
        east_svid_verifies(&west.trust, &east),
        Err(VerifyError::NoAuthorities(td)) if td.name() == EAST
    ));
    // A self-serving endpoint can no longer be authenticated either: later fetches fail and
    // the revocation stands.
    let err = fetcher.fetch_once().await.unwrap_err();
    assert_eq!(err.reason(), "tls", "{err}");
    assert_eq!(west.held(), Some(revoked));
}

#[tokio::test]
async fn running_federation_follows_a_rotation_within_one_refresh_interval() {
    let east = east_ca();
    let initial = bundle_of(&[&east], 1, 1);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &endpoint_id())),
        initial.clone(),
    )
    .await;
    let mut west = West::new("running");
    west.set_settings(FetchSettings {
        min_refresh: Duration::from_millis(200),
        ..FetchSettings::default()
    });
    let federation = Federation::new(west.ctx.clone());
    let (drain, watch) = DrainTrigger::new();
    federation
        .start(spiffe_relationship(endpoint.url(), Some(&initial)), watch)
        .unwrap();

    let next_root = east_ca();
    let rotated = bundle_of(&[&east, &next_root], 2, 1);
    let mut changes = west.trust.subscribe();
    endpoint.publish(rotated.clone());
    tokio::time::timeout(
        Duration::from_secs(5),
        changes.wait_for(|set| set.get(&td(EAST)).is_some_and(|b| b.sequence() == Some(2))),
    )
    .await
    .unwrap()
    .unwrap();
    east_svid_verifies(&west.trust, &next_root).unwrap();
    east_svid_verifies(&west.trust, &east).unwrap();
    let status = west.status();
    assert!(status.next_fetch.is_some());

    // Termination: polling stops, the bundle leaves the trust store and the store.
    assert!(federation.remove(&td(EAST)).await.unwrap());
    assert_eq!(west.held(), None);
    assert_eq!(west.stored(), None);
    let served = endpoint.metrics.requests_with_status(200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(endpoint.metrics.requests_with_status(200), served);
    assert_eq!(
        drain.drain(Duration::from_secs(5)).await,
        DrainOutcome::Complete
    );
}

/// One request on a fresh connection with a client that authenticates east's endpoint SVID.
async fn raw_request(
    addr: SocketAddr,
    bundle: &Bundle,
    versions: &[&'static rustls::SupportedProtocolVersion],
    method: Method,
    path: &str,
) -> (Response<Bytes>, rustls::ProtocolVersion) {
    let verifier = SpiffeServerCertVerifier::new(
        TrustStore::from_bundles([bundle.clone()]),
        Arc::new(AllowIds(vec![endpoint_id()])),
        None,
    );
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let version = stream.get_ref().1.protocol_version().unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    drop(sender);
    driver.abort();
    (Response::from_parts(parts, body), version)
}

#[tokio::test]
async fn endpoint_answers_like_spire_over_tls12_and_tls13_and_drains() {
    let east = east_ca();
    let bundle = bundle_of(&[&east], 9, 300);
    let endpoint = RunningEndpoint::start(
        EndpointIdentity::Spiffe(svid_source(&east, &endpoint_id())),
        bundle.clone(),
    )
    .await;
    let tls13 = [&rustls::version::TLS13];
    let tls12 = [&rustls::version::TLS12];

    let (ok, version) = raw_request(endpoint.addr, &bundle, &tls13, Method::GET, "/").await;
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()[http::header::CONTENT_TYPE], "application/json");
    let served = Bundle::parse_json(td(EAST), ok.body()).unwrap();
    assert_eq!(served, bundle);
    assert_eq!(served.refresh_hint(), Some(Duration::from_secs(300)));

    let (ok12, version) = raw_request(endpoint.addr, &bundle, &tls12, Method::GET, "/").await;
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(ok12.body(), ok.body());

    let (post, _) = raw_request(endpoint.addr, &bundle, &tls13, Method::POST, "/").await;
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    let (other, _) = raw_request(endpoint.addr, &bundle, &tls13, Method::GET, "/bundle").await;
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    assert_eq!(endpoint.metrics.requests_with_status(200), 2);
    assert_eq!(endpoint.metrics.requests_with_status(405), 1);
    assert_eq!(endpoint.metrics.requests_with_status(404), 1);

    // An idle keep-alive connection does not hold up shutdown.
    let idle = TcpStream::connect(endpoint.addr).await.unwrap();
    let RunningEndpoint { drain, task, .. } = endpoint;
    assert_eq!(
        drain.drain(Duration::from_secs(5)).await,
        DrainOutcome::Complete
    );
    task.await.unwrap().unwrap();
    drop(idle);
}
