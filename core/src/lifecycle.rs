//! Service lifecycle: shutdown (signal → drain → deadline → force) and readiness.
//!
//! - [`Shutdown`] reports shutdown requests: SIGINT, SIGTERM, or an in-process
//!   [`ShutdownTrigger`] (tests, the lab, an admin endpoint).
//! - [`DrainTrigger`] and [`DrainWatch`] coordinate draining: every listener and connection
//!   holds a clone of a [`DrainWatch`], awaits [`DrainWatch::signaled`] to stop taking new
//!   work, and drops the watch when done. The trigger waits for all watches up to a deadline,
//!   then asks the stragglers to stop at once ([`DrainWatch::forced`]).
//! - [`run_until_shutdown`] strings these together the way every service ends its `main`.
//! - [`Readiness`] is a set of named blockers ("svid", "bundles", "listeners") released on
//!   drop; `/healthz/ready` reports [`Readiness::pending`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Errors from lifecycle set-up.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The operating system refused to install the handler for a signal.
    #[error("cannot install the {signal} handler: {source}")]
    SignalHandler {
        /// The signal, e.g. `SIGTERM`.
        signal: ShutdownSignal,
        /// Why installation failed.
        #[source]
        source: std::io::Error,
    },
}

/// A signal that asks the process to shut down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownSignal {
    /// SIGINT (Ctrl+C).
    Interrupt,
    /// SIGTERM (what Kubernetes sends).
    Terminate,
}

impl ShutdownSignal {
    /// The conventional name, e.g. `SIGTERM`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    const fn kind(self) -> SignalKind {
        match self {
            Self::Interrupt => SignalKind::interrupt(),
            Self::Terminate => SignalKind::terminate(),
        }
    }
}

impl fmt::Display for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why shutdown was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The process received a signal.
    Signal(ShutdownSignal),
    /// A [`ShutdownTrigger`] asked for it.
    Requested,
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Signal(signal) => signal.fmt(f),
            Self::Requested => f.write_str("in-process request"),
        }
    }
}

/// Installed SIGINT and SIGTERM handlers.
#[derive(Debug)]
struct SignalStreams {
    interrupt: Signal,
    terminate: Signal,
}

impl SignalStreams {
    fn install() -> Result<Self, LifecycleError> {
        let install = |which: ShutdownSignal| {
            signal(which.kind()).map_err(|source| LifecycleError::SignalHandler {
                signal: which,
                source,
            })
        };
        Ok(Self {
            interrupt: install(ShutdownSignal::Interrupt)?,
            terminate: install(ShutdownSignal::Terminate)?,
        })
    }

    async fn recv(&mut self) -> ShutdownSignal {
        // `recv` yields `None` only once the runtime is shutting down; such a branch is
        // disabled and the other one (or the caller's) decides.
        tokio::select! {
            Some(()) = self.interrupt.recv() => ShutdownSignal::Interrupt,
            Some(()) = self.terminate.recv() => ShutdownSignal::Terminate,
            else => std::future::pending().await,
        }
    }
}

/// Waits for SIGINT or SIGTERM and says which arrived. Panics outside a Tokio runtime.
///
/// Once installed, the handlers stay for the life of the process, so later signals no longer
/// kill it: services should use [`Shutdown`] and [`run_until_shutdown`], which keep listening
/// and force shutdown on a second signal.
pub async fn wait_for_signal() -> Result<ShutdownSignal, LifecycleError> {
    Ok(SignalStreams::install()?.recv().await)
}

/// Reports each shutdown request: from signals (if enabled) and from its triggers.
#[derive(Debug)]
pub struct Shutdown {
    signals: Option<SignalStreams>,
    // Keeping a sender means `recv` never sees a closed channel, even with no triggers left.
    requests_tx: mpsc::UnboundedSender<()>,
    requests_rx: mpsc::UnboundedReceiver<()>,
}

impl Shutdown {
    /// Listens for SIGINT, SIGTERM and triggers.
    ///
    /// From this call on, those signals are queued for [`Shutdown::requested`] instead of
    /// killing the process, so create it right before the service starts serving.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime with IO enabled (a start-up invariant).
    pub fn with_signals() -> Result<Self, LifecycleError> {
        Ok(Self {
            signals: Some(SignalStreams::install()?),
            ..Self::manual()
        })
    }

    /// Listens only for triggers: for tests and for services run inside the lab.
    pub fn manual() -> Self {
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        Self {
            signals: None,
            requests_tx,
            requests_rx,
        }
    }

