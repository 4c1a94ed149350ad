//! Throw-away sandboxes for privileged tests and `isthmus lab --netns`: a child cgroup v2, a
//! private network namespace that has only `lo` (no default route, so a connect that is not
//! redirected fails at once instead of leaving the machine), and processes started inside both.
//! Every guard undoes what it made when it drops, including after a failed assertion.
//!
//! Tests call [`require_privileged!`](crate::require_privileged) first: without root they skip
//! with a `SKIPPED` line, unless `CI=true` or `ISTHMUS_REQUIRE_PRIVILEGED=1` makes that a failure.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns, unshare};
use tracing::warn;

use crate::redirect::{RedirectError, cgroup2_mount, privileges_missing};

/// The variable that, set to `1`, turns a missing privilege into a test failure.
pub const REQUIRE_PRIVILEGED_ENV: &str = "ISTHMUS_REQUIRE_PRIVILEGED";

const CAP_SYS_ADMIN: u32 = 21;

/// How long a dropped [`CgroupGuard`] waits for the processes it killed to leave.
const CGROUP_DRAIN: Duration = Duration::from_secs(5);

/// Errors of the sandboxes; each names the cgroup, namespace or program involved.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The cgroup v2 mount could not be found.
    #[error(transparent)]
    Cgroup2(#[from] RedirectError),
    /// A cgroup name that would not be a direct child.
    #[error("invalid cgroup name {0:?}: must be one non-empty path component")]
    CgroupName(String),
    /// The cgroup directory could not be created.
    #[error("cannot create cgroup {cgroup}: {source}")]
    CreateCgroup {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A process could not be moved into the cgroup.
    #[error("cannot move pid {pid} into cgroup {cgroup}: {source}")]
    AddProcess {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The process.
        pid: u32,
        /// Why.
        source: io::Error,
    },
    /// The cgroup's process list could not be read.
    #[error("cannot read the processes of cgroup {cgroup}: {source}")]
    ReadProcesses {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The network namespace could not be created or set up.
    #[error("cannot create a network namespace ({step}): {source}")]
    CreateNetns {
        /// What failed: `unshare`, `lo up`, `open`.
        step: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A thread could not enter the network namespace.
    #[error("cannot enter network namespace {netns}: {source}")]
    EnterNetns {
        /// The namespace, as `net:[inode]`.
        netns: String,
        /// Why.
        source: io::Error,
    },
    /// A thread or a tokio runtime could not be started.
    #[error("cannot start the namespace thread or its runtime: {0}")]
    Thread(#[source] io::Error),
    /// A child process could not be started in the cgroup and namespace.
    #[error("cannot start {program} in cgroup {cgroup} and {netns}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The namespace, as `net:[inode]`.
        netns: String,
        /// Why.
        source: io::Error,
    },
}

/// A child cgroup of the cgroup v2 root, removed on drop after every process left in it is
/// killed (`cgroup.kill`).
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// Creates `<cgroup v2 mount>/<prefix>-<pid>-<n>`, unique within this process.
    pub fn create(prefix: &str) -> Result<Self, SandboxError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self::create_under(
            &cgroup2_mount()?,
            &format!("{prefix}-{}-{n}", std::process::id()),
        )
    }

    /// Creates the cgroup `name` under `parent` (a cgroup v2 directory).
    pub fn create_under(parent: &Path, name: &str) -> Result<Self, SandboxError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(SandboxError::CgroupName(name.to_owned()));
        }
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|source| SandboxError::CreateCgroup {
            cgroup: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), SandboxError> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string()).map_err(|source| {
            SandboxError::AddProcess {
                cgroup: self.path.clone(),
                pid,
                source,
            }
        })
    }

    /// The processes in this cgroup now.
    pub fn processes(&self) -> Result<Vec<u32>, SandboxError> {
        let procs = fs::read_to_string(self.path.join("cgroup.procs")).map_err(|source| {
            SandboxError::ReadProcesses {
                cgroup: self.path.clone(),
                source,
            }
        })?;
        Ok(procs
            .lines()
            .filter_map(|pid| pid.trim().parse().ok())
            .collect())
    }

    fn populated(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.events"))
            .map(|events| events.lines().any(|line| line == "populated 1"))
            .unwrap_or(false)
    }

    fn kill_all(&self) -> io::Result<()> {
        if self.path.join("cgroup.kill").exists() {
            return fs::write(self.path.join("cgroup.kill"), "1");
        }
        // Before Linux 5.14 there is no cgroup.kill: move the strays out so rmdir works.
        let parent_procs = self.path.parent().map(|p| p.join("cgroup.procs"));
        for pid in self.processes().map_err(io::Error::other)? {
            if let Some(parent_procs) = &parent_procs {
                fs::write(parent_procs, pid.to_string())?;
            }
        }
        Ok(())
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if self.populated()
            && let Err(error) = self.kill_all()
        {
            warn!(%error, cgroup = %self.path.display(), "cannot empty cgroup");
        }
        let deadline = Instant::now() + CGROUP_DRAIN;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                // EBUSY while killed processes are still exiting.
                Err(error)
                    if Instant::now() < deadline && error.raw_os_error() == Some(libc::EBUSY) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => {
                    warn!(%error, cgroup = %self.path.display(), "cannot remove cgroup");
                    return;
                }
            }
        }
    }
}

