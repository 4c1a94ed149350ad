//! `isthmus broker …` and `isthmus bundle show`: run the trust broker, and administer a running
//! one through its Unix admin socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use isthmus_api::broker::broker_admin_client::BrokerAdminClient;
use isthmus_api::broker::{self as pb};
use isthmus_api::transport::unix_channel;
use isthmus_core::TrustDomain;
use isthmus_core::config::{self, Environment};
use isthmus_core::lifecycle::Shutdown;
use isthmus_trust_broker::config::{BROKER_ENV, BrokerConfig};
use isthmus_trust_broker::model::{BundleEndpointProfile, FederatedTrustDomain};
use isthmus_trust_broker::runtime::Broker;

use crate::{ConfigArgs, Failure};

/// `isthmus broker`: runs the broker, or with a subcommand talks to a running one.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = false)]
pub struct BrokerArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Admin socket of a running broker (default: from the configuration).
    #[arg(long, global = true)]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<BrokerCommand>,
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Publish a new root now; it signs after the activation delay (or at once with --now).
    RotateCa {
        /// Activate immediately (federated peers reject new leaves until they refresh).
        #[arg(long)]
        now: bool,
    },
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// One-time join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Federation relationships (SPIRE's ClusterFederatedTrustDomain fields).
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Issue an X509-SVID with a fresh key into files (standalone gateways, tests).
    Mint {
        /// The SPIFFE ID, in this trust domain.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, e.g. `24h` (at most the broker's max_leaf_ttl).
        #[arg(long, value_parser = config::parse_duration)]
        ttl: Option<Duration>,
        /// Directory for svid.pem, svid.key (0600) and bundle.json.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Roots, sequence and federation health.
    Status {
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Create an entry: workloads on NODE matching every selector get SPIFFE_ID.
    Create {
        /// The SPIFFE ID to issue.
        #[arg(long)]
        spiffe_id: String,
        /// The node whose agent may obtain it.
        #[arg(long)]
        node: String,
        /// A selector `type:value` (repeatable), e.g. `unix:uid:1000`.
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// Entry ID (generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// Leaf lifetime, e.g. `30m`.
        #[arg(long, value_parser = config::parse_duration)]
        ttl: Option<Duration>,
        /// A trust domain whose bundle these workloads receive (repeatable).
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
    },
    /// List entries.
    List,
    /// Delete an entry.
    Delete {
        /// The entry ID.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token bound to a node name.
    Create {
        /// The node name (becomes spiffe://<td>/isthmus/node/<name>).
        #[arg(long)]
        node: String,
        /// Lifetime, e.g. `10m`.
        #[arg(long, value_parser = config::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Profile {
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    #[value(name = "https_web")]
    HttpsWeb,
}

#[derive(Debug, Subcommand)]
enum FederationCommand {
    /// Federate with a trust domain.
    Add {
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Its bundle endpoint, https://host:port/path.
        #[arg(long)]
        bundle_endpoint_url: String,
        /// How the endpoint authenticates.
        #[arg(long, value_enum)]
        profile: Profile,
        /// The endpoint's SPIFFE ID (https_spiffe).
        #[arg(long)]
        endpoint_spiffe_id: Option<String>,
        /// A file with the initial bundle (SPIFFE JSON) to bootstrap https_spiffe.
        #[arg(long)]
        trust_domain_bundle: Option<PathBuf>,
    },
    /// List relationships.
    List,
    /// End a relationship: stop fetching and delete its bundle.
    Remove {
        /// The foreign trust domain.
        trust_domain: String,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Human-readable table.
    Table,
    /// JSON document.
    Json,
}

/// Bundle formats for `bundle show`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    /// SPIFFE bundle (JWKS).
    Spiffe,
    /// PEM certificates.
    Pem,
}

/// `isthmus bundle …`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Admin socket of a running broker (default: from the configuration).
    #[arg(long, global = true)]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Print this trust domain's bundle.
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
        format: BundleFormat,
    },
}

fn load_config(args: &ConfigArgs, env: &dyn Environment) -> Result<BrokerConfig, Failure> {
    Ok(config::load(
        args.config.as_deref(),
        env,
        BROKER_ENV,
        &args.set,
    )?)
}

/// The admin socket: the flag, else the configuration's (which needs no trust domain).
fn admin_socket(
    explicit: Option<&PathBuf>,
    args: &ConfigArgs,
    env: &dyn Environment,
) -> Result<PathBuf, Failure> {
    if let Some(path) = explicit {
        return Ok(path.clone());
    }
    match load_config(args, env) {
        Ok(cfg) => Ok(cfg.admin_socket()),
        // Without a trust domain the file cannot validate, but the socket path is still
        // well defined by the defaults.
        Err(Failure::Config(e)) if e.field() == Some("trust_domain") => {
            Ok(BrokerConfig::default().admin_socket())
        }
        Err(e) => Err(e),
    }
}

async fn admin_client(
    path: PathBuf,
) -> anyhow::Result<BrokerAdminClient<tonic::transport::Channel>> {
    if !path.exists() {
        bail!(
            "no broker admin socket at {} (is the broker running? pass --admin-socket or -c)",
            path.display()
        );
    }
    Ok(BrokerAdminClient::new(unix_channel(path)))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs `isthmus broker …`.
pub fn run(args: BrokerArgs, env: &dyn Environment) -> Result<(), Failure> {
    let Some(command) = args.command else {
        let cfg = load_config(&args.config, env)?;
        if args.config.check {
            return crate::print_valid(&cfg);
        }
        return Ok(runtime()?.block_on(serve(cfg))?);
    };
    let socket = admin_socket(args.admin_socket.as_ref(), &args.config, env)?;
    Ok(runtime()?.block_on(admin(command, socket))?)
}

async fn serve(cfg: BrokerConfig) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::with_signals()?;
    let broker = Broker::start(&cfg).await.context("starting the broker")?;
    eprintln!(
        "broker for {} ready: bundle endpoint https://{}/, API {}, admin {}",
        broker.trust_domain(),
        broker.bundle_endpoint_addr(),
        broker.api_addr(),
        broker.admin_socket().display()
    );
    let reason = shutdown.requested().await;
    tracing::info!(?reason, "shutting down");
    let outcome = broker.shutdown(cfg.shutdown_grace.get()).await;
    tracing::info!(?outcome, "broker stopped");
    Ok(())
}

async fn admin(command: BrokerCommand, socket: PathBuf) -> anyhow::Result<()> {
    let mut client = admin_client(socket).await?;
    match command {
        BrokerCommand::RotateCa { now } => {
            let r = client
                .rotate_ca(pb::RotateCaRequest { now })
                .await?
                .into_inner();
            println!(
                "new root published at sequence {}; signs from {}",
                r.sequence,
                unix_to_rfc3339(r.activates_at)
            );
        }
        BrokerCommand::Entry(EntryCommand::Create {
            spiffe_id,
            node,
            selectors,
            id,
            ttl,
            federates_with,
        }) => {
            let selectors = selectors
                .iter()
                .map(|s| {
                    s.parse::<isthmus_trust_broker::model::Selector>()
                        .map(|s| pb::Selector {
                            r#type: s.kind,
                            value: s.value,
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let entry = client
                .create_entry(pb::Entry {
                    id: id.unwrap_or_default(),
                    spiffe_id,
                    node,
                    selectors,
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs()),
                    federates_with,
                })
                .await?
                .into_inner();
            println!("created entry {} for {}", entry.id, entry.spiffe_id);
        }
        BrokerCommand::Entry(EntryCommand::List) => {
            let entries = client
                .list_entries(pb::ListEntriesRequest {})
                .await?
                .into_inner()
                .entries;
            println!("{:<18} {:<48} {:<14} SELECTORS", "ID", "SPIFFE ID", "NODE");
            for e in entries {
                let selectors: Vec<String> = e
                    .selectors
                    .iter()
                    .map(|s| format!("{}:{}", s.r#type, s.value))
                    .collect();
                println!(
                    "{:<18} {:<48} {:<14} {}",
                    e.id,
                    e.spiffe_id,
                    e.node,
                    selectors.join(",")
                );
            }
        }
        BrokerCommand::Entry(EntryCommand::Delete { id }) => {
            let deleted = client
                .delete_entry(pb::DeleteEntryRequest { id: id.clone() })
                .await?
                .into_inner()
                .deleted;
            if !deleted {
                bail!("no entry {id}");
            }
            println!("deleted entry {id}");
        }
        BrokerCommand::Token(TokenCommand::Create { node, ttl }) => {
            let t = client
                .create_join_token(pb::CreateJoinTokenRequest {
                    node,
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs()),
                })
                .await?
                .into_inner();
            println!("{}", t.token);
            eprintln!("expires {}", unix_to_rfc3339(t.expires_at));
        }
        BrokerCommand::Federation(FederationCommand::Add {
            trust_domain,
            bundle_endpoint_url,
            profile,
            endpoint_spiffe_id,
            trust_domain_bundle,
        }) => {
            let bundle_endpoint_profile = match profile {
                Profile::HttpsWeb => BundleEndpointProfile::HttpsWeb,
                Profile::HttpsSpiffe => BundleEndpointProfile::HttpsSpiffe {
                    endpoint_spiffe_id: endpoint_spiffe_id
                        .context("--endpoint-spiffe-id is required for https_spiffe")?
                        .parse()?,
                },
            };
            let relationship = FederatedTrustDomain {
                trust_domain: TrustDomain::new(&trust_domain)?,
                bundle_endpoint_url,
                bundle_endpoint_profile,
                trust_domain_bundle: trust_domain_bundle
                    .map(|p| {
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))
                    })
                    .transpose()?,
            };
            client
                .add_federation(pb::FederationRelationship {
                    json: serde_json::to_string(&relationship)?,
                })
                .await?;
            println!("federating with {trust_domain}");
        }
        BrokerCommand::Federation(FederationCommand::List) => {
            let list = client
                .list_federations(pb::ListFederationsRequest {})
                .await?
                .into_inner();
            for r in list.relationships {
                println!("{}", r.json);
            }
        }
        BrokerCommand::Federation(FederationCommand::Remove { trust_domain }) => {
            let removed = client
                .remove_federation(pb::RemoveFederationRequest {
                    trust_domain: trust_domain.clone(),
                })
                .await?
                .into_inner()
                .removed;
            if !removed {
                bail!("not federated with {trust_domain}");
            }
            println!("federation with {trust_domain} removed");
        }
        BrokerCommand::Mint {
            spiffe_id,
            ttl,
            out_dir,
        } => {
            let minted = client
                .mint_x509_svid(pb::MintX509SvidRequest {
                    spiffe_id: spiffe_id.clone(),
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs()),
                })
                .await?
                .into_inner();
            write_minted(&out_dir, &minted)?;
            println!("wrote {spiffe_id} to {}", out_dir.display());
        }
        BrokerCommand::Status { output } => {
            let json = client.status(pb::StatusRequest {}).await?.into_inner().json;
            if output == Output::Json {
                println!("{json}");
            } else {
                print_status_table(&serde_json::from_str(&json)?);
            }
        }
    }
    Ok(())
}

fn write_minted(dir: &std::path::Path, minted: &pb::MintX509SvidResponse) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("svid.pem"), &minted.cert_chain_pem)?;
    std::fs::write(dir.join("bundle.json"), &minted.bundle_json)?;
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("svid.key"))?;
    key.write_all(minted.key_pem.as_bytes())?;
    Ok(())
}

