//! Transparent mode: eBPF programs on a cgroup v2 send TCP connects aimed at global-service VIPs
//! to the agent's listener, and tell the agent which VIP each accepted connection was for.
//!
//! The programs live in `bpf/redirect.bpf.c`; the object built from it by `bpf/build.sh` is
//! committed beside it and embedded here, so building the agent needs no clang. [`Redirector`]
//! loads it, attaches every program to one cgroup with a `bpf_link` (so they go away with the
//! agent, however it exits), and keeps the VIP map in step with the catalog.
//!
//! Every address crosses into BPF in IPv6 form, IPv4 as `::ffff:a.b.c.d`: an IPv4 VIP dialled
//! from a dual-stack IPv6 socket is then the same map key as from an IPv4 socket.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{HashMap, MapData, MapError, MapType};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, fstatfs};
use tracing::{debug, warn};

/// The compiled programs, built from `bpf/redirect.bpf.c` by `bpf/build.sh` (`.ci/run` checks
/// that the committed object matches its source).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/redirect.bpf.o");

/// Where [`Redirector::attach`] keeps its per-cgroup lock files.
pub const DEFAULT_LOCK_DIR: &str = "/run/isthmus/redirect";

/// Entries of the VIP map (`max_entries` of `isthmus_vips` in the C source).
pub const VIP_CAPACITY: usize = 16384;

const VIPS_MAP: &str = "isthmus_vips";
const TUPLES_MAP: &str = "isthmus_tuples";

/// The programs in attach order: sockops and getpeername before the connect hooks, so that no
/// connect is redirected before its original destination can be recorded and reported.
const PROGRAMS: [(&str, Hook); 5] = [
    ("isthmus_sockops", Hook::SockOps),
    ("isthmus_peer4", Hook::SockAddr),
    ("isthmus_peer6", Hook::SockAddr),
    ("isthmus_conn4", Hook::SockAddr),
    ("isthmus_conn6", Hook::SockAddr),
];

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SockOps,
}

