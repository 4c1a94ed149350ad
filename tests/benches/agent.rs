//! Node agent outbound benchmark (issue 7): what the agent adds to a workload's TCP connection
//! to a remote global service, in explicit mode (a listener on the VIP) and transparent mode
//! (eBPF cgroup connect redirect to one listener), beside direct TCP to the backend, all
//! measured in the same run.
//!
//! Topology, as in tests/agent.rs, on loopback: east exports an echo backend and allows only
//! the workload's SPIFFE ID; west imports it and serves its catalog API; the agent follows
//! west's catalog, names the connecting process by uid, and tunnels it over QUIC to east's
//! gateway with the workload's own SVID. Explicit and transparent mode each get their own pair
//! of clusters: explicit VIPs are loopback addresses (127.77.9.0/24, bound by the agent),
//! transparent VIPs are 10.96.77.0/24 (never bound; only the redirect reaches them).
//!
//! With root and BPF privileges the whole bench runs inside a private network namespace that
//! has only `lo` (no default route: an unredirected VIP fails at once instead of leaving the
//! machine), and every client is this binary re-executed with `--client <addr>` inside a
//! throw-away cgroup (`sandbox::spawn_in`) to which the transparent agent's redirect is
//! attached, so all three modes are measured by the same kind of process. Without privileges
//! transparent mode is skipped and the clients are plain child processes.
//!
//! Per mode, the client measures: 64 B request/response round trips on one open connection
//! (p50/p99), new connections (connect + one 64 B echo, p50/p99), and one connection's
//! throughput (MiB pushed through the echo while a second thread reads it back). Rounds
//! interleave the modes; the table shows the median round and the range.
//!
//! ```text
//! cargo bench -p isthmus-tests --bench agent [-- --quick]
//! ```
#![expect(
    clippy::expect_used,
    reason = "a bench binary: a failed setup step should stop it with its message"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::transport::{ALPN_H2, tls_channel};
use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::{SpiffeId, SvidSource, TrustDomain, TrustStore};
use isthmus_gateway::config::{
    AllowRule, EndpointConfig, ExportedService, GatewayConfig, ServicePort,
};
use isthmus_gateway::peering::PeerConfig;
use isthmus_gateway::server::{Gateway, GatewayIdentity};
use isthmus_node_agent::attest::{Selector, UnixAttestor};
use isthmus_node_agent::identities::RegisteredEntry;
use isthmus_node_agent::outbound::follow_catalog;
use isthmus_node_agent::sandbox::{
    CgroupGuard, PrivateNetns, sandbox_privileges_missing, spawn_in,
};
use isthmus_node_agent::{IdentitySnapshot, Mode, Outbound, OutboundSettings, WorkloadIdentities};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

const WORKLOAD: &str = "spiffe://west.example/ns/demo/sa/client";
const SERVICE_PORT: u16 = 18080;
const MESSAGE: usize = 64;
const MIB: usize = 1024 * 1024;

/// How much each client does.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    warmup: usize,
    round_trips: usize,
    connections: usize,
    bulk_mib: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                warmup: 100,
                round_trips: 500,
                connections: 100,
                bulk_mib: 16,
            }
        } else {
            Self {
                warmup: 500,
                round_trips: 5_000,
                connections: 1_000,
                bulk_mib: 256,
            }
        }
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("SPIFFE ID")
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).expect("trust domain")
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

// ---------------------------------------------------------------------------------------------
// Client (a child process)
// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn echo_once(stream: &mut TcpStream, out: &[u8], back: &mut [u8]) -> std::io::Result<()> {
    stream.write_all(out)?;
    stream.read_exact(back)?;
    if back != out {
        return Err(std::io::Error::other("echo returned other bytes"));
    }
    Ok(())
}

