//! The trust store: the bundle of every trust domain this process trusts, keyed by trust
//! domain, replaceable at runtime. Every verifier reads it at handshake time, so a bundle update
//! (federation refresh, CA rotation) takes effect on the next handshake without rebuilding TLS
//! configurations.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::bundle::Bundle;
use crate::id::TrustDomain;

/// An immutable snapshot of the trusted bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Arc<Bundle>>,
}

impl BundleSet {
    /// A snapshot holding the given bundles (a later bundle for the same domain wins).
    pub fn new(bundles: impl IntoIterator<Item = Bundle>) -> Self {
        Self {
            bundles: bundles
                .into_iter()
                .map(|b| (b.trust_domain().clone(), Arc::new(b)))
                .collect(),
        }
    }

    /// The bundle of one trust domain.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&Arc<Bundle>> {
        self.bundles.get(trust_domain)
    }

    /// The bundle of the trust domain with this name.
    pub fn get_by_name(&self, name: &str) -> Option<&Arc<Bundle>> {
        TrustDomain::new(name)
            .ok()
            .and_then(|td| self.bundles.get(&td))
    }

    /// Every bundle, ordered by trust domain.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Bundle>> {
        self.bundles.values()
    }

    /// The trust domains held.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// True when no trust domain is trusted.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

/// The live, shared set of trusted bundles. Cheap to clone; all clones see the same state.
#[derive(Debug, Clone)]
pub struct TrustStore {
    tx: Arc<watch::Sender<Arc<BundleSet>>>,
}

impl Default for TrustStore {
    fn default() -> Self {
        Self::new(BundleSet::default())
    }
}

impl TrustStore {
    /// A store starting with the given snapshot.
    pub fn new(initial: BundleSet) -> Self {
        let (tx, _rx) = watch::channel(Arc::new(initial));
        Self { tx: Arc::new(tx) }
    }

    /// A store starting with the given bundles.
    pub fn from_bundles(bundles: impl IntoIterator<Item = Bundle>) -> Self {
        Self::new(BundleSet::new(bundles))
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<BundleSet> {
        self.tx.borrow().clone()
    }

    /// The current bundle of one trust domain.
    pub fn get(&self, trust_domain: &TrustDomain) -> Option<Arc<Bundle>> {
        self.tx.borrow().get(trust_domain).cloned()
    }

    /// Inserts or replaces the bundle of its trust domain. Returns false (and notifies nobody)
    /// when the stored bundle is already identical.
    pub fn set(&self, bundle: Bundle) -> bool {
        self.tx.send_if_modified(|current| {
            if current.get(bundle.trust_domain()).map(|b| b.as_ref()) == Some(&bundle) {
                return false;
            }
            let mut next = BundleSet::clone(current);
            next.bundles
                .insert(bundle.trust_domain().clone(), Arc::new(bundle));
            *current = Arc::new(next);
            true
        })
    }

    /// Removes a trust domain (a terminated federation relationship). Returns whether it was
    /// present.
    pub fn remove(&self, trust_domain: &TrustDomain) -> bool {
        self.tx.send_if_modified(|current| {
            if current.get(trust_domain).is_none() {
                return false;
            }
            let mut next = BundleSet::clone(current);
            next.bundles.remove(trust_domain);
            *current = Arc::new(next);
            true
        })
    }

    /// Replaces the whole set.
    pub fn replace(&self, set: BundleSet) {
        self.tx.send_replace(Arc::new(set));
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_notifies_only_on_change() {
        let td = TrustDomain::new("west.example").unwrap();
        let store = TrustStore::default();
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        assert!(store.set(Bundle::new(td.clone())));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!store.set(Bundle::new(td.clone())));
        assert!(!rx.has_changed().unwrap());
        let mut next = Bundle::new(td.clone());
        next.set_sequence(Some(2));
        assert!(store.set(next));
        assert_eq!(store.get(&td).unwrap().sequence(), Some(2));
        assert!(store.remove(&td));
        assert!(!store.remove(&td));
        assert!(store.snapshot().is_empty());
    }
}
