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
    #[command(subcommand)]
    command: Option<GatewayCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum GatewayCommand {
    /// Peers (connected, last sync, version, age) and services (exported, imported from
    /// where, VIP, conflicts) of a running gateway.
    Status {
        /// The gateway's admin address (default: `metrics_listen` from the configuration).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = crate::broker::Output::Table)]
        output: crate::broker::Output,
    },
}

/// Runs `isthmus gateway`.
pub fn run(args: GatewayArgs, env: &dyn Environment) -> Result<(), Failure> {
    if let Some(GatewayCommand::Status { admin, output }) = args.command {
        let admin = match admin {
            Some(admin) => admin,
            None => {
                let cfg: GatewayConfig = config::load(
                    args.config.config.as_deref(),
                    env,
                    GATEWAY_ENV,
                    &args.config.set,
                )?;
                cfg.metrics_listen.ok_or_else(|| {
                    isthmus_core::config::ConfigError::validation(
                        "metrics_listen",
                        "not set: pass --admin or configure metrics_listen",
                    )
                })?
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)?;
        let body = runtime.block_on(http_get(admin, "/status"))?;
        if output == crate::broker::Output::Json {
            println!("{body}");
        } else {
            let status: isthmus_gateway::status::GatewayStatus =
                serde_json::from_str(&body).map_err(anyhow::Error::from)?;
            print!("{}", status.table());
        }
        return Ok(());
    }
    let cfg: GatewayConfig = config::load(
        args.config.config.as_deref(),
        env,
        GATEWAY_ENV,
        &args.config.set,
    )?;
    let own = cfg.trust_domain()?.clone();
    cfg.identity.require(&own)?;
    if args.config.check {
        return crate::print_valid(&cfg);
    }
    crate::block_on(
        None,
        serve(cfg, args.config.config.clone(), args.config.set.clone()),
    )?;
    Ok(())
}

async fn serve(
    cfg: GatewayConfig,
    config_path: Option<std::path::PathBuf>,
    flags: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let own = cfg.trust_domain()?.clone();
    let mut shutdown = Shutdown::with_signals()?;
    let (drain, watch) = DrainTrigger::new();
    let from_broker = cfg.identity.broker.is_some();
    let identity = match &cfg.identity.broker {
        Some(broker) => isthmus_gateway::identity::from_broker(broker, &own, watch.clone())
            .await
            .context("obtaining the gateway identity from the broker")?,
        None => isthmus_gateway::identity::load(&cfg.identity, &own)
            .context("loading the gateway identity")?,
    };
    let gateway = Gateway::start(&cfg, identity.clone())
        .await
        .context("starting the gateway")?;
    // The exported services follow the configuration file.
    if let Some(path) = config_path {
        let source = isthmus_gateway::source::FileExports::watch(
            path,
            config::ProcessEnv,
            flags,
            cfg.services.clone(),
            std::time::Duration::from_secs(2),
            watch.clone(),
        );
        let view = gateway.view();
        let watch = watch.clone();
        tokio::spawn(async move { isthmus_gateway::source::follow(&source, view, watch).await });
    }
    if !from_broker {
        // Files: re-read on change (the broker path renews by itself).
        tokio::spawn(isthmus_gateway::identity::watch(
            cfg.identity.clone(),
            own.clone(),
            identity,
            watch.clone(),
        ));
    }
    if let Some(listen) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics_listen {listen}"))?;
        let text = isthmus_api::admin_http::registry_text(gateway.metrics_registry());
        let view = gateway.view();
        let status: isthmus_api::admin_http::MetricsText = Arc::new(move || {
            serde_json::to_string_pretty(&view.status(time::OffsetDateTime::now_utc()))
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        });
        tokio::spawn(isthmus_api::admin_http::serve_with_status(
            listener,
            text,
            Readiness::default(),
            Some(status),
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

/// A minimal HTTP/1.0 GET to the gateway's admin endpoint on this host.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the gateway admin endpoint {addr}"))?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{addr}{path}: {}", head.lines().next().unwrap_or(head));
    }
    Ok(body.to_owned())
}
