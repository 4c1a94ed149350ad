//! `isthmus`: the one binary. Parses flags, loads layered configuration, runs the runtime and
//! maps failures to exit codes (64: invalid configuration, naming the field; 1: failure).
//! Logic that tests need lives in the libraries.

mod agent;
mod broker;
mod dns;
mod gateway;
mod identity;
mod lab;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use isthmus_core::config::{self, ConfigError};
use isthmus_core::telemetry::{self, LogFormat};

/// Exit code for invalid configuration (sysexits EX_USAGE/EX_CONFIG family).
const EXIT_CONFIG: u8 = 64;

/// Isthmus joins clusters into one secure service network with SPIFFE identities.
#[derive(Debug, Parser)]
#[command(name = "isthmus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the trust broker (CA, bundle endpoint, federation), or administer a running one.
    Broker(broker::BrokerArgs),
    /// This trust domain's bundle, from a running broker.
    Bundle(broker::BundleArgs),
    /// Run the DNS server for `clusterset.local`, fed by the gateway's catalog API.
    Dns(ConfigArgs),
    /// Run the node agent: Workload API, and tunnels from workloads to global services.
    Agent(ConfigArgs),
    /// Run the east-west gateway (QUIC mTLS tunnels, HTTP/2 CONNECT fallback).
    Gateway(gateway::GatewayArgs),
    /// The multi-cluster lab on loopback: start it (`up`) or show a running one (`status`).
    Lab(lab::LabArgs),
    /// SPIFFE identities: demo, inspect certificates and bundles.
    #[command(subcommand)]
    Identity(IdentityCommand),
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Create two throw-away trust domains, issue SVIDs, verify them and run an mTLS
    /// handshake between them on 127.0.0.1.
    Demo(ConfigArgs),
    /// Print the SPIFFE facts of the certificates in a PEM or DER file.
    Inspect {
        /// The file to inspect.
        file: PathBuf,
    },
    /// Parse a SPIFFE bundle (JSON) and print its authorities.
    Bundle {
        /// The bundle document.
        file: PathBuf,
        /// The trust domain the bundle belongs to (a bundle does not name it).
        #[arg(long, value_parser = isthmus_core::TrustDomain::new)]
        trust_domain: isthmus_core::TrustDomain,
    },
}

/// Flags shared by every command that takes a configuration.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML). Layering: defaults < file < ISTHMUS_* environment < flags.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Override one field: `--set leaf_ttl=30m` (repeatable).
    #[arg(long = "set", value_parser = config::parse_set_flag, global = true)]
    set: Vec<(String, String)>,
    /// Only validate the configuration, print it, and exit.
    #[arg(long)]
    check: bool,
}

/// Failures the binary distinguishes by exit code.
#[derive(Debug)]
pub enum Failure {
    /// Invalid configuration: exit 64.
    Config(ConfigError),
    /// Anything else: exit 1.
    Other(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// `--check`: prints the validated configuration (secrets redacted) and reports success.
fn print_valid<C: serde::Serialize>(cfg: &C) -> Result<(), Failure> {
    println!(
        "configuration is valid:\n{}",
        serde_json::to_string_pretty(&config::redacted_json(cfg, &[])?)
            .map_err(anyhow::Error::from)?
    );
    Ok(())
}

/// Runs `future` to completion on a multi-threaded runtime (`threads` workers, or one per core).
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    threads: Option<usize>,
    future: F,
) -> Result<(), Failure> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = builder.enable_all().build().map_err(anyhow::Error::from)?;
    runtime.block_on(future)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run(cli)
}

