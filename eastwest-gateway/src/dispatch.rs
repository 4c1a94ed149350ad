//! From a verified peer and a target to a connected backend: service lookup, authorization,
//! stream limits, and endpoint selection (power of two choices on outstanding connections,
//! connect timeout, ejection with back-off, retry on another endpoint before any payload).
//! Both front ends (QUIC and the HTTP/2 CONNECT fallback) call [`Dispatcher::open`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use isthmus_api::tunnel::{ResultCode, Target};
use isthmus_core::SpiffeId;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{AllowRule, ExportedService, LimitsConfig};
use crate::metrics::GatewayMetrics;

/// A typed refusal, sent to the client before any payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The result code.
    pub code: ResultCode,
    /// Detail for the client and the logs.
    pub message: String,
}

impl Refusal {
    fn new(code: ResultCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One backend endpoint and its health.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    outstanding: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            outstanding: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections in flight to it.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether it is currently skipped after failures.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| now < until)
    }

    fn eject(&self, base: Duration, now: Instant) {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(4);
        let backoff = base * (1u32 << failures);
        *self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now + backoff);
    }

    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        *self
            .ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Keeps an endpoint's outstanding count while a tunnelled connection lives.
#[derive(Debug)]
pub struct Outstanding(Arc<Endpoint>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

fn next_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// The endpoints of one service port.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
}

impl EndpointSet {
    /// A set over these addresses.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            endpoints: addrs
                .into_iter()
                .map(|a| Arc::new(Endpoint::new(a)))
                .collect(),
        }
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Power of two choices among healthy endpoints not yet tried.
    fn pick(&self, tried: &[usize], now: Instant) -> Option<usize> {
        let healthy: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i) && !self.endpoints[*i].is_ejected(now))
            .collect();
        match healthy.len() {
            0 => None,
            1 => Some(healthy[0]),
            n => {
                let r = next_random();
                let a = healthy[(r % n as u64) as usize];
                let mut b = healthy[((r >> 32) % n as u64) as usize];
                if a == b {
                    b = healthy[(healthy.iter().position(|x| *x == a).unwrap_or(0) + 1) % n];
                }
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                Some(if eb.outstanding() < ea.outstanding() {
                    b
                } else {
                    a
                })
            }
        }
    }

    /// Connects to an endpoint, retrying on others (never the same one twice) until one
    /// accepts; failing endpoints are ejected.
    pub async fn connect(
        &self,
        connect_timeout: Duration,
        eject_for: Duration,
    ) -> Result<(TcpStream, Outstanding), String> {
        let mut tried = Vec::new();
        let mut last_error = String::from("no ready endpoint");
        while let Some(index) = self.pick(&tried, Instant::now()) {
            tried.push(index);
            let endpoint = &self.endpoints[index];
            endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
            let guard = Outstanding(endpoint.clone());
            match tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint.addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    endpoint.succeeded();
                    return Ok((stream, guard));
                }
                Ok(Err(e)) => last_error = format!("{}: {e}", endpoint.addr),
                Err(_) => last_error = format!("{}: connect timed out", endpoint.addr),
            }
            tracing::warn!(endpoint = %endpoint.addr, error = %last_error, "endpoint failed; ejecting");
            endpoint.eject(eject_for, Instant::now());
        }
        Err(last_error)
    }
}

#[derive(Debug)]
struct ServiceEntry {
    ports: HashMap<u16, Arc<EndpointSet>>,
    allow: Vec<AllowRule>,
}

/// The exported services, as the dispatcher looks them up.
#[derive(Debug, Default)]
pub struct ServiceTable {
    services: HashMap<(String, String), ServiceEntry>,
}

