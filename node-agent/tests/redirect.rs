//! Transparent-mode redirect end to end (root): the programs attached to a fresh cgroup, a
//! client process in that cgroup and in a private network namespace that has no default route
//! (a connect that is not redirected fails there with ENETUNREACH instead of leaving the
//! machine), and the test standing in for the agent. Guards remove the cgroup, the namespace,
//! the links and the lock file even when an assertion fails. Without privileges every test
//! skips with a SKIPPED line, or fails under CI=true / ISTHMUS_REQUIRE_PRIVILEGED=1.
//!
//! The client is this test binary run again with `ISTHMUS_REDIRECT_TEST_DIAL` set (see
//! [`dial_client`]), so the tests need nothing installed.
#![expect(
    clippy::unwrap_used,
    reason = "tests panic with the failing value by design"
)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isthmus_node_agent::redirect::{RedirectError, Redirector};
use isthmus_node_agent::require_privileged;
use isthmus_node_agent::sandbox::{CgroupGuard, PrivateNetns, spawn_in};

const DIAL_ENV: &str = "ISTHMUS_REDIRECT_TEST_DIAL";
const VIP4: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:443";
const DEADLINE: Duration = Duration::from_secs(10);

/// Not a test of its own: the client the other tests start inside the cgroup. It is this
/// binary run with `ISTHMUS_REDIRECT_TEST_DIAL="tcp <addr>"` (or `udp`): it dials, then prints
/// what its socket says its peer is (getpeername) and the agent's greeting, or the errno.
#[test]
fn dial_client() {
    let Ok(request) = std::env::var(DIAL_ENV) else {
        return;
    };
    let (protocol, target) = request.split_once(' ').unwrap();
    let target: SocketAddr = target.parse().unwrap();
    let outcome = if protocol == "udp" {
        let local = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(local).unwrap();
        socket
            .connect(target)
            .map(|()| socket.peer_addr().unwrap().to_string())
    } else {
        TcpStream::connect(target).map(|mut stream| {
            let peer = stream.peer_addr().unwrap();
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut greeting = String::new();
            stream.read_to_string(&mut greeting).unwrap();
            format!("{peer} {}", greeting.trim())
        })
    };
    match outcome {
        Ok(connected) => println!("CLIENT connected {connected}"),
        Err(error) => println!("CLIENT errno {}", error.raw_os_error().unwrap_or(-1)),
    }
}

/// What the client process reported.
#[derive(Debug, PartialEq)]
enum Dialled {
    /// Connected; the peer its socket reports and what the agent sent.
    Connected { peer: SocketAddr, greeting: String },
    /// connect() failed with this errno.
    Failed(i32),
}

