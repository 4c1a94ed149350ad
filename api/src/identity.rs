//! A component's identity (its SVID and the bundles it trusts) for gateways, DNS servers and
//! agents run standalone: read from files and re-read when they change, or obtained from a
//! trust broker with a join token and kept fresh. Rotation never needs a restart: TLS reads the
//! current SVID and bundles on every handshake, so live connections are kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use isthmus_core::config::ConfigError;
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::{Bundle, SvidSource, TrustDomain, TrustStore, X509Svid};

use serde::{Deserialize, Serialize};

/// A component's SVID and the bundles it trusts, both updated in place.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The SVID, rotated in place.
    pub svid: SvidSource,
    /// Trusted bundles (own and federated), updated in place.
    pub trust: TrustStore,
}

/// Obtaining the identity from a trust broker instead of files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerIdentity {
    /// The broker's issuance API.
    pub address: std::net::SocketAddr,
    /// The broker's bundle (SPIFFE JSON) to authenticate it at first contact.
    pub bundle_file: PathBuf,
    /// A file holding a one-time join token for this component's node.
    pub join_token_file: PathBuf,
    /// The registration entry (assigned to that node) for the component's SPIFFE ID.
    pub entry_id: String,
}

/// Where the SVID and trusted bundles come from: files, or a trust broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityFiles {
    /// Obtain the SVID and bundles from a broker (join token attestation); when set, the
    /// file fields are not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerIdentity>,
    /// The SVID chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svid_cert_file: Option<PathBuf>,
    /// The SVID's private key (PEM, PKCS#8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svid_key_file: Option<PathBuf>,
    /// SPIFFE bundle files (JSON) by trust domain name, own and federated.
    pub bundle_files: std::collections::BTreeMap<String, PathBuf>,
}

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Why identity material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The SVID is invalid.
    #[error("{path}: {error}")]
    Svid {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        error: isthmus_core::svid::SvidError,
    },
    /// A bundle is invalid.
    #[error("{path}: {error}")]
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        error: isthmus_core::bundle::BundleError,
    },
    /// The trust broker refused or failed.
    #[error("trust broker: {0}")]
    Broker(String),
    /// The SVID is not of the configured trust domain.
    #[error("the SVID {id} is not of trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The SVID's ID.
        id: String,
        /// The configured trust domain.
        trust_domain: TrustDomain,
    },
}