impl ServiceTable {
    /// Builds the table from exported services.
    pub fn new(services: &[ExportedService]) -> Self {
        let mut table = HashMap::new();
        for svc in services {
            let ready: Vec<_> = svc
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| e.address)
                .collect();
            let ports = svc
                .ports
                .iter()
                .filter(|p| p.protocol == "TCP")
                .map(|p| {
                    let target = p.target_port.unwrap_or(p.port);
                    let set = EndpointSet::new(ready.iter().map(|ip| SocketAddr::new(*ip, target)));
                    (p.port, Arc::new(set))
                })
                .collect();
            table.insert(
                (svc.namespace.clone(), svc.name.clone()),
                ServiceEntry {
                    ports,
                    allow: svc.allow.clone(),
                },
            );
        }
        Self { services: table }
    }

    /// The endpoints of one service port.
    pub fn endpoints(&self, namespace: &str, name: &str, port: u16) -> Option<Arc<EndpointSet>> {
        self.services
            .get(&(namespace.to_owned(), name.to_owned()))?
            .ports
            .get(&port)
            .cloned()
    }
}

/// Releases the stream's slots when the tunnelled connection ends.
#[derive(Debug)]
pub struct StreamPermit {
    dispatcher: Arc<DispatcherShared>,
    peer: SpiffeId,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.dispatcher.active.fetch_sub(1, Ordering::Relaxed);
        self.dispatcher.idle.notify_waiters();
        self.dispatcher.metrics.active_streams.dec();
        let mut per_peer = self
            .dispatcher
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// Holds a stream's slots (outstanding count, stream limits) until dropped.
#[derive(Debug)]
pub struct BackendGuard {
    _outstanding: Outstanding,
    _permit: StreamPermit,
}

/// A connected backend for one stream.
#[derive(Debug)]
pub struct Backend {
    /// The TCP connection to the endpoint.
    pub stream: TcpStream,
    /// The endpoint's address.
    pub endpoint: SocketAddr,
    /// Keep it as long as the tunnelled connection lives.
    pub guard: BackendGuard,
}

#[derive(Debug)]
struct DispatcherShared {
    cluster: String,
    table: RwLock<Arc<ServiceTable>>,
    limits: LimitsConfig,
    metrics: GatewayMetrics,
    active: AtomicUsize,
    per_peer: Mutex<HashMap<SpiffeId, usize>>,
    draining: AtomicBool,
    idle: tokio::sync::Notify,
}

/// Resolves, authorizes and connects streams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    shared: Arc<DispatcherShared>,
}

