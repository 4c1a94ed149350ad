//! SPIFFE mutual TLS for rustls (and so for quinn): verifiers that validate a peer's chain
//! against the bundle of the peer's own trust domain and then authorize its SPIFFE ID, and
//! certificate resolvers that always serve the current SVID, so rotation never drops a live
//! connection.
//!
//! One crypto provider (ring) serves the whole workspace: [`provider`].

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::id::{SpiffeId, TrustDomain};
use crate::source::SvidSource;
use crate::trust::TrustStore;
use crate::verify::{SvidUsage, VerifiedSvid, VerifyError, verify_svid_chain};
use crate::x509;

/// The crypto provider every TLS configuration of the workspace uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries that build their own configs.
/// Calling it again is harmless.
pub fn install_default_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _already_installed = CryptoProvider::install_default(CryptoProvider::clone(&provider()));
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("cannot build TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Decides whether a verified SPIFFE ID may talk to us. Return `Err(reason)` to refuse.
pub trait Authorizer: Send + Sync + fmt::Debug {
    /// Authorizes a peer whose chain already verified.
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String>;
}

/// Authorizes every peer whose chain verifies against a trusted bundle.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAnyTrusted;

impl Authorizer for AllowAnyTrusted {
    fn authorize(&self, _peer: &SpiffeId) -> Result<(), String> {
        Ok(())
    }
}

/// Authorizes peers from the listed trust domains.
#[derive(Debug, Clone, Default)]
pub struct AllowTrustDomains(pub Vec<TrustDomain>);

impl Authorizer for AllowTrustDomains {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        if self
            .0
            .iter()
            .any(|td| td.name() == peer.trust_domain_name())
        {
            Ok(())
        } else {
            Err(format!(
                "trust domain {} is not allowed",
                peer.trust_domain_name()
            ))
        }
    }
}

/// Authorizes exactly the listed SPIFFE IDs.
#[derive(Debug, Clone, Default)]
pub struct AllowIds(pub Vec<SpiffeId>);

impl Authorizer for AllowIds {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        if self.0.contains(peer) {
            Ok(())
        } else {
            Err("not in the allowed ID list".into())
        }
    }
}

/// Called with every rejected peer, for metrics and logs (handshake failures by reason).
pub type RejectionObserver = Arc<dyn Fn(&VerifyError) + Send + Sync>;

/// The verification shared by both directions.
#[derive(Clone)]
struct PeerVerifier {
    trust: TrustStore,
    authorizer: Arc<dyn Authorizer>,
    observer: Option<RejectionObserver>,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("authorizer", &self.authorizer)
            .finish_non_exhaustive()
    }
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: SvidUsage,
    ) -> Result<VerifiedSvid, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let result =
            verify_svid_chain(&chain, &self.trust.snapshot(), now, usage).and_then(|verified| {
                match self.authorizer.authorize(&verified.id) {
                    Ok(()) => Ok(verified),
                    Err(reason) => Err(VerifyError::Unauthorized {
                        id: verified.id,
                        reason,
                    }),
                }
            });
        result.map_err(|error| {
            tracing::debug!(reason = error.reason(), error = %error, "rejected peer SVID");
            if let Some(observer) = &self.observer {
                observer(&error);
            }
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
        })
    }

    fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
}

/// Extracts the [`VerifyError`] a SPIFFE verifier produced from a rustls error, if it is one.
pub fn verify_error(error: &rustls::Error) -> Option<&VerifyError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

/// Server-side verifier of client certificates: a client must present an SVID (unless built
/// with [`SpiffeClientCertVerifier::optional`]).
#[derive(Debug)]
pub struct SpiffeClientCertVerifier {
    inner: PeerVerifier,
    mandatory: bool,
}

impl SpiffeClientCertVerifier {
    /// Verifies client SVIDs against `trust`, then asks `authorizer`.
    pub fn new(
        trust: TrustStore,
        authorizer: Arc<dyn Authorizer>,
        observer: Option<RejectionObserver>,
    ) -> Self {
        Self {
            inner: PeerVerifier {
                trust,
                authorizer,
                observer,
            },
            mandatory: true,
        }
    }

    /// Like [`Self::new`], but a client may also connect without any certificate (a client
    /// that presents one must still present a valid, authorized SVID). For endpoints where an
    /// unauthenticated call is part of the protocol, such as node attestation with a join
    /// token; the application then checks per call whether a peer ID is present.
    pub fn optional(
        trust: TrustStore,
        authorizer: Arc<dyn Authorizer>,
        observer: Option<RejectionObserver>,
    ) -> Self {
        Self {
            mandatory: false,
            ..Self::new(trust, authorizer, observer)
        }
    }
}

