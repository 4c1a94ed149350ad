//! Configuration of the `dns` component, loaded by [`isthmus_core::config::load`]: defaults <
//! TOML file < `ISTHMUS_DNS_*` environment ([`ENV_BINDINGS`]) < flags, then
//! [`Validate::validate`].

use std::net::SocketAddr;

use isthmus_core::config::{ConfigError, EnvBinding, HumanDuration, Validate};
use serde::{Deserialize, Serialize};

use crate::forward::ForwardSettings;
use crate::records::{DEFAULT_MAX_RECORDS, DEFAULT_TTL, DEFAULT_ZONE, ZoneSettings};
use crate::server::ServerSettings;

/// `ISTHMUS_DNS_LISTEN` sets `listen`.
pub const ENV_LISTEN: &str = "ISTHMUS_DNS_LISTEN";
/// `ISTHMUS_DNS_ZONE` sets `zone`.
pub const ENV_ZONE: &str = "ISTHMUS_DNS_ZONE";
/// `ISTHMUS_DNS_TTL` sets `ttl`.
pub const ENV_TTL: &str = "ISTHMUS_DNS_TTL";
/// `ISTHMUS_DNS_CATALOG` sets `catalog`.
pub const ENV_CATALOG: &str = "ISTHMUS_DNS_CATALOG";

/// The environment variables of the component and the fields they set.
pub const ENV_BINDINGS: &[EnvBinding] = &[
    EnvBinding {
        name: ENV_LISTEN,
        field: "listen",
    },
    EnvBinding {
        name: ENV_ZONE,
        field: "zone",
    },
    EnvBinding {
        name: ENV_TTL,
        field: "ttl",
    },
    EnvBinding {
        name: ENV_CATALOG,
        field: "catalog",
    },
];

/// Forwarding of names outside the zone (`[forward]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// Forward names outside the zone upstream (true) or answer them REFUSED (false).
    pub enabled: bool,
    /// Upstream servers (`"ip:port"`); empty means the nameservers of /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Entries of the answer cache.
    pub cache_size: u64,
    /// How long one upstream attempt may take.
    pub timeout: HumanDuration,
    /// Attempts per upstream server.
    pub attempts: usize,
    /// Questions waiting on upstreams at once; more are answered SERVFAIL.
    pub max_in_flight: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        let settings = ForwardSettings::default();
        Self {
            enabled: true,
            servers: settings.servers,
            cache_size: settings.cache_size,
            timeout: HumanDuration(settings.timeout),
            attempts: settings.attempts,
            max_in_flight: settings.max_in_flight,
        }
    }
}

impl ForwardConfig {
    /// The forwarder settings, or `None` when forwarding is off.
    pub fn settings(&self) -> Option<ForwardSettings> {
        self.enabled.then(|| ForwardSettings {
            servers: self.servers.clone(),
            cache_size: self.cache_size,
            timeout: self.timeout.0,
            attempts: self.attempts,
            max_in_flight: self.max_in_flight,
        })
    }
}

/// The DNS server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// The clusterset zone (the MCS API requires `clusterset.local`).
    pub zone: String,
    /// TTL of every record, whole seconds.
    pub ttl: HumanDuration,
    /// At most this many records per answer (bounded work per query).
    pub max_records: usize,
    /// Largest UDP response to EDNS clients, in bytes (512..=65535).
    pub max_udp_payload: u16,
    /// Idle TCP connections are closed after this long.
    pub tcp_idle_timeout: HumanDuration,
    /// UDP sockets sharing the port (`SO_REUSEPORT`), each with its own receive task; 0 means
    /// one per available core.
    pub udp_sockets: usize,
    /// The gateway's local catalog API.
    pub catalog: Option<SocketAddr>,
    /// This cluster's trust domain (required with `catalog`: the catalog API is mTLS within
    /// the trust domain, served by `spiffe://<td>/ns/isthmus-system/sa/eastwest-gateway`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<isthmus_core::TrustDomain>,
    /// The DNS server's own SVID and bundles (files or a trust broker), to reach the catalog.
    pub identity: isthmus_api::identity::IdentityFiles,
    /// Names outside the zone.
    pub forward: ForwardConfig,
    /// Admin HTTP (`/metrics`, `/healthz/ready` with the "catalog sync" blocker); off when
    /// unset.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        let server = ServerSettings::default();
        Self {
            listen: server.listen,
            zone: DEFAULT_ZONE.trim_end_matches('.').to_owned(),
            ttl: HumanDuration::from_secs(u64::from(DEFAULT_TTL)),
            max_records: DEFAULT_MAX_RECORDS,
            max_udp_payload: server.max_udp_payload,
            tcp_idle_timeout: HumanDuration(server.tcp_idle_timeout),
            udp_sockets: server.udp_sockets,
            catalog: None,
            trust_domain: None,
            identity: isthmus_api::identity::IdentityFiles::default(),
            forward: ForwardConfig::default(),
            metrics_listen: None,
        }
    }
}