/// Starts the client in the cgroup and namespace; `finish` collects its report.
fn start_client(
    cgroup: &CgroupGuard,
    netns: &PrivateNetns,
    protocol: &str,
    target: &str,
) -> std::process::Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "dial_client",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(DIAL_ENV, format!("{protocol} {target}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    spawn_in(&mut command, cgroup.path(), netns).unwrap()
}

fn finish(child: std::process::Child) -> Dialled {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout
        .lines()
        .find_map(|line| line.strip_prefix("CLIENT "))
        .unwrap_or_else(|| panic!("client printed no report: {stdout}"));
    if let Some(errno) = report.strip_prefix("errno ") {
        return Dialled::Failed(errno.parse().unwrap());
    }
    let connected = report.strip_prefix("connected ").unwrap();
    let (peer, greeting) = connected.split_once(' ').unwrap_or((connected, ""));
    Dialled::Connected {
        peer: peer.parse().unwrap(),
        greeting: greeting.to_owned(),
    }
}

/// Dials `target` from the cgroup where no agent is expected to answer.
fn dial_unanswered(cgroup: &CgroupGuard, netns: &PrivateNetns, target: &str) -> Dialled {
    finish(start_client(cgroup, netns, "tcp", target))
}

/// Accepts one connection on the stand-in agent, greets it with the original destination the
/// redirector reports for it, and returns (client address, original destination).
fn serve_one(agent: &TcpListener, redirector: &Redirector) -> (SocketAddr, Option<SocketAddr>) {
    agent.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let (mut stream, client) = loop {
        match agent.accept() {
            Ok(accepted) => break accepted,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the redirected connection never arrived"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => panic!("accept: {error}"),
        }
    };
    let original = redirector.original_destination(client);
    let greeting = match original {
        Some(vip) => format!("agent-for-{vip}"),
        None => "agent-for-unknown".to_owned(),
    };
    stream.set_nonblocking(false).unwrap();
    stream.write_all(greeting.as_bytes()).unwrap();
    (client, original)
}

/// Dials `target` from the cgroup, serves it as the agent, and checks what both ends saw.
fn assert_redirected(
    cgroup: &CgroupGuard,
    netns: &PrivateNetns,
    agent: &TcpListener,
    redirector: &Redirector,
    target: &str,
    expected_original: SocketAddr,
) {
    let child = start_client(cgroup, netns, "tcp", target);
    let (client, original) = serve_one(agent, redirector);
    assert_eq!(
        original,
        Some(expected_original),
        "original destination of {client}"
    );
    assert_eq!(
        finish(child),
        Dialled::Connected {
            peer: target.parse().unwrap(),
            greeting: format!("agent-for-{expected_original}"),
        },
        "the client must reach the agent and still see {target} as its peer"
    );
}

fn vips(list: &[&str]) -> BTreeSet<SocketAddr> {
    list.iter().map(|vip| vip.parse().unwrap()).collect()
}

#[test]
fn ipv4_connect_reaches_the_agent_and_the_client_sees_the_vip() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
    let netns = PrivateNetns::new().unwrap();
    netns
        .run(|| {
            let agent = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            redirector.set_vips(&vips(&[VIP4])).unwrap();
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP4,
                VIP4.parse().unwrap(),
            );
            // Another port of the same address is not a VIP.
            assert_eq!(
                dial_unanswered(&cgroup, &netns, "10.96.0.10:81"),
                Dialled::Failed(libc::ENETUNREACH)
            );
        })
        .unwrap();
}

#[test]
fn ipv6_socket_dialling_a_v4_mapped_vip_is_redirected() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
    let netns = PrivateNetns::new().unwrap();
    netns
        .run(|| {
            let agent = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            // Given in mapped form, stored as the IPv4 VIP.
            redirector
                .set_vips(&vips(&["[::ffff:10.96.0.10]:80"]))
                .unwrap();
            assert_eq!(redirector.vips(), &vips(&[VIP4]));
            // The agent gets the IPv4 VIP back; the client's getpeername6 says what it dialled.
            let mapped = "[::ffff:10.96.0.10]:80";
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                mapped,
                VIP4.parse().unwrap(),
            );
            // And the same VIP from an IPv4 socket.
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP4,
                VIP4.parse().unwrap(),
            );
        })
        .unwrap();
}

#[test]
fn ipv6_vip_reaches_an_ipv4_agent_and_an_ipv6_agent() {
    require_privileged!();
    let netns = PrivateNetns::new().unwrap();
    netns
        .run(|| {
            // IPv4 agent: the v6 socket is sent to ::ffff:127.0.0.1.
            let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
            let agent = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            redirector.set_vips(&vips(&[VIP6])).unwrap();
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP6,
                VIP6.parse().unwrap(),
            );
            drop(redirector);

            // IPv6 agent: sockops keys the client by its IPv6 address.
            let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
            let agent = TcpListener::bind("[::1]:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            redirector.add_vip(VIP6.parse().unwrap()).unwrap();
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP6,
                VIP6.parse().unwrap(),
            );
            // An IPv4 socket cannot be sent to an IPv6 agent.
            let error = redirector.add_vip(VIP4.parse().unwrap()).unwrap_err();
            assert!(
                matches!(error, RedirectError::AgentFamily { .. }),
                "{error}"
            );
        })
        .unwrap();
}

