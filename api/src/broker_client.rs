//! The client side of the trust broker's issuance API, for node agents and standalone
//! gateways: attest the node with a one-time join token, obtain SVIDs for the registration
//! entries assigned to it (X.509-SVIDs kept fresh at half-life and at once when the broker's
//! signing root changes; JWT-SVIDs minted on request), and follow the broker's bundle stream
//! into a live [`TrustStore`], JWT authorities included.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::jwt::{self, JwtError, JwtSvid};
use isthmus_core::lifecycle::DrainWatch;
use isthmus_core::tls::{AllowIds, MtlsSettings};
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore, X509Svid};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::broker::issuance_client::IssuanceClient;
use crate::broker::{self as pb};
use crate::transport::{ALPN_H2, tls_channel};

/// Why talking to the broker failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerClientError {
    /// TLS or key material could not be prepared.
    #[error("broker client set-up: {0}")]
    Setup(String),
    /// The broker refused or failed the call.
    #[error("broker call {call} failed: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// The broker answered something unusable.
    #[error("broker answer to {call} is invalid: {reason}")]
    Invalid {
        /// The RPC.
        call: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// How long [`NodeIdentity::jwt_svid`] waits for the bundle stream to bring a JWT key it does
/// not hold yet (a token signed right after `rotate-ca --now`).
pub const JWT_KEY_CATCH_UP: Duration = Duration::from_secs(3);

fn call(call: &'static str) -> impl Fn(tonic::Status) -> BrokerClientError {
    move |status| BrokerClientError::Call {
        call,
        status: Box::new(status),
    }
}

/// Where the broker is and how to recognise it.
#[derive(Debug, Clone)]
pub struct BrokerEndpoint {
    /// The broker's issuance API address.
    pub address: SocketAddr,
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle that authenticates the broker at first contact (out of band, like a SPIRE
    /// agent's trust bundle); the bundle stream keeps it current afterwards.
    pub bootstrap_bundle: Bundle,
}

impl BrokerEndpoint {
    /// The broker API's SPIFFE ID, `spiffe://<td>/isthmus/broker`.
    pub fn broker_id(&self) -> Result<SpiffeId, BrokerClientError> {
        self.trust_domain
            .workload_id(&["isthmus", "broker"])
            .map_err(|e| BrokerClientError::Setup(e.to_string()))
    }
}

/// A new P-256 key and a PKCS#10 request for it.
fn key_and_csr() -> Result<(rcgen::KeyPair, Vec<u8>), BrokerClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| BrokerClientError::Setup(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| BrokerClientError::Setup(e.to_string()))?;
    Ok((key, csr.der().to_vec()))
}

fn svid_from(
    call: &'static str,
    svid: Option<pb::Svid>,
    key: &rcgen::KeyPair,
) -> Result<X509Svid, BrokerClientError> {
    let svid = svid.ok_or_else(|| BrokerClientError::Invalid {
        call,
        reason: "no SVID".into(),
    })?;
    X509Svid::from_der(&svid.cert_chain, &key.serialize_der()).map_err(|e| {
        BrokerClientError::Invalid {
            call,
            reason: e.to_string(),
        }
    })
}

/// Applies a bundle set to the trust store: every bundle present is set, bundles no longer
/// sent (terminated federations) are removed.
fn apply_bundles(trust: &TrustStore, set: &pb::BundleSet) -> Result<(), BrokerClientError> {
    let mut present = BTreeSet::new();
    for b in &set.bundles {
        let td = TrustDomain::new(&b.trust_domain).map_err(|e| BrokerClientError::Invalid {
            call: "WatchBundles",
            reason: e.to_string(),
        })?;
        let bundle = Bundle::parse_json(td.clone(), &b.spiffe_bundle).map_err(|e| {
            BrokerClientError::Invalid {
                call: "WatchBundles",
                reason: format!("bundle of {td}: {e}"),
            }
        })?;
        trust.set(bundle);
        present.insert(td);
    }
    for td in trust
        .snapshot()
        .trust_domains()
        .cloned()
        .collect::<Vec<_>>()
    {
        if !present.contains(&td) {
            trust.remove(&td);
        }
    }
    Ok(())
}

/// A node's identity with the broker: its node SVID, the bundles it trusts, and an
/// authenticated issuance client.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    endpoint: BrokerEndpoint,
    node_svid: SvidSource,
    trust: TrustStore,
    client: IssuanceClient<Channel>,
    generation: watch::Receiver<u64>,
    generation_tx: Arc<watch::Sender<u64>>,
}

