//! The broker's data: federation relationships (SPIRE's ClusterFederatedTrustDomain field
//! names, so users recognise them), registration entries and join tokens.

use std::fmt;

use isthmus_core::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Why a federation relationship is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ModelError {
    /// The offending field (SPIRE's name).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

/// How the bundle endpoint of a federated trust domain authenticates (SPIFFE Federation §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum BundleEndpointProfile {
    /// The endpoint serves an X509-SVID for `endpointSPIFFEID`, verified against the bundle we
    /// hold for that ID's trust domain.
    #[serde(rename = "https_spiffe")]
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint's certificate must carry.
        #[serde(rename = "endpointSPIFFEID")]
        endpoint_spiffe_id: SpiffeId,
    },
    /// The endpoint serves a Web PKI certificate for its host name.
    #[serde(rename = "https_web")]
    HttpsWeb,
}

impl BundleEndpointProfile {
    /// `https_spiffe` or `https_web`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::HttpsSpiffe { .. } => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

/// A trust domain we federate with: where its bundle endpoint is and how to authenticate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedTrustDomain {
    /// The foreign trust domain (configured, never inferred from the URL).
    #[serde(rename = "trustDomain")]
    pub trust_domain: TrustDomain,
    /// The bundle endpoint, `https://host[:port]/path`.
    #[serde(rename = "bundleEndpointURL")]
    pub bundle_endpoint_url: String,
    /// The endpoint profile.
    #[serde(rename = "bundleEndpointProfile")]
    pub bundle_endpoint_profile: BundleEndpointProfile,
    /// The initial bundle of the federated trust domain (SPIFFE bundle JSON), as in SPIRE. A
    /// self-serving `https_spiffe` endpoint needs it to be authenticated on the first fetch; a
    /// non-self-serving one is authenticated with the bundle held for its own trust domain.
    #[serde(
        rename = "trustDomainBundle",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub trust_domain_bundle: Option<String>,
}

