//! `isthmus lab demo`: scenarios run against a started [`Lab`], each measured and given a
//! verdict. The CLI prints the report; `tests/lab.rs` runs the same scenarios.
//!
//! 1. DNS: `echo.demo.svc.clusterset.local` through every cluster's DNS server answers the VIP
//!    that cluster's gateway reports.
//! 2. Cross-cluster calls: from every cluster's agent VIP to `echo-<other>.demo` (exported only
//!    by the other cluster): the answer names the other cluster and the agent counted a tunnel.
//! 3. Latency: sequential requests over new connections, straight to the echo backend, through
//!    the agent to a local endpoint, and through the tunnel (p50/p99, no thresholds).
//! 4. CA rotation under traffic: requests through the tunnel while the far domain's CA rotates
//!    (`RotateCa` with `now`); PASS only with zero failed requests.
//! 5. Gateway failover: not implemented yet (reported as skipped).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use isthmus_gateway::peering::GATEWAY_PATH;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{CLIENT_PATH, DEMO_NAMESPACE, DEMO_PORT, DEMO_SERVICE, Lab, own_service};

/// The name every cluster's DNS server is asked for.
pub const DEMO_NAME: &str = "echo.demo.svc.clusterset.local";
/// How long one request (connect, send, read the whole answer) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the lab may take to converge (catalogs, VIPs, agents listening) before scenarios run.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a DNS server may take to learn the VIP its gateway reports.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the demo runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoSettings {
    /// Requests per path in the latency scenario.
    pub latency_requests: usize,
    /// Traffic before the rotation.
    pub rotation_lead: Duration,
    /// Traffic after the rotation (long enough for the other domains to fetch the new bundle).
    pub rotation_tail: Duration,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            latency_requests: 500,
            rotation_lead: Duration::from_secs(1),
            rotation_tail: Duration::from_secs(8),
        }
    }
}

/// A scenario's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It behaved as expected.
    Pass,
    /// It did not.
    Fail,
    /// It was not run.
    Skipped,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skipped => "SKIPPED",
        })
    }
}

/// One scenario: its title, verdict and what was measured (one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioResult {
    /// 1-based position in the demo.
    pub number: usize,
    /// What it shows.
    pub title: String,
    /// The outcome.
    pub verdict: Verdict,
    /// Measured figures and observations.
    pub lines: Vec<String>,
}

impl ScenarioResult {
    fn new(number: usize, title: &str) -> Self {
        Self {
            number,
            title: title.to_owned(),
            verdict: Verdict::Pass,
            lines: Vec::new(),
        }
    }

    fn ok(&mut self, line: String) {
        self.lines.push(line);
    }

    fn fail(&mut self, line: String) {
        self.verdict = Verdict::Fail;
        self.lines.push(format!("FAILED: {line}"));
    }

    /// `[PASS] 1. title` and the indented lines.
    pub fn render(&self) -> String {
        let mut out = format!("[{}] {}. {}\n", self.verdict, self.number, self.title);
        for line in &self.lines {
            let _ = writeln!(out, "      {line}");
        }
        out
    }
}

/// Every scenario's result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DemoReport {
    /// In the order they ran.
    pub scenarios: Vec<ScenarioResult>,
}

impl DemoReport {
    /// No scenario failed.
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.verdict != Verdict::Fail)
    }

    /// `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        let count = |v| self.scenarios.iter().filter(|s| s.verdict == v).count();
        format!(
            "{} passed, {} failed, {} skipped",
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Skipped)
        )
    }
}

/// Runs every scenario with the default settings; `report` receives each result as it ends.
pub async fn run_demo(lab: &Lab, report: impl FnMut(&ScenarioResult)) -> DemoReport {
    run_demo_with(lab, &DemoSettings::default(), report).await
}

/// Runs every scenario; `report` receives each result as it ends.
pub async fn run_demo_with(
    lab: &Lab,
    settings: &DemoSettings,
    mut report: impl FnMut(&ScenarioResult),
) -> DemoReport {
    let mut done = DemoReport::default();
    let mut record = |result: ScenarioResult| {
        report(&result);
        done.scenarios.push(result);
    };
    wait_until_ready(lab).await;
    record(dns(lab).await);
    record(cross_cluster(lab).await);
    record(latency(lab, settings.latency_requests).await);
    record(rotation(lab, settings).await);
    let mut failover = ScenarioResult::new(5, "stop a gateway: new connections fail over");
    failover.verdict = Verdict::Skipped;
    failover.ok("not implemented yet: the lab cannot stop and restart a gateway".into());
    record(failover);
    done
}

