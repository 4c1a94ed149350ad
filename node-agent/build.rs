//! Nothing generated yet; the Workload API proto is compiled here with protox.
fn main() {}
