//! A certificate authority for one trust domain: a self-signed ECDSA P-256 root that is itself
//! an SVID (`spiffe://<td>`), issuing leaf X.509-SVIDs exactly as X509-SVID §2–§4 and SPIRE's
//! templates do: one URI SAN, `cA=false`, critical keyUsage digitalSignature, EKU
//! serverAuth+clientAuth, no name constraints, NotBefore backdated, and never outliving the CA.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::bundle::Bundle;
use crate::id::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, X509Svid};
use crate::x509;

/// Default lifetime of a leaf SVID (SPIRE's default too).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(3600);
/// Default lifetime of a CA certificate.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far NotBefore is set before the issuing time, to tolerate clock skew (as SPIRE).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Why the CA could not be created, loaded or could not issue.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The requested ID is not a leaf ID of this CA's trust domain.
    #[error("cannot issue {id}: {reason}")]
    BadId {
        /// The requested ID.
        id: SpiffeId,
        /// Why it cannot be issued.
        reason: &'static str,
    },
    /// The requested lifetime is zero or the CA has already expired.
    #[error("cannot issue {id}: the CA expires at {ca_not_after}, before the leaf could be valid")]
    CaExpired {
        /// The requested ID.
        id: SpiffeId,
        /// The CA's end of validity.
        ca_not_after: OffsetDateTime,
    },
    /// A stored CA certificate does not belong to this trust domain or is not a CA.
    #[error("stored CA certificate is unusable: {0}")]
    BadCaCertificate(String),
    /// The issued certificate failed our own SVID checks (a bug).
    #[error("BUG: issued SVID failed validation: {0}")]
    Issued(#[from] SvidError),
    /// The CSR does not parse or its signature is invalid.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(rcgen::Error),
}

