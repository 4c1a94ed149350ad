//! Certificate decoding shared by SVIDs, bundles and the CA: PEM and concatenated-DER
//! splitting, strict DER parsing (no trailing bytes), and the SPIFFE-relevant facts of one
//! certificate.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::SectionKind;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Why certificate material could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The input holds no PEM block at all.
    #[error("no PEM blocks found")]
    NoPemBlocks,
    /// A PEM block is malformed.
    #[error("malformed PEM: {0}")]
    Pem(String),
    /// A certificate's DER does not parse.
    #[error("certificate {index}: cannot parse DER: {reason}")]
    Parse {
        /// Position in the input, from 0.
        index: usize,
        /// The parser's message.
        reason: String,
    },
    /// A PEM block holds a certificate followed by extra bytes.
    #[error("certificate {index}: {len} trailing bytes after the DER certificate")]
    TrailingData {
        /// Position in the input, from 0.
        index: usize,
        /// How many bytes follow the certificate.
        len: usize,
    },
    /// An extension is malformed or present twice.
    #[error("certificate {index}: bad {extension} extension: {reason}")]
    Extension {
        /// Position in the input, from 0.
        index: usize,
        /// Which extension.
        extension: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The certificate's public key is of a kind we cannot describe as a JWK.
    #[error("unsupported public key algorithm {0}")]
    UnsupportedKey(String),
}

/// The key usage bits SPIFFE cares about, and whether the extension was critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyUsageBits {
    /// Whether the extension is marked critical.
    pub critical: bool,
    /// digitalSignature.
    pub digital_signature: bool,
    /// keyCertSign.
    pub key_cert_sign: bool,
    /// cRLSign.
    pub crl_sign: bool,
}

/// The facts of one certificate that SPIFFE validation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// basicConstraints cA.
    pub is_ca: bool,
    /// keyUsage, if the extension is present.
    pub key_usage: Option<KeyUsageBits>,
    /// Every URI SAN, in order.
    pub uri_sans: Vec<String>,
    /// Whether an extendedKeyUsage extension is present, and which of serverAuth/clientAuth.
    pub eku: Option<(bool, bool)>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether the subject DN is empty.
    pub subject_empty: bool,
    /// Whether the SAN extension is critical (false when absent).
    pub san_critical: bool,
    /// Whether the certificate carries a name-constraints extension.
    pub has_name_constraints: bool,
}

/// Parses one DER certificate, rejecting trailing bytes.
pub fn parse_strict(der: &[u8], index: usize) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse {
        index,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CertError::TrailingData {
            index,
            len: rest.len(),
        });
    }
    Ok(cert)
}

/// Reads the SPIFFE-relevant facts of a DER certificate.
pub fn facts(der: &[u8], index: usize) -> Result<CertFacts, CertError> {
    let cert = parse_strict(der, index)?;
    facts_of(&cert, index)
}

/// Reads the SPIFFE-relevant facts of a parsed certificate.
pub fn facts_of(cert: &X509Certificate<'_>, index: usize) -> Result<CertFacts, CertError> {
    let bad = |extension: &'static str, e: x509_parser::error::X509Error| CertError::Extension {
        index,
        extension,
        reason: e.to_string(),
    };
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| bad("basicConstraints", e))?
        .is_some_and(|bc| bc.value.ca);
    let key_usage = cert
        .key_usage()
        .map_err(|e| bad("keyUsage", e))?
        .map(|ku| KeyUsageBits {
            critical: ku.critical,
            digital_signature: ku.value.digital_signature(),
            key_cert_sign: ku.value.key_cert_sign(),
            crl_sign: ku.value.crl_sign(),
        });
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad("subjectAltName", e))?;
    let (uri_sans, san_critical) = match san {
        Some(san) => (
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect(),
            san.critical,
        ),
        None => (Vec::new(), false),
    };
    let eku = cert
        .extended_key_usage()
        .map_err(|e| bad("extendedKeyUsage", e))?
        .map(|e| (e.value.server_auth, e.value.client_auth));
    let has_name_constraints = cert
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_)));
    Ok(CertFacts {
        is_ca,
        key_usage,
        uri_sans,
        eku,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        subject_empty: cert.subject().iter().next().is_none(),
        san_critical,
        has_name_constraints,
    })
}