fn run(cli: Cli) -> ExitCode {
    let format = match LogFormat::from_env(&config::ProcessEnv) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = telemetry::init_tracing(format, "warn") {
        eprintln!("invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    isthmus_core::tls::install_default_provider();
    match dispatch(cli, &config::ProcessEnv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("invalid configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli, env: &dyn config::Environment) -> Result<(), Failure> {
    match cli.command {
        Command::Broker(args) => broker::run(args, env),
        Command::Bundle(args) => broker::run_bundle(args, env),
        Command::Gateway(args) => gateway::run(args, env),
        Command::Dns(args) => dns::run(args, env),
        Command::Agent(args) => agent::run(args, env),
        Command::Lab(args) => lab::run(args),
        Command::Identity(IdentityCommand::Demo(args)) => {
            let cfg: identity::DemoConfig =
                config::load(args.config.as_deref(), env, identity::DEMO_ENV, &args.set)?;
            if args.check {
                return print_valid(&cfg);
            }
            block_on(Some(2), identity::demo(&cfg))
        }
        Command::Identity(IdentityCommand::Inspect { file }) => Ok(identity::inspect(&file)?),
        Command::Identity(IdentityCommand::Bundle { file, trust_domain }) => {
            Ok(identity::show_bundle(&file, trust_domain)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn dispatch_args(args: &[&str], env: &BTreeMap<String, String>) -> Result<(), Failure> {
        dispatch(Cli::try_parse_from(args).unwrap(), env)
    }

    #[test]
    fn invalid_config_names_the_field() {
        let dir = std::env::temp_dir().join(format!("isthmus-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("demo.toml");
        std::fs::write(&file, "trust_domain = \"West.Example\"\n").unwrap();
        let path = file.to_str().unwrap();
        let env = BTreeMap::new();
        match dispatch_args(
            &["isthmus", "identity", "demo", "--check", "-c", path],
            &env,
        ) {
            Err(Failure::Config(e)) => assert_eq!(e.field(), Some("trust_domain"), "{e}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        std::fs::write(&file, "leaf_tll = \"5m\"\n").unwrap();
        match dispatch_args(
            &["isthmus", "identity", "demo", "--check", "-c", path],
            &env,
        ) {
            Err(Failure::Config(e)) => assert_eq!(e.field(), Some("leaf_tll"), "{e}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn agent_config_errors_name_the_field() {
        let env = BTreeMap::new();
        let set = |field: &str| format!("--set={field}");
        match dispatch_args(
            &[
                "isthmus",
                "agent",
                "--check",
                &set("trust_domain=west.example"),
            ],
            &env,
        ) {
            Err(Failure::Config(e)) => assert_eq!(e.field(), Some("broker"), "{e}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        let mut env = BTreeMap::new();
        env.insert(
            "ISTHMUS_AGENT_SOCKET".to_owned(),
            "relative.sock".to_owned(),
        );
        match dispatch_args(
            &[
                "isthmus",
                "agent",
                "--check",
                &set("trust_domain=west.example"),
                &set("broker.address=127.0.0.1:8081"),
                &set("broker.bundle_file=/b.json"),
                &set("broker.join_token_file=/t"),
                &set("catalog=127.0.0.1:15012"),
            ],
            &env,
        ) {
            Err(Failure::Config(e)) => assert_eq!(e.field(), Some("workload_api.socket"), "{e}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn layers_env_and_flags_then_validates() {
        let mut env = BTreeMap::new();
        env.insert(
            "ISTHMUS_DEMO_PEER_TRUST_DOMAIN".to_owned(),
            "west.example".to_owned(),
        );
        // Same trust domain twice: validation names the peer field.
        match dispatch_args(&["isthmus", "identity", "demo", "--check"], &env) {
            Err(Failure::Config(e)) => assert_eq!(e.field(), Some("peer_trust_domain"), "{e}"),
            other => panic!("expected a validation error, got {other:?}"),
        }
        // A flag beats the environment.
        dispatch_args(
            &[
                "isthmus",
                "identity",
                "demo",
                "--check",
                "--set",
                "peer_trust_domain=south.example",
            ],
            &env,
        )
        .unwrap();
    }

    #[test]
    fn demo_runs_end_to_end() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(identity::demo(&identity::DemoConfig::default()))
            .unwrap();
    }
}
