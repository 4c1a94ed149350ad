//! Catalog and peering benchmark: how fast an export change in one gateway becomes visible in
//! a peer gateway's catalog, and how an importing gateway copes with 100 peers × 1,000
//! services × 10 endpoints.
//!
//! 1. *Propagation*: two real gateways (`Gateway::start`) on 127.0.0.1, `east` exporting 100
//!    services × 10 endpoints and `west` importing them. Each sample changes one endpoint
//!    address with `Gateway::replace_exports` on east and waits until `CatalogView::catalog`
//!    on west shows it, woken by `CatalogView::changed` (the waiter is registered before each
//!    check, so no wake-up is lost; no polling). Run with imports kept in memory and with
//!    `peering.data_dir` set (every applied message is persisted and flushed). Baselines in
//!    the same run: the same `Delta` frame sent one way over a raw quinn stream with the same
//!    mTLS configuration, once through `peering::write_frame`/`read_frame` (JSON included) and
//!    once as pre-encoded bytes, each handed to the measuring task the way the gateway hands a
//!    change to its catalog watchers.
//! 2. *Scale*: 100 real exporting gateways (each its own trust domain and CA, each listing the
//!    importer as a peer) run in this process; the importing gateway runs in a child process
//!    (this binary re-executed with `--importer-child <file>`) so its memory can be read on
//!    its own. The child measures the time from `Gateway::start` until its imports hold
//!    100,000 exports with 1,000,000 endpoints, its RSS, and the merge time of
//!    `CatalogView::catalog` and `catalog_with_vips` at that size, then times changes made on
//!    one exporter until they show in its catalog (propagation at scale; wall clock, stamped
//!    by this process before `replace_exports`). Floor in the same run: JSON decoding of the
//!    100 snapshot frames on one thread.
//!
//! ```text
//! cargo bench -p isthmus-gateway --bench catalog [-- --quick] [-- --only propagation|scale]
//! ```
//! Results and the way to read them are in docs/benchmarks.md ("Catalog and peering").

use std::error::Error;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::catalog::{GlobalService, ServiceKey};
use isthmus_core::config::HumanDuration;
use isthmus_core::tls::{AllowIds, AllowTrustDomains, MtlsSettings};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore, X509Svid};
use isthmus_gateway::config::{EndpointConfig, ExportedService, GatewayConfig, ServicePort};
use isthmus_gateway::peering::{
    Change, PEER_ALPN, PeerConfig, PeerMessage, read_frame, write_frame,
};
use isthmus_gateway::server::{CatalogView, Gateway, GatewayIdentity};
use serde::{Deserialize, Serialize};

type BoxError = Box<dyn Error + Send + Sync>;
type BenchResult<T> = Result<T, BoxError>;

const SERVER_NAME: &str = "isthmus-gateway.invalid";
/// Where exporters' own followers point: nothing answers there, they only keep retrying
/// (exporters must list the importer as a peer to admit its subscription).
const NOWHERE: &str = "127.0.0.1:9";
/// How long the child waits for convergence before giving up.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);
/// The child checks its imports at most this often (each check clones every import).
const CHECK_EVERY: Duration = Duration::from_millis(20);

/// Sizes of one run: the full run or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Scale {
    changes: usize,
    propagation_services: usize,
    peers: usize,
    services: usize,
    endpoints: usize,
    merge_rounds: usize,
    /// Changes timed at full scale.
    scale_changes: usize,
}

const FULL: Scale = Scale {
    changes: 500,
    propagation_services: 100,
    peers: 100,
    services: 1_000,
    endpoints: 10,
    merge_rounds: 5,
    scale_changes: 30,
};

const QUICK: Scale = Scale {
    changes: 100,
    propagation_services: 100,
    peers: 10,
    services: 200,
    endpoints: 10,
    merge_rounds: 2,
    scale_changes: 5,
};

fn main() -> BenchResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if let Some(input) = value("--importer-child") {
        return importer_child(Path::new(&input));
    }
    let scale = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let only = value("--only");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let load_before = load_average();
    let mut report = Report::default();
    if wants(only.as_deref(), "propagation") {
        report.propagation = Some(runtime.block_on(propagation_section(scale))?);
    }
    if wants(only.as_deref(), "scale") {
        report.scale = Some(runtime.block_on(scale_section(scale))?);
    }
    report.print(scale);
    println!(
        "\nCPU: {}; load average before {load_before}, after {}",
        cpu_model(),
        load_average()
    );
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

fn wants(only: Option<&str>, section: &str) -> bool {
    only.is_none_or(|o| o == section)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default()
}

fn err(message: impl Into<String>) -> BoxError {
    message.into().into()
}

