//! A node agent's view of the broker, through `isthmus_api::broker_client`: attest with a join
//! token, obtain a workload SVID for an assigned entry, follow the bundle stream, and renew
//! every SVID when the broker's signing root changes.

use std::time::Duration;

use isthmus_api::broker::broker_admin_client::BrokerAdminClient;
use isthmus_api::broker::{self as pb};
use isthmus_api::broker_client::{BrokerEndpoint, NodeIdentity};
use isthmus_api::transport::unix_channel;
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_core::{Bundle, TrustDomain};
use isthmus_trust_broker::runtime::Broker;
use time::OffsetDateTime;

/// A broker for `td` in `dir`, a join token for `node`, and entry `entry_id` for `spiffe_id`
/// assigned to that node.
async fn broker_with_entry(
    td: &str,
    dir: &std::path::Path,
    node: &str,
    entry_id: &str,
    spiffe_id: &str,
) -> (Broker, String) {
    let mut cfg = isthmus_trust_broker::config::BrokerConfig {
        trust_domain: Some(TrustDomain::new(td).unwrap()),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    cfg.bundle_endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    let broker = Broker::start(&cfg).await.unwrap();
    let mut admin = BrokerAdminClient::new(unix_channel(broker.admin_socket().to_path_buf()));
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            node: node.into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    admin
        .create_entry(pb::Entry {
            id: entry_id.into(),
            spiffe_id: spiffe_id.into(),
            node: node.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    (broker, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_attests_gets_workload_svids_and_follows_rotation() {
    let dir = std::env::temp_dir().join(format!("isthmus-broker-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (broker, token) = broker_with_entry(
        "west.example",
        &dir,
        "node-a",
        "echo",
        "spiffe://west.example/ns/demo/sa/echo",
    )
    .await;

    let endpoint = BrokerEndpoint {
        address: broker.api_addr(),
        trust_domain: TrustDomain::new("west.example").unwrap(),
        bootstrap_bundle: Bundle::clone(&broker.authority().bundle()),
    };
    let node = NodeIdentity::attest(endpoint.clone(), &token)
        .await
        .unwrap();
    assert_eq!(
        node.node_svid().current().svid.id().as_str(),
        "spiffe://west.example/isthmus/node/node-a"
    );
    // A used token cannot attest another node.
    assert!(NodeIdentity::attest(endpoint, &token).await.is_err());
    let entries = node.entries().await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["echo"]
    );

    let (drain, watch) = DrainTrigger::new();
    let maintainer = node.clone();
    let maintain_watch = watch.clone();
    tokio::spawn(async move { maintainer.maintain(maintain_watch).await });
    let echo = node.workload_source("echo", watch.clone()).await.unwrap();
    let first_leaf = echo.current().svid.leaf().clone();
    assert_eq!(
        echo.current().svid.id().as_str(),
        "spiffe://west.example/ns/demo/sa/echo"
    );
    let first_node_leaf = node.node_svid().current().svid.leaf().clone();
    // Let the bundle stream deliver its baseline before the root changes.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The broker's root changes: the bundle stream brings both roots, and the workload and
    // node SVIDs are renewed from the new root without waiting for half-life.
    broker
        .authority()
        .rotate_now(OffsetDateTime::now_utc())
        .unwrap();
    let west = TrustDomain::new("west.example").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let two_roots = node
            .trust()
            .get(&west)
            .is_some_and(|b| b.x509_authorities().len() == 2);
        let renewed = *echo.current().svid.leaf() != first_leaf
            && *node.node_svid().current().svid.leaf() != first_node_leaf;
        if two_roots && renewed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation did not reach the node (roots {two_roots}, renewed {renewed})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The renewed SVID chains to the new root only.
    let bundle = node.trust().get(&west).unwrap();
    let only_new = isthmus_core::BundleSet::new([Bundle::with_x509_authorities(
        west.clone(),
        vec![bundle.x509_authorities()[1].clone()],
    )]);
    isthmus_core::verify::verify_svid_chain(
        echo.current().svid.chain(),
        &only_new,
        rustls_pki_types::UnixTime::now(),
        isthmus_core::verify::SvidUsage::Any,
    )
    .unwrap();
    drain.drain(Duration::from_secs(2)).await;
    broker.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_gets_its_identity_from_the_broker() {
    use isthmus_gateway::config::BrokerIdentity;
    use isthmus_gateway::server::Gateway;

    let dir = std::env::temp_dir().join(format!("isthmus-gw-broker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let gateway_id = "spiffe://east.example/ns/isthmus-system/sa/eastwest-gateway";
    let (broker, token) = broker_with_entry(
        "east.example",
        &dir.join("broker"),
        "gateway-east",
        "gateway",
        gateway_id,
    )
    .await;
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bundle.json"),
        broker.authority().bundle().to_json().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    let broker_identity = BrokerIdentity {
        address: broker.api_addr(),
        bundle_file: dir.join("bundle.json"),
        join_token_file: dir.join("token"),
        entry_id: "gateway".into(),
    };
    let east = TrustDomain::new("east.example").unwrap();
    let (drain, watch) = DrainTrigger::new();
    let identity = isthmus_gateway::identity::from_broker(&broker_identity, &east, watch)
        .await
        .unwrap();
    assert_eq!(identity.svid.current().svid.id().as_str(), gateway_id);
    assert!(identity.trust.get(&east).is_some());
    let gateway = Gateway::start(
        &isthmus_gateway::config::GatewayConfig {
            trust_domain: Some(east.clone()),
            cluster: "east".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        identity,
    )
    .await
    .unwrap();
    // A workload of the same trust domain reaches it (refused only because nothing is
    // exported: the handshake, and so the broker-issued identity, worked).
    let client_svid = broker
        .authority()
        .issue_svid(
            &isthmus_core::SpiffeId::parse("spiffe://east.example/ns/demo/sa/c").unwrap(),
            None,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let client = isthmus_api::tunnel_client::TunnelClient::new(
        &isthmus_core::tls::MtlsSettings {
            svid: isthmus_core::SvidSource::new(client_svid).unwrap(),
            trust: isthmus_core::TrustStore::from_bundles([Bundle::clone(
                &broker.authority().bundle(),
            )]),
            authorizer: std::sync::Arc::new(isthmus_core::tls::AllowIds(vec![
                isthmus_core::SpiffeId::parse(gateway_id).unwrap(),
            ])),
            alpn: vec![],
            observer: None,
        },
        "127.0.0.1:0".parse().unwrap(),
        Default::default(),
    )
    .unwrap();
    let e = client
        .open(
            gateway.addr(),
            isthmus_api::tunnel::Target {
                namespace: "demo".into(),
                service: "echo".into(),
                port: 80,
                cluster: None,
            },
        )
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        e.refusal(),
        Some(isthmus_api::tunnel::ResultCode::UnknownService),
        "{e}"
    );
    client.close().await;
    gateway.shutdown(Duration::from_secs(2)).await;
    drain.drain(Duration::from_secs(2)).await;
    broker.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}
