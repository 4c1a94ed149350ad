//! The gateway's metrics, registered under `isthmus_gateway_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use isthmus_core::telemetry::MetricsRegistry;

/// Labels naming the peer's trust domain.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's trust domain.
    pub trust_domain: String,
}

/// Labels of stream results.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The peer's trust domain.
    pub trust_domain: String,
    /// `accepted`, `unknown_service`, `denied`, `no_healthy_endpoint`, `overloaded`,
    /// `malformed`.
    pub result: &'static str,
    /// `quic` or `h2`.
    pub transport: &'static str,
}

/// Labels of byte counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `to_backend` or `to_client`.
    pub direction: &'static str,
}

/// Labels of handshake failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// A `VerifyError::reason()` label, or `other`.
    pub reason: &'static str,
}

/// The gateway's metrics.
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    /// Accepted connections by peer trust domain.
    pub connections: Family<PeerLabels, Counter>,
    /// Open connections.
    pub active_connections: Gauge,
    /// Streams by peer trust domain, result and transport.
    pub streams: Family<StreamLabels, Counter>,
    /// Streams in flight.
    pub active_streams: Gauge,
    /// Payload bytes relayed.
    pub bytes: Family<BytesLabels, Counter>,
    /// Failed handshakes by reason.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
}

impl GatewayMetrics {
    /// Registers under `isthmus_gateway_*`.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry("gateway");
        sub.register(
            "connections",
            "Accepted connections by peer trust domain",
            m.connections.clone(),
        );
        sub.register(
            "active_connections",
            "Open connections",
            m.active_connections.clone(),
        );
        sub.register(
            "streams",
            "Streams by peer trust domain, result and transport",
            m.streams.clone(),
        );
        sub.register(
            "active_streams",
            "Streams in flight",
            m.active_streams.clone(),
        );
        sub.register("bytes", "Payload bytes relayed", m.bytes.clone());
        sub.register(
            "handshake_failures",
            "Failed handshakes by reason",
            m.handshake_failures.clone(),
        );
        m
    }

    /// Counts a stream result.
    pub fn stream(&self, trust_domain: &str, result: &'static str, transport: &'static str) {
        self.streams
            .get_or_create(&StreamLabels {
                trust_domain: trust_domain.to_owned(),
                result,
                transport,
            })
            .inc();
    }

    /// The payload byte counters of one tunnelled connection: (to the backend, to the client).
    pub fn byte_counters(&self) -> (Counter, Counter) {
        let counter = |direction| self.bytes.get_or_create(&BytesLabels { direction }).clone();
        (counter("to_backend"), counter("to_client"))
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .inc();
    }
}
