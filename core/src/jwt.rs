//! JWT-SVIDs (SPIFFE JWT-SVID): minting with an ES256 key and validation against the JWT
//! authorities of the bundle of the subject's own trust domain.
//!
//! Minting ([`JwtSigner`]): ECDSA P-256 with SHA-256 (`ES256`), header
//! `{"alg":"ES256","kid":…,"typ":"JWT"}`, claims `sub`, `aud` (always an array), `exp`, `iat`.
//! The key ID is the key's RFC 7638 JWK thumbprint, so a key stored as PKCS#8 comes back with
//! the same `kid`.
//!
//! Validation ([`validate`]), in this order:
//! 1. JWS Compact Serialization: exactly three base64url segments (no padding), at most
//!    [`MAX_TOKEN_LEN`] bytes; header and claims are JSON objects without duplicate members.
//! 2. Header: `alg` one of ES256, ES384, RS256/384/512, PS256/384/512 (`none`, HS*, ES512 and
//!    anything else are refused); `typ` absent, `JWT` or `JOSE`; `kid` present; no other member
//!    (JWT-SVID §2 forbids them, which also shuts out `jwk`, `jku`, `x5c` and `crit`).
//! 3. Claims: `sub` a SPIFFE ID, `aud` a string or a non-empty array of strings, `exp` a
//!    NumericDate; `iat` and `nbf`, if present, NumericDates.
//! 4. Key: the bundle of `sub`'s trust domain (never another one), then its JWT authority
//!    named by `kid`; the key type must fit `alg`, and a JWK `alg` member, if any, must equal it.
//! 5. Signature (ring), then time: `exp` must be after now and `nbf` (if present) not after
//!    now, with [`LEEWAY`] (zero) either way; then the expected audience must be in `aud`.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::bundle::{JwtAuthority, OrderedEntries};
use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::trust::BundleSet;
use crate::x509::JwkPublicKey;

/// Default lifetime of a minted JWT-SVID (SPIRE's default too).
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Clock skew tolerated on `exp` and `nbf`: none. Tokens live minutes and are minted by the
/// broker on request, so a validator never needs to accept an expired one (the `spiffe` crate
/// uses no leeway either, so both validators agree on every token).
pub const LEEWAY: Duration = Duration::ZERO;
/// Longest token accepted for validation, in bytes; anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The `alg` values accepted on validation. ES512 is a JWT-SVID algorithm too, but ring cannot
/// verify P-521 signatures, so such tokens are refused as unsupported.
pub const SUPPORTED_ALGORITHMS: [&str; 8] = [
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
];

/// Why a JWT-SVID could not be minted or was not accepted. Messages name the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The token exceeds [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes long; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// The token is not three non-empty dot-separated segments (JWS Compact Serialization).
    #[error("token has {segments} segments; a JWS compact serialization has 3 non-empty ones")]
    Malformed {
        /// How many segments (dot-separated parts) it has.
        segments: usize,
    },
    /// A segment is not unpadded base64url.
    #[error("token {segment} is not unpadded base64url")]
    NotBase64 {
        /// `header`, `claims` or `signature`.
        segment: &'static str,
    },
    /// The header or the claims are not a JSON object.
    #[error("token {segment} is not a JSON object: {reason}")]
    NotJson {
        /// `header` or `claims`.
        segment: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The header or the claims name a member twice.
    #[error("token {segment} has member {member:?} twice")]
    DuplicateMember {
        /// `header` or `claims`.
        segment: &'static str,
        /// The member.
        member: String,
    },
    /// `alg` is missing or not a string.
    #[error("token header has no \"alg\"")]
    MissingAlgorithm,
    /// `alg` is not one of [`SUPPORTED_ALGORITHMS`] (`none`, HMAC, ES512, unknown).
    #[error("algorithm {0:?} is not accepted for JWT-SVIDs")]
    UnsupportedAlgorithm(String),
    /// `typ` is present but neither `JWT` nor `JOSE`.
    #[error("token type {0:?} is not JWT or JOSE")]
    BadType(String),
    /// `kid` is missing, empty or not a string.
    #[error("token header has no \"kid\"")]
    MissingKeyId,
    /// The header carries a member JWT-SVID §2 does not allow.
    #[error("token header member {0:?} is not allowed in a JWT-SVID")]
    UnexpectedHeader(String),
    /// A required claim (`sub`, `aud`, `exp`) is absent.
    #[error("token has no {0:?} claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or an unusable value.
    #[error("token claim {claim:?} is invalid: {reason}")]
    BadClaim {
        /// The claim.
        claim: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `sub` is not a SPIFFE ID.
    #[error("token subject {sub:?} is not a SPIFFE ID: {error}")]
    BadSubject {
        /// The claim's value.
        sub: String,
        /// Why it does not parse.
        error: IdError,
    },
    /// No bundle is held for the subject's trust domain.
    #[error("trust domain {0} of the token subject is not trusted (no bundle)")]
    UnknownTrustDomain(TrustDomain),
    /// The bundle of the subject's trust domain has no JWT authority with this `kid`.
    #[error("bundle of trust domain {trust_domain} has no JWT authority with kid {kid:?}")]
    UnknownKeyId {
        /// The token's `kid`.
        kid: String,
        /// The subject's trust domain.
        trust_domain: TrustDomain,
    },
    /// The authority's key cannot verify this `alg` (wrong key type or curve, JWK `alg`).
    #[error("JWT authority {kid:?} cannot verify {alg}: {reason}")]
    KeyMismatch {
        /// The authority's `kid`.
        kid: String,
        /// The token's `alg`.
        alg: String,
        /// What does not fit.
        reason: String,
    },
    /// The signature does not verify with the authority named by `kid`.
    #[error("signature of the token for {sub} does not verify with JWT authority {kid:?}")]
    BadSignature {
        /// The token's subject.
        sub: SpiffeId,
        /// The authority's `kid`.
        kid: String,
    },
    /// `exp` is not after the validation time.
    #[error("token for {sub} expired at {expired_at} (now {now})")]
    Expired {
        /// The token's subject.
        sub: SpiffeId,
        /// Its `exp`.
        expired_at: OffsetDateTime,
        /// The validation time.
        now: OffsetDateTime,
    },
    /// `nbf` is after the validation time.
    #[error("token for {sub} is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// The token's subject.
        sub: SpiffeId,
        /// Its `nbf`.
        not_before: OffsetDateTime,
        /// The validation time.
        now: OffsetDateTime,
    },
    /// The expected audience is not among the token's.
    #[error("token for {sub} is for audience {actual:?}, not {expected:?}")]
    WrongAudience {
        /// The token's subject.
        sub: SpiffeId,
        /// The validator's audience.
        expected: String,
        /// The token's `aud`.
        actual: Vec<String>,
    },
    /// No audience was given: minting needs at least one non-empty audience, validation one
    /// non-empty expected audience.
    #[error("audience must be specified (and not empty)")]
    NoAudience,
    /// The subject to mint for is not a workload ID (it has no path).
    #[error("cannot mint a JWT-SVID for {0}: a trust domain ID is not a workload ID")]
    NotAWorkloadId(SpiffeId),
    /// The lifetime to mint with is shorter than one second.
    #[error("JWT-SVID lifetime {0:?} is shorter than one second")]
    BadTtl(Duration),
    /// The signing key could not be generated or loaded.
    #[error("JWT signing key is unusable: {0}")]
    Key(String),
    /// ring failed to sign.
    #[error("signing the JWT-SVID for {0} failed")]
    Signing(SpiffeId),
}

