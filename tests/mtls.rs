//! SPIFFE mTLS between workloads of two trust domains (`west.example` client, `east.example`
//! server) over real TCP and over quinn on 127.0.0.1: the accepted case, a matrix of rejections
//! each asserting the specific error, and SVID rotation under a live connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::ca::{CertificateAuthority, DEFAULT_CA_TTL, DEFAULT_LEAF_TTL};
use isthmus_core::svid::SvidError;
use isthmus_core::tls::{
    self, AllowAnyTrusted, AllowIds, Authorizer, MtlsSettings, RejectionObserver,
    SpiffeClientCertVerifier, SpiffeServerCertVerifier,
};
use isthmus_core::verify::VerifyError;
use isthmus_core::{Bundle, SpiffeId, SvidSource, TrustDomain, TrustStore};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALPN: &[u8] = b"isthmus-test/1";
const CLIENT_ID: &str = "spiffe://west.example/ns/demo/sa/client";
const SERVER_ID: &str = "spiffe://east.example/ns/demo/sa/server";

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Domains {
    west: CertificateAuthority,
    east: CertificateAuthority,
}

impl Domains {
    fn new() -> Self {
        Self {
            west: CertificateAuthority::generate(
                TrustDomain::new("west.example").unwrap(),
                now(),
                DEFAULT_CA_TTL,
            )
            .unwrap(),
            east: CertificateAuthority::generate(
                TrustDomain::new("east.example").unwrap(),
                now(),
                DEFAULT_CA_TTL,
            )
            .unwrap(),
        }
    }

    fn trust(&self, west: bool, east: bool) -> TrustStore {
        let mut bundles: Vec<Bundle> = Vec::new();
        if west {
            bundles.push(self.west.bundle());
        }
        if east {
            bundles.push(self.east.bundle());
        }
        TrustStore::from_bundles(bundles)
    }
}