/// Errors of the transparent-mode redirect; each names the cgroup, program or map involved.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// `/proc/mounts` could not be read.
    #[error("cannot read /proc/mounts: {0}")]
    ReadMounts(#[source] io::Error),
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup2 filesystem in /proc/mounts (transparent mode needs cgroup v2)")]
    NoCgroup2Mount,
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {cgroup}: {source}")]
    OpenCgroup {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path is not a directory of a cgroup v2 filesystem.
    #[error("{cgroup} is not a cgroup v2 directory (filesystem type {fs_type:#x})")]
    NotCgroup2 {
        /// The path given as the cgroup.
        cgroup: PathBuf,
        /// The filesystem magic found there.
        fs_type: i64,
    },
    /// Another agent holds the lock of this cgroup: it already redirects it.
    #[error("cgroup {cgroup} is already redirected by another agent ({holder}; lock {lock})")]
    AlreadyRedirected {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The lock file held by the other agent.
        lock: PathBuf,
        /// What the holder wrote in the lock file (its pid).
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock {lock} for cgroup {cgroup}: {source}")]
    Lock {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The agent address cannot be redirected to.
    #[error("invalid agent address {agent}: {reason}")]
    InvalidAgent {
        /// The address given.
        agent: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A VIP cannot be redirected.
    #[error("invalid VIP {vip}: {reason}")]
    InvalidVip {
        /// The VIP given.
        vip: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An IPv4 VIP with an IPv6 agent address: an IPv4 socket cannot be sent to it.
    #[error("VIP {vip} is IPv4 but the agent listens on IPv6 {agent}; give an IPv4 agent address")]
    AgentFamily {
        /// The IPv4 VIP.
        vip: SocketAddr,
        /// The IPv6 agent address.
        agent: SocketAddr,
    },
    /// More VIPs than the map holds.
    #[error("{count} VIPs for cgroup {cgroup}, more than map {VIPS_MAP} holds ({VIP_CAPACITY})")]
    TooManyVips {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// How many VIPs were asked for.
        count: usize,
    },
    /// The embedded object could not be parsed or its maps created.
    #[error("cannot load the redirect BPF object: {0}")]
    LoadObject(#[source] Box<aya::EbpfError>),
    /// A program is missing from the embedded object or has another type.
    #[error("BUG: program {program} missing from bpf/redirect.bpf.o or of the wrong type")]
    MissingProgram {
        /// The program name.
        program: &'static str,
    },
    /// A map is missing from the embedded object or has another type or layout.
    #[error(
        "BUG: map {map} missing from bpf/redirect.bpf.o or not the expected hash map: {source}"
    )]
    BadMap {
        /// The map name.
        map: &'static str,
        /// Why.
        source: Box<MapError>,
    },
    /// The kernel refused a program (the verifier log is in the source).
    #[error("cannot load program {program}: {source}")]
    LoadProgram {
        /// The program name.
        program: &'static str,
        /// The error, with the verifier log when the verifier refused it.
        source: Box<ProgramError>,
    },
    /// A program could not be attached to the cgroup.
    #[error("cannot attach program {program} to cgroup {cgroup}: {source}")]
    AttachProgram {
        /// The program name.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: Box<ProgramError>,
    },
    /// A VIP could not be written to or removed from the map.
    #[error("cannot {action} VIP {vip} in map {VIPS_MAP} (cgroup {cgroup}): {source}")]
    UpdateVip {
        /// `add` or `remove`.
        action: &'static str,
        /// The VIP.
        vip: SocketAddr,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// Why.
        source: Box<MapError>,
    },
}

/// A program of the redirect attached to the cgroup, as the kernel knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    /// The program name (`isthmus_conn4`, ...), as `bpftool cgroup show` prints it.
    pub name: &'static str,
    /// The kernel's program id.
    pub id: u32,
}

enum LinkId {
    SockAddr(CgroupSockAddrLinkId),
    SockOps(SockOpsLinkId),
}

/// The transparent-mode redirect of one cgroup v2: its programs stay attached while this value
/// lives; dropping it detaches them (so does the agent's exit, however it exits).
pub struct Redirector {
    cgroup: PathBuf,
    agent: SocketAddr,
    vips: BTreeSet<SocketAddr>,
    vip_map: HashMap<MapData, BpfAddr, BpfAddr>,
    tuple_map: HashMap<MapData, BpfAddr, BpfAddr>,
    programs: Vec<AttachedProgram>,
    links: Vec<(&'static str, LinkId)>,
    // Declared after everything that refers to it and before the lock, so the programs are gone
    // before another agent can take the cgroup.
    ebpf: Ebpf,
    _lock: CgroupLock,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
            .field("agent", &self.agent)
            .field("vips", &self.vips)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// Loads the programs and attaches them to `cgroup` (a cgroup v2 directory), redirecting to
    /// `agent` (the agent's listener; an IPv4 address serves IPv4 and IPv6 clients). No VIP is
    /// redirected until [`Redirector::set_vips`]. Fails with
    /// [`RedirectError::AlreadyRedirected`] when another agent redirects the same cgroup.
    pub fn attach(cgroup: &Path, agent: SocketAddr) -> Result<Self, RedirectError> {
        Self::attach_with_lock_dir(cgroup, agent, Path::new(DEFAULT_LOCK_DIR))
    }

    /// [`Redirector::attach`] with the lock files in `lock_dir` instead of [`DEFAULT_LOCK_DIR`].
    ///
    /// One agent per cgroup is enforced by an exclusive `flock` on `<lock_dir>/cgroup-<inode>.lock`,
    /// taken before anything is loaded: unlike asking the kernel which programs the cgroup has
    /// (check, then attach), the lock leaves no window in which two agents both attach, and the
    /// kernel drops it when the agent dies, together with its `bpf_link`s, so it never goes
    /// stale. Agents must share `lock_dir` (a DaemonSet mounts the host's `/run/isthmus`).
    pub fn attach_with_lock_dir(
        cgroup: &Path,
        agent: SocketAddr,
        lock_dir: &Path,
    ) -> Result<Self, RedirectError> {
        let agent = canonical(agent);
        if agent.port() == 0 {
            return Err(RedirectError::InvalidAgent {
                agent,
                reason: "port 0",
            });
        }
        if agent.ip().is_unspecified() {
            return Err(RedirectError::InvalidAgent {
                agent,
                reason: "unspecified address; give the address the agent listens on",
            });
        }
        let cgroup_dir = File::open(cgroup).map_err(|source| RedirectError::OpenCgroup {
            cgroup: cgroup.to_owned(),
            source,
        })?;
        let fs_type = fstatfs(&cgroup_dir)
            .map_err(|errno| RedirectError::OpenCgroup {
                cgroup: cgroup.to_owned(),
                source: errno.into(),
            })?
            .filesystem_type();
        if fs_type != CGROUP2_SUPER_MAGIC {
            return Err(RedirectError::NotCgroup2 {
                cgroup: cgroup.to_owned(),
                fs_type: fs_type.0,
            });
        }
        let inode = cgroup_dir
            .metadata()
            .map_err(|source| RedirectError::OpenCgroup {
                cgroup: cgroup.to_owned(),
                source,
            })?
            .ino();
        let lock = CgroupLock::acquire(cgroup, inode, lock_dir)?;

        let mut ebpf =
            Ebpf::load(BPF_OBJECT).map_err(|e| RedirectError::LoadObject(Box::new(e)))?;
        let vip_map = take_hash_map(&mut ebpf, VIPS_MAP)?;
        let tuple_map = take_hash_map(&mut ebpf, TUPLES_MAP)?;
        let mut programs = Vec::with_capacity(PROGRAMS.len());
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for (name, hook) in PROGRAMS {
            let (id, link) = load_and_attach(&mut ebpf, name, hook, cgroup, &cgroup_dir)?;
            programs.push(AttachedProgram { name, id });
            links.push((name, link));
        }
        debug!(cgroup = %cgroup.display(), %agent, ?programs, "redirect attached");
        Ok(Self {
            cgroup: cgroup.to_owned(),
            agent,
            vips: BTreeSet::new(),
            vip_map,
            tuple_map,
            programs,
            links,
            ebpf,
            _lock: lock,
        })
    }

    /// The cgroup this redirect is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The address connects to VIPs are sent to.
    pub fn agent(&self) -> SocketAddr {
        self.agent
    }

    /// The attached programs with their kernel ids.
    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    /// The VIPs redirected now, in canonical form (see [`Redirector::set_vips`]).
    pub fn vips(&self) -> &BTreeSet<SocketAddr> {
        &self.vips
    }

    /// Makes `vips` the redirected set: new VIPs are added and VIPs not in it are removed, so
    /// connects already made are untouched and new ones follow the catalog at once. Addresses
    /// are taken in canonical form: `[::ffff:a.b.c.d]:p` is the IPv4 VIP `a.b.c.d:p`, which
    /// covers IPv4 sockets and IPv6 sockets dialling `::ffff:a.b.c.d`. Every VIP is checked
    /// before the map is touched; a map failure part-way leaves [`Redirector::vips`] exact.
    pub fn set_vips(&mut self, vips: &BTreeSet<SocketAddr>) -> Result<(), RedirectError> {
        let wanted: BTreeSet<SocketAddr> = vips.iter().copied().map(canonical).collect();
        if wanted.len() > VIP_CAPACITY {
            return Err(RedirectError::TooManyVips {
                cgroup: self.cgroup.clone(),
                count: wanted.len(),
            });
        }
        for vip in &wanted {
            self.check_vip(*vip)?;
        }
        let gone: Vec<SocketAddr> = self.vips.difference(&wanted).copied().collect();
        for vip in gone {
            self.remove_canonical(vip)?;
        }
        for vip in wanted {
            if !self.vips.contains(&vip) {
                self.insert_canonical(vip)?;
            }
        }
        Ok(())
    }

    /// Redirects `vip` (canonical form as in [`Redirector::set_vips`]); adding it twice is a
    /// no-op.
    pub fn add_vip(&mut self, vip: SocketAddr) -> Result<(), RedirectError> {
        let vip = canonical(vip);
        self.check_vip(vip)?;
        if self.vips.contains(&vip) {
            return Ok(());
        }
        if self.vips.len() >= VIP_CAPACITY {
            return Err(RedirectError::TooManyVips {
                cgroup: self.cgroup.clone(),
                count: self.vips.len() + 1,
            });
        }
        self.insert_canonical(vip)
    }

    /// Stops redirecting `vip`; removing an absent VIP is a no-op.
    pub fn remove_vip(&mut self, vip: SocketAddr) -> Result<(), RedirectError> {
        let vip = canonical(vip);
        if !self.vips.contains(&vip) {
            return Ok(());
        }
        self.remove_canonical(vip)
    }

    /// The VIP a client dialled, from the peer address of a connection the agent accepted
    /// (IPv4, or `::ffff:a.b.c.d` when the agent listens on `[::]`). An IPv4 VIP is returned
    /// as [`SocketAddr::V4`] even when the client dialled `::ffff:a.b.c.d` from an IPv6
    /// socket; an IPv6 VIP as [`SocketAddr::V6`] with no scope. `None` when the connection was
    /// not redirected by this cgroup's programs.
    pub fn original_destination(&self, client: SocketAddr) -> Option<SocketAddr> {
        match self.tuple_map.get(&BpfAddr::new(client), 0) {
            Ok(vip) => Some(vip.socket_addr()),
            Err(MapError::KeyNotFound) => None,
            Err(error) => {
                warn!(%error, %client, map = TUPLES_MAP, cgroup = %self.cgroup.display(),
                    "original destination lookup failed");
                None
            }
        }
    }

    fn check_vip(&self, vip: SocketAddr) -> Result<(), RedirectError> {
        if vip.port() == 0 {
            return Err(RedirectError::InvalidVip {
                vip,
                reason: "port 0",
            });
        }
        if vip.ip().is_unspecified() || vip.ip().is_loopback() {
            return Err(RedirectError::InvalidVip {
                vip,
                reason: "unspecified or loopback address",
            });
        }
        if vip.is_ipv4() && !self.agent.is_ipv4() {
            return Err(RedirectError::AgentFamily {
                vip,
                agent: self.agent,
            });
        }
        Ok(())
    }

    fn insert_canonical(&mut self, vip: SocketAddr) -> Result<(), RedirectError> {
        self.vip_map
            .insert(BpfAddr::new(vip), BpfAddr::new(self.agent), 0)
            .map_err(|source| RedirectError::UpdateVip {
                action: "add",
                vip,
                cgroup: self.cgroup.clone(),
                source: Box::new(source),
            })?;
        self.vips.insert(vip);
        Ok(())
    }

    fn remove_canonical(&mut self, vip: SocketAddr) -> Result<(), RedirectError> {
        match self.vip_map.remove(&BpfAddr::new(vip)) {
            Ok(()) | Err(MapError::KeyNotFound) => {
                self.vips.remove(&vip);
                Ok(())
            }
            Err(source) => Err(RedirectError::UpdateVip {
                action: "remove",
                vip,
                cgroup: self.cgroup.clone(),
                source: Box::new(source),
            }),
        }
    }
}

impl Drop for Redirector {
    /// Detaches the connect hooks first (the reverse of attach order), so no connect is
    /// redirected once sockops and getpeername are gone. Closing the links is what detaches;
    /// aya would do it when `ebpf` drops, but silently.
    fn drop(&mut self) {
        for (name, link) in self.links.drain(..).rev() {
            let result = match (self.ebpf.program_mut(name), link) {
                (Some(aya::programs::Program::CgroupSockAddr(program)), LinkId::SockAddr(id)) => {
                    program.detach(id)
                }
                (Some(aya::programs::Program::SockOps(program)), LinkId::SockOps(id)) => {
                    program.detach(id)
                }
                _ => {
                    warn!(program = name, "BUG: attached program not found at detach");
                    continue;
                }
            };
            if let Err(error) = result {
                warn!(%error, program = name, cgroup = %self.cgroup.display(), "detach failed");
            }
        }
        debug!(cgroup = %self.cgroup.display(), "redirect detached");
    }
}

fn take_hash_map(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, BpfAddr, BpfAddr>, RedirectError> {
    let map = ebpf.take_map(name).ok_or(RedirectError::BadMap {
        map: name,
        source: Box::new(MapError::InvalidName {
            name: name.to_owned(),
        }),
    })?;
    HashMap::try_from(map).map_err(|source| RedirectError::BadMap {
        map: name,
        source: Box::new(source),
    })
}

fn load_and_attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    hook: Hook,
    cgroup: &Path,
    cgroup_dir: &File,
) -> Result<(u32, LinkId), RedirectError> {
    let missing = RedirectError::MissingProgram { program: name };
    let load_error = |source| RedirectError::LoadProgram {
        program: name,
        source: Box::new(source),
    };
    let attach_error = |source| RedirectError::AttachProgram {
        program: name,
        cgroup: cgroup.to_owned(),
        source: Box::new(source),
    };
    let program = ebpf.program_mut(name).ok_or(missing)?;
    // bpf_link attachments: flags must be 0 ("Single"); the kernel still lets several links
    // share a cgroup hook, which is why a second agent is kept out by the lock instead.
    match hook {
        Hook::SockAddr => {
            let program: &mut CgroupSockAddr = program
                .try_into()
                .map_err(|_| RedirectError::MissingProgram { program: name })?;
            program.load().map_err(load_error)?;
            let id = program.info().map_err(load_error)?.id();
            let link = program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            Ok((id, LinkId::SockAddr(link)))
        }
        Hook::SockOps => {
            let program: &mut SockOps = program
                .try_into()
                .map_err(|_| RedirectError::MissingProgram { program: name })?;
            program.load().map_err(load_error)?;
            let id = program.info().map_err(load_error)?.id();
            let link = program
                .attach(cgroup_dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            Ok((id, LinkId::SockOps(link)))
        }
    }
}

/// An address as the BPF programs hold it: IPv6 form (IPv4 as `::ffff:a.b.c.d`), address and
/// port in network byte order. Mirrors `struct isthmus_addr` in `bpf/redirect.bpf.c`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BpfAddr {
    ip6: [u32; 4],
    port: u16,
    pad: u16,
}

// SAFETY: `BpfAddr` is `repr(C)`, all fields are integers (any bit pattern is valid) and there
// is no implicit padding (16 + 2 + 2 bytes, 4-byte aligned), so it can be copied to and from
// the kernel as plain bytes.
#[expect(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait for BPF map keys/values"
)]
unsafe impl aya::Pod for BpfAddr {}

impl BpfAddr {
    fn new(addr: SocketAddr) -> Self {
        let ip6 = match addr.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(ip) => ip,
        };
        let octets = ip6.octets();
        let word =
            |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
        Self {
            ip6: [word(0), word(4), word(8), word(12)],
            port: addr.port().to_be(),
            pad: 0,
        }
    }

    fn socket_addr(self) -> SocketAddr {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(self.ip6) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let ip = Ipv6Addr::from(octets);
        let port = u16::from_be(self.port);
        match ip.to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
            None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
        }
    }
}

