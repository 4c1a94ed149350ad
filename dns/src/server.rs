//! Serving the zone: a hickory-server [`RequestHandler`] that answers from the latest
//! [`ClusterSetZone`] in a [`tokio::sync::watch`], the UDP and TCP listeners around it, and
//! [`follow_catalog`], which keeps that watch current from the gateway's catalog API.
//!
//! Every query reads the zone the watch holds at that moment, so a catalog change is answered
//! from the next query on. Until the first catalog snapshot arrives the server answers
//! SERVFAIL rather than NXDOMAIN, so no resolver caches the absence of a service that exists,
//! and the "catalog sync" readiness blocker stays pending.
//!
//! Names outside the zone go to the [`Forwarder`] when one is configured (recursion
//! available, not authoritative) and are REFUSED otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{DNSClass, Name};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use isthmus_api::catalog as pb;
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_core::lifecycle::{DrainWatch, ReadinessBlocker};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tonic::transport::Channel;

pub use isthmus_api::catalog_watch::Backoff;

use crate::forward::{Forwarded, Forwarder};
use crate::metrics::{DnsMetrics, Source};
use crate::records::{Answer, AnswerKind, ClusterSetZone, ZoneSettings};

/// The smallest UDP payload every DNS client accepts (RFC 1035 4.2.1).
const MIN_UDP_PAYLOAD: u16 = 512;

/// The EDNS version this server speaks (RFC 6891).
const EDNS_VERSION: u8 = 0;

/// How often binding TCP to the port UDP got is retried when another socket holds it.
const BIND_ATTEMPTS: usize = 8;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot bind DNS {protocol} on {address}: {source}")]
    Bind {
        /// `UDP` or `TCP`.
        protocol: &'static str,
        /// The address asked for.
        address: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
    /// A listener task failed while serving.
    #[error("DNS server stopped with an error: {0}")]
    Serve(String),
}

/// The latest zone, `None` until the first catalog snapshot.
pub type ZoneReceiver = watch::Receiver<Option<Arc<ClusterSetZone>>>;

/// Where and how the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// UDP and TCP listen here; port 0 picks one port free for both.
    pub listen: SocketAddr,
    /// The largest UDP response sent to an EDNS client; larger answers are truncated (TC) and
    /// retried over TCP. 1232 avoids IP fragmentation (DNS flag day 2020).
    pub max_udp_payload: u16,
    /// A TCP connection that sends no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP sockets sharing the port (`SO_REUSEPORT`; the kernel spreads queries over them),
    /// each with its own receive task. 0 means one per available core.
    pub udp_sockets: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            max_udp_payload: 1232,
            tcp_idle_timeout: Duration::from_secs(10),
            udp_sockets: 0,
        }
    }
}

/// Publishes zones built from catalog snapshots into the watch the server reads.
#[derive(Debug)]
pub struct ZoneFeed {
    settings: ZoneSettings,
    sender: watch::Sender<Option<Arc<ClusterSetZone>>>,
    serial: u32,
    metrics: DnsMetrics,
    synced: Option<ReadinessBlocker>,
}

impl ZoneFeed {
    /// A feed for zones with `settings` and the receiver to hand to [`DnsServer::start`].
    pub fn new(settings: ZoneSettings) -> (Self, ZoneReceiver) {
        let (sender, receiver) = watch::channel(None);
        (
            Self {
                settings,
                sender,
                serial: 0,
                metrics: DnsMetrics::default(),
                synced: None,
            },
            receiver,
        )
    }

