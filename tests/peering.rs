//! Catalog exchange between two gateways on 127.0.0.1: snapshot, deltas, persistence across a
//! restart, staleness when the peer goes away, resync when it returns, and refusal of a
//! gateway that is not a configured peer.

use std::path::PathBuf;
use std::time::Duration;

use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::catalog::ServiceKey;
use isthmus_core::config::HumanDuration;
use isthmus_core::{SpiffeId, SvidSource, TrustDomain, TrustStore};
use isthmus_gateway::config::{EndpointConfig, ExportedService, GatewayConfig, ServicePort};
use isthmus_gateway::peering::PeerConfig;
use isthmus_gateway::server::{Gateway, GatewayIdentity};
use time::OffsetDateTime;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn service(name: &str, ip: &str) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: None,
            protocol: "TCP".into(),
        }],
        endpoints: vec![EndpointConfig {
            address: ip.parse().unwrap(),
            ready: true,
        }],
        allow: vec![],
    }
}

struct Domain {
    identity: GatewayIdentity,
    ca: CertificateAuthority,
}

fn domain(name: &str, trust: &TrustStore) -> Domain {
    let ca = CertificateAuthority::generate(td(name), now(), DEFAULT_CA_TTL).unwrap();
    trust.set(ca.bundle());
    let id = SpiffeId::parse(&format!(
        "spiffe://{name}/ns/isthmus-system/sa/eastwest-gateway"
    ))
    .unwrap();
    let svid = SvidSource::new(ca.issue_svid(&id, DEFAULT_LEAF_TTL, now()).unwrap()).unwrap();
    Domain {
        identity: GatewayIdentity {
            svid,
            trust: trust.clone(),
        },
        ca,
    }
}

