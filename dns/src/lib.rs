//! The Isthmus DNS server: answers the `clusterset.local.` zone exactly as the Kubernetes
//! Multi-Cluster Services DNS specification v1.0.0 says, from the global service catalog that
//! the cluster's east-west gateway streams over its local catalog API.
//!
//! Start at [`ClusterSetZone::answer`], the pure function that answers one question from a
//! catalog snapshot; [`DnsServer`] serves it over UDP and TCP with hickory-server, and
//! [`follow_catalog`] keeps the zone current from the gateway.
//!
//! - [`records`]: the zone model built from an `isthmus.catalog.v1` snapshot and its answers
//!   (A/AAAA, SRV, PTR, TXT, SOA, NS; NXDOMAIN versus NODATA).
//! - [`server`]: the request handler, the UDP/TCP listeners, and the catalog follower that
//!   feeds a [`tokio::sync::watch`] of zones.
//! - [`config`]: the layered configuration of the `dns` component.
//!
//! - [`forward`]: names outside the zone (and reverse names of addresses the zone does not
//!   own) go to upstream servers through hickory-resolver with its cache, or are REFUSED
//!   when forwarding is off.
//! - [`metrics`]: queries by type, response code and source; latency histograms.

pub mod config;
pub mod forward;
pub mod metrics;
pub mod records;
pub mod server;

pub use config::DnsConfig;
pub use forward::{ForwardError, ForwardSettings, Forwarded, Forwarder};
pub use metrics::DnsMetrics;
pub use records::{Answer, AnswerKind, ClusterSetZone, RecordsError, ZoneSettings};
pub use server::{
    Backoff, DnsServer, ServerError, ServerSettings, ZoneFeed, ZoneHandler, ZoneReceiver,
    follow_catalog,
};