    /// Counts zone updates into `metrics`.
    pub fn with_metrics(mut self, metrics: DnsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Releases `blocker` (typically "catalog sync") when the first zone is published.
    pub fn with_readiness(mut self, blocker: ReadinessBlocker) -> Self {
        self.synced = Some(blocker);
        self
    }

    /// Builds the zone from `snapshot` and makes it the one answered from the next query on.
    /// Each publication bumps the SOA serial.
    pub fn publish(&mut self, snapshot: &pb::CatalogSnapshot) -> Arc<ClusterSetZone> {
        self.serial = self.serial.wrapping_add(1);
        let zone = Arc::new(ClusterSetZone::from_snapshot(
            snapshot,
            &self.settings,
            self.serial,
        ));
        for problem in zone.skipped() {
            tracing::warn!(problem = %problem, "catalog entry left out of the DNS zone");
        }
        tracing::debug!(
            services = zone.service_count(),
            serial = zone.serial(),
            "DNS zone updated"
        );
        self.sender.send_replace(Some(zone.clone()));
        self.metrics.zone_updates.inc();
        self.metrics
            .zone_services
            .set(i64::try_from(zone.service_count()).unwrap_or(i64::MAX));
        self.metrics.zone_serial.set(i64::from(zone.serial()));
        if let Some(blocker) = self.synced.take() {
            blocker.release();
        }
        zone
    }

    /// Another receiver of the same zones.
    pub fn subscribe(&self) -> ZoneReceiver {
        self.sender.subscribe()
    }
}

/// Answers queries from the latest zone, and forwards the others when it has a forwarder.
#[derive(Debug, Clone)]
pub struct ZoneHandler {
    zone: ZoneReceiver,
    max_udp_payload: u16,
    forwarder: Option<Forwarder>,
    origin: Option<Name>,
    metrics: DnsMetrics,
}

impl ZoneHandler {
    /// A handler reading `zone`, sending UDP responses of at most `max_udp_payload` bytes to
    /// EDNS clients (512 to others), refusing names outside the zone.
    pub fn new(zone: ZoneReceiver, max_udp_payload: u16) -> Self {
        Self {
            zone,
            max_udp_payload: max_udp_payload.max(MIN_UDP_PAYLOAD),
            forwarder: None,
            origin: None,
            metrics: DnsMetrics::default(),
        }
    }

    /// Forwards names outside the zone through `forwarder` instead of refusing them.
    pub fn with_forwarder(mut self, forwarder: Forwarder) -> Self {
        self.forwarder = Some(forwarder);
        self
    }

    /// The zone's origin, so names outside it are forwarded even before the first catalog
    /// snapshot (without it, every name answers SERVFAIL until then).
    pub fn with_origin(mut self, origin: Name) -> Self {
        self.origin = Some(origin);
        self
    }

    /// Counts queries into `metrics`.
    pub fn with_metrics(mut self, metrics: DnsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The response's OPT record: present iff the request had one (RFC 6891 6.1.1), with our
    /// payload limit so hickory truncates UDP answers at the smaller of both sides' limits.
    fn response_edns(&self, request: &Request) -> Option<Edns> {
        request.edns.as_ref().map(|requested| {
            let mut edns = Edns::new();
            edns.set_version(EDNS_VERSION);
            edns.set_max_payload(
                requested
                    .max_payload()
                    .clamp(MIN_UDP_PAYLOAD, self.max_udp_payload),
            );
            edns
        })
    }
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    code: ResponseCode,
    mut response_handle: R,
) -> ResponseInfo {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let response = builder.error_msg(&request.metadata, code);
    let metadata = *response.metadata();
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send DNS error response");
            failed(metadata)
        }
    }
}

fn failed(mut metadata: Metadata) -> ResponseInfo {
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[tonic::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let (info, source) = self.respond(request, response_handle).await;
        self.metrics.observe(
            request.queries.queries().first().map(|q| q.query_type()),
            info.response_code,
            source,
            started.elapsed().as_secs_f64(),
        );
        info
    }
}