/// A leaf certificate built by hand (to break one rule at a time), signed by `ca`'s key.
struct Leaf {
    uris: Vec<String>,
    is_ca: bool,
    eku: Vec<ExtendedKeyUsagePurpose>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Leaf {
    fn valid(uri: &str) -> Self {
        Self {
            uris: vec![uri.to_owned()],
            is_ca: false,
            eku: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now() - Duration::from_secs(60),
            not_after: now() + Duration::from_secs(3600),
        }
    }

    fn sign(
        self,
        ca: &CertificateAuthority,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let ca_key =
            KeyPair::from_pkcs8_der_and_sign_algo(ca.private_key(), &rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap();
        let issuer = Issuer::from_ca_cert_der(ca.certificate(), ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "test");
        params.subject_alt_names = self
            .uris
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().unwrap()))
            .collect();
        params.is_ca = if self.is_ca {
            IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = self.eku;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        let cert = params.signed_by(&key, &issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// Collects every rejection a verifier reports.
#[derive(Clone, Default)]
struct Rejections(Arc<Mutex<Vec<VerifyError>>>);

impl Rejections {
    fn observer(&self) -> RejectionObserver {
        let seen = self.0.clone();
        Arc::new(move |e: &VerifyError| seen.lock().unwrap().push(e.clone()))
    }
    fn all(&self) -> Vec<VerifyError> {
        self.0.lock().unwrap().clone()
    }
}

enum Identity {
    /// A proper SVID issued by the CA, served through an SvidSource.
    Svid(SvidSource),
    /// A hand-made chain that breaks a rule.
    Raw(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    /// No certificate at all (clients only).
    None,
}

struct Side {
    identity: Identity,
    trust: TrustStore,
    authorizer: Arc<dyn Authorizer>,
    rejections: Rejections,
}

fn server_tls(side: &Side) -> ServerConfig {
    let verifier = Arc::new(SpiffeClientCertVerifier::new(
        side.trust.clone(),
        side.authorizer.clone(),
        Some(side.rejections.observer()),
    ));
    let builder = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier);
    let mut config = match &side.identity {
        Identity::Svid(source) => tls::server_config(&MtlsSettings {
            svid: source.clone(),
            trust: side.trust.clone(),
            authorizer: side.authorizer.clone(),
            alpn: vec![],
            observer: Some(side.rejections.observer()),
        })
        .unwrap(),
        Identity::Raw(chain, key) => builder
            .with_single_cert(chain.clone(), key.clone_key())
            .unwrap(),
        Identity::None => unreachable!("a server always has a certificate"),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config
}

fn client_tls(side: &Side) -> ClientConfig {
    let verifier = Arc::new(SpiffeServerCertVerifier::new(
        side.trust.clone(),
        side.authorizer.clone(),
        Some(side.rejections.observer()),
    ));
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &side.identity {
        Identity::Svid(source) => tls::client_config(&MtlsSettings {
            svid: source.clone(),
            trust: side.trust.clone(),
            authorizer: side.authorizer.clone(),
            alpn: vec![],
            observer: Some(side.rejections.observer()),
        })
        .unwrap(),
        Identity::Raw(chain, key) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .unwrap(),
        Identity::None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config
}

/// What one handshake produced on each side.
struct Outcome {
    /// The client's ID as the server saw it, or the server's error text.
    server: Result<SpiffeId, String>,
    /// The server's ID as the client saw it, or the client's error text.
    client: Result<SpiffeId, String>,
    /// rustls errors recovered from the TCP sides (None over QUIC).
    server_rustls: Option<rustls::Error>,
    client_rustls: Option<rustls::Error>,
}

fn rustls_error(e: &std::io::Error) -> Option<rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
}

async fn echo_once<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S) {
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

async fn handshake_tcp(server: &Side, client: &Side) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(server)));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let peer = tls::peer_id(tls.get_ref().1.peer_certificates().unwrap_or_default());
                let mut buf = [0u8; 4];
                if tls.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = tls.write_all(b"pong").await;
                    let _ = tls.flush().await;
                }
                Ok(peer.unwrap())
            }
            Err(e) => Err(e),
        }
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(client)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_result = match connector
        .connect(ServerName::try_from("server.invalid").unwrap(), tcp)
        .await
    {
        Ok(mut tls) => {
            let peer =
                tls::peer_id(tls.get_ref().1.peer_certificates().unwrap_or_default()).unwrap();
            // In TLS 1.3 the server checks the client's certificate after the client has
            // finished, so a rejected client learns it on its first read.
            let echoed = async {
                tls.write_all(b"ping").await?;
                tls.flush().await?;
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            };
            match echoed.await {
                Ok(buf) if &buf == b"pong" => Ok(peer),
                Ok(_) => Err(std::io::Error::other("bad echo")),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let server_result = server_task.await.unwrap();
    Outcome {
        server_rustls: server_result.as_ref().err().and_then(rustls_error),
        client_rustls: client_result.as_ref().err().and_then(rustls_error),
        server: server_result.map_err(|e| e.to_string()),
        client: client_result.map_err(|e| e.to_string()),
    }
}

fn quic_server(server: &Side) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(server)).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn quic_client(client: &Side) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(client)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

fn quic_peer(conn: &quinn::Connection) -> SpiffeId {
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    tls::peer_id(&certs).unwrap()
}

async fn handshake_quic(server: &Side, client: &Side) -> Outcome {
    let server_ep = quic_server(server);
    let addr: SocketAddr = server_ep.local_addr().unwrap();
    let accept_ep = server_ep.clone();
    let server_task = tokio::spawn(async move {
        let incoming = accept_ep.accept().await.unwrap();
        match incoming.await {
            Ok(conn) => {
                let peer = quic_peer(&conn);
                if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 4];
                    if recv.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                        let _ = send.write_all(b"pong").await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                }
                Ok(peer)
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let client_ep = quic_client(client);
    let client_result = async {
        let conn = client_ep
            .connect(addr, "server.invalid")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let peer = quic_peer(&conn);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"pong" {
            return Err("bad echo".to_owned());
        }
        Ok(peer)
    }
    .await;
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .unwrap()
        .unwrap();
    client_ep.close(0u32.into(), b"done");
    server_ep.close(0u32.into(), b"done");
    Outcome {
        server: server_result,
        client: client_result,
        server_rustls: None,
        client_rustls: None,
    }
}

type Check = fn(&VerifyError) -> bool;

/// Who must reject, and with which error.
enum Expect {
    Accept,
    ServerRejects(Check),
    ClientRejects(Check),
    /// The client sent no certificate: rustls itself refuses before any verifier runs.
    NoClientCertificate,
}

struct Case {
    name: &'static str,
    server: Side,
    client: Side,
    expect: Expect,
}

fn side(identity: Identity, trust: TrustStore, authorizer: Arc<dyn Authorizer>) -> Side {
    Side {
        identity,
        trust,
        authorizer,
        rejections: Rejections::default(),
    }
}

fn cases(d: &Domains) -> Vec<Case> {
    let svid = |ca: &CertificateAuthority, s: &str| {
        Identity::Svid(
            SvidSource::new(ca.issue_svid(&id(s), DEFAULT_LEAF_TTL, now()).unwrap()).unwrap(),
        )
    };
    let both = || d.trust(true, true);
    let any: fn() -> Arc<dyn Authorizer> = || Arc::new(AllowAnyTrusted);
    let good_server = || side(svid(&d.east, SERVER_ID), both(), any());
    let good_client = || side(svid(&d.west, CLIENT_ID), both(), any());
    let raw_client = |leaf: Leaf, ca: &CertificateAuthority| {
        let (chain, key) = leaf.sign(ca);
        side(Identity::Raw(chain, key), both(), any())
    };
    let attacker = CertificateAuthority::generate(
        TrustDomain::new("west.example").unwrap(),
        now(),
        DEFAULT_CA_TTL,
    )
    .unwrap();
    vec![
        Case {
            name: "accepted",
            server: good_server(),
            client: good_client(),
            expect: Expect::Accept,
        },
        Case {
            name: "unknown trust domain",
            server: side(svid(&d.east, SERVER_ID), d.trust(false, true), any()),
            client: good_client(),
            expect: Expect::ServerRejects(
                |e| matches!(e, VerifyError::UnknownTrustDomain(td) if td.name() == "west.example"),
            ),
        },
        Case {
            name: "expired leaf",
            server: good_server(),
            client: raw_client(
                Leaf {
                    not_before: now() - Duration::from_secs(7200),
                    not_after: now() - Duration::from_secs(3600),
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(
                |e| matches!(e, VerifyError::Expired { id, .. } if id.as_str() == CLIENT_ID),
            ),
        },
        Case {
            name: "not-yet-valid leaf",
            server: good_server(),
            client: raw_client(
                Leaf {
                    not_before: now() + Duration::from_secs(3600),
                    not_after: now() + Duration::from_secs(7200),
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(|e| matches!(e, VerifyError::NotYetValid { .. })),
        },
        Case {
            name: "leaf with CA=true",
            server: good_server(),
            client: raw_client(
                Leaf {
                    is_ca: true,
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(|e| {
                matches!(e, VerifyError::NotAnSvid(SvidError::LeafIsCa))
            }),
        },
        Case {
            name: "client leaf without clientAuth",
            server: good_server(),
            client: raw_client(
                Leaf {
                    eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(|e| {
                matches!(
                    e,
                    VerifyError::WrongKeyUsage {
                        required: "clientAuth",
                        ..
                    }
                )
            }),
        },
        Case {
            name: "server leaf without serverAuth",
            server: {
                let (chain, key) = Leaf {
                    eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
                    ..Leaf::valid(SERVER_ID)
                }
                .sign(&d.east);
                side(Identity::Raw(chain, key), both(), any())
            },
            client: good_client(),
            expect: Expect::ClientRejects(|e| {
                matches!(
                    e,
                    VerifyError::WrongKeyUsage {
                        required: "serverAuth",
                        ..
                    }
                )
            }),
        },
        Case {
            name: "foreign root claiming the trust domain",
            server: good_server(),
            client: raw_client(Leaf::valid(CLIENT_ID), &attacker),
            expect: Expect::ServerRejects(
                |e| matches!(e, VerifyError::UnknownIssuer { trust_domain, .. } if trust_domain.name() == "west.example"),
            ),
        },
        Case {
            name: "no client certificate",
            server: good_server(),
            client: side(Identity::None, both(), any()),
            expect: Expect::NoClientCertificate,
        },
        Case {
            name: "two URI SANs",
            server: good_server(),
            client: raw_client(
                Leaf {
                    uris: vec![
                        CLIENT_ID.into(),
                        "spiffe://west.example/ns/demo/sa/other".into(),
                    ],
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(|e| {
                matches!(
                    e,
                    VerifyError::NotAnSvid(SvidError::MultipleUriSans { count: 2 })
                )
            }),
        },
        Case {
            name: "non-SPIFFE URI SAN",
            server: good_server(),
            client: raw_client(
                Leaf {
                    uris: vec!["https://west.example/ns/demo/sa/client".into()],
                    ..Leaf::valid(CLIENT_ID)
                },
                &d.west,
            ),
            expect: Expect::ServerRejects(|e| {
                matches!(e, VerifyError::NotAnSvid(SvidError::NotSpiffeUri { .. }))
            }),
        },
        Case {
            name: "authorization callback refusing",
            server: side(
                svid(&d.east, SERVER_ID),
                both(),
                Arc::new(AllowIds(vec![id(
                    "spiffe://west.example/ns/demo/sa/someone-else",
                )])),
            ),
            client: good_client(),
            expect: Expect::ServerRejects(
                |e| matches!(e, VerifyError::Unauthorized { id, .. } if id.as_str() == CLIENT_ID),
            ),
        },
    ]
}

fn check(case: &Case, outcome: &Outcome, transport: &str) {
    let name = format!("{transport}: {}", case.name);
    let server_seen = case.server.rejections.all();
    let client_seen = case.client.rejections.all();
    match &case.expect {
        Expect::Accept => {
            assert_eq!(
                outcome.server.as_ref().map(SpiffeId::as_str),
                Ok(CLIENT_ID),
                "{name}"
            );
            assert_eq!(
                outcome.client.as_ref().map(SpiffeId::as_str),
                Ok(SERVER_ID),
                "{name}"
            );
            assert!(server_seen.is_empty() && client_seen.is_empty(), "{name}");
        }
        Expect::ServerRejects(want) => {
            assert!(outcome.server.is_err(), "{name}: server accepted");
            assert!(
                outcome.client.is_err(),
                "{name}: client kept a rejected connection"
            );
            assert!(
                matches!(server_seen.as_slice(), [e] if want(e)),
                "{name}: server saw {server_seen:?}"
            );
            if let Some(err) = &outcome.server_rustls {
                let e = tls::verify_error(err).unwrap_or_else(|| panic!("{name}: {err:?}"));
                assert!(want(e), "{name}: {e:?}");
            } else {
                // Over QUIC the verifying side reports the rustls error as text.
                let text = outcome.server.as_ref().unwrap_err();
                assert!(
                    text.contains(&format!("{:?}", server_seen[0])),
                    "{name}: {text}"
                );
            }
        }
        Expect::ClientRejects(want) => {
            assert!(outcome.client.is_err(), "{name}: client accepted");
            assert!(
                matches!(client_seen.as_slice(), [e] if want(e)),
                "{name}: client saw {client_seen:?}"
            );
            if let Some(err) = &outcome.client_rustls {
                let e = tls::verify_error(err).unwrap_or_else(|| panic!("{name}: {err:?}"));
                assert!(want(e), "{name}: {e:?}");
            } else {
                let text = outcome.client.as_ref().unwrap_err();
                assert!(
                    text.contains(&format!("{:?}", client_seen[0])),
                    "{name}: {text}"
                );
            }
        }
        Expect::NoClientCertificate => {
            assert!(
                outcome.client.is_err(),
                "{name}: client connected without a certificate"
            );
            match &outcome.server_rustls {
                Some(err) => assert_eq!(err, &rustls::Error::NoCertificatesPresented, "{name}"),
                None => {
                    let text = outcome.server.as_ref().unwrap_err();
                    assert!(text.contains("peer sent no certificates"), "{name}: {text}");
                }
            }
        }
    }
}

#[tokio::test]
async fn mtls_matrix_over_tcp() {
    let d = Domains::new();
    for case in cases(&d) {
        let outcome = handshake_tcp(&case.server, &case.client).await;
        check(&case, &outcome, "tcp");
    }
}

#[tokio::test]
async fn mtls_matrix_over_quic() {
    let d = Domains::new();
    for case in cases(&d) {
        let outcome = handshake_quic(&case.server, &case.client).await;
        check(&case, &outcome, "quic");
    }
}

/// The server swaps its SVID while a connection stays open: the open connection keeps working
/// and new handshakes present the new certificate.
#[tokio::test]
async fn rotation_keeps_live_connections() {
    let d = Domains::new();
    let first = d
        .east
        .issue_svid(&id(SERVER_ID), DEFAULT_LEAF_TTL, now())
        .unwrap();
    let source = SvidSource::new(first.clone()).unwrap();
    let server = side(
        Identity::Svid(source.clone()),
        d.trust(true, true),
        Arc::new(AllowAnyTrusted),
    );
    let client = side(
        Identity::Svid(
            SvidSource::new(
                d.west
                    .issue_svid(&id(CLIENT_ID), DEFAULT_LEAF_TTL, now())
                    .unwrap(),
            )
            .unwrap(),
        ),
        d.trust(true, true),
        Arc::new(AllowAnyTrusted),
    );

    // TCP: one long-lived server task echoing on every accepted connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(&server)));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.unwrap();
                let mut buf = [0u8; 4];
                while tls.read_exact(&mut buf).await.is_ok() {
                    tls.write_all(b"pong").await.unwrap();
                }
            });
        }
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&client)));
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect(ServerName::try_from("server.invalid").unwrap(), tcp)
            .await
            .unwrap()
    };
    let mut old = connect().await;
    echo_once(&mut old).await;
    assert_eq!(
        old.get_ref().1.peer_certificates().unwrap()[0],
        *first.leaf()
    );

    // QUIC: the same server identity, read through the same source.
    let quic = quic_server(&server);
    let quic_addr = quic.local_addr().unwrap();
    let quic_accept = quic.clone();
    tokio::spawn(async move {
        while let Some(incoming) = quic_accept.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 4];
                    recv.read_exact(&mut buf).await.unwrap();
                    send.write_all(b"pong").await.unwrap();
                    send.finish().unwrap();
                }
            });
        }
    });
    let quic_client_ep = quic_client(&client);
    let quic_echo = |conn: quinn::Connection| async move {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        recv.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    };
    let old_quic = quic_client_ep
        .connect(quic_addr, "server.invalid")
        .unwrap()
        .await
        .unwrap();
    quic_echo(old_quic.clone()).await;

    // Rotate: a new key and certificate for the same ID.
    let second = d
        .east
        .issue_svid(&id(SERVER_ID), DEFAULT_LEAF_TTL, now())
        .unwrap();
    assert_ne!(first.leaf(), second.leaf());
    source.rotate(second.clone()).unwrap();

    echo_once(&mut old).await;
    quic_echo(old_quic.clone()).await;
    let mut fresh = connect().await;
    echo_once(&mut fresh).await;
    assert_eq!(
        fresh.get_ref().1.peer_certificates().unwrap()[0],
        *second.leaf()
    );
    assert_eq!(
        old.get_ref().1.peer_certificates().unwrap()[0],
        *first.leaf()
    );
    let fresh_quic = quic_client_ep
        .connect(quic_addr, "server.invalid")
        .unwrap()
        .await
        .unwrap();
    let certs = fresh_quic
        .peer_identity()
        .unwrap()
        .downcast::<Vec<CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(certs[0], *second.leaf());
    quic_echo(fresh_quic).await;
    quic_echo(old_quic).await;
    quic_client_ep.close(0u32.into(), b"done");
    quic.close(0u32.into(), b"done");
}
