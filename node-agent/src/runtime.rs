//! The agent assembled from its parts for an attested node: live workload identities, the
//! Workload API on its socket, and outbound handling fed by the gateway's catalog API (reached
//! over mTLS with the node's own SVID). `isthmus agent` and the lab both start it this way.

use std::net::SocketAddr;
use std::sync::Arc;

use isthmus_api::broker_client::NodeIdentity;
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::transport::{ALPN_H2, tls_channel};
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::tls::{AllowIds, MtlsSettings};

use crate::attest::UnixAttestor;
use crate::identities::{IdentitySettings, WorkloadIdentities};
use crate::outbound::{Outbound, OutboundError, OutboundSettings, follow_catalog};
use crate::workload_api::{WorkloadApiError, WorkloadApiServer, WorkloadApiSettings};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Workload API could not be served.
    #[error("Workload API: {0}")]
    WorkloadApi(#[from] WorkloadApiError),
    /// Outbound handling could not start.
    #[error("outbound: {0}")]
    Outbound(#[from] OutboundError),
    /// The catalog client could not be set up.
    #[error("catalog client: {0}")]
    Catalog(String),
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// Entry refresh and broker call timeouts.
    pub identity: IdentitySettings,
    /// The Workload API, or `None` to not serve it.
    pub workload_api: Option<WorkloadApiSettings>,
    /// Outbound handling and the gateway catalog API it follows, or `None`.
    pub outbound: Option<(OutboundSettings, SocketAddr)>,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The identities of the node's entries.
    pub identities: WorkloadIdentities,
    /// The Workload API server, when served.
    pub workload_api: Option<WorkloadApiServer>,
    /// Outbound handling, when on.
    pub outbound: Option<Outbound>,
}

impl Agent {
    /// Starts everything `settings` asks for on behalf of `node`, until `drain` signals.
    pub async fn start(
        node: Arc<NodeIdentity>,
        settings: AgentSettings,
        drain: DrainWatch,
    ) -> Result<Self, AgentError> {
        let identities = WorkloadIdentities::start(node.clone(), settings.identity, drain.clone());
        let workload_api = match &settings.workload_api {
            Some(api) => {
                Some(WorkloadApiServer::start_unix(api, identities.clone(), drain.clone()).await?)
            }
            None => None,
        };
        let outbound = match settings.outbound {
            Some((outbound, catalog)) => {
                let own = node.node_svid().current().svid.id().trust_domain();
                let gateway = own
                    .workload_id(&["ns", "isthmus-system", "sa", "eastwest-gateway"])
                    .map_err(|e| AgentError::Catalog(e.to_string()))?;
                let tls = isthmus_core::tls::client_config(&MtlsSettings {
                    svid: node.node_svid().clone(),
                    trust: node.trust().clone(),
                    authorizer: Arc::new(AllowIds(vec![gateway])),
                    alpn: vec![ALPN_H2.to_vec()],
                    observer: None,
                })
                .map_err(|e| AgentError::Catalog(e.to_string()))?;
                let (sender, snapshots) = tokio::sync::watch::channel(None);
                tokio::spawn(follow_catalog(
                    CatalogClient::new(tls_channel(catalog, Arc::new(tls))),
                    sender,
                    drain.clone(),
                ));
                Some(
                    Outbound::start(
                        outbound,
                        identities.clone(),
                        Arc::new(UnixAttestor::default()),
                        node.trust().clone(),
                        snapshots,
                        drain,
                    )
                    .await?,
                )
            }
            None => None,
        };
        Ok(Self {
            identities,
            workload_api,
            outbound,
        })
    }
}
