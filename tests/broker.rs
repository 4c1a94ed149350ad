//! Trust brokers on 127.0.0.1: two trust domains federating over `https_spiffe` through the
//! admin API, CA rotation reaching the other domain, and node attestation and issuance
//! through the gRPC API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::broker::broker_admin_client::BrokerAdminClient;
use isthmus_api::broker::issuance_client::IssuanceClient;
use isthmus_api::broker::{self as pb};
use isthmus_api::transport::{ALPN_H2, tls_channel, unix_channel};
use isthmus_core::config::HumanDuration;
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::verify::{SvidUsage, verify_svid_chain};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore, X509Svid};
use isthmus_trust_broker::config::BrokerConfig;
use isthmus_trust_broker::runtime::Broker;
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;
use tonic::Code;

pub(crate) fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isthmus-broker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub(crate) fn config(td: &str, dir: &std::path::Path) -> BrokerConfig {
    let mut cfg = BrokerConfig {
        trust_domain: Some(TrustDomain::new(td).unwrap()),
        data_dir: dir.to_path_buf(),
        ..BrokerConfig::default()
    };
    cfg.bundle_endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.bundle_endpoint.refresh_hint = HumanDuration::from_secs(1);
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation_fetch.min_refresh = HumanDuration::from_secs(1);
    cfg.federation_fetch.timeout = HumanDuration::from_secs(2);
    cfg.rotation_activation_delay = HumanDuration::from_secs(2);
    cfg
}

pub(crate) fn admin(broker: &Broker) -> BrokerAdminClient<tonic::transport::Channel> {
    BrokerAdminClient::new(unix_channel(broker.admin_socket().to_path_buf()))
}

pub(crate) async fn federate(from: &Broker, to: &Broker) {
    let offer = serde_json::to_string(&to.federation_offer().unwrap()).unwrap();
    admin(from)
        .add_federation(pb::FederationRelationship { json: offer })
        .await
        .unwrap();
}