impl IdentityFiles {
    /// Checks that standalone identity files (or a broker) are configured, naming the missing
    /// field.
    pub fn require(&self, own: &TrustDomain) -> Result<(), ConfigError> {
        if self.broker.is_some() {
            return Ok(());
        }
        if self.svid_cert_file.is_none() {
            return Err(ConfigError::validation(
                "identity.svid_cert_file",
                "required",
            ));
        }
        if self.svid_key_file.is_none() {
            return Err(ConfigError::validation(
                "identity.svid_key_file",
                "required",
            ));
        }
        if !self.bundle_files.contains_key(own.name()) {
            return Err(ConfigError::validation(
                format!("identity.bundle_files.\"{own}\""),
                "the own trust domain's bundle is required",
            ));
        }
        for name in self.bundle_files.keys() {
            TrustDomain::new(name).map_err(|e| {
                ConfigError::validation(format!("identity.bundle_files.\"{name}\""), e.to_string())
            })?;
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_svid(files: &IdentityFiles, own: &TrustDomain) -> Result<X509Svid, IdentityError> {
    let (Some(cert), Some(key)) = (&files.svid_cert_file, &files.svid_key_file) else {
        return Err(IdentityError::Read {
            path: PathBuf::from("identity.svid_cert_file"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not configured"),
        });
    };
    let svid =
        X509Svid::from_pem(&read(cert)?, &read(key)?).map_err(|error| IdentityError::Svid {
            path: cert.clone(),
            error,
        })?;
    if svid.id().trust_domain_name() != own.name() {
        return Err(IdentityError::WrongTrustDomain {
            id: svid.id().to_string(),
            trust_domain: own.clone(),
        });
    }
    Ok(svid)
}

fn load_bundles(files: &IdentityFiles) -> Result<Vec<Bundle>, IdentityError> {
    files
        .bundle_files
        .iter()
        .map(|(name, path)| {
            let td = TrustDomain::new(name).map_err(|e| IdentityError::Bundle {
                path: path.clone(),
                error: isthmus_core::bundle::BundleError::BadTrustDomain {
                    name: name.clone(),
                    error: e,
                },
            })?;
            Bundle::parse_json(td, &read(path)?).map_err(|error| IdentityError::Bundle {
                path: path.clone(),
                error,
            })
        })
        .collect()
}

/// Loads the SVID and bundles.
pub fn load(files: &IdentityFiles, own: &TrustDomain) -> Result<Identity, IdentityError> {
    let svid = load_svid(files, own)?;
    let svid = SvidSource::new(svid).map_err(|error| IdentityError::Svid {
        path: files.svid_cert_file.clone().unwrap_or_default(),
        error,
    })?;
    Ok(Identity {
        svid,
        trust: TrustStore::from_bundles(load_bundles(files)?),
    })
}

/// Obtains the identity from a trust broker: attests this gateway's node with the join token,
/// then keeps the gateway SVID (the configured entry) renewed and the bundles following the
/// broker's stream until `drain` signals.
pub async fn from_broker(
    broker: &BrokerIdentity,
    own: &TrustDomain,
    drain: DrainWatch,
) -> Result<Identity, IdentityError> {
    use crate::broker_client::{BrokerEndpoint, NodeIdentity};
    let bundle = Bundle::parse_json(own.clone(), &read(&broker.bundle_file)?).map_err(|error| {
        IdentityError::Bundle {
            path: broker.bundle_file.clone(),
            error,
        }
    })?;
    let token = String::from_utf8_lossy(&read(&broker.join_token_file)?)
        .trim()
        .to_owned();
    let endpoint = BrokerEndpoint {
        address: broker.address,
        trust_domain: own.clone(),
        bootstrap_bundle: bundle,
    };
    let node = NodeIdentity::attest(endpoint, &token)
        .await
        .map_err(|e| IdentityError::Broker(e.to_string()))?;
    let svid = node
        .workload_source(&broker.entry_id, drain.clone())
        .await
        .map_err(|e| IdentityError::Broker(e.to_string()))?;
    let trust = node.trust().clone();
    tokio::spawn(async move { node.maintain(drain).await });
    Ok(Identity { svid, trust })
}

fn mtimes(files: &IdentityFiles) -> Vec<Option<SystemTime>> {
    files
        .svid_cert_file
        .iter()
        .chain(files.svid_key_file.iter())
        .chain(files.bundle_files.values())
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Re-reads the files whenever one changes. A bad file is logged and the current material
/// kept (never replace a good SVID or bundle with a bad one).
pub async fn watch(files: IdentityFiles, own: TrustDomain, identity: Identity, drain: DrainWatch) {
    let mut seen = mtimes(&files);
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        let now = mtimes(&files);
        if now == seen {
            continue;
        }
        seen = now;
        match load_svid(&files, &own) {
            Ok(svid) => {
                let id = svid.id().clone();
                if identity.svid.current().svid.leaf() != svid.leaf() {
                    match identity.svid.rotate(svid) {
                        Ok(()) => tracing::info!(spiffe_id = %id, "gateway SVID reloaded"),
                        Err(e) => {
                            tracing::warn!(error = %e, "new SVID rejected; keeping the current one")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the SVID; keeping the current one"),
        }
        match load_bundles(&files) {
            Ok(bundles) => {
                for bundle in bundles {
                    identity.trust.set(bundle);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload bundles; keeping the current ones"),
        }
    }
}
