//! Configuration of the `agent` component, loaded by [`isthmus_core::config::load`]: defaults <
//! TOML file < `ISTHMUS_AGENT_*` environment ([`ENV_BINDINGS`]) < flags, then
//! [`Validate::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;

use isthmus_core::TrustDomain;
use isthmus_core::config::{ConfigError, EnvBinding, HumanDuration, Validate};
use serde::{Deserialize, Serialize};

use crate::identities::IdentitySettings;
use crate::outbound::{Mode, OutboundSettings};
use crate::workload_api::{DEFAULT_SOCKET, WorkloadApiSettings};

/// `ISTHMUS_AGENT_CATALOG` sets `catalog`.
pub const ENV_CATALOG: &str = "ISTHMUS_AGENT_CATALOG";
/// `ISTHMUS_AGENT_SOCKET` sets `workload_api.socket`.
pub const ENV_SOCKET: &str = "ISTHMUS_AGENT_SOCKET";

/// The environment variables of the component and the fields they set.
pub const ENV_BINDINGS: &[EnvBinding] = &[
    EnvBinding {
        name: ENV_CATALOG,
        field: "catalog",
    },
    EnvBinding {
        name: ENV_SOCKET,
        field: "workload_api.socket",
    },
];

/// How the agent reaches its trust broker (standalone mode: join token attestation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker's issuance API.
    pub address: SocketAddr,
    /// The broker's bundle (SPIFFE JSON) to authenticate it at first contact.
    pub bundle_file: PathBuf,
    /// A file holding this node's one-time join token.
    pub join_token_file: PathBuf,
}

/// The Workload API (`[workload_api]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadApiConfig {
    /// Serve it (true) or not.
    pub enabled: bool,
    /// The Unix socket (`SPIFFE_ENDPOINT_SOCKET=unix://<socket>` for clients).
    pub socket: PathBuf,
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

/// How workload connections to global services reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutboundMode {
    /// A listener on every VIP:port.
    #[default]
    Explicit,
    /// eBPF redirect of a cgroup's connects (root).
    Transparent,
    /// No outbound handling.
    Off,
}

/// Outbound connections (`[outbound]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// `explicit`, `transparent` or `off`.
    pub mode: OutboundMode,
    /// Transparent mode: the cgroup (v2 directory) whose connects are redirected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Transparent mode: the agent's listener the redirect targets.
    pub listen: SocketAddr,
    /// The local UDP address of tunnel clients.
    pub quic_bind: SocketAddr,
    /// How long a direct connect to a local endpoint may take.
    pub connect_timeout: HumanDuration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        let settings = OutboundSettings::default();
        Self {
            mode: OutboundMode::Explicit,
            cgroup: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 15001)),
            quic_bind: settings.quic_bind,
            connect_timeout: HumanDuration(settings.connect_timeout),
        }
    }
}

/// The node agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This node's trust domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// The trust broker (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerConfig>,
    /// The cluster's gateway catalog API (required unless `outbound.mode = "off"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<SocketAddr>,
    /// How often the node's registration entries are re-read.
    pub entry_refresh: HumanDuration,
    /// The Workload API.
    pub workload_api: WorkloadApiConfig,
    /// Outbound connections.
    pub outbound: OutboundConfig,
}

impl AgentConfig {
    /// The identity settings this configuration describes.
    pub fn identity_settings(&self) -> IdentitySettings {
        IdentitySettings {
            entry_refresh: self.entry_refresh.0,
            ..IdentitySettings::default()
        }
    }

    /// The Workload API settings, or `None` when it is off.
    pub fn workload_api_settings(&self) -> Option<WorkloadApiSettings> {
        self.workload_api.enabled.then(|| WorkloadApiSettings {
            socket: self.workload_api.socket.clone(),
            ..WorkloadApiSettings::default()
        })
    }

