//! Who is on the other end of a TCP connection the agent accepted from this host: the socket
//! is looked up by its exact address pair with a `NETLINK_SOCK_DIAG` query (`inet_diag`, in the
//! calling thread's network namespace), which gives its owner's uid and inode; the process
//! holding that inode is found under `/proc/<pid>/fd`, and its gid under `/proc/<pid>/status`.
//! If netlink is unusable (no `inet_diag`, `EPERM`, ...) the socket is searched in
//! `/proc/thread-self/net/tcp{,6}` instead. The result feeds the same selector attestation as
//! the Workload API's `SO_PEERCRED`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::attest::PeerCredentials;

/// Why a TCP peer could not be named.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No socket of this host has the address pair (the peer is remote, or already gone).
    #[error("no local socket {client} -> {server} in {table}")]
    NotLocal {
        /// The peer's address.
        client: SocketAddr,
        /// Our end.
        server: SocketAddr,
        /// The tables searched.
        table: String,
    },
    /// The socket exists but no visible process holds it.
    #[error("no process holds socket inode {inode} ({client} -> {server})")]
    NoProcess {
        /// The socket's inode.
        inode: u64,
        /// The peer's address.
        client: SocketAddr,
        /// Our end.
        server: SocketAddr,
    },
    /// A /proc file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The credentials of the process that owns the client end (`client` -> `server`) of a TCP
/// connection on this host.
pub fn tcp_peer(client: SocketAddr, server: SocketAddr) -> Result<PeerCredentials, PeerError> {
    tcp_peer_in(Path::new("/proc"), client, server)
}

/// [`tcp_peer`] with another procfs root (tests). The socket itself is looked up with
/// `sock_diag` netlink, which does not depend on the procfs root; only when netlink fails is
/// `<proc_root>/thread-self/net/tcp{,6}` read.
pub fn tcp_peer_in(
    proc_root: &Path,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<PeerCredentials, PeerError> {
    let (uid, inode) = match diag::lookup(client, server) {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(PeerError::NotLocal {
                client,
                server,
                table: "sock_diag netlink".to_owned(),
            });
        }
        Err(error) => {
            tracing::debug!(
                %error, %client, %server,
                "sock_diag netlink lookup failed, scanning /proc/thread-self/net/tcp{{,6}}"
            );
            proc_table_lookup(proc_root, client, server)?
        }
    };
    let pid = find_holder(proc_root, inode).ok_or(PeerError::NoProcess {
        inode,
        client,
        server,
    })?;
    let gid = process_gid(proc_root, pid).unwrap_or(uid);
    Ok(PeerCredentials {
        uid,
        gid,
        pid: i32::try_from(pid).ok(),
    })
}

/// (uid, inode) of the client socket from the `/proc/thread-self/net/tcp{,6}` tables (the
/// slow path: the kernel prints every socket of the namespace).
fn proc_table_lookup(
    proc_root: &Path,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<(u32, u64), PeerError> {
    let net = proc_root.join("thread-self/net");
    let mut searched = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = net.join(table);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(PeerError::Read { path, source }),
        };
        searched.push(path.display().to_string());
        if let Some(found) = find_socket(&text, client, server) {
            return Ok(found);
        }
    }
    Err(PeerError::NotLocal {
        client,
        server,
        table: searched.join(", "),
    })
}

/// Exact socket lookup with `NETLINK_SOCK_DIAG` (`SOCK_DIAG_BY_FAMILY` with an
/// `inet_diag_req_v2` naming one socket), messages built and parsed by hand. The netlink
/// socket belongs to the network namespace of the thread that creates it, so the lookup runs
/// in the caller's namespace, like `/proc/thread-self/net/tcp`.
mod diag {
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::OnceLock;

    use nix::errno::Errno;
    use nix::sys::socket::{
        self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
    };
    use nix::sys::time::{TimeVal, TimeValLike};

