//! The local catalog API (`isthmus.catalog.v1.Catalog`): DNS servers and node agents of this
//! cluster watch the global services with their VIPs, ports and per-cluster endpoints. Served
//! over TLS to SVIDs of this gateway's own trust domain only.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::catalog::catalog_server::{Catalog, CatalogServer};
use isthmus_api::catalog::{self as pb};
use isthmus_api::transport::{ALPN_H2, tls_incoming};
use isthmus_core::TrustDomain;
use isthmus_core::catalog::{Affinity, GlobalService, ServiceType};
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::tls::{AllowTrustDomains, MtlsSettings};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::server::{CatalogView, GatewayError, GatewayIdentity};

/// How often a watcher re-checks the catalog without any change notification (peers age out
/// of the staleness budget without sending anything).
pub const RECHECK: Duration = Duration::from_secs(1);

/// Target ports of this cluster's exports, by (namespace, name, service port), where they
/// differ from the service port.
pub type TargetPorts = std::collections::BTreeMap<(String, String, u16), u16>;

/// Converts the catalog for the wire.
pub fn to_snapshot(
    cluster: &str,
    services: &[(GlobalService, Option<std::net::Ipv4Addr>)],
    gateways: &[(String, TrustDomain, SocketAddr)],
    target_ports: &TargetPorts,
) -> pb::CatalogSnapshot {
    pb::CatalogSnapshot {
        cluster: cluster.to_owned(),
        gateways: gateways
            .iter()
            .map(|(cluster, td, address)| pb::ClusterGateway {
                cluster: cluster.clone(),
                trust_domain: td.to_string(),
                address: address.to_string(),
            })
            .collect(),
        services: services
            .iter()
            .map(|(s, vip)| pb::GlobalService {
                namespace: s.key.namespace.clone(),
                name: s.key.name.clone(),
                vip: vip.map(|v| v.to_string()).unwrap_or_default(),
                r#type: match s.service_type {
                    ServiceType::ClusterSetIP => "ClusterSetIP",
                    ServiceType::Headless => "Headless",
                }
                .into(),
                affinity: match s.affinity {
                    Affinity::Local => "local",
                    Affinity::Remote => "remote",
                    Affinity::None => "none",
                }
                .into(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| pb::Port {
                        name: p.name.clone(),
                        protocol: p.protocol.to_string(),
                        port: u32::from(p.port),
                        local_target_port: target_ports
                            .get(&(s.key.namespace.clone(), s.key.name.clone(), p.port))
                            .map_or(0, |t| u32::from(*t)),
                    })
                    .collect(),
                clusters: s
                    .endpoints
                    .iter()
                    .map(|(c, eps)| pb::ClusterEndpoints {
                        cluster: c.clone(),
                        local: c == cluster,
                        endpoints: eps
                            .iter()
                            .map(|e| pb::Endpoint {
                                address: e.address.to_string(),
                                ready: e.ready,
                                zone: e.zone.clone().unwrap_or_default(),
                                hostname: e.hostname.clone().unwrap_or_default(),
                            })
                            .collect(),
                    })
                    .collect(),
                conflicts: s.conflicts.iter().map(|c| format!("{c:?}")).collect(),
            })
            .collect(),
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct CatalogService {
    view: CatalogView,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::CatalogSnapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Catalog for CatalogService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        _request: Request<pb::WatchCatalogRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let view = self.view.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<pb::CatalogSnapshot> = None;
            loop {
                let snapshot = to_snapshot(
                    view.cluster(),
                    &view.catalog_with_vips(time::OffsetDateTime::now_utc()),
                    &view.gateways(),
                    &view.target_ports(),
                );
                // Every message is the full state; an unchanged state is not resent.
                if last.as_ref() != Some(&snapshot) {
                    if tx.send(Ok(snapshot.clone())).await.is_err() {
                        return;
                    }
                    last = Some(snapshot);
                }
                tokio::select! {
                    () = view.changed(RECHECK) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the catalog API on `listen` until `drain` signals; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    own: &TrustDomain,
    identity: &GatewayIdentity,
    view: CatalogView,
    drain: DrainWatch,
) -> Result<SocketAddr, GatewayError> {
    let tls = isthmus_core::tls::server_config(&MtlsSettings {
        svid: identity.svid.clone(),
        trust: identity.trust.clone(),
        authorizer: Arc::new(AllowTrustDomains(vec![own.clone()])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .map_err(|e| GatewayError::Tls(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Listen {
            address: listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            address: listen,
            source,
        })?;
    let incoming = tls_incoming(listener, Arc::new(tls));
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(CatalogServer::new(CatalogService { view }))
            .serve_with_incoming_shutdown(incoming, async move { drain.signaled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "catalog API stopped");
        }
    });
    tracing::info!(address = %addr, "catalog API listening");
    Ok(addr)
}