    /// The outbound settings, or `None` when outbound handling is off.
    pub fn outbound_settings(&self) -> Option<OutboundSettings> {
        let mode = match self.outbound.mode {
            OutboundMode::Off => return None,
            OutboundMode::Explicit => Mode::Explicit,
            OutboundMode::Transparent => Mode::Transparent {
                cgroup: self.outbound.cgroup.clone()?,
                listen: self.outbound.listen,
            },
        };
        Some(OutboundSettings {
            mode,
            connect_timeout: self.outbound.connect_timeout.0,
            quic_bind: self.outbound.quic_bind,
            ..OutboundSettings::default()
        })
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            trust_domain: None,
            broker: None,
            catalog: None,
            entry_refresh: HumanDuration(IdentitySettings::default().entry_refresh),
            workload_api: WorkloadApiConfig::default(),
            outbound: OutboundConfig::default(),
        }
    }
}

impl Validate for AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.trust_domain.is_none() {
            return Err(ConfigError::validation("trust_domain", "required"));
        }
        if self.broker.is_none() {
            return Err(ConfigError::validation(
                "broker",
                "required: the agent obtains every identity from its trust broker",
            ));
        }
        if self.entry_refresh.0.is_zero() {
            return Err(ConfigError::validation(
                "entry_refresh",
                "0s would poll the broker without pause",
            ));
        }
        if self.outbound.mode != OutboundMode::Off && self.catalog.is_none() {
            return Err(ConfigError::validation(
                "catalog",
                "required unless outbound.mode = \"off\": routes come from the gateway's catalog API",
            ));
        }
        if self.outbound.mode == OutboundMode::Transparent && self.outbound.cgroup.is_none() {
            return Err(ConfigError::validation(
                "outbound.cgroup",
                "required with outbound.mode = \"transparent\"",
            ));
        }
        if self.workload_api.enabled && !self.workload_api.socket.is_absolute() {
            return Err(ConfigError::validation(
                "workload_api.socket",
                format!(
                    "{} is not an absolute path",
                    self.workload_api.socket.display()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            trust_domain: Some(TrustDomain::new("west.example").unwrap()),
            broker: Some(BrokerConfig {
                address: "127.0.0.1:8081".parse().unwrap(),
                bundle_file: "/etc/isthmus/bundle.json".into(),
                join_token_file: "/etc/isthmus/token".into(),
            }),
            catalog: Some("127.0.0.1:15012".parse().unwrap()),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn a_complete_configuration_validates_with_defaults() {
        let config = valid();
        config.validate().unwrap();
        assert_eq!(config.outbound_settings().unwrap().mode, Mode::Explicit);
        assert_eq!(
            config.workload_api_settings().unwrap().socket,
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert!(!config.entry_refresh.0.is_zero());
    }

    /// Breaks one field of a valid configuration.
    type Breakage = fn(&mut AgentConfig);

    #[test]
    fn invalid_values_name_their_field() {
        let cases: [(&str, Breakage); 6] = [
            ("trust_domain", |c| c.trust_domain = None),
            ("broker", |c| c.broker = None),
            ("entry_refresh", |c| {
                c.entry_refresh = HumanDuration::from_secs(0)
            }),
            ("catalog", |c| c.catalog = None),
            ("outbound.cgroup", |c| {
                c.outbound.mode = OutboundMode::Transparent
            }),
            ("workload_api.socket", |c| {
                c.workload_api.socket = "agent.sock".into();
            }),
        ];
        for (field, break_it) in cases {
            let mut config = valid();
            break_it(&mut config);
            let error = config.validate().unwrap_err();
            assert_eq!(error.field(), Some(field), "{error}");
        }
    }

    #[test]
    fn outbound_off_needs_no_catalog() {
        let mut config = valid();
        config.outbound.mode = OutboundMode::Off;
        config.catalog = None;
        config.validate().unwrap();
        assert!(config.outbound_settings().is_none());
    }
}