fn td(s: &str) -> BenchResult<TrustDomain> {
    Ok(TrustDomain::new(s)?)
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

// ---------------------------------------------------------------------------------------------
// Identities, configuration and exports.

/// One trust domain with its CA and its gateway SVID.
struct Domain {
    name: String,
    ca: CertificateAuthority,
    svid: X509Svid,
}

impl Domain {
    fn new(name: &str) -> BenchResult<Self> {
        let ca = CertificateAuthority::generate(td(name)?, now(), DEFAULT_CA_TTL)?;
        let svid = ca.issue_svid(&gateway_id(name)?, DEFAULT_LEAF_TTL, now())?;
        Ok(Self {
            name: name.to_owned(),
            ca,
            svid,
        })
    }

    fn identity(&self, trust: &TrustStore) -> BenchResult<GatewayIdentity> {
        Ok(GatewayIdentity {
            svid: SvidSource::new(self.svid.clone())?,
            trust: trust.clone(),
        })
    }
}

fn gateway_id(trust_domain: &str) -> BenchResult<SpiffeId> {
    Ok(td(trust_domain)?.workload_id(&isthmus_gateway::peering::GATEWAY_PATH)?)
}

/// A gateway on 127.0.0.1 port 0 that federates with and peers with `peers`.
fn gateway_config(
    own: &str,
    cluster: &str,
    peers: &[(&str, SocketAddr)],
    services: Vec<ExportedService>,
) -> BenchResult<GatewayConfig> {
    let mut config = GatewayConfig {
        trust_domain: Some(td(own)?),
        cluster: cluster.into(),
        listen: "127.0.0.1:0".parse()?,
        services,
        ..GatewayConfig::default()
    };
    for (peer, address) in peers {
        config.federated_trust_domains.push(td(peer)?);
        config.peering.peers.push(PeerConfig {
            trust_domain: td(peer)?,
            address: *address,
        });
    }
    config.peering.heartbeat = HumanDuration::from_secs(5);
    Ok(config)
}

/// The endpoint address `k` of service `j` in cluster `i`: 10.i.x.y, unique per (i, j, k).
fn endpoint_ip(cluster: usize, service: usize, endpoint: usize, per_service: usize) -> IpAddr {
    let low = (service * per_service + endpoint) as u32 & 0xffff;
    IpAddr::V4(Ipv4Addr::from(
        0x0a00_0000 | ((cluster as u32 & 0xff) << 16) | low,
    ))
}

/// `count` services of cluster `cluster`, each with `endpoints` ready endpoints. The names are
/// the same in every cluster (namespace sameness): every cluster exports every service.
fn exports(cluster: usize, count: usize, endpoints: usize) -> Vec<ExportedService> {
    (0..count)
        .map(|j| ExportedService {
            namespace: format!("ns-{}", j % 10),
            name: format!("svc-{j:04}"),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: Some(8080),
                protocol: "TCP".into(),
            }],
            endpoints: (0..endpoints)
                .map(|k| EndpointConfig {
                    address: endpoint_ip(cluster, j, k, endpoints),
                    ready: true,
                })
                .collect(),
            allow: vec![],
        })
        .collect()
}

fn key_of(service: &ExportedService) -> ServiceKey {
    ServiceKey::new(&service.namespace, &service.name)
}

/// p50 and p99 (and max) of samples in µs.
#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Propagation.

/// Waits until `visible` holds for `view`'s catalog, woken by `CatalogView::changed`.
/// Returns the number of catalog merges it took.
async fn wait_visible(
    view: &CatalogView,
    deadline: Instant,
    visible: impl Fn(&[GlobalService]) -> bool,
) -> BenchResult<u32> {
    let mut merges = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(err("timed out waiting for the catalog"));
        }
        let mut wait = std::pin::pin!(view.changed(remaining));
        // Poll once so the waiter is registered before the check: `changed` wakes only the
        // waiters present when a change lands, and a change between the check and the wait
        // would otherwise cost a whole timeout.
        let woken = std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx).is_ready())).await;
        merges += 1;
        if visible(&view.catalog(now())) {
            return Ok(merges);
        }
        if !woken {
            wait.await;
        }
    }
}

/// Figures of one propagation run.
#[derive(Debug, Clone, Copy, Default)]
struct Propagation {
    latency: Percentiles,
    /// Time spent inside `replace_exports` on the exporter.
    replace: Percentiles,
    merges_per_change: f64,
}

