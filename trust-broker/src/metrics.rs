//! The broker's own metrics (issuance, attestation, CA); federation and bundle-endpoint
//! metrics live with their modules.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use isthmus_core::telemetry::MetricsRegistry;

use crate::authority::Authority;
use crate::store::CaStatus;

/// Labels of issued SVIDs.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    /// `node` or `workload` (X.509-SVIDs), `jwt` (JWT-SVIDs for workload entries).
    pub kind: &'static str,
}

/// Labels of attestation results.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestLabels {
    /// The attestor.
    pub attestor: String,
    /// `ok`, `refused` or `error`.
    pub result: &'static str,
}

/// Labels of refused issuance requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    /// `not_a_node`, `entry_not_assigned`, `bad_csr`, `no_audience`.
    pub reason: &'static str,
}

/// Metrics of issuance and of the CA.
#[derive(Debug, Clone, Default)]
pub struct BrokerMetrics {
    /// SVIDs issued, by kind.
    pub svids_issued: Family<IssueLabels, Counter>,
    /// Node attestations, by attestor and result.
    pub attestations: Family<AttestLabels, Counter>,
    /// Refused issuance requests, by reason.
    pub issuance_denied: Family<DeniedLabels, Counter>,
    /// End of validity of the signing root, Unix seconds.
    pub ca_expiry: Gauge,
    /// Published bundle sequence.
    pub bundle_sequence: Gauge,
    /// Roots in the published bundle.
    pub roots: Gauge,
}

impl BrokerMetrics {
    /// Registers under `isthmus_broker_*`.
    pub fn register(registry: &mut MetricsRegistry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry("broker");
        sub.register(
            "svids_issued",
            "SVIDs issued, by kind (node, workload: X.509; jwt: JWT-SVIDs)",
            metrics.svids_issued.clone(),
        );
        sub.register(
            "attestations",
            "Node attestations, by attestor and result",
            metrics.attestations.clone(),
        );
        sub.register(
            "issuance_denied",
            "Refused issuance requests, by reason",
            metrics.issuance_denied.clone(),
        );
        sub.register(
            "ca_expiry_timestamp_seconds",
            "End of validity of the signing root",
            metrics.ca_expiry.clone(),
        );
        sub.register(
            "bundle_sequence",
            "Published spiffe_sequence",
            metrics.bundle_sequence.clone(),
        );
        sub.register(
            "bundle_roots",
            "Roots in the published bundle",
            metrics.roots.clone(),
        );
        metrics
    }

    /// Counts one issued SVID.
    pub fn issued(&self, kind: &'static str) {
        self.svids_issued.get_or_create(&IssueLabels { kind }).inc();
    }

    /// Counts one refused request.
    pub fn denied(&self, reason: &'static str) {
        self.issuance_denied
            .get_or_create(&DeniedLabels { reason })
            .inc();
    }

    /// Refreshes the CA gauges.
    pub fn observe(&self, authority: &Authority) {
        let roots = authority.roots();
        let active_expiry = roots
            .iter()
            .find(|r| r.status == CaStatus::Active)
            .map_or(0, |r| r.not_after.unix_timestamp());
        self.ca_expiry.set(active_expiry);
        self.roots
            .set(i64::try_from(roots.len()).unwrap_or(i64::MAX));
        self.bundle_sequence
            .set(i64::try_from(authority.sequence()).unwrap_or(i64::MAX));
    }
}
