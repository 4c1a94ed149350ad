//! `isthmus dns`: the `clusterset.local` DNS server, fed by the gateway's catalog API.

use std::sync::Arc;

use anyhow::Context;
use isthmus_api::catalog::catalog_client::CatalogClient;
use isthmus_api::transport::{ALPN_H2, tls_channel};
use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::{DrainTrigger, Readiness, Shutdown};
use isthmus_core::telemetry::MetricsRegistry;
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_dns::config::{DnsConfig, ENV_BINDINGS};
use isthmus_dns::server::{Backoff, DnsServer, ZoneFeed, ZoneHandler};
use isthmus_dns::{DnsMetrics, Forwarder};

use crate::{ConfigArgs, Failure};

/// Runs `isthmus dns`.
pub fn run(args: ConfigArgs, env: &dyn Environment) -> Result<(), Failure> {
    let cfg: DnsConfig = config::load(args.config.as_deref(), env, ENV_BINDINGS, &args.set)?;
    if args.check {
        return crate::print_valid(&cfg);
    }
    crate::block_on(None, serve(cfg))
}

async fn serve(cfg: DnsConfig) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::with_signals()?;
    let (drain, watch) = DrainTrigger::new();
    let mut registry = MetricsRegistry::new();
    let metrics = DnsMetrics::register(&mut registry);
    let readiness = Readiness::new();
    let zone_settings = cfg.zone_settings()?;
    let origin = zone_settings.origin().clone();
    let (feed, zone) = ZoneFeed::new(zone_settings);
    let feed = feed
        .with_metrics(metrics.clone())
        .with_readiness(readiness.register("catalog sync"));
    let settings = cfg.server_settings();
    let mut handler = ZoneHandler::new(zone, settings.max_udp_payload)
        .with_metrics(metrics)
        .with_origin(origin);
    let forwarding = match cfg.forward.settings() {
        Some(forward) => {
            let forwarder = Forwarder::new(&forward).context("setting up forwarding")?;
            let upstreams = forwarder
                .upstreams()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            handler = handler.with_forwarder(forwarder);
            format!("other names forwarded to {upstreams}")
        }
        None => "other names refused (forwarding off)".to_owned(),
    };
    let server = DnsServer::start_with(&settings, handler)
        .await
        .context("starting the DNS server")?;
    if let Some(listen) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics_listen {listen}"))?;
        let text =
            isthmus_api::admin_http::registry_text(Arc::new(std::sync::Mutex::new(registry)));
        tokio::spawn(isthmus_api::admin_http::serve(
            listener,
            text,
            readiness.clone(),
            watch.clone(),
        ));
    }
    match (cfg.catalog, &cfg.trust_domain) {
        (Some(catalog), Some(own)) => {
            let identity = match &cfg.identity.broker {
                Some(broker) => isthmus_api::identity::from_broker(broker, own, watch.clone())
                    .await
                    .context("obtaining the DNS server's identity from the broker")?,
                None => {
                    let identity = isthmus_api::identity::load(&cfg.identity, own)
                        .context("loading the DNS server's identity")?;
                    tokio::spawn(isthmus_api::identity::watch(
                        cfg.identity.clone(),
                        own.clone(),
                        identity.clone(),
                        watch.clone(),
                    ));
                    identity
                }
            };
            let gateway = own
                .workload_id(&["ns", "isthmus-system", "sa", "eastwest-gateway"])
                .map_err(anyhow::Error::from)?;
            let tls = isthmus_core::tls::client_config(&MtlsSettings {
                svid: identity.svid,
                trust: identity.trust,
                authorizer: Arc::new(AllowIds(vec![gateway])),
                alpn: vec![ALPN_H2.to_vec()],
                observer: None,
            })?;
            let client = CatalogClient::new(tls_channel(catalog, Arc::new(tls)));
            tokio::spawn(isthmus_dns::server::follow_catalog(
                client,
                feed,
                Backoff::default(),
                watch.clone(),
            ));
        }
        _ => tracing::warn!("no catalog configured: every name of the zone answers SERVFAIL"),
    }
    eprintln!(
        "DNS for {} listening on {} (UDP and TCP); {forwarding}",
        cfg.zone,
        server.local_addr()
    );
    let reason = shutdown.requested().await;
    tracing::info!(?reason, "shutting down");
    let _ = drain.drain(std::time::Duration::from_secs(2)).await;
    server.shutdown().await?;
    Ok(())
}
