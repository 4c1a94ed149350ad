//! The node agent in transparent mode (root; required under `CI=true`): everything runs in a
//! private network namespace with no default route, so an unredirected VIP fails at once
//! instead of leaving the machine. A client process in a cgroup of "cluster west" dials
//! echo's VIP (10.96.50.x, which exists nowhere); the cgroup connect hook sends it to the
//! agent, which names the workload by its cgroup (the entry's only selector), tunnels with
//! the workload's SVID to east's gateway (which allows only that SPIFFE ID) and on to the
//! backend. The client's getpeername shows the VIP; an IPv6 socket dialling the IPv4-mapped
//! VIP is redirected too; once east withdraws echo, new connects to the VIP fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use isthmus_core::lifecycle::DrainTrigger;
use isthmus_node_agent::Mode;
use isthmus_node_agent::attest::Selector;
use isthmus_node_agent::require_privileged;
use isthmus_node_agent::sandbox::{CgroupGuard, PrivateNetns, spawn_in};

use crate::agent::{SERVICE_PORT, WORKLOAD, agent_with, clusters_with_vips};
use crate::broker::eventually;

const DIAL_ENV: &str = "ISTHMUS_AGENT_TEST_DIAL";

/// Not a test of its own: the client the test starts inside the cgroup (this binary run with
/// `ISTHMUS_AGENT_TEST_DIAL=<addr>`). It sends a line, half-closes, and prints its socket's
/// peer and the reply, or the errno.
#[test]
fn dial_client() {
    let Ok(target) = std::env::var(DIAL_ENV) else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let outcome = TcpStream::connect_timeout(&target, Duration::from_secs(5)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let peer = s.peer_addr()?;
        s.write_all(b"hello through the redirect")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(format!("{peer} {reply}"))
    });
    match outcome {
        Ok(report) => println!("CLIENT connected {report}"),
        Err(error) => println!("CLIENT errno {}", error.raw_os_error().unwrap_or(-1)),
    }
}

/// Runs the client in `cgroup` and `netns` and returns its report line. Waits without
/// blocking the (single-threaded) runtime the agent and gateways run on.
async fn dial(cgroup: &CgroupGuard, netns: &PrivateNetns, target: &str) -> String {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "agent_transparent::dial_client",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(DIAL_ENV, target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = spawn_in(&mut command, cgroup.path(), netns).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "client hung");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("CLIENT "))
        .unwrap_or("no report")
        .to_owned()
}

#[test]
fn a_process_in_the_cgroup_reaches_a_remote_backend_through_the_vip() {
    require_privileged!();
    let cgroup = CgroupGuard::create("isthmus-agent-test").unwrap();
    let name = cgroup
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let netns = PrivateNetns::new().unwrap();
    netns
        .block_on(|| async {
            let clusters = clusters_with_vips(WORKLOAD, "10.96.50.0/24").await;
            let (drain, _) = DrainTrigger::new();
            let outbound = agent_with(
                &clusters,
                vec![Selector::unix(format!("cgroup:/{name}"))],
                Mode::Transparent {
                    cgroup: cgroup.path().to_path_buf(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                },
                &drain,
            )
            .await;
            eventually("echo is routed", Duration::from_secs(10), || {
                !outbound.routes().is_empty()
            })
            .await;
            let vip = outbound.routes()[0];
            assert!(vip.ip().to_string().starts_with("10.96.50."), "{vip}");
            assert_eq!(vip.port(), SERVICE_PORT);

            // IPv4: redirected, tunnelled with the workload's identity, VIP as the peer.
            let report = dial(&cgroup, &netns, &vip.to_string()).await;
            assert_eq!(
                report,
                format!("connected {vip} hello through the redirect"),
                "stats: {:?}",
                outbound.stats()
            );
            // An IPv6 socket dialling the IPv4-mapped VIP.
            let mapped = format!("[::ffff:{}]:{}", vip.ip(), vip.port());
            let report = dial(&cgroup, &netns, &mapped).await;
            assert_eq!(
                report,
                format!("connected {mapped} hello through the redirect")
            );
            let stats = outbound.stats();
            assert_eq!(stats.tunnelled, 2, "{stats:?}");

            // The test process is not in the cgroup: its own connect is not redirected (and
            // fails at once: this namespace has no route to 10.96.50.0/24).
            assert!(std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_err());

            // East withdraws echo: the VIP leaves the redirect map; new connects fail.
            clusters.east.view().replace_exports(&[]);
            eventually("echo is withdrawn", Duration::from_secs(10), || {
                outbound.routes().is_empty()
            })
            .await;
            let report = dial(&cgroup, &netns, &vip.to_string()).await;
            assert_eq!(report, format!("errno {}", libc_enetunreach()));
            drain.start_drain();
        })
        .unwrap();
}

/// ENETUNREACH on Linux.
fn libc_enetunreach() -> i32 {
    101
}
