//! Forwarding names outside the clusterset zone to upstream servers through hickory-resolver,
//! whose cache answers repeated questions (positive answers for their TTL, negative ones for
//! the SOA minimum, RFC 2308).
//!
//! The upstream servers are configured (`forward.servers`) or, when none are, the
//! `nameserver` lines of `/etc/resolv.conf`. Names are forwarded fully qualified, so no search
//! domain and no hosts file applies. At most `max_in_flight` questions wait on upstreams at
//! once; past that a question is answered SERVFAIL at once rather than queued without bound.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, Record, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::Semaphore;

/// Where the system's upstream servers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Errors setting up forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream server was configured and the system configuration names none.
    #[error("no upstream DNS server: none configured and {path} names none")]
    NoUpstream {
        /// The resolv.conf read.
        path: String,
    },
    /// The system configuration could not be read.
    #[error("cannot read upstream DNS servers from {path}: {reason}")]
    SystemConfig {
        /// The resolv.conf read.
        path: String,
        /// Why reading or parsing failed.
        reason: String,
    },
    /// hickory-resolver refused the configuration.
    #[error("cannot build the forwarding resolver: {0}")]
    Resolver(String),
}

/// How names outside the zone are forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSettings {
    /// Upstream servers, asked over UDP with TCP for truncated answers; empty means the
    /// `nameserver` lines of [`RESOLV_CONF`].
    pub servers: Vec<SocketAddr>,
    /// Entries of the answer cache (one per name and type).
    pub cache_size: u64,
    /// How long one upstream attempt may take.
    pub timeout: Duration,
    /// Attempts per upstream before the next one is asked.
    pub attempts: usize,
    /// Questions waiting on upstreams at once; more are answered SERVFAIL.
    pub max_in_flight: usize,
}

impl Default for ForwardSettings {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            cache_size: 10_000,
            timeout: Duration::from_secs(2),
            attempts: 2,
            max_in_flight: 1_024,
        }
    }
}

