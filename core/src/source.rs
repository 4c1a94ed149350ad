//! The SVID source: the one place a process holds its current X.509-SVID. Whoever obtains SVIDs
//! (the broker client, a file watcher, an in-process CA in the lab) calls [`SvidSource::rotate`];
//! TLS resolvers read [`SvidSource::current`] on every handshake, so new handshakes present the
//! new certificate while established connections carry on untouched.

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::svid::{SvidError, X509Svid};

/// An SVID together with its rustls form, prepared once per rotation.
#[derive(Debug)]
pub struct CurrentSvid {
    /// The SVID.
    pub svid: X509Svid,
    /// The chain and signing key as rustls serves them.
    pub certified_key: Arc<CertifiedKey>,
}

/// The current SVID and its updates. Cheap to clone; every clone sees rotations.
#[derive(Debug, Clone)]
pub struct SvidSource {
    tx: Arc<watch::Sender<Arc<CurrentSvid>>>,
}

impl SvidSource {
    /// A source starting with `svid`.
    pub fn new(svid: X509Svid) -> Result<Self, SvidError> {
        let current = Self::prepare(svid)?;
        let (tx, _rx) = watch::channel(current);
        Ok(Self { tx: Arc::new(tx) })
    }

    fn prepare(svid: X509Svid) -> Result<Arc<CurrentSvid>, SvidError> {
        let certified_key = svid.certified_key()?;
        Ok(Arc::new(CurrentSvid {
            svid,
            certified_key,
        }))
    }

    /// The SVID to present now.
    pub fn current(&self) -> Arc<CurrentSvid> {
        self.tx.borrow().clone()
    }

    /// Replaces the SVID; the next handshake presents it.
    pub fn rotate(&self, svid: X509Svid) -> Result<(), SvidError> {
        let next = Self::prepare(svid)?;
        self.tx.send_replace(next);
        Ok(())
    }

    /// A receiver that wakes on every rotation.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CurrentSvid>> {
        self.tx.subscribe()
    }
}
