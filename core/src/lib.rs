//! The core of Isthmus: SPIFFE identity and the scaffolding every service shares.
//!
//! - Identity: [`SpiffeId`] and [`TrustDomain`] ([`id`]), X.509-SVIDs ([`svid`]), the
//!   per-trust-domain [`CertificateAuthority`] ([`ca`]), SPIFFE bundles ([`bundle`]) and the
//!   live [`TrustStore`] ([`trust`]), JWT-SVIDs minted by a [`JwtSigner`] and validated against
//!   a bundle's JWT authorities ([`jwt`]).
//! - Verification: [`verify::verify_svid_chain`] checks a chain against the bundle of the
//!   peer's own trust domain; [`tls`] wraps it into rustls verifiers (usable with quinn) and
//!   serves the current SVID from an [`SvidSource`] so rotation keeps live connections.
//! - Catalog: the global service model ([`catalog`]): MCS merge rules, endpoint selection
//!   by affinity, ClusterSetIP allocation.
//! - Scaffolding: layered configuration ([`config`]), lifecycle and readiness ([`lifecycle`]),
//!   tracing and metrics ([`telemetry`]).
//!
//! Start with [`ca::CertificateAuthority::issue_svid`] and [`tls::server_config`].
//! This crate knows nothing of tonic, kube, hickory, quinn, sled or aya.

pub mod bundle;
pub mod ca;
pub mod catalog;
pub mod config;
pub mod endpoint;
pub mod id;
pub mod jwt;
pub mod lifecycle;
pub mod source;
pub mod svid;
pub mod telemetry;
pub mod tls;
pub mod trust;
pub mod verify;
pub mod x509;

pub use bundle::Bundle;
pub use ca::CertificateAuthority;
pub use id::{SpiffeId, TrustDomain};
pub use jwt::{JwtSigner, JwtSvid};
pub use source::SvidSource;
pub use svid::X509Svid;
pub use trust::{BundleSet, TrustStore};