impl ClientCertVerifier for SpiffeClientCertVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Roots come from many trust domains and change at runtime; hinting them would only
        // leak the federation list.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, now, SvidUsage::TlsClient)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client-side verifier of the server's SVID. The TLS server name is ignored: SVIDs name
/// workloads by URI SAN, and the authorizer decides which IDs are acceptable.
#[derive(Debug)]
pub struct SpiffeServerCertVerifier {
    inner: PeerVerifier,
}

impl SpiffeServerCertVerifier {
    /// Verifies server SVIDs against `trust`, then asks `authorizer`.
    pub fn new(
        trust: TrustStore,
        authorizer: Arc<dyn Authorizer>,
        observer: Option<RejectionObserver>,
    ) -> Self {
        Self {
            inner: PeerVerifier {
                trust,
                authorizer,
                observer,
            },
        }
    }
}

impl ServerCertVerifier for SpiffeServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify(end_entity, intermediates, now, SvidUsage::TlsServer)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serves the current SVID of a [`SvidSource`] on every handshake, as server or client.
#[derive(Debug, Clone)]
pub struct SvidCertResolver {
    source: SvidSource,
}

impl SvidCertResolver {
    /// A resolver reading from `source`.
    pub fn new(source: SvidSource) -> Self {
        Self { source }
    }
}

impl ResolvesServerCert for SvidCertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.source.current().certified_key.clone())
    }
}

impl rustls::client::ResolvesClientCert for SvidCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.source.current().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Everything a SPIFFE mTLS endpoint needs: its own SVID, whom it trusts, whom it admits.
#[derive(Clone)]
pub struct MtlsSettings {
    /// Our own SVID, rotated in place.
    pub svid: SvidSource,
    /// The bundles of every trusted trust domain.
    pub trust: TrustStore,
    /// Which verified peers are accepted.
    pub authorizer: Arc<dyn Authorizer>,
    /// ALPN protocols offered or accepted, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    /// Told about every rejected peer.
    pub observer: Option<RejectionObserver>,
}

impl fmt::Debug for MtlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsSettings")
            .field("svid", &self.svid.current().svid.id())
            .field("authorizer", &self.authorizer)
            .finish_non_exhaustive()
    }
}

/// Session resumption would skip certificate verification on later connections: a peer
/// whose bundle was revoked, or whose SVID rotated, would keep its old identity. Every SPIFFE
/// connection therefore runs a full handshake.
pub fn disable_resumption_server(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// A TLS 1.3 server configuration requiring client SVIDs. Usable with tokio-rustls and, through
/// `QuicServerConfig::try_from`, with quinn.
pub fn server_config(settings: &MtlsSettings) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientCertVerifier::new(
        settings.trust.clone(),
        settings.authorizer.clone(),
        settings.observer.clone(),
    );
    server_config_with(settings, verifier)
}

/// Like [`server_config`], but clients without a certificate are admitted too (see
/// [`SpiffeClientCertVerifier::optional`]).
pub fn server_config_optional_client(settings: &MtlsSettings) -> Result<ServerConfig, TlsError> {
    let verifier = SpiffeClientCertVerifier::optional(
        settings.trust.clone(),
        settings.authorizer.clone(),
        settings.observer.clone(),
    );
    server_config_with(settings, verifier)
}

fn server_config_with(
    settings: &MtlsSettings,
    verifier: SpiffeClientCertVerifier,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SvidCertResolver::new(settings.svid.clone())));
    config.alpn_protocols = settings.alpn.clone();
    disable_resumption_server(&mut config);
    Ok(config)
}

/// A TLS 1.3 client configuration that verifies the server's SVID but presents no certificate
/// (for bootstrapping: node attestation before the node has an SVID).
pub fn anonymous_client_config(
    trust: TrustStore,
    authorizer: Arc<dyn Authorizer>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerCertVerifier::new(trust, authorizer, None);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A TLS 1.3 client configuration presenting our SVID and verifying the server's. Usable with
/// tokio-rustls and, through `QuicClientConfig::try_from`, with quinn.
pub fn client_config(settings: &MtlsSettings) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerCertVerifier::new(
        settings.trust.clone(),
        settings.authorizer.clone(),
        settings.observer.clone(),
    );
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SvidCertResolver::new(settings.svid.clone())));
    config.alpn_protocols = settings.alpn.clone();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The SPIFFE ID of a peer whose certificates a handshake already verified (for example
/// `conn.peer_certificates()`).
pub fn peer_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    let leaf = certs.first()?;
    let facts = x509::facts(leaf, 0).ok()?;
    crate::svid::leaf_id(&facts).ok()
}