    /// `linux/sock_diag.h`.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    /// `linux/netlink.h`.
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_HDRLEN: usize = 16;
    /// `sizeof(struct nlmsghdr) + sizeof(struct inet_diag_req_v2)` (16 + 56).
    const REQUEST_LEN: u32 = 72;
    /// `sizeof(struct inet_diag_msg)`; `idiag_uid` and `idiag_inode` are its last two words.
    const DIAG_MSG_LEN: usize = 72;
    const UID_OFFSET: usize = 64;
    const INODE_OFFSET: usize = 68;
    /// `AF_INET`, `AF_INET6`, `IPPROTO_TCP` as the request's `u8` fields.
    pub(super) const AF_INET: u8 = 2;
    pub(super) const AF_INET6: u8 = 10;
    const IPPROTO_TCP: u8 = 6;
    /// `INET_DIAG_NOCOOKIE`.
    const NO_COOKIE: u32 = u32::MAX;

    /// Why netlink could not answer (the caller falls back to `/proc`).
    #[derive(Debug, thiserror::Error)]
    pub(super) enum DiagError {
        /// A system call failed, or the kernel answered with this error.
        #[error("sock_diag netlink: {0}")]
        Sys(#[from] Errno),
        /// The kernel's reply could not be parsed.
        #[error("malformed sock_diag reply: {0}")]
        Malformed(&'static str),
        /// This kernel has no TCP `inet_diag` (the probe dump failed), so "no such socket"
        /// answers cannot be trusted.
        #[error("TCP inet_diag unavailable: {0}")]
        Unavailable(Errno),
    }

    /// (uid, inode) of the socket whose local address is `client` and remote is `server`;
    /// `None` when the kernel has no such socket. A v4 pair is asked of `AF_INET` and then,
    /// as `::ffff:a.b.c.d`, of `AF_INET6` (a v4-mapped client socket of a v6 socket).
    pub(super) fn lookup(
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<Option<(u32, u64)>, DiagError> {
        let socket = open()?;
        available(&socket)?;
        for (seq, (family, src, dst)) in (1u32..).zip(queries(client.ip(), server.ip())) {
            if let Some(found) = query(
                &socket,
                seq,
                family,
                (src, client.port()),
                (dst, server.port()),
            )? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// (family, src, dst) to ask, addresses as the 16 bytes of `inet_diag_sockid`.
    pub(super) fn queries(client: IpAddr, server: IpAddr) -> Vec<(u8, [u8; 16], [u8; 16])> {
        let v4 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut asks = Vec::with_capacity(2);
        if let (Some(c), Some(s)) = (v4(client), v4(server)) {
            let widen = |octets: [u8; 4]| {
                let mut bytes = [0u8; 16];
                bytes[..4].copy_from_slice(&octets);
                bytes
            };
            asks.push((AF_INET, widen(c.octets()), widen(s.octets())));
        }
        asks.push((AF_INET6, v6(client), v6(server)));
        asks
    }

    /// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace, with a receive
    /// timeout so a silent kernel cannot stall the caller.
    pub(super) fn open() -> Result<OwnedFd, DiagError> {
        let socket = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        socket::setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::milliseconds(1000),
        )?;
        Ok(socket)
    }

    /// Whether TCP `inet_diag` exists, asked once per process (kernel modules are global): a
    /// dump of no states returns `NLMSG_DONE` at once if it does, `ENOENT` if not. Without
    /// this, a missing module would look like "no such socket".
    fn available(socket: &OwnedFd) -> Result<(), DiagError> {
        static AVAILABLE: OnceLock<Result<(), Errno>> = OnceLock::new();
        if let Some(known) = AVAILABLE.get() {
            return known.map_err(DiagError::Unavailable);
        }
        let request = request(
            0,
            NLM_F_REQUEST | NLM_F_DUMP,
            AF_INET,
            0,
            ([0; 16], 0),
            ([0; 16], 0),
        );
        let answer = exchange(socket, &request, 0);
        let verdict = match answer {
            Ok(_) => Ok(()),
            Err(DiagError::Sys(errno)) if errno == Errno::ENOENT => Err(errno),
            // Transient or unexpected: do not remember, let the caller fall back this time.
            Err(other) => return Err(other),
        };
        AVAILABLE
            .get_or_init(|| verdict)
            .map_err(DiagError::Unavailable)
    }

    /// One exact lookup: `Ok(None)` if the kernel answers `ENOENT`.
    pub(super) fn query(
        socket: &OwnedFd,
        seq: u32,
        family: u8,
        src: ([u8; 16], u16),
        dst: ([u8; 16], u16),
    ) -> Result<Option<(u32, u64)>, DiagError> {
        let request = request(seq, NLM_F_REQUEST, family, u32::MAX, src, dst);
        match exchange(socket, &request, seq) {
            Ok(found) => Ok(found),
            Err(DiagError::Sys(Errno::ENOENT)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// `nlmsghdr` + `inet_diag_req_v2` for TCP sockets of `family` in `states` (a bit mask of
    /// TCP states) with the socket id `src` -> `dst`.
    fn request(
        seq: u32,
        flags: u16,
        family: u8,
        states: u32,
        (src, sport): ([u8; 16], u16),
        (dst, dport): ([u8; 16], u16),
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(REQUEST_LEN as usize);
        // nlmsghdr: len, type, flags, seq, pid (0: the kernel).
        m.extend_from_slice(&REQUEST_LEN.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext, pad, states.
        m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
        m.extend_from_slice(&states.to_ne_bytes());
        // inet_diag_sockid: sport, dport (big-endian), src, dst, if (0: any), cookie.
        m.extend_from_slice(&sport.to_be_bytes());
        m.extend_from_slice(&dport.to_be_bytes());
        m.extend_from_slice(&src);
        m.extend_from_slice(&dst);
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
        m.extend_from_slice(&NO_COOKIE.to_ne_bytes());
        m
    }

    /// Send `request` to the kernel and read the answer to `seq`.
    fn exchange(
        socket: &OwnedFd,
        request: &[u8],
        seq: u32,
    ) -> Result<Option<(u32, u64)>, DiagError> {
        let kernel = NetlinkAddr::new(0, 0);
        let sent = socket::sendto(socket.as_raw_fd(), request, &kernel, MsgFlags::empty())?;
        if sent != request.len() {
            return Err(DiagError::Malformed("short send"));
        }
        let mut buffer = [0u8; 8192];
        loop {
            let received = socket::recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
            let reply = buffer
                .get(..received)
                .ok_or(DiagError::Malformed("recv length"))?;
            if let Some(answer) = parse(reply, seq)? {
                return answer;
            }
        }
    }

    /// The answer to `seq` in one datagram of netlink messages: `Some(Ok(Some(..)))` a socket,
    /// `Some(Ok(None))` end of a dump, `Some(Err(..))` a kernel error, `None` nothing for
    /// `seq` here.
    #[expect(
        clippy::type_complexity,
        reason = "the three outcomes of a reply, local to this module"
    )]
    pub(super) fn parse(
        mut reply: &[u8],
        seq: u32,
    ) -> Result<Option<Result<Option<(u32, u64)>, DiagError>>, DiagError> {
        while !reply.is_empty() {
            let len = word(reply, 0).ok_or(DiagError::Malformed("short header"))? as usize;
            let kind = reply
                .get(4..6)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_ne_bytes)
                .ok_or(DiagError::Malformed("short header"))?;
            let message_seq = word(reply, 8).ok_or(DiagError::Malformed("short header"))?;
            let body = reply
                .get(NLMSG_HDRLEN..len)
                .ok_or(DiagError::Malformed("message length"))?;
            if message_seq == seq {
                match kind {
                    NLMSG_ERROR => {
                        let code = word(body, 0).ok_or(DiagError::Malformed("short error"))?;
                        // nlmsgerr.error: 0 is an acknowledgement, else a negative errno.
                        let code = i32::from_ne_bytes(code.to_ne_bytes());
                        if code != 0 {
                            return Ok(Some(Err(DiagError::Sys(Errno::from_raw(-code)))));
                        }
                    }
                    NLMSG_DONE => return Ok(Some(Ok(None))),
                    SOCK_DIAG_BY_FAMILY => {
                        if body.len() < DIAG_MSG_LEN {
                            return Err(DiagError::Malformed("short inet_diag_msg"));
                        }
                        let uid = word(body, UID_OFFSET)
                            .ok_or(DiagError::Malformed("short inet_diag_msg"))?;
                        let inode = word(body, INODE_OFFSET)
                            .ok_or(DiagError::Malformed("short inet_diag_msg"))?;
                        return Ok(Some(Ok(Some((uid, u64::from(inode))))));
                    }
                    _ => {}
                }
            }
            // Messages are 4-byte aligned.
            let next = len.checked_add(3).map(|n| n & !3).unwrap_or(usize::MAX);
            reply = reply.get(next..).unwrap_or_default();
        }
        Ok(None)
    }

    /// The native-endian `u32` at `at`.
    fn word(bytes: &[u8], at: usize) -> Option<u32> {
        let end = at.checked_add(4)?;
        Some(u32::from_ne_bytes(bytes.get(at..end)?.try_into().ok()?))
    }
}

/// (uid, inode) of the row whose local address is `client` and remote is `server`.
fn find_socket(table: &str, client: SocketAddr, server: SocketAddr) -> Option<(u32, u64)> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = parse_address(fields.get(1)?)?;
        let remote = parse_address(fields.get(2)?)?;
        if !same(local, client) || !same(remote, server) {
            return None;
        }
        let uid = fields.get(7)?.parse().ok()?;
        let inode = fields.get(9)?.parse().ok()?;
        Some((uid, inode))
    })
}

/// Equal addresses, counting `::ffff:a.b.c.d` as `a.b.c.d`.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// `0100007F:1F90` (IPv4: one little-endian word) or 32 hex digits (IPv6: four
/// little-endian words), then the port in big-endian hex.
fn parse_address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.swap_bytes(),
        )),
        32 => {
            let mut octets = [0u8; 16];
            for (word, chunk) in octets.chunks_mut(4).enumerate() {
                let value = u32::from_str_radix(ip.get(word * 8..word * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The process with a descriptor on socket `inode`: this process first (the lab runs its
/// workloads in-process), then every other from the highest pid down (new workloads have high
/// pids; kernel threads and processes we may not inspect fail to list `fd` and are skipped).
fn find_holder(proc_root: &Path, inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    let holds = |pid_dir: &Path| -> bool {
        std::fs::read_dir(pid_dir.join("fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            })
        })
    };
    let own = std::process::id();
    if holds(&proc_root.join(own.to_string())) {
        return Some(own);
    }
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    pids.into_iter()
        .find(|pid| holds(&proc_root.join(pid.to_string())))
}

/// The effective gid from `/proc/<pid>/status`.
fn process_gid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Gid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_the_kernel_prints_them() {
        assert_eq!(
            parse_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_address("0000000000000000FFFF00000100007F:0050"),
            Some("[::ffff:127.0.0.1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_address("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        assert_eq!(parse_address("zz:1"), None);
    }

    #[tokio::test]
    async fn a_connection_from_this_process_is_attributed_to_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(server).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let creds = tcp_peer(peer, server).unwrap();
        assert_eq!(creds.pid, i32::try_from(std::process::id()).ok());
        assert_eq!(creds.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(creds.gid, nix::unistd::getegid().as_raw());
        // Nobody holds a connection to a port nobody listens on.
        let error = tcp_peer(peer, "127.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(matches!(error, PeerError::NotLocal { .. }), "{error}");
    }

    /// A connected pair (`client` end, accepted end) from `connect` to a listener on `bind`.
    async fn pair(
        bind: &str,
        connect: Option<SocketAddr>,
    ) -> std::io::Result<(tokio::net::TcpStream, tokio::net::TcpStream, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let target = match connect {
            Some(ip) => SocketAddr::new(ip.ip(), listener.local_addr()?.port()),
            None => listener.local_addr()?,
        };
        let client = tokio::net::TcpStream::connect(target).await?;
        let (accepted, _) = listener.accept().await?;
        Ok((client, accepted, target))
    }

    /// What the `/proc` table says of the client socket of `client`.
    fn proc_answer(client: &tokio::net::TcpStream, server: SocketAddr) -> (u32, u64) {
        proc_table_lookup(Path::new("/proc"), client.local_addr().unwrap(), server).unwrap()
    }

    /// netlink, `/proc` and the public lookup agree on the client end of `client` -> `server`.
    fn assert_netlink_finds(client: &tokio::net::TcpStream, accepted: &tokio::net::TcpStream) {
        let peer = accepted.peer_addr().unwrap();
        let server = accepted.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let netlink = diag::lookup(peer, server).unwrap();
        assert_eq!(netlink, Some(proc_answer(client, server)));
        let (uid, inode) = netlink.unwrap();
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        assert_ne!(inode, 0);
        let creds = tcp_peer(peer, server).unwrap();
        assert_eq!(creds.pid, i32::try_from(std::process::id()).ok());
        // The server end is another socket (its own inode), and a wrong port finds nothing.
        let reverse = diag::lookup(server, peer).unwrap();
        assert!(
            reverse.is_some_and(|(_, other)| other != inode),
            "{reverse:?}"
        );
        let nowhere = SocketAddr::new(server.ip(), 1);
        assert_eq!(diag::lookup(peer, nowhere).unwrap(), None);
    }

    #[tokio::test]
    async fn netlink_finds_an_ipv4_socket_like_the_proc_table() {
        let (client, accepted, _) = pair("127.0.0.1:0", None).await.unwrap();
        assert_netlink_finds(&client, &accepted);
    }

    #[tokio::test]
    async fn netlink_finds_an_ipv6_loopback_socket() {
        let Ok((client, accepted, _)) = pair("[::1]:0", None).await else {
            eprintln!("skipped: no IPv6 on lo ([::1] cannot be bound)");
            return;
        };
        assert!(accepted.peer_addr().unwrap().is_ipv6());
        assert_netlink_finds(&client, &accepted);
    }

    #[tokio::test]
    async fn netlink_finds_a_v4_mapped_client_socket() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: no IPv6 on lo ([::1] cannot be bound)");
            return;
        }
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:0".parse().unwrap();
        let (client, accepted, _) = pair("[::]:0", Some(mapped)).await.unwrap();
        let peer = accepted.peer_addr().unwrap();
        assert_eq!(
            peer.ip(),
            mapped.ip(),
            "a v6 client socket with a v4-mapped address"
        );
        assert_netlink_finds(&client, &accepted);
        // The same pair written as plain IPv4 names the same socket (AF_INET, then AF_INET6).
        let v4 = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let server = accepted.local_addr().unwrap();
        assert_eq!(
            diag::lookup(v4(peer), v4(server)).unwrap(),
            Some(proc_answer(&client, server))
        );
    }

    #[test]
    fn v4_pairs_are_asked_of_both_families() {
        let asks = diag::queries("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let families: Vec<u8> = asks.iter().map(|(family, _, _)| *family).collect();
        assert_eq!(families, [diag::AF_INET, diag::AF_INET6]);
        assert_eq!(asks[0].1[..4], [127, 0, 0, 1]);
        assert_eq!(asks[0].1[4..], [0; 12]);
        assert_eq!(
            asks[1].2,
            "::ffff:127.0.0.2".parse::<Ipv6Addr>().unwrap().octets()
        );
        let asks = diag::queries("::1".parse().unwrap(), "::1".parse().unwrap());
        assert_eq!(asks.len(), 1);
        assert_eq!(asks[0].0, diag::AF_INET6);
    }

    #[test]
    fn netlink_replies_parse() {
        // An error message for seq 7 (-ENOENT), preceded by a message for another seq.
        let mut reply = Vec::new();
        for (seq, code) in [(6u32, -1i32), (7, -2)] {
            reply.extend_from_slice(&36u32.to_ne_bytes());
            reply.extend_from_slice(&2u16.to_ne_bytes());
            reply.extend_from_slice(&0u16.to_ne_bytes());
            reply.extend_from_slice(&seq.to_ne_bytes());
            reply.extend_from_slice(&0u32.to_ne_bytes());
            reply.extend_from_slice(&code.to_ne_bytes());
            reply.extend_from_slice(&[0; 16]);
        }
        let answer = diag::parse(&reply, 7).unwrap();
        assert!(
            matches!(
                answer,
                Some(Err(diag::DiagError::Sys(nix::errno::Errno::ENOENT)))
            ),
            "{answer:?}"
        );
        assert!(diag::parse(&reply, 8).unwrap().is_none());
        // A truncated message is an error, not a panic.
        assert!(diag::parse(&reply[..20], 6).is_err());
    }
}
