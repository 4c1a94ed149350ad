//! The Isthmus node agent.
//!
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket ([`WorkloadApiServer`]), callers
//!   attested from `SO_PEERCRED` against the registration entries of this node.
//! - [`attest`]: a caller's `unix` selectors from its peer credentials and `/proc`.
//! - [`identities`]: the SVIDs and bundles of every entry assigned to the node, kept current from
//!   the trust broker and published as snapshots ([`WorkloadIdentities`]).
//! - [`outbound`]: connections to global services (explicit VIP listeners or the eBPF
//!   redirect), tunnelled to the serving cluster's gateway with the workload's own SVID, or
//!   connected directly to a local endpoint; [`peer`] names the process behind a TCP peer.
//! - [`redirect`]: the eBPF programs (cgroup connect4/connect6, sockops, getpeername4/6) that
//!   send connects to global-service VIPs to the agent, loaded with aya.
//!
//! Start with [`WorkloadIdentities::start`] and [`WorkloadApiServer::start_unix`].

pub mod attest;
pub mod config;
pub mod identities;
pub mod outbound;
pub mod peer;
pub mod redirect;
pub mod runtime;
pub mod sandbox;
pub mod workload_api;

pub use identities::{IdentitySnapshot, WorkloadIdentities};
pub use outbound::{Mode, Outbound, OutboundSettings};
pub use workload_api::WorkloadApiServer;
