//! DNS benchmark with dnsperf: the Isthmus DNS server against knot and nsd serving the same
//! 1,000-name zone, and our forwarding against the upstream it forwards to, in one run, on
//! 127.0.0.1 only.
//!
//! 1. Writes an equivalent static `clusterset.local.` zone of 1,000 ClusterSetIP services
//!    (`svc-0000.bench.svc.clusterset.local.` … `svc-0999…`, one A record each, plus SOA, NS and
//!    the `dns-version` TXT) for knot and nsd, with minimal configurations, in a temporary
//!    directory; starts `knotd -c` and `nsd -d -c` on 127.0.0.1 high ports as child processes
//!    (stopped when the bench ends, also on error). Both get two workers, the machine's core
//!    count: knot `udp-workers: 2`, nsd `server-count: 2` with `reuseport`, and nsd's response
//!    rate limiting off (it is on by default and would cap the run at a few hundred QPS).
//!    knot also serves `example.test.` (1,000 hosts, TTL 1 h, and `*.miss.example.test.`), the
//!    upstream of forwarding.
//! 2. Starts our server in this process on a default tokio runtime (one worker per core, as
//!    `isthmus dns` runs it), with the same 1,000 services published as a catalog snapshot
//!    through `ZoneFeed`; and a second one on the same zone with a `Forwarder` whose only
//!    upstream is that knot (checked: nothing is ever sent to the system's resolver).
//! 3. Checks that all servers answer the same addresses for the same names (the check also
//!    fills the forwarder's cache with the 1,000 hosts), then, round by round, runs
//!    `dnsperf -s 127.0.0.1 -p PORT -d FILE -l SECONDS -c CLIENTS -T THREADS` for every
//!    workload in turn: QPS at saturation, the server's CPU time per query (its threads'
//!    `schedstat`), and latency at a fixed offered rate (`-Q`) from dnsperf's per-query `-v`
//!    lines (dnsperf 2.10 has no latency histogram option), from which p50/p99 are computed.
//!
//! Workloads: the zone (A queries for the 1,000 names, looped) on ours, knot and nsd;
//! forwarded cache hits (the 1,000 `example.test` hosts, looped) on ours and on knot directly;
//! forwarded cache misses (names below the wildcard, each asked once, fresh every round).
//!
//! dnsperf, knot and nsd are Debian packages; when one is missing the bench installs it with
//! apt-get if it runs as root, and otherwise stops and prints the command.
//!
//! ```text
//! cargo bench -p isthmus-dns --bench dnsperf [-- --quick] [-- --rounds N --seconds S]
//! cargo bench -p isthmus-dns --bench dnsperf -- --only isthmus-dns   # ours only, for perf
//! ```
//! Results and how to read them: docs/benchmarks.md ("DNS (issue 6)").

use std::error::Error;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use isthmus_api::catalog as pb;
use isthmus_dns::{
    DnsServer, ForwardSettings, Forwarder, ServerSettings, ZoneFeed, ZoneHandler, ZoneReceiver,
    ZoneSettings,
};

type BoxError = Box<dyn Error + Send + Sync>;
type BenchResult<T> = Result<T, BoxError>;

/// Services in the zone.
const SERVICES: usize = 1_000;
/// Their namespace.
const NAMESPACE: &str = "bench";
const ZONE: &str = "clusterset.local.";
/// The zone our forwarder sends to knot.
const UPSTREAM_ZONE: &str = "example.test.";
/// Hosts in it, asked repeatedly (cache hits).
const UPSTREAM_NAMES: usize = 1_000;
/// What every name below `miss.example.test.` resolves to.
const MISS_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// Names per round for the cache-miss saturation run; dnsperf stops at the end of the file
/// (`-n 1`) so no name is asked twice.
const MISS_NAMES: usize = 400_000;
/// Debian packages the bench runs, as (command, package).
const TOOLS: [(&str, &str); 3] = [("dnsperf", "dnsperf"), ("knotd", "knot"), ("nsd", "nsd")];
/// How long a server may take to answer its first query.
const READY_DEADLINE: Duration = Duration::from_secs(15);

/// The knobs of one run.
#[derive(Debug, Clone)]
struct Plan {
    rounds: usize,
    /// Length of each saturation run (dnsperf `-l`).
    seconds: u32,
    /// Length of each fixed-rate latency run.
    latency_seconds: u32,
    /// Offered rate of the latency runs (dnsperf `-Q`): well below every server's saturation
    /// rate, so the latencies are service times rather than queueing.
    latency_qps: u32,
    /// dnsperf `-c` and `-T`.
    clients: u32,
    threads: u32,
}