impl NodeIdentity {
    /// Attests the node with a join token and returns its identity.
    pub async fn attest(
        endpoint: BrokerEndpoint,
        join_token: &str,
    ) -> Result<Self, BrokerClientError> {
        let broker_id = endpoint.broker_id()?;
        let bootstrap = TrustStore::from_bundles([endpoint.bootstrap_bundle.clone()]);
        let anonymous = isthmus_core::tls::anonymous_client_config(
            bootstrap,
            Arc::new(AllowIds(vec![broker_id.clone()])),
            vec![ALPN_H2.to_vec()],
        )
        .map_err(|e| BrokerClientError::Setup(e.to_string()))?;
        let mut anon = IssuanceClient::new(tls_channel(endpoint.address, Arc::new(anonymous)));
        let (key, csr) = key_and_csr()?;
        let response = anon
            .attest_node(pb::AttestNodeRequest {
                attestor: "join_token".into(),
                evidence: join_token.as_bytes().to_vec(),
                csr,
            })
            .await
            .map_err(call("AttestNode"))?
            .into_inner();
        let svid = svid_from("AttestNode", response.svid, &key)?;
        let trust = TrustStore::from_bundles([endpoint.bootstrap_bundle.clone()]);
        if let Some(set) = &response.bundles {
            apply_bundles(&trust, set)?;
        }
        let node_svid =
            SvidSource::new(svid).map_err(|e| BrokerClientError::Setup(e.to_string()))?;
        let tls = isthmus_core::tls::client_config(&MtlsSettings {
            svid: node_svid.clone(),
            trust: trust.clone(),
            authorizer: Arc::new(AllowIds(vec![broker_id])),
            alpn: vec![ALPN_H2.to_vec()],
            observer: None,
        })
        .map_err(|e| BrokerClientError::Setup(e.to_string()))?;
        let client = IssuanceClient::new(tls_channel(endpoint.address, Arc::new(tls)));
        let (tx, rx) = watch::channel(0);
        tracing::info!(spiffe_id = %node_svid.current().svid.id(), "node attested");
        Ok(Self {
            endpoint,
            node_svid,
            trust,
            client,
            generation: rx,
            generation_tx: Arc::new(tx),
        })
    }

    /// The node SVID (renewed in place by [`Self::maintain`]).
    pub fn node_svid(&self) -> &SvidSource {
        &self.node_svid
    }

    /// Every bundle the broker distributes, kept current by [`Self::maintain`].
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// The broker this node talks to.
    pub fn endpoint(&self) -> &BrokerEndpoint {
        &self.endpoint
    }

    /// The registration entries assigned to this node.
    pub async fn entries(&self) -> Result<Vec<pb::Entry>, BrokerClientError> {
        Ok(self
            .client
            .clone()
            .list_assigned_entries(pb::ListAssignedEntriesRequest {})
            .await
            .map_err(call("ListAssignedEntries"))?
            .into_inner()
            .entries)
    }

    /// A fresh SVID (new key) for one of this node's entries.
    pub async fn workload_svid(&self, entry_id: &str) -> Result<X509Svid, BrokerClientError> {
        let (key, csr) = key_and_csr()?;
        let response = self
            .client
            .clone()
            .sign_workload_svids(pb::SignWorkloadSvidsRequest {
                requests: vec![pb::SvidRequest {
                    entry_id: entry_id.to_owned(),
                    csr,
                }],
            })
            .await
            .map_err(call("SignWorkloadSvids"))?
            .into_inner();
        svid_from("SignWorkloadSvids", response.svids.into_iter().next(), &key)
    }

