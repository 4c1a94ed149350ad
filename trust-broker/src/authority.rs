//! The trust domain's CA set and its rotation.
//!
//! Rotation follows one rule: a new root is published in the bundle (sequence + 1, flushed)
//! before anything is signed with it, and the old root stays in the bundle until the last leaf
//! it can have signed has expired. The CA set and the sequence are stored as one value, so a
//! crash between the two steps leaves a published-but-not-yet-active root that the next step
//! (or the next start) activates; nothing is ever signed by an unpublished root.
//!
//! Every root is paired with a JWT-SVID signing key (ES256) that shares its lifecycle: published
//! in the bundle as a `jwt-svid` JWK together with the root, signing JWT-SVIDs once the root is
//! active, its private key forgotten when the root retires, and its public key removed from the
//! bundle with the root. A JWT-SVID lives at most `max_leaf_ttl` and never past its root's
//! NotAfter, so it has expired by the time its key leaves the bundle, exactly like a leaf.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use isthmus_core::bundle::JwtAuthority;
use isthmus_core::ca::{CaError, CertificateAuthority};
use isthmus_core::jwt::{JwtError, JwtSigner, JwtSvid};
use isthmus_core::x509::JwkPublicKey;
use isthmus_core::{Bundle, SpiffeId, TrustDomain, X509Svid};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::store::{AuthorityState, BrokerStore, CaStatus, StoreError, StoredCa, StoredJwtKey};

/// Why the authority failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// The durable store failed; nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificate generation or signing failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The stored CA set is inconsistent.
    #[error("BUG: stored CA set is inconsistent: {0}")]
    Inconsistent(String),
    /// JWT-SVID key generation or minting failed.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// A JWT-SVID was requested for an ID of another trust domain.
    #[error("cannot mint a JWT-SVID for {id}: not an ID of trust domain {trust_domain}")]
    ForeignJwtSubject {
        /// The requested ID.
        id: SpiffeId,
        /// This authority's trust domain.
        trust_domain: TrustDomain,
    },
}

/// Lifetimes and schedule of the CA.
#[derive(Debug, Clone)]
pub struct AuthorityOptions {
    /// Lifetime of each root.
    pub ca_ttl: Duration,
    /// Default leaf lifetime.
    pub leaf_ttl: Duration,
    /// Longest leaf lifetime a caller may request.
    pub max_leaf_ttl: Duration,
    /// `spiffe_refresh_hint` published in the bundle.
    pub refresh_hint: Duration,
    /// How long a root requested by [`Authority::rotate`] stays published before it signs, so
    /// federated peers fetch it first (SPIFFE Federation §4.1: 3–5 refresh hints).
    pub activation_delay: Duration,
}

impl Default for AuthorityOptions {
    fn default() -> Self {
        Self {
            ca_ttl: isthmus_core::ca::DEFAULT_CA_TTL,
            leaf_ttl: isthmus_core::ca::DEFAULT_LEAF_TTL,
            max_leaf_ttl: isthmus_core::ca::DEFAULT_LEAF_TTL,
            refresh_hint: Duration::from_secs(300),
            activation_delay: Duration::from_secs(900),
        }
    }
}

/// One root as `status` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RootStatus {
    /// Lifecycle state.
    pub status: CaStatus,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When a retired root leaves the bundle.
    #[serde(with = "time::serde::rfc3339::option")]
    pub remove_after: Option<OffsetDateTime>,
    /// `kid` of the JWT-SVID key paired with this root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_key_id: Option<String>,
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Bundle sequence after the new root was published.
    pub sequence: u64,
    /// When the new root starts signing.
    pub activates_at: OffsetDateTime,
    /// End of the retired root's stay in the bundle, once known (after activation).
    pub old_root_remove_after: Option<OffsetDateTime>,
}

struct Inner {
    state: AuthorityState,
    active: Arc<CertificateAuthority>,
    /// The active root's JWT-SVID key.
    jwt: Arc<JwtSigner>,
}