#[test]
fn vips_follow_live_updates_and_only_tcp_is_redirected() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
    let netns = PrivateNetns::new().unwrap();
    netns
        .run(|| {
            let agent = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            let unreachable = Dialled::Failed(libc::ENETUNREACH);
            assert_eq!(
                dial_unanswered(&cgroup, &netns, VIP4),
                unreachable,
                "no VIP yet"
            );

            redirector.add_vip(VIP4.parse().unwrap()).unwrap();
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP4,
                VIP4.parse().unwrap(),
            );
            // UDP to a VIP is left alone (a redirected connect would succeed).
            assert_eq!(
                finish(start_client(&cgroup, &netns, "udp", VIP4)),
                unreachable
            );

            redirector.set_vips(&BTreeSet::new()).unwrap();
            assert!(redirector.vips().is_empty());
            assert_eq!(
                dial_unanswered(&cgroup, &netns, VIP4),
                unreachable,
                "VIP removed"
            );

            redirector
                .set_vips(&vips(&[VIP4, "10.96.0.11:8080"]))
                .unwrap();
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                VIP4,
                VIP4.parse().unwrap(),
            );
            let other = "10.96.0.11:8080";
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                other,
                other.parse().unwrap(),
            );
            redirector.remove_vip(VIP4.parse().unwrap()).unwrap();
            assert_eq!(
                dial_unanswered(&cgroup, &netns, VIP4),
                unreachable,
                "VIP removed"
            );
            assert_redirected(
                &cgroup,
                &netns,
                &agent,
                &redirector,
                other,
                other.parse().unwrap(),
            );

            let error = redirector
                .add_vip("127.0.0.1:80".parse().unwrap())
                .unwrap_err();
            assert!(matches!(error, RedirectError::InvalidVip { .. }), "{error}");
        })
        .unwrap();
}

#[test]
fn a_second_agent_on_the_same_cgroup_is_refused() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
    let agent: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let first = Redirector::attach(cgroup.path(), agent).unwrap();
    let error = Redirector::attach(cgroup.path(), "127.0.0.1:15002".parse().unwrap()).unwrap_err();
    match &error {
        RedirectError::AlreadyRedirected {
            cgroup: path,
            holder,
            ..
        } => {
            assert_eq!(path, cgroup.path());
            assert_eq!(holder, &format!("pid {}", std::process::id()));
        }
        other => panic!("expected AlreadyRedirected, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains(&cgroup.path().display().to_string()),
        "{error}"
    );
    // Once the first agent is gone the cgroup is free again.
    drop(first);
    let again = Redirector::attach(cgroup.path(), agent).unwrap();
    drop(again);
}

#[test]
fn dropping_the_redirector_detaches_every_program() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-redirect-test").unwrap();
    let netns = PrivateNetns::new().unwrap();
    netns
        .run(|| {
            let agent = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut redirector =
                Redirector::attach(cgroup.path(), agent.local_addr().unwrap()).unwrap();
            redirector.set_vips(&vips(&[VIP4])).unwrap();
            let ids: Vec<u32> = redirector.programs().iter().map(|p| p.id).collect();
            assert_eq!(ids.len(), 5, "{:?}", redirector.programs());
            if let Some(shown) = bpftool_cgroup_show(cgroup.path()) {
                for program in redirector.programs() {
                    assert!(
                        shown.contains(program.name),
                        "{} not in {shown}",
                        program.name
                    );
                }
            }
            drop(redirector);

            // The links held the only references: the programs are unloaded, hence detached.
            let deadline = Instant::now() + DEADLINE;
            loop {
                let loaded: Vec<u32> = aya::programs::loaded_programs()
                    .filter_map(Result::ok)
                    .map(|info| info.id())
                    .filter(|id| ids.contains(id))
                    .collect();
                if loaded.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "programs {loaded:?} still loaded"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(shown) = bpftool_cgroup_show(cgroup.path()) {
                assert_eq!(
                    shown.trim(),
                    "",
                    "bpftool still shows programs on the cgroup"
                );
            }
            assert_eq!(
                dial_unanswered(&cgroup, &netns, VIP4),
                Dialled::Failed(libc::ENETUNREACH),
                "no longer redirected"
            );
        })
        .unwrap();
}

/// `bpftool cgroup show <cgroup>` when bpftool is installed (it is optional on CI).
fn bpftool_cgroup_show(cgroup: &std::path::Path) -> Option<String> {
    let output = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .ok()?;
    assert!(
        output.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}
