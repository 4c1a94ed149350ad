//! The identities this node hands out: for every registration entry assigned to the node, its
//! current X.509-SVID (renewed by [`NodeIdentity::workload_source`]), together with the bundles
//! the broker distributes, published as one [`IdentitySnapshot`] through a `watch` channel.
//!
//! [`WorkloadIdentities::start`] polls the entry list (new and deleted entries appear within
//! one interval), follows every SVID rotation and every bundle change, and publishes a new
//! snapshot only when something a workload could see changed. The Workload API resends its
//! streams from it; the tunnels take their SVID sources from it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_api::broker as pb;
use isthmus_api::broker_client::{BrokerClientError, NodeIdentity};
use isthmus_core::jwt::JwtSvid;
use isthmus_core::lifecycle::{DrainTrigger, DrainWatch};
use isthmus_core::source::CurrentSvid;
use isthmus_core::svid::SvidError;
use isthmus_core::{Bundle, BundleSet, SpiffeId, SvidSource, TrustDomain, X509Svid};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::WatchStream;

use crate::attest::{Selector, entry_matches};

/// Why an identity could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A registration entry from the broker is unusable.
    #[error("registration entry {entry:?} is invalid: {reason}")]
    BadEntry {
        /// The entry's ID.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused or failed.
    #[error(transparent)]
    Broker(#[from] BrokerClientError),
    /// The broker did not answer in time.
    #[error("the trust broker did not answer {call} within {timeout:?}")]
    Timeout {
        /// What was asked.
        call: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// This set of identities was built from fixed parts and has no broker to ask.
    #[error("no trust broker behind these identities (built from fixed parts)")]
    NoBroker,
    /// An SVID is not a valid X509-SVID.
    #[error(transparent)]
    Svid(#[from] SvidError),
}

/// How the identities are kept current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    /// How often the entry list is fetched from the broker.
    pub entry_refresh: Duration,
    /// Limit on each broker call (entry list, SVID signing).
    pub call_timeout: Duration,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            entry_refresh: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// A registration entry as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredEntry {
    /// The entry's ID at the broker.
    pub id: String,
    /// The SPIFFE ID its workloads get.
    pub spiffe_id: SpiffeId,
    /// All of these must be among a caller's selectors.
    pub selectors: Vec<Selector>,
    /// Foreign trust domains whose bundles its workloads receive.
    pub federates_with: Vec<TrustDomain>,
    /// Leaf lifetime asked of the broker (0: its default).
    pub ttl_seconds: u64,
}

impl TryFrom<&pb::Entry> for RegisteredEntry {
    type Error = IdentityError;

    fn try_from(entry: &pb::Entry) -> Result<Self, IdentityError> {
        let bad = |reason: String| IdentityError::BadEntry {
            entry: entry.id.clone(),
            reason,
        };
        let spiffe_id = SpiffeId::parse(&entry.spiffe_id)
            .map_err(|e| bad(format!("SPIFFE ID {:?}: {e}", entry.spiffe_id)))?;
        let federates_with = entry
            .federates_with
            .iter()
            .map(|td| TrustDomain::new(td).map_err(|e| bad(format!("federates_with {td:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let mut selectors: Vec<Selector> = entry.selectors.iter().map(Selector::from).collect();
        selectors.sort();
        selectors.dedup();
        Ok(Self {
            id: entry.id.clone(),
            spiffe_id,
            selectors,
            federates_with,
            ttl_seconds: entry.ttl_seconds,
        })
    }
}

/// One identity a workload is entitled to: the entry, its SVID and the bundles that go with it.
#[derive(Debug, Clone)]
pub struct WorkloadSvid {
    /// The registration entry.
    pub entry: Arc<RegisteredEntry>,
    /// The SVID as of the snapshot.
    pub svid: Arc<CurrentSvid>,
    /// The live source of this entry's SVID (for TLS that must follow rotations).
    pub source: SvidSource,
    /// The bundle of the SVID's trust domain, when held.
    pub bundle: Option<Arc<Bundle>>,
    /// The bundles of the federated trust domains in the entry's `federates_with` that are
    /// held, ordered by trust domain.
    pub federated: Vec<Arc<Bundle>>,
}

/// One entry's identity inside a snapshot.
#[derive(Debug, Clone)]
struct Held {
    entry: Arc<RegisteredEntry>,
    svid: Arc<CurrentSvid>,
    source: SvidSource,
}

/// Everything the node can hand out at one moment.
#[derive(Debug, Clone)]
pub struct IdentitySnapshot {
    own_trust_domain: TrustDomain,
    held: Vec<Held>,
    bundles: Arc<BundleSet>,
    synced: bool,
}

impl IdentitySnapshot {
    /// A snapshot before anything is known: no identity, not synced.
    pub fn empty(own_trust_domain: TrustDomain) -> Self {
        Self {
            own_trust_domain,
            held: Vec::new(),
            bundles: Arc::new(BundleSet::default()),
            synced: false,
        }
    }

    /// A synced snapshot from fixed parts (tests, and identities that do not come from a
    /// broker). Entries are ordered by ID.
    pub fn from_parts(
        own_trust_domain: TrustDomain,
        identities: Vec<(RegisteredEntry, X509Svid)>,
        bundles: BundleSet,
    ) -> Result<Self, IdentityError> {
        let mut held = identities
            .into_iter()
            .map(|(entry, svid)| {
                let source = SvidSource::new(svid)?;
                Ok(Held {
                    entry: Arc::new(entry),
                    svid: source.current(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, IdentityError>>()?;
        held.sort_by(|a, b| a.entry.id.cmp(&b.entry.id));
        Ok(Self {
            own_trust_domain,
            held,
            bundles: Arc::new(bundles),
            synced: true,
        })
    }

    /// This node's trust domain.
    pub fn own_trust_domain(&self) -> &TrustDomain {
        &self.own_trust_domain
    }

    /// Every bundle held (own and federated).
    pub fn bundles(&self) -> &BundleSet {
        &self.bundles
    }

    /// The bundle of this node's trust domain.
    pub fn own_bundle(&self) -> Option<&Arc<Bundle>> {
        self.bundles.get(&self.own_trust_domain)
    }

    /// Whether the entry list has been fetched at least once; before that, an empty match
    /// means "not known yet" rather than "not entitled".
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The entries that currently have an SVID, ordered by entry ID.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<RegisteredEntry>> {
        self.held.iter().map(|h| &h.entry)
    }

    /// The identities of a workload with these selectors, ordered by entry ID, so the first
    /// (the Workload API's default identity) stays the same across updates.
    pub fn matching(&self, selectors: &[Selector]) -> Vec<WorkloadSvid> {
        self.held
            .iter()
            .filter(|h| entry_matches(&h.entry.selectors, selectors))
            .map(|h| WorkloadSvid {
                entry: h.entry.clone(),
                svid: h.svid.clone(),
                source: h.source.clone(),
                bundle: self.bundles.get(&h.svid.svid.id().trust_domain()).cloned(),
                federated: self.federated_bundles(&h.entry.federates_with),
            })
            .collect()
    }

    /// The bundles held for these trust domains, other than this node's own, ordered by trust
    /// domain.
    pub fn federated_bundles<'a>(
        &self,
        trust_domains: impl IntoIterator<Item = &'a TrustDomain>,
    ) -> Vec<Arc<Bundle>> {
        trust_domains
            .into_iter()
            .filter(|td| **td != self.own_trust_domain)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|td| self.bundles.get(td).cloned())
            .collect()
    }

    /// Whether a workload could tell the two snapshots apart.
    fn same_as(&self, other: &Self) -> bool {
        self.synced == other.synced
            && self.own_trust_domain == other.own_trust_domain
            && self.bundles == other.bundles
            && self.held.len() == other.held.len()
            && self.held.iter().zip(&other.held).all(|(a, b)| {
                a.entry == b.entry
                    && a.svid.svid.chain() == b.svid.svid.chain()
                    && a.svid.svid.key().secret_pkcs8_der() == b.svid.svid.key().secret_pkcs8_der()
            })
    }
}

/// The live identities of this node.
#[derive(Debug, Clone)]
pub struct WorkloadIdentities {
    snapshot: watch::Receiver<Arc<IdentitySnapshot>>,
    node: Option<Arc<NodeIdentity>>,
    settings: IdentitySettings,
    jwt_cache: Arc<Mutex<JwtCache>>,
}

/// Minted JWT-SVIDs by entry and audience set, reused until half their lifetime has passed (as
/// SPIRE's agent does), so a workload asking per request does not make a broker call each time.
#[derive(Debug, Default)]
struct JwtCache {
    tokens: HashMap<(String, Vec<String>), JwtSvid>,
}

/// Most tokens kept; past it, expired and half-lived ones are dropped, then everything.
const JWT_CACHE_LIMIT: usize = 1024;

impl JwtCache {
    fn key(entry_id: &str, audience: &[String]) -> (String, Vec<String>) {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        (entry_id.to_owned(), audience)
    }

    /// Whether a token is still worth handing out: less than half its lifetime gone.
    fn fresh(token: &JwtSvid, now: OffsetDateTime) -> bool {
        let issued = token.issued_at.unwrap_or(now);
        now < issued + (token.expiry - issued) / 2
    }

    fn get(&self, entry: &RegisteredEntry, audience: &[String]) -> Option<JwtSvid> {
        self.tokens
            .get(&Self::key(&entry.id, audience))
            .filter(|t| t.spiffe_id == entry.spiffe_id && Self::fresh(t, OffsetDateTime::now_utc()))
            .cloned()
    }

    fn put(&mut self, entry_id: &str, audience: &[String], token: JwtSvid) {
        if self.tokens.len() >= JWT_CACHE_LIMIT {
            let now = OffsetDateTime::now_utc();
            self.tokens.retain(|_, t| Self::fresh(t, now));
            if self.tokens.len() >= JWT_CACHE_LIMIT {
                self.tokens.clear();
            }
        }
        self.tokens.insert(Self::key(entry_id, audience), token);
    }
}

impl WorkloadIdentities {
    /// Starts following `node`: runs [`NodeIdentity::maintain`] (node SVID renewal and the
    /// bundle stream; do not run it elsewhere), polls the entry list, and keeps one renewed
    /// SVID per entry, until `drain` signals. Call inside a Tokio runtime.
    pub fn start(node: Arc<NodeIdentity>, settings: IdentitySettings, drain: DrainWatch) -> Self {
        let own = node.endpoint().trust_domain.clone();
        let (tx, rx) = watch::channel(Arc::new(IdentitySnapshot::empty(own)));
        let maintainer = node.clone();
        let maintain_drain = drain.clone();
        tokio::spawn(async move { maintainer.maintain(maintain_drain).await });
        let follower = Follower {
            node: node.clone(),
            settings: settings.clone(),
            tracked: BTreeMap::new(),
            rotations: StreamMap::new(),
            synced: false,
            tx,
        };
        tokio::spawn(follower.run(drain));
        Self {
            snapshot: rx,
            node: Some(node),
            settings,
            jwt_cache: Arc::default(),
        }
    }

    /// Identities from fixed parts, without a broker: publish updates through the returned
    /// sender. JWT-SVIDs cannot be minted.
    pub fn fixed(snapshot: IdentitySnapshot) -> (Self, watch::Sender<Arc<IdentitySnapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let identities = Self {
            snapshot: rx,
            node: None,
            settings: IdentitySettings::default(),
            jwt_cache: Arc::default(),
        };
        (identities, tx)
    }

    /// A receiver of every new snapshot (the current one is marked seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<IdentitySnapshot>> {
        let mut rx = self.snapshot.clone();
        rx.borrow_and_update();
        rx
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<IdentitySnapshot> {
        self.snapshot.borrow().clone()
    }

    /// Waits until the entry list has been fetched once, at most `limit`; returns whether it
    /// has.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut rx = self.snapshot.clone();
        tokio::time::timeout(limit, rx.wait_for(|s| s.is_synced()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The node identity behind these identities (`None` when built from fixed parts).
    pub fn node(&self) -> Option<&Arc<NodeIdentity>> {
        self.node.as_ref()
    }

    /// How these identities are kept current.
    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// A JWT-SVID for `entry` with `audience` (at least one value) as its `aud`: minted by the
    /// broker ([`NodeIdentity::jwt_svid`], which validates it against the node's bundles), or
    /// the same token again while less than half its lifetime has passed.
    pub async fn jwt_svid(
        &self,
        entry: &RegisteredEntry,
        audience: &[String],
    ) -> Result<JwtSvid, IdentityError> {
        if let Some(token) = self.cache().get(entry, audience) {
            return Ok(token);
        }
        let node = self.node.as_ref().ok_or(IdentityError::NoBroker)?;
        let timeout = self.settings.call_timeout;
        let token = tokio::time::timeout(timeout, node.jwt_svid(&entry.id, audience))
            .await
            .map_err(|_| IdentityError::Timeout {
                call: "MintJwtSvid",
                timeout,
            })??;
        if token.spiffe_id != entry.spiffe_id {
            return Err(IdentityError::BadEntry {
                entry: entry.id.clone(),
                reason: format!(
                    "the broker minted a JWT-SVID for {} instead of {}",
                    token.spiffe_id, entry.spiffe_id
                ),
            });
        }
        self.cache().put(&entry.id, audience, token.clone());
        Ok(token)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        // A panic while holding the lock leaves a cache that is still consistent (every
        // operation is a single map update), so a poisoned lock is used as is.
        self.jwt_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One followed entry; dropping it stops its SVID renewal.
struct Tracked {
    entry: Arc<RegisteredEntry>,
    source: SvidSource,
    _renewal: DrainTrigger,
}

/// The task behind [`WorkloadIdentities::start`].
struct Follower {
    node: Arc<NodeIdentity>,
    settings: IdentitySettings,
    tracked: BTreeMap<String, Tracked>,
    rotations: StreamMap<String, WatchStream<Arc<CurrentSvid>>>,
    synced: bool,
    tx: watch::Sender<Arc<IdentitySnapshot>>,
}

impl Follower {
    async fn run(mut self, drain: DrainWatch) {
        let mut trust = self.node.trust().subscribe();
        let mut tick = tokio::time::interval(self.settings.entry_refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                _ = tick.tick() => self.refresh().await,
                Some((entry, _)) = self.rotations.next() => {
                    tracing::debug!(entry = %entry, "workload SVID rotated");
                }
                changed = trust.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            self.publish();
        }
        // Dropping the tracked entries stops their renewals.
        self.tracked.clear();
    }

    /// Fetches the entry list and follows its changes; on failure keeps what it has.
    async fn refresh(&mut self) {
        let timeout = self.settings.call_timeout;
        let entries = match tokio::time::timeout(timeout, self.node.entries()).await {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list this node's entries; keeping the current ones");
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?timeout, "listing this node's entries timed out; keeping the current ones");
                return;
            }
        };
        let mut present = BTreeSet::new();
        for entry in &entries {
            present.insert(entry.id.clone());
            match RegisteredEntry::try_from(entry) {
                Ok(entry) => self.follow(entry).await,
                Err(e) => tracing::warn!(error = %e, "skipping an entry"),
            }
        }
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            tracing::info!(entry = %id, "entry removed; its SVID is no longer served");
            self.tracked.remove(&id);
            self.rotations.remove(&id);
        }
        self.synced = true;
    }

    /// Starts (or keeps, or restarts) following one entry.
    async fn follow(&mut self, entry: RegisteredEntry) {
        if let Some(t) = self.tracked.get_mut(&entry.id)
            && t.entry.spiffe_id == entry.spiffe_id
            && t.entry.ttl_seconds == entry.ttl_seconds
        {
            if *t.entry != entry {
                t.entry = Arc::new(entry);
            }
            return;
        }
        let (renewal, watch) = DrainTrigger::new();
        let timeout = self.settings.call_timeout;
        let source = match tokio::time::timeout(
            timeout,
            self.node.workload_source(&entry.id, watch),
        )
        .await
        {
            Ok(Ok(source)) => source,
            Ok(Err(e)) => {
                tracing::warn!(entry = %entry.id, error = %e, "cannot obtain an SVID; retrying at the next refresh");
                return;
            }
            Err(_) => {
                tracing::warn!(entry = %entry.id, timeout = ?timeout, "obtaining an SVID timed out; retrying at the next refresh");
                return;
            }
        };
        tracing::info!(entry = %entry.id, spiffe_id = %entry.spiffe_id, "serving entry");
        self.rotations.insert(
            entry.id.clone(),
            WatchStream::from_changes(source.subscribe()),
        );
        self.tracked.insert(
            entry.id.clone(),
            Tracked {
                entry: Arc::new(entry),
                source,
                _renewal: renewal,
            },
        );
    }

    /// Publishes the current state unless a workload could not tell it from the last one.
    fn publish(&self) {
        let next = IdentitySnapshot {
            own_trust_domain: self.node.endpoint().trust_domain.clone(),
            held: self
                .tracked
                .values()
                .map(|t| Held {
                    entry: t.entry.clone(),
                    svid: t.source.current(),
                    source: t.source.clone(),
                })
                .collect(),
            bundles: self.node.trust().snapshot(),
            synced: self.synced,
        };
        self.tx.send_if_modified(|current| {
            if current.same_as(&next) {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use isthmus_core::CertificateAuthority;
    use isthmus_core::ca::{DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn registered(id: &str, selectors: &[&str], federates_with: &[&str]) -> RegisteredEntry {
        RegisteredEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://west.example/{id}")).unwrap(),
            selectors: selectors.iter().map(|s| Selector::unix(*s)).collect(),
            federates_with: federates_with.iter().map(|t| td(t)).collect(),
            ttl_seconds: 0,
        }
    }

    fn snapshot(entries: Vec<RegisteredEntry>, bundles: Vec<Bundle>) -> IdentitySnapshot {
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate(td("west.example"), now, DEFAULT_CA_TTL).unwrap();
        let held = entries
            .into_iter()
            .map(|e| {
                let svid = ca.issue_svid(&e.spiffe_id, DEFAULT_LEAF_TTL, now).unwrap();
                (e, svid)
            })
            .collect();
        IdentitySnapshot::from_parts(td("west.example"), held, BundleSet::new(bundles)).unwrap()
    }

    #[test]
    fn matching_orders_by_entry_and_hands_out_only_federated_bundles_asked_for() {
        let snap = snapshot(
            vec![
                registered("b", &["uid:1", "gid:2"], &[]),
                registered(
                    "a",
                    &["uid:1"],
                    &["east.example", "west.example", "gone.example"],
                ),
                registered("c", &["uid:3"], &["east.example"]),
            ],
            vec![
                Bundle::new(td("west.example")),
                Bundle::new(td("east.example")),
                Bundle::new(td("south.example")),
            ],
        );
        let ids = |selectors: &[&str]| -> Vec<String> {
            let selectors: Vec<Selector> = selectors.iter().map(|s| Selector::unix(*s)).collect();
            snap.matching(&selectors)
                .iter()
                .map(|w| w.entry.id.clone())
                .collect()
        };
        assert_eq!(ids(&["uid:1"]), ["a"]);
        assert_eq!(ids(&["gid:2", "uid:1"]), ["a", "b"]);
        assert!(ids(&["gid:2"]).is_empty());
        assert!(ids(&[]).is_empty());
        let a = &snap.matching(&[Selector::unix("uid:1")])[0];
        assert_eq!(
            a.bundle.as_ref().map(|b| b.trust_domain().name()),
            Some("west.example")
        );
        let federated: Vec<&str> = a
            .federated
            .iter()
            .map(|b| b.trust_domain().name())
            .collect();
        assert_eq!(
            federated,
            ["east.example"],
            "own and unknown domains are left out"
        );
    }

    #[test]
    fn snapshots_differ_only_in_what_a_workload_sees() {
        let a = snapshot(vec![registered("a", &["uid:1"], &[])], vec![]);
        let same = IdentitySnapshot {
            held: a.held.clone(),
            ..a.clone()
        };
        assert!(a.same_as(&same));
        let mut more_bundles = a.clone();
        more_bundles.bundles = Arc::new(BundleSet::new([Bundle::new(td("east.example"))]));
        assert!(!a.same_as(&more_bundles));
        let renewed = snapshot(vec![registered("a", &["uid:1"], &[])], vec![]);
        assert!(!a.same_as(&renewed), "a new SVID is a change");
        let mut unsynced = a.clone();
        unsynced.synced = false;
        assert!(!a.same_as(&unsynced));
    }
}