/// The VIP cluster `from` assigned to `service`.demo, if its catalog has it.
fn vip(lab: &Lab, from: &str, service: &str) -> Option<IpAddr> {
    lab.status()
        .clusters
        .into_iter()
        .find(|c| c.info.name == from)?
        .gateway
        .services
        .into_iter()
        .find(|s| s.namespace == DEMO_NAMESPACE && s.name == service)?
        .vip
        .map(IpAddr::V4)
}

/// Every service the lab exports, with the clusters exporting it.
fn expected_services(names: &[String]) -> Vec<(String, Vec<String>)> {
    let mut services = vec![(DEMO_SERVICE.to_owned(), names.to_vec())];
    services.extend(names.iter().map(|n| (own_service(n), vec![n.clone()])));
    services
}

/// Waits (bounded) until every cluster's catalog has every service with its ready endpoints
/// and every agent listens on every VIP; the scenarios measure whatever state there is then.
async fn wait_until_ready(lab: &Lab) {
    let names: Vec<String> = lab.clusters().into_iter().map(|c| c.name).collect();
    let expected = expected_services(&names);
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        let status = lab.status();
        let catalogs = status.clusters.iter().all(|cluster| {
            expected.iter().all(|(service, exporters)| {
                cluster.gateway.services.iter().any(|s| {
                    s.namespace == DEMO_NAMESPACE
                        && &s.name == service
                        && s.vip.is_some()
                        && exporters
                            .iter()
                            .all(|e| s.ready_endpoints.get(e).copied().unwrap_or(0) > 0)
                })
            })
        });
        let agents = names
            .iter()
            .all(|n| lab.agent_listening(n).len() >= expected.len());
        if catalogs && agents {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn resolve_a(dns: SocketAddr, name: &str) -> Result<Vec<IpAddr>, String> {
    let name = Name::from_ascii(name).map_err(|e| format!("{name}: {e}"))?;
    let stream = UdpClientStream::builder(dns, TokioRuntimeProvider::default()).build();
    let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    let background = tokio::spawn(background);
    let response = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.query(name, DNSClass::IN, RecordType::A),
    )
    .await;
    background.abort();
    let response = response
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect())
}

/// GET / over a new connection; the answer's body when the status is 200.
async fn http_get(addr: SocketAddr) -> Result<String, String> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut response = String::new();
        tcp.read_to_string(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(response)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())??;
    if !response.starts_with("HTTP/1.1 200 ") {
        let first = response.lines().next().unwrap_or("(empty answer)");
        return Err(format!("unexpected answer: {first}"));
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default())
}

