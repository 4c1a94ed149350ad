//! Every SPIFFE conformance vector in `testdata/spiffe/` gives the result its README documents.
//! The test counts the files it read and compares them with the directory, so a vector that
//! silently disappears (or a new one without an expectation) fails it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use isthmus_core::bundle::{self, Bundle, BundleError};
use isthmus_core::endpoint::WorkloadEndpoint;
use isthmus_core::svid::SvidError;
use isthmus_core::verify::{SvidUsage, VerifyError, verify_svid_chain};
use isthmus_core::x509::{self, CertError};
use isthmus_core::{BundleSet, SpiffeId, TrustDomain, X509Svid};
use rustls_pki_types::UnixTime;
use serde_json::Value;

/// Files under testdata/spiffe that are vectors (everything but the README and licence).
const EXPECTED_VECTOR_FILES: usize = 79;

/// Whether an SVID error is the one a vector documents.
type SvidCheck = fn(&SvidError) -> bool;

struct Corpus {
    dir: PathBuf,
    read: BTreeSet<String>,
}

impl Corpus {
    fn bytes(&mut self, rel: &str) -> Vec<u8> {
        self.read.insert(rel.to_owned());
        std::fs::read(self.dir.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn on_disk(&self) -> BTreeSet<String> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    let rel = path
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    if rel != "README.md" && !rel.starts_with("LICENSE") {
                        out.insert(rel);
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn at(rfc3339: &str) -> UnixTime {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap();
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
}

fn json_bundle(c: &mut Corpus, rel: &str, domain: &str) -> Result<Bundle, BundleError> {
    Bundle::parse_json(td(domain), &c.bytes(rel))
}

fn accept(c: &mut Corpus, rel: &str, x509: usize, jwt: usize) -> Bundle {
    let b = json_bundle(c, rel, "domain.test").unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(b.x509_authorities().len(), x509, "{rel}: X.509 authorities");
    assert_eq!(b.jwt_authorities().len(), jwt, "{rel}: JWT authorities");
    b
}

fn reject(c: &mut Corpus, rel: &str, want: impl Fn(&BundleError) -> bool) {
    match json_bundle(c, rel, "domain.test") {
        Ok(b) => panic!("{rel}: accepted {b:?}, expected rejection"),
        Err(e) => assert!(want(&e), "{rel}: wrong error {e:?}"),
    }
}

fn svid_pem(c: &mut Corpus, certs: &str, key: &str) -> Result<X509Svid, SvidError> {
    let (certs, key) = (c.bytes(certs), c.bytes(key));
    X509Svid::from_pem(&certs, &key)
}

fn pem_key_der(c: &mut Corpus, rel: &str) -> Vec<u8> {
    x509::first_pkcs8_key(&c.bytes(rel)).unwrap().unwrap()
}

#[test]
fn every_spiffe_vector_gives_its_documented_result() {
    let Some(dir) = crate::support::spiffe_testdata() else {
        return;
    };
    let mut c = Corpus {
        dir,
        read: BTreeSet::new(),
    };
    spiffe_ids(&mut c);
    endpoint_addresses(&mut c);
    go_spiffe_bundles(&mut c);
    authored_bundles(&mut c);
    spire_bundles(&mut c);
    pem_and_der_bundles(&mut c);
    go_spiffe_svids(&mut c);
    rust_spiffe_svids(&mut c);
    chain_validation(&mut c);

    let on_disk = c.on_disk();
    let unread: Vec<_> = on_disk.difference(&c.read).collect();
    let missing: Vec<_> = c.read.difference(&on_disk).collect();
    assert!(
        unread.is_empty(),
        "vector files without an expectation: {unread:?}"
    );
    assert!(
        missing.is_empty(),
        "vector files that vanished: {missing:?}"
    );
    assert_eq!(
        c.read.len(),
        EXPECTED_VECTOR_FILES,
        "number of vector files read"
    );
}

fn spiffe_ids(c: &mut Corpus) {
    let doc: Value = serde_json::from_slice(&c.bytes("authored/spiffe-id-vectors.json")).unwrap();
    let ids = doc["spiffe_ids"].as_array().unwrap();
    let tds = doc["trust_domain_names"].as_array().unwrap();
    assert_eq!((ids.len(), tds.len()), (58, 11), "vector table sizes");
    for v in ids {
        let input = v["input"].as_str().unwrap();
        let valid = v["valid"].as_bool().unwrap();
        let got = SpiffeId::parse(input);
        assert_eq!(
            got.is_ok(),
            valid,
            "SPIFFE ID {input:?}: {got:?} ({})",
            v["why"]
        );
        if let Ok(id) = got {
            assert_eq!(id.as_str(), input, "an accepted ID is kept verbatim");
        }
    }
    for v in tds {
        let input = v["input"].as_str().unwrap();
        let valid = v["valid"].as_bool().unwrap();
        let got = TrustDomain::new(input);
        assert_eq!(
            got.is_ok(),
            valid,
            "trust domain {input:?}: {got:?} ({})",
            v["why"]
        );
    }
}

fn endpoint_addresses(c: &mut Corpus) {
    let doc: Value =
        serde_json::from_slice(&c.bytes("authored/workload-endpoint-socket-vectors.json")).unwrap();
    let entries = doc["socket_addresses"].as_array().unwrap();
    assert_eq!(entries.len(), 21);
    for v in entries {
        let input = v["input"].as_str().unwrap();
        let got = WorkloadEndpoint::parse(input);
        assert_eq!(
            got.is_ok(),
            v["valid"].as_bool().unwrap(),
            "{input:?}: {got:?}"
        );
    }
}

fn go_spiffe_bundles(c: &mut Corpus) {
    let b = accept(c, "go-spiffe/spiffebundle/spiffebundle_valid_1.json", 1, 1);
    assert!(
        b.jwt_authorities()
            .contains_key("C6vs25welZOx6WksNYfbMfiw9l96pMnD")
    );
    assert_eq!((b.sequence(), b.refresh_hint()), (None, None));
    let b = accept(c, "go-spiffe/spiffebundle/spiffebundle_valid_2.json", 1, 6);
    assert_eq!(b.sequence(), Some(1));
    assert_eq!(b.refresh_hint(), Some(std::time::Duration::from_secs(60)));
    let b = accept(
        c,
        "go-spiffe/spiffebundle/spiffebundle_valid_with_wit.json",
        1,
        2,
    );
    assert_eq!(b.sequence(), Some(1));
    reject(
        c,
        "go-spiffe/spiffebundle/spiffebundle_missing_kid.json",
        |e| matches!(e, BundleError::JwtMissingKid { .. }),
    );
    reject(c, "go-spiffe/spiffebundle/spiffebundle_no_keys.json", |e| {
        matches!(e, BundleError::MissingKeys)
    });
    reject(
        c,
        "go-spiffe/spiffebundle/spiffebundle_multiple_x509.json",
        |e| matches!(e, BundleError::MultipleX5c { count: 2, .. }),
    );

    // Plain JWKS as FetchJWTBundles returns it.
    for (rel, keys) in [
        ("go-spiffe/jwtbundle/jwks_valid_1.json", 1),
        ("go-spiffe/jwtbundle/jwks_valid_2.json", 2),
    ] {
        let b = Bundle::parse_jwt_jwks(td("domain.test"), &c.bytes(rel)).unwrap();
        assert_eq!(b.jwt_authorities().len(), keys, "{rel}");
        let again = Bundle::parse_jwt_jwks(td("domain.test"), b.to_jwt_jwks().as_bytes()).unwrap();
        assert_eq!(again, b, "{rel}: JWKS round trip");
    }
    let e = Bundle::parse_jwt_jwks(
        td("domain.test"),
        &c.bytes("go-spiffe/jwtbundle/jwks_missing_kid.json"),
    )
    .unwrap_err();
    assert!(matches!(e, BundleError::JwtMissingKid { .. }), "{e:?}");
}

fn authored_bundles(c: &mut Corpus) {
    let d = "authored/bundles/";
    let p = |f: &str| format!("{d}{f}");
    let b = accept(c, &p("valid-x509-and-jwt-with-seq-hint.json"), 1, 1);
    assert_eq!(b.sequence(), Some(7));
    assert_eq!(b.refresh_hint(), Some(std::time::Duration::from_secs(300)));
    let b = accept(c, &p("empty-keys-array.json"), 0, 0);
    assert!(b.is_empty());
    accept(c, &p("unknown-use-ignored.json"), 1, 0);
    accept(c, &p("missing-use-ignored.json"), 1, 0);
    accept(c, &p("unknown-kty-ignored.json"), 1, 0);
    accept(c, &p("x509-entry-without-x5c.json"), 1, 0);
    accept(c, &p("x509-entry-empty-x5c.json"), 1, 0);
    accept(c, &p("x509-entry-with-kid.json"), 1, 0);
    accept(c, &p("unknown-fields-accepted.json"), 1, 1);
    let b = accept(c, &p("sequence-u64-max.json"), 1, 0);
    assert_eq!(b.sequence(), Some(u64::MAX));
    // Identical keys under one kid: kept once.
    accept(c, &p("jwt-duplicate-kid.json"), 0, 1);
    reject(c, &p("missing-keys-member.json"), |e| {
        matches!(e, BundleError::MissingKeys)
    });
    reject(c, &p("keys-not-array.json"), |e| {
        matches!(e, BundleError::KeysNotArray)
    });
    reject(c, &p("x5c-not-base64.json"), |e| {
        matches!(e, BundleError::X5cNotBase64 { .. })
    });
    reject(c, &p("x5c-not-a-certificate.json"), |e| {
        matches!(e, BundleError::X5cNotCertificate { .. })
    });
    reject(c, &p("truncated.json"), |e| {
        matches!(e, BundleError::Json(_))
    });
    reject(c, &p("jwt-entry-without-kid.json"), |e| {
        matches!(e, BundleError::JwtMissingKid { index: 1 })
    });
    reject(c, &p("x509-entry-key-mismatch.json"), |e| {
        matches!(e, BundleError::X5cKeyMismatch { .. })
    });
    reject(c, &p("x509-entry-x5c-only-no-key-params.json"), |e| {
        matches!(e, BundleError::BadKeyParams { .. })
    });

    let map = bundle::parse_bundle_map(&c.bytes(&p("bundle-map-valid.json"))).unwrap();
    assert_eq!(map.len(), 2);
    let again =
        bundle::parse_bundle_map(bundle::bundle_map_to_json(map.values()).unwrap().as_bytes())
            .unwrap();
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        map.keys().collect::<Vec<_>>()
    );
    assert!(
        bundle::parse_bundle_map(&c.bytes(&p("bundle-map-empty.json")))
            .unwrap()
            .is_empty()
    );
    let e = bundle::parse_bundle_map(&c.bytes(&p("bundle-map-duplicate-trust-domain.json")))
        .unwrap_err();
    assert!(
        matches!(e, BundleError::DuplicateTrustDomain(ref td) if td == "domain1.test"),
        "{e:?}"
    );
}

fn spire_bundles(c: &mut Corpus) {
    let b = Bundle::parse_json(
        td("domain1.test"),
        &c.bytes("spire/bundle-show-spiffe-domain1.test.json"),
    )
    .unwrap();
    assert_eq!(
        (b.x509_authorities().len(), b.jwt_authorities().len()),
        (1, 0)
    );
    assert_eq!(b.sequence(), Some(42));
    assert_eq!(b.refresh_hint(), Some(std::time::Duration::from_secs(60)));
    let facts = x509::facts(&b.x509_authorities()[0], 0).unwrap();
    assert!(facts.is_ca && facts.subject_empty && facts.san_critical);
    assert_eq!(facts.uri_sans, ["spiffe://domain1.test"]);
    // What we publish parses back to the same authorities (and carries the key parameters
    // SPIRE's decoder insists on).
    let published = b.to_json().unwrap();
    let doc: Value = serde_json::from_str(&published).unwrap();
    let key = &doc["keys"][0];
    assert_eq!(
        (
            key["use"].as_str(),
            key["kty"].as_str(),
            key["crv"].as_str()
        ),
        (Some("x509-svid"), Some("EC"), Some("P-256"))
    );
    assert!(key.get("kid").is_none() && key["x5c"].as_array().unwrap().len() == 1);
    assert_eq!(
        Bundle::parse_json(td("domain1.test"), published.as_bytes()).unwrap(),
        b
    );

    let b = Bundle::parse_json(
        td("domain2.test"),
        &c.bytes("spire/bundle-domain2.test.json"),
    )
    .unwrap();
    assert_eq!(b.x509_authorities().len(), 1);
    assert_eq!(
        x509::facts(&b.x509_authorities()[0], 0).unwrap().uri_sans,
        ["spiffe://domain2.test"]
    );
    let b = Bundle::parse_json(
        td("otherdomain.test"),
        &c.bytes("spire/bundle-x509-and-jwt-domain1.test.json"),
    )
    .unwrap();
    assert_eq!(
        (b.x509_authorities().len(), b.jwt_authorities().len()),
        (1, 1)
    );
    assert!(b.jwt_authorities().contains_key("KID"));
    // Full round trip with both kinds of authority.
    assert_eq!(
        Bundle::parse_json(td("otherdomain.test"), b.to_json().unwrap().as_bytes()).unwrap(),
        b
    );

    for (rel, domain) in [
        ("spire/domain1.test-ca.pem", "domain1.test"),
        ("spire/domain2.test-ca.pem", "domain2.test"),
    ] {
        let b = Bundle::from_pem(td(domain), &c.bytes(rel)).unwrap();
        assert_eq!(b.x509_authorities().len(), 1, "{rel}");
    }
}

fn pem_and_der_bundles(c: &mut Corpus) {
    let g = "go-spiffe/x509bundle/";
    for (f, n) in [("cert.pem", 1), ("certs.pem", 2), ("empty.pem", 0)] {
        let b = Bundle::from_pem(td("domain.test"), &c.bytes(&format!("{g}{f}"))).unwrap();
        assert_eq!(b.x509_authorities().len(), n, "{f}");
        let again = Bundle::from_pem(td("domain.test"), b.to_pem().as_bytes()).unwrap();
        assert_eq!(again, b, "{f}: PEM round trip");
    }
    let e = Bundle::from_pem(td("domain.test"), &c.bytes(&format!("{g}not-pem.pem"))).unwrap_err();
    assert!(
        matches!(e, BundleError::Cert(CertError::NoPemBlocks)),
        "{e:?}"
    );
    let e =
        Bundle::from_pem(td("domain.test"), &c.bytes(&format!("{g}corrupted.pem"))).unwrap_err();
    assert!(
        matches!(e, BundleError::Cert(CertError::TrailingData { .. })),
        "{e:?}"
    );

    let r = "rust-spiffe/x509bundle/";
    let bundle_der =
        Bundle::from_der(td("domain.test"), &c.bytes(&format!("{r}bundle.der"))).unwrap();
    assert_eq!(bundle_der.x509_authorities().len(), 2);
    assert_eq!(
        Bundle::from_der(td("domain.test"), &bundle_der.to_der()).unwrap(),
        bundle_der
    );
    let one = Bundle::from_der(td("domain.test"), &c.bytes(&format!("{r}cert1.der"))).unwrap();
    let two = Bundle::from_der(td("domain.test"), &c.bytes(&format!("{r}cert2.der"))).unwrap();
    assert_eq!(
        (one.x509_authorities().len(), two.x509_authorities().len()),
        (1, 1)
    );
    // The same certificates as go-spiffe's certs.pem.
    let pem = Bundle::from_pem(td("domain.test"), &c.bytes(&format!("{g}certs.pem"))).unwrap();
    assert_eq!(
        pem.x509_authorities(),
        &[
            one.x509_authorities()[0].clone(),
            two.x509_authorities()[0].clone()
        ]
    );
    assert!(Bundle::from_der(td("domain.test"), &c.bytes(&format!("{r}corrupted.der"))).is_err());
}

fn go_spiffe_svids(c: &mut Corpus) {
    let g = |f: &str| format!("go-spiffe/x509svid/{f}");
    let rsa = g("key-pkcs8-rsa.pem");
    let ec = g("key-pkcs8-ecdsa.pem");
    let s = svid_pem(c, &g("good-leaf-only.pem"), &rsa).unwrap();
    assert_eq!(s.id().as_str(), "spiffe://example.org/workload-1");
    let s = svid_pem(c, &g("good-leaf-and-intermediate.pem"), &ec).unwrap();
    assert_eq!(s.chain().len(), 2);
    for f in ["good-cert-and-key.pem", "good-key-and-cert.pem"] {
        let s = svid_pem(c, &g(f), &g(f)).unwrap();
        assert_eq!(s.id().as_str(), "spiffe://example.org/workload-1", "{f}");
    }
    let cases: [(&str, &str, SvidCheck); 15] = [
        ("key-pkcs8-rsa.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::NoCertificates)
        }),
        ("good-leaf-only.pem", "good-leaf-only.pem", |e| {
            matches!(e, SvidError::NoPrivateKey)
        }),
        ("good-leaf-only.pem", "not-pem.txt", |e| {
            matches!(e, SvidError::Cert(CertError::NoPemBlocks))
        }),
        ("not-pem.txt", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::Cert(CertError::NoPemBlocks))
        }),
        ("good-leaf-only.pem", "corrupt-key.pem", |e| {
            matches!(e, SvidError::BadKey(_))
        }),
        ("corrupt-cert.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::Cert(CertError::Parse { .. }))
        }),
        ("good-leaf-and-intermediate.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::KeyMismatch)
        }),
        ("wrong-leaf-empty-id.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::NoUriSan)
        }),
        ("wrong-leaf-ca-true.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::LeafIsCa)
        }),
        (
            "wrong-leaf-no-digital-signature.pem",
            "key-pkcs8-rsa.pem",
            |e| matches!(e, SvidError::LeafWithoutDigitalSignature),
        ),
        ("wrong-leaf-cert-sign.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::LeafCanSignCertificates)
        }),
        ("wrong-leaf-crl-sign.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::LeafCanSignCrls)
        }),
        ("wrong-intermediate-no-ca.pem", "key-pkcs8-rsa.pem", |e| {
            matches!(e, SvidError::IntermediateNotCa { index: 1 })
        }),
        (
            "wrong-intermediate-no-key-cert-sign.pem",
            "key-pkcs8-rsa.pem",
            |e| matches!(e, SvidError::IntermediateWithoutKeyCertSign { index: 1 }),
        ),
        ("not-pem.txt", "not-pem.txt", |e| {
            matches!(e, SvidError::Cert(CertError::NoPemBlocks))
        }),
    ];
    for (certs, key, want) in cases {
        match svid_pem(c, &g(certs), &g(key)) {
            Ok(s) => panic!("{certs} + {key}: accepted {s:?}"),
            Err(e) => assert!(want(&e), "{certs} + {key}: wrong error {e:?}"),
        }
    }
}