async fn propagation(scale: Scale, persist: Option<&Path>) -> BenchResult<Propagation> {
    let trust = TrustStore::default();
    let east = Domain::new("east.example")?;
    let west = Domain::new("west.example")?;
    trust.set(east.ca.bundle());
    trust.set(west.ca.bundle());
    let mut services = exports(1, scale.propagation_services, 10);
    let east_gw = Gateway::start(
        &gateway_config(
            &east.name,
            "east",
            &[(&west.name, NOWHERE.parse()?)],
            services.clone(),
        )?,
        east.identity(&trust)?,
    )
    .await?;
    let mut west_config = gateway_config(
        &west.name,
        "west",
        &[(&east.name, east_gw.addr())],
        Vec::new(),
    )?;
    west_config.peering.data_dir = persist.map(Path::to_path_buf);
    let west_gw = Gateway::start(&west_config, west.identity(&trust)?).await?;
    let view = west_gw.view();
    let count = services.len();
    wait_visible(&view, Instant::now() + Duration::from_secs(20), |c| {
        c.len() == count
    })
    .await?;

    let warmup = scale.changes / 10;
    let (mut latency, mut replace) = (Vec::new(), Vec::new());
    let mut merges = 0u32;
    for i in 0..warmup + scale.changes {
        let index = i % services.len();
        // A fresh address outside every exported range: 172.16.x.y.
        let address = IpAddr::V4(Ipv4Addr::from(0xac10_0000 | (i as u32 & 0xffff)));
        services[index].endpoints[0].address = address;
        let key = key_of(&services[index]);
        let start = Instant::now();
        east_gw.replace_exports(&services);
        let replaced = start.elapsed();
        let took = wait_visible(&view, Instant::now() + Duration::from_secs(10), |catalog| {
            catalog.iter().any(|s| {
                s.key == key
                    && s.endpoints
                        .get("east")
                        .is_some_and(|eps| eps.iter().any(|e| e.address == address))
            })
        })
        .await?;
        let elapsed = start.elapsed();
        if i >= warmup {
            latency.push(elapsed.as_secs_f64() * 1e6);
            replace.push(replaced.as_secs_f64() * 1e6);
            merges += took;
        }
    }
    tokio::join!(
        west_gw.shutdown(Duration::from_millis(200)),
        east_gw.shutdown(Duration::from_millis(200))
    );
    Ok(Propagation {
        latency: Percentiles::of(latency),
        replace: Percentiles::of(replace),
        merges_per_change: f64::from(merges) / scale.changes as f64,
    })
}

/// The `Delta` frame one propagation sample sends, and its encoded size.
fn delta_frame() -> BenchResult<(PeerMessage, usize)> {
    let export = exports(1, 1, 10)
        .first()
        .ok_or_else(|| err("no export"))?
        .to_catalog("east");
    let message = PeerMessage::Delta {
        epoch: 1,
        version: 1,
        change: Change::Upsert { export },
    };
    let size = 4 + serde_json::to_vec(&message)?.len();
    Ok((message, size))
}

/// A quinn server and client with the gateways' mTLS configuration for the peering ALPN, and
/// one bidirectional stream between them (server side returned as its receive half).
async fn raw_peering_stream() -> BenchResult<RawStream> {
    let trust = TrustStore::default();
    let east = Domain::new("east.example")?;
    let west = Domain::new("west.example")?;
    trust.set(east.ca.bundle());
    trust.set(west.ca.bundle());
    let server_tls = isthmus_core::tls::server_config(&MtlsSettings {
        svid: SvidSource::new(east.svid.clone())?,
        trust: trust.clone(),
        authorizer: Arc::new(AllowTrustDomains(vec![
            td("east.example")?,
            td("west.example")?,
        ])),
        alpn: vec![PEER_ALPN.to_vec()],
        observer: None,
    })?;
    let client_tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: SvidSource::new(west.svid.clone())?,
        trust,
        authorizer: Arc::new(AllowIds(vec![gateway_id("east.example")?])),
        alpn: vec![PEER_ALPN.to_vec()],
        observer: None,
    })?;
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
        )),
        "127.0.0.1:0".parse()?,
    )?;
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    let connecting = client.connect_with(config, server.local_addr()?, SERVER_NAME)?;
    let accept = async {
        let incoming = server.accept().await.ok_or_else(|| err("no incoming"))?;
        let conn = incoming.await?;
        let (_send, recv) = conn.accept_bi().await?;
        // Keep the connection alive with the stream: the send half is dropped only at the end.
        Ok::<_, BoxError>((conn, recv))
    };
    let open = async {
        let conn = connecting.await?;
        let (mut send, recv) = conn.open_bi().await?;
        // The peer sees the stream only once something is sent.
        send.write_all(&[0]).await?;
        drop(recv);
        Ok::<_, BoxError>((conn, send))
    };
    let ((server_conn, mut recv), (client_conn, send)) = tokio::try_join!(accept, open)?;
    let mut first = [0u8; 1];
    recv.read_exact(&mut first).await?;
    Ok(RawStream {
        endpoints: [server, client],
        connections: [server_conn, client_conn],
        send,
        recv,
    })
}

