//! Export sources: where the services this cluster exports come from. Every source yields the
//! full export set on a watch channel; the gateway applies each new set (new streams use it at
//! once, peers get deltas). Standalone sites and the lab use the configuration file; the
//! Kubernetes source (annotations, `ServiceExport`) arrives later through the same trait.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::DrainWatch;
use tokio::sync::watch;

use crate::config::{ExportedService, GATEWAY_ENV, GatewayConfig};

/// A source of exported services.
pub trait ExportSource: Send + Sync {
    /// The current export set, and every later one.
    fn subscribe(&self) -> watch::Receiver<Vec<ExportedService>>;
}

/// A fixed export set (tests, in-process labs that push updates themselves).
#[derive(Debug, Clone)]
pub struct StaticExports {
    tx: std::sync::Arc<watch::Sender<Vec<ExportedService>>>,
}

impl StaticExports {
    /// A source holding `services`.
    pub fn new(services: Vec<ExportedService>) -> Self {
        Self {
            tx: std::sync::Arc::new(watch::channel(services).0),
        }
    }

    /// Publishes a new export set.
    pub fn set(&self, services: Vec<ExportedService>) {
        self.tx.send_replace(services);
    }
}

impl ExportSource for StaticExports {
    fn subscribe(&self) -> watch::Receiver<Vec<ExportedService>> {
        self.tx.subscribe()
    }
}

/// The `[[services]]` of the gateway's configuration file, re-read when the file changes. A
/// file that no longer validates is logged and ignored: the last good export set stays.
#[derive(Debug, Clone)]
pub struct FileExports {
    tx: std::sync::Arc<watch::Sender<Vec<ExportedService>>>,
}

impl ExportSource for FileExports {
    fn subscribe(&self) -> watch::Receiver<Vec<ExportedService>> {
        self.tx.subscribe()
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl FileExports {
    /// Starts watching `path` (polling every `interval`), beginning with `initial`; flags and
    /// environment are applied as at start-up.
    pub fn watch<E: Environment + Send + Sync + 'static>(
        path: PathBuf,
        env: E,
        flags: Vec<(String, String)>,
        initial: Vec<ExportedService>,
        interval: Duration,
        drain: DrainWatch,
    ) -> Self {
        let tx = std::sync::Arc::new(watch::channel(initial).0);
        let sender = tx.clone();
        tokio::spawn(async move {
            let mut seen = modified(&path);
            loop {
                tokio::select! {
                    () = drain.signaled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match config::load::<GatewayConfig, E>(Some(&path), &env, GATEWAY_ENV, &flags) {
                    Ok(cfg) => {
                        tracing::info!(path = %path.display(), services = cfg.services.len(), "exports reloaded");
                        sender.send_replace(cfg.services);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "configuration no longer valid; keeping the last good exports");
                    }
                }
            }
        });
        Self { tx }
    }
}

/// Applies every export set `source` yields to the gateway's catalog view.
pub async fn follow(
    source: &dyn ExportSource,
    view: crate::server::CatalogView,
    drain: DrainWatch,
) {
    let mut rx = source.subscribe();
    view.replace_exports(&rx.borrow_and_update());
    loop {
        tokio::select! {
            () = drain.signaled() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let services = rx.borrow_and_update().clone();
                view.replace_exports(&services);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use isthmus_core::lifecycle::DrainTrigger;

    use super::*;

    const BASE: &str = "trust_domain = \"east.example\"\ncluster = \"east\"\n";

    fn with_service(name: &str) -> String {
        format!(
            "{BASE}[[services]]\nnamespace = \"demo\"\nname = \"{name}\"\nports = [{{ port = 80 }}]\nendpoints = [{{ address = \"10.0.0.1\" }}]\n"
        )
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_set() {
        let dir = std::env::temp_dir().join(format!("isthmus-exports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, with_service("echo")).unwrap();
        let (drain, watch) = DrainTrigger::new();
        let source = FileExports::watch(
            path.clone(),
            BTreeMap::<String, String>::new(),
            Vec::new(),
            Vec::new(),
            Duration::from_millis(20),
            watch,
        );
        let mut rx = source.subscribe();
        // Make sure the modification time moves even on coarse file systems.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(&path, with_service("web")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update()[0].name, "web");
        // An invalid file (unknown field) is ignored.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        std::fs::write(&path, format!("{}bogus = 1\n", with_service("api"))).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), rx.changed())
                .await
                .is_err()
        );
        assert_eq!(rx.borrow()[0].name, "web");
        drain.drain(Duration::from_secs(1)).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