impl JwtError {
    /// A low-cardinality label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLong { .. }
            | Self::Malformed { .. }
            | Self::NotBase64 { .. }
            | Self::NotJson { .. }
            | Self::DuplicateMember { .. } => "malformed",
            Self::MissingAlgorithm | Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::BadType(_) | Self::MissingKeyId | Self::UnexpectedHeader(_) => "bad_header",
            Self::MissingClaim(_) | Self::BadClaim { .. } | Self::BadSubject { .. } => "bad_claims",
            Self::UnknownTrustDomain(_) => "unknown_trust_domain",
            Self::UnknownKeyId { .. } => "unknown_key_id",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::BadSignature { .. } => "bad_signature",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::NoAudience => "no_audience",
            Self::NotAWorkloadId(_) | Self::BadTtl(_) => "bad_request",
            Self::Key(_) | Self::Signing(_) => "signing",
        }
    }
}

/// A validated (or freshly minted) JWT-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`, in token order (a single-string `aud` gives one element).
    pub audience: Vec<String>,
    /// `exp`.
    pub expiry: OffsetDateTime,
    /// `iat`, when the token carries it (ours always do).
    pub issued_at: Option<OffsetDateTime>,
    /// The header's `kid`: the JWT authority that signed it.
    pub key_id: String,
    /// The token itself (JWS compact serialization). A bearer credential: never log it.
    pub token: String,
    /// Every claim of the token, including the ones above.
    pub claims: Map<String, Value>,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a bearer credential: keep it out of logs and panic messages.
        f.debug_struct("JwtSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("audience", &self.audience)
            .field("expiry", &self.expiry)
            .field("issued_at", &self.issued_at)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// An ES256 signing key and its key ID: the JWT half of a trust domain's authority.
pub struct JwtSigner {
    key_pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    kid: String,
    public_key: JwkPublicKey,
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A new random P-256 key.
    pub fn generate() -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let document =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| JwtError::Key("cannot generate a P-256 key".into()))?;
        Self::from_pkcs8(document.as_ref())
    }

    /// Loads a P-256 key from PKCS#8 DER (as [`Self::to_pkcs8`] wrote it). The `kid` is derived
    /// from the key, so it is the same as before.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let key_pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &SystemRandom::new(),
        )
        .map_err(|e| JwtError::Key(format!("not a PKCS#8 P-256 key: {e}")))?;
        let point = key_pair.public_key().as_ref();
        // An uncompressed point: 0x04 || x || y, 32 bytes each.
        if point.len() != 65 || point[0] != 0x04 {
            return Err(JwtError::Key(format!(
                "BUG: ring returned a {}-byte P-256 public key",
                point.len()
            )));
        }
        let public_key = JwkPublicKey::Ec {
            crv: "P-256",
            x: point[1..33].to_vec(),
            y: point[33..].to_vec(),
        };
        Ok(Self {
            kid: thumbprint(&public_key),
            key_pair,
            pkcs8: der.to_vec(),
            public_key,
        })
    }

    /// The private key as PKCS#8 DER, for the durable store.
    pub fn to_pkcs8(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }

    /// The key ID: the RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a bundle's JWT authority.
    pub fn public_authority(&self) -> JwtAuthority {
        JwtAuthority::new(self.kid.clone(), self.public_key.clone())
    }

    /// Mints a JWT-SVID for `id`, valid from now for `ttl` (whole seconds).
    pub fn sign(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, JwtError> {
        self.sign_at(id, audience, ttl, OffsetDateTime::now_utc())
    }

    /// Mints a JWT-SVID for `id` issued at `now` and expiring `ttl` later (truncated to whole
    /// seconds). `audience` must hold at least one value and no empty one.
    pub fn sign_at(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<JwtSvid, JwtError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::NoAudience);
        }
        if id.is_trust_domain_id() {
            return Err(JwtError::NotAWorkloadId(id.clone()));
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| JwtError::BadTtl(ttl))?;
        if ttl_secs < 1 {
            return Err(JwtError::BadTtl(ttl));
        }
        let iat = now.unix_timestamp();
        let exp = iat.checked_add(ttl_secs).ok_or(JwtError::BadTtl(ttl))?;
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let mut claims = Map::new();
        claims.insert("sub".into(), id.as_str().into());
        claims.insert("aud".into(), audience.into());
        claims.insert("exp".into(), exp.into());
        claims.insert("iat".into(), iat.into());
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
        );
        let sig = self
            .key_pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| JwtError::Signing(id.clone()))?;
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(JwtSvid {
            spiffe_id: id.clone(),
            audience: audience.to_vec(),
            expiry: timestamp("exp", exp)?,
            issued_at: Some(timestamp("iat", iat)?),
            key_id: self.kid.clone(),
            token,
            claims,
        })
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
fn thumbprint(key: &JwkPublicKey) -> String {
    let canonical = match key {
        JwkPublicKey::Ec { crv, x, y } => format!(
            r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(x),
            URL_SAFE_NO_PAD.encode(y)
        ),
        JwkPublicKey::Rsa { n, e } => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(e),
            URL_SAFE_NO_PAD.encode(n)
        ),
    };
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

