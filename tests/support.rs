//! Shared test helpers: locating the conformance vectors and deciding when a missing
//! prerequisite skips a test and when it fails it.

use std::path::PathBuf;

/// True when running under CI (`CI=true`): a missing prerequisite fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The SPIFFE conformance vectors directory, or `None` (with a message) when it is absent
/// outside CI. Under CI its absence fails the test.
pub fn spiffe_testdata() -> Option<PathBuf> {
    let root = match std::env::var_os("ISTHMUS_TESTDATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata"),
    };
    let dir = root.join("spiffe");
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    let message = format!(
        "SPIFFE conformance vectors not found at {} (set ISTHMUS_TESTDATA to the directory that holds spiffe/)",
        dir.display()
    );
    assert!(!in_ci(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}