/// A private network namespace holding only `lo`, up: `127.0.0.1` and `::1` work, every other
/// destination is unreachable. It lives as long as this handle (or a process inside it).
#[derive(Debug)]
pub struct PrivateNetns {
    ns: File,
    name: String,
}

impl PrivateNetns {
    /// Creates the namespace (on a short-lived thread, so no thread of the caller moves).
    pub fn new() -> Result<Self, SandboxError> {
        let creator = std::thread::Builder::new()
            .name("netns-create".to_owned())
            .spawn(|| -> Result<File, SandboxError> {
                let step = |step, source| SandboxError::CreateNetns { step, source };
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| step("unshare", e.into()))?;
                set_loopback_up().map_err(|e| step("lo up", e))?;
                File::open("/proc/thread-self/ns/net").map_err(|e| step("open", e))
            })
            .map_err(SandboxError::Thread)?;
        let ns = match creator.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let name = fs::read_link(format!("/proc/self/fd/{}", ns.as_raw_fd()))
            .map(|link| link.display().to_string())
            .unwrap_or_else(|_| "a private network namespace".to_owned());
        Ok(Self { ns, name })
    }

    /// The namespace as `net:[inode]`, as `ls -l /proc/<pid>/ns/net` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread inside the namespace and returns its result; a panic in `f` is
    /// resumed on the caller's thread, so assertions inside work as usual.
    pub fn run<R, F>(&self, f: F) -> Result<R, SandboxError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, || {
                    setns(&self.ns, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        SandboxError::EnterNetns {
                            netns: self.name.clone(),
                            source: errno.into(),
                        }
                    })?;
                    Ok(f())
                })
                .map_err(SandboxError::Thread)?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future made by `f` on a current-thread tokio runtime inside the namespace.
    pub fn block_on<R, F, Fut>(&self, f: F) -> Result<R, SandboxError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        self.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(SandboxError::Thread)?;
            Ok(runtime.block_on(f()))
        })?
    }
}

impl AsFd for PrivateNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ns.as_fd()
    }
}

/// Starts `command` as a process that is in `cgroup` and `netns` before it runs a single
/// instruction of the program (so its first socket is already subject to the cgroup's hooks).
/// The process is not waited for; dropping the [`CgroupGuard`] kills it.
#[expect(unsafe_code, reason = "pre_exec runs code between fork and exec")]
pub fn spawn_in(
    command: &mut Command,
    cgroup: &Path,
    netns: &PrivateNetns,
) -> Result<Child, SandboxError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let spawn_error = |source| SandboxError::Spawn {
        program: program.clone(),
        cgroup: cgroup.to_owned(),
        netns: netns.name.clone(),
        source,
    };
    // Opened here, not in the child: between fork and exec only plain syscalls on descriptors
    // that already exist are safe.
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .map_err(spawn_error)?;
    let ns = netns.ns.try_clone().map_err(spawn_error)?;
    // SAFETY: the closure runs in the forked child before exec. It only calls write(2) and
    // setns(2) on descriptors opened before the fork (File::write is one write(2), nix::setns
    // one setns(2), and errors become io::Error from the errno, without allocating), so it
    // takes no lock another thread of the parent may have held at fork time.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process itself.
            (&procs).write_all(b"0")?;
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(())
        });
    }
    command.spawn().map_err(spawn_error)
}