fn unix_to_rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

fn print_status_table(status: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!(
        "trust domain {}  sequence {}  bundle endpoint {} ({})  API {}",
        s(&status["trust_domain"]),
        status["sequence"],
        s(&status["bundle_endpoint"]),
        s(&status["bundle_endpoint_profile"]),
        s(&status["api"])
    );
    println!(
        "\nROOTS\n{:<10} {:<22} {:<22} REMOVE AFTER",
        "STATUS", "NOT BEFORE", "NOT AFTER"
    );
    for root in status["roots"].as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<22} {:<22} {}",
            s(&root["status"]),
            s(&root["not_before"]),
            s(&root["not_after"]),
            root["remove_after"].as_str().unwrap_or("-")
        );
    }
    println!(
        "\nFEDERATION\n{:<20} {:<9} {:<22} {:<22} LAST ERROR",
        "TRUST DOMAIN", "SEQUENCE", "FETCHED", "LAST SUCCESS"
    );
    for fed in status["federation"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<9} {:<22} {:<22} {}",
            s(&fed["trust_domain"]),
            fed["sequence"],
            fed["fetched_at"].as_str().unwrap_or("-"),
            fed["last_success"].as_str().unwrap_or("never"),
            fed["last_error"].as_str().unwrap_or("-")
        );
    }
}

/// Runs `isthmus bundle …`.
pub fn run_bundle(args: BundleArgs, env: &dyn Environment) -> Result<(), Failure> {
    let socket = admin_socket(args.admin_socket.as_ref(), &args.config, env)?;
    let BundleCommand::Show { format } = args.command;
    let format = match format {
        BundleFormat::Spiffe => "spiffe",
        BundleFormat::Pem => "pem",
    };
    runtime()?.block_on(async {
        let mut client = admin_client(socket).await?;
        let doc = client
            .show_bundle(pb::ShowBundleRequest {
                format: format.into(),
            })
            .await?
            .into_inner()
            .document;
        println!("{doc}");
        anyhow::Ok(())
    })?;
    Ok(())
}
