//! X.509-SVID chain verification (X509-SVID §5): the leaf rules, then RFC 5280 path validation
//! by webpki against the bundle of the leaf's *own* trust domain — never a pool of every root.

use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use webpki::{EndEntityCert, ExtendedKeyUsageValidator, KeyPurposeIdIter, KeyUsage};

use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};
use crate::trust::BundleSet;
use crate::x509;

/// What the verified certificate is used for; decides which extended key usage must be present
/// when the certificate carries that extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidUsage {
    /// A TLS server certificate: serverAuth if EKU is present.
    TlsServer,
    /// A TLS client certificate: clientAuth if EKU is present.
    TlsClient,
    /// Any use: EKU is not checked (go-spiffe's `x509svid.Verify`).
    Any,
}

/// Why a peer's SVID was not accepted. Messages name the identity or value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The leaf breaks an X509-SVID rule (URI SAN count, CA flag, key usage…).
    #[error("peer certificate is not a valid X509-SVID: {0}")]
    NotAnSvid(#[from] SvidError),
    /// The peer's trust domain has no bundle here.
    #[error("trust domain {0} is not trusted (no bundle)")]
    UnknownTrustDomain(TrustDomain),
    /// The trust domain's bundle has no X.509 authority, so every SVID of it is invalid.
    #[error("bundle of trust domain {0} has no X.509 authorities")]
    NoAuthorities(TrustDomain),
    /// A certificate of the chain has expired.
    #[error("certificate of {id} expired at {not_after} (now {now})")]
    Expired {
        /// The peer's claimed ID.
        id: SpiffeId,
        /// Its end of validity, RFC 3339.
        not_after: String,
        /// Verification time, RFC 3339.
        now: String,
    },
    /// A certificate of the chain is not valid yet.
    #[error("certificate of {id} is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The peer's claimed ID.
        id: SpiffeId,
        /// Its start of validity, RFC 3339.
        not_before: String,
        /// Verification time, RFC 3339.
        now: String,
    },
    /// The chain does not lead to any authority of the claimed trust domain.
    #[error("certificate of {id} is not signed by an authority of trust domain {trust_domain}")]
    UnknownIssuer {
        /// The peer's claimed ID.
        id: SpiffeId,
        /// The trust domain whose bundle was used.
        trust_domain: TrustDomain,
    },
    /// The leaf's extended key usage does not allow this use.
    #[error("certificate of {id} lacks extended key usage {required}")]
    WrongKeyUsage {
        /// The peer's claimed ID.
        id: SpiffeId,
        /// `serverAuth` or `clientAuth`.
        required: &'static str,
    },
    /// Any other path-validation failure, as webpki reports it.
    #[error("certificate of {id} failed path validation: {reason}")]
    Chain {
        /// The peer's claimed ID.
        id: SpiffeId,
        /// webpki's error.
        reason: String,
    },
    /// The chain is valid but the authorization policy refused this SPIFFE ID.
    #[error("SPIFFE ID {id} is not authorized: {reason}")]
    Unauthorized {
        /// The peer's ID.
        id: SpiffeId,
        /// The policy's reason.
        reason: String,
    },
}

impl VerifyError {
    /// A short, stable, low-cardinality label for metrics (`reason="expired"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::NotAnSvid(_) => "not_an_svid",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::NoAuthorities(_) => "no_authorities",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::UnknownIssuer { .. } => "unknown_issuer",
            Self::WrongKeyUsage { .. } => "wrong_key_usage",
            Self::Chain { .. } => "chain",
            Self::Unauthorized { .. } => "unauthorized",
        }
    }
}

/// A successfully verified peer SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub id: SpiffeId,
    /// End of the leaf's validity.
    pub not_after: OffsetDateTime,
}

struct AnyUsage;

impl ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, _iter: KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn unix_to_datetime(now: UnixTime) -> OffsetDateTime {
    let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Verifies an X.509-SVID chain (leaf first) at time `now` against the bundle of the leaf's
/// trust domain taken from `bundles`.
pub fn verify_svid_chain(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    usage: SvidUsage,
) -> Result<VerifiedSvid, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    let leaf_facts = x509::facts(leaf, 0).map_err(SvidError::from)?;
    let id = svid::leaf_id(&leaf_facts)?;
    for (offset, cert) in intermediates.iter().enumerate() {
        let index = offset + 1;
        svid::check_signing_cert(&x509::facts(cert, index).map_err(SvidError::from)?, index)?;
    }
    let trust_domain = id.trust_domain();
    let bundle = bundles
        .get(&trust_domain)
        .ok_or_else(|| VerifyError::UnknownTrustDomain(trust_domain.clone()))?;
    if bundle.x509_authorities().is_empty() {
        return Err(VerifyError::NoAuthorities(trust_domain));
    }
    let anchors: Vec<_> = bundle
        .x509_authorities()
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let end_entity = EndEntityCert::try_from(leaf).map_err(|e| VerifyError::Chain {
        id: id.clone(),
        reason: e.to_string(),
    })?;
    let algorithms = crate::tls::provider().signature_verification_algorithms.all;
    let result = match usage {
        SvidUsage::TlsServer => end_entity.verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            now,
            KeyUsage::server_auth(),
            None,
            None,
        ),
        SvidUsage::TlsClient => end_entity.verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            now,
            KeyUsage::client_auth(),
            None,
            None,
        ),
        SvidUsage::Any => end_entity.verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            now,
            AnyUsage,
            None,
            None,
        ),
    };
    match result {
        Ok(_) => Ok(VerifiedSvid {
            id,
            not_after: leaf_facts.not_after,
        }),
        Err(e) => Err(map_webpki_error(e, id, trust_domain, usage)),
    }
}

fn map_webpki_error(
    error: webpki::Error,
    id: SpiffeId,
    trust_domain: TrustDomain,
    usage: SvidUsage,
) -> VerifyError {
    match error {
        webpki::Error::CertExpired { time, not_after } => VerifyError::Expired {
            id,
            not_after: rfc3339(unix_to_datetime(not_after)),
            now: rfc3339(unix_to_datetime(time)),
        },
        webpki::Error::CertNotValidYet { time, not_before } => VerifyError::NotYetValid {
            id,
            not_before: rfc3339(unix_to_datetime(not_before)),
            now: rfc3339(unix_to_datetime(time)),
        },
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            VerifyError::UnknownIssuer { id, trust_domain }
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => VerifyError::WrongKeyUsage {
            id,
            required: match usage {
                SvidUsage::TlsServer => "serverAuth",
                _ => "clientAuth",
            },
        },
        other => VerifyError::Chain {
            id,
            reason: other.to_string(),
        },
    }
}