async fn dns(lab: &Lab) -> ScenarioResult {
    let mut result = ScenarioResult::new(
        1,
        &format!("resolve {DEMO_NAME} through every cluster's DNS server"),
    );
    for cluster in lab.clusters() {
        let Some(expected) = vip(lab, &cluster.name, DEMO_SERVICE) else {
            result.fail(format!(
                "{}: the gateway reports no VIP for echo.demo",
                cluster.name
            ));
            continue;
        };
        // The DNS server follows the catalog: give it a bounded time to agree.
        let deadline = Instant::now() + DNS_TIMEOUT;
        let (answer, took) = loop {
            let started = Instant::now();
            let answer = resolve_a(cluster.dns, DEMO_NAME).await;
            let took = started.elapsed();
            let agrees = matches!(&answer, Ok(a) if a == &[expected]);
            if agrees || Instant::now() >= deadline {
                break (answer, took);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match answer {
            Ok(a) if a == [expected] => result.ok(format!(
                "{}: DNS {} answered {expected} in {}; the gateway reports {expected}",
                cluster.name,
                cluster.dns,
                ms(took)
            )),
            Ok(a) => result.fail(format!(
                "{}: DNS {} answered {a:?}, the gateway reports {expected}",
                cluster.name, cluster.dns
            )),
            Err(e) => result.fail(format!("{}: DNS {}: {e}", cluster.name, cluster.dns)),
        }
    }
    result
}

async fn cross_cluster(lab: &Lab) -> ScenarioResult {
    let mut result = ScenarioResult::new(
        2,
        "call a service exported only by another cluster (through the tunnel)",
    );
    let clusters = lab.clusters();
    for from in &clusters {
        for to in clusters.iter().filter(|c| c.name != from.name) {
            let service = own_service(&to.name);
            let Some(vip) = vip(lab, &from.name, &service) else {
                result.fail(format!(
                    "{}: the gateway reports no VIP for {service}.{DEMO_NAMESPACE}",
                    from.name
                ));
                continue;
            };
            let target = SocketAddr::new(vip, DEMO_PORT);
            let before = lab.agent_stats(&from.name).unwrap_or_default();
            let answer = http_get(target).await;
            let after = lab.agent_stats(&from.name).unwrap_or_default();
            let tunnelled = after.tunnelled.saturating_sub(before.tunnelled);
            match answer {
                Ok(body) if body.starts_with(&format!("cluster={} ", to.name)) && tunnelled > 0 => {
                    result.ok(format!(
                        "{} -> {service}.{DEMO_NAMESPACE} at {target}: `{body}` ({} counted {tunnelled} tunnelled connection)",
                        from.name, from.name
                    ));
                    result.ok(format!(
                        "   client side: the agent presented spiffe://{}/{} and accepted only spiffe://{}/{}",
                        from.trust_domain,
                        CLIENT_PATH.join("/"),
                        to.trust_domain,
                        GATEWAY_PATH.join("/"),
                    ));
                    result.ok(format!(
                        "   server side: {}'s gateway admitted the call (its allow list names only the lab's client IDs); echo saw the gateway's address, not the SPIFFE ID (PROXY protocol v2 not implemented yet)",
                        to.name
                    ));
                }
                Ok(body) => result.fail(format!(
                    "{} -> {service}.{DEMO_NAMESPACE} at {target}: `{body}` ({tunnelled} tunnelled connections)",
                    from.name
                )),
                Err(e) => result.fail(format!(
                    "{} -> {service}.{DEMO_NAMESPACE} at {target}: {e}",
                    from.name
                )),
            }
        }
    }
    if clusters.len() < 2 {
        result.verdict = Verdict::Skipped;
        result.ok("needs at least two clusters".into());
    }
    result
}

/// Latency figures of one path.
struct Latencies {
    samples: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
}

async fn measure(target: SocketAddr, requests: usize) -> Latencies {
    let mut samples = Vec::with_capacity(requests);
    let mut failures = 0;
    let mut first_error = None;
    for _ in 0..requests {
        let started = Instant::now();
        match http_get(target).await {
            Ok(_) => samples.push(started.elapsed()),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    samples.sort_unstable();
    Latencies {
        samples,
        failures,
        first_error,
    }
}

/// The `p`th percentile (0 to 100) of sorted `samples` (nearest rank).
pub fn percentile(samples: &[Duration], p: usize) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples.get(rank.min(samples.len()) - 1).copied()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn latency(lab: &Lab, requests: usize) -> ScenarioResult {
    let mut result = ScenarioResult::new(
        3,
        &format!(
            "latency: {requests} sequential GETs over new connections, direct vs through the agent vs through the tunnel"
        ),
    );
    let clusters = lab.clusters();
    let (Some(from), Some(to)) = (clusters.first(), clusters.get(1).or(clusters.first())) else {
        result.fail("the lab has no cluster".into());
        return result;
    };
    let mut paths = Vec::new();
    if let Some(backend) = lab.echo_backend(&to.name) {
        paths.push((
            format!("direct to {}'s echo backend {backend}", to.name),
            backend,
        ));
    }
    if let Some(vip) = vip(lab, &from.name, DEMO_SERVICE) {
        paths.push((
            format!("{} agent -> local echo (VIP {vip})", from.name),
            SocketAddr::new(vip, DEMO_PORT),
        ));
    }
    if from.name != to.name {
        let service = own_service(&to.name);
        match vip(lab, &from.name, &service) {
            Some(vip) => paths.push((
                format!(
                    "{} agent -> tunnel -> {} ({service}, VIP {vip})",
                    from.name, to.name
                ),
                SocketAddr::new(vip, DEMO_PORT),
            )),
            None => result.fail(format!("{}: no VIP for {service}", from.name)),
        }
    }
    for (label, target) in paths {
        let measured = measure(target, requests).await;
        let figures = match (
            percentile(&measured.samples, 50),
            percentile(&measured.samples, 99),
        ) {
            (Some(p50), Some(p99)) => format!("p50 {}  p99 {}", ms(p50), ms(p99)),
            _ => "no successful request".to_owned(),
        };
        let line = format!(
            "{label}: {figures} ({} ok, {} failed)",
            measured.samples.len(),
            measured.failures
        );
        match measured.first_error {
            None => result.ok(line),
            Some(e) => result.fail(format!("{line}; first error: {e}")),
        }
    }
    result
}

async fn rotation(lab: &Lab, settings: &DemoSettings) -> ScenarioResult {
    let clusters = lab.clusters();
    let (Some(from), Some(to)) = (clusters.first(), clusters.get(1)) else {
        let mut result = ScenarioResult::new(4, "rotate a CA under traffic");
        result.verdict = Verdict::Skipped;
        result.ok("needs at least two clusters".into());
        return result;
    };
    let mut result = ScenarioResult::new(
        4,
        &format!(
            "rotate {}'s CA (RotateCa now) under continuous traffic {} -> {}",
            to.trust_domain, from.name, to.name
        ),
    );
    let service = own_service(&to.name);
    let Some(vip) = vip(lab, &from.name, &service) else {
        result.fail(format!("{}: no VIP for {service}", from.name));
        return result;
    };
    let target = SocketAddr::new(vip, DEMO_PORT);
    let stop = AtomicBool::new(false);
    let traffic = async {
        let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match http_get(target).await {
                Ok(body) if body.starts_with(&format!("cluster={} ", to.name)) => ok += 1,
                Ok(body) => {
                    failed += 1;
                    errors.push(format!("wrong answer `{body}`"));
                }
                Err(e) => {
                    failed += 1;
                    errors.push(e);
                }
            }
        }
        (ok, failed, errors)
    };
    let rotate = async {
        tokio::time::sleep(settings.rotation_lead).await;
        let rotated = lab.rotate_ca(&to.name, true).await;
        let started = Instant::now();
        // When does the caller's broker hold the new bundle?
        let mut seen = None;
        let deadline = started + settings.rotation_tail;
        while Instant::now() < deadline {
            if seen.is_none()
                && let Ok(sequence) = &rotated
            {
                let fetched = lab
                    .status()
                    .clusters
                    .iter()
                    .find(|c| c.info.name == from.name)
                    .and_then(|c| {
                        c.federation
                            .iter()
                            .find(|f| f.trust_domain == to.trust_domain)
                            .and_then(|f| f.sequence)
                    });
                if fetched.is_some_and(|s| s >= *sequence) {
                    seen = Some(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        (rotated, seen)
    };
    let started = Instant::now();
    let ((ok, failed, errors), (rotated, seen)) = tokio::join!(traffic, rotate);
    let elapsed = started.elapsed();
    match rotated {
        Ok(sequence) => {
            result.ok(format!(
                "{}'s broker rotated its CA after {}: bundle sequence {sequence}",
                to.name,
                ms(settings.rotation_lead)
            ));
            match seen {
                Some(after) => result.ok(format!(
                    "{}'s broker fetched sequence {sequence} of {} {} after the rotation",
                    from.name,
                    to.trust_domain,
                    ms(after)
                )),
                None => result.ok(format!(
                    "{}'s broker had not fetched sequence {sequence} of {} within {} s",
                    from.name,
                    to.trust_domain,
                    settings.rotation_tail.as_secs()
                )),
            }
        }
        Err(e) => result.fail(format!("rotating {}'s CA: {e}", to.name)),
    }
    let line = format!(
        "{} requests in {:.1} s: {ok} ok, {failed} failed",
        ok + failed,
        elapsed.as_secs_f64()
    );
    if failed == 0 && ok > 0 {
        result.ok(line);
    } else {
        let sample: Vec<&String> = errors.iter().take(3).collect();
        result.fail(format!("{line}; first errors: {sample:?}"));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 99), Some(Duration::from_millis(99)));
        assert_eq!(
            percentile(&samples[..1], 99),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn a_report_fails_only_with_a_failed_scenario() {
        let mut report = DemoReport::default();
        let mut skipped = ScenarioResult::new(1, "x");
        skipped.verdict = Verdict::Skipped;
        report.scenarios.push(skipped);
        assert!(report.passed());
        let mut failed = ScenarioResult::new(2, "y");
        failed.fail("broken".into());
        report.scenarios.push(failed.clone());
        assert!(!report.passed());
        assert_eq!(report.summary(), "0 passed, 1 failed, 1 skipped");
        assert!(
            failed
                .render()
                .starts_with("[FAIL] 2. y\n      FAILED: broken")
        );
    }
}