    /// A handle that requests shutdown from anywhere in the process.
    pub fn trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(self.requests_tx.clone())
    }

    /// Waits for the next shutdown request.
    pub async fn requested(&mut self) -> ShutdownReason {
        let requests = &mut self.requests_rx;
        match &mut self.signals {
            Some(signals) => tokio::select! {
                signal = signals.recv() => ShutdownReason::Signal(signal),
                _ = requests.recv() => ShutdownReason::Requested,
            },
            None => {
                requests.recv().await;
                ShutdownReason::Requested
            }
        }
    }
}

/// Requests shutdown of the [`Shutdown`] it came from; cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger(mpsc::UnboundedSender<()>);

impl ShutdownTrigger {
    /// Requests shutdown; a second request while draining forces it.
    pub fn request(&self) {
        // Fails only when the `Shutdown` is gone, and then nobody is left to stop.
        let _ = self.0.send(());
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every [`DrainWatch`] was dropped in time.
    Complete,
    /// The deadline passed with `remaining` watches still held.
    DeadlineExceeded {
        /// Watches still held when the deadline passed.
        remaining: usize,
    },
    /// A second shutdown request cut the drain short with `remaining` watches still held.
    Forced {
        /// Watches still held when the drain was forced.
        remaining: usize,
    },
}

impl DrainOutcome {
    /// Whether all work finished on its own.
    pub const fn is_complete(self) -> bool {
        matches!(self, Self::Complete)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DrainState {
    Running,
    Draining,
    Forced,
}

/// Starts a drain and waits for every [`DrainWatch`] to be dropped.
///
/// Dropping the trigger without draining counts as a drain signal to its watches, so no task
/// waits on a coordinator that is gone.
#[derive(Debug)]
pub struct DrainTrigger {
    state: watch::Sender<DrainState>,
}

/// Held by every task that must finish before shutdown completes; clone it per task and
/// drop it when the task is done.
#[derive(Clone, Debug)]
pub struct DrainWatch {
    state: watch::Receiver<DrainState>,
}

impl DrainTrigger {
    /// A trigger and its first watch.
    pub fn new() -> (Self, DrainWatch) {
        let (state, receiver) = watch::channel(DrainState::Running);
        (Self { state }, DrainWatch { state: receiver })
    }

    /// Another watch, for a task that has no watch to clone from.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            state: self.state.subscribe(),
        }
    }

    /// Watches still held.
    pub fn remaining(&self) -> usize {
        self.state.receiver_count()
    }

    /// Tells every watch that draining has started; does nothing if it already has.
    pub fn start_drain(&self) {
        self.advance(DrainState::Draining);
    }

    /// Tells every watch to abandon its work now ([`DrainWatch::forced`]).
    pub fn force(&self) {
        self.advance(DrainState::Forced);
    }

    fn advance(&self, to: DrainState) {
        self.state.send_if_modified(|state| {
            let advanced = *state < to;
            if advanced {
                *state = to;
            }
            advanced
        });
    }

    /// Starts draining (if not yet started) and waits until every watch is dropped or
    /// `deadline` passes. On the deadline it forces the remaining watches and reports how
    /// many there were; the caller then closes whatever they hold.
    pub async fn drain(&self, deadline: Duration) -> DrainOutcome {
        self.start_drain();
        if tokio::time::timeout(deadline, self.state.closed())
            .await
            .is_ok()
        {
            return DrainOutcome::Complete;
        }
        let remaining = self.remaining();
        self.force();
        DrainOutcome::DeadlineExceeded { remaining }
    }
}

impl DrainWatch {
    /// Resolves once draining has started: stop accepting new work, finish what is in flight,
    /// then drop this watch.
    pub async fn signaled(&self) {
        self.wait_until(DrainState::Draining).await;
    }

    /// Resolves once the drain deadline has passed or shutdown was forced: abandon in-flight
    /// work now.
    pub async fn forced(&self) {
        self.wait_until(DrainState::Forced).await;
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.state.borrow() >= DrainState::Draining
    }

    async fn wait_until(&self, reached: DrainState) {
        let mut state = self.state.clone();
        // An error means the trigger was dropped, which releases every waiter.
        let _ = state.wait_for(|state| *state >= reached).await;
    }
}

/// What [`run_until_shutdown`] observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// What started the shutdown.
    pub reason: ShutdownReason,
    /// How the drain ended.
    pub outcome: DrainOutcome,
}