impl DnsConfig {
    /// The zone settings this configuration describes.
    pub fn zone_settings(&self) -> Result<ZoneSettings, ConfigError> {
        let ttl = u32::try_from(self.ttl.0.as_secs()).map_err(|_| {
            ConfigError::validation(
                "ttl",
                format!("{} s exceeds 2^32-1 s", self.ttl.0.as_secs()),
            )
        })?;
        ZoneSettings::new(&self.zone, ttl, self.max_records).map_err(|e| {
            let field = match e {
                crate::records::RecordsError::NoRecordsAllowed(_) => "max_records",
                crate::records::RecordsError::InvalidZone { .. } => "zone",
            };
            ConfigError::validation(field, e.to_string())
        })
    }

    /// The listener settings this configuration describes.
    pub fn server_settings(&self) -> ServerSettings {
        ServerSettings {
            listen: self.listen,
            max_udp_payload: self.max_udp_payload,
            tcp_idle_timeout: self.tcp_idle_timeout.0,
            udp_sockets: self.udp_sockets,
        }
    }
}

impl Validate for DnsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.0.subsec_nanos() != 0 {
            return Err(ConfigError::validation(
                "ttl",
                format!("{:?} is not a whole number of seconds", self.ttl.0),
            ));
        }
        if self.max_udp_payload < 512 {
            return Err(ConfigError::validation(
                "max_udp_payload",
                format!(
                    "{} is below the 512 bytes every client accepts",
                    self.max_udp_payload
                ),
            ));
        }
        if self.tcp_idle_timeout.0.is_zero() {
            return Err(ConfigError::validation(
                "tcp_idle_timeout",
                "0s would close every connection before its first query",
            ));
        }
        if self.forward.enabled {
            if self.forward.timeout.0.is_zero() {
                return Err(ConfigError::validation(
                    "forward.timeout",
                    "0s would fail every forwarded question",
                ));
            }
            if self.forward.attempts == 0 {
                return Err(ConfigError::validation(
                    "forward.attempts",
                    "at least one attempt is needed",
                ));
            }
            if self.forward.max_in_flight == 0 {
                return Err(ConfigError::validation(
                    "forward.max_in_flight",
                    "0 would answer every forwarded question SERVFAIL",
                ));
            }
            if let Some(looped) = self
                .forward
                .servers
                .iter()
                .find(|s| forwards_to_self(s, self.listen))
            {
                return Err(ConfigError::validation(
                    "forward.servers",
                    format!("{looped} is this server's own listen address: queries would loop"),
                ));
            }
        }
        if self.catalog.is_some() {
            let own = self
                .trust_domain
                .as_ref()
                .ok_or_else(|| ConfigError::validation("trust_domain", "required with catalog"))?;
            self.identity.require(own)?;
        }
        self.zone_settings().map(drop)
    }
}

/// Whether forwarding to `server` would reach the server listening on `listen`.
fn forwards_to_self(server: &SocketAddr, listen: SocketAddr) -> bool {
    server.port() == listen.port()
        && (server.ip() == listen.ip()
            || (listen.ip().is_unspecified()
                && (server.ip().is_loopback() || server.ip().is_unspecified())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_off_has_no_settings_and_skips_its_checks() {
        let mut config = DnsConfig::default();
        assert!(
            config.forward.settings().is_some(),
            "forwarding is on by default"
        );
        config.forward.enabled = false;
        config.forward.attempts = 0;
        config.validate().unwrap();
        assert_eq!(config.forward.settings(), None);
    }

    #[test]
    fn defaults_validate_and_describe_clusterset_local() {
        let config = DnsConfig::default();
        config.validate().unwrap();
        let zone = config.zone_settings().unwrap();
        assert_eq!(zone.origin().to_ascii(), "clusterset.local.");
        assert_eq!(zone.ttl(), 5);
    }

    /// Breaks one field of a valid configuration.
    type Breakage = fn(&mut DnsConfig);

    #[test]
    fn invalid_values_name_their_field() {
        let cases: [(&str, Breakage); 8] = [
            ("ttl", |c| c.ttl = HumanDuration::from_millis(1500)),
            ("max_udp_payload", |c| c.max_udp_payload = 100),
            ("max_records", |c| c.max_records = 0),
            ("zone", |c| c.zone = "a..b".into()),
            ("forward.timeout", |c| {
                c.forward.timeout = HumanDuration::from_secs(0)
            }),
            ("forward.attempts", |c| c.forward.attempts = 0),
            ("forward.max_in_flight", |c| c.forward.max_in_flight = 0),
            ("forward.servers", |c| {
                c.listen = "127.0.0.1:5300".parse().unwrap();
                c.forward.servers = vec!["127.0.0.1:5300".parse().unwrap()];
            }),
        ];
        for (field, break_it) in cases {
            let mut config = DnsConfig::default();
            break_it(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.field(), Some(field), "{error}");
        }
    }
}