    /// A JWT-SVID for one of this node's entries, with `audience` as its `aud` (at least one
    /// value; the broker refuses an empty list with `InvalidArgument`). The token is validated
    /// against this node's trust store before it is returned, for the first audience, and must
    /// carry every requested audience. A token signed by a key the trust store does not hold yet
    /// (the broker rotated with `--now`) is validated again when the bundle stream delivers,
    /// for at most [`JWT_KEY_CATCH_UP`]; run [`Self::maintain`] so that it does.
    pub async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<JwtSvid, BrokerClientError> {
        const CALL: &str = "MintJwtSvid";
        let invalid = |reason: String| BrokerClientError::Invalid { call: CALL, reason };
        let response = self
            .client
            .clone()
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: entry_id.to_owned(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(call(CALL))?
            .into_inner();
        let minted = response.svid.ok_or_else(|| invalid("no JWT-SVID".into()))?;
        let first = audience
            .first()
            .ok_or_else(|| invalid("minted a JWT-SVID without an audience".into()))?;
        let mut changes = self.trust.subscribe();
        let deadline = tokio::time::Instant::now() + JWT_KEY_CATCH_UP;
        let svid = loop {
            let result = jwt::validate(&minted.token, first, &self.trust.snapshot());
            if matches!(result, Err(JwtError::UnknownKeyId { .. })) {
                let delivered = tokio::time::timeout_at(deadline, changes.changed()).await;
                if matches!(delivered, Ok(Ok(()))) {
                    continue;
                }
            }
            break result.map_err(|e| invalid(e.to_string()))?;
        };
        if svid.spiffe_id.as_str() != minted.spiffe_id
            || svid.expiry.unix_timestamp() != minted.expires_at
        {
            return Err(invalid(format!(
                "token is for {} until {}, the answer says {} until {}",
                svid.spiffe_id,
                svid.expiry.unix_timestamp(),
                minted.spiffe_id,
                minted.expires_at
            )));
        }
        if let Some(missing) = audience.iter().find(|a| !svid.audience.contains(a)) {
            return Err(invalid(format!("token lacks the audience {missing:?}")));
        }
        Ok(svid)
    }

    /// An SVID source for an entry, renewed at half-life and whenever the broker's signing
    /// root changes, until `drain` signals.
    pub async fn workload_source(
        &self,
        entry_id: &str,
        drain: DrainWatch,
    ) -> Result<SvidSource, BrokerClientError> {
        let source = SvidSource::new(self.workload_svid(entry_id).await?)
            .map_err(|e| BrokerClientError::Setup(e.to_string()))?;
        let (me, entry, renewing) = (self.clone(), entry_id.to_owned(), source.clone());
        tokio::spawn(async move {
            me.renew_loop(renewing, drain, move |me| {
                let entry = entry.clone();
                Box::pin(async move { me.workload_svid(&entry).await })
            })
            .await;
        });
        Ok(source)
    }

    async fn renew_node(&self) -> Result<X509Svid, BrokerClientError> {
        let (key, csr) = key_and_csr()?;
        let response = self
            .client
            .clone()
            .renew_node_svid(pb::RenewNodeSvidRequest { csr })
            .await
            .map_err(call("RenewNodeSvid"))?
            .into_inner();
        svid_from("RenewNodeSvid", response.svid, &key)
    }

    /// Renews `source` with `issue` at half-life and on every signing-root change.
    async fn renew_loop<F>(&self, source: SvidSource, drain: DrainWatch, issue: F)
    where
        F: Fn(
                Self,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<X509Svid, BrokerClientError>> + Send>,
            > + Send
            + Sync,
    {
        let mut generation = self.generation.clone();
        generation.borrow_and_update();
        let mut backoff = Duration::from_millis(500);
        loop {
            let due = source.current().svid.refresh_at();
            let wait =
                Duration::try_from(due - time::OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
            tokio::select! {
                () = drain.signaled() => return,
                () = tokio::time::sleep(wait) => {}
                changed = generation.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            match issue(self.clone()).await {
                Ok(svid) => {
                    let id = svid.id().clone();
                    if source.rotate(svid).is_ok() {
                        tracing::info!(spiffe_id = %id, "SVID renewed");
                    }
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SVID renewal failed; retrying");
                    tokio::select! {
                        () = drain.signaled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Keeps the node SVID renewed and the trust store following the broker's bundle stream,
    /// until `drain` signals. Run it once per node.
    pub async fn maintain(&self, drain: DrainWatch) {
        let me = self.clone();
        let node_source = self.node_svid.clone();
        let node_drain = drain.clone();
        tokio::spawn(async move {
            me.renew_loop(node_source, node_drain, |me| {
                Box::pin(async move { me.renew_node().await })
            })
            .await;
        });
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut client = self.client.clone();
            let stream = tokio::select! {
                () = drain.signaled() => return,
                s = client.watch_bundles(pb::WatchBundlesRequest {}) => s,
            };
            match stream {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        let message = tokio::select! {
                            () = drain.signaled() => return,
                            m = stream.message() => m,
                        };
                        match message {
                            Ok(Some(update)) => {
                                backoff = Duration::from_millis(200);
                                if let Some(set) = &update.bundles
                                    && let Err(e) = apply_bundles(&self.trust, set)
                                {
                                    tracing::warn!(error = %e, "bad bundle set from the broker; keeping the current bundles");
                                    continue;
                                }
                                // The first message sets the baseline; later changes of the
                                // signing root make every SVID renew at once.
                                self.generation_tx.send_if_modified(|g| {
                                    let changed = *g != 0 && *g != update.signing_root_generation;
                                    *g = update.signing_root_generation;
                                    changed
                                });
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "bundle stream failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch bundles; retrying"),
            }
            tokio::select! {
                () = drain.signaled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
