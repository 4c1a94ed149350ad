//! The broker's configuration: defaults < TOML file < `ISTHMUS_BROKER_*` environment < flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use isthmus_core::TrustDomain;
use isthmus_core::config::{ConfigError, EnvBinding, HumanDuration, Validate};
use serde::{Deserialize, Serialize};

use crate::model::FederatedTrustDomain;

/// Which profile the bundle endpoint serves (SPIFFE Federation §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EndpointProfile {
    /// Served with the bundle-endpoint SVID `spiffe://<td>/isthmus/bundle-endpoint`.
    #[default]
    #[serde(rename = "https_spiffe")]
    HttpsSpiffe,
    /// Served with a configured Web PKI certificate and key.
    #[serde(rename = "https_web")]
    HttpsWeb,
}

/// The bundle endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundleEndpointConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Profile served.
    pub profile: EndpointProfile,
    /// `spiffe_refresh_hint` published with the bundle.
    pub refresh_hint: HumanDuration,
    /// Certificate chain (PEM) for `https_web`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM, PKCS#8) for `https_web`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for BundleEndpointConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            profile: EndpointProfile::HttpsSpiffe,
            refresh_hint: HumanDuration::from_secs(300),
            cert_file: None,
            key_file: None,
        }
    }
}

/// How foreign bundles are fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationFetchConfig {
    /// Lower bound on the polling interval, whatever the peer's refresh hint says.
    pub min_refresh: HumanDuration,
    /// Upper bound on the polling interval.
    pub max_refresh: HumanDuration,
    /// Timeout of one fetch, connection to last byte.
    pub timeout: HumanDuration,
    /// Extra trusted roots (PEM) for `https_web` endpoints, beside the Mozilla roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_roots_file: Option<PathBuf>,
}

impl Default for FederationFetchConfig {
    fn default() -> Self {
        Self {
            min_refresh: HumanDuration::from_secs(5),
            max_refresh: HumanDuration::from_secs(3600),
            timeout: HumanDuration::from_secs(10),
            web_roots_file: None,
        }
    }
}

/// The issuance API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// gRPC over TLS for nodes and gateways.
    pub listen: SocketAddr,
    /// Unix socket of the admin API (mode 0600); default `<data_dir>/admin.sock`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    /// Lifetime of node SVIDs.
    pub node_svid_ttl: HumanDuration,
    /// Plain-HTTP `/metrics` and `/healthz/*` (disabled when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            admin_socket: None,
            node_svid_ttl: HumanDuration::from_secs(3600),
            metrics_listen: None,
        }
    }
}

/// The whole broker configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// This broker's trust domain (required; never inferred).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<TrustDomain>,
    /// Where the store lives (directory 0700, files 0600).
    pub data_dir: PathBuf,
    /// Lifetime of each root CA; rotation prepares the next at half-life.
    pub ca_ttl: HumanDuration,
    /// Default lifetime of issued SVIDs.
    pub leaf_ttl: HumanDuration,
    /// Longest SVID lifetime an entry may ask for (X.509 and JWT).
    pub max_leaf_ttl: HumanDuration,
    /// Lifetime of JWT-SVIDs for entries without their own TTL (SPIRE's default, 5 minutes).
    pub jwt_svid_ttl: HumanDuration,
    /// How long a root requested with `rotate-ca` is published before it signs, so that
    /// federated peers fetch it first (SPIFFE Federation §4.1 suggests 3–5 refresh hints).
    pub rotation_activation_delay: HumanDuration,
    /// Grace period for in-flight requests on shutdown.
    pub shutdown_grace: HumanDuration,
    /// The bundle endpoint.
    pub bundle_endpoint: BundleEndpointConfig,
    /// The issuance and admin APIs.
    pub api: ApiConfig,
    /// Fetch behaviour for federated bundles.
    pub federation_fetch: FederationFetchConfig,
    /// Federation relationships declared in the file (SPIRE's field names). Relationships
    /// added at runtime with `isthmus broker federation add` are kept in the store.
    pub federation: Vec<FederatedTrustDomain>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            trust_domain: None,
            data_dir: PathBuf::from("/var/lib/isthmus/broker"),
            ca_ttl: HumanDuration(isthmus_core::ca::DEFAULT_CA_TTL),
            leaf_ttl: HumanDuration(isthmus_core::ca::DEFAULT_LEAF_TTL),
            max_leaf_ttl: HumanDuration::from_secs(4 * 3600),
            jwt_svid_ttl: HumanDuration(isthmus_core::jwt::DEFAULT_JWT_TTL),
            rotation_activation_delay: HumanDuration::from_secs(900),
            shutdown_grace: HumanDuration::from_secs(10),
            bundle_endpoint: BundleEndpointConfig::default(),
            api: ApiConfig::default(),
            federation_fetch: FederationFetchConfig::default(),
            federation: Vec::new(),
        }
    }
}

/// Environment variables the broker reads.
pub const BROKER_ENV: &[EnvBinding] = &[
    EnvBinding {
        name: "ISTHMUS_BROKER_TRUST_DOMAIN",
        field: "trust_domain",
    },
    EnvBinding {
        name: "ISTHMUS_BROKER_DATA_DIR",
        field: "data_dir",
    },
    EnvBinding {
        name: "ISTHMUS_BROKER_BUNDLE_ENDPOINT_LISTEN",
        field: "bundle_endpoint.listen",
    },
    EnvBinding {
        name: "ISTHMUS_BROKER_API_LISTEN",
        field: "api.listen",
    },
    EnvBinding {
        name: "ISTHMUS_BROKER_CA_TTL",
        field: "ca_ttl",
    },
    EnvBinding {
        name: "ISTHMUS_BROKER_LEAF_TTL",
        field: "leaf_ttl",
    },
];