impl FederatedTrustDomain {
    /// Checks the URL (https, host, no userinfo) and the bootstrap bundle.
    pub fn validate(&self, own: &TrustDomain) -> Result<(), ModelError> {
        if &self.trust_domain == own {
            return Err(ModelError {
                field: "trustDomain",
                message: format!("{own} is this broker's own trust domain"),
            });
        }
        let uri: http::Uri = self.bundle_endpoint_url.parse().map_err(|e| ModelError {
            field: "bundleEndpointURL",
            message: format!("{:?} is not a URL: {e}", self.bundle_endpoint_url),
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(ModelError {
                field: "bundleEndpointURL",
                message: format!("{:?} must use https", self.bundle_endpoint_url),
            });
        }
        match uri.authority() {
            None => {
                return Err(ModelError {
                    field: "bundleEndpointURL",
                    message: format!("{:?} has no host", self.bundle_endpoint_url),
                });
            }
            Some(a) if a.as_str().contains('@') => {
                return Err(ModelError {
                    field: "bundleEndpointURL",
                    message: format!("{:?} must not carry userinfo", self.bundle_endpoint_url),
                });
            }
            Some(_) => {}
        }
        if let Some(json) = &self.trust_domain_bundle {
            let td = self.trust_domain.clone();
            isthmus_core::Bundle::parse_json(td, json.as_bytes()).map_err(|e| ModelError {
                field: "trustDomainBundle",
                message: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// A workload selector, `type:value` (for example `unix:uid:1000`, `k8s:sa:default`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    /// The selector type (`unix`, `k8s`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The value, which may itself contain `:`.
    pub value: String,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl std::str::FromStr for Selector {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((kind, value)) if !kind.is_empty() && !value.is_empty() => Ok(Self {
                kind: kind.to_owned(),
                value: value.to_owned(),
            }),
            _ => Err(ModelError {
                field: "selector",
                message: format!("{s:?} is not of the form type:value"),
            }),
        }
    }
}

/// A registration entry: which SPIFFE ID the workloads matching `selectors` on `node` get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationEntry {
    /// Stable identifier.
    pub id: String,
    /// The SPIFFE ID issued for this entry.
    pub spiffe_id: SpiffeId,
    /// The node whose agent may obtain SVIDs for this entry.
    pub node: String,
    /// All of these must match the workload.
    pub selectors: Vec<Selector>,
    /// Leaf lifetime in seconds; the broker default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Foreign trust domains whose bundles workloads of this entry receive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<TrustDomain>,
}

/// A one-time join token bound to a node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The secret.
    pub token: String,
    /// The node it attests.
    pub node: String,
    /// When it stops being usable.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// What the fetcher last saw of one federated trust domain (for status and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationStatus {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// The endpoint URL.
    pub url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// Sequence of the bundle we hold.
    pub sequence: Option<u64>,
    /// Number of X.509 authorities in the bundle we hold.
    pub x509_authorities: usize,
    /// Number of JWT authorities (JWT-SVID keys) in the bundle we hold.
    #[serde(default)]
    pub jwt_authorities: usize,
    /// When the held bundle was fetched (or bootstrapped).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub fetched_at: Option<OffsetDateTime>,
    /// When the last fetch attempt finished.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_attempt: Option<OffsetDateTime>,
    /// When the last fetch succeeded.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_success: Option<OffsetDateTime>,
    /// Low-cardinality reason of the last failure (`http_status`, `tls`, `timeout`, `malformed`,
    /// `wrong_trust_domain`, `stale_sequence`, …), cleared on success.
    pub last_error_reason: Option<String>,
    /// Human-readable last error, cleared on success.
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// When the next fetch is due.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub next_fetch: Option<OffsetDateTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spire_field_names_round_trip() {
        let json = r#"{"trustDomain":"east.example","bundleEndpointURL":"https://127.0.0.1:8443/","bundleEndpointProfile":{"type":"https_spiffe","endpointSPIFFEID":"spiffe://east.example/isthmus/bundle-endpoint"}}"#;
        let ftd: FederatedTrustDomain = serde_json::from_str(json).unwrap();
        assert_eq!(ftd.bundle_endpoint_profile.name(), "https_spiffe");
        assert_eq!(serde_json::to_string(&ftd).unwrap(), json);
        ftd.validate(&TrustDomain::new("west.example").unwrap())
            .unwrap();
        let web: FederatedTrustDomain = serde_json::from_str(
            r#"{"trustDomain":"east.example","bundleEndpointURL":"https://b.example/","bundleEndpointProfile":{"type":"https_web"}}"#,
        )
        .unwrap();
        assert_eq!(web.bundle_endpoint_profile.name(), "https_web");
    }

    #[test]
    fn bad_urls_name_the_field() {
        let mut ftd = FederatedTrustDomain {
            trust_domain: TrustDomain::new("east.example").unwrap(),
            bundle_endpoint_url: "http://b.example/".into(),
            bundle_endpoint_profile: BundleEndpointProfile::HttpsWeb,
            trust_domain_bundle: None,
        };
        let own = TrustDomain::new("west.example").unwrap();
        assert_eq!(ftd.validate(&own).unwrap_err().field, "bundleEndpointURL");
        ftd.bundle_endpoint_url = "https://user@b.example/".into();
        assert_eq!(ftd.validate(&own).unwrap_err().field, "bundleEndpointURL");
        ftd.bundle_endpoint_url = "https://b.example/".into();
        ftd.trust_domain_bundle = Some("{".into());
        assert_eq!(ftd.validate(&own).unwrap_err().field, "trustDomainBundle");
        ftd.trust_domain_bundle = None;
        assert_eq!(
            ftd.validate(&TrustDomain::new("east.example").unwrap())
                .unwrap_err()
                .field,
            "trustDomain"
        );
    }
}