impl ZoneHandler {
    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> (ResponseInfo, Source) {
        let edns = self.response_edns(request);
        if request
            .edns
            .as_ref()
            .is_some_and(|e| e.version() > EDNS_VERSION)
        {
            return (
                send_error(
                    request,
                    edns.as_ref(),
                    ResponseCode::BADVERS,
                    response_handle,
                )
                .await,
                Source::Server,
            );
        }
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            return (
                send_error(
                    request,
                    edns.as_ref(),
                    ResponseCode::NotImp,
                    response_handle,
                )
                .await,
                Source::Server,
            );
        }
        // One question per message is all anyone sends (RFC 9619).
        let [query] = request.queries.queries() else {
            return (
                send_error(
                    request,
                    edns.as_ref(),
                    ResponseCode::FormErr,
                    response_handle,
                )
                .await,
                Source::Server,
            );
        };
        if query.query_class() != DNSClass::IN {
            return (
                send_error(
                    request,
                    edns.as_ref(),
                    ResponseCode::Refused,
                    response_handle,
                )
                .await,
                Source::Server,
            );
        }
        let name = Name::from(query.name().clone());
        // Clone the Arc so the watch is not borrowed across the await below.
        let zone = self.zone.borrow().clone();
        let answer = zone
            .as_ref()
            .map(|zone| zone.answer(&name, query.query_type()));
        // Names outside the zone go upstream; before the first zone arrives the origin alone
        // says which names those are.
        let outside = match &answer {
            Some(answer) => answer.kind == AnswerKind::OutOfZone,
            None => self.origin.as_ref().is_some_and(|o| !o.zone_of(&name)),
        };
        if outside && let Some(forwarder) = &self.forwarder {
            let forwarded = forwarder.forward(&name, query.query_type()).await;
            return (
                send_forwarded(request, edns.as_ref(), &name, forwarded, response_handle).await,
                Source::Forward,
            );
        }
        // No zone yet: names of the zone are unknown (SERVFAIL, never NXDOMAIN).
        let Some(answer) = answer else {
            return (
                send_error(
                    request,
                    edns.as_ref(),
                    ResponseCode::ServFail,
                    response_handle,
                )
                .await,
                Source::Server,
            );
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.kind.response_code();
        metadata.authoritative = answer.kind.authoritative();
        metadata.recursion_available = self.forwarder.is_some();
        // Additional records are optional (RFC 2181 9): drop them rather than set TC when
        // only they overflow a UDP message. hickory sets TC when the sections do not fit.
        let additionals = if request.protocol() == Protocol::Udp
            && !answer.additionals.is_empty()
            && !fits_udp(request, edns.as_ref(), metadata, &answer)
        {
            &[][..]
        } else {
            answer.additionals.as_slice()
        };
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = edns.as_ref() {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            answer.authority.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, name = %name, "cannot send DNS response");
                failed(metadata)
            }
        };
        let source = if answer.kind == AnswerKind::OutOfZone {
            Source::Server
        } else {
            Source::Zone
        };
        (info, source)
    }
}

/// Sends what an upstream said: its records with recursion available and without AA, or its
/// negative answer with the SOA, or SERVFAIL/REFUSED when it failed.
async fn send_forwarded<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    name: &Name,
    forwarded: Forwarded,
    mut response_handle: R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = false;
    metadata.recursion_available = true;
    let (answers, authority) = match forwarded {
        Forwarded::Answer { answers } => (answers, Vec::new()),
        Forwarded::Negative { code, soa } => {
            metadata.response_code = code;
            (Vec::new(), soa.into_iter().map(|soa| *soa).collect())
        }
        Forwarded::Failed { code, reason } => {
            tracing::debug!(name = %name, reason = %reason, "forwarding failed");
            metadata.response_code = code;
            (Vec::new(), Vec::new())
        }
    };
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        answers.iter(),
        authority.iter(),
        std::iter::empty(),
        std::iter::empty(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, name = %name, "cannot send forwarded DNS response");
            failed(metadata)
        }
    }
}

/// Whether the whole answer, additionals included, fits the UDP payload limit: a trial
/// encoding, done only for the few answers that have additionals.
fn fits_udp(request: &Request, edns: Option<&Edns>, metadata: Metadata, answer: &Answer) -> bool {
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        answer.answers.iter(),
        answer.authority.iter(),
        std::iter::empty(),
        answer.additionals.iter(),
    );
    let mut buffer = Vec::with_capacity(usize::from(MIN_UDP_PAYLOAD));
    let mut encoder = BinEncoder::new(&mut buffer);
    encoder.set_max_size(edns.map_or(MIN_UDP_PAYLOAD, Edns::max_payload));
    response
        .destructive_emit(&mut encoder)
        .is_ok_and(|info| !info.truncation)
}