/// Runs the three measurements against `target` and prints one JSON line.
fn client(target: SocketAddr, sizes: Sizes) -> std::io::Result<()> {
    let out = [0x5a_u8; MESSAGE];
    let mut back = [0_u8; MESSAGE];

    // Round trips on one open connection.
    let mut stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    for _ in 0..sizes.warmup {
        echo_once(&mut stream, &out, &mut back)?;
    }
    let mut round_trips = Vec::with_capacity(sizes.round_trips);
    for _ in 0..sizes.round_trips {
        let start = Instant::now();
        echo_once(&mut stream, &out, &mut back)?;
        round_trips.push(micros(start.elapsed()));
    }
    drop(stream);

    // New connections: connect + one echo.
    let mut connections = Vec::with_capacity(sizes.connections);
    for i in 0..sizes.connections + sizes.warmup / 10 {
        let start = Instant::now();
        let mut stream = TcpStream::connect(target)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        echo_once(&mut stream, &out, &mut back)?;
        let elapsed = start.elapsed();
        if i >= sizes.warmup / 10 {
            connections.push(micros(elapsed));
        }
    }

    // One connection's throughput: write `bulk_mib` while another thread reads it back.
    let total = sizes.bulk_mib * MIB;
    let mut stream = TcpStream::connect(target)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = stream.try_clone()?;
    let start = Instant::now();
    let read_back = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buffer = vec![0_u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    });
    let chunk = vec![0xa5_u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        stream.write_all(&chunk)?;
        sent += chunk.len();
    }
    let got = match read_back.join() {
        Ok(got) => got?,
        Err(_) => return Err(std::io::Error::other("reader thread panicked")),
    };
    let elapsed = start.elapsed();
    if got != total {
        return Err(std::io::Error::other(format!(
            "read back {got} of {total} bytes"
        )));
    }
    stream.shutdown(std::net::Shutdown::Write)?;

    round_trips.sort_by(f64::total_cmp);
    connections.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "rt_p50_us": percentile(&round_trips, 0.50),
        "rt_p99_us": percentile(&round_trips, 0.99),
        "conn_p50_us": percentile(&connections, 0.50),
        "conn_p99_us": percentile(&connections, 0.99),
        "mib_s": total as f64 / MIB as f64 / elapsed.as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Topology (as in tests/agent.rs)
// ---------------------------------------------------------------------------------------------

/// A backend that echoes until EOF, then closes.
async fn echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn echo_export(backend: SocketAddr) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: "echo".into(),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: SERVICE_PORT,
            target_port: Some(backend.port()),
            protocol: "TCP".into(),
        }],
        endpoints: vec![EndpointConfig {
            address: backend.ip(),
            ready: true,
        }],
        allow: vec![AllowRule::SpiffeId(id(WORKLOAD))],
    }
}

fn gateway_identity(ca: &CertificateAuthority, trust: &TrustStore) -> GatewayIdentity {
    let gateway = id(&format!(
        "spiffe://{}/ns/isthmus-system/sa/eastwest-gateway",
        ca.trust_domain()
    ));
    GatewayIdentity {
        svid: SvidSource::new(
            ca.issue_svid(&gateway, DEFAULT_LEAF_TTL, now())
                .expect("gateway SVID"),
        )
        .expect("gateway SVID source"),
        trust: trust.clone(),
    }
}

struct Clusters {
    west_ca: CertificateAuthority,
    trust: TrustStore,
    backend: SocketAddr,
    _east: Gateway,
    west: Gateway,
}

/// East exports echo; west imports it with VIPs from `vip_range`.
async fn clusters(vip_range: &str) -> Clusters {
    let west_ca =
        CertificateAuthority::generate(td("west.example"), now(), DEFAULT_CA_TTL).expect("west CA");
    let east_ca =
        CertificateAuthority::generate(td("east.example"), now(), DEFAULT_CA_TTL).expect("east CA");
    let trust = TrustStore::from_bundles([west_ca.bundle(), east_ca.bundle()]);
    let backend = echo_backend().await;
    let mut east_cfg = GatewayConfig {
        trust_domain: Some(td("east.example")),
        cluster: "east".into(),
        listen: "127.0.0.1:0".parse().expect("address"),
        federated_trust_domains: vec![td("west.example")],
        services: vec![echo_export(backend)],
        ..GatewayConfig::default()
    };
    east_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("west.example"),
        address: "127.0.0.1:9".parse().expect("address"),
    }];
    let east = Gateway::start(&east_cfg, gateway_identity(&east_ca, &trust))
        .await
        .expect("start east");
    let mut west_cfg = GatewayConfig {
        trust_domain: Some(td("west.example")),
        cluster: "west".into(),
        listen: "127.0.0.1:0".parse().expect("address"),
        federated_trust_domains: vec![td("east.example")],
        catalog_listen: Some("127.0.0.1:0".parse().expect("address")),
        ..GatewayConfig::default()
    };
    west_cfg.peering.vip_range = vip_range.to_owned();
    west_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("east.example"),
        address: east.addr(),
    }];
    let west = Gateway::start(&west_cfg, gateway_identity(&west_ca, &trust))
        .await
        .expect("start west");
    Clusters {
        west_ca,
        trust,
        backend,
        _east: east,
        west,
    }
}

