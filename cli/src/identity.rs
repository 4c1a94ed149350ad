//! `isthmus identity …`: the identity demo (two trust domains, no shared root) and inspection
//! of certificates and bundles.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use isthmus_core::config::{ConfigError, EnvBinding, HumanDuration, Validate};
use isthmus_core::tls::{self, AllowIds, MtlsSettings};
use isthmus_core::verify::{SvidUsage, verify_svid_chain};
use isthmus_core::x509::{self, CertFacts};
use isthmus_core::{
    Bundle, BundleSet, CertificateAuthority, SpiffeId, SvidSource, TrustDomain, TrustStore,
    X509Svid,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Configuration of `isthmus identity demo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// The client's trust domain.
    pub trust_domain: TrustDomain,
    /// The server's trust domain.
    pub peer_trust_domain: TrustDomain,
    /// Lifetime of issued SVIDs.
    pub leaf_ttl: HumanDuration,
    /// Lifetime of each CA.
    pub ca_ttl: HumanDuration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            trust_domain: TrustDomain::new("west.example").unwrap_or_else(|_| unreachable!()),
            peer_trust_domain: TrustDomain::new("east.example").unwrap_or_else(|_| unreachable!()),
            leaf_ttl: HumanDuration(isthmus_core::ca::DEFAULT_LEAF_TTL),
            ca_ttl: HumanDuration(isthmus_core::ca::DEFAULT_CA_TTL),
        }
    }
}

/// Environment variables of the demo.
pub const DEMO_ENV: &[EnvBinding] = &[
    EnvBinding {
        name: "ISTHMUS_DEMO_TRUST_DOMAIN",
        field: "trust_domain",
    },
    EnvBinding {
        name: "ISTHMUS_DEMO_PEER_TRUST_DOMAIN",
        field: "peer_trust_domain",
    },
    EnvBinding {
        name: "ISTHMUS_DEMO_LEAF_TTL",
        field: "leaf_ttl",
    },
    EnvBinding {
        name: "ISTHMUS_DEMO_CA_TTL",
        field: "ca_ttl",
    },
];

impl Validate for DemoConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.peer_trust_domain == self.trust_domain {
            return Err(ConfigError::validation(
                "peer_trust_domain",
                format!(
                    "must differ from trust_domain ({}): the demo federates two domains",
                    self.trust_domain
                ),
            ));
        }
        if self.leaf_ttl.get() < Duration::from_secs(1) {
            return Err(ConfigError::validation("leaf_ttl", "must be at least 1s"));
        }
        if self.ca_ttl.get() < self.leaf_ttl.get() {
            return Err(ConfigError::validation(
                "ca_ttl",
                format!("must be at least leaf_ttl ({})", self.leaf_ttl),
            ));
        }
        Ok(())
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn describe(facts: &CertFacts) -> String {
    let ku = facts.key_usage.map_or("none".to_owned(), |ku| {
        let mut bits = Vec::new();
        if ku.digital_signature {
            bits.push("digitalSignature");
        }
        if ku.key_cert_sign {
            bits.push("keyCertSign");
        }
        if ku.crl_sign {
            bits.push("cRLSign");
        }
        format!(
            "{}{}",
            bits.join("+"),
            if ku.critical { " (critical)" } else { "" }
        )
    });
    let eku = match facts.eku {
        None => "none".to_owned(),
        Some((server, client)) => [(server, "serverAuth"), (client, "clientAuth")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join("+"),
    };
    format!(
        "CA={} keyUsage={ku} extKeyUsage={eku} valid {} .. {}",
        facts.is_ca,
        rfc3339(facts.not_before),
        rfc3339(facts.not_after)
    )
}

/// Runs the identity demo and prints what happened.
pub async fn demo(cfg: &DemoConfig) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let west = CertificateAuthority::generate(cfg.trust_domain.clone(), now, cfg.ca_ttl.get())?;
    let east =
        CertificateAuthority::generate(cfg.peer_trust_domain.clone(), now, cfg.ca_ttl.get())?;
    println!("Isthmus identity demo: two trust domains, each with its own root CA\n");
    for ca in [&west, &east] {
        println!(
            "  CA {:<28} {}",
            ca.trust_domain().id(),
            describe(&x509::facts(ca.certificate(), 0)?)
        );
    }

    let client_id = cfg
        .trust_domain
        .workload_id(&["ns", "demo", "sa", "client"])?;
    let server_id = cfg
        .peer_trust_domain
        .workload_id(&["ns", "demo", "sa", "server"])?;
    let client_svid = west.issue_svid(&client_id, cfg.leaf_ttl.get(), now)?;
    let server_svid = east.issue_svid(&server_id, cfg.leaf_ttl.get(), now)?;
    println!("\nIssued X.509-SVIDs (ECDSA P-256, one URI SAN):");
    for svid in [&client_svid, &server_svid] {
        println!(
            "  {:<45} {}",
            svid.id(),
            describe(&x509::facts(svid.leaf(), 0)?)
        );
    }

    println!("\nVerification picks the bundle of the peer's own trust domain:");
    let federated = BundleSet::new([west.bundle(), east.bundle()]);
    let east_only = BundleSet::new([east.bundle()]);
    let foreign = CertificateAuthority::generate(cfg.trust_domain.clone(), now, cfg.ca_ttl.get())?;
    let impostor = foreign.issue_svid(&client_id, cfg.leaf_ttl.get(), now)?;
    let checks: [(&str, &X509Svid, &BundleSet); 3] = [
        ("client SVID, both bundles held", &client_svid, &federated),
        (
            "client SVID, west bundle not held",
            &client_svid,
            &east_only,
        ),
        ("impostor root claiming the domain", &impostor, &federated),
    ];
    for (label, svid, bundles) in checks {
        match verify_svid_chain(svid.chain(), bundles, UnixTime::now(), SvidUsage::TlsClient) {
            Ok(v) => println!("  {label:<36} accepted as {}", v.id),
            Err(e) => println!("  {label:<36} rejected: {e}"),
        }
    }

    let (server_saw, client_saw, addr) =
        handshake(&west, &east, client_svid.clone(), server_svid.clone()).await?;
    println!("\nmTLS over TCP on {addr} (TLS 1.3, each side authorizes one peer ID):");
    println!("  server saw client {server_saw}");
    println!("  client saw server {client_saw}");
    if server_saw != client_id || client_saw != server_id {
        bail!("identities seen in the handshake do not match the issued SVIDs");
    }

    println!(
        "\nBundle of {} as its bundle endpoint will publish it (SPIFFE format):",
        cfg.trust_domain
    );
    let mut bundle = west.bundle();
    bundle.set_sequence(Some(1));
    bundle.set_refresh_hint(Some(Duration::from_secs(300)));
    println!("{}", bundle.to_json()?);
    Ok(())
}

/// One mTLS connection on 127.0.0.1 between the two SVIDs; returns what each side saw.
async fn handshake(
    west: &CertificateAuthority,
    east: &CertificateAuthority,
    client_svid: X509Svid,
    server_svid: X509Svid,
) -> anyhow::Result<(SpiffeId, SpiffeId, std::net::SocketAddr)> {
    let trust = TrustStore::from_bundles([west.bundle(), east.bundle()]);
    let client_id = client_svid.id().clone();
    let server_id = server_svid.id().clone();
    let server = MtlsSettings {
        svid: SvidSource::new(server_svid)?,
        trust: trust.clone(),
        authorizer: Arc::new(AllowIds(vec![client_id])),
        alpn: vec![b"isthmus-demo".to_vec()],
        observer: None,
    };
    let client = MtlsSettings {
        svid: SvidSource::new(client_svid)?,
        trust,
        authorizer: Arc::new(AllowIds(vec![server_id])),
        alpn: vec![b"isthmus-demo".to_vec()],
        observer: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(&server)?));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut stream = acceptor.accept(tcp).await?;
        let peer = tls::peer_id(stream.get_ref().1.peer_certificates().unwrap_or_default());
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await?;
        stream.write_all(&buf).await?;
        stream.shutdown().await?;
        peer.context("client presented no SPIFFE ID")
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(&client)?));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = connector
        .connect(ServerName::try_from("server.invalid")?, tcp)
        .await?;
    let client_saw = tls::peer_id(stream.get_ref().1.peer_certificates().unwrap_or_default())
        .context("server presented no SPIFFE ID")?;
    stream.write_all(b"hello").await?;
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).await?;
    let server_saw = server_task.await??;
    Ok((server_saw, client_saw, addr))
}

/// Prints the SPIFFE facts of every certificate in a PEM or DER file.
pub fn inspect(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = match x509::certs_from_pem(&bytes) {
        Ok(certs) => certs,
        Err(x509::CertError::NoPemBlocks) => x509::split_der_chain(&bytes)?,
        Err(e) => return Err(e.into()),
    };
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    for (index, cert) in certs.iter().enumerate() {
        let facts = x509::facts(cert, index)?;
        println!("[{index}] URI SANs {:?}", facts.uri_sans);
        println!("    {}", describe(&facts));
        if index == 0 {
            match isthmus_core::svid::leaf_id(&facts) {
                Ok(id) => println!("    leaf X509-SVID for {id}"),
                Err(e) => println!("    not a leaf X509-SVID: {e}"),
            }
        }
        for finding in isthmus_core::svid::issuance_lint(&facts) {
            println!("    lint: {finding:?}");
        }
    }
    Ok(())
}

/// Parses a SPIFFE bundle and prints its authorities.
pub fn show_bundle(path: &Path, trust_domain: TrustDomain) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bundle = Bundle::parse_json(trust_domain, &bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    println!(
        "trust domain {}: {} X.509 authorities, {} JWT authorities, sequence {:?}, refresh hint {:?}",
        bundle.trust_domain(),
        bundle.x509_authorities().len(),
        bundle.jwt_authorities().len(),
        bundle.sequence(),
        bundle.refresh_hint()
    );
    for (index, cert) in bundle.x509_authorities().iter().enumerate() {
        let facts = x509::facts(cert, index)?;
        println!("  x509 [{index}] {:?} {}", facts.uri_sans, describe(&facts));
    }
    for kid in bundle.jwt_authorities().keys() {
        println!("  jwt  kid {kid}");
    }
    Ok(())
}
