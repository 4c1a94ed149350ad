//! `isthmus gateway`: runs the east-west gateway from a configuration file.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::{DrainTrigger, Readiness, Shutdown};
use isthmus_gateway::config::{GATEWAY_ENV, GatewayConfig};
use isthmus_gateway::server::Gateway;

use crate::{ConfigArgs, Failure};

/// `isthmus gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

/// Runs `isthmus gateway`.
pub fn run(args: GatewayArgs, env: &dyn Environment) -> Result<(), Failure> {
    let cfg: GatewayConfig = config::load(
        args.config.config.as_deref(),
        env,
        GATEWAY_ENV,
        &args.config.set,
    )?;
    let own = cfg.trust_domain()?.clone();
    cfg.identity.require(&own)?;
    if args.config.check {
        println!(
            "configuration is valid:\n{}",
            serde_json::to_string_pretty(&config::redacted_json(&cfg, &[])?)
                .map_err(anyhow::Error::from)?
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    runtime.block_on(serve(cfg))?;
    Ok(())
}

async fn serve(cfg: GatewayConfig) -> anyhow::Result<()> {
    let own = cfg.trust_domain()?.clone();
    let mut shutdown = Shutdown::with_signals()?;
    let identity = isthmus_gateway::identity::load(&cfg.identity, &own)
        .context("loading the gateway identity")?;
    let gateway = Gateway::start(&cfg, identity.clone())
        .await
        .context("starting the gateway")?;
    let (drain, watch) = DrainTrigger::new();
    tokio::spawn(isthmus_gateway::identity::watch(
        cfg.identity.clone(),
        own.clone(),
        identity,
        watch.clone(),
    ));
    if let Some(listen) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics_listen {listen}"))?;
        let registry = gateway.metrics_registry();
        let text: isthmus_api::admin_http::MetricsText = Arc::new(move || {
            registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .encode_text()
                .unwrap_or_default()
        });
        tokio::spawn(isthmus_api::admin_http::serve(
            listener,
            text,
            Readiness::default(),
            watch,
        ));
    }
    eprintln!(
        "gateway for {own} (cluster {}) listening on {} (QUIC and TCP fallback), {} services exported",
        cfg.cluster,
        gateway.addr(),
        cfg.services.len()
    );
    let reason = shutdown.requested().await;
    tracing::info!(?reason, "draining");
    let outcome = gateway.shutdown(cfg.limits.drain_deadline.get()).await;
    let _ = drain.drain(std::time::Duration::from_secs(1)).await;
    tracing::info!(?outcome, "gateway stopped");
    Ok(())
}