/// Brings `lo` up in the calling thread's network namespace (SIOCGIFFLAGS + SIOCSIFFLAGS).
#[expect(unsafe_code, reason = "ioctl on a socket and a union field read")]
fn set_loopback_up() -> io::Result<()> {
    // Binding the wildcard address works before any interface is up.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut request = libc::ifreq {
        ifr_name: [0; libc::IFNAMSIZ],
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `request` is a valid, initialised ifreq naming "lo" (NUL-terminated, the rest of
    // the name is zero) and the socket is open for the duration of both calls; SIOCGIFFLAGS
    // writes `ifru_flags`, which is then read as the integer it is.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why this process cannot run the privileged tests, or `None`: the redirect's needs
/// ([`privileges_missing`]) plus CAP_SYS_ADMIN for network namespaces.
pub fn sandbox_privileges_missing() -> Option<String> {
    if let Some(why) = privileges_missing() {
        return Some(why);
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_ADMIN) == 0 {
        return Some(format!(
            "need CAP_SYS_ADMIN for network namespaces; CapEff={effective:#x}"
        ));
    }
    None
}

/// Whether a missing privilege fails a test instead of skipping it: `CI=true` (or `1`), or
/// `ISTHMUS_REQUIRE_PRIVILEGED=1` (or `true`). Set but empty counts as unset.
pub fn privileged_tests_required() -> bool {
    required_by(|name| std::env::var(name).ok())
}

fn required_by(env: impl Fn(&str) -> Option<String>) -> bool {
    let truthy = |name: &str| env(name).is_some_and(|v| v == "1" || v == "true");
    truthy("CI") || truthy(REQUIRE_PRIVILEGED_ENV)
}

/// The body of [`require_privileged!`](crate::require_privileged): `true` when the test
/// should return now (privileges missing, skip allowed; prints `SKIPPED <test>: why`); panics
/// when privileges are missing and [`privileged_tests_required`].
pub fn skip_unprivileged(test: &str) -> bool {
    let Some(why) = sandbox_privileges_missing() else {
        return false;
    };
    assert!(
        !privileged_tests_required(),
        "{test}: privileges missing and CI=true or {REQUIRE_PRIVILEGED_ENV}=1 forbids skipping: {why}"
    );
    eprintln!(
        "SKIPPED {test}: {why} (run as root, e.g. sudo -E cargo test; \
         CI=true or {REQUIRE_PRIVILEGED_ENV}=1 turns this skip into a failure)"
    );
    true
}

/// Returns from the calling test (after a `SKIPPED` line) when this process lacks the
/// privileges of the sandboxes and the redirect; fails it instead under `CI=true` or
/// `ISTHMUS_REQUIRE_PRIVILEGED=1`.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if $crate::sandbox::skip_unprivileged(
            ::std::thread::current()
                .name()
                .unwrap_or(::std::module_path!()),
        ) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn ci_or_the_variable_require_privileges_but_empty_does_not() {
        assert!(!required_by(env(&[])));
        assert!(required_by(env(&[("CI", "true")])));
        assert!(required_by(env(&[(REQUIRE_PRIVILEGED_ENV, "1")])));
        assert!(!required_by(env(&[(REQUIRE_PRIVILEGED_ENV, "")])));
        assert!(!required_by(env(&[
            ("CI", ""),
            (REQUIRE_PRIVILEGED_ENV, "0")
        ])));
        assert!(!required_by(env(&[("CI", "false")])));
    }

    #[test]
    fn cgroup_names_stay_one_component() {
        for name in ["", "a/b", "..", "."] {
            let error = CgroupGuard::create_under(Path::new("/nonexistent"), name).unwrap_err();
            assert!(
                matches!(error, SandboxError::CgroupName(_)),
                "{name}: {error}"
            );
        }
    }
}