impl BrokerConfig {
    /// The configured trust domain (present once validated).
    pub fn trust_domain(&self) -> Result<&TrustDomain, ConfigError> {
        self.trust_domain
            .as_ref()
            .ok_or_else(|| ConfigError::validation("trust_domain", "required"))
    }

    /// The admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.api
            .admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }
}

impl Validate for BrokerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let own = self.trust_domain()?;
        if self.leaf_ttl.get().is_zero() {
            return Err(ConfigError::validation("leaf_ttl", "must be positive"));
        }
        if self.max_leaf_ttl.get() < self.leaf_ttl.get() {
            return Err(ConfigError::validation(
                "max_leaf_ttl",
                format!("must be at least leaf_ttl ({})", self.leaf_ttl),
            ));
        }
        if self.jwt_svid_ttl.get() < std::time::Duration::from_secs(1) {
            return Err(ConfigError::validation(
                "jwt_svid_ttl",
                "must be at least one second",
            ));
        }
        if self.jwt_svid_ttl > self.max_leaf_ttl {
            return Err(ConfigError::validation(
                "jwt_svid_ttl",
                format!("must be at most max_leaf_ttl ({})", self.max_leaf_ttl),
            ));
        }
        // A root must outlive the longest leaf it signs by a margin, or rotation could not
        // keep leaves inside their issuer's validity.
        if self.ca_ttl.get() < self.max_leaf_ttl.get() * 2 {
            return Err(ConfigError::validation(
                "ca_ttl",
                format!(
                    "must be at least twice max_leaf_ttl ({})",
                    self.max_leaf_ttl
                ),
            ));
        }
        if self.bundle_endpoint.refresh_hint.get().is_zero() {
            return Err(ConfigError::validation(
                "bundle_endpoint.refresh_hint",
                "must be positive",
            ));
        }
        if self.bundle_endpoint.profile == EndpointProfile::HttpsWeb {
            if self.bundle_endpoint.cert_file.is_none() {
                return Err(ConfigError::validation(
                    "bundle_endpoint.cert_file",
                    "required for profile https_web",
                ));
            }
            if self.bundle_endpoint.key_file.is_none() {
                return Err(ConfigError::validation(
                    "bundle_endpoint.key_file",
                    "required for profile https_web",
                ));
            }
        }
        let fetch = &self.federation_fetch;
        if fetch.min_refresh.get().is_zero() || fetch.min_refresh > fetch.max_refresh {
            return Err(ConfigError::validation(
                "federation_fetch.min_refresh",
                "must be positive and at most max_refresh",
            ));
        }
        if fetch.timeout.get().is_zero() {
            return Err(ConfigError::validation(
                "federation_fetch.timeout",
                "must be positive",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, relationship) in self.federation.iter().enumerate() {
            relationship.validate(own).map_err(|e| {
                ConfigError::validation(format!("federation[{index}].{}", e.field), e.message)
            })?;
            if !seen.insert(relationship.trust_domain.clone()) {
                return Err(ConfigError::validation(
                    format!("federation[{index}].trustDomain"),
                    format!("{} is declared twice", relationship.trust_domain),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use isthmus_core::config;

    use super::*;

    fn load(toml: &str) -> Result<BrokerConfig, ConfigError> {
        let dir = std::env::temp_dir().join(format!("isthmus-broker-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.toml", toml.len()));
        std::fs::write(&file, toml).unwrap();
        let result = config::load(Some(&file), &BTreeMap::new(), BROKER_ENV, &[]);
        std::fs::remove_file(&file).unwrap();
        result
    }

    #[test]
    fn federation_uses_spire_field_names() {
        let cfg = load(
            r#"
trust_domain = "west.example"
[[federation]]
trustDomain = "east.example"
bundleEndpointURL = "https://127.0.0.1:8443/"
bundleEndpointProfile = { type = "https_spiffe", endpointSPIFFEID = "spiffe://east.example/isthmus/bundle-endpoint" }
"#,
        )
        .unwrap();
        assert_eq!(cfg.federation[0].trust_domain.name(), "east.example");
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(load("").unwrap_err().field(), Some("trust_domain"));
        let e =
            load("trust_domain = \"west.example\"\n[bundle_endpoint]\nprofile = \"https_web\"\n")
                .unwrap_err();
        assert_eq!(e.field(), Some("bundle_endpoint.cert_file"));
        let e = load(
            "trust_domain = \"west.example\"\n[[federation]]\ntrustDomain = \"east.example\"\nbundleEndpointURL = \"http://x/\"\nbundleEndpointProfile = { type = \"https_web\" }\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("federation[0].bundleEndpointURL"));
        let e = load("trust_domain = \"west.example\"\nca_ttl = \"1h\"\n").unwrap_err();
        assert_eq!(e.field(), Some("ca_ttl"));
        let e = load("trust_domain = \"west.example\"\njwt_svid_ttl = \"5h\"\n").unwrap_err();
        assert_eq!(e.field(), Some("jwt_svid_ttl"));
        let cfg = load("trust_domain = \"west.example\"\njwt_svid_ttl = \"90s\"\n").unwrap();
        assert_eq!(cfg.jwt_svid_ttl.get(), std::time::Duration::from_secs(90));
    }
}
