//! What the lab reports: each cluster's addresses, its gateway's peers and services, and its
//! broker's federation links. `isthmus lab up` writes [`LabStatus`] to `status.json`;
//! `isthmus lab status` reads it back and prints [`LabStatus::table`].

use std::fmt::Write as _;
use std::net::SocketAddr;

use isthmus_gateway::status::GatewayStatus;
use isthmus_trust_broker::model::FederationStatus;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One cluster's name and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster name (`west`, `east`, …).
    pub name: String,
    /// Its trust domain (`<name>.lab`).
    pub trust_domain: String,
    /// Its DNS server (UDP and TCP).
    pub dns: SocketAddr,
    /// Its gateway (QUIC and TCP fallback).
    pub gateway: SocketAddr,
    /// Its trust broker's issuance API.
    pub broker: SocketAddr,
    /// The services it exports, as `<name>.<namespace>`.
    pub services: Vec<String>,
}

/// One cluster's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Names and addresses.
    pub info: ClusterInfo,
    /// The sequence of the bundle its broker publishes.
    pub bundle_sequence: u64,
    /// Its broker's federation links.
    pub federation: Vec<FederationStatus>,
    /// Its gateway's peers and services (with this cluster's VIPs).
    pub gateway: GatewayStatus,
}

/// The whole lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabStatus {
    /// When this status was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    /// Every cluster.
    pub clusters: Vec<ClusterStatus>,
}

/// The cluster table: cluster, trust domain, DNS address, gateway address, services.
pub fn clusters_table(clusters: &[ClusterInfo]) -> String {
    let mut rows = vec![[
        "CLUSTER".to_owned(),
        "TRUST DOMAIN".to_owned(),
        "DNS".to_owned(),
        "GATEWAY".to_owned(),
        "SERVICES".to_owned(),
    ]];
    rows.extend(clusters.iter().map(|c| {
        [
            c.name.clone(),
            c.trust_domain.clone(),
            c.dns.to_string(),
            c.gateway.to_string(),
            c.services.join(","),
        ]
    }));
    render(&rows)
}

impl LabStatus {
    /// The cluster table, then federation links, peerings and VIPs per cluster.
    pub fn table(&self) -> String {
        let infos: Vec<ClusterInfo> = self.clusters.iter().map(|c| c.info.clone()).collect();
        let mut out = clusters_table(&infos);
        let mut links = vec![[
            "CLUSTER".to_owned(),
            "LINK".to_owned(),
            "TO".to_owned(),
            "STATE".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for cluster in &self.clusters {
            for fed in &cluster.federation {
                let age = fed
                    .fetched_at
                    .map(|at| format!("{} s ago", (self.taken_at - at).whole_seconds()))
                    .unwrap_or_else(|| "never".to_owned());
                let state = match (&fed.last_error_reason, fed.last_success) {
                    (Some(reason), _) => format!("failing ({reason})"),
                    (None, Some(_)) => "ok".to_owned(),
                    (None, None) => "bootstrapped".to_owned(),
                };
                links.push([
                    cluster.info.name.clone(),
                    "federation".to_owned(),
                    fed.trust_domain.clone(),
                    state,
                    format!(
                        "sequence {}, fetched {age}",
                        fed.sequence
                            .map_or_else(|| "-".to_owned(), |s| s.to_string())
                    ),
                ]);
            }
            for peer in &cluster.gateway.peers {
                let state = match (peer.connected, peer.fresh) {
                    (true, _) => "connected",
                    (false, true) => "reconnecting",
                    (false, false) => "stale",
                };
                links.push([
                    cluster.info.name.clone(),
                    "peering".to_owned(),
                    peer.trust_domain.clone(),
                    state.to_owned(),
                    format!(
                        "{} services, last sync {}",
                        peer.services,
                        peer.age_seconds
                            .map_or_else(|| "never".to_owned(), |a| format!("{a} s ago"))
                    ),
                ]);
            }
        }
        let _ = write!(out, "\n{}", render(&links));
        let mut vips = vec![[
            "CLUSTER".to_owned(),
            "SERVICE".to_owned(),
            "VIP".to_owned(),
            "PORTS".to_owned(),
            "ENDPOINTS".to_owned(),
        ]];
        for cluster in &self.clusters {
            for service in &cluster.gateway.services {
                vips.push([
                    cluster.info.name.clone(),
                    format!("{}.{}", service.name, service.namespace),
                    service
                        .vip
                        .map_or_else(|| "-".to_owned(), |v| v.to_string()),
                    service
                        .ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    service
                        .ready_endpoints
                        .iter()
                        .map(|(c, n)| format!("{c}:{n}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
        }
        let _ = write!(out, "\n{}", render(&vips));
        out
    }
}

/// Left-aligned columns separated by two spaces.
fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_table_aligns_columns() {
        let info = ClusterInfo {
            name: "west".into(),
            trust_domain: "west.lab".into(),
            dns: "127.0.0.1:5353".parse().unwrap(),
            gateway: "127.0.0.1:4433".parse().unwrap(),
            broker: "127.0.0.1:8081".parse().unwrap(),
            services: vec!["echo.demo".into()],
        };
        let table = clusters_table(&[info]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("CLUSTER  TRUST DOMAIN  DNS"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("west     west.lab      127.0.0.1:5353"),
            "{table}"
        );
        assert!(lines[1].ends_with("echo.demo"), "{table}");
    }
}
