//! JWT-SVIDs end to end: a node mints them through the broker's issuance API for its own
//! entries only, the JWT keys travel in the bundle (admin `bundle show`, `WatchBundles`, the
//! bundle endpoint of a federated broker), tokens validate against the node's trust store, and
//! the JWT key rotates with the root (published first, signing once active, the old key kept
//! until retired).

use std::time::Duration;

use isthmus_api::broker::{self as pb};
use isthmus_api::broker_client::{BrokerClientError, BrokerEndpoint, NodeIdentity};
use isthmus_core::jwt::{self, JwtError};
use isthmus_core::lifecycle::{DrainTrigger, DrainWatch};
use isthmus_core::{Bundle, TrustDomain};
use isthmus_trust_broker::runtime::Broker;
use time::OffsetDateTime;
use tonic::Code;

use crate::broker::{admin, config, data_dir, eventually, federate};

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn aud(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

/// Number of JWT authorities `node` holds for `trust_domain`.
fn jwt_keys(node: &NodeIdentity, trust_domain: &TrustDomain) -> usize {
    node.trust()
        .get(trust_domain)
        .map_or(0, |b| b.jwt_authorities().len())
}

/// Creates `entries` (id, SPIFFE ID path under the broker's domain, node, TTL) and attests
/// `node`; the node follows the bundle stream until `drain` signals.
async fn attested_node(
    broker: &Broker,
    node: &str,
    entries: &[(&str, &str, &str, u64)],
    drain: DrainWatch,
) -> NodeIdentity {
    let mut admin = admin(broker);
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            node: node.into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    for (id, path, owner, ttl_seconds) in entries {
        admin
            .create_entry(pb::Entry {
                id: (*id).into(),
                spiffe_id: format!("spiffe://{}{path}", broker.trust_domain()),
                node: (*owner).into(),
                ttl_seconds: *ttl_seconds,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let endpoint = BrokerEndpoint {
        address: broker.api_addr(),
        trust_domain: broker.trust_domain().clone(),
        bootstrap_bundle: Bundle::clone(&broker.authority().bundle()),
    };
    let identity = NodeIdentity::attest(endpoint, &token).await.unwrap();
    let maintainer = identity.clone();
    tokio::spawn(async move { maintainer.maintain(drain).await });
    identity
}

fn refusal(e: BrokerClientError) -> tonic::Status {
    match e {
        BrokerClientError::Call { call, status } => {
            assert_eq!(call, "MintJwtSvid");
            *status
        }
        other => panic!("expected a refused call, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_mint_jwt_svids_for_their_entries_and_keys_rotate_with_the_root() {
    let dir = data_dir("jwt");
    let mut cfg = config("west.example", &dir);
    cfg.api.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = Broker::start(&cfg).await.unwrap();
    let west = td("west.example");
    let (drain, watch) = DrainTrigger::new();
    let node = attested_node(
        &broker,
        "node-a",
        &[
            ("echo", "/ns/demo/sa/echo", "node-a", 0),
            ("short", "/ns/demo/sa/short", "node-a", 60),
            ("theirs", "/ns/demo/sa/theirs", "node-b", 0),
        ],
        watch.clone(),
    )
    .await;

    // The published bundle carries the signing key as a jwt-svid JWK with its kid, and the
    // node's trust store has it.
    let first_kid = broker.authority().jwt_key_id();
    let shown: serde_json::Value = serde_json::from_str(
        &admin(&broker)
            .show_bundle(pb::ShowBundleRequest::default())
            .await
            .unwrap()
            .into_inner()
            .document,
    )
    .unwrap();
    let jwks: Vec<&serde_json::Value> = shown["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .collect();
    assert_eq!(jwks.len(), 1, "{shown}");
    assert_eq!(jwks[0]["kid"], first_kid.as_str());
    assert_eq!(
        (&jwks[0]["kty"], &jwks[0]["crv"]),
        (&"EC".into(), &"P-256".into())
    );
    assert!(
        node.trust()
            .get(&west)
            .unwrap()
            .jwt_authorities()
            .contains_key(&first_kid)
    );

    // Minted for an assigned entry, validated by the client against the node's trust store.
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let echo = node.jwt_svid("echo", &aud(&["db", "cache"])).await.unwrap();
    assert_eq!(
        echo.spiffe_id.as_str(),
        "spiffe://west.example/ns/demo/sa/echo"
    );
    assert_eq!(echo.audience, aud(&["db", "cache"]));
    assert_eq!(echo.key_id, first_kid);
    // Default lifetime: jwt_svid_ttl, 5 minutes.
    let lifetime = echo.expiry.unix_timestamp() - before;
    assert!((299..=301).contains(&lifetime), "lifetime {lifetime}");
    let snapshot = node.trust().snapshot();
    jwt::validate(&echo.token, "cache", &snapshot).unwrap();
    assert!(matches!(
        jwt::validate(&echo.token, "other", &snapshot),
        Err(JwtError::WrongAudience { .. })
    ));
    // An entry's own TTL wins.
    let short = node.jwt_svid("short", &aud(&["db"])).await.unwrap();
    assert_eq!(
        short.expiry.unix_timestamp() - short.issued_at.unwrap().unix_timestamp(),
        60
    );

    // Refusals: an entry of another node, no audience, an empty audience value.
    let theirs = refusal(node.jwt_svid("theirs", &aud(&["db"])).await.unwrap_err());
    assert_eq!(theirs.code(), Code::PermissionDenied, "{theirs:?}");
    let unknown = refusal(node.jwt_svid("nope", &aud(&["db"])).await.unwrap_err());
    assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");
    let no_audience = refusal(node.jwt_svid("echo", &[]).await.unwrap_err());
    assert_eq!(no_audience.code(), Code::InvalidArgument);
    assert_eq!(no_audience.message(), "audience must be specified");
    let empty = refusal(node.jwt_svid("echo", &aud(&["db", ""])).await.unwrap_err());
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");

    // The admin API mints for any workload ID of the domain, and only of the domain.
    let minted = admin(&broker)
        .mint_jwt_svid(pb::AdminMintJwtSvidRequest {
            spiffe_id: "spiffe://west.example/ns/ops/sa/debug".into(),
            audience: aud(&["db"]),
            ttl_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let debug = jwt::validate(&minted.token, "db", &node.trust().snapshot()).unwrap();
    assert_eq!(debug.expiry.unix_timestamp(), minted.expires_at);
    for (spiffe_id, audience) in [
        ("spiffe://east.example/ns/ops/sa/debug", aud(&["db"])),
        ("spiffe://west.example", aud(&["db"])),
        ("spiffe://west.example/ns/ops/sa/debug", aud(&[])),
    ] {
        let refused = admin(&broker)
            .mint_jwt_svid(pb::AdminMintJwtSvidRequest {
                spiffe_id: spiffe_id.into(),
                audience,
                ttl_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{spiffe_id}: {refused:?}"
        );
    }

    // Rotation: the new key arrives over WatchBundles with the new root; new tokens carry its
    // kid, and tokens of the old key keep validating while it stays in the bundle.
    broker
        .authority()
        .rotate_now(OffsetDateTime::now_utc())
        .unwrap();
    let new_kid = broker.authority().jwt_key_id();
    assert_ne!(new_kid, first_kid);
    eventually(
        "the new JWT key to reach the node",
        Duration::from_secs(10),
        || jwt_keys(&node, &west) == 2,
    )
    .await;
    let rotated = node.jwt_svid("echo", &aud(&["db"])).await.unwrap();
    assert_eq!(rotated.key_id, new_kid);
    let snapshot = node.trust().snapshot();
    jwt::validate(&rotated.token, "db", &snapshot).unwrap();
    jwt::validate(&echo.token, "db", &snapshot).unwrap();

    // Retirement: once the old root's leaves (and tokens) have all expired, its JWT key leaves
    // the bundle, and what it signed no longer validates.
    let remove_after = broker
        .authority()
        .roots()
        .iter()
        .find_map(|r| r.remove_after)
        .unwrap();
    assert!(echo.expiry <= remove_after);
    assert!(broker.authority().tick(remove_after).unwrap());
    eventually(
        "the retired JWT key to leave the node",
        Duration::from_secs(10),
        || jwt_keys(&node, &west) == 1,
    )
    .await;
    let snapshot = node.trust().snapshot();
    assert!(matches!(
        jwt::validate(&echo.token, "db", &snapshot),
        Err(JwtError::UnknownKeyId { .. })
    ));
    jwt::validate(&rotated.token, "db", &snapshot).unwrap();

    // Counted next to the X.509 issuance.
    let text = broker.metrics_text();
    for line in [
        "isthmus_broker_svids_issued_total{kind=\"jwt\"} 3",
        "isthmus_broker_issuance_denied_total{reason=\"entry_not_assigned\"} 2",
        "isthmus_broker_issuance_denied_total{reason=\"no_audience\"} 2",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    drain.drain(Duration::from_secs(2)).await;
    broker.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_brokers_jwt_keys_reach_the_other_side() {
    let (west_dir, east_dir) = (data_dir("jwt-west"), data_dir("jwt-east"));
    let west = Broker::start(&config("west.example", &west_dir))
        .await
        .unwrap();
    let east = Broker::start(&config("east.example", &east_dir))
        .await
        .unwrap();
    // West trusts east; a node of west follows west's bundle set.
    federate(&west, &east).await;
    let east_td = td("east.example");
    let (drain, watch) = DrainTrigger::new();
    let node = attested_node(&west, "node-w", &[], watch).await;
    eventually(
        "a first fetch of east's bundle",
        Duration::from_secs(10),
        || {
            west.federation()
                .status()
                .get(&east_td)
                .is_some_and(|s| s.last_success.is_some())
        },
    )
    .await;
    eventually(
        "east's JWT key to reach west's node",
        Duration::from_secs(10),
        || jwt_keys(&node, &east_td) == 1,
    )
    .await;

    let mint = |audience: &'static str| {
        let east = &east;
        async move {
            admin(east)
                .mint_jwt_svid(pb::AdminMintJwtSvidRequest {
                    spiffe_id: "spiffe://east.example/ns/demo/sa/api".into(),
                    audience: aud(&[audience]),
                    ttl_seconds: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .svid
                .unwrap()
                .token
        }
    };
    let before = mint("spiffe://west.example/db").await;
    let valid = jwt::validate(
        &before,
        "spiffe://west.example/db",
        &node.trust().snapshot(),
    )
    .unwrap();
    assert_eq!(
        valid.spiffe_id.as_str(),
        "spiffe://east.example/ns/demo/sa/api"
    );

    // A scheduled-style rotation on east: the new key is published at once and only reaches
    // west through the bundle endpoint (the bootstrap bundle had one key).
    let generation = east.authority().signing_root_generation();
    let rotated = admin(&east)
        .rotate_ca(pb::RotateCaRequest { now: false })
        .await
        .unwrap()
        .into_inner();
    // Published, not signing yet (activation is 2 s away).
    let during = mint("spiffe://west.example/db").await;
    let east_own = isthmus_core::BundleSet::new([Bundle::clone(&east.authority().bundle())]);
    assert_eq!(east_own.get(&east_td).unwrap().jwt_authorities().len(), 2);
    let kid_before = valid.key_id.clone();
    assert_eq!(
        jwt::validate(&during, "spiffe://west.example/db", &east_own)
            .unwrap()
            .key_id,
        kid_before
    );
    eventually(
        "east's new JWT key to reach west over the bundle endpoint",
        Duration::from_secs(10),
        || {
            west.trust()
                .get(&east_td)
                .is_some_and(|b| b.sequence() == Some(rotated.sequence))
        },
    )
    .await;
    assert_eq!(
        west.trust().get(&east_td).unwrap().jwt_authorities().len(),
        2
    );
    assert_eq!(
        west.federation()
            .status()
            .get(&east_td)
            .unwrap()
            .jwt_authorities,
        2
    );
    let kid_of = |token: &str| {
        jwt::validate(token, "spiffe://west.example/db", &node.trust().snapshot())
            .unwrap()
            .key_id
    };
    eventually("east's new root to sign", Duration::from_secs(10), || {
        east.authority().signing_root_generation() != generation
    })
    .await;
    eventually(
        "the node to hold both east keys",
        Duration::from_secs(10),
        || jwt_keys(&node, &east_td) == 2,
    )
    .await;
    let after = mint("spiffe://west.example/db").await;
    assert_eq!(kid_of(&after), east.authority().jwt_key_id());
    assert_ne!(kid_of(&after), kid_before);
    // Tokens of the old key keep validating on west's node.
    assert_eq!(kid_of(&before), kid_before);
    // West's own keys never validate east's tokens: the bundle is chosen by the subject.
    let only_west = isthmus_core::BundleSet::new([Bundle::clone(&west.authority().bundle())]);
    assert_eq!(
        jwt::validate(&after, "spiffe://west.example/db", &only_west).unwrap_err(),
        JwtError::UnknownTrustDomain(east_td.clone())
    );

    drain.drain(Duration::from_secs(2)).await;
    west.shutdown(Duration::from_secs(5)).await;
    east.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(west_dir);
    let _ = std::fs::remove_dir_all(east_dir);
}
