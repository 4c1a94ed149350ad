//! Workload API conformance, with the `spiffe` crate (0.19) as the client: real trust brokers on
//! 127.0.0.1, a node attested with a join token, the agent's identities and the Workload API on
//! a Unix socket in a temporary directory, and this test process as the workload (attested from
//! `SO_PEERCRED` like any other caller).
#![expect(
    clippy::unwrap_used,
    reason = "tests panic with the failing value by design"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::broker::broker_admin_client::BrokerAdminClient;
use isthmus_api::broker::{self as pb};
use isthmus_api::broker_client::{BrokerEndpoint, NodeIdentity};
use isthmus_api::transport::unix_channel;
use isthmus_core::config::HumanDuration;
use isthmus_core::lifecycle::DrainTrigger;
use isthmus_core::{Bundle, TrustDomain};
use isthmus_node_agent::attest::{AttestError, PeerCredentials, Selector, WorkloadAttestor};
use isthmus_node_agent::identities::{IdentitySettings, WorkloadIdentities};
use isthmus_node_agent::workload_api::pb::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use isthmus_node_agent::workload_api::{
    self as wapi, WorkloadApi, WorkloadApiServer, WorkloadApiSettings,
};
use isthmus_trust_broker::config::BrokerConfig;
use isthmus_trust_broker::runtime::Broker;
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Source};
use tokio_stream::StreamExt as _;

const WEST: &str = "west.example";
const EAST: &str = "east.example";
const NODE: &str = "node-a";

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isthmus-wapi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// This process's uid: what `SO_PEERCRED` reports to the agent.
fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn uid_selector(uid: u32) -> pb::Selector {
    pb::Selector {
        r#type: "unix".into(),
        value: format!("uid:{uid}"),
    }
}

