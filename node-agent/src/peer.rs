//! Who is on the other end of a TCP connection the agent accepted from this host: the socket
//! is found in `/proc/thread-self/net/tcp{,6}` (the calling thread's network namespace) by its
//! address pair, which gives its owner's uid and inode; the process holding that inode is
//! found under `/proc/<pid>/fd`, and its gid under `/proc/<pid>/status`. The result feeds the
//! same selector attestation as the Workload API's `SO_PEERCRED`.

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

/// [`tcp_peer`] with another procfs root (tests).
pub fn tcp_peer_in(
    proc_root: &Path,
    client: SocketAddr,
    server: SocketAddr,
) -> Result<PeerCredentials, PeerError> {
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
        if let Some((uid, inode)) = find_socket(&text, client, server) {
            let pid = find_holder(proc_root, inode).ok_or(PeerError::NoProcess {
                inode,
                client,
                server,
            })?;
            let gid = process_gid(proc_root, pid).unwrap_or(uid);
            return Ok(PeerCredentials {
                uid,
                gid,
                pid: i32::try_from(pid).ok(),
            });
        }
    }
    Err(PeerError::NotLocal {
        client,
        server,
        table: searched.join(", "),
    })
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
/// workloads in-process), then every other.
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
    std::fs::read_dir(proc_root)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
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
}