fn rust_spiffe_svids(c: &mut Corpus) {
    let r = |f: &str| format!("rust-spiffe/x509svid/{f}");
    let s =
        X509Svid::from_der(&c.bytes(&r("1-svid-chain.der")), &c.bytes(&r("1-key.der"))).unwrap();
    assert_eq!(s.id().as_str(), "spiffe://example.org/service");
    assert_eq!(s.chain().len(), 2);
    let s = X509Svid::from_der(
        &c.bytes(&r("expired-svid-chain.der")),
        &c.bytes(&r("expired-key.der")),
    )
    .unwrap();
    assert!(s.not_after() < time::OffsetDateTime::now_utc());
    let s = X509Svid::from_der(
        &c.bytes(&r("svid-with-dns.der")),
        &c.bytes(&r("svid-with-dns-key.der")),
    )
    .unwrap();
    assert_eq!(s.id().as_str(), "spiffe://example.org/service");
    // Lenient accept; the issuer-side lint flags the non-critical SAN with an empty subject.
    let leaf = c.bytes(&r("empty-subject-name.der"));
    let s = X509Svid::from_der(&leaf, &c.bytes(&r("empty-subject-name-key.der"))).unwrap();
    let facts = x509::facts(s.leaf(), 0).unwrap();
    assert!(!isthmus_core::svid::issuance_lint(&facts).is_empty());
    let e =
        X509Svid::from_der(&c.bytes(&r("corrupted.der")), &c.bytes(&r("1-key.der"))).unwrap_err();
    assert!(
        matches!(e, SvidError::Cert(CertError::Parse { .. })),
        "{e:?}"
    );

    let rsa = pem_key_der(c, "go-spiffe/x509svid/key-pkcs8-rsa.pem");
    let cases: [(&str, SvidCheck); 7] = [
        ("wrong-leaf-empty-id.der", |e| {
            matches!(e, SvidError::NoUriSan)
        }),
        ("wrong-leaf-ca-true.der", |e| {
            matches!(e, SvidError::LeafIsCa)
        }),
        ("wrong-leaf-no-digital-signature.der", |e| {
            matches!(e, SvidError::LeafWithoutDigitalSignature)
        }),
        ("wrong-leaf-cert-sign.der", |e| {
            matches!(e, SvidError::LeafCanSignCertificates)
        }),
        ("wrong-leaf-crl-sign.der", |e| {
            matches!(e, SvidError::LeafCanSignCrls)
        }),
        ("wrong-intermediate-no-ca.der", |e| {
            matches!(e, SvidError::IntermediateNotCa { index: 1 })
        }),
        ("wrong-intermediate-no-key-cert-sign.der", |e| {
            matches!(e, SvidError::IntermediateWithoutKeyCertSign { index: 1 })
        }),
    ];
    for (f, want) in cases {
        match X509Svid::from_der(&c.bytes(&r(f)), &rsa) {
            Ok(s) => panic!("{f}: accepted {s:?}"),
            Err(e) => assert!(want(&e), "{f}: wrong error {e:?}"),
        }
    }
}

