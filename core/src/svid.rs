//! X.509-SVIDs: a certificate chain (leaf first) and the leaf's private key, checked on load the
//! way go-spiffe's `x509svid.Parse` does (X509-SVID §2–§5).

use std::fmt;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::id::{IdError, SpiffeId};
use crate::x509::{self, CertError, CertFacts};

/// Why an SVID (or one of its certificates) is not a valid X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The certificates could not be decoded.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The certificate input held no certificate.
    #[error("no certificates found")]
    NoCertificates,
    /// The key input held no PKCS#8 private key.
    #[error("no PKCS#8 private key found")]
    NoPrivateKey,
    /// The private key does not parse.
    #[error("cannot parse private key: {0}")]
    BadKey(String),
    /// The private key is not the leaf's.
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
    /// The leaf has no URI SAN.
    #[error("leaf certificate has no URI SAN (an X509-SVID has exactly one)")]
    NoUriSan,
    /// The leaf has several URI SANs.
    #[error("leaf certificate has {count} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans {
        /// How many there are.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {error}")]
    NotSpiffeUri {
        /// The URI SAN.
        uri: String,
        /// Why it is not a SPIFFE ID.
        error: IdError,
    },
    /// A leaf's SPIFFE ID has no path.
    #[error(
        "leaf SPIFFE ID {id} has no path; only signing certificates may use the trust domain ID"
    )]
    LeafIdWithoutPath {
        /// The offending ID.
        id: SpiffeId,
    },
    /// The leaf is a CA.
    #[error("leaf certificate has basicConstraints cA=true")]
    LeafIsCa,
    /// The leaf has no keyUsage extension.
    #[error("leaf certificate has no keyUsage extension")]
    LeafWithoutKeyUsage,
    /// The leaf lacks digitalSignature.
    #[error("leaf certificate keyUsage lacks digitalSignature")]
    LeafWithoutDigitalSignature,
    /// The leaf has keyCertSign.
    #[error("leaf certificate keyUsage has keyCertSign")]
    LeafCanSignCertificates,
    /// The leaf has cRLSign.
    #[error("leaf certificate keyUsage has cRLSign")]
    LeafCanSignCrls,
    /// An intermediate is not a CA.
    #[error("signing certificate {index} has basicConstraints cA=false")]
    IntermediateNotCa {
        /// Its position in the chain (the leaf is 0).
        index: usize,
    },
    /// An intermediate lacks keyCertSign.
    #[error("signing certificate {index} keyUsage lacks keyCertSign")]
    IntermediateWithoutKeyCertSign {
        /// Its position in the chain (the leaf is 0).
        index: usize,
    },
}

/// Checks the leaf rules every verifier applies (X509-SVID §5.2) and returns its SPIFFE ID.
pub fn leaf_id(facts: &CertFacts) -> Result<SpiffeId, SvidError> {
    leaf_checks(facts, false)
}

/// The leaf rules in go-spiffe's order; loading an SVID also requires digitalSignature.
fn leaf_checks(facts: &CertFacts, loading: bool) -> Result<SpiffeId, SvidError> {
    let uri = match facts.uri_sans.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => one,
        many => return Err(SvidError::MultipleUriSans { count: many.len() }),
    };
    let id = SpiffeId::parse(uri).map_err(|error| SvidError::NotSpiffeUri {
        uri: uri.clone(),
        error,
    })?;
    if id.is_trust_domain_id() {
        return Err(SvidError::LeafIdWithoutPath { id });
    }
    if facts.is_ca {
        return Err(SvidError::LeafIsCa);
    }
    if loading {
        match facts.key_usage {
            None => return Err(SvidError::LeafWithoutKeyUsage),
            Some(ku) if !ku.digital_signature => {
                return Err(SvidError::LeafWithoutDigitalSignature);
            }
            Some(_) => {}
        }
    }
    if let Some(ku) = facts.key_usage {
        if ku.key_cert_sign {
            return Err(SvidError::LeafCanSignCertificates);
        }
        if ku.crl_sign {
            return Err(SvidError::LeafCanSignCrls);
        }
    }
    Ok(id)
}

