//! The Isthmus node agent.
//!
//! - [`workload_api`]: the SPIFFE Workload API on a Unix socket, callers attested from
//!   `SO_PEERCRED` against the registration entries of this node.
//! - [`redirect`]: the eBPF programs (cgroup connect4/connect6, sockops, getpeername4/6) that
//!   send connects to global-service VIPs to the agent, loaded with aya.

pub mod redirect;
pub mod workload_api;