/// The form the maps compare: `[::ffff:a.b.c.d]:p` becomes `a.b.c.d:p`; flow info and scope
/// are dropped.
fn canonical(addr: SocketAddr) -> SocketAddr {
    BpfAddr::new(addr).socket_addr()
}

/// The exclusive lock that makes an agent the only one redirecting a cgroup.
struct CgroupLock {
    path: PathBuf,
    _file: Flock<File>,
}

impl CgroupLock {
    const ATTEMPTS: usize = 8;

    fn acquire(cgroup: &Path, inode: u64, dir: &Path) -> Result<Self, RedirectError> {
        let path = dir.join(format!("cgroup-{inode}.lock"));
        let lock_error = |source| RedirectError::Lock {
            cgroup: cgroup.to_owned(),
            lock: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(lock_error)?;
        for _ in 0..Self::ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(lock_error)?;
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(file) => file,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut holder = String::new();
                    // Best effort: the holder may be writing its pid right now.
                    let _partial = file.read_to_string(&mut holder);
                    let holder = match holder.trim() {
                        "" => "pid unknown".to_owned(),
                        pid => format!("pid {pid}"),
                    };
                    return Err(RedirectError::AlreadyRedirected {
                        cgroup: cgroup.to_owned(),
                        lock: path,
                        holder,
                    });
                }
                Err((_, errno)) => return Err(lock_error(errno.into())),
            };
            // A holder unlinks the file before it unlocks. If that happened between our open
            // and our lock, we hold a file nobody else will open: start again.
            let held = file.metadata().map_err(lock_error)?.ino();
            match fs::metadata(&path) {
                Ok(current) if current.ino() == held => {}
                Ok(_) => continue,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(lock_error(error)),
            }
            file.set_len(0).map_err(lock_error)?;
            writeln!(*file, "{}", std::process::id()).map_err(lock_error)?;
            return Ok(Self { path, _file: file });
        }
        Err(lock_error(io::Error::other(
            "the lock file kept being replaced while locking it",
        )))
    }
}