/// The signing half of one trust domain's CA.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::tls::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn organization(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, name);
    dn
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    Ok(SanType::URI(id.as_str().try_into()?))
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`, valid from `now - BACKDATE` for
    /// `ttl`.
    pub fn generate(
        trust_domain: TrustDomain,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = organization("Isthmus");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} root CA"));
        // A distinct subject per root (as SPIRE does): path building matches issuers by name,
        // and a bundle holding several roots of one domain must not make every root a
        // candidate for every leaf.
        let serial_hex: String = serial
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial_hex);
        params.subject_alt_names = vec![uri_san(&trust_domain.id())?];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key)?;
        let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
        Self::from_parts(trust_domain, cert.der().clone(), key_der)
    }

    /// Loads a CA from its stored certificate and PKCS#8 key (as the broker persists them).
    pub fn from_parts(
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<Self, CaError> {
        let facts = x509::facts(&cert, 0).map_err(|e| CaError::BadCaCertificate(e.to_string()))?;
        if !facts.is_ca || !facts.key_usage.is_some_and(|ku| ku.key_cert_sign) {
            return Err(CaError::BadCaCertificate(
                "not a CA with keyCertSign".into(),
            ));
        }
        if facts.uri_sans != [trust_domain.id().to_string()] {
            return Err(CaError::BadCaCertificate(format!(
                "URI SANs {:?} do not name {}",
                facts.uri_sans,
                trust_domain.id()
            )));
        }
        let key_pair = KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::BadCaCertificate(format!("key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key_pair)
            .map_err(|e| CaError::BadCaCertificate(e.to_string()))?;
        if x509::parse_strict(&cert, 0)
            .map(|c| c.public_key().subject_public_key.data.to_vec())
            .ok()
            .as_deref()
            != Some(issuer.key().public_key_raw())
        {
            return Err(CaError::BadCaCertificate(
                "key does not match certificate".into(),
            ));
        }
        Ok(Self {
            trust_domain,
            cert,
            key,
            issuer,
            not_before: facts.not_before,
            not_after: facts.not_after,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate (the trust anchor published in the bundle).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA's private key, PKCS#8 DER, for durable storage.
    pub fn private_key(&self) -> &PrivatePkcs8KeyDer<'static> {
        &self.key
    }

    /// Start of the CA's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of the CA's validity; no leaf outlives it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// A bundle holding just this CA.
    pub fn bundle(&self) -> Bundle {
        Bundle::with_x509_authorities(self.trust_domain.clone(), vec![self.cert.clone()])
    }

    /// Signs a leaf SVID certificate for `id` over `public_key`, with a random serial.
    pub fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        self.sign_leaf_with_serial(id, public_key, ttl, now, random_serial()?)
    }

    /// Signs a leaf whose serial starts with the big-endian `counter` (kept monotonic by the
    /// caller's durable store) followed by 8 random bytes, so serials sort by issuance and
    /// stay unpredictable.
    pub fn sign_leaf_numbered(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
        counter: u64,
    ) -> Result<CertificateDer<'static>, CaError> {
        let random = random_serial()?.to_bytes();
        let mut bytes = Vec::with_capacity(16);
        // Clear the top bit so the DER INTEGER stays positive without a padding byte.
        bytes.extend_from_slice(&(counter & (u64::MAX >> 1)).to_be_bytes());
        bytes.extend_from_slice(&random[random.len().saturating_sub(8)..]);
        self.sign_leaf_with_serial(id, public_key, ttl, now, SerialNumber::from_slice(&bytes))
    }

    fn sign_leaf_with_serial(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        now: OffsetDateTime,
        serial: SerialNumber,
    ) -> Result<CertificateDer<'static>, CaError> {
        if id.trust_domain_name() != self.trust_domain.name() {
            return Err(CaError::BadId {
                id: id.clone(),
                reason: "it belongs to another trust domain",
            });
        }
        if id.is_trust_domain_id() {
            return Err(CaError::BadId {
                id: id.clone(),
                reason: "a leaf SVID needs a path",
            });
        }
        let not_before = (now - BACKDATE).max(self.not_before);
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= not_before || not_after <= now {
            return Err(CaError::CaExpired {
                id: id.clone(),
                ca_not_after: self.not_after,
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = organization("Isthmus");
        params.subject_alt_names = vec![uri_san(id)?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.issuer)?.der().clone())
    }

    /// Signs a leaf for the public key of a PKCS#10 request. Only the key is taken from the
    /// request (after checking its signature); the ID and every extension come from us.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(CaError::BadCsr)?;
        self.sign_leaf(id, &csr.public_key, ttl, now)
    }

    /// Generates a key pair and issues an SVID for `id` (chain = the leaf alone).
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<X509Svid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign_leaf(id, &key, ttl, now)?;
        Self::assemble(leaf, key)
    }

    /// [`Self::issue_svid`] with a numbered serial (see [`Self::sign_leaf_numbered`]).
    pub fn issue_svid_numbered(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
        counter: u64,
    ) -> Result<X509Svid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign_leaf_numbered(id, &key, ttl, now, counter)?;
        Self::assemble(leaf, key)
    }

    fn assemble(leaf: CertificateDer<'static>, key: KeyPair) -> Result<X509Svid, CaError> {
        Ok(X509Svid::new(
            vec![leaf],
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn leaf_follows_x509_svid_rules() {
        let td = TrustDomain::new("west.example").unwrap();
        let ca = CertificateAuthority::generate(td.clone(), now(), DEFAULT_CA_TTL).unwrap();
        let id = td.workload_id(&["ns", "demo", "sa", "echo"]).unwrap();
        let issued_at = now();
        let svid = ca.issue_svid(&id, DEFAULT_LEAF_TTL, issued_at).unwrap();
        let cert = x509::parse_strict(svid.leaf(), 0).unwrap();
        let facts = x509::facts_of(&cert, 0).unwrap();
        assert_eq!(facts.uri_sans, vec![id.to_string()]);
        assert!(!facts.is_ca);
        let ku = facts.key_usage.unwrap();
        assert!(ku.critical && ku.digital_signature && !ku.key_cert_sign && !ku.crl_sign);
        assert_eq!(facts.eku, Some((true, true)));
        assert!(!facts.has_name_constraints);
        assert_eq!(crate::svid::issuance_lint(&facts), []);
        let backdate = issued_at - facts.not_before;
        assert!(backdate >= time::Duration::seconds(9) && backdate <= time::Duration::seconds(11));
        // basicConstraints is present and critical with cA=false.
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);

        let ca_facts = x509::facts(ca.certificate(), 0).unwrap();
        assert!(ca_facts.is_ca);
        assert_eq!(ca_facts.uri_sans, vec!["spiffe://west.example".to_owned()]);
        let ca_ku = ca_facts.key_usage.unwrap();
        assert!(ca_ku.critical && ca_ku.key_cert_sign && !ca_ku.digital_signature);
        assert_eq!(crate::svid::issuance_lint(&ca_facts), []);
    }

    #[test]
    fn leaf_never_outlives_ca() {
        let td = TrustDomain::new("west.example").unwrap();
        let ca =
            CertificateAuthority::generate(td.clone(), now(), Duration::from_secs(600)).unwrap();
        let id = td.workload_id(&["w"]).unwrap();
        let svid = ca.issue_svid(&id, DEFAULT_LEAF_TTL, now()).unwrap();
        assert_eq!(svid.not_after(), ca.not_after());
        let late = ca.not_after() + Duration::from_secs(1);
        assert!(matches!(
            ca.issue_svid(&id, DEFAULT_LEAF_TTL, late),
            Err(CaError::CaExpired { .. })
        ));
    }

    #[test]
    fn refuses_foreign_and_root_ids() {
        let td = TrustDomain::new("west.example").unwrap();
        let ca = CertificateAuthority::generate(td.clone(), now(), DEFAULT_CA_TTL).unwrap();
        let foreign = SpiffeId::parse("spiffe://east.example/w").unwrap();
        assert!(matches!(
            ca.issue_svid(&foreign, DEFAULT_LEAF_TTL, now()),
            Err(CaError::BadId { .. })
        ));
        assert!(matches!(
            ca.issue_svid(&td.id(), DEFAULT_LEAF_TTL, now()),
            Err(CaError::BadId { .. })
        ));
    }

    #[test]
    fn reload_from_parts_and_csr() {
        let td = TrustDomain::new("west.example").unwrap();
        let ca = CertificateAuthority::generate(td.clone(), now(), DEFAULT_CA_TTL).unwrap();
        let again = CertificateAuthority::from_parts(
            td.clone(),
            ca.certificate().clone(),
            ca.private_key().clone_key(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let id = td.workload_id(&["node", "a"]).unwrap();
        let leaf = again
            .sign_csr(csr.der(), &id, DEFAULT_LEAF_TTL, now())
            .unwrap();
        let svid =
            X509Svid::new(vec![leaf], PrivatePkcs8KeyDer::from(key.serialize_der())).unwrap();
        assert_eq!(svid.id(), &id);
        let other = CertificateAuthority::generate(
            TrustDomain::new("east.example").unwrap(),
            now(),
            DEFAULT_CA_TTL,
        )
        .unwrap();
        assert!(
            CertificateAuthority::from_parts(
                td,
                other.certificate().clone(),
                ca.private_key().clone_key()
            )
            .is_err()
        );
    }
}