/// Waits (bounded) until `check` holds; the bound is generous, this is not a timing test.
pub(crate) async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn verifies(svid: &X509Svid, trust: &TrustStore) -> bool {
    verify_svid_chain(
        svid.chain(),
        &trust.snapshot(),
        UnixTime::now(),
        SvidUsage::Any,
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_and_rotation_across_trust_domains() {
    let (west_dir, east_dir) = (data_dir("west"), data_dir("east"));
    let west = Broker::start(&config("west.example", &west_dir))
        .await
        .unwrap();
    let east = Broker::start(&config("east.example", &east_dir))
        .await
        .unwrap();
    // Initial bundles are exchanged once, inside the relationships.
    federate(&west, &east).await;
    federate(&east, &west).await;
    let east_td = TrustDomain::new("east.example").unwrap();
    let west_td = TrustDomain::new("west.example").unwrap();
    assert!(west.trust().get(&east_td).is_some());
    assert!(east.trust().get(&west_td).is_some());

    let workload = SpiffeId::parse("spiffe://east.example/ns/demo/sa/echo").unwrap();
    let old_leaf = east
        .authority()
        .issue_svid(&workload, None, OffsetDateTime::now_utc())
        .unwrap();
    assert!(verifies(&old_leaf, west.trust()));
    // Wait until west has fetched from the endpoint at least once (authenticated by SVID).
    eventually("a first successful fetch", Duration::from_secs(10), || {
        west.federation()
            .status()
            .get(&east_td)
            .is_some_and(|s| s.last_success.is_some())
    })
    .await;

    let before = west.trust().get(&east_td).unwrap().sequence().unwrap();
    let generation = east.authority().signing_root_generation();
    let rotated = admin(&east)
        .rotate_ca(pb::RotateCaRequest { now: false })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.sequence > before);
    // Refresh hint 1 s: west polls every second; allow a few intervals.
    eventually(
        "west to hold east's rotated bundle",
        Duration::from_secs(5),
        || west.trust().get(&east_td).and_then(|b| b.sequence()) == Some(rotated.sequence),
    )
    .await;
    // After the activation delay (2 s) the new root signs.
    eventually(
        "east's new root to start signing",
        Duration::from_secs(10),
        || east.authority().signing_root_generation() != generation,
    )
    .await;
    let new_leaf = east
        .authority()
        .issue_svid(&workload, None, OffsetDateTime::now_utc())
        .unwrap();
    let held = west.trust().get(&east_td).unwrap();
    assert_eq!(
        held.x509_authorities().len(),
        2,
        "old and new root both published"
    );
    assert!(
        verifies(&new_leaf, west.trust()),
        "leaf of the new root accepted by west"
    );
    assert!(
        verifies(&old_leaf, west.trust()),
        "leaf of the old root still accepted"
    );
    // The new leaf really is signed by the new root only.
    let only_new = TrustStore::from_bundles([Bundle::with_x509_authorities(
        east_td.clone(),
        vec![held.x509_authorities()[1].clone()],
    )]);
    assert!(verifies(&new_leaf, &only_new) && !verifies(&old_leaf, &only_new));

    // Status shows the relationship, its sequence and last success.
    let status: serde_json::Value = serde_json::from_str(
        &admin(&west)
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .json,
    )
    .unwrap();
    let fed = &status["federation"][0];
    assert_eq!(fed["trust_domain"], "east.example");
    assert_eq!(fed["sequence"], rotated.sequence);
    assert!(fed["last_success"].is_string());

    // Terminating the relationship removes the bundle.
    let removed = admin(&west)
        .remove_federation(pb::RemoveFederationRequest {
            trust_domain: "east.example".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.removed);
    assert!(west.trust().get(&east_td).is_none());
    assert!(!verifies(&new_leaf, west.trust()));

    west.shutdown(Duration::from_secs(5)).await;
    east.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(west_dir);
    let _ = std::fs::remove_dir_all(east_dir);
}

fn csr() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (key, csr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_attest_with_join_tokens_and_get_only_their_entries() {
    let dir = data_dir("issuance");
    let mut cfg = config("west.example", &dir);
    cfg.api.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = Broker::start(&cfg).await.unwrap();
    let mut admin = admin(&broker);
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            node: "node-a".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for (id, node) in [("mine", "node-a"), ("theirs", "node-b")] {
        admin
            .create_entry(pb::Entry {
                id: id.into(),
                spiffe_id: format!("spiffe://west.example/ns/demo/sa/{id}"),
                node: node.into(),
                selectors: vec![pb::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Bootstrap trust: the broker's bundle, obtained out of band; verify the broker's ID.
    let bootstrap = TrustStore::from_bundles([Bundle::clone(&broker.authority().bundle())]);
    let broker_id = SpiffeId::parse("spiffe://west.example/isthmus/broker").unwrap();
    let anonymous = isthmus_core::tls::anonymous_client_config(
        bootstrap.clone(),
        Arc::new(AllowIds(vec![broker_id.clone()])),
        vec![ALPN_H2.to_vec()],
    )
    .unwrap();
    let mut anon = IssuanceClient::new(tls_channel(broker.api_addr(), Arc::new(anonymous)));
    let attest = |evidence: &str, csr: Vec<u8>| pb::AttestNodeRequest {
        attestor: "join_token".into(),
        evidence: evidence.as_bytes().to_vec(),
        csr,
    };
    let (node_key, node_csr) = csr();
    let response = anon
        .attest_node(attest(&token, node_csr.clone()))
        .await
        .unwrap()
        .into_inner();
    let node_svid = X509Svid::from_der(
        &response.svid.unwrap().cert_chain,
        &node_key.serialize_der(),
    )
    .unwrap();
    assert_eq!(
        node_svid.id().as_str(),
        "spiffe://west.example/isthmus/node/node-a"
    );
    assert!(
        response
            .bundles
            .unwrap()
            .bundles
            .iter()
            .any(|b| b.trust_domain == "west.example")
    );
    // A used token and an unknown token are refused.
    let used = anon
        .attest_node(attest(&token, node_csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(used.code(), Code::PermissionDenied, "{used:?}");
    assert!(used.message().contains("already used"), "{used:?}");
    let unknown = anon
        .attest_node(attest("not-a-token", node_csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");
    assert!(
        unknown.message().contains("unknown join token"),
        "{unknown:?}"
    );
    // Without a node SVID nothing else is allowed.
    let anonymous_list = anon
        .list_assigned_entries(pb::ListAssignedEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(anonymous_list.code(), Code::Unauthenticated);

    let node_tls = isthmus_core::tls::client_config(&MtlsSettings {
        svid: SvidSource::new(node_svid).unwrap(),
        trust: bootstrap,
        authorizer: Arc::new(AllowIds(vec![broker_id])),
        alpn: vec![ALPN_H2.to_vec()],
        observer: None,
    })
    .unwrap();
    let mut node = IssuanceClient::new(tls_channel(broker.api_addr(), Arc::new(node_tls)));
    let entries = node
        .list_assigned_entries(pb::ListAssignedEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(
        entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["mine"]
    );

    let (workload_key, workload_csr) = csr();
    let signed = node
        .sign_workload_svids(pb::SignWorkloadSvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: "mine".into(),
                csr: workload_csr.clone(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let svid =
        X509Svid::from_der(&signed.svids[0].cert_chain, &workload_key.serialize_der()).unwrap();
    assert_eq!(svid.id().as_str(), "spiffe://west.example/ns/demo/sa/mine");
    let refused = node
        .sign_workload_svids(pb::SignWorkloadSvidsRequest {
            requests: vec![pb::SvidRequest {
                entry_id: "theirs".into(),
                csr: workload_csr,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // The bundle stream sends the full set at once and again after a rotation.
    let mut stream = node
        .watch_bundles(pb::WatchBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let generation = first.signing_root_generation;
    broker
        .authority()
        .rotate_now(OffsetDateTime::now_utc())
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let own = next
        .bundles
        .unwrap()
        .bundles
        .into_iter()
        .find(|b| b.trust_domain == "west.example")
        .unwrap();
    let bundle = Bundle::parse_json(
        TrustDomain::new("west.example").unwrap(),
        &own.spiffe_bundle,
    )
    .unwrap();
    assert_eq!(bundle.x509_authorities().len(), 2);
    // Once the stream has caught up, the generation has moved to the new signing root.
    let mut latest = next.signing_root_generation;
    while latest == generation {
        latest = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .signing_root_generation;
    }

    // Issuance, attestation and refusals are counted, and served on /metrics.
    let text = http_get(broker.metrics_addr().unwrap(), "/metrics").await;
    for line in [
        "isthmus_broker_svids_issued_total{kind=\"node\"} 1",
        "isthmus_broker_svids_issued_total{kind=\"workload\"} 1",
        "isthmus_broker_attestations_total{attestor=\"join_token\",result=\"refused\"} 2",
        "isthmus_broker_issuance_denied_total{reason=\"entry_not_assigned\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        http_get(broker.metrics_addr().unwrap(), "/healthz/ready")
            .await
            .starts_with("ready")
    );

    broker.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A minimal HTTP/1.0 GET on loopback; returns the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}