/// The CA of one trust domain, backed by the durable store.
pub struct Authority {
    trust_domain: TrustDomain,
    store: Arc<BrokerStore>,
    options: AuthorityOptions,
    inner: Mutex<Inner>,
    bundle: watch::Sender<Arc<Bundle>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn to_stored(
    id: u64,
    ca: &CertificateAuthority,
    jwt: &JwtSigner,
    status: CaStatus,
    now: OffsetDateTime,
) -> Result<StoredCa, AuthorityError> {
    Ok(StoredCa {
        id,
        cert_der: ca.certificate().to_vec(),
        key_pkcs8: ca.private_key().secret_pkcs8_der().to_vec(),
        status,
        published_at: now,
        activate_after: None,
        activated_at: (status == CaStatus::Active).then_some(now),
        retired_at: None,
        remove_after: None,
        jwt_key: Some(to_stored_jwt(jwt)?),
    })
}

fn to_stored_jwt(jwt: &JwtSigner) -> Result<StoredJwtKey, AuthorityError> {
    let JwkPublicKey::Ec { crv: "P-256", x, y } = jwt.public_authority().public_key else {
        return Err(AuthorityError::Inconsistent(
            "JWT signing key is not P-256".into(),
        ));
    };
    let mut public_point = vec![0x04];
    public_point.extend_from_slice(&x);
    public_point.extend_from_slice(&y);
    Ok(StoredJwtKey {
        kid: jwt.kid().to_owned(),
        key_pkcs8: jwt.to_pkcs8(),
        public_point,
    })
}

fn load_ca(td: &TrustDomain, stored: &StoredCa) -> Result<CertificateAuthority, AuthorityError> {
    Ok(CertificateAuthority::from_parts(
        td.clone(),
        CertificateDer::from(stored.cert_der.clone()),
        PrivatePkcs8KeyDer::from(stored.key_pkcs8.clone()),
    )?)
}

/// The signing half of a root's JWT key (the root must not be retired).
fn load_jwt(stored: &StoredCa) -> Result<JwtSigner, AuthorityError> {
    let key = stored.jwt_key.as_ref().ok_or_else(|| {
        AuthorityError::Inconsistent(format!("root {} has no JWT key", stored.id))
    })?;
    let signer = JwtSigner::from_pkcs8(&key.key_pkcs8)?;
    if signer.kid() != key.kid {
        return Err(AuthorityError::Inconsistent(format!(
            "JWT key of root {} has kid {}, stored as {}",
            stored.id,
            signer.kid(),
            key.kid
        )));
    }
    Ok(signer)
}

/// The public half of a root's JWT key, as the bundle publishes it.
fn jwt_authority(key: &StoredJwtKey) -> Result<JwtAuthority, AuthorityError> {
    let point = &key.public_point;
    if point.len() != 65 || point[0] != 0x04 {
        return Err(AuthorityError::Inconsistent(format!(
            "JWT key {} has a {}-byte public key, not an uncompressed P-256 point",
            key.kid,
            point.len()
        )));
    }
    Ok(JwtAuthority::new(
        key.kid.clone(),
        JwkPublicKey::Ec {
            crv: "P-256",
            x: point[1..33].to_vec(),
            y: point[33..].to_vec(),
        },
    ))
}

/// Stores written before JWT-SVIDs have roots without a JWT key: give one to every root that
/// signs or will sign. Returns whether anything was added (the bundle changed).
fn add_missing_jwt_keys(state: &mut AuthorityState) -> Result<bool, AuthorityError> {
    let mut added = false;
    for ca in &mut state.authorities {
        if ca.status != CaStatus::Retired && ca.jwt_key.is_none() {
            ca.jwt_key = Some(to_stored_jwt(&JwtSigner::generate()?)?);
            added = true;
        }
    }
    if added {
        state.sequence += 1;
    }
    Ok(added)
}

impl Authority {
    /// Opens the CA of `trust_domain`: loads the stored roots, or creates the first one and
    /// stores it (flushed) before returning.
    pub fn open(
        trust_domain: TrustDomain,
        store: Arc<BrokerStore>,
        options: AuthorityOptions,
        now: OffsetDateTime,
    ) -> Result<Self, AuthorityError> {
        let state = match store.load_authority()? {
            Some(mut state) => {
                if add_missing_jwt_keys(&mut state)? {
                    Self::build_bundle(&trust_domain, &state, &options)?;
                    store.save_authority(&state)?;
                    tracing::info!(trust_domain = %trust_domain, sequence = state.sequence, "added JWT-SVID keys to the stored roots");
                }
                state
            }
            None => {
                let ca = CertificateAuthority::generate(trust_domain.clone(), now, options.ca_ttl)?;
                let jwt = JwtSigner::generate()?;
                let state = AuthorityState {
                    sequence: 1,
                    authorities: vec![to_stored(1, &ca, &jwt, CaStatus::Active, now)?],
                };
                store.save_authority(&state)?;
                tracing::info!(trust_domain = %trust_domain, jwt_kid = jwt.kid(), "created root CA");
                state
            }
        };
        let active_stored = state
            .authorities
            .iter()
            .find(|ca| ca.status == CaStatus::Active)
            .ok_or_else(|| AuthorityError::Inconsistent("no active root".into()))?;
        let active = Arc::new(load_ca(&trust_domain, active_stored)?);
        let jwt = Arc::new(load_jwt(active_stored)?);
        let bundle = Self::build_bundle(&trust_domain, &state, &options)?;
        let (tx, _rx) = watch::channel(Arc::new(bundle));
        let authority = Self {
            trust_domain,
            store,
            options,
            inner: Mutex::new(Inner { state, active, jwt }),
            bundle: tx,
        };
        // Finish whatever a crash interrupted (a prepared root, an expired retired root).
        authority.tick(now)?;
        Ok(authority)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn build_bundle(
        trust_domain: &TrustDomain,
        state: &AuthorityState,
        options: &AuthorityOptions,
    ) -> Result<Bundle, AuthorityError> {
        let mut bundle = Bundle::with_x509_authorities(
            trust_domain.clone(),
            state
                .authorities
                .iter()
                .map(|ca| CertificateDer::from(ca.cert_der.clone()))
                .collect(),
        );
        for key in state
            .authorities
            .iter()
            .filter_map(|ca| ca.jwt_key.as_ref())
        {
            bundle.add_jwt_authority(jwt_authority(key)?);
        }
        bundle.set_sequence(Some(state.sequence));
        bundle.set_refresh_hint(Some(options.refresh_hint));
        Ok(bundle)
    }

    /// Stores `next` (flushed), then publishes its bundle.
    fn commit(&self, inner: &mut Inner, next: AuthorityState) -> Result<(), AuthorityError> {
        // Built first: a state whose bundle cannot be built is never stored.
        let bundle = Self::build_bundle(&self.trust_domain, &next, &self.options)?;
        self.store.save_authority(&next)?;
        inner.state = next;
        self.bundle.send_replace(Arc::new(bundle));
        Ok(())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The options in force.
    pub fn options(&self) -> &AuthorityOptions {
        &self.options
    }

    /// The published bundle (every root still in use, sequence and refresh hint).
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    /// Wakes on every bundle change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    /// The roots and their lifecycle.
    pub fn roots(&self) -> Vec<RootStatus> {
        let inner = self.lock();
        inner
            .state
            .authorities
            .iter()
            .filter_map(|ca| {
                let facts = isthmus_core::x509::facts(&ca.cert_der, 0).ok()?;
                Some(RootStatus {
                    status: ca.status,
                    not_before: facts.not_before,
                    not_after: facts.not_after,
                    remove_after: ca.remove_after,
                    jwt_key_id: ca.jwt_key.as_ref().map(|k| k.kid.clone()),
                })
            })
            .collect()
    }

    fn leaf_ttl(&self, requested: Option<Duration>) -> Duration {
        requested
            .unwrap_or(self.options.leaf_ttl)
            .min(self.options.max_leaf_ttl)
    }

    /// Issues an SVID (new key pair) for `id` with a durable, monotonic serial.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<X509Svid, AuthorityError> {
        let active = self.lock().active.clone();
        let serial = self.store.next_serial()?;
        Ok(active.issue_svid_numbered(id, self.leaf_ttl(ttl), now, serial)?)
    }

    /// Signs the public key of a CSR for `id`; returns the chain (the leaf: roots are in the
    /// bundle).
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
        let active = self.lock().active.clone();
        let serial = self.store.next_serial()?;
        let csr = rcgen::CertificateSigningRequestParams::from_der(
            &rustls_pki_types::CertificateSigningRequestDer::from(csr_der),
        )
        .map_err(CaError::BadCsr)?;
        let leaf =
            active.sign_leaf_numbered(id, &csr.public_key, self.leaf_ttl(ttl), now, serial)?;
        Ok(vec![leaf])
    }

