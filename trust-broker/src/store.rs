//! The broker's durable state in sled: the CA set (each root with its JWT-SVID key) and bundle
//! sequence, serial numbers, registration entries, join tokens, federation relationships and
//! fetched bundles.
//!
//! Every change the broker acknowledges is flushed to disk before the call returns, so a
//! SIGKILL at any moment leaves a store that opens with the same roots, and serials and
//! `spiffe_sequence` never go backwards. Serial numbers are reserved in blocks (one flush per
//! [`SERIAL_BLOCK`] issuances); after a crash the unused rest of a block is skipped, never
//! reused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use isthmus_core::{Bundle, TrustDomain};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::model::{FederatedTrustDomain, JoinToken, RegistrationEntry};

/// How many serial numbers one durable reservation covers.
pub const SERIAL_BLOCK: u64 = 1024;

const KEY_AUTHORITY: &[u8] = b"authority";
const KEY_SERIAL_RESERVED: &[u8] = b"serial_reserved";
const TREE_ENTRIES: &str = "entries";
const TREE_TOKENS: &str = "join_tokens";
const TREE_FEDERATION: &str = "federation";
const TREE_FEDERATED_BUNDLES: &str = "federated_bundles";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created or protected.
    #[error("data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// sled failed (I/O, corruption, or the directory is locked by another broker).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value does not decode.
    #[error("BUG: stored {what} does not decode: {message}")]
    Corrupt {
        /// Which value.
        what: String,
        /// The decoder's message.
        message: String,
    },
    /// A write would move `spiffe_sequence` backwards.
    #[error("BUG: bundle sequence would go backwards ({stored} -> {attempted})")]
    SequenceRegression {
        /// The stored sequence.
        stored: u64,
        /// The rejected one.
        attempted: u64,
    },
    /// The join token does not exist.
    #[error("unknown join token")]
    UnknownToken,
    /// The join token was already used.
    #[error("join token for node {node} was already used")]
    TokenUsed {
        /// The node it was bound to.
        node: String,
    },
    /// The join token expired.
    #[error("join token for node {node} expired at {expired_at}")]
    TokenExpired {
        /// The node it was bound to.
        node: String,
        /// When it expired.
        expired_at: OffsetDateTime,
    },
    /// An entry with this ID already exists.
    #[error("registration entry {0} already exists")]
    EntryExists(String),
}

/// The lifecycle state of one CA of the trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaStatus {
    /// Published in the bundle; not signing yet.
    Prepared,
    /// Signing new leaves.
    Active,
    /// No longer signing; kept in the bundle until its last leaf has expired.
    Retired,
}

/// The JWT-SVID signing key paired with one root: published, activated and retired with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJwtKey {
    /// JWK `kid` (the key's RFC 7638 thumbprint).
    pub kid: String,
    /// PKCS#8 DER private key (P-256); emptied when the root retires.
    #[serde(with = "b64")]
    pub key_pkcs8: Vec<u8>,
    /// The public key as an uncompressed P-256 point (`04 || x || y`), kept for the bundle
    /// after the private key is gone.
    #[serde(with = "b64")]
    pub public_point: Vec<u8>,
}

/// One CA as stored: certificate, key and lifecycle times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCa {
    /// Increasing identifier.
    pub id: u64,
    /// DER certificate.
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER private key.
    #[serde(with = "b64")]
    pub key_pkcs8: Vec<u8>,
    /// Lifecycle state.
    pub status: CaStatus,
    /// When it entered the published bundle.
    #[serde(with = "time::serde::rfc3339")]
    pub published_at: OffsetDateTime,
    /// When a prepared root may start signing (federated peers have had time to fetch it).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub activate_after: Option<OffsetDateTime>,
    /// When it started signing.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub activated_at: Option<OffsetDateTime>,
    /// When it stopped signing.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub retired_at: Option<OffsetDateTime>,
    /// When it may leave the bundle (its last possible leaf has expired).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub remove_after: Option<OffsetDateTime>,
    /// The JWT-SVID key of this root; absent in stores written before JWT-SVIDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_key: Option<StoredJwtKey>,
}

/// The CA set and the published sequence, stored as one value so they change atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityState {
    /// `spiffe_sequence` of the published bundle.
    pub sequence: u64,
    /// Every CA still in the bundle, oldest first.
    pub authorities: Vec<StoredCa>,
}

/// A fetched (or bootstrapped) foreign bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    /// The bundle.
    pub bundle: Bundle,
    /// When it was fetched.
    pub fetched_at: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
struct StoredBundleDoc {
    json: String,
    #[serde(with = "time::serde::rfc3339")]
    fetched_at: OffsetDateTime,
}

#[derive(Serialize, Deserialize)]
struct TokenDoc {
    token: JoinToken,
    #[serde(with = "time::serde::rfc3339::option", default)]
    used_at: Option<OffsetDateTime>,
}

