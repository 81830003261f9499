//! Generates the Rust contracts from `proto/` with tonic-prost-build. The protos are parsed by
//! protox (pure Rust), so no system `protoc` is needed. The encoded FileDescriptorSet is written
//! beside the generated code for gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const FILES: [&str; 5] = [
        "proto/meshwork/common/v1/money.proto",
        "proto/meshwork/users/v1/users.proto",
        "proto/meshwork/auth/v1/auth.proto",
        "proto/meshwork/billing/v1/billing.proto",
        "proto/meshwork/orders/v1/orders.proto",
    ];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("meshwork_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