impl Dispatcher {
    /// A dispatcher for `cluster` over `services`.
    pub fn new(
        cluster: String,
        services: &[ExportedService],
        limits: LimitsConfig,
        metrics: GatewayMetrics,
    ) -> Self {
        Self {
            shared: Arc::new(DispatcherShared {
                cluster,
                table: RwLock::new(Arc::new(ServiceTable::new(services))),
                limits,
                metrics,
                active: AtomicUsize::new(0),
                per_peer: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Replaces the exported services (config reload, catalog update); streams in flight keep
    /// their backends.
    pub fn replace_services(&self, services: &[ExportedService]) {
        *self
            .shared
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(ServiceTable::new(services));
    }

    /// The current service table.
    pub fn table(&self) -> Arc<ServiceTable> {
        self.shared
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the gateway is draining (new streams are refused).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }

    /// Refuse new streams from now on (drain).
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    /// Waits until no stream is in flight, or `deadline` passes; returns the streams left.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let until = Instant::now() + deadline;
        loop {
            let notified = self.shared.idle.notified();
            let active = self.active_streams();
            if active == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.active_streams();
            }
        }
    }

    /// Streams in flight.
    pub fn active_streams(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// The metrics.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.shared.metrics
    }

    /// The limits.
    pub fn limits(&self) -> &LimitsConfig {
        &self.shared.limits
    }

    fn admit(&self, peer: &SpiffeId) -> Result<StreamPermit, Refusal> {
        let shared = &self.shared;
        if shared.draining.load(Ordering::Relaxed) {
            return Err(Refusal::new(ResultCode::Overloaded, "gateway is draining"));
        }
        let mut per_peer = shared
            .per_peer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = per_peer.entry(peer.clone()).or_insert(0);
        if *count >= shared.limits.max_streams_per_peer {
            return Err(Refusal::new(
                ResultCode::Overloaded,
                "too many streams from this peer",
            ));
        }
        if shared.active.load(Ordering::Relaxed) >= shared.limits.max_streams {
            return Err(Refusal::new(ResultCode::Overloaded, "too many streams"));
        }
        *count += 1;
        shared.active.fetch_add(1, Ordering::Relaxed);
        shared.metrics.active_streams.inc();
        Ok(StreamPermit {
            dispatcher: shared.clone(),
            peer: peer.clone(),
        })
    }

    /// Opens a backend for `target` on behalf of `peer`, or says why not.
    pub async fn open(&self, peer: &SpiffeId, target: &Target) -> Result<Backend, Refusal> {
        if let Some(cluster) = &target.cluster
            && cluster != &self.shared.cluster
        {
            return Err(Refusal::new(
                ResultCode::UnknownService,
                format!("this is cluster {}, not {cluster}", self.shared.cluster),
            ));
        }
        let table = self.table();
        let Some(entry) = table
            .services
            .get(&(target.namespace.clone(), target.service.clone()))
        else {
            return Err(Refusal::new(
                ResultCode::UnknownService,
                format!("{}/{} is not exported", target.namespace, target.service),
            ));
        };
        if !entry.allow.is_empty() && !entry.allow.iter().any(|rule| rule.matches(peer)) {
            tracing::warn!(peer = %peer, target = %target, "stream denied by policy");
            return Err(Refusal::new(
                ResultCode::Denied,
                format!(
                    "{peer} may not reach {}/{}",
                    target.namespace, target.service
                ),
            ));
        }
        let Some(endpoints) = entry.ports.get(&target.port).cloned() else {
            return Err(Refusal::new(
                ResultCode::UnknownService,
                format!(
                    "{}/{} has no port {}",
                    target.namespace, target.service, target.port
                ),
            ));
        };
        let permit = self.admit(peer)?;
        let limits = &self.shared.limits;
        match endpoints
            .connect(limits.connect_timeout.get(), limits.eject_for.get())
            .await
        {
            Ok((stream, outstanding)) => Ok(Backend {
                endpoint: outstanding.0.addr,
                stream,
                guard: BackendGuard {
                    _outstanding: outstanding,
                    _permit: permit,
                },
            }),
            Err(error) => Err(Refusal::new(ResultCode::NoHealthyEndpoint, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choices_prefer_the_less_loaded_endpoint() {
        let set = EndpointSet::new([
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ]);
        set.endpoints[0].outstanding.store(5, Ordering::Relaxed);
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(set.pick(&[], now), Some(1));
        }
        assert_eq!(
            set.pick(&[1], now),
            Some(0),
            "an untried endpoint is still chosen"
        );
        assert_eq!(set.pick(&[0, 1], now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backs_off_and_expires() {
        let set = EndpointSet::new(["127.0.0.1:1".parse().unwrap()]);
        let e = &set.endpoints[0];
        e.eject(Duration::from_secs(5), Instant::now());
        assert!(e.is_ejected(Instant::now()));
        assert_eq!(set.pick(&[], Instant::now()), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!e.is_ejected(Instant::now()));
        // A second consecutive failure doubles the back-off.
        e.eject(Duration::from_secs(5), Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(e.is_ejected(Instant::now()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!e.is_ejected(Instant::now()));
        e.succeeded();
        assert_eq!(e.consecutive_failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_failed_connect_is_retried_on_another_endpoint() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let set = EndpointSet::new([dead, live.local_addr().unwrap()]);
        // Make the dead endpoint the first choice.
        set.endpoints[1].outstanding.store(3, Ordering::Relaxed);
        let (stream, guard) = set
            .connect(Duration::from_secs(1), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live.local_addr().unwrap());
        assert!(
            set.endpoints[0].is_ejected(Instant::now()),
            "the failing endpoint is ejected"
        );
        assert_eq!(set.endpoints[1].outstanding(), 4);
        drop(guard);
        assert_eq!(set.endpoints[1].outstanding(), 3);
        // With every endpoint failing, the error names the last one tried.
        let only_dead = EndpointSet::new([dead]);
        let error = only_dead
            .connect(Duration::from_secs(1), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(error.contains(&dead.to_string()), "{error}");
    }
}