impl ForwardSettings {
    /// The servers to forward to: the configured ones, else those of `resolv_conf`.
    pub fn upstreams(&self, resolv_conf: &Path) -> Result<Vec<SocketAddr>, ForwardError> {
        if !self.servers.is_empty() {
            return Ok(self.servers.clone());
        }
        let path = resolv_conf.display().to_string();
        let data = std::fs::read(resolv_conf).map_err(|e| ForwardError::SystemConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let names_servers = String::from_utf8_lossy(&data)
            .lines()
            .any(|line| line.trim_start().starts_with("nameserver"));
        if !names_servers {
            return Err(ForwardError::NoUpstream { path });
        }
        let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|e| {
            ForwardError::SystemConfig {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let servers: Vec<SocketAddr> = config
            .name_servers()
            .iter()
            .filter_map(|server| {
                let port = server.connections.first()?.port;
                Some(SocketAddr::new(server.ip, port))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if servers.is_empty() {
            return Err(ForwardError::NoUpstream { path });
        }
        Ok(servers)
    }
}

/// The outcome of forwarding one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarded {
    /// The upstream answered with records (CNAME chains included).
    Answer {
        /// The answer section.
        answers: Vec<Record>,
    },
    /// The upstream said NXDOMAIN or NODATA; `soa` lets resolvers cache that (RFC 2308).
    Negative {
        /// NXDomain or NoError.
        code: ResponseCode,
        /// The SOA of the zone that holds the name, when the upstream sent one.
        soa: Option<Box<Record>>,
    },
    /// No usable answer: the upstream failed, timed out or refused, or too many questions are
    /// waiting already.
    Failed {
        /// The code to answer with (SERVFAIL, or REFUSED when the upstream refused).
        code: ResponseCode,
        /// Why, for logs.
        reason: String,
    },
}

/// Forwards questions to upstream servers, with a cache.
#[derive(Clone)]
pub struct Forwarder {
    resolver: Arc<TokioResolver>,
    upstreams: Arc<[SocketAddr]>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstreams", &self.upstreams)
            .finish()
    }
}

impl Forwarder {
    /// A forwarder to `settings.servers`, or to the servers of [`RESOLV_CONF`] when none are
    /// configured.
    pub fn new(settings: &ForwardSettings) -> Result<Self, ForwardError> {
        Self::with_resolv_conf(settings, Path::new(RESOLV_CONF))
    }

    /// [`Forwarder::new`] reading `resolv_conf` instead of the system's.
    pub fn with_resolv_conf(
        settings: &ForwardSettings,
        resolv_conf: &Path,
    ) -> Result<Self, ForwardError> {
        let upstreams = settings.upstreams(resolv_conf)?;
        let name_servers = upstreams
            .iter()
            .map(|upstream| {
                let mut udp = ConnectionConfig::udp();
                udp.port = upstream.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = upstream.port();
                NameServerConfig::new(upstream.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.cache_size = settings.cache_size;
        options.timeout = settings.timeout;
        options.attempts = settings.attempts;
        options.use_hosts_file = ResolveHosts::Never;
        options.recursion_desired = true;
        options.preserve_intermediates = true;
        options.ndots = 0;
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| ForwardError::Resolver(e.to_string()))?;
        Ok(Self {
            resolver: Arc::new(resolver),
            upstreams: upstreams.into(),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
        })
    }

    /// The servers questions go to.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Forwards one question (answered from the cache when it can be).
    pub async fn forward(&self, name: &Name, query_type: RecordType) -> Forwarded {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Forwarded::Failed {
                code: ResponseCode::ServFail,
                reason: "too many questions waiting on upstream servers".into(),
            };
        };
        let mut name = name.clone();
        name.set_fqdn(true);
        match self.resolver.lookup(name, query_type).await {
            Ok(lookup) => Forwarded::Answer {
                answers: lookup.answers().to_vec(),
            },
            Err(NetError::Dns(DnsError::NoRecordsFound(no_records))) => {
                match no_records.response_code {
                    code @ (ResponseCode::NXDomain | ResponseCode::NoError) => {
                        Forwarded::Negative {
                            code,
                            soa: no_records
                                .soa
                                .map(|soa| Box::new(soa.as_ref().clone().into_record_of_rdata())),
                        }
                    }
                    code => Forwarded::Failed {
                        code: upstream_failure_code(code),
                        reason: format!("upstream answered {code}"),
                    },
                }
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Forwarded::Failed {
                code: upstream_failure_code(code),
                reason: format!("upstream answered {code}"),
            },
            Err(e) => Forwarded::Failed {
                code: ResponseCode::ServFail,
                reason: e.to_string(),
            },
        }
    }
}

/// REFUSED from upstream is passed on; every other failure is our SERVFAIL.
fn upstream_failure_code(code: ResponseCode) -> ResponseCode {
    if code == ResponseCode::Refused {
        ResponseCode::Refused
    } else {
        ResponseCode::ServFail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_servers_win_over_resolv_conf() {
        let settings = ForwardSettings {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], 5353))],
            ..ForwardSettings::default()
        };
        let servers = settings
            .upstreams(Path::new("/nonexistent/resolv.conf"))
            .unwrap();
        assert_eq!(servers, vec![SocketAddr::from(([127, 0, 0, 1], 5353))]);
    }

    #[test]
    fn resolv_conf_nameservers_are_the_default() {
        let dir = std::env::temp_dir().join(format!("isthmus-dns-fwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "search example.com\nnameserver 127.0.0.53\nnameserver ::1\noptions ndots:5\n",
        )
        .unwrap();
        let servers = ForwardSettings::default().upstreams(&path).unwrap();
        assert_eq!(
            servers,
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        std::fs::write(&path, "search example.com\n").unwrap();
        let error = ForwardSettings::default().upstreams(&path).unwrap_err();
        assert!(matches!(error, ForwardError::NoUpstream { .. }), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
