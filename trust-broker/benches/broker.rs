//! Trust broker throughput, each figure beside a baseline measured in the same run (this
//! machine is noisy, so only same-run ratios mean much):
//!
//! 1. SVIDs signed per second through [`Authority::sign_csr`] (durable serials from a sled
//!    [`BrokerStore`] in a temp dir), against [`CertificateAuthority::sign_leaf`] and
//!    `sign_csr` without a store, and raw ECDSA P-256 signing.
//! 2. Bundle-endpoint requests per second over keep-alive HTTPS/1.1 and with one request per
//!    TLS connection (as federation fetchers poll), against a minimal hyper server with the
//!    same TLS configuration and against plain HTTP.
//!
//! Run `cargo bench -p isthmus-trust-broker --bench broker` (about 50 s once built), or add `-- --quick`
//! for a smoke run. Results and how to read them: `docs/benchmarks.md`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_core::tls::{self, AllowIds, SpiffeServerCertVerifier};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore};
use isthmus_trust_broker::authority::{Authority, AuthorityOptions};
use isthmus_trust_broker::endpoint::{bundle_endpoint_id, server_config};
use isthmus_trust_broker::store::BrokerStore;
use isthmus_trust_broker::{BundleEndpoint, EndpointIdentity, EndpointMetrics};
use rcgen::{CertificateParams, KeyPair, SigningKey as _};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateSigningRequestDer, ServerName};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Distinct CSRs (key pairs) cycled through by the signing loops.
const CSR_COUNT: usize = 256;
/// Concurrent HTTP clients.
const CLIENTS: usize = 16;
/// Thread names of the server and client runtimes, to tell their CPU time apart.
const SERVER_THREADS: &str = "bench-server";
const CLIENT_THREADS: &str = "bench-client";

/// How long and how often each figure is sampled.
struct Plan {
    /// Each round measures every variant once; the table shows the median round.
    rounds: usize,
    sign_sample: Duration,
    http_sample: Duration,
}

impl Plan {
    fn from_args() -> Self {
        // `cargo bench` passes `--bench`; anything but `--quick` is ignored.
        if std::env::args().any(|arg| arg == "--quick") {
            Self {
                rounds: 1,
                sign_sample: Duration::from_millis(200),
                http_sample: Duration::from_millis(300),
            }
        } else {
            Self {
                rounds: 3,
                sign_sample: Duration::from_millis(800),
                http_sample: Duration::from_millis(1200),
            }
        }
    }

    /// Unmeasured lead-in before each sample (connections, caches, frequency ramp-up).
    fn warmup(sample: Duration) -> Duration {
        sample / 5
    }
}

/// Samples of one variant across rounds.
#[derive(Default)]
struct Samples {
    rates: Vec<f64>,
    /// Per-request latencies in microseconds, pooled over rounds (HTTP only).
    latencies_us: Vec<u32>,
    /// CPU time of the server and of the client threads inside the measured windows, pooled
    /// over rounds (HTTP only; `None` when `/proc` cannot be read).
    cpu_ns: Option<(u64, u64)>,
}

impl Samples {
    fn median(&self) -> f64 {
        let mut sorted = self.rates.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    }

    fn spread(&self) -> (f64, f64) {
        let min = self.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.rates.iter().copied().fold(0.0, f64::max);
        (min, max)
    }

    /// Server and client CPU microseconds per request.
    fn cpu_per_request_us(&self) -> Option<(f64, f64)> {
        let requests = self.latencies_us.len().max(1) as f64;
        self.cpu_ns.map(|(server, client)| {
            (
                server as f64 / requests / 1e3,
                client as f64 / requests / 1e3,
            )
        })
    }

    fn percentile_us(&mut self, p: f64) -> u32 {
        self.latencies_us.sort_unstable();
        let last = self.latencies_us.len().saturating_sub(1);
        let index = ((last as f64) * p).round() as usize;
        self.latencies_us.get(index).copied().unwrap_or(0)
    }
}