/// Persistence of foreign bundles, the seam between the federation fetcher and sled.
pub trait FederatedBundleStore: Send + Sync {
    /// The stored bundle of `trust_domain`, if any.
    fn load_federated(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<StoredBundle>, StoreError>;
    /// Durably stores a bundle (flushed before returning).
    fn save_federated(&self, bundle: &Bundle, fetched_at: OffsetDateTime)
    -> Result<(), StoreError>;
    /// Forgets the bundle of `trust_domain` (federation terminated).
    fn remove_federated(&self, trust_domain: &TrustDomain) -> Result<(), StoreError>;
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

/// Serial allocation state: the next serial to hand out and the end of the durable reservation.
#[derive(Debug)]
struct Serials {
    next: u64,
    reserved: u64,
}

/// The broker's sled database.
#[derive(Debug)]
pub struct BrokerStore {
    db: sled::Db,
    path: PathBuf,
    serials: Mutex<Serials>,
}

fn protect(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StoreError::Directory {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).map_err(err)? {
            let path = entry.map_err(err)?.path();
            if path.is_dir() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(err)?;
                stack.push(path);
            } else {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

impl BrokerStore {
    /// Opens (or creates) the store in `dir`. The directory is made 0700 and its files 0600.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        let db = sled::Config::new().path(dir.join("db")).open()?;
        protect(dir)?;
        let reserved = match db.get(KEY_SERIAL_RESERVED)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    what: "serial reservation".into(),
                    message: format!("{} bytes", v.len()),
                })?)
            }
            None => 1,
        };
        Ok(Self {
            db,
            path: dir.to_path_buf(),
            // Everything below the stored reservation may have been handed out before a
            // crash: start above it.
            serials: Mutex::new(Serials {
                next: reserved,
                reserved,
            }),
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The stored CA set, `None` on first start.
    pub fn load_authority(&self) -> Result<Option<AuthorityState>, StoreError> {
        self.db
            .get(KEY_AUTHORITY)?
            .map(|v| decode("authority state", &v))
            .transpose()
    }

    /// Durably replaces the CA set. Refuses to move the sequence backwards.
    pub fn save_authority(&self, state: &AuthorityState) -> Result<(), StoreError> {
        if let Some(stored) = self.load_authority()?
            && stored.sequence > state.sequence
        {
            return Err(StoreError::SequenceRegression {
                stored: stored.sequence,
                attempted: state.sequence,
            });
        }
        self.db
            .insert(KEY_AUTHORITY, encode("authority state", state)?)?;
        self.flush()
    }

    /// The next serial number: strictly increasing across restarts and crashes.
    pub fn next_serial(&self) -> Result<u64, StoreError> {
        let mut serials = self
            .serials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if serials.next >= serials.reserved {
            let reserved = serials.next + SERIAL_BLOCK;
            self.db
                .insert(KEY_SERIAL_RESERVED, &reserved.to_be_bytes())?;
            self.flush()?;
            serials.reserved = reserved;
        }
        let serial = serials.next;
        serials.next += 1;
        Ok(serial)
    }

    /// Stores a new registration entry (fails if the ID exists).
    pub fn create_entry(&self, entry: &RegistrationEntry) -> Result<(), StoreError> {
        let tree = self.db.open_tree(TREE_ENTRIES)?;
        let value = encode("registration entry", entry)?;
        tree.compare_and_swap(entry.id.as_bytes(), None::<&[u8]>, Some(value))?
            .map_err(|_| StoreError::EntryExists(entry.id.clone()))?;
        self.flush()
    }

    /// Every registration entry, ordered by ID.
    pub fn entries(&self) -> Result<Vec<RegistrationEntry>, StoreError> {
        let tree = self.db.open_tree(TREE_ENTRIES)?;
        tree.iter()
            .map(|item| {
                let (_, v) = item?;
                decode("registration entry", &v)
            })
            .collect()
    }

    /// Deletes an entry; returns whether it existed.
    pub fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        let tree = self.db.open_tree(TREE_ENTRIES)?;
        let existed = tree.remove(id.as_bytes())?.is_some();
        self.flush()?;
        Ok(existed)
    }

    /// Stores a join token.
    pub fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError> {
        let tree = self.db.open_tree(TREE_TOKENS)?;
        let doc = TokenDoc {
            token: token.clone(),
            used_at: None,
        };
        tree.insert(token.token.as_bytes(), encode("join token", &doc)?)?;
        self.flush()
    }

    /// Consumes a join token once: returns it if it is known, unused and unexpired, and marks
    /// it used durably before returning.
    pub fn consume_join_token(
        &self,
        secret: &str,
        now: OffsetDateTime,
    ) -> Result<JoinToken, StoreError> {
        let tree = self.db.open_tree(TREE_TOKENS)?;
        let current = tree
            .get(secret.as_bytes())?
            .ok_or(StoreError::UnknownToken)?;
        let doc: TokenDoc = decode("join token", &current)?;
        if doc.used_at.is_some() {
            return Err(StoreError::TokenUsed {
                node: doc.token.node,
            });
        }
        if now >= doc.token.expires_at {
            return Err(StoreError::TokenExpired {
                node: doc.token.node,
                expired_at: doc.token.expires_at,
            });
        }
        let used = TokenDoc {
            token: doc.token.clone(),
            used_at: Some(now),
        };
        // Compare-and-swap so two concurrent attestations cannot both use one token.
        tree.compare_and_swap(
            secret.as_bytes(),
            Some(current),
            Some(encode("join token", &used)?),
        )?
        .map_err(|_| StoreError::TokenUsed {
            node: doc.token.node.clone(),
        })?;
        self.flush()?;
        Ok(doc.token)
    }

    /// Stores (or replaces) a federation relationship.
    pub fn put_federation(&self, federation: &FederatedTrustDomain) -> Result<(), StoreError> {
        let tree = self.db.open_tree(TREE_FEDERATION)?;
        tree.insert(
            federation.trust_domain.name().as_bytes(),
            encode("federation", federation)?,
        )?;
        self.flush()
    }

    /// Every federation relationship, ordered by trust domain.
    pub fn federations(&self) -> Result<Vec<FederatedTrustDomain>, StoreError> {
        let tree = self.db.open_tree(TREE_FEDERATION)?;
        tree.iter()
            .map(|item| {
                let (_, v) = item?;
                decode("federation", &v)
            })
            .collect()
    }

    /// Removes a federation relationship and its stored bundle; returns whether it existed.
    pub fn remove_federation(&self, trust_domain: &TrustDomain) -> Result<bool, StoreError> {
        let tree = self.db.open_tree(TREE_FEDERATION)?;
        let existed = tree.remove(trust_domain.name().as_bytes())?.is_some();
        self.db
            .open_tree(TREE_FEDERATED_BUNDLES)?
            .remove(trust_domain.name().as_bytes())?;
        self.flush()?;
        Ok(existed)
    }
}

