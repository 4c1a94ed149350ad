//! Workload attestation: who is calling, described as SPIRE-style `unix` selectors derived from
//! the kernel's account of the peer (`SO_PEERCRED`: uid, gid, pid) and what `/proc` and `/etc`
//! say about that process.
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:<n>`, `unix:gid:<n>` | the peer credentials |
//! | `unix:user:<name>`, `unix:group:<name>` | `/etc/passwd`, `/etc/group` (when listed there) |
//! | `unix:supplementary_gid:<n>`, `unix:supplementary_group:<name>` | `Groups:` of `/proc/<pid>/status` |
//! | `unix:path:<exe>` | the `/proc/<pid>/exe` link |
//! | `unix:cgroup:<path>` | the cgroup v2 line `0::<path>` of `/proc/<pid>/cgroup` |
//!
//! A selector the agent cannot read (another user's `/proc/<pid>/exe` when the agent is not
//! root, a cgroup v1-only host) is left out. Leaving one out can only make fewer entries match,
//! because an entry matches when *all* its selectors are among the workload's
//! ([`entry_matches`]), so attestation fails closed.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use isthmus_api::broker as pb;

/// The selector type every selector of this module carries.
pub const UNIX: &str = "unix";

/// A workload selector, `type:value` (for example `unix:uid:1000`), as registration entries
/// carry them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The selector type (`unix`, `k8s`, …).
    pub kind: String,
    /// The value, which may itself contain `:` (`uid:1000`).
    pub value: String,
}

impl Selector {
    /// A selector of any type.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// A `unix` selector, e.g. `Selector::unix("uid:1000")`.
    pub fn unix(value: impl Into<String>) -> Self {
        Self::new(UNIX, value)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl From<&pb::Selector> for Selector {
    fn from(s: &pb::Selector) -> Self {
        Self::new(s.r#type.clone(), s.value.clone())
    }
}

impl From<&Selector> for pb::Selector {
    fn from(s: &Selector) -> Self {
        Self {
            r#type: s.kind.clone(),
            value: s.value.clone(),
        }
    }
}

/// Whether a registration entry with `entry` selectors applies to a workload with `workload`
/// selectors: every selector of the entry must be among the workload's (SPIRE semantics). An
/// entry without selectors matches no workload (such entries identify the node's own
/// components, never a caller of the Workload API).
pub fn entry_matches(entry: &[Selector], workload: &[Selector]) -> bool {
    !entry.is_empty() && entry.iter().all(|s| workload.contains(s))
}

/// The kernel's account of a peer process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
    /// Process ID in the agent's PID namespace; `None` (or 0) when the kernel could not name it
    /// (the peer lives in a PID namespace the agent cannot see).
    pub pid: Option<i32>,
}

impl From<tokio::net::unix::UCred> for PeerCredentials {
    fn from(cred: tokio::net::unix::UCred) -> Self {
        Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        }
    }
}

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The process exited before it could be inspected.
    #[error("process {pid} is gone (no {path}): {source}")]
    ProcessGone {
        /// The peer's PID.
        pid: i32,
        /// The `/proc` directory looked for.
        path: PathBuf,
        /// The error reading it.
        source: io::Error,
    },
    /// The connection carries no peer credentials (not a Unix socket, or the kernel refused).
    #[error("no peer credentials on the connection")]
    NoCredentials,
}

/// Derives a caller's selectors from its credentials. The seam for other attestors
/// (Kubernetes pods, say) and for tests.
pub trait WorkloadAttestor: fmt::Debug + Send + Sync {
    /// The selectors of the process described by `creds`, sorted and without duplicates.
    fn attest(&self, creds: &PeerCredentials) -> Result<Vec<Selector>, AttestError>;
}

/// The `unix` attestor, reading `/proc` and `/etc` (or other roots, for tests).
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    etc_root: PathBuf,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::with_roots("/proc", "/etc")
    }
}

/// The `unix` selectors of the process described by `creds`, read from `/proc` and `/etc`.
/// Usable for any process the agent identified by other means, such as the owner of a
/// redirected TCP connection.
pub fn selectors_for(creds: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
    UnixAttestor::default().attest(creds)
}

impl UnixAttestor {
    /// An attestor reading `<proc_root>/<pid>/…` and `<etc_root>/passwd`, `<etc_root>/group`.
    pub fn with_roots(proc_root: impl Into<PathBuf>, etc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            etc_root: etc_root.into(),
        }
    }

    fn process_selectors(
        &self,
        pid: i32,
        selectors: &mut BTreeSet<Selector>,
    ) -> Result<(), AttestError> {
        let dir = self.proc_root.join(pid.to_string());
        std::fs::metadata(&dir).map_err(|source| AttestError::ProcessGone {
            pid,
            path: dir.clone(),
            source,
        })?;
        match std::fs::read_link(dir.join("exe")) {
            Ok(exe) => {
                selectors.insert(Selector::unix(format!("path:{}", exe.display())));
            }
            Err(e) => tracing::debug!(pid, error = %e, "cannot read the executable path"),
        }
        match std::fs::read_to_string(dir.join("cgroup")) {
            Ok(text) => {
                if let Some(path) = cgroup_v2_path(&text) {
                    selectors.insert(Selector::unix(format!("cgroup:{path}")));
                }
            }
            Err(e) => tracing::debug!(pid, error = %e, "cannot read the cgroup"),
        }
        match std::fs::read_to_string(dir.join("status")) {
            Ok(text) => {
                for gid in supplementary_gids(&text) {
                    selectors.insert(Selector::unix(format!("supplementary_gid:{gid}")));
                    if let Some(name) = self.group_name(gid) {
                        selectors.insert(Selector::unix(format!("supplementary_group:{name}")));
                    }
                }
            }
            Err(e) => tracing::debug!(pid, error = %e, "cannot read the process status"),
        }
        Ok(())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        name_for_id(&self.etc_root.join("passwd"), uid)
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        name_for_id(&self.etc_root.join("group"), gid)
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn attest(&self, creds: &PeerCredentials) -> Result<Vec<Selector>, AttestError> {
        let mut selectors = BTreeSet::new();
        selectors.insert(Selector::unix(format!("uid:{}", creds.uid)));
        selectors.insert(Selector::unix(format!("gid:{}", creds.gid)));
        if let Some(name) = self.user_name(creds.uid) {
            selectors.insert(Selector::unix(format!("user:{name}")));
        }
        if let Some(name) = self.group_name(creds.gid) {
            selectors.insert(Selector::unix(format!("group:{name}")));
        }
        if let Some(pid) = creds.pid.filter(|pid| *pid > 0) {
            self.process_selectors(pid, &mut selectors)?;
        }
        Ok(selectors.into_iter().collect())
    }
}

/// The path of the cgroup v2 line (`0::/path`) of a `/proc/<pid>/cgroup` document.
fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|path| !path.is_empty())
}

/// The supplementary group IDs of a `/proc/<pid>/status` document.
fn supplementary_gids(text: &str) -> Vec<u32> {
    text.lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The name of the first line of a passwd- or group-format file whose third field is `id`.
fn name_for_id(file: &Path, id: u32) -> Option<String> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            tracing::debug!(file = %file.display(), error = %e, "cannot read the account database");
            return None;
        }
    };
    let id = id.to_string();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            (fields.next()? == id && !name.is_empty()).then(|| name.to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(selectors: &[Selector], value: &str) -> bool {
        selectors.contains(&Selector::unix(value))
    }

    #[tokio::test]
    async fn the_test_process_attests_itself_over_a_socket_pair() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let creds = PeerCredentials::from(a.peer_cred().unwrap());
        assert_eq!(creds.pid, Some(i32::try_from(std::process::id()).unwrap()));
        let selectors = selectors_for(&creds).unwrap();
        assert!(
            has(&selectors, &format!("uid:{}", creds.uid)),
            "{selectors:?}"
        );
        assert!(
            has(&selectors, &format!("gid:{}", creds.gid)),
            "{selectors:?}"
        );
        let exe = std::env::current_exe().unwrap();
        assert!(
            has(&selectors, &format!("path:{}", exe.display())),
            "{selectors:?}"
        );
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        if let Some(path) = cgroup_v2_path(&cgroup) {
            assert!(has(&selectors, &format!("cgroup:{path}")), "{selectors:?}");
        }
        // uid 0 is "root" in every passwd file we run on.
        if creds.uid == 0 {
            assert!(has(&selectors, "user:root"), "{selectors:?}");
        }
        let mut sorted = selectors.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, selectors);
    }

    #[test]
    fn selectors_from_fake_proc_and_etc() {
        let root = std::env::temp_dir().join(format!("isthmus-attest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc_dir = root.join("proc/4242");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/echo-server", proc_dir.join("exe")).unwrap();
        std::fs::write(
            proc_dir.join("cgroup"),
            "12:cpu:/legacy\n0::/kubepods/pod1/ctr\n",
        )
        .unwrap();
        std::fs::write(
            proc_dir.join("status"),
            "Name:\techo\nUid:\t1000\t1000\t1000\t1000\nGroups:\t27 1001 \n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "# comment\nroot:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nsudo:x:27:alice\nalice:x:1000:\n",
        )
        .unwrap();
        let attestor = UnixAttestor::with_roots(root.join("proc"), root.join("etc"));
        let creds = PeerCredentials {
            uid: 1000,
            gid: 1000,
            pid: Some(4242),
        };
        let got: Vec<String> = attestor
            .attest(&creds)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "unix:cgroup:/kubepods/pod1/ctr",
                "unix:gid:1000",
                "unix:group:alice",
                "unix:path:/usr/bin/echo-server",
                "unix:supplementary_gid:1001",
                "unix:supplementary_gid:27",
                "unix:supplementary_group:sudo",
                "unix:uid:1000",
                "unix:user:alice",
            ]
        );
        // A process that is gone cannot be attested; no pid gives the credential selectors.
        let gone = attestor.attest(&PeerCredentials {
            pid: Some(4243),
            ..creds
        });
        assert!(matches!(
            gone,
            Err(AttestError::ProcessGone { pid: 4243, .. })
        ));
        let no_pid = attestor
            .attest(&PeerCredentials { pid: None, ..creds })
            .unwrap();
        assert_eq!(no_pid.len(), 4, "{no_pid:?}");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn entries_match_when_all_their_selectors_are_present() {
        let workload = [Selector::unix("gid:10"), Selector::unix("uid:1000")];
        assert!(entry_matches(&[Selector::unix("uid:1000")], &workload));
        assert!(entry_matches(&workload, &workload));
        assert!(!entry_matches(
            &[Selector::unix("uid:1000"), Selector::unix("gid:11")],
            &workload
        ));
        assert!(!entry_matches(
            &[Selector::new("k8s", "uid:1000")],
            &workload
        ));
        assert!(!entry_matches(&[], &workload));
    }
}