fn entry(id: &str, path: &str, selectors: Vec<pb::Selector>, federates_with: &[&str]) -> pb::Entry {
    pb::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://{WEST}/{path}"),
        node: NODE.into(),
        selectors,
        federates_with: federates_with.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

async fn start_broker(name: &str, dir: &Path) -> Broker {
    let mut cfg = BrokerConfig {
        trust_domain: Some(td(name)),
        data_dir: dir.join(name),
        ..Default::default()
    };
    cfg.bundle_endpoint.listen = "127.0.0.1:0".parse().unwrap();
    cfg.bundle_endpoint.refresh_hint = HumanDuration::from_secs(1);
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    cfg.federation_fetch.min_refresh = HumanDuration::from_secs(1);
    cfg.federation_fetch.timeout = HumanDuration::from_secs(2);
    cfg.rotation_activation_delay = HumanDuration::from_secs(1);
    Broker::start(&cfg).await.unwrap()
}

fn admin(broker: &Broker) -> BrokerAdminClient<tonic::transport::Channel> {
    BrokerAdminClient::new(unix_channel(broker.admin_socket().to_path_buf()))
}

async fn add_entry(broker: &Broker, entry: pb::Entry) {
    admin(broker).create_entry(entry).await.unwrap();
}

/// A node agent attested to `broker`: its identities and its Workload API.
struct Agent {
    identities: WorkloadIdentities,
    server: WorkloadApiServer,
    drain: DrainTrigger,
}

impl Agent {
    async fn start(broker: &Broker, dir: &Path) -> Self {
        let token = admin(broker)
            .create_join_token(pb::CreateJoinTokenRequest {
                node: NODE.into(),
                ttl_seconds: 60,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let endpoint = BrokerEndpoint {
            address: broker.api_addr(),
            trust_domain: broker.trust_domain().clone(),
            bootstrap_bundle: Bundle::clone(&broker.authority().bundle()),
        };
        let node = NodeIdentity::attest(endpoint, &token).await.unwrap();
        let (drain, watch) = DrainTrigger::new();
        let identities = WorkloadIdentities::start(
            Arc::new(node),
            IdentitySettings {
                entry_refresh: Duration::from_millis(200),
                ..Default::default()
            },
            watch.clone(),
        );
        let settings = WorkloadApiSettings {
            socket: dir.join("run/agent.sock"),
            ..Default::default()
        };
        let server = WorkloadApiServer::start_unix(&settings, identities.clone(), watch)
            .await
            .unwrap();
        Self {
            identities,
            server,
            drain,
        }
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.server.endpoint())
            .await
            .unwrap()
    }

    /// Drains the agent with streams possibly open; shutdown must finish.
    async fn stop(self) {
        let outcome = self.drain.drain(Duration::from_secs(5)).await;
        assert!(outcome.is_complete(), "agent shutdown: {outcome:?}");
        let socket = self.server.socket().to_path_buf();
        self.server.stopped().await;
        assert!(!socket.exists(), "the socket is removed on shutdown");
    }
}

/// A raw client on the generated stubs that sends the security header.
type RawClient = SpiffeWorkloadApiClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        wapi::SecurityHeaderCheck,
    >,
>;

fn raw_client(server: &WorkloadApiServer) -> RawClient {
    fn header(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut()
            .insert(wapi::SECURITY_HEADER, "true".parse().unwrap());
        Ok(r)
    }
    SpiffeWorkloadApiClient::with_interceptor(
        unix_channel(server.socket().to_path_buf()),
        header as wapi::SecurityHeaderCheck,
    )
}

/// Waits (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_source_gets_svids_and_bundle_and_follows_rotation() {
    let dir = temp_dir("rotation");
    let west = start_broker(WEST, &dir).await;
    let me = uid_selector(my_uid());
    // Two entries match this process (ordered by entry ID), one does not.
    add_entry(
        &west,
        entry("b-second", "ns/demo/sa/second", vec![me.clone()], &[]),
    )
    .await;
    add_entry(
        &west,
        entry("a-first", "ns/demo/sa/first", vec![me.clone()], &[]),
    )
    .await;
    add_entry(
        &west,
        entry(
            "c-other",
            "ns/demo/sa/other",
            vec![me, uid_selector(my_uid().wrapping_add(1))],
            &[],
        ),
    )
    .await;
    let agent = Agent::start(&west, &dir).await;

    let client = agent.client().await;
    let svids = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://west.example/ns/demo/sa/first",
            "spiffe://west.example/ns/demo/sa/second"
        ]
    );

    let source = X509Source::builder()
        .endpoint(agent.server.endpoint())
        .build()
        .await
        .unwrap();
    let svid = source.svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://west.example/ns/demo/sa/first"
    );
    let west_td = spiffe::TrustDomain::new(WEST).unwrap();
    let bundle = source.try_bundle_for_trust_domain(&west_td).unwrap();
    assert_eq!(bundle.authorities().len(), 1);
    assert_eq!(
        bundle.authorities()[0].as_bytes(),
        west.authority().bundle().x509_authorities()[0].as_ref()
    );
    // The served key is the leaf's.
    let held = agent.identities.current();
    let first = held.entries().next().unwrap();
    assert_eq!(first.id, "a-first");
    let served_leaf = svid.leaf().as_bytes().to_vec();

    // Let the agent's bundle stream deliver its baseline before the root changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut updates = source.updated();
    west.authority()
        .rotate_now(time::OffsetDateTime::now_utc())
        .unwrap();
    // The new root reaches the bundle and the SVID is renewed from it; both arrive as updates.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let svid = source.svid().unwrap();
        let roots = source
            .try_bundle_for_trust_domain(&west_td)
            .map_or(0, |b| b.authorities().len());
        if svid.leaf().as_bytes() != served_leaf.as_slice() && roots == 2 {
            assert_eq!(
                svid.spiffe_id().to_string(),
                "spiffe://west.example/ns/demo/sa/first"
            );
            break;
        }
        tokio::time::timeout_at(deadline, updates.changed())
            .await
            .expect("no update after the rotation (renewed SVID and two roots)")
            .unwrap();
    }
    source.shutdown().await;
    agent.stop().await;
    west.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Attests every caller as the same fixed selectors: a second workload on the same socket
/// without a second process.
#[derive(Debug)]
struct FixedAttestor(Vec<Selector>);

impl WorkloadAttestor for FixedAttestor {
    fn attest(&self, _creds: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        Ok(self.0.clone())
    }
}

