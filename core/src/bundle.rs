//! SPIFFE bundles: the X.509 and JWT authorities of one trust domain (SPIFFE Trust Domain and
//! Bundle §4), in the SPIFFE JWKS format, as PEM or as concatenated DER.
//!
//! Parsing follows the specification (unknown `use` or `kty` and x509 entries without `x5c` are
//! ignored) and fails closed where go-spiffe and SPIRE do (several `x5c`, a JWK key that does not
//! match its certificate, a `jwt-svid` key without `kid`). What we emit parses under SPIRE's
//! stricter rules: only `x509-svid` and `jwt-svid` entries, `kty` with the full public key,
//! exactly one `x5c`, no `kid` on X.509 entries.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value, json};

use crate::id::{IdError, TrustDomain};
use crate::x509::{self, CertError, JwkPublicKey};

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";

/// Why a bundle document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The document is not valid JSON (including truncated input).
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    /// The top-level value is not an object.
    #[error("bundle is not a JSON object")]
    NotAnObject,
    /// The `keys` member is absent (it MUST be present, even if empty).
    #[error("bundle has no \"keys\" member")]
    MissingKeys,
    /// The `keys` member is not an array.
    #[error("bundle \"keys\" member is not an array")]
    KeysNotArray,
    /// An element of `keys` is not an object.
    #[error("keys[{index}] is not a JSON object")]
    KeyNotObject {
        /// Position in `keys`.
        index: usize,
    },
    /// `spiffe_sequence` is not an unsigned 64-bit integer.
    #[error("spiffe_sequence {0} is not an unsigned 64-bit integer")]
    BadSequence(String),
    /// `spiffe_refresh_hint` is not a non-negative integer number of seconds.
    #[error("spiffe_refresh_hint {0} is not a non-negative integer number of seconds")]
    BadRefreshHint(String),
    /// An `x509-svid` entry has more than one certificate.
    #[error(
        "keys[{index}]: x509-svid entry has {count} certificates in x5c; exactly one is allowed"
    )]
    MultipleX5c {
        /// Position in `keys`.
        index: usize,
        /// Number of `x5c` elements.
        count: usize,
    },
    /// An `x5c` element is not standard base64.
    #[error("keys[{index}]: x5c[0] is not base64")]
    X5cNotBase64 {
        /// Position in `keys`.
        index: usize,
    },
    /// An `x5c` element is not a certificate.
    #[error("keys[{index}]: x5c[0] is not a certificate: {reason}")]
    X5cNotCertificate {
        /// Position in `keys`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A JWK's key parameters are missing or malformed.
    #[error("keys[{index}]: bad {kty} key: {reason}")]
    BadKeyParams {
        /// Position in `keys`.
        index: usize,
        /// The JWK `kty`.
        kty: String,
        /// What is wrong.
        reason: String,
    },
    /// The JWK key parameters do not match the key of `x5c[0]`.
    #[error("keys[{index}]: JWK public key does not match the key of x5c[0]")]
    X5cKeyMismatch {
        /// Position in `keys`.
        index: usize,
    },
    /// A `jwt-svid` key has no `kid`.
    #[error("keys[{index}]: jwt-svid entry has no \"kid\"")]
    JwtMissingKid {
        /// Position in `keys`.
        index: usize,
    },
    /// Two different JWT keys share a `kid`.
    #[error("two different jwt-svid keys share kid {0:?}")]
    DuplicateKid(String),
    /// A certificate could not be described as a JWK when serializing.
    #[error("cannot publish X.509 authority: {0}")]
    Unpublishable(CertError),
    /// PEM or DER certificate input is malformed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A bundle map has no `trust_domains` member.
    #[error("bundle map has no \"trust_domains\" member")]
    MissingTrustDomains,
    /// A bundle map names the same trust domain twice.
    #[error("bundle map names trust domain {0:?} more than once")]
    DuplicateTrustDomain(String),
    /// A bundle map key is not a trust domain name.
    #[error("bundle map key {name:?} is not a trust domain name: {error}")]
    BadTrustDomain {
        /// The key.
        name: String,
        /// Why.
        error: IdError,
    },
    /// A bundle inside a map is malformed.
    #[error("bundle for {trust_domain}: {error}")]
    InMap {
        /// Its trust domain.
        trust_domain: String,
        /// The bundle's error.
        error: Box<BundleError>,
    },
}

