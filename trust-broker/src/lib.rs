//! The Isthmus trust broker: the CA of one trust domain and the part that federates trust
//! domains, so clusters with different roots trust each other without sharing a CA.
//!
//! - [`api`]: the gRPC services: issuance, bundle distribution, administration.
//! - [`authority`]: the CA set, issuance with durable serials, and root rotation.
//! - [`config`]: the broker's layered configuration.
//! - [`runtime`]: a running broker assembled from its configuration ([`runtime::Broker`]).
//! - [`store`]: durable state in sled (CA set, serials, entries, join tokens, federation).
//! - [`metrics`]: issuance and CA metrics.
//! - [`model`]: federation relationships (SPIRE's field names), registration entries.
//! - [`endpoint`]: the SPIFFE bundle endpoint (`https_spiffe` and `https_web` profiles).
//! - [`federation`]: fetching and refreshing foreign bundles, keeping the last good one.

pub mod api;
pub mod authority;
pub mod config;
pub mod endpoint;
pub mod federation;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod store;

pub use endpoint::{BundleEndpoint, EndpointIdentity, EndpointMetrics};
pub use federation::{
    BundleFetcher, Federation, FederationContext, FederationError, FederationStatusBoard,
    FetchOutcome, FetchSettings,
};
