//! Workload API endpoint addresses, as `SPIFFE_ENDPOINT_SOCKET` carries them (SPIFFE Workload
//! Endpoint §4): `unix:///abs/path` (or `unix:/abs/path`) or `tcp://<ip>:<port>`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// The environment variable clients read when no address is configured.
pub const ENDPOINT_SOCKET_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Why an endpoint address was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workload endpoint address {input:?}: {reason}")]
pub struct EndpointError {
    /// The rejected value.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A parsed Workload API endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadEndpoint {
    /// A Unix domain socket at an absolute path.
    Unix(PathBuf),
    /// A TCP address (IP literal and port).
    Tcp(SocketAddr),
}

impl fmt::Display for WorkloadEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

impl WorkloadEndpoint {
    /// Parses an address per the Workload Endpoint specification.
    pub fn parse(input: &str) -> Result<Self, EndpointError> {
        let fail = |reason| EndpointError {
            input: input.to_owned(),
            reason,
        };
        if input.contains('?') {
            return Err(fail("a query is not allowed"));
        }
        if input.contains('#') {
            return Err(fail("a fragment is not allowed"));
        }
        if let Some(rest) = input.strip_prefix("unix:") {
            let path = match rest.strip_prefix("//") {
                Some(after) => {
                    // Authority must be empty: the path starts right after "unix://".
                    if !after.starts_with('/') {
                        return Err(fail("a unix address must not have an authority"));
                    }
                    after
                }
                None => rest,
            };
            if path.is_empty() {
                return Err(fail("a unix address needs a path"));
            }
            if !path.starts_with('/') {
                return Err(fail("a unix path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = input.strip_prefix("tcp:") {
            let authority = rest
                .strip_prefix("//")
                .ok_or_else(|| fail("a tcp address must be tcp://<ip>:<port>"))?;
            if authority.contains('/') {
                return Err(fail("a tcp address must not have a path"));
            }
            if authority.contains('@') {
                return Err(fail("userinfo is not allowed"));
            }
            if authority.is_empty() {
                return Err(fail("a tcp address needs a host"));
            }
            let addr: SocketAddr =
                authority
                    .parse()
                    .map_err(|_| match authority.rsplit_once(':') {
                        Some((host, _))
                            if host.trim_matches(['[', ']']).parse::<IpAddr>().is_err() =>
                        {
                            fail("the tcp host must be an IP address")
                        }
                        Some(_) => fail("the tcp port is invalid"),
                        None => fail("a tcp address needs a port"),
                    })?;
            return Ok(Self::Tcp(addr));
        }
        Err(fail("the scheme must be unix or tcp"))
    }
}