/// Checks a signing certificate of a chain (index ≥ 1): cA=true and keyCertSign.
pub fn check_signing_cert(facts: &CertFacts, index: usize) -> Result<(), SvidError> {
    if !facts.is_ca {
        return Err(SvidError::IntermediateNotCa { index });
    }
    if !facts.key_usage.is_some_and(|ku| ku.key_cert_sign) {
        return Err(SvidError::IntermediateWithoutKeyCertSign { index });
    }
    Ok(())
}

/// A finding of [`issuance_lint`]: an X509-SVID rule that a certificate we issue must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LintFinding {
    /// keyUsage is absent or not critical (X509-SVID §4.3).
    KeyUsageNotCritical,
    /// The subject is empty but the SAN extension is not critical (X509-SVID §3.1).
    NonCriticalSanWithEmptySubject,
    /// A leaf's EKU lacks serverAuth or clientAuth (X509-SVID §4.4).
    IncompleteExtendedKeyUsage,
    /// The certificate carries name constraints, which webpki rejects (X509-SVID §4.2).
    NameConstraints,
}

/// Issuer-side checks, stricter than what a verifier enforces: what our CA must never emit.
/// Verifiers stay lenient (SPIFFE-conformant peers may issue these).
pub fn issuance_lint(facts: &CertFacts) -> Vec<LintFinding> {
    let mut findings = Vec::new();
    if !facts.key_usage.is_some_and(|ku| ku.critical) {
        findings.push(LintFinding::KeyUsageNotCritical);
    }
    if facts.subject_empty && !facts.san_critical {
        findings.push(LintFinding::NonCriticalSanWithEmptySubject);
    }
    if !facts.is_ca
        && facts
            .eku
            .is_some_and(|(server, client)| !(server && client))
    {
        findings.push(LintFinding::IncompleteExtendedKeyUsage);
    }
    if facts.has_name_constraints {
        findings.push(LintFinding::NameConstraints);
    }
    findings
}

/// An X.509-SVID: SPIFFE ID, certificate chain (leaf first, no root) and PKCS#8 private key.
pub struct X509Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl X509Svid {
    /// Builds an SVID from its chain and key, checking every X509-SVID rule and that the key
    /// belongs to the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let Some(leaf) = chain.first() else {
            return Err(SvidError::NoCertificates);
        };
        let leaf_facts = x509::facts(leaf, 0)?;
        let id = leaf_checks(&leaf_facts, true)?;
        for (index, cert) in chain.iter().enumerate().skip(1) {
            check_signing_cert(&x509::facts(cert, index)?, index)?;
        }
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key.clone_key()))
            .map_err(|e| SvidError::BadKey(e.to_string()))?;
        CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(|_| SvidError::KeyMismatch)?;
        Ok(Self {
            id,
            chain,
            key,
            not_before: leaf_facts.not_before,
            not_after: leaf_facts.not_after,
        })
    }

    /// Parses PEM input: certificates (leaf first) from `certs`, the first `PRIVATE KEY` block
    /// from `key`. Both may be the same document, in any block order.
    pub fn from_pem(certs: &[u8], key: &[u8]) -> Result<Self, SvidError> {
        let chain = x509::certs_from_pem(certs)?;
        if chain.is_empty() {
            return Err(SvidError::NoCertificates);
        }
        let key = x509::first_pkcs8_key(key)?.ok_or(SvidError::NoPrivateKey)?;
        Self::new(chain, PrivatePkcs8KeyDer::from(key))
    }

    /// Parses the Workload API encoding: concatenated DER certificates and a PKCS#8 DER key.
    pub fn from_der(chain: &[u8], key: &[u8]) -> Result<Self, SvidError> {
        let chain = x509::split_der_chain(chain)?;
        Self::new(chain, PrivatePkcs8KeyDer::from(key.to_vec()))
    }

    /// The SPIFFE ID of the leaf.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The private key (PKCS#8 DER).
    pub fn key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    /// The chain as concatenated DER, as the Workload API carries it.
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// When to renew: half-way through the leaf's lifetime.
    pub fn refresh_at(&self) -> OffsetDateTime {
        self.not_before + (self.not_after - self.not_before) / 2
    }

    /// The chain and signing key in the form rustls serves.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, SvidError> {
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(self.key.clone_key()))
            .map_err(|e| SvidError::BadKey(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(self.chain.clone(), signing_key)))
    }
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}
