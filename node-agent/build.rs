//! Generates the SPIFFE Workload API code from `proto/workload.proto` with protox (a pure-Rust
//! protobuf compiler that also ships `google/protobuf/struct.proto`), so building needs no
//! protoc. The proto has no package, so the output is `_.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