impl Plan {
    fn from_args(args: &[String]) -> BenchResult<Self> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut plan = if quick {
            Self {
                rounds: 1,
                seconds: 1,
                latency_seconds: 1,
                latency_qps: 5_000,
                clients: 8,
                threads: 2,
            }
        } else {
            Self {
                rounds: 3,
                seconds: 3,
                latency_seconds: 2,
                latency_qps: 20_000,
                clients: 8,
                threads: 2,
            }
        };
        let value = |flag: &str| -> BenchResult<Option<u32>> {
            match args.iter().position(|a| a == flag) {
                None => Ok(None),
                Some(i) => {
                    let raw = args.get(i + 1).ok_or(format!("{flag} needs a value"))?;
                    Ok(Some(
                        raw.parse().map_err(|e| format!("{flag} {raw:?}: {e}"))?,
                    ))
                }
            }
        };
        if let Some(rounds) = value("--rounds")? {
            plan.rounds = usize::try_from(rounds)?.max(1);
        }
        if let Some(seconds) = value("--seconds")? {
            plan.seconds = seconds.max(1);
        }
        if let Some(qps) = value("--latency-qps")? {
            plan.latency_qps = qps.max(100);
        }
        if let Some(clients) = value("--clients")? {
            plan.clients = clients.max(1);
        }
        if let Some(threads) = value("--threads")? {
            plan.threads = threads.max(1);
        }
        Ok(plan)
    }
}

fn main() -> BenchResult<()> {
    // cargo bench passes `--bench`; the bench's own flags follow `--`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = Plan::from_args(&args)?;
    let tools = Tools::find_or_install()?;
    let load_before = load_average();
    let started = Instant::now();

    let dir = TempDir::new()?;
    let services = service_names();
    let zone_queries = dir.path().join("zone-queries.txt");
    std::fs::write(&zone_queries, query_file(&services))?;
    let zone_file = dir.path().join("clusterset.local.zone");
    std::fs::write(&zone_file, static_zone(&services))?;
    let upstream_file = dir.path().join("example.test.zone");
    std::fs::write(&upstream_file, upstream_zone())?;
    let hit_queries = dir.path().join("forward-hits.txt");
    std::fs::write(&hit_queries, upstream_query_file())?;

    // knot serves both zones: the clusterset baseline and the upstream of forwarding.
    let knot = Daemon::knot(
        &tools,
        dir.path(),
        &[(ZONE, &zone_file), (UPSTREAM_ZONE, &upstream_file)],
    )?;
    let nsd = Daemon::nsd(&tools, dir.path(), &zone_file)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (mut feed, zone) = ZoneFeed::new(ZoneSettings::default());
    feed.publish(&catalog(&services));
    let ours = runtime.block_on(DnsServer::start(&loopback_settings(), zone))?;
    let forwarding = runtime.block_on(start_forwarding(feed.subscribe(), knot.addr))?;

    for (addr, daemon) in [
        (ours.local_addr(), None),
        (forwarding.local_addr(), None),
        (knot.addr, Some(&knot)),
        (nsd.addr, Some(&nsd)),
    ] {
        wait_ready(addr, &services[0], || {
            daemon.map_or(Ok(()), |d: &Daemon| d.check_alive())
        })?;
    }
    let zone_servers = [
        ("isthmus-dns", ours.local_addr()),
        ("isthmus-dns with forwarder", forwarding.local_addr()),
        ("knot", knot.addr),
        ("nsd", nsd.addr),
    ];
    check_same_answers(&zone_servers, &services)?;
    check_forwarding(forwarding.local_addr(), knot.addr)?;

    let own = std::process::id();
    let zone_section = vec![
        Workload::repeated("isthmus-dns", ours.local_addr(), own, &zone_queries, &plan),
        Workload::repeated("knot", knot.addr, knot.child.id(), &zone_queries, &plan),
        Workload::repeated("nsd", nsd.addr, nsd.child.id(), &zone_queries, &plan),
    ];
    let forward_section = vec![
        Workload::repeated(
            "isthmus-dns forwarding, cache hits",
            forwarding.local_addr(),
            own,
            &hit_queries,
            &plan,
        ),
        Workload::repeated(
            "knot direct",
            knot.addr,
            knot.child.id(),
            &hit_queries,
            &plan,
        ),
        Workload::cache_misses(forwarding.local_addr(), own, dir.path(), &plan)?,
    ];
    // `--only <label prefix>` measures matching workloads only (for profiling).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    let selected = |section: Vec<Workload>| -> Vec<Workload> {
        section
            .into_iter()
            .filter(|w| only.is_none_or(|o| w.label.starts_with(o.as_str())))
            .collect()
    };
    let sections = [
        (
            "Clusterset zone, 1,000 names, A queries",
            "knot",
            selected(zone_section),
        ),
        (
            "Forwarding `*.example.test` to knot on loopback",
            "knot direct",
            selected(forward_section),
        ),
    ];

    println!(
        "dnsperf bench: {} round(s); per workload {} s at saturation (-c {} -T {}), then {} s at a fixed rate with -v",
        plan.rounds, plan.seconds, plan.clients, plan.threads, plan.latency_seconds,
    );
    let mut results: Vec<Vec<Vec<RoundResult>>> = sections
        .iter()
        .map(|(_, _, workloads)| vec![Vec::new(); workloads.len()])
        .collect();
    // Round by round, every workload in turn, so a disturbance hits all of them alike.
    for round in 0..plan.rounds {
        for ((_, _, workloads), section_results) in sections.iter().zip(results.iter_mut()) {
            for (workload, rounds) in workloads.iter().zip(section_results.iter_mut()) {
                let result = measure(&tools, &plan, workload, round)?;
                println!(
                    "  round {}: {:<36} {:>9.0} QPS, {:>5.2} µs CPU/query, p99 {:>7.1} µs at {} QPS",
                    round + 1,
                    workload.label,
                    result.qps,
                    result.cpu_us_per_query,
                    result.p99_us,
                    workload.latency_qps
                );
                rounds.push(result);
            }
        }
    }
    let load_after = load_average();

    println!();
    println!(
        "{}",
        machine_notes(&tools, load_before, load_after, started)
    );
    for ((title, baseline, workloads), section_results) in sections.iter().zip(&results) {
        if !workloads.is_empty() {
            println!(
                "\n{title}\n\n{}",
                report(workloads, section_results, baseline)
            );
        }
    }

    runtime.block_on(async {
        ours.shutdown().await?;
        forwarding.shutdown().await
    })?;
    drop(knot);
    drop(nsd);
    Ok(())
}