/// One JWT signing authority: its key ID and public key parameters (`kty` and the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// JWK `kid`.
    pub kid: String,
    /// The JWK members describing the key (`kty`, `crv`, `x`, `y` or `n`, `e`, …), without
    /// `use` and `kid`. Published as they were read.
    pub key: Map<String, Value>,
    /// The decoded public key that JWT-SVID signatures are verified with ([`crate::jwt`]).
    pub public_key: JwkPublicKey,
}

impl JwtAuthority {
    /// An authority for `public_key` under `kid`; the JWK members are derived from the key.
    pub fn new(kid: impl Into<String>, public_key: JwkPublicKey) -> Self {
        Self {
            kid: kid.into(),
            key: jwk_key_members(&public_key),
            public_key,
        }
    }
}

/// The authorities of one trust domain.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<CertificateDer<'static>>,
    jwt_authorities: BTreeMap<String, JwtAuthority>,
    sequence: Option<u64>,
    refresh_hint: Option<Duration>,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("trust_domain", &self.trust_domain)
            .field("x509_authorities", &self.x509_authorities.len())
            .field("jwt_authorities", &self.jwt_authorities.keys())
            .field("sequence", &self.sequence)
            .field("refresh_hint", &self.refresh_hint)
            .finish()
    }
}

impl Bundle {
    /// An empty bundle: every SVID of the trust domain is untrusted.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    /// A bundle holding the given X.509 authorities.
    pub fn with_x509_authorities(
        trust_domain: TrustDomain,
        authorities: Vec<CertificateDer<'static>>,
    ) -> Self {
        let mut bundle = Self::new(trust_domain);
        for cert in authorities {
            bundle.add_x509_authority(cert);
        }
        bundle
    }

    /// The trust domain this bundle is bound to (by configuration; the document carries none).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 authorities (root CA certificates), in order.
    pub fn x509_authorities(&self) -> &[CertificateDer<'static>] {
        &self.x509_authorities
    }

    /// The JWT authorities by key ID.
    pub fn jwt_authorities(&self) -> &BTreeMap<String, JwtAuthority> {
        &self.jwt_authorities
    }

    /// `spiffe_sequence`, if set.
    pub fn sequence(&self) -> Option<u64> {
        self.sequence
    }

    /// `spiffe_refresh_hint`, if set.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// Sets `spiffe_sequence`.
    pub fn set_sequence(&mut self, sequence: Option<u64>) {
        self.sequence = sequence;
    }

    /// Sets `spiffe_refresh_hint` (whole seconds are published).
    pub fn set_refresh_hint(&mut self, hint: Option<Duration>) {
        self.refresh_hint = hint;
    }

    /// Adds an X.509 authority unless an identical certificate is already present.
    pub fn add_x509_authority(&mut self, cert: CertificateDer<'static>) -> bool {
        if self.x509_authorities.contains(&cert) {
            return false;
        }
        self.x509_authorities.push(cert);
        true
    }

    /// Removes an X.509 authority; returns whether it was present.
    pub fn remove_x509_authority(&mut self, cert: &CertificateDer<'_>) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities
            .retain(|c| c.as_ref() != cert.as_ref());
        before != self.x509_authorities.len()
    }

    /// Adds a JWT authority, replacing one with the same key ID.
    pub fn add_jwt_authority(&mut self, authority: JwtAuthority) {
        self.jwt_authorities
            .insert(authority.kid.clone(), authority);
    }