/// Waits for a shutdown request, drains for at most `deadline`, and reports how it went.
///
/// A second request during the drain forces it at once. Unless the outcome is
/// [`DrainOutcome::Complete`], watches have been told to stop ([`DrainWatch::forced`]) and the
/// caller should close what remains (QUIC `close()`, aborting tasks) before exiting.
pub async fn run_until_shutdown(
    shutdown: &mut Shutdown,
    drain: &DrainTrigger,
    deadline: Duration,
) -> ShutdownReport {
    let reason = shutdown.requested().await;
    info!(%reason, deadline = ?deadline, tasks = drain.remaining(), "shutdown requested; draining");
    let outcome = tokio::select! {
        outcome = drain.drain(deadline) => outcome,
        second = shutdown.requested() => {
            let remaining = drain.remaining();
            drain.force();
            warn!(reason = %second, remaining, "second shutdown request; forcing shutdown");
            DrainOutcome::Forced { remaining }
        }
    };
    match outcome {
        DrainOutcome::Complete => info!("drain complete"),
        DrainOutcome::DeadlineExceeded { remaining } => {
            warn!(remaining, deadline = ?deadline, "drain deadline exceeded; forcing shutdown");
        }
        DrainOutcome::Forced { .. } => {}
    }
    ShutdownReport { reason, outcome }
}

/// The process is ready when no blocker is pending. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Readiness {
    // Counts per name, so two blockers registered under one name are both awaited.
    pending: watch::Sender<BTreeMap<String, usize>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A readiness set with nothing pending.
    pub fn new() -> Self {
        Self {
            pending: watch::Sender::new(BTreeMap::new()),
        }
    }

    /// Blocks readiness until the returned blocker is released or dropped.
    pub fn register(&self, name: impl Into<String>) -> ReadinessBlocker {
        let name = name.into();
        self.pending
            .send_modify(|pending| *pending.entry(name.clone()).or_default() += 1);
        ReadinessBlocker {
            readiness: self.clone(),
            name,
        }
    }

    /// Names of the pending blockers, sorted and without duplicates.
    pub fn pending(&self) -> Vec<String> {
        self.pending.borrow().keys().cloned().collect()
    }

    /// Whether no blocker is pending.
    pub fn is_ready(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Resolves once no blocker is pending.
    pub async fn wait_ready(&self) {
        let mut pending = self.pending.subscribe();
        // Cannot fail: `self` holds the sender.
        let _ = pending.wait_for(BTreeMap::is_empty).await;
    }

    fn release(&self, name: &str) {
        let mut left = 0;
        self.pending.send_modify(|pending| {
            if let Some(count) = pending.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    pending.remove(name);
                }
            }
            left = pending.values().sum();
        });
        if left == 0 {
            info!(blocker = name, "readiness blocker released; ready");
        } else {
            info!(blocker = name, pending = left, "readiness blocker released");
        }
    }
}

/// Holds readiness back until released or dropped.
#[derive(Debug)]
#[must_use = "readiness is released as soon as the blocker is dropped"]
pub struct ReadinessBlocker {
    readiness: Readiness,
    name: String,
}

