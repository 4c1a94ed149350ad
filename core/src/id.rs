//! SPIFFE IDs and trust domain names, parsed exactly as SPIFFE-ID.md says.
//!
//! Where the specification leaves room we decide once, like SPIRE: the scheme and the trust
//! domain must already be lowercase (we reject rather than normalise), IDs longer than 2048
//! bytes and trust domains longer than 255 bytes are rejected, and a trailing `/` (including the
//! root path `spiffe://td/`) is invalid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME_PREFIX: &str = "spiffe://";
/// Longest SPIFFE ID we accept or emit, in bytes (SPIFFE-ID.md §2.3).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name we accept, in bytes (SPIFFE-ID.md §2.3, the DNS host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a SPIFFE ID or trust domain name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The scheme is missing or is not exactly `spiffe` in lowercase.
    #[error("{input:?}: scheme must be \"spiffe://\" (lowercase)")]
    WrongScheme {
        /// The rejected input.
        input: String,
    },
    /// The trust domain is empty.
    #[error("{input:?}: trust domain is empty")]
    MissingTrustDomain {
        /// The rejected input.
        input: String,
    },
    /// The trust domain contains a character outside `[a-z0-9._-]`.
    #[error(
        "{input:?}: trust domain has character {found:?}; only lowercase letters, digits, '.', '-' and '_' are allowed (no port, userinfo, uppercase or percent-encoding)"
    )]
    BadTrustDomainChar {
        /// The rejected input.
        input: String,
        /// The first offending character.
        found: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {len} bytes; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The path has an empty segment (`//` or a trailing `/`).
    #[error("{input:?}: path has an empty segment (a '//' or a trailing '/')")]
    EmptySegment {
        /// The rejected input.
        input: String,
    },
    /// The path has a `.` or `..` segment.
    #[error("{input:?}: path has a '.' or '..' segment")]
    DotSegment {
        /// The rejected input.
        input: String,
    },
    /// The path contains a character outside `[a-zA-Z0-9._-]`.
    #[error(
        "{input:?}: path has character {found:?}; only letters, digits, '.', '-' and '_' are allowed (no query, fragment or percent-encoding)"
    )]
    BadPathChar {
        /// The rejected input.
        input: String,
        /// The first offending character.
        found: char,
    },
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {len} bytes; at most {MAX_ID_LEN} are allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

fn is_td_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

fn check_trust_domain(name: &str, input: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain {
            input: input.to_owned(),
        });
    }
    if let Some(found) = name.chars().find(|c| !is_td_char(*c)) {
        return Err(IdError::BadTrustDomainChar {
            input: input.to_owned(),
            found,
        });
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: name.len() });
    }
    Ok(())
}

/// Checks a path (`""` or `/seg/seg`), as SPIFFE-ID.md §2.2 defines it.
fn check_path(path: &str, input: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // Callers pass either "" or a string starting with '/'.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => {
                return Err(IdError::EmptySegment {
                    input: input.to_owned(),
                });
            }
            "." | ".." => {
                return Err(IdError::DotSegment {
                    input: input.to_owned(),
                });
            }
            _ => {
                if let Some(found) = segment.chars().find(|c| !is_path_char(*c)) {
                    return Err(IdError::BadPathChar {
                        input: input.to_owned(),
                        found,
                    });
                }
            }
        }
    }
    Ok(())
}

/// A SPIFFE trust domain name such as `west.example` (SPIFFE-ID.md §2.1).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`, not `spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        if name.is_empty() {
            return Err(IdError::Empty);
        }
        check_trust_domain(name, name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, used for CA certificates and as the
    /// key of bundle maps in the Workload API.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            td_len: self.0.len(),
            uri: format!("{SCHEME_PREFIX}{}", self.0),
        }
    }

    /// Builds a workload ID in this trust domain from path segments, validating each one.
    pub fn workload_id(&self, segments: &[&str]) -> Result<SpiffeId, IdError> {
        let mut uri = format!("{SCHEME_PREFIX}{}", self.0);
        for segment in segments {
            uri.push('/');
            uri.push_str(segment);
        }
        SpiffeId::parse(&uri)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>[/<path>]` (SPIFFE-ID.md §2).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Length of the trust domain, which starts right after `spiffe://`.
    td_len: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID. Uppercase schemes or trust domains are rejected, not normalised.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| IdError::WrongScheme {
                input: input.to_owned(),
            })?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td, input)?;
        check_path(path, input)?;
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        Ok(Self {
            uri: input.to_owned(),
            td_len: td.len(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The trust domain name without allocating.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len]
    }

    /// The path, `""` for a trust domain ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len() + self.td_len..]
    }

    /// True for `spiffe://<td>` with no path: the ID of a trust domain (and of its CAs).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// True if this ID's path equals `prefix` or starts with `prefix` followed by `/`, within
    /// the same trust domain as `prefix`. Used by path-prefix authorization rules.
    pub fn is_under(&self, prefix: &SpiffeId) -> bool {
        if self.trust_domain_name() != prefix.trust_domain_name() {
            return false;
        }
        let (path, base) = (self.path(), prefix.path());
        base.is_empty()
            || path == base
            || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts() {
        let id = SpiffeId::parse("spiffe://west.example/ns/demo/sa/echo").unwrap();
        assert_eq!(id.trust_domain_name(), "west.example");
        assert_eq!(id.path(), "/ns/demo/sa/echo");
        assert!(!id.is_trust_domain_id());
        assert_eq!(id.trust_domain().id().as_str(), "spiffe://west.example");
        assert!(id.trust_domain().id().is_trust_domain_id());
    }

    #[test]
    fn per_byte_rule() {
        // go-spiffe's exhaustive test: every byte except '/' in the TD and in the path.
        for b in 0u8..=255 {
            let c = b as char;
            if c == '/' {
                continue;
            }
            let td_ok =
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
            let path_ok = c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            let in_td = format!("spiffe://trustdomain{c}/path");
            let in_path = format!("spiffe://trustdomain/path{c}");
            assert_eq!(
                SpiffeId::parse(&in_td).is_ok(),
                td_ok,
                "byte {b:#04x} in TD"
            );
            assert_eq!(
                SpiffeId::parse(&in_path).is_ok(),
                path_ok,
                "byte {b:#04x} in path"
            );
        }
    }

    #[test]
    fn prefix_matching() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        assert!(id.is_under(&SpiffeId::parse("spiffe://td/ns/a").unwrap()));
        assert!(id.is_under(&SpiffeId::parse("spiffe://td").unwrap()));
        assert!(id.is_under(&id.clone()));
        assert!(!id.is_under(&SpiffeId::parse("spiffe://td/ns/ab").unwrap()));
        assert!(!id.is_under(&SpiffeId::parse("spiffe://other/ns/a").unwrap()));
    }

    #[test]
    fn workload_id_validates_segments() {
        let td = TrustDomain::new("west.example").unwrap();
        assert_eq!(
            td.workload_id(&["ns", "demo", "sa", "echo"])
                .unwrap()
                .as_str(),
            "spiffe://west.example/ns/demo/sa/echo"
        );
        assert!(td.workload_id(&["a/b", ""]).is_err());
        assert!(td.workload_id(&[".."]).is_err());
    }
}