/// CPU time (ns) run so far by this process's threads whose name starts with `prefix`, from
/// `/proc/self/task/*/schedstat`; `None` where that is unavailable.
fn thread_cpu_ns(prefix: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        // A thread may exit between listing and reading: skip it.
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Server and client CPU time so far (see [`thread_cpu_ns`]).
fn cpu_snapshot() -> Option<(u64, u64)> {
    Some((
        thread_cpu_ns(SERVER_THREADS)?,
        thread_cpu_ns(CLIENT_THREADS)?,
    ))
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "n/a".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

fn main() -> BenchResult<()> {
    let plan = Plan::from_args();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "isthmus trust broker benchmark: {} round(s), {} cores visible",
        plan.rounds, cores
    );
    let load_before = load_average();
    let signing = signing::run(&plan)?;
    let http = http_bench::run(&plan)?;
    signing::print(signing);
    http_bench::print(http);
    // Other work on the machine skews every figure; the load shows how much there was.
    println!(
        "load average (1/5/15 min) before: {load_before}; after: {}",
        load_average()
    );
    Ok(())
}

/// Part 1: SVIDs signed per second.
mod signing {
    use super::*;

    /// One way of signing, run `threads` at a time.
    struct Variant {
        name: &'static str,
        threads: usize,
        op: Box<dyn Fn(usize) -> BenchResult<()> + Sync>,
    }

    /// A temp data directory removed on drop.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            // Best effort: a leftover directory in /tmp is harmless.
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Pre-generated requests: DER CSRs and their parsed public keys.
    struct Requests {
        csrs: Vec<Vec<u8>>,
        keys: Vec<rcgen::PublicKey>,
    }

    fn requests() -> BenchResult<Requests> {
        let mut csrs = Vec::with_capacity(CSR_COUNT);
        let mut keys = Vec::with_capacity(CSR_COUNT);
        for _ in 0..CSR_COUNT {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = CertificateParams::default().serialize_request(&key)?;
            let der = csr.der().to_vec();
            let parsed = rcgen::CertificateSigningRequestParams::from_der(
                &CertificateSigningRequestDer::from(der.as_slice()),
            )?;
            keys.push(parsed.public_key);
            csrs.push(der);
        }
        Ok(Requests { csrs, keys })
    }

    fn variants(dir: &TempDir) -> BenchResult<Vec<Variant>> {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::new("bench.example")?;
        let id = SpiffeId::parse("spiffe://bench.example/ns/bench/sa/workload")?;
        let requests = Arc::new(requests()?);
        let ca = Arc::new(CertificateAuthority::generate(
            td.clone(),
            now,
            DEFAULT_CA_TTL,
        )?);
        let store = Arc::new(BrokerStore::open(&dir.0)?);
        let authority = Arc::new(Authority::open(
            td,
            store,
            AuthorityOptions::default(),
            now,
        )?);
        // A message the size of a leaf's to-be-signed part.
        let message = ca.sign_leaf(&id, &requests.keys[0], DEFAULT_LEAF_TTL, now)?;
        let raw_key = Arc::new(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?);

        let raw = move |_: usize| -> BenchResult<()> {
            raw_key.sign(&message)?;
            Ok(())
        };
        let sign_leaf = {
            let (ca, id, requests) = (ca.clone(), id.clone(), requests.clone());
            move |i: usize| -> BenchResult<()> {
                let key = &requests.keys[i % CSR_COUNT];
                ca.sign_leaf(&id, key, DEFAULT_LEAF_TTL, now)?;
                Ok(())
            }
        };
        // What a CSR costs before any signing: parse and check its signature (proof of
        // possession of the key).
        let csr_check = {
            let requests = requests.clone();
            move |i: usize| -> BenchResult<()> {
                let der = requests.csrs[i % CSR_COUNT].as_slice();
                rcgen::CertificateSigningRequestParams::from_der(
                    &CertificateSigningRequestDer::from(der),
                )?;
                Ok(())
            }
        };
        let core_csr = {
            let (ca, id, requests) = (ca.clone(), id.clone(), requests.clone());
            move |i: usize| -> BenchResult<()> {
                ca.sign_csr(&requests.csrs[i % CSR_COUNT], &id, DEFAULT_LEAF_TTL, now)?;
                Ok(())
            }
        };
        let broker = move |i: usize| -> BenchResult<()> {
            authority.sign_csr(&requests.csrs[i % CSR_COUNT], &id, None, now)?;
            Ok(())
        };
        let raw = Arc::new(raw);
        let sign_leaf = Arc::new(sign_leaf);
        let broker = Arc::new(broker);
        let variant = |name, threads, op: Box<dyn Fn(usize) -> BenchResult<()> + Sync>| Variant {
            name,
            threads,
            op,
        };
        Ok(vec![
            variant("raw ECDSA P-256 sign (rcgen/ring)", 1, {
                let raw = raw.clone();
                Box::new(move |i| raw(i))
            }),
            variant(
                "CSR parse + signature check only (rcgen)",
                1,
                Box::new(csr_check),
            ),
            variant("core CertificateAuthority::sign_leaf", 1, {
                let sign_leaf = sign_leaf.clone();
                Box::new(move |i| sign_leaf(i))
            }),
            variant("core CertificateAuthority::sign_csr", 1, Box::new(core_csr)),
            variant("broker Authority::sign_csr (store)", 1, {
                let broker = broker.clone();
                Box::new(move |i| broker(i))
            }),
            variant(
                "raw ECDSA P-256 sign (rcgen/ring)",
                2,
                Box::new(move |i| raw(i)),
            ),
            variant(
                "core CertificateAuthority::sign_leaf",
                2,
                Box::new(move |i| sign_leaf(i)),
            ),
            variant(
                "broker Authority::sign_csr (store)",
                2,
                Box::new(move |i| broker(i)),
            ),
        ])
    }

    /// Operations per second of `variant` over `sample`, after an unmeasured warm-up.
    fn measure(variant: &Variant, sample: Duration) -> BenchResult<f64> {
        let measure_from = Instant::now() + Plan::warmup(sample);
        let end = measure_from + sample;
        let counts = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..variant.threads)
                .map(|thread| {
                    scope.spawn(move || -> BenchResult<u64> {
                        let mut counted = 0;
                        // Threads start at different CSRs; the index only picks a CSR.
                        let mut i = thread * (CSR_COUNT / 2);
                        loop {
                            let started = Instant::now();
                            if started >= end {
                                return Ok(counted);
                            }
                            (variant.op)(i)?;
                            i += 1;
                            if started >= measure_from {
                                counted += 1;
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().map_err(|_| "signing thread panicked")?)
                .collect::<BenchResult<Vec<u64>>>()
        })?;
        Ok(counts.iter().sum::<u64>() as f64 / sample.as_secs_f64())
    }

    /// Every variant, interleaved round by round.
    pub(super) fn run(plan: &Plan) -> BenchResult<Vec<(&'static str, usize, Samples)>> {
        let dir = TempDir(
            std::env::temp_dir().join(format!("isthmus-bench-broker-{}", std::process::id())),
        );
        let _ = std::fs::remove_dir_all(&dir.0);
        let variants = variants(&dir)?;
        let mut samples: Vec<Samples> = variants.iter().map(|_| Samples::default()).collect();
        for round in 0..plan.rounds {
            eprintln!("signing: round {}/{}", round + 1, plan.rounds);
            for (variant, samples) in variants.iter().zip(&mut samples) {
                samples.rates.push(measure(variant, plan.sign_sample)?);
            }
        }
        Ok(variants
            .iter()
            .zip(samples)
            .map(|(v, s)| (v.name, v.threads, s))
            .collect())
    }

    pub(super) fn print(results: Vec<(&'static str, usize, Samples)>) {
        println!();
        println!("SVIDs signed per second (median of rounds; P-256 CA, 1 h leaves)");
        println!();
        println!(
            "| Path | Threads | Signatures/s | Range over rounds | µs per op per thread | vs sign_leaf |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let baseline = |threads| {
            results
                .iter()
                .find(|(name, t, _)| name.contains("sign_leaf") && *t == threads)
                .map_or(f64::NAN, |(_, _, s)| s.median())
        };
        for (name, threads, samples) in &results {
            let median = samples.median();
            let (min, max) = samples.spread();
            println!(
                "| {name} | {threads} | {median:.0} | {min:.0}–{max:.0} | {:.1} | {:.2}× |",
                1e6 * *threads as f64 / median,
                median / baseline(*threads),
            );
        }
    }
}

/// Part 2: bundle-endpoint requests per second.
mod http_bench {
    use super::*;

    /// Which server a client talks to, and how.
    #[derive(Clone)]
    enum Target {
        Tls {
            addr: SocketAddr,
            connector: TlsConnector,
        },
        Plain {
            addr: SocketAddr,
        },
    }

    impl Target {
        fn addr(&self) -> SocketAddr {
            match self {
                Self::Tls { addr, .. } | Self::Plain { addr } => *addr,
            }
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// Every client keeps one HTTP/1.1 connection and sends requests back to back.
        KeepAlive,
        /// One request per TCP+TLS connection, as a federation fetcher polls.
        NewConnection,
    }

    impl Mode {
        fn label(self) -> &'static str {
            match self {
                Self::KeepAlive => "keep-alive",
                Self::NewConnection => "new connection per request",
            }
        }
    }

    struct Scenario {
        server: &'static str,
        mode: Mode,
        target: Target,
    }

    /// The servers under test, running on their own runtime.
    struct Servers {
        runtime: Runtime,
        drain: DrainTrigger,
        metrics: EndpointMetrics,
        baselines: Vec<tokio::task::JoinHandle<()>>,
        endpoint: tokio::task::JoinHandle<()>,
        body: Bytes,
        scenarios: Vec<Scenario>,
    }

    /// The bundle of two roots (a rotation in progress) and the bundle endpoint's SVID.
    fn identity() -> BenchResult<(Bundle, SvidSource, SpiffeId)> {
        let now = OffsetDateTime::now_utc();
        let td = TrustDomain::new("bench.example")?;
        let old = CertificateAuthority::generate(td.clone(), now, DEFAULT_CA_TTL)?;
        let new = CertificateAuthority::generate(td.clone(), now, DEFAULT_CA_TTL)?;
        let mut bundle = Bundle::with_x509_authorities(
            td.clone(),
            vec![old.certificate().clone(), new.certificate().clone()],
        );
        bundle.set_sequence(Some(2));
        bundle.set_refresh_hint(Some(Duration::from_secs(300)));
        let endpoint_id = bundle_endpoint_id(&td)?;
        let svid = new.issue_svid(&endpoint_id, DEFAULT_LEAF_TTL, now)?;
        Ok((bundle, SvidSource::new(svid)?, endpoint_id))
    }

    /// The fetcher's `https_spiffe` client configuration: SVID checked against the bundle,
    /// ID must be the bundle endpoint's, no session resumption (every poll re-authenticates).
    fn client_config(bundle: Bundle, endpoint_id: SpiffeId) -> BenchResult<Arc<ClientConfig>> {
        let verifier = SpiffeServerCertVerifier::new(
            TrustStore::from_bundles([bundle]),
            Arc::new(AllowIds(vec![endpoint_id])),
            None,
        );
        let mut config = ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A minimal hyper server answering every request with `body`.
    async fn serve_baseline(listener: TcpListener, tls: Option<TlsAcceptor>, body: Bytes) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((tcp, _)) = accepted {
                        connections.spawn(serve_baseline_connection(tcp, tls.clone(), body.clone()));
                    }
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_baseline_connection(tcp: TcpStream, tls: Option<TlsAcceptor>, body: Bytes) {
        let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
            let mut response = Response::new(Full::new(body.clone()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            async move { Ok::<_, Infallible>(response) }
        });
        let http = hyper::server::conn::http1::Builder::new();
        // Errors are clients leaving; the load driver checks every answer itself.
        let _ = match tls {
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                Err(_) => return,
            },
            None => http.serve_connection(TokioIo::new(tcp), service).await,
        };
    }

    fn start_servers() -> BenchResult<Servers> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREADS)
            .enable_all()
            .build()?;
        let (bundle, source, endpoint_id) = identity()?;
        let body = Bytes::from(bundle.to_json()?);
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(bundle.clone()));
        let metrics = EndpointMetrics::default();
        let endpoint = BundleEndpoint::new(
            EndpointIdentity::Spiffe(source.clone()),
            rx,
            metrics.clone(),
        )?;
        let acceptor =
            TlsAcceptor::from(Arc::new(server_config(EndpointIdentity::Spiffe(source))?));
        let bind = || runtime.block_on(TcpListener::bind("127.0.0.1:0"));
        let (endpoint_listener, tls_listener, plain_listener) = (bind()?, bind()?, bind()?);
        let endpoint_addr = endpoint_listener.local_addr()?;
        let tls_addr = tls_listener.local_addr()?;
        let plain_addr = plain_listener.local_addr()?;
        let (drain, watch) = DrainTrigger::new();
        let endpoint = runtime.spawn(async move {
            if let Err(error) = endpoint.serve(endpoint_listener, watch).await {
                eprintln!("bundle endpoint failed: {error}");
            }
        });
        let baselines = vec![
            runtime.spawn(serve_baseline(tls_listener, Some(acceptor), body.clone())),
            runtime.spawn(serve_baseline(plain_listener, None, body.clone())),
        ];
        // `_tx` may drop: the endpoint keeps serving the last bundle published.
        let connector = TlsConnector::from(client_config(bundle, endpoint_id)?);
        let tls = |addr| Target::Tls {
            addr,
            connector: connector.clone(),
        };
        let mut scenarios = Vec::new();
        for mode in [Mode::KeepAlive, Mode::NewConnection] {
            scenarios.push(Scenario {
                server: "broker BundleEndpoint (https_spiffe)",
                mode,
                target: tls(endpoint_addr),
            });
            scenarios.push(Scenario {
                server: "baseline: minimal hyper, same TLS config",
                mode,
                target: tls(tls_addr),
            });
            scenarios.push(Scenario {
                server: "baseline: minimal hyper, plain HTTP",
                mode,
                target: Target::Plain { addr: plain_addr },
            });
        }
        Ok(Servers {
            runtime,
            drain,
            metrics,
            baselines,
            endpoint,
            body,
            scenarios,
        })
    }

    /// Connects (TCP, then TLS when the target has it) and completes the HTTP/1.1 handshake;
    /// the connection is driven by a task that ends when the sender is dropped.
    async fn connect(target: &Target) -> BenchResult<SendRequest<Empty<Bytes>>> {
        let tcp = TcpStream::connect(target.addr()).await?;
        match target {
            Target::Tls { connector, addr } => {
                let name = ServerName::IpAddress(addr.ip().into());
                let stream = connector.connect(name, tcp).await?;
                handshake(TokioIo::new(stream)).await
            }
            Target::Plain { .. } => handshake(TokioIo::new(tcp)).await,
        }
    }

    async fn handshake<T>(io: T) -> BenchResult<SendRequest<Empty<Bytes>>>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            // The connection ends when its sender is dropped; errors show up in `get`.
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// One `GET /` with the fetcher's headers; the answer must be 200 with the bundle.
    async fn get(
        sender: &mut SendRequest<Empty<Bytes>>,
        host: &str,
        expected: &Bytes,
    ) -> BenchResult<()> {
        sender.ready().await?;
        let request = Request::get("/")
            .header(header::HOST, host)
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()).into());
        }
        let body = response.into_body().collect().await?.to_bytes();
        if body != *expected {
            return Err(format!("unexpected body of {} bytes", body.len()).into());
        }
        Ok(())
    }

    /// One client's loop: latencies (µs) of the requests started inside the measured window.
    async fn client(
        target: Target,
        mode: Mode,
        window: (Instant, Instant),
        expected: Bytes,
    ) -> BenchResult<Vec<u32>> {
        let (measure_from, end) = window;
        let host = target.addr().to_string();
        let mut latencies = Vec::new();
        let mut kept = match mode {
            Mode::KeepAlive => Some(connect(&target).await?),
            Mode::NewConnection => None,
        };
        loop {
            let started = Instant::now();
            if started >= end {
                return Ok(latencies);
            }
            match kept.as_mut() {
                Some(sender) => get(sender, &host, &expected).await?,
                None => get(&mut connect(&target).await?, &host, &expected).await?,
            }
            if started >= measure_from {
                let micros = started.elapsed().as_micros();
                latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
        }
    }

    /// Requests per second of `scenario` over `sample`, and every request's latency.
    async fn measure(
        scenario: &Scenario,
        sample: Duration,
        expected: &Bytes,
    ) -> BenchResult<(f64, Vec<u32>, Option<(u64, u64)>)> {
        let measure_from = Instant::now() + Plan::warmup(sample);
        let window = (measure_from, measure_from + sample);
        let mut clients = JoinSet::new();
        for _ in 0..CLIENTS {
            clients.spawn(client(
                scenario.target.clone(),
                scenario.mode,
                window,
                expected.clone(),
            ));
        }
        tokio::time::sleep_until(window.0.into()).await;
        let before = cpu_snapshot();
        tokio::time::sleep_until(window.1.into()).await;
        let after = cpu_snapshot();
        let cpu = before
            .zip(after)
            .map(|((s0, c0), (s1, c1))| (s1.saturating_sub(s0), c1.saturating_sub(c0)));
        let mut latencies = Vec::new();
        while let Some(joined) = clients.join_next().await {
            latencies.extend(joined??);
        }
        Ok((
            latencies.len() as f64 / sample.as_secs_f64(),
            latencies,
            cpu,
        ))
    }

    pub(super) struct HttpResults {
        rows: Vec<(&'static str, Mode, Samples)>,
        body_len: usize,
        endpoint_ok: u64,
        handshake_failures: u64,
    }

    /// Every scenario, interleaved round by round; the clients run on their own runtime.
    pub(super) fn run(plan: &Plan) -> BenchResult<HttpResults> {
        let servers = start_servers()?;
        let clients = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(CLIENT_THREADS)
            .enable_all()
            .build()?;
        let mut samples: Vec<Samples> = servers
            .scenarios
            .iter()
            .map(|_| Samples::default())
            .collect();
        for round in 0..plan.rounds {
            eprintln!("bundle endpoint: round {}/{}", round + 1, plan.rounds);
            for (scenario, samples) in servers.scenarios.iter().zip(&mut samples) {
                let (rate, latencies, cpu) =
                    clients.block_on(measure(scenario, plan.http_sample, &servers.body))?;
                samples.rates.push(rate);
                samples.latencies_us.extend(latencies);
                samples.cpu_ns = match (round, samples.cpu_ns, cpu) {
                    (0, _, cpu) => cpu,
                    (_, Some((s0, c0)), Some((s1, c1))) => Some((s0 + s1, c0 + c1)),
                    _ => None,
                };
            }
        }
        clients.shutdown_timeout(Duration::from_secs(2));
        let Servers {
            runtime,
            drain,
            metrics,
            baselines,
            endpoint,
            body,
            scenarios,
        } = servers;
        runtime.block_on(async {
            drain.drain(Duration::from_secs(2)).await;
            let _ = endpoint.await;
        });
        for baseline in baselines {
            baseline.abort();
        }
        runtime.shutdown_timeout(Duration::from_secs(2));
        Ok(HttpResults {
            rows: scenarios
                .iter()
                .zip(samples)
                .map(|(scenario, samples)| (scenario.server, scenario.mode, samples))
                .collect(),
            body_len: body.len(),
            endpoint_ok: metrics.requests_with_status(200),
            handshake_failures: metrics.handshake_failures.get(),
        })
    }

    pub(super) fn print(mut results: HttpResults) {
        println!();
        println!(
            "Bundle endpoint requests per second ({CLIENTS} concurrent clients on 127.0.0.1, \
             HTTP/1.1 GET / -> {} byte bundle of 2 roots; median of rounds; latency pooled)",
            results.body_len
        );
        println!();
        println!(
            "| Server | Mode | Requests/s | Range over rounds | p50 | p99 | vs hyper+TLS \
             | Server CPU µs/req | Client CPU µs/req |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        let baselines: Vec<(Mode, f64)> = results
            .rows
            .iter()
            .filter(|(server, _, _)| server.contains("same TLS"))
            .map(|(_, mode, samples)| (*mode, samples.median()))
            .collect();
        for (server, mode, samples) in &mut results.rows {
            let median = samples.median();
            let (min, max) = samples.spread();
            let baseline = baselines
                .iter()
                .find(|(m, _)| m == mode)
                .map_or(f64::NAN, |(_, rate)| *rate);
            let (server_cpu, client_cpu) = samples.cpu_per_request_us().map_or_else(
                || ("n/a".to_owned(), "n/a".to_owned()),
                |(server, client)| (format!("{server:.1}"), format!("{client:.1}")),
            );
            println!(
                "| {server} | {} | {median:.0} | {min:.0}–{max:.0} | {} µs | {} µs | {:.2}× \
                 | {server_cpu} | {client_cpu} |",
                mode.label(),
                samples.percentile_us(0.50),
                samples.percentile_us(0.99),
                median / baseline,
            );
        }
        println!();
        println!(
            "endpoint answered {} requests with 200; {} failed handshakes",
            results.endpoint_ok, results.handshake_failures
        );
    }
}
