//! The integration tests of Isthmus: one binary that pulls in every module, so the suite links
//! once. Tiers: vectors and in-process checks, then services on 127.0.0.1 (port 0), then
//! privileged network-namespace and BPF tests (root; required under `CI=true`).
#![expect(
    clippy::unwrap_used,
    reason = "integration tests panic with the failing value by design"
)]

mod support;

mod agent;
mod agent_transparent;
mod broker;
mod broker_client;
mod broker_durability;
mod dns;
mod dns_forward;
mod federation;
mod gateway;
mod gateway_fallback;
mod jwt_svid;
mod lab;
mod mtls;
mod peering;
mod spiffe_vectors;