/// Splits concatenated DER certificates (the Workload API encoding) into single certificates,
/// checking that each parses.
pub fn split_der_chain(mut bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let index = out.len();
        let (rest, _) = X509Certificate::from_der(bytes).map_err(|e| CertError::Parse {
            index,
            reason: e.to_string(),
        })?;
        let used = bytes.len() - rest.len();
        out.push(CertificateDer::from(bytes[..used].to_vec()));
        bytes = rest;
    }
    Ok(out)
}

/// The PEM sections of a document, in order. Fails if there is none.
pub fn pem_sections(bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, CertError> {
    let mut sections = Vec::new();
    let mut reader = bytes;
    loop {
        match rustls_pki_types::pem::from_buf(&mut reader) {
            Ok(Some(section)) => sections.push(section),
            Ok(None) => break,
            Err(e) => return Err(CertError::Pem(e.to_string())),
        }
    }
    if sections.is_empty() {
        return Err(CertError::NoPemBlocks);
    }
    Ok(sections)
}

/// The certificates of a PEM document, each parsed strictly. An empty input yields none;
/// non-empty input without any PEM block is an error.
pub fn certs_from_pem(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (kind, der) in pem_sections(bytes)? {
        if kind == SectionKind::Certificate {
            parse_strict(&der, out.len())?;
            out.push(CertificateDer::from(der));
        }
    }
    Ok(out)
}

/// Encodes certificates as a PEM document.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// A certificate's public key in the form a JWK needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwkPublicKey {
    /// Elliptic curve key: curve name (`P-256`, `P-384`, `P-521`) and affine coordinates.
    Ec {
        /// JWK `crv`.
        crv: &'static str,
        /// X coordinate, big-endian, fixed length.
        x: Vec<u8>,
        /// Y coordinate, big-endian, fixed length.
        y: Vec<u8>,
    },
    /// RSA key: modulus and exponent, big-endian without leading zeros.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
}

fn strip_leading_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].to_vec()
}

/// Extracts the public key of a DER certificate as JWK parameters.
pub fn jwk_public_key(der: &[u8]) -> Result<JwkPublicKey, CertError> {
    let cert = parse_strict(der, 0)?;
    let spki = cert.public_key();
    let parsed = spki
        .parsed()
        .map_err(|e| CertError::UnsupportedKey(e.to_string()))?;
    match parsed {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            let (crv, len) = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256", 32),
                Some("1.3.132.0.34") => ("P-384", 48),
                Some("1.3.132.0.35") => ("P-521", 66),
                other => {
                    return Err(CertError::UnsupportedKey(format!(
                        "EC curve {}",
                        other.unwrap_or("(none)")
                    )));
                }
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return Err(CertError::UnsupportedKey(
                    "EC point is not an uncompressed point".into(),
                ));
            }
            Ok(JwkPublicKey::Ec {
                crv,
                x: data[1..1 + len].to_vec(),
                y: data[1 + len..].to_vec(),
            })
        }
        PublicKey::RSA(rsa) => Ok(JwkPublicKey::Rsa {
            n: strip_leading_zeros(rsa.modulus),
            e: strip_leading_zeros(rsa.exponent),
        }),
        _ => Err(CertError::UnsupportedKey(
            spki.algorithm.algorithm.to_id_string(),
        )),
    }
}

/// Reads the first private key (PKCS#8 `PRIVATE KEY` block) of a PEM document.
pub fn first_pkcs8_key(bytes: &[u8]) -> Result<Option<Vec<u8>>, CertError> {
    Ok(pem_sections(bytes)?
        .into_iter()
        .find(|(kind, _)| *kind == SectionKind::PrivateKey)
        .map(|(_, der)| der))
}