fn timestamp(claim: &'static str, secs: i64) -> Result<OffsetDateTime, JwtError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| JwtError::BadClaim {
        claim,
        reason: e.to_string(),
    })
}

/// Validates `token` now for `audience` against `bundles` (see the module documentation for
/// every check). Use the trust store's current snapshot: `validate(t, aud, &trust.snapshot())`.
pub fn validate(token: &str, audience: &str, bundles: &BundleSet) -> Result<JwtSvid, JwtError> {
    validate_at(token, audience, bundles, OffsetDateTime::now_utc())
}

/// [`validate`] at a given time.
pub fn validate_at(
    token: &str,
    audience: &str,
    bundles: &BundleSet,
    now: OffsetDateTime,
) -> Result<JwtSvid, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::NoAudience);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong { len: token.len() });
    }
    let segments: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, signature_b64] = segments[..] else {
        return Err(JwtError::Malformed {
            segments: segments.len(),
        });
    };
    if header_b64.is_empty() || claims_b64.is_empty() {
        return Err(JwtError::Malformed { segments: 3 });
    }
    let header = decode_object("header", header_b64)?;
    let (alg, kid) = check_header(&header)?;
    // `alg: none` tokens end in an empty signature; the algorithm check above refused them.
    if signature_b64.is_empty() {
        return Err(JwtError::Malformed { segments: 3 });
    }
    let claims = decode_object("claims", claims_b64)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::NotBase64 {
            segment: "signature",
        })?;
    let parsed = read_claims(&claims)?;
    let trust_domain = parsed.sub.trust_domain();
    let bundle = bundles
        .get(&trust_domain)
        .ok_or_else(|| JwtError::UnknownTrustDomain(trust_domain.clone()))?;
    let authority = bundle
        .jwt_authorities()
        .get(&kid)
        .ok_or_else(|| JwtError::UnknownKeyId {
            kid: kid.clone(),
            trust_domain,
        })?;
    let signing_input = &token[..header_b64.len() + 1 + claims_b64.len()];
    verify_signature(authority, &alg, signing_input.as_bytes(), &signature).map_err(
        |e| match e {
            Verification::Mismatch(reason) => JwtError::KeyMismatch {
                kid: kid.clone(),
                alg: alg.clone(),
                reason,
            },
            Verification::Failed => JwtError::BadSignature {
                sub: parsed.sub.clone(),
                kid: kid.clone(),
            },
        },
    )?;
    let leeway = time::Duration::try_from(LEEWAY).unwrap_or(time::Duration::ZERO);
    if now >= parsed.exp + leeway {
        return Err(JwtError::Expired {
            sub: parsed.sub,
            expired_at: parsed.exp,
            now,
        });
    }
    if let Some(nbf) = parsed.nbf
        && now + leeway < nbf
    {
        return Err(JwtError::NotYetValid {
            sub: parsed.sub,
            not_before: nbf,
            now,
        });
    }
    if !parsed.aud.iter().any(|a| a == audience) {
        return Err(JwtError::WrongAudience {
            sub: parsed.sub,
            expected: audience.to_owned(),
            actual: parsed.aud,
        });
    }
    Ok(JwtSvid {
        spiffe_id: parsed.sub,
        audience: parsed.aud,
        expiry: parsed.exp,
        issued_at: parsed.iat,
        key_id: kid,
        token: token.to_owned(),
        claims,
    })
}

/// Decodes one segment into a JSON object, refusing duplicate members.
fn decode_object(segment: &'static str, b64: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| JwtError::NotBase64 { segment })?;
    let entries: OrderedEntries =
        serde_json::from_slice(&bytes).map_err(|e| JwtError::NotJson {
            segment,
            reason: e.to_string(),
        })?;
    let mut object = Map::new();
    for (member, value) in entries.0 {
        if object.contains_key(&member) {
            return Err(JwtError::DuplicateMember { segment, member });
        }
        object.insert(member, value);
    }
    Ok(object)
}

/// Checks the JOSE header; returns `alg` and `kid`.
fn check_header(header: &Map<String, Value>) -> Result<(String, String), JwtError> {
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingAlgorithm)?;
    if !SUPPORTED_ALGORITHMS.contains(&alg) {
        return Err(JwtError::UnsupportedAlgorithm(alg.to_owned()));
    }
    if let Some(typ) = header.get("typ") {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => return Err(JwtError::BadType(typ.to_string())),
        }
    }
    if let Some(other) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(JwtError::UnexpectedHeader(other.clone()));
    }
    let kid = match header.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() => kid.to_owned(),
        _ => return Err(JwtError::MissingKeyId),
    };
    Ok((alg.to_owned(), kid))
}

struct Claims {
    sub: SpiffeId,
    aud: Vec<String>,
    exp: OffsetDateTime,
    iat: Option<OffsetDateTime>,
    nbf: Option<OffsetDateTime>,
}

fn read_claims(claims: &Map<String, Value>) -> Result<Claims, JwtError> {
    let sub = match claims.get("sub") {
        None => return Err(JwtError::MissingClaim("sub")),
        Some(Value::String(sub)) => SpiffeId::parse(sub).map_err(|error| JwtError::BadSubject {
            sub: sub.clone(),
            error,
        })?,
        Some(other) => {
            return Err(JwtError::BadClaim {
                claim: "sub",
                reason: format!("{other} is not a string"),
            });
        }
    };
    let bad_aud = |reason: &str| JwtError::BadClaim {
        claim: "aud",
        reason: reason.to_owned(),
    };
    let aud = match claims.get("aud") {
        None => return Err(JwtError::MissingClaim("aud")),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(values)) if values.is_empty() => return Err(bad_aud("empty array")),
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_aud("an element is not a string"))?,
        Some(_) => return Err(bad_aud("neither a string nor an array of strings")),
    };
    let exp = numeric_date(claims, "exp")?.ok_or(JwtError::MissingClaim("exp"))?;
    Ok(Claims {
        sub,
        aud,
        exp,
        iat: numeric_date(claims, "iat")?,
        nbf: numeric_date(claims, "nbf")?,
    })
}