/// A raw quinn peering stream and what keeps it open.
struct RawStream {
    endpoints: [quinn::Endpoint; 2],
    connections: [quinn::Connection; 2],
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// One-way latency of `n` frames on a raw quinn stream: from before the write until the
/// measuring task is woken by the reader task through a watch channel (as the gateway wakes
/// its catalog watchers). `json`: through `write_frame`/`read_frame`; otherwise the same bytes
/// pre-encoded.
async fn wire_one_way(n: usize, json: bool) -> BenchResult<Percentiles> {
    let (message, _) = delta_frame()?;
    let mut encoded = Vec::new();
    write_frame(&mut encoded, &message).await?;
    let RawStream {
        endpoints,
        connections,
        mut send,
        mut recv,
    } = raw_peering_stream().await?;
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let size = encoded.len();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        for i in 1.. {
            let ok = if json {
                read_frame(&mut recv).await.is_ok()
            } else {
                recv.read_exact(&mut buf).await.is_ok()
            };
            if !ok {
                break;
            }
            tx.send_replace(i);
        }
    });
    let warmup = n / 10;
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        if json {
            write_frame(&mut send, &message).await?;
        } else {
            send.write_all(&encoded).await?;
        }
        while *rx.borrow_and_update() <= i {
            tokio::time::timeout(Duration::from_secs(5), rx.changed()).await??;
        }
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    send.finish()?;
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    for conn in connections {
        conn.close(0u32.into(), b"done");
    }
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"done");
    }
    Ok(Percentiles::of(samples))
}

/// Everything section 1 reports.
#[derive(Debug, Clone, Copy, Default)]
struct PropagationSection {
    memory: Propagation,
    persisted: Propagation,
    wire_json: Percentiles,
    wire_bytes: Percentiles,
    frame_bytes: usize,
}

async fn propagation_section(scale: Scale) -> BenchResult<PropagationSection> {
    let dir = std::env::temp_dir().join(format!("isthmus-bench-catalog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Interleaved: gateway in memory, wire baselines, gateway persisted.
    let memory = propagation(scale, None).await?;
    let wire_json = wire_one_way(scale.changes, true).await?;
    let wire_bytes = wire_one_way(scale.changes, false).await?;
    let persisted = propagation(scale, Some(&dir)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(PropagationSection {
        memory,
        persisted: persisted?,
        wire_json,
        wire_bytes,
        frame_bytes: delta_frame()?.1,
    })
}

// ---------------------------------------------------------------------------------------------
// 2. Scale: 100 exporting gateways here, the importer in a child process.

/// What the parent hands the importer child (as a JSON file).
#[derive(Debug, Serialize, Deserialize)]
struct ChildInput {
    config: GatewayConfig,
    chain_der: Vec<u8>,
    key_der: Vec<u8>,
    bundles: Vec<(String, Vec<u8>)>,
    services: usize,
    endpoints: usize,
    merge_rounds: usize,
}

/// What the importer child measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ChildReport {
    /// RSS after the runtime and identity are up, before `Gateway::start`, KiB.
    rss_before_kib: u64,
    /// RSS 1 s after convergence, KiB.
    rss_after_kib: u64,
    /// Peak RSS when convergence was detected, KiB.
    hwm_at_converge_kib: u64,
    /// Peak RSS after the catalog merges, KiB.
    hwm_kib: u64,
    /// From `Gateway::start` until the imports hold everything, ms.
    converge_ms: f64,
    /// When the last snapshot was applied (its `last_seen`), ms after start.
    last_applied_ms: f64,
    /// When a check first saw a complete peer, ms after start.
    first_peer_ms: f64,
    /// Exports and endpoints held at convergence.
    services: usize,
    endpoints: usize,
    /// Cost of one convergence check (`CatalogView::imports` + counting) at full size, ms.
    check_ms: f64,
    /// `CatalogView::catalog` at full size: median and range over rounds, ms.
    catalog_ms: f64,
    catalog_min_ms: f64,
    catalog_max_ms: f64,
    /// `CatalogView::catalog_with_vips` at full size, median, ms.
    catalog_vips_ms: f64,
    /// Global services and endpoints in the merged catalog.
    global_services: usize,
    global_endpoints: usize,
}

fn status_kib(field: &str) -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| err(format!("no {field} in /proc/self/status")))
}

