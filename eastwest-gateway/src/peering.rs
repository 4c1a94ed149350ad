//! Catalog exchange between gateways (`isthmus-peer/1`): each gateway streams its exports to
//! the peers that subscribe, as a full snapshot and then one delta per change, resumable by
//! version after a reconnect, with heartbeats. Imports are persisted per peer, so a restarted
//! gateway serves them at once and then resyncs; a peer that stays away longer than the
//! staleness budget has its endpoints withdrawn.
//!
//! It runs on the gateway's own QUIC endpoint, told apart by ALPN: the connection is already
//! mutually authenticated by gateway SVIDs through the same verifiers, QUIC keeps the control
//! stream and its heartbeats independent of tunnel traffic, and no second port, TLS stack or
//! HTTP/2 layer is needed. Frames are length-prefixed JSON (documented in docs/protocol.md).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use isthmus_core::catalog::{ServiceExport, ServiceKey};
use isthmus_core::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// ALPN of the peering protocol, version 1.
pub const PEER_ALPN: &[u8] = b"isthmus-peer/1";
/// Largest frame accepted.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Changes kept for resumption; an older resume point gets a snapshot.
pub const HISTORY: usize = 4096;
/// The path of gateway SVIDs: `spiffe://<td>/ns/isthmus-system/sa/eastwest-gateway`.
pub const GATEWAY_PATH: [&str; 4] = ["ns", "isthmus-system", "sa", "eastwest-gateway"];

/// Why a peering exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PeeringError {
    /// The stream or connection failed.
    #[error("peering I/O: {0}")]
    Io(String),
    /// A frame is too large or does not decode.
    #[error("malformed peering frame: {0}")]
    Malformed(String),
    /// The peer broke the protocol (unexpected message, version gap, wrong epoch).
    #[error("peering protocol violation: {0}")]
    Protocol(String),
    /// The import store failed.
    #[error("import store: {0}")]
    Store(#[from] sled::Error),
}

/// One change of a cluster's exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Added or changed.
    Upsert {
        /// The export.
        export: ServiceExport,
    },
    /// No longer exported.
    Remove {
        /// The service.
        key: ServiceKey,
    },
}

/// Where an importer left off: the exporter's epoch (changes on restart) and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The exporter's epoch.
    pub epoch: u64,
    /// The last version applied.
    pub version: u64,
}

/// Messages of the peering stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMessage {
    /// Importer → exporter, first frame: who asks and where it left off.
    Subscribe {
        /// The importer's cluster name.
        cluster: String,
        /// Resume point, if any.
        resume: Option<Resume>,
    },
    /// Exporter → importer: the whole export set.
    Snapshot {
        /// The exporter's cluster name.
        cluster: String,
        /// The exporter's epoch.
        epoch: u64,
        /// The version the snapshot is at.
        version: u64,
        /// Every export.
        exports: Vec<ServiceExport>,
    },
    /// Exporter → importer: one change, versions consecutive.
    Delta {
        /// The exporter's epoch.
        epoch: u64,
        /// The version after this change.
        version: u64,
        /// The change.
        change: Change,
    },
    /// Exporter → importer: nothing changed, still alive.
    Heartbeat {
        /// The exporter's epoch.
        epoch: u64,
        /// The current version.
        version: u64,
    },
}