    /// True when the bundle holds no authority of either kind.
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// True when the authorities are equal, ignoring sequence and refresh hint.
    pub fn same_authorities(&self, other: &Bundle) -> bool {
        self.x509_authorities == other.x509_authorities
            && self.jwt_authorities == other.jwt_authorities
    }

    /// Parses a SPIFFE bundle document (JWKS with `use`, `spiffe_sequence`,
    /// `spiffe_refresh_hint`) for the given trust domain.
    pub fn parse_json(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        Self::from_value(trust_domain, &value, true)
    }

    fn from_value(
        trust_domain: TrustDomain,
        value: &Value,
        read_hint: bool,
    ) -> Result<Self, BundleError> {
        let object = value.as_object().ok_or(BundleError::NotAnObject)?;
        let keys = object
            .get("keys")
            .ok_or(BundleError::MissingKeys)?
            .as_array()
            .ok_or(BundleError::KeysNotArray)?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = match object.get("spiffe_sequence") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| BundleError::BadSequence(v.to_string()))?,
            ),
        };
        if read_hint {
            bundle.refresh_hint = match object.get("spiffe_refresh_hint") {
                None => None,
                Some(v) => Some(Duration::from_secs(
                    v.as_u64()
                        .ok_or_else(|| BundleError::BadRefreshHint(v.to_string()))?,
                )),
            };
        }
        for (index, key) in keys.iter().enumerate() {
            let jwk = key.as_object().ok_or(BundleError::KeyNotObject { index })?;
            match jwk.get("use").and_then(Value::as_str) {
                Some(USE_X509) => {
                    if let Some(cert) = parse_x509_entry(index, jwk)? {
                        bundle.add_x509_authority(cert);
                    }
                }
                Some(USE_JWT) => {
                    if let Some(authority) = parse_jwt_entry(index, jwk)? {
                        bundle.insert_jwt_checked(authority)?;
                    }
                }
                // A missing or unknown `use` (including `wit-svid`, which we do not
                // implement) means the entry is ignored (Trust Domain and Bundle §4.2.2).
                _ => {}
            }
        }
        Ok(bundle)
    }

    fn insert_jwt_checked(&mut self, authority: JwtAuthority) -> Result<(), BundleError> {
        match self.jwt_authorities.entry(authority.kid.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(authority);
                Ok(())
            }
            // The same key listed twice is harmless; two keys under one kid are ambiguous.
            Entry::Occupied(existing) if existing.get() == &authority => Ok(()),
            Entry::Occupied(_) => Err(BundleError::DuplicateKid(authority.kid)),
        }
    }

    /// Serializes as a SPIFFE bundle document that go-spiffe and SPIRE accept.
    pub fn to_json(&self) -> Result<String, BundleError> {
        serde_json::to_string_pretty(&self.to_value()?)
            .map_err(|e| BundleError::Json(e.to_string()))
    }

    fn to_value(&self) -> Result<Value, BundleError> {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let mut jwk =
                jwk_key_members(&x509::jwk_public_key(cert).map_err(BundleError::Unpublishable)?);
            jwk.insert("use".into(), USE_X509.into());
            jwk.insert("x5c".into(), json!([STANDARD.encode(cert.as_ref())]));
            keys.push(Value::Object(jwk));
        }
        for authority in self.jwt_authorities.values() {
            let mut jwk = authority.key.clone();
            jwk.insert("use".into(), USE_JWT.into());
            jwk.insert("kid".into(), authority.kid.clone().into());
            keys.push(Value::Object(jwk));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        if let Some(sequence) = self.sequence {
            doc.insert("spiffe_sequence".into(), sequence.into());
        }
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), hint.as_secs().into());
        }
        Ok(Value::Object(doc))
    }

    /// Parses a plain JWKS as the Workload API's `FetchJWTBundles` returns it: every key is a
    /// JWT authority and must have a `kid`.
    pub fn parse_jwt_jwks(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
        let keys = value
            .as_object()
            .ok_or(BundleError::NotAnObject)?
            .get("keys")
            .ok_or(BundleError::MissingKeys)?
            .as_array()
            .ok_or(BundleError::KeysNotArray)?;
        let mut bundle = Self::new(trust_domain);
        for (index, key) in keys.iter().enumerate() {
            let jwk = key.as_object().ok_or(BundleError::KeyNotObject { index })?;
            if let Some(authority) = parse_jwt_entry(index, jwk)? {
                bundle.insert_jwt_checked(authority)?;
            }
        }
        Ok(bundle)
    }

    /// Serializes the JWT authorities as a plain JWKS (no `use`, no `spiffe_*`).
    pub fn to_jwt_jwks(&self) -> String {
        let keys: Vec<Value> = self
            .jwt_authorities
            .values()
            .map(|a| {
                let mut jwk = a.key.clone();
                jwk.insert("kid".into(), a.kid.clone().into());
                Value::Object(jwk)
            })
            .collect();
        json!({ "keys": keys }).to_string()
    }

    /// Reads X.509 authorities from PEM (an empty document gives an empty bundle).
    pub fn from_pem(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        Ok(Self::with_x509_authorities(
            trust_domain,
            x509::certs_from_pem(bytes)?,
        ))
    }

    /// Reads X.509 authorities from concatenated DER (the Workload API encoding).
    pub fn from_der(trust_domain: TrustDomain, bytes: &[u8]) -> Result<Self, BundleError> {
        let certs = x509::split_der_chain(bytes)?;
        for (index, cert) in certs.iter().enumerate() {
            x509::parse_strict(cert, index)?;
        }
        Ok(Self::with_x509_authorities(trust_domain, certs))
    }

    /// The X.509 authorities as PEM.
    pub fn to_pem(&self) -> String {
        x509::certs_to_pem(&self.x509_authorities)
    }

    /// The X.509 authorities as concatenated DER.
    pub fn to_der(&self) -> Vec<u8> {
        self.x509_authorities
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }
}