impl Drop for CgroupLock {
    fn drop(&mut self) {
        // Unlinked while still held (the flock is released after this, when the file drops):
        // see the inode check in `acquire`.
        if let Err(error) = fs::remove_file(&self.path) {
            warn!(%error, lock = %self.path.display(), "cannot remove lock file");
        }
    }
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/mounts` (`/sys/fs/cgroup` on a
/// pure-v2 host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf, RedirectError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(RedirectError::ReadMounts)?;
    parse_cgroup2_mount(&mounts).ok_or(RedirectError::NoCgroup2Mount)
}

/// The first `cgroup2` mount point in a `/proc/mounts` text, with its octal escapes decoded.
fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        (fs_type == "cgroup2").then(|| PathBuf::from(unescape_mount_field(mount_point)))
    })
}

/// `/proc/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = (d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0');
                out.push(value);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why this process cannot run the redirect, or `None` when it can: it needs CAP_BPF (or
/// CAP_SYS_ADMIN) and CAP_NET_ADMIN, a cgroup v2 mount, and a BPF map creation that really
/// succeeds (capabilities inside a user namespace look complete but do not count for BPF).
pub fn privileges_missing() -> Option<String> {
    let status = match fs::read_to_string("/proc/self/status") {
        Ok(status) => status,
        Err(error) => return Some(format!("cannot read /proc/self/status: {error}")),
    };
    let Some(effective) = parse_cap_eff(&status) else {
        return Some("no CapEff line in /proc/self/status".to_owned());
    };
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) || !has(CAP_NET_ADMIN) {
        return Some(format!(
            "need CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; euid={} CapEff={effective:#x}",
            nix::unistd::geteuid()
        ));
    }
    if let Err(error) = cgroup2_mount() {
        return Some(error.to_string());
    }
    match aya::sys::is_map_supported(MapType::Hash) {
        Ok(true) => None,
        Ok(false) => Some("the kernel does not support BPF hash maps".to_owned()),
        Err(error) => Some(format!(
            "bpf(BPF_MAP_CREATE) probe failed: {} (in a user namespace capabilities do not count)",
            error.io_error
        )),
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_addr_is_ipv6_form_in_network_order() {
        let addr = BpfAddr::new("10.96.0.10:80".parse().unwrap());
        let bytes: Vec<u8> = addr.ip6.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(addr.port.to_ne_bytes(), [0, 80]);
        assert_eq!(std::mem::size_of::<BpfAddr>(), 20);
    }

    #[test]
    fn canonical_form_folds_v4_mapped_into_v4() {
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
        assert_eq!(canonical(mapped), "10.96.0.10:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::10%3]:443".parse().unwrap();
        assert_eq!(canonical(v6), "[fd00::10]:443".parse().unwrap());
        for addr in ["10.1.2.3:9", "[fd00::1]:1", "[::ffff:1.2.3.4]:5"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(BpfAddr::new(addr).socket_addr(), canonical(addr));
        }
    }

    #[test]
    fn finds_the_cgroup2_mount_hybrid_and_pure() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "none /mnt/my\\040cgroups cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tcargo\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

    #[test]
    fn the_embedded_object_names_every_program_and_map() {
        let names = PROGRAMS
            .iter()
            .map(|(name, _)| *name)
            .chain([VIPS_MAP, TUPLES_MAP]);
        for name in names {
            let found = BPF_OBJECT
                .windows(name.len() + 1)
                .any(|w| w[..name.len()] == *name.as_bytes() && w[name.len()] == 0);
            assert!(found, "{name} not in bpf/redirect.bpf.o");
        }
    }
}
