//! `isthmus agent`: the node agent — attests to the trust broker with a join token, keeps an
//! SVID for every entry of the node, serves the SPIFFE Workload API, and tunnels workloads'
//! connections to global services (explicit VIP listeners or the eBPF redirect).

use std::sync::Arc;

use anyhow::Context;
use isthmus_api::broker_client::{BrokerEndpoint, NodeIdentity};
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::transport::{ALPN_H2, tls_channel};
use isthmus_core::Bundle;
use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::{DrainTrigger, Shutdown};
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_node_agent::attest::UnixAttestor;
use isthmus_node_agent::config::{AgentConfig, ENV_BINDINGS};
use isthmus_node_agent::outbound::{Outbound, follow_catalog};
use isthmus_node_agent::{WorkloadApiServer, WorkloadIdentities};

use crate::{ConfigArgs, Failure};

/// Runs `isthmus agent`.
pub fn run(args: ConfigArgs, env: &dyn Environment) -> Result<(), Failure> {
    let cfg: AgentConfig = config::load(args.config.as_deref(), env, ENV_BINDINGS, &args.set)?;
    if args.check {
        return crate::print_valid(&cfg);
    }
    crate::block_on(None, serve(cfg))
}

async fn serve(cfg: AgentConfig) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::with_signals()?;
    let (drain, watch) = DrainTrigger::new();
    let (own, broker) = match (&cfg.trust_domain, &cfg.broker) {
        (Some(own), Some(broker)) => (own.clone(), broker.clone()),
        _ => anyhow::bail!("BUG: validated configuration lacks trust_domain or broker"),
    };
    let bundle_json = std::fs::read(&broker.bundle_file)
        .with_context(|| format!("reading {}", broker.bundle_file.display()))?;
    let bundle = Bundle::parse_json(own.clone(), &bundle_json)
        .with_context(|| format!("parsing {}", broker.bundle_file.display()))?;
    let token = std::fs::read_to_string(&broker.join_token_file)
        .with_context(|| format!("reading {}", broker.join_token_file.display()))?;
    let node = NodeIdentity::attest(
        BrokerEndpoint {
            address: broker.address,
            trust_domain: own.clone(),
            bootstrap_bundle: bundle,
        },
        token.trim(),
    )
    .await
    .context("attesting the node to the trust broker")?;
    let node = Arc::new(node);
    let node_id = node.node_svid().current().svid.id().clone();
    let identities =
        WorkloadIdentities::start(node.clone(), cfg.identity_settings(), watch.clone());

    let workload_api = match cfg.workload_api_settings() {
        Some(settings) => Some(
            WorkloadApiServer::start_unix(&settings, identities.clone(), watch.clone())
                .await
                .context("starting the Workload API")?,
        ),
        None => None,
    };

    let outbound = match (cfg.outbound_settings(), cfg.catalog) {
        (Some(settings), Some(catalog)) => {
            let gateway = own
                .workload_id(&["ns", "isthmus-system", "sa", "eastwest-gateway"])
                .map_err(anyhow::Error::from)?;
            let tls = isthmus_core::tls::client_config(&MtlsSettings {
                svid: node.node_svid().clone(),
                trust: node.trust().clone(),
                authorizer: Arc::new(AllowIds(vec![gateway])),
                alpn: vec![ALPN_H2.to_vec()],
                observer: None,
            })?;
            let (sender, snapshots) = tokio::sync::watch::channel(None);
            tokio::spawn(follow_catalog(
                CatalogClient::new(tls_channel(catalog, Arc::new(tls))),
                sender,
                watch.clone(),
            ));
            Some(
                Outbound::start(
                    settings,
                    identities.clone(),
                    Arc::new(UnixAttestor::default()),
                    node.trust().clone(),
                    snapshots,
                    watch.clone(),
                )
                .await
                .context("starting outbound connections")?,
            )
        }
        _ => None,
    };

    eprintln!(
        "node agent {node_id}: Workload API {}; outbound {}",
        workload_api
            .as_ref()
            .map_or_else(|| "off".to_owned(), WorkloadApiServer::endpoint),
        match (&outbound, cfg.outbound.mode) {
            (Some(_), mode) => format!("{mode:?}").to_lowercase(),
            (None, _) => "off".to_owned(),
        }
    );
    let reason = shutdown.requested().await;
    tracing::info!(?reason, "shutting down");
    let _ = drain.drain(std::time::Duration::from_secs(2)).await;
    if let Some(server) = workload_api {
        server.stopped().await;
    }
    drop(outbound);
    Ok(())
}