/// The importer child: starts the gateway from `input`, waits until its imports hold every
/// export, measures, prints one JSON line and exits.
fn importer_child(input: &Path) -> BenchResult<()> {
    let input: ChildInput = serde_json::from_slice(&std::fs::read(input)?)?;
    let svid = X509Svid::from_der(&input.chain_der, &input.key_der)?;
    let mut bundles = Vec::new();
    for (name, der) in &input.bundles {
        bundles.push(Bundle::from_der(td(name)?, der)?);
    }
    let identity = GatewayIdentity {
        svid: SvidSource::new(svid)?,
        trust: TrustStore::from_bundles(bundles),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (report, gateway) = runtime.block_on(import_all(&input, identity))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    stdout.flush()?;
    // Propagation at scale: each stdin line `<address> <unix ns>` says the parent changed the
    // first endpoint of `ns-0/svc-0000` in cluster `c000` to `<address>` at that instant; we
    // answer with the µs until our catalog showed it.
    let view = gateway.view();
    let key = ServiceKey::new("ns-0", "svc-0000");
    for line in std::io::stdin().lines() {
        let line = line?;
        let (address, at) = line
            .split_once(' ')
            .ok_or_else(|| err(format!("bad probe {line:?}")))?;
        let (address, at): (IpAddr, i128) = (address.parse()?, at.parse()?);
        runtime.block_on(wait_visible(
            &view,
            Instant::now() + Duration::from_secs(30),
            |catalog| {
                catalog.iter().any(|s| {
                    s.key == key
                        && s.endpoints
                            .get("c000")
                            .is_some_and(|eps| eps.iter().any(|e| e.address == address))
                })
            },
        ))?;
        let micros = (now().unix_timestamp_nanos() - at) / 1000;
        writeln!(stdout, "{micros}")?;
        stdout.flush()?;
    }
    // Exit without a graceful shutdown: the parent only needs the figures.
    std::process::exit(0);
}

/// What a convergence check sees of the imports.
#[derive(Debug)]
struct ImportCounts {
    /// Peers whose snapshot has been applied.
    complete: usize,
    services: usize,
    endpoints: usize,
    /// The latest message applied from any peer.
    last_seen: Option<time::OffsetDateTime>,
}

fn import_counts(view: &CatalogView) -> ImportCounts {
    let imports = view.imports();
    ImportCounts {
        complete: imports.values().filter(|p| p.resume.is_some()).count(),
        services: imports.values().map(|p| p.exports.len()).sum(),
        endpoints: imports
            .values()
            .flat_map(|p| p.exports.values())
            .map(|e| e.endpoints.len())
            .sum(),
        last_seen: imports.values().filter_map(|p| p.last_seen).max(),
    }
}

async fn timed<T, F: Future<Output = T>>(f: F) -> (T, f64) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed().as_secs_f64() * 1e3)
}