impl FederatedBundleStore for BrokerStore {
    fn load_federated(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<StoredBundle>, StoreError> {
        let tree = self.db.open_tree(TREE_FEDERATED_BUNDLES)?;
        let Some(value) = tree.get(trust_domain.name().as_bytes())? else {
            return Ok(None);
        };
        let doc: StoredBundleDoc = decode("federated bundle", &value)?;
        let bundle =
            Bundle::parse_json(trust_domain.clone(), doc.json.as_bytes()).map_err(|e| {
                StoreError::Corrupt {
                    what: format!("federated bundle of {trust_domain}"),
                    message: e.to_string(),
                }
            })?;
        Ok(Some(StoredBundle {
            bundle,
            fetched_at: doc.fetched_at,
        }))
    }

    fn save_federated(
        &self,
        bundle: &Bundle,
        fetched_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let json = bundle.to_json().map_err(|e| StoreError::Corrupt {
            what: format!("federated bundle of {}", bundle.trust_domain()),
            message: e.to_string(),
        })?;
        let tree = self.db.open_tree(TREE_FEDERATED_BUNDLES)?;
        tree.insert(
            bundle.trust_domain().name().as_bytes(),
            encode("federated bundle", &StoredBundleDoc { json, fetched_at })?,
        )?;
        self.flush()
    }

    fn remove_federated(&self, trust_domain: &TrustDomain) -> Result<(), StoreError> {
        self.db
            .open_tree(TREE_FEDERATED_BUNDLES)?
            .remove(trust_domain.name().as_bytes())?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("isthmus-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn serials_never_repeat_across_reopen() {
        let dir = temp_dir("serials");
        let mut last = 0;
        for _ in 0..3 {
            let store = BrokerStore::open(&dir).unwrap();
            for _ in 0..10 {
                let s = store.next_serial().unwrap();
                assert!(s > last);
                last = s;
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn permissions_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("perms");
        let store = BrokerStore::open(&dir).unwrap();
        store.next_serial().unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sequence_never_goes_backwards() {
        let dir = temp_dir("seq");
        let store = BrokerStore::open(&dir).unwrap();
        store
            .save_authority(&AuthorityState {
                sequence: 5,
                authorities: vec![],
            })
            .unwrap();
        assert!(matches!(
            store.save_authority(&AuthorityState {
                sequence: 4,
                authorities: vec![]
            }),
            Err(StoreError::SequenceRegression {
                stored: 5,
                attempted: 4
            })
        ));
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn join_tokens_are_single_use() {
        let dir = temp_dir("tokens");
        let store = BrokerStore::open(&dir).unwrap();
        let now = OffsetDateTime::now_utc();
        let token = JoinToken {
            token: "secret".into(),
            node: "node-a".into(),
            expires_at: now + time::Duration::minutes(5),
        };
        store.create_join_token(&token).unwrap();
        assert!(matches!(
            store.consume_join_token("nope", now),
            Err(StoreError::UnknownToken)
        ));
        assert_eq!(store.consume_join_token("secret", now).unwrap(), token);
        assert!(matches!(
            store.consume_join_token("secret", now),
            Err(StoreError::TokenUsed { .. })
        ));
        let late = JoinToken {
            token: "late".into(),
            ..token
        };
        store.create_join_token(&late).unwrap();
        assert!(matches!(
            store.consume_join_token("late", now + time::Duration::minutes(6)),
            Err(StoreError::TokenExpired { .. })
        ));
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
