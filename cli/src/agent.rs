//! `isthmus agent`: the node agent — attests to the trust broker with a join token, keeps an
//! SVID for every entry of the node, serves the SPIFFE Workload API, and tunnels workloads'
//! connections to global services (explicit VIP listeners or the eBPF redirect).

use std::sync::Arc;

use anyhow::Context;
use isthmus_api::broker_client::{BrokerEndpoint, NodeIdentity};
use isthmus_core::Bundle;
use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::{DrainTrigger, Shutdown};
use isthmus_node_agent::WorkloadApiServer;
use isthmus_node_agent::config::{AgentConfig, ENV_BINDINGS};
use isthmus_node_agent::runtime::{Agent, AgentSettings};

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
    let agent = Agent::start(
        node,
        AgentSettings {
            identity: cfg.identity_settings(),
            workload_api: cfg.workload_api_settings(),
            outbound: cfg.outbound_settings().zip(cfg.catalog),
        },
        watch.clone(),
    )
    .await
    .context("starting the node agent")?;
    let Agent {
        workload_api,
        outbound,
        ..
    } = agent;

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
