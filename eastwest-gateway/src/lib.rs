//! The Isthmus east-west gateway: the only way into a cluster from another.
//!
//! Peers (node agents of other clusters, tunnelling for their workloads) connect over QUIC with
//! mutual TLS using their workloads' own SVIDs; each bidirectional stream carries one TCP
//! connection to an exported service, announced by an `isthmus/1` header
//! ([`isthmus_api::tunnel`]).
//!
//! - [`server`]: the QUIC front end and lifecycle ([`server::Gateway`]).
//! - [`h2`]: the TCP fallback front end (TLS + HTTP/2 `CONNECT`) on the same port number.
//! - [`dispatch`]: service lookup, authorization, limits and endpoint selection.
//! - [`identity`]: the SVID and bundles from files, reloaded when they change.
//! - [`peering`]: catalog exchange with peer gateways (snapshot, deltas, resume, staleness).
//! - [`status`]: the status document (peers, services, VIPs, conflicts).
//! - [`source`]: export sources (the configuration file, reloaded on change).
//! - [`catalog_api`]: the local catalog API (gRPC) for DNS servers and node agents.
//! - [`config`]: the gateway's configuration and exported services.
//! - [`metrics`]: the `isthmus_gateway_*` metrics.

pub mod catalog_api;
pub mod config;
pub mod dispatch;
pub mod h2;
pub mod identity;
pub mod metrics;
pub mod peering;
pub mod server;
pub mod source;
pub mod status;