/// A NumericDate claim (RFC 7519 §2: seconds since the epoch, possibly fractional).
fn numeric_date(
    claims: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<OffsetDateTime>, JwtError> {
    let Some(value) = claims.get(claim) else {
        return Ok(None);
    };
    let bad = |reason: String| JwtError::BadClaim { claim, reason };
    let date = if let Some(secs) = value.as_i64() {
        OffsetDateTime::from_unix_timestamp(secs).map_err(|e| bad(e.to_string()))?
    } else if let Some(secs) = value.as_f64().filter(|s| s.is_finite()) {
        // Years beyond ±9999 are out of range for `time`; the conversion below reports them.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "finite and range-checked by from_unix_timestamp_nanos"
        )]
        let nanos = (secs * 1e9) as i128;
        OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|e| bad(e.to_string()))?
    } else {
        return Err(bad(format!("{value} is not a NumericDate")));
    };
    Ok(Some(date))
}

enum Verification {
    /// The authority's key does not fit the algorithm.
    Mismatch(String),
    /// The signature is wrong.
    Failed,
}

fn verify_signature(
    authority: &JwtAuthority,
    alg: &str,
    message: &[u8],
    sig: &[u8],
) -> Result<(), Verification> {
    if let Some(declared) = authority.key.get("alg")
        && declared.as_str() != Some(alg)
    {
        return Err(Verification::Mismatch(format!(
            "the JWK declares alg {declared}"
        )));
    }
    if let Some(ops) = authority.key.get("key_ops") {
        let allows_verify = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !allows_verify {
            return Err(Verification::Mismatch(
                "the JWK's key_ops do not include verify".into(),
            ));
        }
    }
    match (&authority.public_key, alg) {
        (JwkPublicKey::Ec { crv, x, y }, "ES256" | "ES384") => {
            let (expected, verifier): (&str, &'static dyn signature::VerificationAlgorithm) =
                if alg == "ES256" {
                    ("P-256", &signature::ECDSA_P256_SHA256_FIXED)
                } else {
                    ("P-384", &signature::ECDSA_P384_SHA384_FIXED)
                };
            if *crv != expected {
                return Err(Verification::Mismatch(format!(
                    "{alg} needs a {expected} key, the authority is {crv}"
                )));
            }
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            signature::UnparsedPublicKey::new(verifier, point)
                .verify(message, sig)
                .map_err(|_| Verification::Failed)
        }
        (JwkPublicKey::Rsa { n, e }, _) if alg.starts_with("RS") || alg.starts_with("PS") => {
            let params: &signature::RsaParameters = match alg {
                "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
                other => return Err(Verification::Mismatch(format!("unknown RSA alg {other}"))),
            };
            let strip = |bytes: &[u8]| {
                let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
                bytes[start..].to_vec()
            };
            let components = signature::RsaPublicKeyComponents {
                n: strip(n),
                e: strip(e),
            };
            // ring refuses moduli under 2048 bits; that surfaces as a failed signature, so say
            // so rather than blame the token.
            if components.n.len() * 8 < 2048 {
                return Err(Verification::Mismatch(format!(
                    "RSA modulus of {} bits is under 2048",
                    components.n.len() * 8
                )));
            }
            components
                .verify(params, message, sig)
                .map_err(|_| Verification::Failed)
        }
        (JwkPublicKey::Ec { crv, .. }, _) => Err(Verification::Mismatch(format!(
            "{alg} needs an RSA key, the authority is EC {crv}"
        ))),
        (JwkPublicKey::Rsa { .. }, _) => Err(Verification::Mismatch(format!(
            "{alg} needs an EC key, the authority is RSA"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::RsaKeyPair;

    use super::*;
    use crate::bundle::Bundle;

    /// A throwaway RSA-2048 key (PKCS#8 DER, base64) for the RS*/PS* paths: ring cannot
    /// generate RSA keys.
    const RSA_PKCS8: &str = concat!(
        "MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQDZgsT6fy/Kk/47IrIveGqIyiBxyC1m7l4O6uvO30YlQnQJ",
        "PPKacfNr8u7kjTqyOdRzOPnklL2zaKyIPINGP6LU8LQIsZSLHrYMHe8fOvtzCLH4SPozIGZZza7nQkl5HxgY4kAHOdHv+4oF",
        "mKLfbRDbKXLdH9OWaIRiLLcxERONd6jBl2txArc1OXB0kta20I8kHi6wsyaiZ14PjIl2ug2D0ZRF53qLidvscgTuD48iMQy1",
        "kzu6Ohr+QD6trk4sLupB+N/XFeJppcwaygIl3ibm/EN33ufFuFbsp8p7QsAF7Ic4rGpOJbRPPpWc9E8qLxCriIG96g6jFx0t",
        "JpQ6OCO5AgMBAAECggEAE3ZH+cH3nMCxNslb+DNmFOdBD+1BYrxhXiRXBSOlOyA/EbSKYJdhmH8cMQcSAXB7OfQXKATHFI6B",
        "IY+Ij3iSMUt4UG7TQ79zupHTG5BDf39/rR+ag4ian95vj/G2cUf+9/sGj5700exH5UhLCoLPx0xmIrL+U672aXJm0dUdUsL/",
        "2HNBRIpgvp2vGvVboKvoXdhW2ndfMqZMSoTre6DtowgL53DzHzbX9NxX9VKmea0C+mMya7oCnBq3JFlUFf7onq6XDTc0j3pm",
        "eulxiJKyxTMwuUxGqEA0k4PAQFLZcJGFSmPC1mqpb5jD7aUmIOI+ASDOGLCc+tdznTjrzwC2oQKBgQD9dzlMXlTSmENCWrGC",
        "m22+obrhsETGryaon1f6VK32EhqQYen1aptenWeFOCbPYVndQPsrcYYCy9mm6V7C0Xsv7talGowGCch7sA/5ZH0Ub5+1WFdh",
        "egqfJTBUqtopIjMJKfYDinFpframYJRDiCnmD0yWSd78mWweOyjSZ6iyGwKBgQDbr4PD7X/pHCg45lh8Aek69DZkR2gEAmE8",
        "Noa4Ug0Vhmv5FhIDjMORZ0z+w8PpeXEAVT2/ThkZrRqp9/qoXxyQK7P3KkdtBXRHdCjmykZiGYCeV4pSD07cSbj0afFrFYm9",
        "GdezgRtTy+UHwLGa6UA8+S+616K/HWG4isO8lkq+uwKBgCAgo5elgVTsTeI0QrnOX7vBHkILKLySaPEIuYsWfrJpGwrgDlq4",
        "N5dnlj6RnoG80jo0SWH5UsY59o2smQFSsi2iNXzZ/5OoW8wpxeyTqzMS7wh6eSD26i+/8/9XZK3AEv3/XpqWSsfXcull5oUk",
        "1kK9/7QxCt2zyLuQPh1lXEGvAoGAPy0/aHYBhelKC+r6YVcvWnvmtHnwiM6iZe2MWq+GAb2xiWV2crzldQhPFSj5S0hYXe8l",
        "ncF46HBmraCZ3hfUIAXhcGAhQFIEOZRHOu/Kw+VvnpmwNp8eX6132hopilEcVlx7Mq0bTcLiL5OTv+f6SE6lEkd3Dx0FAEwv",
        "tClIf4cCgYAqE3FfB4BQMTIs7Cwv3VXQ5Des6wODozD18sgbJdewyzNSyekp+Lak708QoRfnbBm4cKjdrLsE/0TE0picxFGi",
        "QweFY3NuDwot+OCA0/W7P6MdmA2WXbVqQwNS9DQgsfEFKe6R2WpN1Qfo1/pkqf7iC2AXse1A5JoOerVzGayLkg==",
    );

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn aud(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| (*s).to_owned()).collect()
    }

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn bundles_with(td_name: &str, authorities: &[JwtAuthority]) -> BundleSet {
        let mut bundle = Bundle::new(td(td_name));
        for a in authorities {
            bundle.add_jwt_authority(a.clone());
        }
        BundleSet::new([bundle])
    }

    fn b64json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    /// A token with arbitrary header and claims, signed by `sign` over the signing input.
    fn forge(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64json(header), b64json(claims));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn es256(signer: &JwtSigner) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        |msg| {
            signer
                .key_pair
                .sign(&SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec()
        }
    }

    fn claims_for(sub: &str, exp: i64) -> Value {
        json!({"sub": sub, "aud": ["db"], "exp": exp, "iat": exp - 300})
    }

    #[test]
    fn minted_tokens_round_trip() {
        let signer = JwtSigner::generate().unwrap();
        let workload = id("spiffe://west.example/ns/demo/sa/echo");
        let svid = signer
            .sign_at(&workload, &aud(&["db", "cache"]), DEFAULT_JWT_TTL, t0())
            .unwrap();
        assert_eq!(svid.expiry, t0() + DEFAULT_JWT_TTL);
        assert_eq!(svid.issued_at, Some(t0()));
        // Header and claims exactly as documented.
        let mut parts = svid.token.split('.');
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"})
        );
        assert_eq!(
            Value::Object(svid.claims.clone()),
            json!({"sub": workload.as_str(), "aud": ["db", "cache"],
                   "exp": t0().unix_timestamp() + 300, "iat": t0().unix_timestamp()})
        );

        let set = bundles_with("west.example", &[signer.public_authority()]);
        let valid = validate_at(&svid.token, "cache", &set, t0()).unwrap();
        assert_eq!(valid, svid);
        // One second before expiry it still validates; at expiry it does not (no leeway).
        let last = t0() + DEFAULT_JWT_TTL - Duration::from_secs(1);
        validate_at(&svid.token, "db", &set, last).unwrap();
        // The token never shows up in Debug output.
        assert!(!format!("{svid:?}").contains(&svid.token));
    }

    #[test]
    fn the_key_survives_pkcs8_and_the_bundle_json() {
        let signer = JwtSigner::generate().unwrap();
        let again = JwtSigner::from_pkcs8(&signer.to_pkcs8()).unwrap();
        assert_eq!(again.kid(), signer.kid());
        assert_eq!(again.public_authority(), signer.public_authority());
        assert_ne!(JwtSigner::generate().unwrap().kid(), signer.kid());
        assert!(matches!(
            JwtSigner::from_pkcs8(b"not a key"),
            Err(JwtError::Key(_))
        ));

        // Published as a jwt-svid JWK with kid, read back, and used to validate.
        let mut bundle = Bundle::new(td("west.example"));
        bundle.add_jwt_authority(signer.public_authority());
        let json: Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
        let jwk = &json["keys"][0];
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["kid"], signer.kid());
        assert_eq!((&jwk["kty"], &jwk["crv"]), (&json!("EC"), &json!("P-256")));
        let parsed = Bundle::parse_json(td("west.example"), json.to_string().as_bytes()).unwrap();
        assert_eq!(parsed, bundle);
        let svid = again
            .sign_at(
                &id("spiffe://west.example/a"),
                &aud(&["x"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap();
        validate_at(&svid.token, "x", &BundleSet::new([parsed]), t0()).unwrap();
    }

    #[test]
    fn minting_refuses_bad_requests() {
        let signer = JwtSigner::generate().unwrap();
        let workload = id("spiffe://west.example/a");
        let ttl = Duration::from_secs(60);
        for audience in [aud(&[]), aud(&[""]), aud(&["ok", ""])] {
            assert_eq!(
                signer.sign_at(&workload, &audience, ttl, t0()).unwrap_err(),
                JwtError::NoAudience
            );
        }
        assert!(matches!(
            signer.sign_at(&id("spiffe://west.example"), &aud(&["a"]), ttl, t0()),
            Err(JwtError::NotAWorkloadId(_))
        ));
        assert!(matches!(
            signer.sign_at(&workload, &aud(&["a"]), Duration::from_millis(999), t0()),
            Err(JwtError::BadTtl(_))
        ));
    }

    #[test]
    fn expired_wrong_audience_and_not_yet_valid_are_refused() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let svid = signer
            .sign_at(
                &id("spiffe://west.example/a"),
                &aud(&["db"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap();
        let at_exp = t0() + Duration::from_secs(60);
        let e = validate_at(&svid.token, "db", &set, at_exp).unwrap_err();
        assert!(
            matches!(&e, JwtError::Expired { expired_at, .. } if *expired_at == at_exp),
            "{e}"
        );
        assert_eq!(e.reason(), "expired");
        let e = validate_at(&svid.token, "cache", &set, t0()).unwrap_err();
        assert!(
            matches!(&e, JwtError::WrongAudience { expected, actual, .. }
                if expected == "cache" && actual == &aud(&["db"])),
            "{e}"
        );
        assert_eq!(
            validate_at(&svid.token, "", &set, t0()).unwrap_err(),
            JwtError::NoAudience
        );
        // A single-string aud is accepted (RFC 7519 §4.1.3); nbf in the future is not.
        let exp = t0().unix_timestamp() + 60;
        let header = json!({"alg": "ES256", "kid": signer.kid()});
        let single = forge(
            &header,
            &json!({"sub": "spiffe://west.example/a", "aud": "db", "exp": exp}),
            es256(&signer),
        );
        let valid = validate_at(&single, "db", &set, t0()).unwrap();
        assert_eq!((valid.audience, valid.issued_at), (aud(&["db"]), None));
        let early = forge(
            &header,
            &json!({"sub": "spiffe://west.example/a", "aud": ["db"], "exp": exp,
                    "nbf": t0().unix_timestamp() + 10}),
            es256(&signer),
        );
        assert!(matches!(
            validate_at(&early, "db", &set, t0()),
            Err(JwtError::NotYetValid { .. })
        ));
        validate_at(&early, "db", &set, t0() + Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn the_key_comes_from_the_subjects_own_trust_domain() {
        let west = JwtSigner::generate().unwrap();
        let east = JwtSigner::generate().unwrap();
        let token = west
            .sign_at(
                &id("spiffe://east.example/a"),
                &aud(&["db"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap()
            .token;
        // West's key signed a token claiming an east ID: east's bundle does not hold that kid.
        let mut west_bundle = Bundle::new(td("west.example"));
        west_bundle.add_jwt_authority(west.public_authority());
        let mut east_bundle = Bundle::new(td("east.example"));
        east_bundle.add_jwt_authority(east.public_authority());
        let both = BundleSet::new([west_bundle.clone(), east_bundle]);
        let e = validate_at(&token, "db", &both, t0()).unwrap_err();
        assert!(
            matches!(&e, JwtError::UnknownKeyId { kid, trust_domain }
                if kid == west.kid() && trust_domain.name() == "east.example"),
            "{e}"
        );
        assert_eq!(e.reason(), "unknown_key_id");
        let e = validate_at(&token, "db", &BundleSet::new([west_bundle]), t0()).unwrap_err();
        assert_eq!(e, JwtError::UnknownTrustDomain(td("east.example")));
        // Unknown kid within the right domain.
        let own = east
            .sign_at(
                &id("spiffe://east.example/a"),
                &aud(&["db"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap();
        let other_key = bundles_with("east.example", &[west.public_authority()]);
        assert!(matches!(
            validate_at(&own.token, "db", &other_key, t0()),
            Err(JwtError::UnknownKeyId { .. })
        ));
    }

    #[test]
    fn tampered_tokens_and_impostor_keys_fail_the_signature() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let token = signer
            .sign_at(
                &id("spiffe://west.example/a"),
                &aud(&["db"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap()
            .token;
        let (input, sig) = token.rsplit_once('.').unwrap();
        let (header, _) = input.split_once('.').unwrap();
        // Same header and signature, other claims.
        let other_claims = b64json(&json!({"sub": "spiffe://west.example/admin",
            "aud": ["db"], "exp": t0().unix_timestamp() + 60}));
        let swapped = format!("{header}.{other_claims}.{sig}");
        let e = validate_at(&swapped, "db", &set, t0()).unwrap_err();
        assert!(matches!(e, JwtError::BadSignature { .. }), "{e}");
        assert_eq!(e.reason(), "bad_signature");
        // A flipped signature byte.
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 1;
        let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&raw));
        assert!(matches!(
            validate_at(&flipped, "db", &set, t0()),
            Err(JwtError::BadSignature { .. })
        ));
        // Another key presenting the trusted key's kid.
        let impostor = JwtSigner::generate().unwrap();
        let forged = forge(
            &json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"}),
            &claims_for("spiffe://west.example/a", t0().unix_timestamp() + 60),
            es256(&impostor),
        );
        assert!(matches!(
            validate_at(&forged, "db", &set, t0()),
            Err(JwtError::BadSignature { .. })
        ));
    }

    #[test]
    fn only_jwt_svid_algorithms_are_accepted() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let claims = claims_for("spiffe://west.example/a", t0().unix_timestamp() + 60);
        // alg none, with the empty signature such tokens carry.
        let none = format!(
            "{}.{}.",
            b64json(&json!({"alg": "none", "kid": signer.kid()})),
            b64json(&claims)
        );
        let e = validate_at(&none, "db", &set, t0()).unwrap_err();
        assert_eq!(e, JwtError::UnsupportedAlgorithm("none".into()));
        assert_eq!(e.reason(), "unsupported_algorithm");
        // HMAC keyed with the public key (the classic confusion attack) and ES512.
        for alg in ["HS256", "HS512", "ES512", "EdDSA", "es256"] {
            let token = forge(
                &json!({"alg": alg, "kid": signer.kid()}),
                &claims,
                es256(&signer),
            );
            assert_eq!(
                validate_at(&token, "db", &set, t0()).unwrap_err(),
                JwtError::UnsupportedAlgorithm(alg.into())
            );
        }
        let no_alg = forge(&json!({"kid": signer.kid()}), &claims, es256(&signer));
        assert_eq!(
            validate_at(&no_alg, "db", &set, t0()).unwrap_err(),
            JwtError::MissingAlgorithm
        );
        // A P-256 key cannot verify ES384 or RS256.
        for alg in ["ES384", "RS256", "PS256"] {
            let token = forge(
                &json!({"alg": alg, "kid": signer.kid()}),
                &claims,
                es256(&signer),
            );
            assert!(
                matches!(validate_at(&token, "db", &set, t0()),
                    Err(JwtError::KeyMismatch { alg: ref refused, .. }) if refused == alg),
                "{alg}"
            );
        }
    }

    #[test]
    fn headers_are_restricted() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let claims = claims_for("spiffe://west.example/a", t0().unix_timestamp() + 60);
        let kid = signer.kid();
        let cases = [
            (
                json!({"alg": "ES256", "kid": kid, "typ": "JWS"}),
                JwtError::BadType("\"JWS\"".into()),
            ),
            (
                json!({"alg": "ES256", "kid": kid, "typ": 1}),
                JwtError::BadType("1".into()),
            ),
            (json!({"alg": "ES256"}), JwtError::MissingKeyId),
            (json!({"alg": "ES256", "kid": ""}), JwtError::MissingKeyId),
            (
                json!({"alg": "ES256", "kid": kid, "jwk": {"kty": "EC"}}),
                JwtError::UnexpectedHeader("jwk".into()),
            ),
            (
                json!({"alg": "ES256", "kid": kid, "crit": ["exp"]}),
                JwtError::UnexpectedHeader("crit".into()),
            ),
        ];
        for (header, expected) in cases {
            let token = forge(&header, &claims, es256(&signer));
            assert_eq!(
                validate_at(&token, "db", &set, t0()).unwrap_err(),
                expected,
                "{header}"
            );
        }
        // typ JOSE and an absent typ are fine.
        for header in [
            json!({"alg": "ES256", "kid": kid, "typ": "JOSE"}),
            json!({"alg": "ES256", "kid": kid}),
        ] {
            validate_at(&forge(&header, &claims, es256(&signer)), "db", &set, t0()).unwrap();
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let good = signer
            .sign_at(
                &id("spiffe://west.example/a"),
                &aud(&["db"]),
                Duration::from_secs(60),
                t0(),
            )
            .unwrap()
            .token;
        let parts: Vec<&str> = good.split('.').collect();
        let malformed = |segments| JwtError::Malformed { segments };
        let cases = [
            (String::new(), malformed(1)),
            ("abc".into(), malformed(1)),
            (format!("{}.{}", parts[0], parts[1]), malformed(2)),
            (format!("{good}.x"), malformed(4)),
            (format!("{good}.x.y"), malformed(5)),
            (format!(".{}.{}", parts[1], parts[2]), malformed(3)),
            (format!("{}..{}", parts[0], parts[2]), malformed(3)),
            (format!("{}.{}.", parts[0], parts[1]), malformed(3)),
            (
                format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
                JwtError::NotBase64 { segment: "header" },
            ),
            (
                format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
                JwtError::NotBase64 { segment: "claims" },
            ),
            (
                format!("{}.{}.{}/", parts[0], parts[1], parts[2]),
                JwtError::NotBase64 {
                    segment: "signature",
                },
            ),
            (
                "x".repeat(MAX_TOKEN_LEN + 1),
                JwtError::TooLong {
                    len: MAX_TOKEN_LEN + 1,
                },
            ),
        ];
        for (token, expected) in cases {
            assert_eq!(
                validate_at(&token, "db", &set, t0()).unwrap_err(),
                expected,
                "{token:.40}"
            );
        }
        for (header, segment) in [
            (URL_SAFE_NO_PAD.encode("not json"), "header"),
            (URL_SAFE_NO_PAD.encode("[1]"), "header"),
            (
                URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k","alg":"none"}"#),
                "header",
            ),
        ] {
            let token = format!("{header}.{}.{}", parts[1], parts[2]);
            let e = validate_at(&token, "db", &set, t0()).unwrap_err();
            assert!(
                matches!(&e, JwtError::NotJson { segment: s, .. }
                    | JwtError::DuplicateMember { segment: s, .. } if *s == segment),
                "{e}"
            );
            assert_eq!(e.reason(), "malformed");
        }
    }

    #[test]
    fn required_claims_are_checked() {
        let signer = JwtSigner::generate().unwrap();
        let set = bundles_with("west.example", &[signer.public_authority()]);
        let header = json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"});
        let exp = t0().unix_timestamp() + 60;
        let sub = "spiffe://west.example/a";
        let cases = [
            (
                json!({"aud": ["db"], "exp": exp}),
                JwtError::MissingClaim("sub"),
            ),
            (
                json!({"sub": sub, "exp": exp}),
                JwtError::MissingClaim("aud"),
            ),
            (
                json!({"sub": sub, "aud": ["db"]}),
                JwtError::MissingClaim("exp"),
            ),
        ];
        for (claims, expected) in cases {
            let token = forge(&header, &claims, es256(&signer));
            assert_eq!(validate_at(&token, "db", &set, t0()).unwrap_err(), expected);
        }
        let bad = [
            (json!({"sub": sub, "aud": [], "exp": exp}), "aud"),
            (json!({"sub": sub, "aud": ["db", 1], "exp": exp}), "aud"),
            (json!({"sub": sub, "aud": {"a": 1}, "exp": exp}), "aud"),
            (json!({"sub": sub, "aud": ["db"], "exp": "soon"}), "exp"),
            (json!({"sub": sub, "aud": ["db"], "exp": 1e300}), "exp"),
            (
                json!({"sub": sub, "aud": ["db"], "exp": exp, "iat": null}),
                "iat",
            ),
            (json!({"sub": 7, "aud": ["db"], "exp": exp}), "sub"),
        ];
        for (claims, name) in bad {
            let token = forge(&header, &claims, es256(&signer));
            let e = validate_at(&token, "db", &set, t0()).unwrap_err();
            assert!(
                matches!(&e, JwtError::BadClaim { claim, .. } if *claim == name),
                "{claims}: {e}"
            );
        }
        for sub in ["https://west.example/a", "spiffe://West.example/a", ""] {
            let token = forge(
                &header,
                &json!({"sub": sub, "aud": ["db"], "exp": exp}),
                es256(&signer),
            );
            assert!(
                matches!(
                    validate_at(&token, "db", &set, t0()),
                    Err(JwtError::BadSubject { .. })
                ),
                "{sub}"
            );
        }
        // A fractional exp is a NumericDate too.
        let token = forge(
            &header,
            &json!({"sub": sub, "aud": ["db"], "exp": exp as f64 + 0.5, "jti": "x"}),
            es256(&signer),
        );
        let svid = validate_at(&token, "db", &set, t0()).unwrap();
        assert_eq!(svid.claims["jti"], "x");
    }

    #[test]
    fn es384_rsa_and_pss_tokens_verify() {
        let rng = SystemRandom::new();
        let sub = "spiffe://west.example/a";
        let claims = claims_for(sub, t0().unix_timestamp() + 60);

        let p384_doc =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
                .unwrap();
        let p384 = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            p384_doc.as_ref(),
            &rng,
        )
        .unwrap();
        let point = p384.public_key().as_ref();
        let p384_authority = JwtAuthority::new(
            "p384",
            JwkPublicKey::Ec {
                crv: "P-384",
                x: point[1..49].to_vec(),
                y: point[49..].to_vec(),
            },
        );
        let set = bundles_with("west.example", std::slice::from_ref(&p384_authority));
        let token = forge(&json!({"alg": "ES384", "kid": "p384"}), &claims, |m| {
            p384.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        validate_at(&token, "db", &set, t0()).unwrap();
        // A P-384 key cannot pass for ES256.
        let token = forge(&json!({"alg": "ES256", "kid": "p384"}), &claims, |m| {
            p384.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        assert!(matches!(
            validate_at(&token, "db", &set, t0()),
            Err(JwtError::KeyMismatch { .. })
        ));

        let der = base64::engine::general_purpose::STANDARD
            .decode(RSA_PKCS8)
            .unwrap();
        let rsa = RsaKeyPair::from_pkcs8(&der).unwrap();
        let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(rsa.public());
        let (n, e) = (public.n, public.e);
        let rsa_authority = JwtAuthority::new("rsa", JwkPublicKey::Rsa { n, e });
        let set = bundles_with("west.example", &[rsa_authority]);
        let rsa_sign = |padding: &'static dyn signature::RsaEncoding| {
            let rsa = &rsa;
            let rng = &rng;
            move |m: &[u8]| {
                let mut sig = vec![0; rsa.public().modulus_len()];
                rsa.sign(padding, rng, m, &mut sig).unwrap();
                sig
            }
        };
        let algorithms: [(&str, &'static dyn signature::RsaEncoding); 6] = [
            ("RS256", &signature::RSA_PKCS1_SHA256),
            ("RS384", &signature::RSA_PKCS1_SHA384),
            ("RS512", &signature::RSA_PKCS1_SHA512),
            ("PS256", &signature::RSA_PSS_SHA256),
            ("PS384", &signature::RSA_PSS_SHA384),
            ("PS512", &signature::RSA_PSS_SHA512),
        ];
        for (alg, padding) in algorithms {
            let token = forge(
                &json!({"alg": alg, "kid": "rsa"}),
                &claims,
                rsa_sign(padding),
            );
            validate_at(&token, "db", &set, t0()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        }
        // PKCS#1 v1.5 signature presented as PSS: the signature check fails.
        let token = forge(
            &json!({"alg": "PS256", "kid": "rsa"}),
            &claims,
            rsa_sign(&signature::RSA_PKCS1_SHA256),
        );
        assert!(matches!(
            validate_at(&token, "db", &set, t0()),
            Err(JwtError::BadSignature { .. })
        ));
        // A JWK that pins another alg refuses this one.
        let mut pinned = p384_authority;
        pinned.key.insert("alg".into(), "ES512".into());
        let set = bundles_with("west.example", &[pinned]);
        let token = forge(&json!({"alg": "ES384", "kid": "p384"}), &claims, |m| {
            p384.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        assert!(matches!(
            validate_at(&token, "db", &set, t0()),
            Err(JwtError::KeyMismatch { .. })
        ));
    }

    /// An independent implementation (the `spiffe` crate, jsonwebtoken underneath) accepts
    /// what we mint, with the JWT bundle built from our own JWKS output.
    #[test]
    fn the_spiffe_crate_validates_our_tokens() {
        let signer = JwtSigner::generate().unwrap();
        let svid = signer
            .sign(
                &id("spiffe://west.example/ns/demo/sa/echo"),
                &aud(&["spiffe://west.example/db"]),
                DEFAULT_JWT_TTL,
            )
            .unwrap();
        let mut bundle = Bundle::new(td("west.example"));
        bundle.add_jwt_authority(signer.public_authority());
        let theirs_td = spiffe::TrustDomain::new("west.example").unwrap();
        let jwt_bundle =
            spiffe::JwtBundle::from_jwt_authorities(theirs_td, bundle.to_jwt_jwks().as_bytes())
                .unwrap();
        let mut set = spiffe::JwtBundleSet::new();
        set.add_bundle(jwt_bundle);
        let theirs =
            spiffe::JwtSvid::parse_and_validate(&svid.token, &set, &["spiffe://west.example/db"])
                .unwrap();
        assert_eq!(theirs.spiffe_id().to_string(), svid.spiffe_id.as_str());
        assert_eq!(theirs.key_id(), signer.kid());
        assert_eq!(theirs.audience(), svid.audience.as_slice());
        // And it refuses what we refuse.
        assert!(spiffe::JwtSvid::parse_and_validate(&svid.token, &set, &["other"]).is_err());
    }
}