fn config(
    own: &str,
    cluster: &str,
    peer: Option<(&str, std::net::SocketAddr)>,
    services: Vec<ExportedService>,
    dir: Option<PathBuf>,
) -> GatewayConfig {
    let mut cfg = GatewayConfig {
        trust_domain: Some(td(own)),
        cluster: cluster.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        services,
        ..GatewayConfig::default()
    };
    if let Some((peer_td, address)) = peer {
        cfg.federated_trust_domains = vec![td(peer_td)];
        cfg.peering.peers = vec![PeerConfig {
            trust_domain: td(peer_td),
            address,
        }];
    }
    cfg.peering.heartbeat = HumanDuration::from_millis(200);
    cfg.peering.staleness_budget = HumanDuration::from_secs(2);
    cfg.peering.data_dir = dir;
    cfg
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn endpoints_of(gateway: &Gateway, cluster: &str, name: &str) -> Vec<String> {
    gateway
        .catalog(now())
        .into_iter()
        .find(|s| s.key == ServiceKey::new("demo", name))
        .and_then(|s| s.endpoints.get(cluster).cloned())
        .map(|eps| eps.iter().map(|e| e.address.to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_exchange_catalogs_and_survive_restarts() {
    let trust = TrustStore::default();
    let west = domain("west.example", &trust);
    let east = domain("east.example", &trust);
    let dir = std::env::temp_dir().join(format!("isthmus-peering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // East exports echo and lists west as a peer (so it admits west's subscription; east's own
    // follower points at a port where nothing answers, which only keeps it retrying).
    let placeholder = "127.0.0.1:9".parse().unwrap();
    let east_cfg = config(
        "east.example",
        "east",
        Some(("west.example", placeholder)),
        vec![service("echo", "10.1.0.1")],
        None,
    );
    let east_gw = Gateway::start(&east_cfg, east.identity.clone())
        .await
        .unwrap();
    let west_cfg = config(
        "west.example",
        "west",
        Some(("east.example", east_gw.addr())),
        vec![service("web", "10.0.0.1")],
        Some(dir.clone()),
    );
    let west_gw = Gateway::start(&west_cfg, west.identity.clone())
        .await
        .unwrap();

    eventually("the snapshot", || {
        endpoints_of(&west_gw, "east", "echo") == ["10.1.0.1"]
    })
    .await;
    // West's own export is in its catalog too.
    assert_eq!(endpoints_of(&west_gw, "west", "web"), ["10.0.0.1"]);

    // A change in east arrives as a delta.
    east_gw.replace_exports(&[service("echo", "10.1.0.2"), service("api", "10.1.0.3")]);
    eventually("the delta", || {
        endpoints_of(&west_gw, "east", "echo") == ["10.1.0.2"]
            && endpoints_of(&west_gw, "east", "api") == ["10.1.0.3"]
    })
    .await;
    let resume = west_gw.imports()[&td("east.example")].resume.unwrap();

    // Status: the peer with its version and age, services with VIPs and where they come from.
    let status = west_gw.status(now());
    let peer = &status.peers[0];
    assert!(
        peer.connected
            && peer.fresh
            && peer.cluster == "east"
            && peer.version == Some(resume.version)
    );
    let echo = status.services.iter().find(|s| s.name == "echo").unwrap();
    assert!(!echo.exported && echo.ready_endpoints["east"] == 1);
    let echo_vip = echo.vip.expect("a ClusterSetIP");
    assert!(
        echo_vip.octets()[..2] == [10, 96],
        "{echo_vip} from the default range"
    );
    assert!(
        status
            .services
            .iter()
            .find(|s| s.name == "web")
            .unwrap()
            .exported
    );
    assert!(west_gw.status(now()).table().contains("demo/echo"));

    // East exports web too, with a conflicting port: west's export is older and wins, and the
    // conflict is visible.
    let mut web = service("web", "10.1.0.4");
    web.ports[0].port = 8080;
    east_gw.replace_exports(&[service("echo", "10.1.0.2"), service("api", "10.1.0.3"), web]);
    eventually("the conflict", || {
        west_gw
            .status(now())
            .services
            .iter()
            .any(|s| s.name == "web" && !s.conflicts.is_empty())
    })
    .await;
    east_gw.replace_exports(&[service("echo", "10.1.0.2"), service("api", "10.1.0.3")]);
    eventually("the conflict to clear", || {
        west_gw
            .status(now())
            .services
            .iter()
            .any(|s| s.name == "web" && s.conflicts.is_empty())
    })
    .await;
    let resume = west_gw.imports()[&td("east.example")].resume.unwrap();

    // West restarts: the imports are served from disk at once, before any resync.
    west_gw.shutdown(Duration::from_secs(2)).await;
    let west_gw = Gateway::start(&west_cfg, west.identity.clone())
        .await
        .unwrap();
    let restored = west_gw.imports()[&td("east.example")].clone();
    assert!(
        restored
            .exports
            .contains_key(&ServiceKey::new("demo", "api")),
        "served from disk"
    );
    let echo_after = west_gw
        .status(now())
        .services
        .into_iter()
        .find(|s| s.name == "echo")
        .unwrap();
    assert_eq!(
        echo_after.vip,
        Some(echo_vip),
        "VIPs are stable across restarts"
    );
    eventually("the resumed stream", || {
        west_gw.imports()[&td("east.example")].connected
    })
    .await;
    assert_eq!(
        west_gw.imports()[&td("east.example")].resume.unwrap(),
        resume,
        "resumed, nothing duplicated"
    );

    // East goes away: its endpoints stay for the staleness budget, then are withdrawn.
    east_gw.shutdown(Duration::from_secs(2)).await;
    eventually("the disconnect", || {
        !west_gw.imports()[&td("east.example")].connected
    })
    .await;
    assert_eq!(
        endpoints_of(&west_gw, "east", "echo"),
        ["10.1.0.2"],
        "kept within the budget"
    );
    eventually("the withdrawal", || {
        endpoints_of(&west_gw, "east", "echo").is_empty()
    })
    .await;

    // East comes back (a new epoch on the same port): west resyncs with a snapshot.
    let mut east_cfg = east_cfg;
    east_cfg.listen = west_cfg.peering.peers[0].address;
    east_cfg.services = vec![service("echo", "10.1.0.9")];
    // The old sockets close asynchronously; retry the bind briefly, as a restarted process
    // would simply get the port.
    let mut attempt = 0;
    let east_gw = loop {
        match Gateway::start(&east_cfg, east.identity.clone()).await {
            Ok(gateway) => break gateway,
            Err(_) if attempt < 50 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart east: {e}"),
        }
    };
    eventually("the resync", || {
        endpoints_of(&west_gw, "east", "echo") == ["10.1.0.9"]
    })
    .await;
    assert!(
        endpoints_of(&west_gw, "east", "api").is_empty(),
        "the snapshot replaced the old state"
    );

    west_gw.shutdown(Duration::from_secs(2)).await;
    east_gw.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_is_not_a_configured_peer_gets_nothing() {
    let trust = TrustStore::default();
    let west = domain("west.example", &trust);
    let east = domain("east.example", &trust);
    // East federates with west (tunnels allowed) but does not list it as a peering peer.
    let mut east_cfg = config(
        "east.example",
        "east",
        None,
        vec![service("echo", "10.1.0.1")],
        None,
    );
    east_cfg.federated_trust_domains = vec![td("west.example")];
    let east_gw = Gateway::start(&east_cfg, east.identity.clone())
        .await
        .unwrap();
    let west_gw = Gateway::start(
        &config(
            "west.example",
            "west",
            Some(("east.example", east_gw.addr())),
            vec![],
            None,
        ),
        west.identity.clone(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let imported = &west_gw.imports()[&td("east.example")];
    assert!(
        imported.exports.is_empty() && !imported.connected,
        "{imported:?}"
    );
    west_gw.shutdown(Duration::from_secs(2)).await;
    east_gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_catalog_api_streams_services_with_vips_to_its_own_trust_domain() {
    use isthmus_api::catalog::WatchCatalogRequest;
    use isthmus_api::catalog::catalog_client::CatalogClient;
    use isthmus_api::transport::{ALPN_H2, tls_channel};
    use isthmus_core::tls::{AllowIds, MtlsSettings};
    use std::sync::Arc;

    let trust = TrustStore::default();
    let west = domain("west.example", &trust);
    let east = domain("east.example", &trust);
    let west_ca = &west.ca;

    let placeholder = "127.0.0.1:9".parse().unwrap();
    let east_gw = Gateway::start(
        &config(
            "east.example",
            "east",
            Some(("west.example", placeholder)),
            vec![service("echo", "10.1.0.1")],
            None,
        ),
        east.identity.clone(),
    )
    .await
    .unwrap();
    let mut west_cfg = config(
        "west.example",
        "west",
        Some(("east.example", east_gw.addr())),
        vec![],
        None,
    );
    west_cfg.catalog_listen = Some("127.0.0.1:0".parse().unwrap());
    let west_gw = Gateway::start(&west_cfg, west.identity.clone())
        .await
        .unwrap();
    let gateway_id =
        SpiffeId::parse("spiffe://west.example/ns/isthmus-system/sa/eastwest-gateway").unwrap();

    let client_for = |ca: &CertificateAuthority, id: &str| {
        let settings = MtlsSettings {
            svid: SvidSource::new(
                ca.issue_svid(&SpiffeId::parse(id).unwrap(), DEFAULT_LEAF_TTL, now())
                    .unwrap(),
            )
            .unwrap(),
            trust: trust.clone(),
            authorizer: Arc::new(AllowIds(vec![gateway_id.clone()])),
            alpn: vec![ALPN_H2.to_vec()],
            observer: None,
        };
        let tls = isthmus_core::tls::client_config(&settings).unwrap();
        CatalogClient::new(tls_channel(west_gw.catalog_addr().unwrap(), Arc::new(tls)))
    };
    let mut dns = client_for(west_ca, "spiffe://west.example/ns/isthmus-system/sa/dns");
    let mut stream = dns
        .watch(WatchCatalogRequest {})
        .await
        .unwrap()
        .into_inner();
    // The first message may predate the peering snapshot; wait for echo.
    let snapshot = loop {
        let s = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if s.services.iter().any(|svc| svc.name == "echo") {
            break s;
        }
    };
    assert_eq!(snapshot.cluster, "west");
    let echo = snapshot.services.iter().find(|s| s.name == "echo").unwrap();
    assert!(echo.vip.starts_with("10.96."), "{echo:?}");
    assert_eq!(echo.r#type, "ClusterSetIP");
    assert_eq!(echo.clusters[0].cluster, "east");
    assert!(!echo.clusters[0].local);
    assert_eq!(echo.clusters[0].endpoints[0].address, "10.1.0.1");
    // A change in east reaches the watcher.
    east_gw.replace_exports(&[service("echo", "10.1.0.7")]);
    loop {
        let s = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let svc = s.services.iter().find(|svc| svc.name == "echo").unwrap();
        if svc.clusters[0].endpoints[0].address == "10.1.0.7" {
            assert_eq!(svc.vip, echo.vip, "the VIP does not move");
            break;
        }
    }
    // A workload of another trust domain may not watch.
    let mut foreign = client_for(
        &CertificateAuthority::generate(td("east.example"), now(), DEFAULT_CA_TTL).unwrap(),
        "spiffe://east.example/ns/demo/sa/x",
    );
    assert!(foreign.watch(WatchCatalogRequest {}).await.is_err());
    west_gw.shutdown(Duration::from_secs(2)).await;
    east_gw.shutdown(Duration::from_secs(2)).await;
}

/// A port number free on 127.0.0.1 for both UDP (QUIC) and TCP (the fallback).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn start_retrying(cfg: &GatewayConfig, identity: &GatewayIdentity) -> Gateway {
    for _ in 0..50 {
        match Gateway::start(cfg, identity.clone()).await {
            Ok(gateway) => return gateway,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot start gateway {}", cfg.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_in_a_full_mesh() {
    let trust = TrustStore::default();
    let names = ["west", "east", "north"];
    let domains: Vec<Domain> = names
        .iter()
        .map(|n| domain(&format!("{n}.example"), &trust))
        .collect();
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let dirs: Vec<PathBuf> = names
        .iter()
        .map(|n| std::env::temp_dir().join(format!("isthmus-mesh-{n}-{}", std::process::id())))
        .collect();
    for dir in &dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    let cfg = |i: usize, services: Vec<ExportedService>| {
        let mut cfg = config(
            &format!("{}.example", names[i]),
            names[i],
            None,
            services,
            Some(dirs[i].clone()),
        );
        cfg.listen = format!("127.0.0.1:{}", ports[i]).parse().unwrap();
        for j in (0..names.len()).filter(|j| *j != i) {
            let peer = td(&format!("{}.example", names[j]));
            cfg.federated_trust_domains.push(peer.clone());
            cfg.peering.peers.push(PeerConfig {
                trust_domain: peer,
                address: format!("127.0.0.1:{}", ports[j]).parse().unwrap(),
            });
        }
        cfg
    };
    // West exports echo and a DNS service on 53/TCP.
    let mut dns_west = service("dns", "10.0.0.53");
    dns_west.ports[0] = ServicePort {
        name: "dns".into(),
        port: 53,
        target_port: None,
        protocol: "TCP".into(),
    };
    let west = start_retrying(
        &cfg(0, vec![service("echo", "10.0.0.1"), dns_west]),
        &domains[0].identity,
    )
    .await;
    // A later export of the same port as UDP (north) conflicts; west's is older and wins.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let east = start_retrying(&cfg(1, vec![]), &domains[1].identity).await;
    let mut dns_north = service("dns", "10.2.0.53");
    dns_north.ports[0] = ServicePort {
        name: "dns".into(),
        port: 53,
        target_port: None,
        protocol: "UDP".into(),
    };
    let north_cfg = cfg(2, vec![dns_north]);
    let north = start_retrying(&north_cfg, &domains[2].identity).await;

    let gateways = [&west, &east, &north];
    eventually("echo everywhere", || {
        [&east, &north]
            .iter()
            .all(|g| endpoints_of(g, "west", "echo") == ["10.0.0.1"])
    })
    .await;
    eventually("the conflict on every side", || {
        gateways.iter().all(|g| {
            g.catalog(now()).iter().any(|s| {
                s.key.name == "dns"
                    && s.ports.iter().any(|p| p.port == 53 && p.protocol == isthmus_core::catalog::Protocol::Tcp)
                    && s.conflicts.iter().any(|c| matches!(c, isthmus_core::catalog::Conflict::Port { cluster, .. } if cluster == "north"))
            })
        })
    })
    .await;

    // Endpoint changes propagate.
    west.replace_exports(&[service("echo", "10.0.0.2")]);
    eventually("the change everywhere", || {
        [&east, &north]
            .iter()
            .all(|g| endpoints_of(g, "west", "echo") == ["10.0.0.2"])
    })
    .await;

    // North stops: its endpoints are withdrawn after the staleness budget, on every side.
    north.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        endpoints_of(&west, "north", "dns"),
        ["10.2.0.53"],
        "kept within the budget"
    );
    eventually("north withdrawn", || {
        [&west, &east]
            .iter()
            .all(|g| endpoints_of(g, "north", "dns").is_empty())
    })
    .await;
    // North comes back, restored from disk before it reconnects: it serves west's echo at once.
    let north = start_retrying(&north_cfg, &domains[2].identity).await;
    assert_eq!(
        endpoints_of(&north, "west", "echo"),
        ["10.0.0.2"],
        "served from disk"
    );
    eventually("north resynced", || {
        [&west, &east]
            .iter()
            .all(|g| endpoints_of(g, "north", "dns") == ["10.2.0.53"])
    })
    .await;
    // No duplicates or ghosts: exactly the exports that exist.
    for g in [&west, &east, &north] {
        let catalog = g.catalog(now());
        let names: Vec<_> = catalog.iter().map(|s| s.key.name.as_str()).collect();
        assert_eq!(names, ["dns", "echo"], "{}", g.status(now()).table());
        let dns = catalog.iter().find(|s| s.key.name == "dns").unwrap();
        assert_eq!(
            dns.endpoints.keys().map(String::as_str).collect::<Vec<_>>(),
            ["north"]
        );
        assert_eq!(dns.endpoints["north"].len(), 1);
    }
    // A gateway of a trust domain nobody federates with is refused at the handshake and
    // imports nothing.
    let south = domain("south.example", &trust);
    let mut south_cfg = config("south.example", "south", None, vec![], None);
    south_cfg.federated_trust_domains = vec![td("west.example")];
    south_cfg.peering.peers = vec![PeerConfig {
        trust_domain: td("west.example"),
        address: format!("127.0.0.1:{}", ports[0]).parse().unwrap(),
    }];
    let south_gw = Gateway::start(&south_cfg, south.identity.clone())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let imported = &south_gw.imports()[&td("west.example")];
    assert!(
        imported.exports.is_empty() && !imported.connected,
        "{imported:?}"
    );
    assert!(
        west.catalog(now())
            .iter()
            .all(|s| !s.endpoints.contains_key("south"))
    );
    south_gw.shutdown(Duration::from_secs(2)).await;
    for g in [west, east, north] {
        g.shutdown(Duration::from_secs(2)).await;
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