/// A running DNS server: UDP and TCP on one address.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<ZoneHandler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `settings.listen` (the same port for both) and serves `zone`,
    /// refusing names outside it.
    pub async fn start(settings: &ServerSettings, zone: ZoneReceiver) -> Result<Self, ServerError> {
        let handler = ZoneHandler::new(zone, settings.max_udp_payload);
        Self::start_with(settings, handler).await
    }

    /// Binds UDP and TCP on `settings.listen` (the same port for both) and serves with
    /// `handler` (built with a forwarder and metrics as needed).
    pub async fn start_with(
        settings: &ServerSettings,
        handler: ZoneHandler,
    ) -> Result<Self, ServerError> {
        let count = match settings.udp_sockets {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let (udp, tcp) = bind(settings.listen, count).await?;
        let addr = tcp.local_addr().map_err(|source| ServerError::Bind {
            protocol: "TCP",
            address: settings.listen,
            source,
        })?;
        let mut server = Server::new(handler);
        for socket in udp {
            server.register_socket(socket);
        }
        // One response in flight per connection is plenty: clients pipeline few queries.
        server.register_listener(tcp, settings.tcp_idle_timeout, 16);
        tracing::info!(address = %addr, "DNS server listening on UDP and TCP");
        Ok(Self { addr, server })
    }

    /// The address UDP and TCP are bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting queries and waits for the listeners to finish.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(|e| ServerError::Serve(e.to_string()))
    }
}

/// `count` UDP sockets sharing one port (`SO_REUSEPORT`; port 0 picks one), then TCP on the
/// same port; when another process holds that TCP port, a picked port is picked again.
async fn bind(
    listen: SocketAddr,
    count: usize,
) -> Result<(Vec<UdpSocket>, TcpListener), ServerError> {
    let udp_error = |address: SocketAddr| {
        move |source| ServerError::Bind {
            protocol: "UDP",
            address,
            source,
        }
    };
    let mut last_error = None;
    for _ in 0..BIND_ATTEMPTS {
        let first = reuse_port_udp(listen).map_err(udp_error(listen))?;
        let bound = first.local_addr().map_err(udp_error(listen))?;
        let mut sockets = vec![first];
        for _ in 1..count.max(1) {
            sockets.push(reuse_port_udp(bound).map_err(udp_error(bound))?);
        }
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((sockets, tcp)),
            Err(source) if listen.port() == 0 && source.kind() == std::io::ErrorKind::AddrInUse => {
                last_error = Some(source);
            }
            Err(source) => {
                return Err(ServerError::Bind {
                    protocol: "TCP",
                    address: bound,
                    source,
                });
            }
        }
    }
    Err(ServerError::Bind {
        protocol: "TCP",
        address: listen,
        source: last_error
            .unwrap_or_else(|| std::io::Error::other("BUG: no bind attempt was made")),
    })
}

/// A non-blocking UDP socket with `SO_REUSEPORT` bound to `address` (only sockets of the
/// same user can join its port group).
fn reuse_port_udp(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
}

/// Watches the gateway's catalog API on `client` (typically over
/// [`isthmus_api::transport::tls_channel`]) and publishes every snapshot into `feed` until
/// `drain` signals; see [`isthmus_api::catalog_watch::follow`] for the reconnection rules.
pub async fn follow_catalog(
    client: CatalogClient<Channel>,
    mut feed: ZoneFeed,
    backoff: Backoff,
    drain: DrainWatch,
) {
    isthmus_api::catalog_watch::follow(
        client,
        move |snapshot| {
            feed.publish(&snapshot);
        },
        backoff,
        drain,
    )
    .await;
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    #[tokio::test]
    async fn udp_sockets_share_the_port_tcp_listens_on() {
        let (udp, tcp) = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 3)
            .await
            .unwrap();
        let port = tcp.local_addr().unwrap().port();
        assert_eq!(udp.len(), 3);
        for socket in &udp {
            assert_eq!(socket.local_addr().unwrap().port(), port);
        }
        // Another socket of this user may join the group; a plain bind may not.
        assert!(
            std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_err(),
            "a socket without SO_REUSEPORT must not take the port"
        );
    }
}
