//! Isthmus wire APIs: the trust broker's gRPC services (generated from `proto/` by protox and
//! tonic) and the SPIFFE-mTLS transport that carries them.
//!
//! - [`catalog`]: the `isthmus.catalog.v1` local catalog API.
//! - [`broker`]: the `isthmus.broker.v1` messages, clients and servers.
//! - [`broker_client`]: node attestation, SVID renewal and the bundle stream, client side.
//! - [`identity`]: a component's SVID and bundles from files or a trust broker.
//! - [`admin_http`]: `/metrics` and `/healthz/*` over plain HTTP.
//! - [`tunnel`]: the `isthmus/1` stream header codec between clients and gateways.
//! - [`tunnel_client`]: the pooled client that opens tunnels through gateways (QUIC, with
//!   an HTTP/2 CONNECT fallback over TCP).
//! - [`transport`]: SPIFFE-mTLS incoming connections and channels for tonic.

pub mod admin_http;
pub mod broker_client;
pub mod catalog_watch;
pub mod identity;
pub mod transport;
pub mod tunnel;
pub mod tunnel_client;

/// `isthmus.catalog.v1`: the gateway's local catalog for DNS servers and node agents.
pub mod catalog {
    #![expect(missing_docs, clippy::allow_attributes, reason = "generated code")]
    tonic::include_proto!("isthmus.catalog.v1");
}

/// `isthmus.broker.v1`: issuance, distribution and administration of the trust broker.
pub mod broker {
    #![expect(missing_docs, clippy::allow_attributes, reason = "generated code")]
    tonic::include_proto!("isthmus.broker.v1");
}