fn loopback_settings() -> ServerSettings {
    ServerSettings {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        ..ServerSettings::default()
    }
}

/// Our server with a forwarder to `upstream`, which must be on loopback: the bench never
/// sends a query anywhere else (with no server configured the forwarder would read
/// /etc/resolv.conf, so the upstreams it ended up with are checked too).
async fn start_forwarding(zone: ZoneReceiver, upstream: SocketAddr) -> BenchResult<DnsServer> {
    if !upstream.ip().is_loopback() {
        return Err(format!("BUG: upstream {upstream} is not on loopback").into());
    }
    let forwarder = Forwarder::new(&ForwardSettings {
        servers: vec![upstream],
        ..ForwardSettings::default()
    })?;
    if forwarder.upstreams() != [upstream] {
        return Err(format!(
            "BUG: the forwarder would ask {:?}, not only {upstream}",
            forwarder.upstreams()
        )
        .into());
    }
    let settings = loopback_settings();
    let handler = ZoneHandler::new(zone, settings.max_udp_payload).with_forwarder(forwarder);
    Ok(DnsServer::start_with(&settings, handler).await?)
}

// ---------------------------------------------------------------------------------------
// The zone
// ---------------------------------------------------------------------------------------

/// `svc-0000` … `svc-0999` with their ClusterSetIPs.
fn service_names() -> Vec<(String, Ipv4Addr)> {
    (0..SERVICES)
        .map(|i| {
            let octets = u16::try_from(i).unwrap_or(u16::MAX).to_be_bytes();
            (
                format!("svc-{i:04}"),
                Ipv4Addr::new(10, 96, octets[0], octets[1]),
            )
        })
        .collect()
}

fn fqdn(service: &str) -> String {
    format!("{service}.{NAMESPACE}.svc.{ZONE}")
}