async fn import_all(
    input: &ChildInput,
    identity: GatewayIdentity,
) -> BenchResult<(ChildReport, Gateway)> {
    let mut report = ChildReport {
        rss_before_kib: status_kib("VmRSS:")?,
        ..ChildReport::default()
    };
    let start = Instant::now();
    let started_at = now();
    let deadline = start + CONVERGE_DEADLINE;
    let gateway = Gateway::start(&input.config, identity).await?;
    let view = gateway.view();
    // Each check clones every import (there is no cheaper read), so checks are spaced by at
    // least four times the last check's cost: the checker takes at most a fifth of a core.
    let mut interval = CHECK_EVERY;
    let mut last_check = Instant::now();
    loop {
        if Instant::now() > deadline {
            return Err(err(format!(
                "no convergence after {CONVERGE_DEADLINE:?}: {:?}",
                import_counts(&view)
            )));
        }
        view.changed(interval).await;
        let since = last_check.elapsed();
        if since < interval {
            tokio::time::sleep(interval - since).await;
        }
        last_check = Instant::now();
        let counts = import_counts(&view);
        interval = CHECK_EVERY.max(last_check.elapsed() * 4);
        if counts.complete > 0 && report.first_peer_ms == 0.0 {
            report.first_peer_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        if counts.services >= input.services && counts.endpoints >= input.endpoints {
            report.converge_ms = start.elapsed().as_secs_f64() * 1e3;
            report.services = counts.services;
            report.endpoints = counts.endpoints;
            // Exporters send nothing after their snapshot until the first heartbeat (5 s), so
            // the latest `last_seen` is when the last snapshot was applied.
            report.last_applied_ms = counts
                .last_seen
                .map_or(0.0, |t| (t - started_at).as_seconds_f64() * 1e3);
            break;
        }
    }
    report.hwm_at_converge_kib = status_kib("VmHWM:")?;
    let (_, check_ms) = timed(async { import_counts(&view) }).await;
    report.check_ms = check_ms;
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.rss_after_kib = status_kib("VmRSS:")?;
    let mut rounds = Vec::new();
    for _ in 0..input.merge_rounds.max(1) {
        let (catalog, ms) = timed(async { view.catalog(now()) }).await;
        report.global_services = catalog.len();
        report.global_endpoints = catalog
            .iter()
            .flat_map(|s| s.endpoints.values())
            .map(Vec::len)
            .sum();
        rounds.push(ms);
    }
    rounds.sort_by(f64::total_cmp);
    report.catalog_ms = rounds[rounds.len() / 2];
    report.catalog_min_ms = rounds[0];
    report.catalog_max_ms = rounds[rounds.len() - 1];
    let mut rounds = Vec::new();
    for _ in 0..input.merge_rounds.max(1) {
        rounds.push(timed(async { view.catalog_with_vips(now()).len() }).await.1);
    }
    rounds.sort_by(f64::total_cmp);
    report.catalog_vips_ms = rounds[rounds.len() / 2];
    report.hwm_kib = status_kib("VmHWM:")?;
    Ok((report, gateway))
}

/// Everything section 2 reports.
#[derive(Debug, Clone, Default)]
struct ScaleSection {
    exporters_start_ms: f64,
    memory: ChildReport,
    persisted: ChildReport,
    /// Propagation at scale: change in exporter `c000` → visible in the child's catalog, µs.
    memory_probe: Percentiles,
    persisted_probe: Percentiles,
    /// JSON decoding of every exporter's snapshot frame, one thread, ms.
    decode_ms: f64,
    snapshot_bytes: usize,
}

/// Changes to the first exporter's exports that the importer child times (propagation at
/// scale).
struct Probe {
    exporter: CatalogView,
    services: Vec<ExportedService>,
    changes: usize,
    /// Keeps the probe addresses of successive runs apart.
    offset: u32,
}

/// Runs the importer child on `input`, then sends it `probe.changes` changes; returns its
/// figures and the propagation samples (µs).
async fn run_child(input: ChildInput, probe: Probe) -> BenchResult<(ChildReport, Vec<f64>)> {
    let path = std::env::temp_dir().join(format!(
        "isthmus-bench-catalog-child-{}.json",
        std::process::id()
    ));
    std::fs::write(&path, serde_json::to_vec(&input)?)?;
    let exe = std::env::current_exe()?;
    let child_path = path.clone();
    // Blocking pipes on a blocking thread: the exporters keep running on the runtime.
    let out = tokio::task::spawn_blocking(move || -> BenchResult<(String, Vec<f64>)> {
        let mut child = Command::new(exe)
            .arg("--importer-child")
            .arg(&child_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let result = converse(&mut child, probe);
        let _ = child.kill();
        let _ = child.wait();
        result
    })
    .await?;
    let _ = std::fs::remove_file(&path);
    let (line, samples) = out?;
    let report = serde_json::from_str(&line)
        .map_err(|e| err(format!("importer child said {line:?}: {e}")))?;
    Ok((report, samples))
}

fn converse(child: &mut std::process::Child, mut probe: Probe) -> BenchResult<(String, Vec<f64>)> {
    let mut stdin = child.stdin.take().ok_or_else(|| err("no child stdin"))?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or_else(|| err("no child stdout"))?);
    let mut report = String::new();
    stdout.read_line(&mut report)?;
    let mut samples = Vec::with_capacity(probe.changes);
    for i in 0..probe.changes {
        let address = IpAddr::V4(Ipv4Addr::from(
            0xac10_0000 | ((probe.offset + i as u32) & 0xffff),
        ));
        let first = probe
            .services
            .first_mut()
            .and_then(|s| s.endpoints.first_mut())
            .ok_or_else(|| err("no endpoint to change"))?;
        first.address = address;
        let at = now().unix_timestamp_nanos();
        probe.exporter.replace_exports(&probe.services);
        writeln!(stdin, "{address} {at}")?;
        stdin.flush()?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        samples.push(
            line.trim()
                .parse()
                .map_err(|_| err(format!("importer child said {line:?}")))?,
        );
    }
    Ok((report, samples))
}

async fn scale_section(scale: Scale) -> BenchResult<ScaleSection> {
    let hub = Domain::new("hub.example")?;
    let peers: Vec<Domain> = (0..scale.peers)
        .map(|i| Domain::new(&format!("c{i:03}.example")))
        .collect::<BenchResult<_>>()?;
    let mut bundles = vec![hub.ca.bundle()];
    bundles.extend(peers.iter().map(|p| p.ca.bundle()));
    let trust = TrustStore::from_bundles(bundles.clone());

    // The exporters: real gateways, each its own trust domain, each listing the hub as a peer.
    let started = Instant::now();
    let mut exporters = Vec::with_capacity(peers.len());
    for (i, peer) in peers.iter().enumerate() {
        let config = gateway_config(
            &peer.name,
            &format!("c{i:03}"),
            &[(&hub.name, NOWHERE.parse()?)],
            exports(i, scale.services, scale.endpoints),
        )?;
        exporters.push(Gateway::start(&config, peer.identity(&trust)?).await?);
    }
    let exporters_start_ms = started.elapsed().as_secs_f64() * 1e3;

    // Floor: decoding every exporter's snapshot frame.
    let frames: Vec<Vec<u8>> = (0..scale.peers)
        .map(|i| {
            let exports = exports(i, scale.services, scale.endpoints)
                .iter()
                .map(|s| s.to_catalog(&format!("c{i:03}")))
                .collect();
            serde_json::to_vec(&PeerMessage::Snapshot {
                cluster: format!("c{i:03}"),
                epoch: 1,
                version: scale.services as u64,
                exports,
            })
        })
        .collect::<Result<_, _>>()?;
    let snapshot_bytes = frames.first().map_or(0, Vec::len);
    let decode_start = Instant::now();
    for frame in &frames {
        let message: PeerMessage = serde_json::from_slice(frame)?;
        std::hint::black_box(message);
    }
    let decode_ms = decode_start.elapsed().as_secs_f64() * 1e3;
    drop(frames);

    let peer_list: Vec<(&str, SocketAddr)> = peers
        .iter()
        .zip(&exporters)
        .map(|(p, g)| (p.name.as_str(), g.addr()))
        .collect();
    let mut config = gateway_config(&hub.name, "hub", &peer_list, Vec::new())?;
    // Room for a VIP per global service whatever the layout.
    config.peering.vip_range = "10.64.0.0/12".into();
    let input = |config: GatewayConfig| ChildInput {
        config,
        chain_der: hub.svid.chain_der(),
        key_der: hub.svid.key().secret_pkcs8_der().to_vec(),
        bundles: bundles
            .iter()
            .map(|b| (b.trust_domain().name().to_owned(), b.to_der()))
            .collect(),
        services: scale.peers * scale.services,
        endpoints: scale.peers * scale.services * scale.endpoints,
        merge_rounds: scale.merge_rounds,
    };
    let probe = |offset| Probe {
        exporter: exporters[0].view(),
        services: exports(0, scale.services, scale.endpoints),
        changes: scale.scale_changes,
        offset,
    };
    let (memory, memory_probe) = run_child(input(config.clone()), probe(0)).await?;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("isthmus-bench-catalog-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    config.peering.data_dir = Some(dir.clone());
    let persisted = run_child(input(config), probe(1000)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut shutdowns = tokio::task::JoinSet::new();
    for gateway in exporters {
        shutdowns.spawn(gateway.shutdown(Duration::from_millis(200)));
    }
    while shutdowns.join_next().await.is_some() {}
    let (persisted, persisted_probe) = persisted?;
    Ok(ScaleSection {
        exporters_start_ms,
        memory,
        persisted,
        memory_probe: Percentiles::of(memory_probe),
        persisted_probe: Percentiles::of(persisted_probe),
        decode_ms,
        snapshot_bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

#[derive(Debug, Default)]
struct Report {
    propagation: Option<PropagationSection>,
    scale: Option<ScaleSection>,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

impl Report {
    fn print(&self, scale: Scale) {
        if let Some(p) = &self.propagation {
            println!(
                "\nPropagation: replace_exports on east → visible in west's CatalogView::catalog \
                 ({} changes after {} warm-up, {} services × 10 endpoints exported, Delta frame {} bytes)\n",
                scale.changes,
                scale.changes / 10,
                scale.propagation_services,
                p.frame_bytes
            );
            println!("| Path | p50 (µs) | p99 (µs) | max (µs) |");
            println!("|---|---:|---:|---:|");
            let row = |name: &str, q: Percentiles| {
                println!("| {name} | {:.0} | {:.0} | {:.0} |", q.p50, q.p99, q.max);
            };
            row("gateway → gateway, imports in memory", p.memory.latency);
            row(
                "gateway → gateway, imports persisted (peering.data_dir)",
                p.persisted.latency,
            );
            row(
                "  of which replace_exports on east (in memory run)",
                p.memory.replace,
            );
            row(
                "baseline: raw quinn one-way, write_frame/read_frame (JSON)",
                p.wire_json,
            );
            row(
                "baseline: raw quinn one-way, pre-encoded bytes",
                p.wire_bytes,
            );
            println!(
                "\nCatalog merges per change on west: {:.2} (memory), {:.2} (persisted)",
                p.memory.merges_per_change, p.persisted.merges_per_change
            );
            println!(
                "Target p99 ≤ 100 ms: {} in memory ({:.1} ms), {} persisted ({:.1} ms)",
                verdict(p.memory.latency.p99 <= 100_000.0),
                p.memory.latency.p99 / 1e3,
                verdict(p.persisted.latency.p99 <= 100_000.0),
                p.persisted.latency.p99 / 1e3
            );
        }
        if let Some(s) = &self.scale {
            println!(
                "\nScale: {} exporting gateways × {} services × {} endpoints → one importer \
                 (child process); exporters started in {:.0} ms; snapshot frame {} bytes\n",
                scale.peers,
                scale.services,
                scale.endpoints,
                s.exporters_start_ms,
                s.snapshot_bytes
            );
            println!("| Measurement | Imports in memory | Imports persisted |");
            println!("|---|---:|---:|");
            let (m, d) = (&s.memory, &s.persisted);
            let row = |name: &str, a: String, b: String| println!("| {name} | {a} | {b} |");
            row(
                "Exports / endpoints held",
                format!("{} / {}", m.services, m.endpoints),
                format!("{} / {}", d.services, d.endpoints),
            );
            row(
                "Convergence detected, from Gateway::start (ms)",
                format!("{:.0}", m.converge_ms),
                format!("{:.0}", d.converge_ms),
            );
            row(
                "Last snapshot applied (its last_seen), from start (ms)",
                format!("{:.0}", m.last_applied_ms),
                format!("{:.0}", d.last_applied_ms),
            );
            row(
                "First peer complete (ms)",
                format!("{:.0}", m.first_peer_ms),
                format!("{:.0}", d.first_peer_ms),
            );
            row(
                "Convergence check (imports() + count) at full size (ms)",
                format!("{:.1}", m.check_ms),
                format!("{:.1}", d.check_ms),
            );
            let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
            row(
                "Importer RSS before start (MiB)",
                mib(m.rss_before_kib),
                mib(d.rss_before_kib),
            );
            row(
                "Importer RSS after convergence (MiB)",
                mib(m.rss_after_kib),
                mib(d.rss_after_kib),
            );
            row(
                "Importer peak RSS at convergence (MiB)",
                mib(m.hwm_at_converge_kib),
                mib(d.hwm_at_converge_kib),
            );
            row(
                "Importer peak RSS after the merges (MiB)",
                mib(m.hwm_kib),
                mib(d.hwm_kib),
            );
            let per_endpoint = |r: &ChildReport| {
                let delta = r.rss_after_kib.saturating_sub(r.rss_before_kib) as f64 * 1024.0;
                format!("{:.0}", delta / r.endpoints.max(1) as f64)
            };
            row(
                "RSS delta per endpoint (bytes)",
                per_endpoint(m),
                per_endpoint(d),
            );
            row(
                "Merged catalog: global services / endpoints",
                format!("{} / {}", m.global_services, m.global_endpoints),
                format!("{} / {}", d.global_services, d.global_endpoints),
            );
            row(
                "CatalogView::catalog at full size, median (range) (ms)",
                format!(
                    "{:.0} ({:.0}–{:.0})",
                    m.catalog_ms, m.catalog_min_ms, m.catalog_max_ms
                ),
                format!(
                    "{:.0} ({:.0}–{:.0})",
                    d.catalog_ms, d.catalog_min_ms, d.catalog_max_ms
                ),
            );
            row(
                "CatalogView::catalog_with_vips, median (ms)",
                format!("{:.0}", m.catalog_vips_ms),
                format!("{:.0}", d.catalog_vips_ms),
            );
            let ms = |q: Percentiles| format!("{:.0} / {:.0}", q.p50 / 1e3, q.max / 1e3);
            row(
                &format!(
                    "Propagation at this scale, {} changes in c000, p50 / max (ms)",
                    scale.scale_changes
                ),
                ms(s.memory_probe),
                ms(s.persisted_probe),
            );
            println!(
                "\nFloor: serde_json decode of the {} snapshot frames on one thread: {:.0} ms",
                scale.peers, s.decode_ms
            );
            println!(
                "Target convergence ≤ 5 s: {} in memory ({:.2} s), {} persisted ({:.2} s)",
                verdict(m.converge_ms <= 5_000.0),
                m.converge_ms / 1e3,
                verdict(d.converge_ms <= 5_000.0),
                d.converge_ms / 1e3
            );
        }
    }
}