/// Writes one frame: `len:u32be | JSON`.
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    message: &PeerMessage,
) -> Result<(), PeeringError> {
    let body = serde_json::to_vec(message).map_err(|e| PeeringError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(PeeringError::Malformed(format!(
            "frame of {} bytes",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    writer
        .write_all(&frame)
        .await
        .map_err(|e| PeeringError::Io(e.to_string()))
}

/// Reads one frame (bounded by [`MAX_FRAME`]).
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<PeerMessage, PeeringError> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .await
        .map_err(|e| PeeringError::Io(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(PeeringError::Malformed(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| PeeringError::Io(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| PeeringError::Malformed(e.to_string()))
}

#[derive(Debug)]
struct LogInner {
    epoch: u64,
    version: u64,
    exports: BTreeMap<ServiceKey, ServiceExport>,
    history: VecDeque<(u64, Change)>,
}

/// This cluster's exports with a version per change, for peers to follow.
#[derive(Debug, Clone)]
pub struct ExportLog {
    inner: Arc<Mutex<LogInner>>,
    changed: Arc<watch::Sender<u64>>,
}

impl ExportLog {
    /// An empty log; `epoch` must differ across restarts (e.g. start time in nanoseconds).
    pub fn new(epoch: u64) -> Self {
        let (tx, _rx) = watch::channel(0);
        Self {
            inner: Arc::new(Mutex::new(LogInner {
                epoch,
                version: 0,
                exports: BTreeMap::new(),
                history: VecDeque::new(),
            })),
            changed: Arc::new(tx),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the export set (a config reload, a Kubernetes resync); records one change
    /// per service that differs. Returns the number of changes.
    pub fn replace_all(&self, exports: Vec<ServiceExport>) -> usize {
        let mut inner = self.lock();
        let next: BTreeMap<ServiceKey, ServiceExport> =
            exports.into_iter().map(|e| (e.key.clone(), e)).collect();
        let mut changes = Vec::new();
        for (key, export) in &next {
            if inner.exports.get(key) != Some(export) {
                changes.push(Change::Upsert {
                    export: export.clone(),
                });
            }
        }
        for key in inner.exports.keys() {
            if !next.contains_key(key) {
                changes.push(Change::Remove { key: key.clone() });
            }
        }
        let count = changes.len();
        for change in changes {
            inner.version += 1;
            let version = inner.version;
            inner.history.push_back((version, change));
            if inner.history.len() > HISTORY {
                inner.history.pop_front();
            }
        }
        inner.exports = next;
        let version = inner.version;
        drop(inner);
        if count > 0 {
            self.changed.send_replace(version);
        }
        count
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> (u64, u64, Vec<ServiceExport>) {
        let inner = self.lock();
        (
            inner.epoch,
            inner.version,
            inner.exports.values().cloned().collect(),
        )
    }

    /// The changes after `resume`, if it can be served from history.
    pub fn since(&self, resume: Resume) -> Option<Vec<(u64, Change)>> {
        let inner = self.lock();
        if resume.epoch != inner.epoch || resume.version > inner.version {
            return None;
        }
        if resume.version == inner.version {
            return Some(Vec::new());
        }
        let first = inner.history.front()?.0;
        if resume.version + 1 < first {
            return None;
        }
        Some(
            inner
                .history
                .iter()
                .filter(|(v, _)| *v > resume.version)
                .cloned()
                .collect(),
        )
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Serves one subscribing peer on an accepted stream until it goes away.
pub async fn serve_subscriber(
    cluster: &str,
    log: &ExportLog,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    heartbeat: Duration,
) -> Result<(), PeeringError> {
    let (importer, resume) = match read_frame(&mut recv).await? {
        PeerMessage::Subscribe { cluster, resume } => (cluster, resume),
        other => {
            return Err(PeeringError::Protocol(format!(
                "expected subscribe, got {other:?}"
            )));
        }
    };
    let mut changes = log.subscribe();
    let mut sent = match resume.and_then(|r| log.since(r).map(|c| (r, c))) {
        Some((resume, pending)) => {
            tracing::info!(peer_cluster = %importer, from = resume.version, deltas = pending.len(), "peer resumed");
            let mut version = resume.version;
            for (v, change) in pending {
                write_frame(
                    &mut send,
                    &PeerMessage::Delta {
                        epoch: resume.epoch,
                        version: v,
                        change,
                    },
                )
                .await?;
                version = v;
            }
            version
        }
        None => {
            let (epoch, version, exports) = log.snapshot();
            tracing::info!(peer_cluster = %importer, version, services = exports.len(), "sending snapshot");
            write_frame(
                &mut send,
                &PeerMessage::Snapshot {
                    cluster: cluster.to_owned(),
                    epoch,
                    version,
                    exports,
                },
            )
            .await?;
            version
        }
    };
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let epoch = log.snapshot().0;
                match log.since(Resume { epoch, version: sent }) {
                    Some(pending) => {
                        for (v, change) in pending {
                            write_frame(&mut send, &PeerMessage::Delta { epoch, version: v, change }).await?;
                            sent = v;
                        }
                    }
                    None => {
                        let (epoch, version, exports) = log.snapshot();
                        write_frame(&mut send, &PeerMessage::Snapshot { cluster: cluster.to_owned(), epoch, version, exports }).await?;
                        sent = version;
                    }
                }
            }
            () = tokio::time::sleep(heartbeat) => {
                let epoch = log.snapshot().0;
                write_frame(&mut send, &PeerMessage::Heartbeat { epoch, version: sent }).await?;
            }
        }
    }
}

/// What this gateway holds of one peer's exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedPeer {
    /// The peer's cluster name (from its snapshot).
    pub cluster: String,
    /// The peer's epoch and the version applied.
    pub resume: Option<Resume>,
    /// Its exports.
    #[serde(with = "exports_as_list")]
    pub exports: BTreeMap<ServiceKey, ServiceExport>,
    /// When we last heard from it (snapshot, delta or heartbeat).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Whether the peering stream is up.
    #[serde(skip)]
    pub connected: bool,
}

impl ImportedPeer {
    /// Whether its endpoints may still be used: connected, or heard from within `budget`.
    pub fn is_fresh(&self, now: OffsetDateTime, budget: Duration) -> bool {
        self.connected || self.last_seen.is_some_and(|seen| now - seen <= budget)
    }

    /// Applies one message; returns an error on a version gap or epoch change mid-stream.
    pub fn apply(&mut self, message: PeerMessage, now: OffsetDateTime) -> Result<(), PeeringError> {
        match message {
            PeerMessage::Snapshot {
                cluster,
                epoch,
                version,
                exports,
            } => {
                self.cluster = cluster;
                self.exports = exports.into_iter().map(|e| (e.key.clone(), e)).collect();
                self.resume = Some(Resume { epoch, version });
            }
            PeerMessage::Delta {
                epoch,
                version,
                change,
            } => {
                let expected = self.resume.map(|r| (r.epoch, r.version + 1));
                if expected != Some((epoch, version)) {
                    return Err(PeeringError::Protocol(format!(
                        "delta {epoch}/{version} does not follow {:?}",
                        self.resume
                    )));
                }
                match change {
                    Change::Upsert { export } => {
                        self.exports.insert(export.key.clone(), export);
                    }
                    Change::Remove { key } => {
                        self.exports.remove(&key);
                    }
                }
                self.resume = Some(Resume { epoch, version });
            }
            PeerMessage::Heartbeat { epoch, .. } => {
                if self.resume.map(|r| r.epoch) != Some(epoch) {
                    return Err(PeeringError::Protocol(
                        "heartbeat from another epoch".into(),
                    ));
                }
            }
            PeerMessage::Subscribe { .. } => {
                return Err(PeeringError::Protocol("unexpected subscribe".into()));
            }
        }
        self.last_seen = Some(now);
        Ok(())
    }
}

/// JSON maps need string keys: exports are stored as a list (each carries its key).
mod exports_as_list {
    use std::collections::BTreeMap;

    use isthmus_core::catalog::{ServiceExport, ServiceKey};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ServiceKey, ServiceExport>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        map.values().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ServiceKey, ServiceExport>, D::Error> {
        let list = Vec::<ServiceExport>::deserialize(d)?;
        Ok(list.into_iter().map(|e| (e.key.clone(), e)).collect())
    }
}

/// Persisted imports, one sled key per peer trust domain; every write is flushed.
#[derive(Debug, Clone)]
pub struct ImportStore {
    db: sled::Db,
}

impl ImportStore {
    /// Opens the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, PeeringError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PeeringError::Io(format!("{}: {e}", dir.display())))?;
        Ok(Self {
            db: sled::open(dir.join("imports"))?,
        })
    }

    /// The stored imports of `peer`.
    pub fn load(&self, peer: &TrustDomain) -> Result<Option<ImportedPeer>, PeeringError> {
        match self.db.get(peer.name().as_bytes())? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| PeeringError::Malformed(format!("stored imports of {peer}: {e}"))),
        }
    }

    /// The persisted ClusterSetIP assignments.
    pub fn load_vips(&self) -> Result<Vec<(ServiceKey, std::net::Ipv4Addr)>, PeeringError> {
        match self.db.open_tree("vips")?.get(b"assignments")? {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PeeringError::Malformed(format!("stored VIPs: {e}"))),
        }
    }

    /// Stores the ClusterSetIP assignments durably.
    pub fn save_vips(&self, vips: &[(ServiceKey, std::net::Ipv4Addr)]) -> Result<(), PeeringError> {
        let bytes = serde_json::to_vec(vips).map_err(|e| PeeringError::Malformed(e.to_string()))?;
        self.db.open_tree("vips")?.insert(b"assignments", bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// When each local export was first seen (its creation time for conflict resolution).
    pub fn load_created(&self) -> Result<Vec<(ServiceKey, OffsetDateTime)>, PeeringError> {
        match self.db.open_tree("created")?.get(b"exports")? {
            None => Ok(Vec::new()),
            Some(bytes) => {
                let list: Vec<(ServiceKey, i128)> = serde_json::from_slice(&bytes)
                    .map_err(|e| PeeringError::Malformed(format!("stored creation times: {e}")))?;
                Ok(list
                    .into_iter()
                    .filter_map(|(k, nanos)| {
                        OffsetDateTime::from_unix_timestamp_nanos(nanos)
                            .ok()
                            .map(|t| (k, t))
                    })
                    .collect())
            }
        }
    }

    /// Stores the creation times of local exports durably.
    pub fn save_created(
        &self,
        created: &[(ServiceKey, OffsetDateTime)],
    ) -> Result<(), PeeringError> {
        let list: Vec<(&ServiceKey, i128)> = created
            .iter()
            .map(|(k, t)| (k, t.unix_timestamp_nanos()))
            .collect();
        let bytes =
            serde_json::to_vec(&list).map_err(|e| PeeringError::Malformed(e.to_string()))?;
        self.db.open_tree("created")?.insert(b"exports", bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// Stores the imports of `peer` durably.
    pub fn save(&self, peer: &TrustDomain, imported: &ImportedPeer) -> Result<(), PeeringError> {
        let bytes =
            serde_json::to_vec(imported).map_err(|e| PeeringError::Malformed(e.to_string()))?;
        self.db.insert(peer.name().as_bytes(), bytes)?;
        self.db.flush()?;
        Ok(())
    }
}

/// First delay before reconnecting to a peer; doubles up to 10 s while connections fail.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// A configured peer gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's trust domain (must be federated).
    pub trust_domain: TrustDomain,
    /// The peer gateway's address.
    pub address: SocketAddr,
}

impl PeerConfig {
    /// The SPIFFE ID the peer gateway must present.
    pub fn gateway_id(&self) -> Result<SpiffeId, isthmus_core::id::IdError> {
        self.trust_domain.workload_id(&GATEWAY_PATH)
    }
}

/// Follows one peer: subscribes, applies snapshots and deltas, persists every change, and
/// reconnects with back-off, resuming where it left off. `state` always holds the latest
/// view (including `connected`).
#[expect(
    clippy::too_many_arguments,
    reason = "one follower task owns each of these"
)]
pub async fn follow_peer(
    own_cluster: String,
    peer: PeerConfig,
    client: quinn::Endpoint,
    config: quinn::ClientConfig,
    store: Option<ImportStore>,
    state: watch::Sender<ImportedPeer>,
    heartbeat: Duration,
    drain: isthmus_core::lifecycle::DrainWatch,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let result = tokio::select! {
            () = drain.signaled() => return,
            r = follow_once(&own_cluster, &peer, &client, &config, store.as_ref(), &state, heartbeat) => r,
        };
        // A stream that delivered anything was a success: start the back-off over.
        if state.borrow().connected {
            backoff = INITIAL_BACKOFF;
        }
        state.send_modify(|s| s.connected = false);
        if let Err(e) = result {
            tracing::warn!(peer = %peer.trust_domain, error = %e, "peering lost; will resume");
        }
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn follow_once(
    own_cluster: &str,
    peer: &PeerConfig,
    client: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    store: Option<&ImportStore>,
    state: &watch::Sender<ImportedPeer>,
    heartbeat: Duration,
) -> Result<(), PeeringError> {
    let io = |e: &dyn std::fmt::Display| PeeringError::Io(e.to_string());
    let conn = client
        .connect_with(config.clone(), peer.address, "isthmus-gateway.invalid")
        .map_err(|e| io(&e))?
        .await
        .map_err(|e| io(&e))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(&e))?;
    let resume = state.borrow().resume;
    write_frame(
        &mut send,
        &PeerMessage::Subscribe {
            cluster: own_cluster.to_owned(),
            resume,
        },
    )
    .await?;
    loop {
        // The exporter sends at least a heartbeat per interval; three missed ones mean it is
        // gone even if the QUIC connection has not timed out yet.
        let message = tokio::time::timeout(heartbeat * 3, read_frame(&mut recv))
            .await
            .map_err(|_| PeeringError::Io("no heartbeat from the peer".into()))??;
        let mut next = state.borrow().clone();
        next.apply(message, OffsetDateTime::now_utc())?;
        next.connected = true;
        if let Some(store) = store {
            store.save(&peer.trust_domain, &next)?;
        }
        state.send_replace(next);
    }
}

#[cfg(test)]
mod tests {
    use isthmus_core::catalog::{Affinity, Endpoint, PortSpec, Protocol, ServiceType};

    use super::*;

    fn export(name: &str, ip: &str) -> ServiceExport {
        ServiceExport {
            key: ServiceKey::new("demo", name),
            cluster: "east".into(),
            created: OffsetDateTime::UNIX_EPOCH,
            ports: vec![PortSpec {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            service_type: ServiceType::ClusterSetIP,
            affinity: Affinity::Local,
            shared: true,
            endpoints: vec![Endpoint {
                address: ip.parse().unwrap(),
                ready: true,
                zone: None,
                hostname: None,
            }],
        }
    }

    #[test]
    fn log_records_one_change_per_service_and_resumes() {
        let log = ExportLog::new(7);
        assert_eq!(
            log.replace_all(vec![export("a", "10.0.0.1"), export("b", "10.0.0.2")]),
            2
        );
        assert_eq!(
            log.replace_all(vec![export("a", "10.0.0.1"), export("b", "10.0.0.2")]),
            0
        );
        assert_eq!(log.replace_all(vec![export("a", "10.0.0.9")]), 2);
        let (epoch, version, exports) = log.snapshot();
        assert_eq!((epoch, version, exports.len()), (7, 4, 1));
        let pending = log
            .since(Resume {
                epoch: 7,
                version: 2,
            })
            .unwrap();
        assert_eq!(pending.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [3, 4]);
        assert!(
            log.since(Resume {
                epoch: 6,
                version: 2
            })
            .is_none(),
            "another epoch needs a snapshot"
        );
        assert!(
            log.since(Resume {
                epoch: 7,
                version: 9
            })
            .is_none()
        );
        assert_eq!(
            log.since(Resume {
                epoch: 7,
                version: 4
            })
            .unwrap(),
            []
        );
    }

    #[test]
    fn importer_applies_in_order_and_rejects_gaps() {
        let mut peer = ImportedPeer {
            cluster: String::new(),
            resume: None,
            exports: BTreeMap::new(),
            last_seen: None,
            connected: false,
        };
        let now = OffsetDateTime::now_utc();
        peer.apply(
            PeerMessage::Snapshot {
                cluster: "east".into(),
                epoch: 1,
                version: 5,
                exports: vec![export("a", "10.0.0.1")],
            },
            now,
        )
        .unwrap();
        peer.apply(
            PeerMessage::Delta {
                epoch: 1,
                version: 6,
                change: Change::Remove {
                    key: ServiceKey::new("demo", "a"),
                },
            },
            now,
        )
        .unwrap();
        assert!(peer.exports.is_empty());
        let gap = peer.apply(
            PeerMessage::Delta {
                epoch: 1,
                version: 8,
                change: Change::Upsert {
                    export: export("b", "10.0.0.2"),
                },
            },
            now,
        );
        assert!(matches!(gap, Err(PeeringError::Protocol(_))));
        assert!(peer.is_fresh(now + time::Duration::seconds(29), Duration::from_secs(30)));
        assert!(!peer.is_fresh(now + time::Duration::seconds(31), Duration::from_secs(30)));
    }

    #[tokio::test]
    async fn frames_round_trip_and_are_bounded() {
        let message = PeerMessage::Heartbeat {
            epoch: 1,
            version: 2,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &message).await.unwrap();
        assert_eq!(read_frame(&mut &buf[..]).await.unwrap(), message);
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]).await,
            Err(PeeringError::Malformed(_))
        ));
        let garbage = [0, 0, 0, 2, b'{', b'x'];
        assert!(matches!(
            read_frame(&mut &garbage[..]).await,
            Err(PeeringError::Malformed(_))
        ));
    }
}