/// Reads an `x509-svid` entry: `None` if it must be ignored (no `x5c`, unknown `kty`).
fn parse_x509_entry(
    index: usize,
    jwk: &Map<String, Value>,
) -> Result<Option<CertificateDer<'static>>, BundleError> {
    let x5c = match jwk.get("x5c").and_then(Value::as_array) {
        None => return Ok(None),
        Some(x5c) if x5c.is_empty() => return Ok(None),
        Some(x5c) if x5c.len() > 1 => {
            return Err(BundleError::MultipleX5c {
                index,
                count: x5c.len(),
            });
        }
        Some(x5c) => &x5c[0],
    };
    let Some(declared) = parse_key_params(index, jwk)? else {
        return Ok(None);
    };
    let der = x5c
        .as_str()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or(BundleError::X5cNotBase64 { index })?;
    let actual = x509::jwk_public_key(&der).map_err(|e| BundleError::X5cNotCertificate {
        index,
        reason: e.to_string(),
    })?;
    if declared != actual {
        return Err(BundleError::X5cKeyMismatch { index });
    }
    Ok(Some(CertificateDer::from(der)))
}

/// Reads a `jwt-svid` entry: `None` if it must be ignored (unknown `kty`).
fn parse_jwt_entry(
    index: usize,
    jwk: &Map<String, Value>,
) -> Result<Option<JwtAuthority>, BundleError> {
    let Some(public_key) = parse_key_params(index, jwk)? else {
        return Ok(None);
    };
    let kid = match jwk.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() => kid.to_owned(),
        _ => return Err(BundleError::JwtMissingKid { index }),
    };
    let key = jwk
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "use" | "kid" | "x5c"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Some(JwtAuthority {
        kid,
        key,
        public_key,
    }))
}