/// The catalog snapshot our server gets: ClusterSetIP services without ports or endpoints.
fn catalog(services: &[(String, Ipv4Addr)]) -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        gateways: vec![],
        cluster: "bench".into(),
        services: services
            .iter()
            .map(|(name, vip)| pb::GlobalService {
                namespace: NAMESPACE.into(),
                name: name.clone(),
                vip: vip.to_string(),
                r#type: "ClusterSetIP".into(),
                affinity: "none".into(),
                ports: vec![],
                clusters: vec![],
                conflicts: vec![],
            })
            .collect(),
    }
}

/// The same zone as our server builds from [`catalog`], as a zone file (RFC 1035 5): the
/// SOA and NS our server answers at the apex, the schema version, one A per service.
fn static_zone(services: &[(String, Ipv4Addr)]) -> String {
    let mut zone = format!(
        "$ORIGIN {ZONE}\n$TTL 5\n\
         @ IN SOA ns.dns.{ZONE} hostmaster.{ZONE} 1 7200 1800 86400 5\n\
         @ IN NS ns.dns.{ZONE}\n\
         dns-version IN TXT \"1.0.0\"\n"
    );
    for (name, vip) in services {
        let _ = writeln!(zone, "{name}.{NAMESPACE}.svc IN A {vip}");
    }
    zone
}

/// dnsperf's input: one `name type` per line.
fn query_file(services: &[(String, Ipv4Addr)]) -> String {
    services
        .iter()
        .map(|(name, _)| format!("{} A\n", fqdn(name)))
        .collect()
}

/// The zone knot serves as the forwarding upstream: [`UPSTREAM_NAMES`] hosts with a TTL long
/// enough that nothing expires during the run, and a wildcard below `miss.` so that names
/// asked once each (cache misses) all exist.
fn upstream_zone() -> String {
    let mut zone = format!(
        "$ORIGIN {UPSTREAM_ZONE}\n$TTL 3600\n\
         @ IN SOA ns.{UPSTREAM_ZONE} hostmaster.{UPSTREAM_ZONE} 1 7200 1800 86400 3600\n\
         @ IN NS ns.{UPSTREAM_ZONE}\n\
         ns IN A 127.0.0.1\n\
         *.miss IN A {MISS_ADDRESS}\n"
    );
    for i in 0..UPSTREAM_NAMES {
        let _ = writeln!(zone, "host-{i:04} IN A {}", upstream_address(i));
    }
    zone
}

/// The address of `host-<i>` (198.18.0.0/15 is for benchmarks, RFC 2544).
fn upstream_address(i: usize) -> Ipv4Addr {
    let octets = u16::try_from(i).unwrap_or(u16::MAX).to_be_bytes();
    Ipv4Addr::new(198, 18, octets[0], octets[1])
}

fn upstream_query_file() -> String {
    (0..UPSTREAM_NAMES)
        .map(|i| format!("host-{i:04}.{UPSTREAM_ZONE} A\n"))
        .collect()
}