fn bundle_roots(set: &spiffe::X509BundleSet, name: &str) -> Option<usize> {
    set.get(&spiffe::TrustDomain::new(name).unwrap())
        .map(|b| b.authorities().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundle_changes_reach_the_workloads_that_federate() {
    let dir = temp_dir("federation");
    let west = start_broker(WEST, &dir).await;
    let east = start_broker(EAST, &dir).await;
    let offer = serde_json::to_string(&east.federation_offer().unwrap()).unwrap();
    admin(&west)
        .add_federation(pb::FederationRelationship { json: offer })
        .await
        .unwrap();
    add_entry(
        &west,
        entry(
            "fed",
            "ns/demo/sa/fed",
            vec![uid_selector(my_uid())],
            &[EAST],
        ),
    )
    .await;
    // A workload whose entry does not federate with east: attested by a fixed attestor on a
    // second socket.
    let plain_uid = my_uid().wrapping_add(7);
    add_entry(
        &west,
        entry(
            "plain",
            "ns/demo/sa/plain",
            vec![uid_selector(plain_uid)],
            &[],
        ),
    )
    .await;
    let agent = Agent::start(&west, &dir).await;
    let plain_server = WorkloadApiServer::start(
        &WorkloadApiSettings {
            socket: dir.join("run/plain.sock"),
            ..Default::default()
        },
        WorkloadApi::new(
            agent.identities.clone(),
            Arc::new(FixedAttestor(vec![Selector::unix(format!(
                "uid:{plain_uid}"
            ))])),
            agent.drain.watch(),
        ),
        agent.drain.watch(),
    )
    .await
    .unwrap();

    let client = agent.client().await;
    let context = client.fetch_x509_context().await.unwrap();
    assert_eq!(bundle_roots(context.bundle_set(), WEST), Some(1));
    assert_eq!(bundle_roots(context.bundle_set(), EAST), Some(1));
    let plain = WorkloadApiClient::connect_to(plain_server.endpoint())
        .await
        .unwrap();
    let plain_bundles = plain.fetch_x509_bundles().await.unwrap();
    assert_eq!(bundle_roots(&plain_bundles, WEST), Some(1));
    assert_eq!(
        bundle_roots(&plain_bundles, EAST),
        None,
        "east's bundle goes only to entries that federate with it"
    );
    let plain_svid = plain.fetch_x509_svid().await.unwrap();
    assert_eq!(
        plain_svid.spiffe_id().to_string(),
        "spiffe://west.example/ns/demo/sa/plain"
    );

    // East rotates its CA: the new root is published at once, west fetches it (refresh hint
    // 1 s), and the agent's open streams send the new bundle set.
    let mut bundles = client.stream_x509_bundles().await.unwrap();
    let first = bundles.next().await.unwrap().unwrap();
    assert_eq!(bundle_roots(&first, EAST), Some(1));
    let source = X509Source::builder()
        .endpoint(agent.server.endpoint())
        .build()
        .await
        .unwrap();
    assert_eq!(bundle_roots(&source.bundle_set().unwrap(), EAST), Some(1));
    admin(&east)
        .rotate_ca(pb::RotateCaRequest { now: false })
        .await
        .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let set = bundles.next().await.unwrap().unwrap();
            if bundle_roots(&set, EAST) == Some(2) {
                return set;
            }
        }
    })
    .await
    .expect("east's rotated bundle did not reach the FetchX509Bundles stream");
    assert_eq!(bundle_roots(&update, WEST), Some(1));
    eventually(
        "the X509Source to see east's new root",
        Duration::from_secs(5),
        || {
            let source = &source;
            async move { bundle_roots(&source.bundle_set().unwrap(), EAST) == Some(2) }
        },
    )
    .await;
    assert_eq!(
        bundle_roots(&plain.fetch_x509_bundles().await.unwrap(), EAST),
        None
    );

    source.shutdown().await;
    drop(bundles);
    agent.stop().await;
    plain_server.stopped().await;
    west.shutdown(Duration::from_secs(2)).await;
    east.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_security_header_is_invalid() {
    let dir = temp_dir("header");
    let west = start_broker(WEST, &dir).await;
    add_entry(
        &west,
        entry("echo", "ns/demo/sa/echo", vec![uid_selector(my_uid())], &[]),
    )
    .await;
    let agent = Agent::start(&west, &dir).await;
    let channel = unix_channel(agent.server.socket().to_path_buf());

    let mut bare = SpiffeWorkloadApiClient::new(channel.clone());
    let status = bare
        .fetch_x509svid(wapi::pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    let status = bare
        .fetch_jwt_bundles(wapi::pb::JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // The header must say exactly "true".
    let mut wrong =
        SpiffeWorkloadApiClient::with_interceptor(channel.clone(), |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert(wapi::SECURITY_HEADER, "yes".parse().unwrap());
            Ok(r)
        });
    let status = wrong
        .fetch_x509_bundles(wapi::pb::X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // With the header, the same stubs are served.
    let mut good = raw_client(&agent.server);
    let mut stream = good
        .fetch_x509svid(wapi::pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    assert_eq!(response.svids.len(), 1);
    assert_eq!(
        response.svids[0].spiffe_id,
        "spiffe://west.example/ns/demo/sa/echo"
    );
    assert_eq!(
        response.svids[0].bundle,
        west.authority().bundle().to_der(),
        "bundle: the trust domain's DER certificates"
    );
    isthmus_core::X509Svid::from_der(
        &response.svids[0].x509_svid,
        &response.svids[0].x509_svid_key,
    )
    .unwrap();

    drop(stream);
    agent.stop().await;
    west.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_caller_is_denied_until_an_entry_names_it() {
    let dir = temp_dir("denied");
    let west = start_broker(WEST, &dir).await;
    // Registered: someone else.
    add_entry(
        &west,
        entry(
            "someone-else",
            "ns/demo/sa/else",
            vec![uid_selector(my_uid().wrapping_add(1))],
            &[],
        ),
    )
    .await;
    let agent = Agent::start(&west, &dir).await;
    let client = agent.client().await;
    let denied = |e: &WorkloadApiError| matches!(e, WorkloadApiError::NoIdentityIssued);
    let e = client.fetch_x509_svid().await.unwrap_err();
    assert!(denied(&e), "{e:?}");
    let e = client.fetch_x509_bundles().await.unwrap_err();
    assert!(denied(&e), "{e:?}");
    let e = client.fetch_jwt_bundles().await.unwrap_err();
    assert!(denied(&e), "{e:?}");
    let mut raw = raw_client(&agent.server);
    let status = raw
        .fetch_x509svid(wapi::pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // An entry for this process appears: served within the refresh interval.
    add_entry(
        &west,
        entry("me", "ns/demo/sa/me", vec![uid_selector(my_uid())], &[]),
    )
    .await;
    eventually(
        "the new entry to be served",
        Duration::from_secs(10),
        || {
            let client = &client;
            async move { client.fetch_x509_svid().await.is_ok() }
        },
    )
    .await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let context = stream.next().await.unwrap().unwrap();
    assert_eq!(
        context.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://west.example/ns/demo/sa/me"
    );
    // The entry is deleted: the open stream ends with PermissionDenied.
    admin(&west)
        .delete_entry(pb::DeleteEntryRequest { id: "me".into() })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream did not react to the deleted entry");
    match end {
        Some(Err(e)) => assert!(denied(&e), "{e:?}"),
        other => panic!("expected NoIdentityIssued, got {other:?}"),
    }
    let e = client.fetch_x509_svid().await.unwrap_err();
    assert!(denied(&e), "{e:?}");

    agent.stop().await;
    west.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_minted_validated_and_their_bundles_served() {
    let dir = temp_dir("jwt");
    let west = start_broker(WEST, &dir).await;
    let me = uid_selector(my_uid());
    add_entry(
        &west,
        entry("a-first", "ns/demo/sa/first", vec![me.clone()], &[]),
    )
    .await;
    add_entry(&west, entry("b-second", "ns/demo/sa/second", vec![me], &[])).await;
    add_entry(
        &west,
        entry(
            "c-other",
            "ns/demo/sa/other",
            vec![uid_selector(my_uid().wrapping_add(1))],
            &[],
        ),
    )
    .await;
    let agent = Agent::start(&west, &dir).await;
    let client = agent.client().await;
    let audience = "spiffe://west.example/ns/demo/sa/server";
    let first = spiffe::SpiffeId::new("spiffe://west.example/ns/demo/sa/first").unwrap();
    let second = spiffe::SpiffeId::new("spiffe://west.example/ns/demo/sa/second").unwrap();
    let other = spiffe::SpiffeId::new("spiffe://west.example/ns/demo/sa/other").unwrap();

    // The default identity, every identity, one asked for, one not this workload's.
    let svid = client.fetch_jwt_svid([audience], None).await.unwrap();
    assert_eq!(svid.spiffe_id(), &first);
    assert_eq!(svid.audience(), [audience]);
    let all = client.fetch_all_jwt_svids([audience], None).await.unwrap();
    let ids: Vec<_> = all.iter().map(|s| s.spiffe_id().clone()).collect();
    assert_eq!(ids, [first.clone(), second.clone()]);
    let asked = client
        .fetch_jwt_svid([audience, "extra"], Some(&second))
        .await
        .unwrap();
    assert_eq!(asked.spiffe_id(), &second);
    assert_eq!(asked.audience(), [audience, "extra"]);
    let e = client
        .fetch_jwt_svid([audience], Some(&other))
        .await
        .unwrap_err();
    assert!(matches!(e, WorkloadApiError::NoIdentityIssued), "{e:?}");
    // Within half its lifetime the same token is handed out again.
    let again = client.fetch_jwt_svid([audience], None).await.unwrap();
    assert_eq!(again.token(), svid.token());

    // Validation by the agent: the right audience passes, anything else is refused.
    let validated = client
        .validate_jwt_token(audience, svid.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), &first);
    let e = client
        .validate_jwt_token("spiffe://west.example/ns/demo/sa/elsewhere", svid.token())
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "{e:?}");
    // Another signature: the first character of the signature segment carries six bits.
    let token = svid.token();
    let at = token.rfind('.').unwrap() + 1;
    let flipped = if token[at..].starts_with('A') {
        "B"
    } else {
        "A"
    };
    let tampered = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
    let e = client
        .validate_jwt_token(audience, &tampered)
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "{e:?}");

    // The served JWT bundles validate the token independently of the agent.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &[audience]).unwrap();
    let source = spiffe::JwtSource::builder()
        .endpoint(agent.server.endpoint())
        .build()
        .await
        .unwrap();
    let from_source = source.fetch_jwt_svid([audience]).await.unwrap();
    spiffe::JwtSvid::parse_and_validate(from_source.token(), &source, &[audience]).unwrap();

    // Mandatory fields.
    let mut raw = raw_client(&agent.server);
    let status = raw
        .fetch_jwtsvid(wapi::pb::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "audience must be specified");
    for (audience, svid) in [("", svid.token()), (audience, "")] {
        let status = raw
            .validate_jwtsvid(wapi::pb::ValidateJwtsvidRequest {
                audience: audience.into(),
                svid: svid.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    let claims = raw
        .validate_jwtsvid(wapi::pb::ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: svid.token().into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap();
    assert_eq!(
        claims.fields["sub"].kind,
        Some(prost_types::value::Kind::StringValue(first.to_string()))
    );

    // A new signing key reaches the JWT bundle stream.
    let mut stream = client.stream_jwt_bundles().await.unwrap();
    let west_td = spiffe::TrustDomain::new(WEST).unwrap();
    let keys =
        |set: &spiffe::JwtBundleSet| set.get(&west_td).map_or(0, |b| b.jwt_authorities().count());
    let before = keys(&stream.next().await.unwrap().unwrap());
    assert!(before >= 1);
    west.authority()
        .rotate_now(time::OffsetDateTime::now_utc())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(15), async {
        while keys(&stream.next().await.unwrap().unwrap()) <= before {}
    })
    .await
    .expect("the rotated JWT key did not reach the FetchJWTBundles stream");

    drop(stream);
    source.shutdown().await;
    agent.stop().await;
    west.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}
