//! `isthmus lab`: several clusters in this process on loopback (`up`), and the status of a
//! running lab from another shell (`status`, read from `<state_dir>/status.json`), and the demo
//! (`demo`: a two-cluster lab in a fresh state directory, scenarios with verdicts, teardown).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use isthmus_core::config::ConfigError;
use isthmus_core::lifecycle::Shutdown;
use isthmus_lab::{Lab, LabSettings, LabStatus, MAX_CLUSTERS};

use crate::Failure;
use crate::broker::Output;

/// The status document `up` keeps current.
const STATUS_FILE: &str = "status.json";
/// How often `up` rewrites it.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// An older document means no lab is running.
const STATUS_MAX_AGE: Duration = Duration::from_secs(5);
/// How long the whole lab may take to stop.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// `isthmus lab`.
#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Start N clusters (broker, gateway, DNS, node agent, echo.demo each) on loopback and run
    /// until Ctrl-C or SIGTERM.
    Up {
        /// How many clusters: west, east, north, south, central, cluster6, …
        #[arg(long, default_value_t = 2)]
        clusters: usize,
        /// Brokers' data, sockets and status.json (default: <tmp>/isthmus-lab).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Start a two-cluster lab in a fresh temporary state directory, run the demo scenarios,
    /// print a report with a verdict for each, stop the lab; exit 1 if any scenario failed.
    Demo,
    /// Clusters, federation links, peerings and VIPs of the running lab.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The running lab's state directory (default: <tmp>/isthmus-lab).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// Runs `isthmus lab`.
pub fn run(args: LabArgs) -> Result<(), Failure> {
    match args.command {
        LabCommand::Up {
            clusters,
            state_dir,
        } => {
            if clusters == 0 || clusters > MAX_CLUSTERS {
                return Err(ConfigError::validation(
                    "clusters",
                    format!("{clusters} is out of range (1 to {MAX_CLUSTERS})"),
                )
                .into());
            }
            let settings = LabSettings {
                clusters,
                state_dir: state_dir.unwrap_or_else(|| LabSettings::default().state_dir),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)?;
            runtime.block_on(up(settings))?;
            Ok(())
        }
        LabCommand::Demo => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)?;
            if runtime.block_on(demo())? {
                Ok(())
            } else {
                Err(anyhow::anyhow!("the demo failed: see the report above").into())
            }
        }
        LabCommand::Status { output, state_dir } => {
            let dir = state_dir.unwrap_or_else(|| LabSettings::default().state_dir);
            let (status, json) = read_status(&dir)?;
            match output {
                Output::Json => println!("{json}"),
                Output::Table => print!("{}", status.table()),
            }
            Ok(())
        }
    }
}

async fn up(settings: LabSettings) -> anyhow::Result<()> {
    let status_path = settings.state_dir.join(STATUS_FILE);
    if read_status(&settings.state_dir).is_ok() {
        anyhow::bail!(
            "a lab is already running with state directory {} (its {STATUS_FILE} is fresh)",
            settings.state_dir.display()
        );
    }
    clear_stale_state(&settings.state_dir)?;
    let mut shutdown = Shutdown::with_signals()?;
    eprintln!(
        "starting {} clusters (state in {})",
        settings.clusters,
        settings.state_dir.display()
    );
    let lab = Lab::start(settings, |line| eprintln!("  {line}"))
        .await
        .context("starting the lab")?;
    print!("{}", isthmus_lab::status::clusters_table(&lab.clusters()));
    println!(
        "\nTry: dig @<DNS address> -p <port> echo.demo.svc.clusterset.local; curl http://<VIP>:{}/",
        isthmus_lab::DEMO_PORT
    );
    println!("`isthmus lab status` shows peerings, federation and VIPs. Ctrl-C stops the lab.");
    let mut ticker = tokio::time::interval(STATUS_INTERVAL);
    let reason = loop {
        tokio::select! {
            reason = shutdown.requested() => break reason,
            _ = ticker.tick() => {
                if let Err(error) = write_status(&status_path, &lab.status()) {
                    tracing::warn!(error = %error, path = %status_path.display(), "writing the lab status failed");
                }
            }
        }
    };
    eprintln!("stopping the lab ({reason:?})");
    let _ = std::fs::remove_file(&status_path);
    tokio::time::timeout(SHUTDOWN_DEADLINE, lab.shutdown())
        .await
        .map_err(|_| anyhow::anyhow!("the lab did not stop within {SHUTDOWN_DEADLINE:?}"))?;
    eprintln!("lab stopped");
    Ok(())
}

/// Runs the demo; whether every scenario passed (or was skipped).
async fn demo() -> anyhow::Result<bool> {
    let state_dir = std::env::temp_dir().join(format!("isthmus-lab-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let settings = LabSettings {
        clusters: 2,
        state_dir: state_dir.clone(),
    };
    eprintln!(
        "starting a 2-cluster lab (state in {})",
        state_dir.display()
    );
    let lab = Lab::start(settings, |line| eprintln!("  {line}"))
        .await
        .context("starting the lab")?;
    println!("{}", isthmus_lab::status::clusters_table(&lab.clusters()));
    println!("Scenarios:\n");
    let report = isthmus_lab::demo::run_demo(&lab, |scenario| {
        println!("{}", scenario.render());
    })
    .await;
    eprintln!("stopping the lab");
    let stopped = tokio::time::timeout(SHUTDOWN_DEADLINE, lab.shutdown()).await;
    let _ = std::fs::remove_dir_all(&state_dir);
    stopped.map_err(|_| anyhow::anyhow!("the lab did not stop within {SHUTDOWN_DEADLINE:?}"))?;
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    println!("Demo {verdict}: {}", report.summary());
    Ok(report.passed())
}

/// Removes what a previous run left: its status document and the clusters' directories
/// (only the names the lab creates; nothing else in the directory is touched).
fn clear_stale_state(dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(dir.join(STATUS_FILE));
    for i in 0..MAX_CLUSTERS {
        let cluster = dir.join(isthmus_lab::cluster_name(i));
        if cluster.exists() {
            std::fs::remove_dir_all(&cluster)
                .with_context(|| format!("removing stale lab state {}", cluster.display()))?;
        }
    }
    Ok(())
}

/// Writes `status` to `path` atomically (a reader never sees half a document).
fn write_status(path: &Path, status: &LabStatus) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(status)?;
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, json)?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// The running lab's status and its JSON text; an error when none is running.
fn read_status(dir: &Path) -> anyhow::Result<(LabStatus, String)> {
    let path = dir.join(STATUS_FILE);
    let json = match std::fs::read_to_string(&path) {
        Ok(json) => json,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no lab is running: {} does not exist (start one with `isthmus lab up`)",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let status: LabStatus =
        serde_json::from_str(&json).with_context(|| format!("parsing {}", path.display()))?;
    let age = time::OffsetDateTime::now_utc() - status.taken_at;
    if age > STATUS_MAX_AGE {
        anyhow::bail!(
            "no lab is running: {} was last written {} s ago",
            path.display(),
            age.whole_seconds()
        );
    }
    Ok((status, json))
}