fn chain_validation(c: &mut Corpus) {
    // The go-spiffe CA (URI spiffe://local) as the bundle of example.org.
    let ca = Bundle::parse_json(
        td("example.org"),
        &c.bytes("go-spiffe/spiffebundle/spiffebundle_valid_1.json"),
    )
    .unwrap();
    let go_ca = BundleSet::new([ca]);
    let good = x509::certs_from_pem(&c.bytes("go-spiffe/x509svid/good-leaf-and-intermediate.pem"))
        .unwrap();
    let ok = verify_svid_chain(&good, &go_ca, at("2020-03-24T14:30:00Z"), SvidUsage::Any).unwrap();
    assert_eq!(ok.id.as_str(), "spiffe://example.org/workload-1");
    // Both EKUs are present, so TLS client and server use also verify.
    verify_svid_chain(
        &good,
        &go_ca,
        at("2020-03-24T14:30:00Z"),
        SvidUsage::TlsClient,
    )
    .unwrap();
    verify_svid_chain(
        &good,
        &go_ca,
        at("2020-03-24T14:30:00Z"),
        SvidUsage::TlsServer,
    )
    .unwrap();
    let e = verify_svid_chain(&good, &go_ca, UnixTime::now(), SvidUsage::Any).unwrap_err();
    assert!(matches!(e, VerifyError::Expired { .. }), "{e:?}");

    let expired =
        x509::split_der_chain(&c.bytes("rust-spiffe/x509svid/expired-svid-chain.der")).unwrap();
    let e = verify_svid_chain(&expired, &go_ca, UnixTime::now(), SvidUsage::Any).unwrap_err();
    assert!(matches!(e, VerifyError::Expired { .. }), "{e:?}");
    verify_svid_chain(&expired, &go_ca, at("2021-02-09T18:30:00Z"), SvidUsage::Any).unwrap();

    // The positive chain at the current time: the second certificate is example.org's root.
    let chain = x509::split_der_chain(&c.bytes("rust-spiffe/x509svid/1-svid-chain.der")).unwrap();
    let root = BundleSet::new([Bundle::with_x509_authorities(
        td("example.org"),
        vec![chain[1].clone()],
    )]);
    let ok = verify_svid_chain(&chain[..1], &root, UnixTime::now(), SvidUsage::TlsClient).unwrap();
    assert_eq!(ok.id.as_str(), "spiffe://example.org/service");
    verify_svid_chain(&chain, &root, UnixTime::now(), SvidUsage::TlsServer).unwrap();

    // Never a pooled set: the right root filed under another trust domain does not help.
    let wrong_td = BundleSet::new([Bundle::with_x509_authorities(
        td("other.org"),
        vec![chain[1].clone()],
    )]);
    let e = verify_svid_chain(&chain[..1], &wrong_td, UnixTime::now(), SvidUsage::Any).unwrap_err();
    assert!(
        matches!(e, VerifyError::UnknownTrustDomain(ref t) if t.name() == "example.org"),
        "{e:?}"
    );
    // An empty bundle revokes every SVID of the domain.
    let empty = BundleSet::new([Bundle::new(td("example.org"))]);
    let e = verify_svid_chain(&chain[..1], &empty, UnixTime::now(), SvidUsage::Any).unwrap_err();
    assert!(matches!(e, VerifyError::NoAuthorities(_)), "{e:?}");
    // A foreign root for the right trust domain.
    let foreign = BundleSet::new([Bundle::with_x509_authorities(
        td("example.org"),
        vec![good[1].clone()],
    )]);
    let e = verify_svid_chain(&chain[..1], &foreign, UnixTime::now(), SvidUsage::Any).unwrap_err();
    assert!(matches!(e, VerifyError::UnknownIssuer { .. }), "{e:?}");
}
