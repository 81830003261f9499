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
        // Messages that carry passwords or tokens get a redacting Debug in src/lib.rs instead,
        // so that no log line or error message can print a secret.
        .skip_debug([
            "meshwork.auth.v1.RegisterRequest",
            "meshwork.auth.v1.LoginRequest",
            "meshwork.auth.v1.RefreshRequest",
            "meshwork.auth.v1.LogoutRequest",
            "meshwork.auth.v1.TokenPair",
        ])
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
