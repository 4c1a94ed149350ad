//! SIGKILL durability of the broker's store: a child process issues SVIDs (or rotates the CA)
//! as fast as it can and prints every acknowledged result; the parent kills it with SIGKILL at
//! a random point, reopens the store and checks that the root survived and that serials and
//! `spiffe_sequence` never went backwards. Twenty kills in a row per mode.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use isthmus_core::{SpiffeId, TrustDomain};
use isthmus_trust_broker::authority::{Authority, AuthorityOptions};
use isthmus_trust_broker::store::BrokerStore;
use time::OffsetDateTime;

const CHILD_MODE: &str = "ISTHMUS_DURABILITY_CHILD";
const CHILD_DIR: &str = "ISTHMUS_DURABILITY_DIR";
const ROUNDS: usize = 20;

fn options() -> AuthorityOptions {
    AuthorityOptions {
        ca_ttl: Duration::from_secs(24 * 3600),
        leaf_ttl: Duration::from_secs(3600),
        max_leaf_ttl: Duration::from_secs(3600),
        refresh_hint: Duration::from_secs(60),
        activation_delay: Duration::from_secs(180),
    }
}

fn open(dir: &Path) -> Authority {
    let store = Arc::new(BrokerStore::open(dir).unwrap());
    Authority::open(
        TrustDomain::new("west.example").unwrap(),
        store,
        options(),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

/// The issuance counter in a numbered serial: the first 8 of its 16 bytes.
fn serial_counter(der: &[u8]) -> u64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let raw = cert.raw_serial();
    let mut padded = [0u8; 16];
    padded[16 - raw.len()..].copy_from_slice(raw);
    u64::from_be_bytes(padded[..8].try_into().unwrap())
}

/// The child: runs only when the parent sets the mode; otherwise it is an ignored no-op.
#[test]
#[ignore = "child process of the SIGKILL durability tests"]
fn durability_child() {
    let (Ok(mode), Some(dir)) = (std::env::var(CHILD_MODE), std::env::var_os(CHILD_DIR)) else {
        return;
    };
    let authority = open(Path::new(&dir));
    let root = hex(authority.bundle().x509_authorities()[0].as_ref());
    println!("root {root}");
    let id = SpiffeId::parse("spiffe://west.example/ns/demo/sa/burst").unwrap();
    loop {
        let now = OffsetDateTime::now_utc();
        match mode.as_str() {
            "issue" => {
                let svid = authority.issue_svid(&id, None, now).unwrap();
                println!("ack serial {}", serial_counter(svid.leaf()));
            }
            _ => {
                let rotation = authority.rotate_now(now).unwrap();
                println!("ack sequence {}", rotation.sequence);
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cheap pseudo-random number from the clock: after how many acknowledgements (1..=max) to
/// kill the child.
fn kill_after(round: usize, max: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    1 + (nanos / 7 + round * 37) % max
}

struct Acked {
    root: String,
    last: u64,
}

/// Starts the child, waits for `kill_after` acknowledgements, kills it with SIGKILL.
fn run_child(mode: &str, dir: &Path, round: usize) -> Acked {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "broker_durability::durability_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MODE, mode)
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut root = String::new();
    let mut last = 0;
    let mut acks = 0;
    // Every rotation adds a root that stays until its leaves expire, so rotation bursts are
    // kept shorter than issuance bursts.
    let target = kill_after(round, if mode == "issue" { 120 } else { 12 });
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // The harness may print "test … ... " on the same line before the child's output.
        if let Some(at) = line.find("root ") {
            root = line[at + 5..].trim().to_owned();
        } else if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok())
            && line.starts_with("ack ")
        {
            assert!(
                v > last,
                "{mode}: acknowledged values must increase ({last} then {v})"
            );
            last = v;
            acks += 1;
            if acks >= target {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !root.is_empty() && acks >= target,
        "{mode}: child stopped early after {acks} acks"
    );
    Acked { root, last }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("isthmus-durability-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn sigkill_during_issuance_keeps_root_and_serials() {
    let dir = temp_dir("issue");
    let first_root = hex(open(&dir).bundle().x509_authorities()[0].as_ref());
    let mut high = 0;
    for round in 0..ROUNDS {
        let acked = run_child("issue", &dir, round);
        assert_eq!(acked.root, first_root, "round {round}: the root changed");
        assert!(acked.last > high, "round {round}: serial went backwards");
        high = acked.last;
        let authority = open(&dir);
        assert_eq!(
            hex(authority.bundle().x509_authorities()[0].as_ref()),
            first_root
        );
        let id = SpiffeId::parse("spiffe://west.example/ns/demo/sa/check").unwrap();
        let next = serial_counter(
            authority
                .issue_svid(&id, None, OffsetDateTime::now_utc())
                .unwrap()
                .leaf(),
        );
        assert!(
            next > high,
            "round {round}: serial {next} after acknowledged {high}"
        );
        high = next;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigkill_during_rotation_keeps_sequence_monotonic() {
    let dir = temp_dir("rotate");
    let mut high = open(&dir).sequence();
    for round in 0..ROUNDS {
        let acked = run_child("rotate", &dir, round);
        // Equal is legitimate: when the previous child died between publishing a root and
        // activating it, the next rotation activates that published root, which leaves the
        // bundle (and so the sequence) unchanged.
        assert!(acked.last >= high, "round {round}: sequence went backwards");
        high = acked.last;
        let authority = open(&dir);
        let sequence = authority.sequence();
        assert!(
            sequence >= high,
            "round {round}: sequence {sequence} after acknowledged {high}"
        );
        high = sequence;
        // The store opens consistent: exactly one signing root, and it is in the bundle.
        let id = SpiffeId::parse("spiffe://west.example/ns/demo/sa/check").unwrap();
        let svid = authority
            .issue_svid(&id, None, OffsetDateTime::now_utc())
            .unwrap();
        let bundle =
            isthmus_core::BundleSet::new([isthmus_core::Bundle::clone(&authority.bundle())]);
        isthmus_core::verify::verify_svid_chain(
            svid.chain(),
            &bundle,
            rustls_pki_types::UnixTime::now(),
            isthmus_core::verify::SvidUsage::Any,
        )
        .unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