/// Decodes a JWK's public key. `None` for a `kty` we do not know (the entry is ignored);
/// an error for a known `kty` with missing or malformed parameters.
fn parse_key_params(
    index: usize,
    jwk: &Map<String, Value>,
) -> Result<Option<JwkPublicKey>, BundleError> {
    let kty = match jwk.get("kty").and_then(Value::as_str) {
        Some(kty @ ("EC" | "RSA")) => kty,
        _ => return Ok(None),
    };
    let bad = |reason: String| BundleError::BadKeyParams {
        index,
        kty: kty.to_owned(),
        reason,
    };
    let member = |name: &str| -> Result<Vec<u8>, BundleError> {
        let text = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("missing \"{name}\"")))?;
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| bad(format!("\"{name}\" is not base64url")))
    };
    if kty == "RSA" {
        let (n, e) = (member("n")?, member("e")?);
        if n.is_empty() || e.is_empty() {
            return Err(bad("empty modulus or exponent".into()));
        }
        return Ok(Some(JwkPublicKey::Rsa { n, e }));
    }
    let (crv, len) = match jwk.get("crv").and_then(Value::as_str) {
        Some("P-256") => ("P-256", 32),
        Some("P-384") => ("P-384", 48),
        Some("P-521") => ("P-521", 66),
        other => return Err(bad(format!("unsupported crv {other:?}"))),
    };
    let (x, y) = (member("x")?, member("y")?);
    if x.len() != len || y.len() != len {
        return Err(bad(format!("{crv} coordinates must be {len} bytes")));
    }
    Ok(Some(JwkPublicKey::Ec { crv, x, y }))
}

fn jwk_key_members(key: &JwkPublicKey) -> Map<String, Value> {
    let mut jwk = Map::new();
    match key {
        JwkPublicKey::Ec { crv, x, y } => {
            jwk.insert("kty".into(), "EC".into());
            jwk.insert("crv".into(), (*crv).into());
            jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
            jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        }
        JwkPublicKey::Rsa { n, e } => {
            jwk.insert("kty".into(), "RSA".into());
            jwk.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
            jwk.insert("e".into(), URL_SAFE_NO_PAD.encode(e).into());
        }
    }
    jwk
}

/// Entries of a JSON object in document order, duplicates kept (serde_json's own maps keep only
/// the last duplicate, which would hide a conflicting trust domain or, in a JWT, a second `alg`).
pub(crate) struct OrderedEntries(pub(crate) Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(OrderedEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[derive(serde::Deserialize)]
struct BundleMapDoc {
    trust_domains: Option<OrderedEntries>,
}

/// Parses a bundle map `{"trust_domains": {"<td>": <bundle>, ...}}` (Trust Domain and Bundle
/// §5). A trust domain named twice rejects the whole document; per-bundle refresh hints are
/// ignored.
pub fn parse_bundle_map(bytes: &[u8]) -> Result<BTreeMap<TrustDomain, Bundle>, BundleError> {
    let doc: BundleMapDoc =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
    let entries = doc.trust_domains.ok_or(BundleError::MissingTrustDomains)?;
    let mut out = BTreeMap::new();
    for (name, value) in entries.0 {
        let td = TrustDomain::new(&name).map_err(|error| BundleError::BadTrustDomain {
            name: name.clone(),
            error,
        })?;
        if out.contains_key(&td) {
            return Err(BundleError::DuplicateTrustDomain(name));
        }
        let bundle =
            Bundle::from_value(td.clone(), &value, false).map_err(|e| BundleError::InMap {
                trust_domain: name,
                error: Box::new(e),
            })?;
        out.insert(td, bundle);
    }
    Ok(out)
}

/// Serializes a bundle map.
pub fn bundle_map_to_json<'a>(
    bundles: impl IntoIterator<Item = &'a Bundle>,
) -> Result<String, BundleError> {
    let mut map = Map::new();
    for bundle in bundles {
        let mut value = bundle.to_value()?;
        if let Some(doc) = value.as_object_mut() {
            doc.remove("spiffe_refresh_hint");
        }
        map.insert(bundle.trust_domain.name().to_owned(), value);
    }
    serde_json::to_string_pretty(&json!({ "trust_domains": map }))
        .map_err(|e| BundleError::Json(e.to_string()))
}