    /// Mints a JWT-SVID for `id` (an ID of this trust domain, with a path) with the active
    /// root's JWT key, valid for `ttl` capped at `max_leaf_ttl` and at the root's NotAfter (so
    /// it has expired by the time its key leaves the bundle).
    pub fn mint_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<JwtSvid, AuthorityError> {
        if id.trust_domain_name() != self.trust_domain.name() {
            return Err(AuthorityError::ForeignJwtSubject {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let (signer, ca_not_after) = {
            let inner = self.lock();
            (inner.jwt.clone(), inner.active.not_after())
        };
        let remaining = Duration::try_from(ca_not_after - now).unwrap_or(Duration::ZERO);
        let ttl = ttl.min(self.options.max_leaf_ttl).min(remaining);
        if ttl < Duration::from_secs(1) {
            return Err(CaError::CaExpired {
                id: id.clone(),
                ca_not_after,
            }
            .into());
        }
        Ok(signer.sign_at(id, audience, ttl, now)?)
    }

    /// `kid` of the JWT key that signs JWT-SVIDs now.
    pub fn jwt_key_id(&self) -> String {
        self.lock().jwt.kid().to_owned()
    }

    /// Requests a rotation: a new root is published now (sequence + 1, flushed) and starts
    /// signing after the activation delay, once federated peers have had time to fetch it;
    /// [`Self::tick`] activates it. A root already prepared is reused (its activation is not
    /// postponed).
    pub fn rotate(&self, now: OffsetDateTime) -> Result<Rotation, AuthorityError> {
        let mut inner = self.lock();
        let activate_after = now + self.options.activation_delay;
        let prepared = inner
            .state
            .authorities
            .iter()
            .position(|ca| ca.status == CaStatus::Prepared);
        let activates_at = match prepared {
            None => {
                self.prepare(&mut inner, now, Some(activate_after))?;
                activate_after
            }
            Some(index) => {
                let current = inner.state.authorities[index].activate_after;
                match current {
                    Some(at) if at <= activate_after => at,
                    _ => {
                        let mut next = inner.state.clone();
                        next.authorities[index].activate_after = Some(activate_after);
                        self.commit(&mut inner, next)?;
                        activate_after
                    }
                }
            }
        };
        Ok(Rotation {
            sequence: inner.state.sequence,
            activates_at,
            old_root_remove_after: None,
        })
    }

    /// Rotates at once: publishes a new root (sequence + 1, flushed), then makes it the signing
    /// root and retires the old one until its last possible leaf has expired. Federated peers
    /// reject leaves of the new root until they next refresh; prefer [`Self::rotate`].
    pub fn rotate_now(&self, now: OffsetDateTime) -> Result<Rotation, AuthorityError> {
        let mut inner = self.lock();
        if !inner
            .state
            .authorities
            .iter()
            .any(|ca| ca.status == CaStatus::Prepared)
        {
            self.prepare(&mut inner, now, None)?;
        }
        let remove_after = self.activate(&mut inner, now)?;
        Ok(Rotation {
            sequence: inner.state.sequence,
            activates_at: now,
            old_root_remove_after: Some(remove_after),
        })
    }

    /// Step 1: a new root enters the bundle; nothing signs with it yet.
    fn prepare(
        &self,
        inner: &mut Inner,
        now: OffsetDateTime,
        activate_after: Option<OffsetDateTime>,
    ) -> Result<(), AuthorityError> {
        let ca =
            CertificateAuthority::generate(self.trust_domain.clone(), now, self.options.ca_ttl)?;
        let jwt = JwtSigner::generate()?;
        let mut next = inner.state.clone();
        let id = next.authorities.iter().map(|c| c.id).max().unwrap_or(0) + 1;
        let mut stored = to_stored(id, &ca, &jwt, CaStatus::Prepared, now)?;
        stored.activate_after = activate_after;
        next.authorities.push(stored);
        next.sequence += 1;
        self.commit(inner, next)?;
        tracing::info!(trust_domain = %self.trust_domain, sequence = inner.state.sequence, jwt_kid = jwt.kid(), "published new root CA and JWT key");
        Ok(())
    }

    /// Step 2: the prepared root signs from now on; the active one retires.
    fn activate(
        &self,
        inner: &mut Inner,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime, AuthorityError> {
        let mut next = inner.state.clone();
        let prepared = next
            .authorities
            .iter()
            .position(|ca| ca.status == CaStatus::Prepared)
            .ok_or_else(|| AuthorityError::Inconsistent("no prepared root".into()))?;
        let new_active = Arc::new(load_ca(&self.trust_domain, &next.authorities[prepared])?);
        let new_jwt = Arc::new(load_jwt(&next.authorities[prepared])?);
        let mut remove_after = now;
        for ca in &mut next.authorities {
            if ca.status == CaStatus::Active {
                let not_after = isthmus_core::x509::facts(&ca.cert_der, 0)
                    .map_err(|e| AuthorityError::Inconsistent(e.to_string()))?
                    .not_after;
                // Its last leaf was signed no later than now and lives at most max_leaf_ttl.
                remove_after = not_after.min(now + self.options.max_leaf_ttl);
                ca.status = CaStatus::Retired;
                // A retired root never signs again: forget its keys (the JWT key's public half
                // stays in the bundle).
                ca.key_pkcs8.clear();
                if let Some(jwt) = &mut ca.jwt_key {
                    jwt.key_pkcs8.clear();
                }
                ca.retired_at = Some(now);
                ca.remove_after = Some(remove_after);
            }
        }
        next.authorities[prepared].status = CaStatus::Active;
        next.authorities[prepared].activated_at = Some(now);
        // The bundle's content is unchanged (same roots), so the sequence stays.
        self.commit(inner, next)?;
        inner.active = new_active;
        inner.jwt = new_jwt;
        tracing::info!(trust_domain = %self.trust_domain, remove_old_after = %remove_after, jwt_kid = inner.jwt.kid(), "activated new root CA and JWT key");
        Ok(remove_after)
    }

    /// Scheduled maintenance: prepares the next root at half the active root's life, activates
    /// it at two thirds (or earlier when the active root could no longer cover a full-length
    /// leaf), and drops retired roots whose leaves have all expired. Returns whether anything
    /// changed.
    pub fn tick(&self, now: OffsetDateTime) -> Result<bool, AuthorityError> {
        let mut inner = self.lock();
        let mut changed = false;
        let (active_nb, active_na) = {
            let facts = isthmus_core::x509::facts(inner.active.certificate(), 0)
                .map_err(|e| AuthorityError::Inconsistent(e.to_string()))?;
            (facts.not_before, facts.not_after)
        };
        let life = active_na - active_nb;
        let has_prepared = inner
            .state
            .authorities
            .iter()
            .any(|ca| ca.status == CaStatus::Prepared);
        if !has_prepared && now >= active_nb + life / 2 {
            self.prepare(&mut inner, now, None)?;
            changed = true;
        }
        let requested = inner
            .state
            .authorities
            .iter()
            .find(|ca| ca.status == CaStatus::Prepared)
            .map(|ca| ca.activate_after);
        let late = now >= active_nb + life * 2 / 3 || now + self.options.max_leaf_ttl >= active_na;
        let due = match requested {
            None => false,
            Some(Some(at)) => now >= at || late,
            Some(None) => late,
        };
        if due {
            self.activate(&mut inner, now)?;
            changed = true;
        }
        let expired: Vec<u64> = inner
            .state
            .authorities
            .iter()
            .filter(|ca| {
                ca.status == CaStatus::Retired && ca.remove_after.is_some_and(|t| t <= now)
            })
            .map(|ca| ca.id)
            .collect();
        if !expired.is_empty() {
            let mut next = inner.state.clone();
            next.authorities.retain(|ca| !expired.contains(&ca.id));
            next.sequence += 1;
            self.commit(&mut inner, next)?;
            tracing::info!(trust_domain = %self.trust_domain, removed = expired.len(), "removed retired roots from the bundle");
            changed = true;
        }
        Ok(changed)
    }

    /// Identifies the signing root; changes whenever a new root starts signing (clients renew
    /// their SVIDs then).
    pub fn signing_root_generation(&self) -> u64 {
        let inner = self.lock();
        inner
            .state
            .authorities
            .iter()
            .find(|ca| ca.status == CaStatus::Active)
            .map_or(0, |ca| ca.id)
    }

    /// The bundle sequence.
    pub fn sequence(&self) -> u64 {
        self.lock().state.sequence
    }
}

#[cfg(test)]
mod tests {
    use isthmus_core::BundleSet;
    use isthmus_core::verify::{SvidUsage, verify_svid_chain};
    use rustls_pki_types::UnixTime;

    use super::*;

    fn open(dir: &std::path::Path, now: OffsetDateTime) -> Authority {
        let store = Arc::new(BrokerStore::open(dir).unwrap());
        Authority::open(
            TrustDomain::new("east.example").unwrap(),
            store,
            AuthorityOptions {
                ca_ttl: Duration::from_secs(3600),
                leaf_ttl: Duration::from_secs(600),
                max_leaf_ttl: Duration::from_secs(600),
                refresh_hint: Duration::from_secs(5),
                activation_delay: Duration::from_secs(15),
            },
            now,
        )
        .unwrap()
    }

    fn unix(t: OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp() as u64))
    }

    #[test]
    fn rotation_publishes_first_and_keeps_the_old_root() {
        let dir = std::env::temp_dir().join(format!("isthmus-authority-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = OffsetDateTime::now_utc();
        let authority = open(&dir, t0);
        assert_eq!(authority.sequence(), 1);
        let id = SpiffeId::parse("spiffe://east.example/ns/demo/sa/echo").unwrap();
        let old_leaf = authority.issue_svid(&id, None, t0).unwrap();

        let mut rx = authority.subscribe();
        rx.borrow_and_update();
        let generation = authority.signing_root_generation();
        let rotation = authority.rotate(t0).unwrap();
        assert_eq!(rotation.sequence, 2);
        assert!(rx.has_changed().unwrap());
        let bundle = authority.bundle();
        assert_eq!(bundle.x509_authorities().len(), 2);
        assert_eq!(bundle.sequence(), Some(2));
        // Published, not signing yet: leaves still come from the old root.
        assert_eq!(authority.signing_root_generation(), generation);
        assert!(!authority.tick(t0 + Duration::from_secs(14)).unwrap());
        assert!(authority.tick(rotation.activates_at).unwrap());
        assert_ne!(authority.signing_root_generation(), generation);
        assert_eq!(
            authority.sequence(),
            2,
            "activation does not change the bundle"
        );
        let remove_after = authority
            .roots()
            .iter()
            .find_map(|r| r.remove_after)
            .unwrap();
        let new_leaf = authority.issue_svid(&id, None, t0).unwrap();
        let set = BundleSet::new([Bundle::clone(&bundle)]);
        // Both leaves verify against the published bundle; the new one only against the new root.
        verify_svid_chain(old_leaf.chain(), &set, unix(t0), SvidUsage::Any).unwrap();
        verify_svid_chain(new_leaf.chain(), &set, unix(t0), SvidUsage::Any).unwrap();
        let only_new = BundleSet::new([Bundle::with_x509_authorities(
            bundle.trust_domain().clone(),
            vec![bundle.x509_authorities()[1].clone()],
        )]);
        verify_svid_chain(new_leaf.chain(), &only_new, unix(t0), SvidUsage::Any).unwrap();
        assert!(verify_svid_chain(old_leaf.chain(), &only_new, unix(t0), SvidUsage::Any).is_err());

        // After the old root's last leaf expires, it leaves the bundle (sequence + 1).
        assert!(
            !authority
                .tick(remove_after - Duration::from_secs(1))
                .unwrap()
        );
        assert!(authority.tick(remove_after).unwrap());
        assert_eq!(authority.bundle().x509_authorities().len(), 1);
        assert_eq!(authority.sequence(), 3);

        // Reopening keeps the roots and the sequence.
        let root = authority.bundle().x509_authorities()[0].clone();
        drop(authority);
        let again = open(&dir, t0);
        assert_eq!(again.sequence(), 3);
        assert_eq!(again.bundle().x509_authorities(), &[root]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn jwt_keys_rotate_with_their_roots() {
        use isthmus_core::jwt::validate_at;

        let dir =
            std::env::temp_dir().join(format!("isthmus-authority-jwt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = OffsetDateTime::now_utc();
        let authority = open(&dir, t0);
        let id = SpiffeId::parse("spiffe://east.example/ns/demo/sa/echo").unwrap();
        let audience = vec!["db".to_owned()];
        let first_kid = authority.jwt_key_id();
        let bundle = authority.bundle();
        assert_eq!(
            bundle.jwt_authorities().keys().collect::<Vec<_>>(),
            [&first_kid]
        );
        let old = authority
            .mint_jwt_svid(&id, &audience, Duration::from_secs(300), t0)
            .unwrap();
        assert_eq!(old.key_id, first_kid);
        // Capped at max_leaf_ttl (600 s here), like a leaf.
        let long = authority
            .mint_jwt_svid(&id, &audience, Duration::from_secs(7200), t0)
            .unwrap();
        assert_eq!(long.expiry.unix_timestamp(), t0.unix_timestamp() + 600);
        let foreign = SpiffeId::parse("spiffe://west.example/a").unwrap();
        assert!(matches!(
            authority.mint_jwt_svid(&foreign, &audience, Duration::from_secs(60), t0),
            Err(AuthorityError::ForeignJwtSubject { .. })
        ));
        assert!(matches!(
            authority.mint_jwt_svid(&id, &[], Duration::from_secs(60), t0),
            Err(AuthorityError::Jwt(isthmus_core::jwt::JwtError::NoAudience))
        ));
        // Past the root's NotAfter nothing is minted.
        assert!(matches!(
            authority.mint_jwt_svid(
                &id,
                &audience,
                Duration::from_secs(60),
                t0 + Duration::from_secs(3600)
            ),
            Err(AuthorityError::Ca(CaError::CaExpired { .. }))
        ));

        // A rotation publishes the new JWT key with the new root; signing moves at activation.
        let rotation = authority.rotate(t0).unwrap();
        assert_eq!(authority.bundle().jwt_authorities().len(), 2);
        assert_eq!(authority.jwt_key_id(), first_kid);
        assert_eq!(
            authority
                .mint_jwt_svid(&id, &audience, Duration::from_secs(60), t0)
                .unwrap()
                .key_id,
            first_kid
        );
        assert!(authority.tick(rotation.activates_at).unwrap());
        let new_kid = authority.jwt_key_id();
        assert_ne!(new_kid, first_kid);
        let new = authority
            .mint_jwt_svid(
                &id,
                &audience,
                Duration::from_secs(300),
                rotation.activates_at,
            )
            .unwrap();
        assert_eq!(new.key_id, new_kid);
        let set = BundleSet::new([Bundle::clone(&authority.bundle())]);
        validate_at(&old.token, "db", &set, t0).unwrap();
        validate_at(&new.token, "db", &set, rotation.activates_at).unwrap();
        assert_eq!(
            authority
                .roots()
                .iter()
                .map(|r| r.jwt_key_id.clone())
                .collect::<Vec<_>>(),
            [Some(first_kid.clone()), Some(new_kid.clone())]
        );

        // The old key leaves with the old root, after every token it signed has expired.
        let remove_after = authority
            .roots()
            .iter()
            .find_map(|r| r.remove_after)
            .unwrap();
        assert!(long.expiry <= remove_after);
        assert!(authority.tick(remove_after).unwrap());
        assert_eq!(
            authority
                .bundle()
                .jwt_authorities()
                .keys()
                .collect::<Vec<_>>(),
            [&new_kid]
        );
        drop(authority);
        // Reopening keeps the signing key.
        let again = open(&dir, t0);
        assert_eq!(again.jwt_key_id(), new_kid);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stores_without_jwt_keys_get_them_on_open() {
        let dir =
            std::env::temp_dir().join(format!("isthmus-authority-upgrade-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = OffsetDateTime::now_utc();
        let authority = open(&dir, t0);
        authority.rotate_now(t0).unwrap();
        let sequence = authority.sequence();
        drop(authority);
        // What a broker from before JWT-SVIDs stored: no JWT key on any root.
        {
            let store = BrokerStore::open(&dir).unwrap();
            let mut state = store.load_authority().unwrap().unwrap();
            for ca in &mut state.authorities {
                ca.jwt_key = None;
            }
            store.save_authority(&state).unwrap();
        }
        let authority = open(&dir, t0);
        // Only the active root gets a key (the retired one never signs again), and the
        // changed bundle gets a new sequence.
        assert_eq!(authority.sequence(), sequence + 1);
        let bundle = authority.bundle();
        assert_eq!(
            bundle.jwt_authorities().keys().collect::<Vec<_>>(),
            [&authority.jwt_key_id()]
        );
        let id = SpiffeId::parse("spiffe://east.example/a").unwrap();
        let svid = authority
            .mint_jwt_svid(&id, &["db".to_owned()], Duration::from_secs(60), t0)
            .unwrap();
        isthmus_core::jwt::validate_at(
            &svid.token,
            "db",
            &BundleSet::new([Bundle::clone(&bundle)]),
            t0,
        )
        .unwrap();
        drop(authority);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scheduled_rotation_prepares_then_activates() {
        let dir =
            std::env::temp_dir().join(format!("isthmus-authority-sched-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = OffsetDateTime::now_utc();
        let authority = open(&dir, t0);
        assert!(!authority.tick(t0 + Duration::from_secs(60)).unwrap());
        // Half-life: the next root is published but not signing.
        assert!(authority.tick(t0 + Duration::from_secs(1810)).unwrap());
        let roots = authority.roots();
        assert_eq!(
            roots.iter().map(|r| r.status).collect::<Vec<_>>(),
            [CaStatus::Active, CaStatus::Prepared]
        );
        // Two thirds: it becomes active and the first retires.
        assert!(authority.tick(t0 + Duration::from_secs(2410)).unwrap());
        let roots = authority.roots();
        assert_eq!(
            roots.iter().map(|r| r.status).collect::<Vec<_>>(),
            [CaStatus::Retired, CaStatus::Active]
        );
        assert_eq!(authority.sequence(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