impl ReadinessBlocker {
    /// The name it was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Releases the blocker; the same as dropping it, but reads better at the call site.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for ReadinessBlocker {
    fn drop(&mut self) {
        self.readiness.release(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use tokio::time::{Instant, sleep, timeout};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_completes_when_watches_drop() {
        let (trigger, watch) = DrainTrigger::new();
        let connection = watch.clone();
        let listener = tokio::spawn(async move {
            watch.signaled().await;
            // Stops accepting, then drops its watch.
        });
        let conn = tokio::spawn(async move {
            connection.signaled().await;
            sleep(Duration::from_secs(3)).await;
            drop(connection);
        });
        let started = Instant::now();
        assert_eq!(trigger.remaining(), 2);
        let outcome = trigger.drain(Duration::from_secs(30)).await;
        assert_eq!(outcome, DrainOutcome::Complete);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        listener.await.unwrap();
        conn.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_with_no_watches_completes_at_once() {
        let (trigger, watch) = DrainTrigger::new();
        drop(watch);
        assert_eq!(
            trigger.drain(Duration::from_secs(30)).await,
            DrainOutcome::Complete
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_exceeded_reports_remaining_and_forces() {
        let (trigger, watch) = DrainTrigger::new();
        let other = trigger.watch();
        let started = Instant::now();
        let outcome = trigger.drain(Duration::from_secs(10)).await;
        assert_eq!(outcome, DrainOutcome::DeadlineExceeded { remaining: 2 });
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        timeout(Duration::from_millis(1), watch.forced())
            .await
            .expect("watches are forced after the deadline");
        drop(other);
    }

    #[tokio::test(start_paused = true)]
    async fn watches_see_drain_start_only_when_triggered() {
        let (trigger, watch) = DrainTrigger::new();
        assert!(!watch.is_draining());
        assert!(
            timeout(Duration::from_secs(60), watch.signaled())
                .await
                .is_err(),
            "signaled before the drain started"
        );
        trigger.start_drain();
        assert!(watch.is_draining());
        timeout(Duration::from_millis(1), watch.signaled())
            .await
            .expect("signaled after start_drain");
        assert!(
            timeout(Duration::from_secs(60), watch.forced())
                .await
                .is_err(),
            "forced before the deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_trigger_releases_watches() {
        let (trigger, watch) = DrainTrigger::new();
        drop(trigger);
        timeout(Duration::from_millis(1), watch.signaled())
            .await
            .expect("dropping the trigger releases signaled()");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_finishes_after_request() {
        let mut shutdown = Shutdown::manual();
        let (drain, watch) = DrainTrigger::new();
        let server = tokio::spawn(async move {
            watch.signaled().await;
            sleep(Duration::from_secs(2)).await;
            drop(watch);
        });
        shutdown.trigger().request();
        let report = timeout(
            Duration::from_secs(60),
            run_until_shutdown(&mut shutdown, &drain, Duration::from_secs(30)),
        )
        .await
        .expect("shutdown must finish");
        assert_eq!(
            report,
            ShutdownReport {
                reason: ShutdownReason::Requested,
                outcome: DrainOutcome::Complete,
            }
        );
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_finishes_at_deadline_with_stuck_task() {
        let mut shutdown = Shutdown::manual();
        let (drain, stuck) = DrainTrigger::new();
        shutdown.trigger().request();
        let started = Instant::now();
        let report = run_until_shutdown(&mut shutdown, &drain, Duration::from_secs(30)).await;
        assert_eq!(
            report.outcome,
            DrainOutcome::DeadlineExceeded { remaining: 1 }
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        drop(stuck);
    }

    #[tokio::test(start_paused = true)]
    async fn second_request_forces_shutdown() {
        let mut shutdown = Shutdown::manual();
        let trigger = shutdown.trigger();
        let (drain, stuck) = DrainTrigger::new();
        trigger.request();
        tokio::spawn(async move {
            sleep(Duration::from_secs(5)).await;
            trigger.request();
        });
        let started = Instant::now();
        let report = run_until_shutdown(&mut shutdown, &drain, Duration::from_secs(300)).await;
        assert_eq!(report.outcome, DrainOutcome::Forced { remaining: 1 });
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        timeout(Duration::from_millis(1), stuck.forced())
            .await
            .expect("a forced shutdown forces the watches");
    }

    #[tokio::test]
    async fn sigterm_is_reported() {
        let mut shutdown = Shutdown::with_signals().unwrap();
        // The handler is installed above, so this SIGTERM is queued instead of ending the
        // test process.
        let status = Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let reason = timeout(Duration::from_secs(10), shutdown.requested())
            .await
            .expect("SIGTERM must be reported");
        assert_eq!(reason, ShutdownReason::Signal(ShutdownSignal::Terminate));
    }

    #[test]
    fn readiness_pending_names_sorted() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready());
        let svid = readiness.register("svid");
        let bundles = readiness.register("bundles");
        let listeners = readiness.register("listeners");
        let listeners_v6 = readiness.register("listeners");
        assert_eq!(readiness.pending(), ["bundles", "listeners", "svid"]);
        assert!(!readiness.is_ready());

        svid.release();
        drop(listeners);
        assert_eq!(
            readiness.pending(),
            ["bundles", "listeners"],
            "one of two 'listeners' blockers still pending"
        );
        assert_eq!(listeners_v6.name(), "listeners");
        drop(listeners_v6);
        drop(bundles);
        assert!(readiness.is_ready());
        assert!(readiness.pending().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_ready_wakes_when_last_blocker_drops() {
        let readiness = Readiness::new();
        let svid = readiness.register("svid");
        let bundles = readiness.clone().register("bundles");
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait_ready().await }
        });
        sleep(Duration::from_secs(1)).await;
        drop(svid);
        sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "ready while 'bundles' is pending");
        drop(bundles);
        timeout(Duration::from_secs(1), waiter)
            .await
            .expect("wait_ready wakes")
            .unwrap();
        assert!(readiness.is_ready());
    }
}