/// The agent of a west node whose one entry gives processes of `uid` the workload ID.
async fn agent(clusters: &Clusters, uid: u32, mode: Mode, drain: &DrainTrigger) -> Outbound {
    let entry = RegisteredEntry {
        id: "entry-client".into(),
        spiffe_id: id(WORKLOAD),
        selectors: vec![Selector::unix(format!("uid:{uid}"))],
        federates_with: vec![td("east.example")],
        ttl_seconds: 0,
    };
    let svid = clusters
        .west_ca
        .issue_svid(&id(WORKLOAD), DEFAULT_LEAF_TTL, now())
        .expect("workload SVID");
    let snapshot = IdentitySnapshot::from_parts(
        td("west.example"),
        vec![(entry, svid)],
        (*clusters.trust.snapshot()).clone(),
    )
    .expect("identity snapshot");
    let (identities, keep) = WorkloadIdentities::fixed(snapshot);
    tokio::spawn(async move {
        keep.closed().await;
    });
    let agent_id = id("spiffe://west.example/ns/isthmus-system/sa/node-agent");
    let tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: SvidSource::new(
            clusters
                .west_ca
                .issue_svid(&agent_id, DEFAULT_LEAF_TTL, now())
                .expect("agent SVID"),
        )
        .expect("agent SVID source"),
        trust: clusters.trust.clone(),
        authorizer: Arc::new(AllowIds(vec![id(
            "spiffe://west.example/ns/isthmus-system/sa/eastwest-gateway",
        )])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .expect("catalog client TLS");
    let (sender, catalog) = tokio::sync::watch::channel(None);
    tokio::spawn(follow_catalog(
        CatalogClient::new(tls_channel(
            clusters.west.catalog_addr().expect("catalog address"),
            Arc::new(tls),
        )),
        sender,
        drain.watch(),
    ));
    Outbound::start(
        OutboundSettings {
            mode,
            quic_bind: "127.0.0.1:0".parse().expect("address"),
            ..OutboundSettings::default()
        },
        identities,
        Arc::new(UnixAttestor::default()),
        clusters.trust.clone(),
        catalog,
        drain.watch(),
    )
    .await
    .expect("start the agent")
}

async fn first_route(outbound: &Outbound, what: &str) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(vip) = outbound.routes().first() {
            return *vip;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no route to echo in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .expect("uid")
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

/// Where the clients run: in the cgroup and private namespace, or plain children.
struct Sandbox<'a> {
    cgroup: &'a CgroupGuard,
    netns: &'a PrivateNetns,
}

fn start_client(target: SocketAddr, quick: bool, sandbox: Option<&Sandbox<'_>>) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("current exe"));
    command.arg("--client").arg(target.to_string());
    if quick {
        command.arg("--quick");
    }
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    match sandbox {
        Some(sandbox) => {
            spawn_in(&mut command, sandbox.cgroup.path(), sandbox.netns).expect("spawn client")
        }
        None => command.spawn().expect("spawn client"),
    }
}

const FIELDS: [&str; 5] = [
    "rt_p50_us",
    "rt_p99_us",
    "conn_p50_us",
    "conn_p99_us",
    "mib_s",
];

fn finish_client(mode: &str, child: Child) -> [f64; 5] {
    let output = child.wait_with_output().expect("wait for client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{mode} client failed ({}): {stdout}",
        output.status
    );
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("{mode} client printed no report: {stdout}"));
    FIELDS.map(|field| {
        report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{mode} report lacks {field}: {report}"))
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|_| "?".into())
}

fn median_and_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

/// Sets up both topologies and agents, runs the interleaved rounds and prints the table.
fn run(sandbox: Option<&Sandbox<'_>>, quick: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (drain, _) = DrainTrigger::new();
    let uid = uid();
    let (targets, outbounds, _clusters) = runtime.block_on(async {
        let explicit_clusters = clusters("127.77.9.0/24").await;
        let explicit = agent(&explicit_clusters, uid, Mode::Explicit, &drain).await;
        let explicit_vip = first_route(&explicit, "explicit").await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !explicit.listening().contains(&explicit_vip) {
            assert!(Instant::now() < deadline, "explicit agent never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut targets = vec![
            ("direct", explicit_clusters.backend),
            ("explicit", explicit_vip),
        ];
        let mut outbounds = vec![("explicit", explicit)];
        let mut all_clusters = vec![explicit_clusters];
        if let Some(sandbox) = sandbox {
            let transparent_clusters = clusters("10.96.77.0/24").await;
            let transparent = agent(
                &transparent_clusters,
                uid,
                Mode::Transparent {
                    cgroup: sandbox.cgroup.path().to_owned(),
                    listen: "127.0.0.1:0".parse().expect("address"),
                },
                &drain,
            )
            .await;
            let vip = first_route(&transparent, "transparent").await;
            assert!(vip.ip().to_string().starts_with("10.96.77."), "{vip}");
            targets.push(("transparent", vip));
            outbounds.push(("transparent", transparent));
            all_clusters.push(transparent_clusters);
        }
        (targets, outbounds, all_clusters)
    });
    for (mode, target) in &targets {
        println!("{mode}: {target}");
    }

    let rounds = if quick { 1 } else { 3 };
    let mut results: Vec<Vec<[f64; 5]>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for (i, (mode, target)) in targets.iter().enumerate() {
            let started = Instant::now();
            let figures = finish_client(mode, start_client(*target, quick, sandbox));
            println!(
                "round {} {mode:<11} rt p50 {:7.1} p99 {:7.1} µs | conn p50 {:7.1} p99 {:7.1} µs | {:7.1} MiB/s ({:.1} s)",
                round + 1,
                figures[0],
                figures[1],
                figures[2],
                figures[3],
                figures[4],
                started.elapsed().as_secs_f64()
            );
            results[i].push(figures);
        }
    }

    for (mode, outbound) in &outbounds {
        println!("{mode} agent stats: {:?}", outbound.stats());
    }

    let labels = [
        "Round trip 64 B, one connection, p50 (µs)",
        "Round trip 64 B, one connection, p99 (µs)",
        "New connection + 64 B echo, p50 (µs)",
        "New connection + 64 B echo, p99 (µs)",
        "Throughput, 1 connection through echo (MiB/s)",
    ];
    println!();
    print!("| Measurement (median of {rounds} rounds, range) |");
    for (mode, _) in &targets {
        print!(" {mode} |");
    }
    for (mode, _) in targets.iter().skip(1) {
        print!(" {mode} − direct |");
    }
    println!();
    println!("|---|{}", "---:|".repeat(2 * targets.len() - 1));
    for (field, label) in labels.iter().enumerate() {
        print!("| {label} |");
        let medians: Vec<f64> = results
            .iter()
            .map(|rounds| {
                let values: Vec<f64> = rounds.iter().map(|r| r[field]).collect();
                let (median, low, high) = median_and_range(&values);
                if rounds.len() > 1 {
                    print!(" {median:.1} ({low:.1}–{high:.1}) |");
                } else {
                    print!(" {median:.1} |");
                }
                median
            })
            .collect();
        for median in medians.iter().skip(1) {
            if field == 4 {
                print!(" {:.0} % |", 100.0 * median / medians[0]);
            } else {
                print!(" +{:.1} |", median - medians[0]);
            }
        }
        println!();
    }

    drain.start_drain();
    drop(outbounds);
    runtime.shutdown_timeout(Duration::from_secs(5));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sizes = Sizes::new(quick);
    if let Some(i) = args.iter().position(|a| a == "--client") {
        let target: SocketAddr = args
            .get(i + 1)
            .and_then(|a| a.parse().ok())
            .expect("--client <addr>");
        if let Err(error) = client(target, sizes) {
            eprintln!("client of {target}: {error}");
            std::process::exit(1);
        }
        return;
    }

    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "node agent outbound bench: {} UTC, nproc {}, kernel {uname}, load before {}",
        now()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "per client: {} round trips after {} warm-up, {} new connections, {} MiB bulk",
        sizes.round_trips, sizes.warmup, sizes.connections, sizes.bulk_mib
    );
    match sandbox_privileges_missing() {
        None => {
            let cgroup = CgroupGuard::create("isthmus-agent-bench").expect("create the cgroup");
            let netns = PrivateNetns::new().expect("create the network namespace");
            println!(
                "sandbox: cgroup {}, {} (only lo)",
                cgroup.path().display(),
                netns.name()
            );
            let sandbox = Sandbox {
                cgroup: &cgroup,
                netns: &netns,
            };
            netns
                .run(|| run(Some(&sandbox), quick))
                .expect("enter the network namespace");
        }
        Some(why) => {
            println!("transparent: skipped ({why})");
            run(None, quick);
        }
    }
    println!("load after {}", load_average());
}
