//! Following a gateway's local catalog API (`isthmus.catalog.v1.Catalog.Watch`): every
//! snapshot is handed to a callback; a failed call or a stream that ends or breaks is retried
//! after a back-off, and the caller keeps using its last snapshot meanwhile. DNS servers and
//! node agents follow the catalog this way.

use std::time::Duration;

use isthmus_core::lifecycle::DrainWatch;
use tonic::transport::Channel;

use crate::catalog as pb;
use crate::catalog::catalog_client::CatalogClient;

/// Back-off between catalog reconnections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait after a failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Watches the gateway's catalog API on `client` (typically over
/// [`crate::transport::tls_channel`]) and hands every snapshot to `on_snapshot` until
/// `drain` signals. A failed call or a stream that ends or breaks is retried after a back-off
/// that doubles up to `backoff.max` and starts over once a snapshot arrives; the last zone
/// keeps being answered meanwhile.
pub async fn follow(
    mut client: CatalogClient<Channel>,
    mut on_snapshot: impl FnMut(pb::CatalogSnapshot) + Send,
    backoff: Backoff,
    drain: DrainWatch,
) {
    let mut wait = backoff.initial;
    loop {
        let outcome = tokio::select! {
            () = drain.signaled() => return,
            outcome = watch_once(&mut client, &mut on_snapshot) => outcome,
        };
        match outcome {
            WatchOutcome::Received => wait = backoff.initial,
            WatchOutcome::Nothing => {}
        }
        tokio::select! {
            () = drain.signaled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(backoff.max);
    }
}

enum WatchOutcome {
    /// At least one snapshot arrived before the stream ended.
    Received,
    /// The call failed before any snapshot.
    Nothing,
}

async fn watch_once(
    client: &mut CatalogClient<Channel>,
    on_snapshot: &mut (impl FnMut(pb::CatalogSnapshot) + Send),
) -> WatchOutcome {
    let mut stream = match client.watch(pb::WatchCatalogRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::warn!(error = %status, "catalog watch failed; retrying");
            return WatchOutcome::Nothing;
        }
    };
    let mut outcome = WatchOutcome::Nothing;
    loop {
        match stream.message().await {
            Ok(Some(snapshot)) => {
                on_snapshot(snapshot);
                outcome = WatchOutcome::Received;
            }
            Ok(None) => {
                tracing::warn!("catalog watch ended; reconnecting");
                return outcome;
            }
            Err(status) => {
                tracing::warn!(error = %status, "catalog watch broke; reconnecting");
                return outcome;
            }
        }
    }
}
