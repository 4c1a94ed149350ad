//! The lab (no root): clusters in one process on loopback. Each cluster's DNS server answers
//! `echo.demo.svc.clusterset.local` with the VIP its gateway reports, its node agent listens
//! there, an HTTP GET to VIP:8080 is answered by the local cluster's echo (affinity local),
//! and shutdown completes. The demo's scenarios (`isthmus lab demo`) all pass on two clusters.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use isthmus_lab::{DEMO_PORT, Lab, LabSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::broker::eventually;

/// Every lab takes VIPs from 127.100.0.0/16 upwards, and its agents listen on them: two labs in
/// one process at once would collide, so the lab tests take turns.
static ONE_LAB_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn state_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("isthmus-lab-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn resolve_a(dns: SocketAddr, name: &str) -> Vec<IpAddr> {
    let stream = UdpClientStream::builder(dns, TokioRuntimeProvider::default()).build();
    let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
    tokio::spawn(background);
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client.query(Name::from_ascii(name).unwrap(), DNSClass::IN, RecordType::A),
    )
    .await
    .unwrap_or_else(|_| panic!("query for {name} to {dns} timed out"))
    .unwrap();
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: echo.demo.svc.clusterset.local\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut response))
        .await
        .map_err(|_| std::io::Error::other("no reply within 5 s"))??;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_resolve_and_reach_echo_through_their_vips() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let dir = state_dir("two");
    let lab = Lab::start(
        LabSettings {
            clusters: 2,
            state_dir: dir.clone(),
        },
        |line| eprintln!("{line}"),
    )
    .await
    .unwrap();
    let clusters = lab.clusters();
    assert_eq!(
        clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["west", "east"]
    );
    for (i, cluster) in clusters.iter().enumerate() {
        assert_eq!(cluster.trust_domain, format!("{}.lab", cluster.name));
        let name = cluster.name.clone();
        // Both clusters export echo; the agent listens once the catalog has it.
        eventually(
            &format!("{name}'s agent listens on echo's VIP"),
            Duration::from_secs(20),
            || !lab.agent_listening(&name).is_empty(),
        )
        .await;
        eventually(
            &format!("{name} sees echo exported by both clusters"),
            Duration::from_secs(20),
            || {
                lab.status().clusters[i]
                    .gateway
                    .services
                    .iter()
                    .any(|s| s.name == "echo" && s.ready_endpoints.len() == 2)
            },
        )
        .await;
        let status = lab.status();
        let echo = status.clusters[i]
            .gateway
            .services
            .iter()
            .find(|s| s.name == "echo" && s.namespace == "demo")
            .unwrap();
        let vip = IpAddr::V4(echo.vip.unwrap());
        assert!(
            vip.to_string().starts_with(&format!("127.{}.", 100 + i)),
            "{name}: {vip}"
        );
        let listening = lab.agent_listening(&name);
        assert!(
            listening.contains(&SocketAddr::new(vip, DEMO_PORT)),
            "{name}: {listening:?}"
        );

        let answers = resolve_a(cluster.dns, "echo.demo.svc.clusterset.local").await;
        assert_eq!(answers, [vip], "{name}'s DNS answers its gateway's VIP");

        let response = http_get(SocketAddr::new(vip, DEMO_PORT)).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        // Affinity local: the local endpoint answers.
        assert!(
            response.contains(&format!("cluster={name} ")),
            "{name}: {response}"
        );
    }
    // Every federation link and peering is healthy.
    let status = lab.status();
    for cluster in &status.clusters {
        assert_eq!(cluster.federation.len(), 1, "{:?}", cluster.federation);
        assert!(cluster.gateway.peers.iter().all(|p| p.connected));
    }
    assert!(status.table().contains("echo.demo"));

    tokio::time::timeout(Duration::from_secs(30), lab.shutdown())
        .await
        .expect("the lab shuts down");
    // The state directory is kept.
    assert!(dir.join("west").join("broker").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clusters_start_peer_and_stop() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let dir = state_dir("three");
    let lab = Lab::start(
        LabSettings {
            clusters: 3,
            state_dir: dir.clone(),
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        lab.clusters()
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["west", "east", "north"]
    );
    eventually(
        "every gateway connected to both peers",
        Duration::from_secs(20),
        || {
            lab.status()
                .clusters
                .iter()
                .all(|c| c.gateway.peers.len() == 2 && c.gateway.peers.iter().all(|p| p.connected))
        },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), lab.shutdown())
        .await
        .expect("the lab shuts down");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_scenarios_pass_on_two_clusters() {
    let _turn = ONE_LAB_AT_A_TIME.lock().await;
    let dir = state_dir("demo");
    let lab = Lab::start(
        LabSettings {
            clusters: 2,
            state_dir: dir.clone(),
        },
        |_| {},
    )
    .await
    .unwrap();
    let settings = isthmus_lab::demo::DemoSettings {
        latency_requests: 50,
        ..Default::default()
    };
    let report =
        isthmus_lab::demo::run_demo_with(&lab, &settings, |s| eprint!("{}", s.render())).await;
    tokio::time::timeout(Duration::from_secs(30), lab.shutdown())
        .await
        .expect("the lab shuts down");
    let _ = std::fs::remove_dir_all(dir);
    use isthmus_lab::demo::Verdict;
    let verdicts: Vec<(usize, Verdict)> = report
        .scenarios
        .iter()
        .map(|s| (s.number, s.verdict))
        .collect();
    assert_eq!(
        verdicts,
        [
            (1, Verdict::Pass),
            (2, Verdict::Pass),
            (3, Verdict::Pass),
            (4, Verdict::Pass),
            (5, Verdict::Skipped),
        ],
        "{report:#?}"
    );
    // The cross-cluster call was answered by the other cluster.
    assert!(
        report.scenarios[1]
            .lines
            .iter()
            .any(|l| l.contains("`cluster=east ")),
        "{:#?}",
        report.scenarios[1]
    );
    assert!(report.passed());
}