/// `count` names below the wildcard, unique to `tag`: each is asked once.
fn miss_query_file(tag: &str, count: usize) -> String {
    (0..count)
        .map(|i| format!("{tag}-{i}.miss.{UPSTREAM_ZONE} A\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The tools and the other servers
// ---------------------------------------------------------------------------------------

/// Where the Debian tools are.
#[derive(Debug)]
struct Tools {
    dnsperf: PathBuf,
    knotd: PathBuf,
    nsd: PathBuf,
}

impl Tools {
    /// Finds dnsperf, knotd and nsd; installs the missing ones with apt-get when running as
    /// root, and otherwise fails with the command to run.
    fn find_or_install() -> BenchResult<Self> {
        let missing: Vec<&str> = TOOLS
            .iter()
            .filter(|(command, _)| find_program(command).is_none())
            .map(|(_, package)| *package)
            .collect();
        if !missing.is_empty() {
            let install = format!("apt-get install -y {}", missing.join(" "));
            if !is_root() {
                return Err(format!(
                    "missing Debian packages {missing:?}; install them as root with: \
                     apt-get update && {install}"
                )
                .into());
            }
            eprintln!("installing {missing:?}: apt-get update && {install}");
            for args in [
                vec!["update", "-qq"],
                [&["install", "-y", "-qq"][..], &missing].concat(),
            ] {
                let status = Command::new("apt-get")
                    .args(&args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()?;
                if !status.success() {
                    return Err(format!("apt-get {args:?} failed: {status}").into());
                }
            }
        }
        let path = |command: &str| {
            find_program(command).ok_or_else(|| format!("{command} not found after installing"))
        };
        Ok(Self {
            dnsperf: path("dnsperf")?,
            knotd: path("knotd")?,
            nsd: path("nsd")?,
        })
    }

    fn versions(&self) -> String {
        let first_line = |program: &Path, flag: &str| {
            Command::new(program)
                .arg(flag)
                .output()
                .ok()
                .map(|o| {
                    let text = if o.stdout.is_empty() {
                        o.stderr
                    } else {
                        o.stdout
                    };
                    String::from_utf8_lossy(&text)
                        .lines()
                        .find(|l| l.contains("ersion"))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default()
        };
        format!(
            "dnsperf {}; {}; {}",
            first_line(&self.dnsperf, "-h"),
            first_line(&self.knotd, "--version"),
            first_line(&self.nsd, "-v")
        )
    }
}

/// `command` on `PATH` or in the sbin directories (knotd and nsd live in /usr/sbin, which a
/// non-root `PATH` may lack).
fn find_program(command: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// A directory under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> BenchResult<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("isthmus-dnsperf-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 at the time of asking.
fn free_port() -> BenchResult<u16> {
    for _ in 0..32 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no port free for both UDP and TCP on 127.0.0.1".into())
}

/// A server run as a child process, stopped (SIGTERM, then SIGKILL) with its descendants
/// when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    fn knot(tools: &Tools, dir: &Path, zones: &[(&str, &Path)]) -> BenchResult<Self> {
        let port = free_port()?;
        let run = dir.join("knot");
        std::fs::create_dir_all(&run)?;
        let config = format!(
            "server:\n    rundir: \"{run}\"\n    listen: 127.0.0.1@{port}\n    \
             udp-workers: 2\n    tcp-workers: 1\n    background-workers: 1\n\
             database:\n    storage: \"{run}\"\n\
             control:\n    listen: \"{run}/knot.sock\"\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: \"{run}\"\n    \
             zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n    \
             semantic-checks: off\n\
             zone:\n",
            run = run.display(),
        );
        let mut config = config;
        for (domain, file) in zones {
            let _ = writeln!(
                config,
                "  - domain: {domain}\n    file: \"{}\"",
                file.display()
            );
        }
        let conf = run.join("knot.conf");
        std::fs::write(&conf, config)?;
        Self::spawn(
            "knot",
            &tools.knotd,
            &["-c".as_ref(), conf.as_os_str()],
            port,
            &run,
        )
    }

    fn nsd(tools: &Tools, dir: &Path, zone_file: &Path) -> BenchResult<Self> {
        let port = free_port()?;
        let run = dir.join("nsd");
        std::fs::create_dir_all(&run)?;
        let config = format!(
            "server:\n    ip-address: 127.0.0.1@{port}\n    server-count: 2\n    \
             reuseport: yes\n    username: \"\"\n    chroot: \"\"\n    zonesdir: \"{run}\"\n    \
             database: \"\"\n    zonelistfile: \"{run}/zone.list\"\n    \
             xfrdfile: \"{run}/xfrd.state\"\n    xfrdir: \"{run}\"\n    \
             pidfile: \"{run}/nsd.pid\"\n    cookie-secret-file: \"{run}/cookiesecrets.txt\"\n    \
             rrl-ratelimit: 0\n    rrl-whitelist-ratelimit: 0\n    verbosity: 0\n\
             remote-control:\n    control-enable: no\n\
             zone:\n    name: {ZONE}\n    zonefile: \"{zone}\"\n",
            run = run.display(),
            zone = zone_file.display(),
        );
        let conf = run.join("nsd.conf");
        std::fs::write(&conf, config)?;
        Self::spawn(
            "nsd",
            &tools.nsd,
            &["-d".as_ref(), "-c".as_ref(), conf.as_os_str()],
            port,
            &run,
        )
    }

    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&std::ffi::OsStr],
        port: u16,
        run: &Path,
    ) -> BenchResult<Self> {
        let log = run.join(format!("{name}.log"));
        let output = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Self {
            name,
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log,
        })
    }

    /// An error with the server's log if it has exited.
    fn check_alive(&self) -> BenchResult<()> {
        let id = self.child.id();
        if Path::new(&format!("/proc/{id}")).exists() && process_state(id) != Some('Z') {
            return Ok(());
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        Err(format!("{} exited:\n{log}", self.name).into())
    }

    /// The server process and its descendants (nsd forks its servers and xfrd).
    fn pids(&self) -> Vec<u32> {
        descendants(self.child.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pids = self.pids();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Children that outlived their parent: only ones this daemon started.
        for pid in pids.into_iter().skip(1) {
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

/// The state letter of `/proc/<pid>/stat`.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// `/proc/<pid>/stat`'s parent pid.
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `root` and every process below it, `root` first.
fn descendants(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, parent_pid(pid)?)))
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![root];
    let mut i = 0;
    while let Some(&parent) = found.get(i) {
        found.extend(
            all.iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found
}

/// CPU time of every thread of `pids`, from `/proc/<pid>/task/<tid>/schedstat` (ns on CPU).
fn cpu_time(pids: &[u32]) -> Duration {
    let mut total = 0u64;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let on_cpu = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            total += on_cpu;
        }
    }
    Duration::from_nanos(total)
}

// ---------------------------------------------------------------------------------------
// Asking and measuring
// ---------------------------------------------------------------------------------------

/// One server under one kind of load.
#[derive(Debug)]
struct Workload {
    label: &'static str,
    addr: SocketAddr,
    /// The process whose CPU time, with its descendants' (nsd forks its servers), is the
    /// server's; our own process counts alone (knot, nsd and dnsperf are its children).
    root_pid: u32,
    /// Query files per round: (saturation run, fixed-rate run); round `r` uses entry
    /// `r % len`.
    queries: Vec<(PathBuf, PathBuf)>,
    /// Stop at the end of the file (`-n 1`): its names must not be asked twice.
    once: bool,
    /// The offered rate of the fixed-rate run.
    latency_qps: u32,
}

impl Workload {
    /// The same file, looped over, in every run.
    fn repeated(
        label: &'static str,
        addr: SocketAddr,
        root_pid: u32,
        queries: &Path,
        plan: &Plan,
    ) -> Self {
        Self {
            label,
            addr,
            root_pid,
            queries: vec![(queries.to_owned(), queries.to_owned())],
            once: false,
            latency_qps: plan.latency_qps,
        }
    }

    /// Forwarded names never asked before: fresh files each round, each name once, and a
    /// quarter of the fixed rate (every question costs an upstream round trip).
    fn cache_misses(addr: SocketAddr, root_pid: u32, dir: &Path, plan: &Plan) -> BenchResult<Self> {
        let latency_qps = (plan.latency_qps / 4).max(100);
        let latency_names = usize::try_from(latency_qps * plan.latency_seconds)? * 2;
        let saturation_names = if plan.seconds <= 1 {
            MISS_NAMES / 4
        } else {
            MISS_NAMES
        };
        let mut queries = Vec::new();
        for round in 0..plan.rounds {
            let saturation = dir.join(format!("miss-{round}-saturation.txt"));
            std::fs::write(
                &saturation,
                miss_query_file(&format!("r{round}s"), saturation_names),
            )?;
            let latency = dir.join(format!("miss-{round}-latency.txt"));
            std::fs::write(
                &latency,
                miss_query_file(&format!("r{round}l"), latency_names),
            )?;
            queries.push((saturation, latency));
        }
        Ok(Self {
            label: "isthmus-dns forwarding, cache misses",
            addr,
            root_pid,
            queries,
            once: true,
            latency_qps,
        })
    }
}

/// One A question over UDP: the response code and the addresses.
fn ask_a(server: SocketAddr, name: &str) -> BenchResult<(ResponseCode, Vec<String>)> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    socket.send_to(&query.to_vec()?, server)?;
    let mut buffer = [0u8; 4096];
    let (len, _) = socket.recv_from(&mut buffer)?;
    let response = Message::from_vec(buffer.get(..len).ok_or("BUG: length beyond buffer")?)?;
    let mut addresses: Vec<String> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    addresses.sort();
    Ok((response.metadata.response_code, addresses))
}

/// Waits until `server` answers the first service's A question.
fn wait_ready(
    server: SocketAddr,
    first: &(String, Ipv4Addr),
    alive: impl Fn() -> BenchResult<()>,
) -> BenchResult<()> {
    let deadline = Instant::now() + READY_DEADLINE;
    let expected = vec![first.1.to_string()];
    loop {
        alive()?;
        if let Ok((ResponseCode::NoError, addresses)) = ask_a(server, &fqdn(&first.0))
            && addresses == expected
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{server} did not answer {} within {READY_DEADLINE:?}",
                first.0
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every server answers the same for a sample of names, and NXDOMAIN for a missing one.
fn check_same_answers(
    servers: &[(&str, SocketAddr)],
    services: &[(String, Ipv4Addr)],
) -> BenchResult<()> {
    let mut names: Vec<(String, ResponseCode, Vec<String>)> = services
        .iter()
        .step_by(97)
        .map(|(name, vip)| (fqdn(name), ResponseCode::NoError, vec![vip.to_string()]))
        .collect();
    names.push((fqdn("missing"), ResponseCode::NXDomain, vec![]));
    for (label, addr) in servers {
        for (name, code, addresses) in &names {
            let got = ask_a(*addr, name)?;
            if got != (*code, addresses.clone()) {
                return Err(format!(
                    "{label} answered {name} with {got:?}, expected {code:?} {addresses:?}"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// The forwarder answers every upstream host as knot does (which also fills its cache for
/// the cache-hit runs), and a name below the wildcard.
fn check_forwarding(forwarding: SocketAddr, knot: SocketAddr) -> BenchResult<()> {
    let mut names: Vec<(String, Vec<String>)> = (0..UPSTREAM_NAMES)
        .map(|i| {
            (
                format!("host-{i:04}.{UPSTREAM_ZONE}"),
                vec![upstream_address(i).to_string()],
            )
        })
        .collect();
    names.push((
        format!("check.miss.{UPSTREAM_ZONE}"),
        vec![MISS_ADDRESS.to_string()],
    ));
    for (name, addresses) in &names {
        for (label, addr) in [("forwarding", forwarding), ("knot", knot)] {
            let got = ask_a(addr, name)?;
            if got != (ResponseCode::NoError, addresses.clone()) {
                return Err(format!(
                    "{label} answered {name} with {got:?}, expected {addresses:?}"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// What one dnsperf run reported.
#[derive(Debug, Default, Clone)]
struct PerfRun {
    completed: u64,
    lost: u64,
    qps: f64,
    average_latency: f64,
    response_codes: String,
    /// Per-query latencies in seconds (`-v` runs only).
    latencies: Vec<f64>,
}

/// Runs dnsperf against `server`; `rate` limits the offered QPS and turns on `-v`.
fn dnsperf(
    tools: &Tools,
    plan: &Plan,
    server: SocketAddr,
    queries: &Path,
    seconds: u32,
    rate: Option<u32>,
    once: bool,
) -> BenchResult<PerfRun> {
    let mut command = Command::new(&tools.dnsperf);
    command
        .args([
            "-s",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-d")
        .arg(queries)
        .args(["-l", &seconds.to_string()])
        .args([
            "-c",
            &plan.clients.to_string(),
            "-T",
            &plan.threads.to_string(),
        ]);
    if let Some(rate) = rate {
        command.args(["-Q", &rate.to_string(), "-v"]);
    }
    if once {
        command.args(["-n", "1"]);
    }
    let output = command.output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed: {}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    parse_dnsperf(&stdout).map_err(|e| format!("{command:?}: {e}\n{stdout}").into())
}

fn parse_dnsperf(output: &str) -> Result<PerfRun, String> {
    let mut run = PerfRun::default();
    let number = |rest: &str| -> Result<f64, String> {
        rest.split_whitespace()
            .next()
            .ok_or("empty field")?
            .parse::<f64>()
            .map_err(|e| format!("{rest:?}: {e}"))
    };
    let mut seen_qps = false;
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("> ") {
            // `> NOERROR name A 0.000123`
            if let Some(latency) = rest.split_whitespace().last() {
                run.latencies.push(number(latency)?);
            }
        } else if let Some(rest) = line.strip_prefix("Queries completed:") {
            run.completed = number(rest)? as u64;
        } else if let Some(rest) = line.strip_prefix("Queries lost:") {
            run.lost = number(rest)? as u64;
        } else if let Some(rest) = line.strip_prefix("Queries per second:") {
            run.qps = number(rest)?;
            seen_qps = true;
        } else if let Some(rest) = line.strip_prefix("Average Latency (s):") {
            run.average_latency = number(rest)?;
        } else if let Some(rest) = line.strip_prefix("Response codes:") {
            run.response_codes = rest.trim().to_owned();
        }
    }
    if !seen_qps {
        return Err("no \"Queries per second\" in dnsperf's output".into());
    }
    // Every name is in the zone: anything but NOERROR means the servers are not equivalent.
    if !run.response_codes.starts_with("NOERROR") || run.response_codes.contains(',') {
        return Err(format!("unexpected response codes: {}", run.response_codes));
    }
    Ok(run)
}

/// One round against one server.
#[derive(Debug, Clone)]
struct RoundResult {
    qps: f64,
    /// Queries answered in the saturation run.
    completed: u64,
    lost: u64,
    /// Average latency at saturation (queueing included).
    saturated_latency_us: f64,
    cpu_us_per_query: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn measure(
    tools: &Tools,
    plan: &Plan,
    workload: &Workload,
    round: usize,
) -> BenchResult<RoundResult> {
    let pids = if workload.root_pid == std::process::id() {
        vec![workload.root_pid]
    } else {
        descendants(workload.root_pid)
    };
    let (saturation_file, latency_file) = workload
        .queries
        .get(round % workload.queries.len().max(1))
        .ok_or("BUG: a workload without query files")?;
    let cpu_before = cpu_time(&pids);
    let saturated = dnsperf(
        tools,
        plan,
        workload.addr,
        saturation_file,
        plan.seconds,
        None,
        workload.once,
    )?;
    let cpu = cpu_time(&pids).saturating_sub(cpu_before);
    let fixed = dnsperf(
        tools,
        plan,
        workload.addr,
        latency_file,
        plan.latency_seconds,
        Some(workload.latency_qps),
        workload.once,
    )?;
    let mut latencies = fixed.latencies;
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| percentile(&latencies, q) * 1e6;
    Ok(RoundResult {
        qps: saturated.qps,
        completed: saturated.completed,
        lost: saturated.lost + fixed.lost,
        saturated_latency_us: saturated.average_latency * 1e6,
        cpu_us_per_query: cpu.as_secs_f64() * 1e6 / saturated.completed.max(1) as f64,
        p50_us: quantile(0.50),
        p99_us: quantile(0.99),
        max_us: quantile(1.0),
    })
}

/// The `q` quantile of sorted `values` (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// The median of `values` and their range.
fn median_range(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let median = percentile(&values, 0.5);
    (
        median,
        values.first().copied().unwrap_or(0.0),
        values.last().copied().unwrap_or(0.0),
    )
}

fn report(workloads: &[Workload], results: &[Vec<RoundResult>], baseline: &str) -> String {
    let mut out = String::new();
    let base = workloads.iter().position(|w| w.label == baseline);
    let _ = writeln!(
        out,
        "| Server | QPS, median (range) | vs {baseline}, same round | server CPU µs/query | avg latency at saturation (µs) | fixed rate (QPS) | p50 / p99 / max at that rate (µs) | answered / lost |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (workload, rounds) in workloads.iter().zip(results) {
        let (qps, qps_min, qps_max) = median_range(rounds.iter().map(|r| r.qps));
        let ratio = base
            .and_then(|b| results.get(b))
            .map(|base_rounds| {
                median_range(
                    rounds
                        .iter()
                        .zip(base_rounds)
                        .map(|(r, b)| r.qps / b.qps.max(1.0)),
                )
            })
            .map_or_else(String::new, |(m, lo, hi)| {
                format!("{m:.2}× ({lo:.2}–{hi:.2})")
            });
        let (cpu, _, _) = median_range(rounds.iter().map(|r| r.cpu_us_per_query));
        let (latency, _, _) = median_range(rounds.iter().map(|r| r.saturated_latency_us));
        let (p50, _, _) = median_range(rounds.iter().map(|r| r.p50_us));
        let (p99, _, _) = median_range(rounds.iter().map(|r| r.p99_us));
        let (max, _, _) = median_range(rounds.iter().map(|r| r.max_us));
        let completed: u64 = rounds.iter().map(|r| r.completed).sum();
        let lost: u64 = rounds.iter().map(|r| r.lost).sum();
        let _ = writeln!(
            out,
            "| {} | {qps:.0} ({qps_min:.0}–{qps_max:.0}) | {ratio} | {cpu:.2} | {latency:.0} | {} | {p50:.0} / {p99:.0} / {max:.0} | {completed} / {lost} |",
            workload.label, workload.latency_qps
        );
    }
    out
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" / "),
    )
}

fn machine_notes(tools: &Tools, before: String, after: String, started: Instant) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!(
        "machine: nproc {cores}, {cpu}, kernel {kernel}; {}\n\
         load average before {before}, after {after}; whole run {:.0} s",
        tools.versions(),
        started.elapsed().as_secs_f64()
    )
}
