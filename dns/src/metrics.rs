//! The DNS server's metrics, registered under `isthmus_dns_*`: queries by type, response code
//! and source, a latency histogram per source, and the state of the zone.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::RecordType;
use isthmus_core::telemetry::MetricsRegistry;

/// Upper bounds of the latency buckets, in seconds: 10 µs to 2.5 s.
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Who answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The clusterset zone.
    Zone,
    /// An upstream server (or the forwarding cache).
    Forward,
    /// Refused or rejected before any lookup (malformed, other class, no zone yet, ...).
    Server,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Self::Zone => "zone",
            Self::Forward => "forward",
            Self::Server => "server",
        }
    }
}

/// Labels of the query counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// The question's type (`A`, `AAAA`, `SRV`, ...; `other` for rare ones).
    pub qtype: &'static str,
    /// The response code (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, `REFUSED`, ...).
    pub rcode: &'static str,
    /// `zone`, `forward` or `server`.
    pub source: &'static str,
}

/// Labels of the latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `zone`, `forward` or `server`.
    pub source: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The DNS server's metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    /// Queries answered, by type, response code and source.
    pub queries: Family<QueryLabels, Counter>,
    /// Time from receiving a query to handing its response to the socket, by source.
    pub latency: Family<SourceLabels, Histogram, fn() -> Histogram>,
    /// Catalog snapshots turned into zones.
    pub zone_updates: Counter,
    /// Services in the zone now.
    pub zone_services: Gauge,
    /// The zone's SOA serial.
    pub zone_serial: Gauge,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self {
            queries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            zone_updates: Counter::default(),
            zone_services: Gauge::default(),
            zone_serial: Gauge::default(),
        }
    }
}

impl DnsMetrics {
    /// Registers under `isthmus_dns_*`.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry("dns");
        sub.register(
            "queries",
            "DNS queries answered, by question type, response code and source",
            m.queries.clone(),
        );
        sub.register(
            "query_duration_seconds",
            "Time from a query's arrival to its response, by source",
            m.latency.clone(),
        );
        sub.register(
            "zone_updates",
            "Catalog snapshots turned into zones",
            m.zone_updates.clone(),
        );
        sub.register(
            "zone_services",
            "Services in the clusterset zone",
            m.zone_services.clone(),
        );
        sub.register(
            "zone_serial",
            "The zone's SOA serial",
            m.zone_serial.clone(),
        );
        m
    }

    /// Counts one answered query and its latency.
    pub fn observe(
        &self,
        qtype: Option<RecordType>,
        rcode: ResponseCode,
        source: Source,
        seconds: f64,
    ) {
        self.queries
            .get_or_create(&QueryLabels {
                qtype: qtype.map_or("none", type_label),
                rcode: rcode_label(rcode),
                source: source.label(),
            })
            .inc();
        self.latency
            .get_or_create(&SourceLabels {
                source: source.label(),
            })
            .observe(seconds);
    }
}

/// A static label per common type, so counting a query allocates nothing.
fn type_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::HTTPS => "HTTPS",
        RecordType::SVCB => "SVCB",
        RecordType::ANY => "ANY",
        RecordType::AXFR => "AXFR",
        RecordType::IXFR => "IXFR",
        _ => "other",
    }
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_queries_appear_in_the_exposition() {
        let mut registry = MetricsRegistry::new();
        let metrics = DnsMetrics::register(&mut registry);
        metrics.observe(
            Some(RecordType::A),
            ResponseCode::NoError,
            Source::Zone,
            0.000_2,
        );
        metrics.observe(
            Some(RecordType::SRV),
            ResponseCode::NXDomain,
            Source::Forward,
            0.003,
        );
        let text = registry.encode_text().unwrap();
        assert!(
            text.contains(
                "isthmus_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",source=\"zone\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "isthmus_dns_queries_total{qtype=\"SRV\",rcode=\"NXDOMAIN\",source=\"forward\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "isthmus_dns_query_duration_seconds_bucket{le=\"0.00025\",source=\"zone\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("isthmus_dns_query_duration_seconds_count{source=\"forward\"} 1"),
            "{text}"
        );
    }
}
