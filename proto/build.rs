//! Compiles the wire contracts with protox (pure Rust), so a fresh machine
//! needs no system `protoc`.

fn main() -> anyhow::Result<()> {
    let files = [
        "proto/isthmus/common/v1/types.proto",
        "proto/isthmus/tunnel/v1/tunnel.proto",
        "proto/isthmus/ca/v1/ca.proto",
        "proto/isthmus/federation/v1/federation.proto",
        "proto/isthmus/config/v1/config.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Pre-encoded exports, shared between peers (see federation.proto).
        .bytes(".isthmus.federation.v1.Snapshot.services")
        .bytes(".isthmus.federation.v1.Delta.upserts")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
