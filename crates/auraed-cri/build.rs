//! Generates the Kubernetes CRI v1 API from `proto/runtime/v1/api.proto` with
//! protox (pure Rust), so building needs no `protoc`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("runtime/v1/api.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // RPCs a service does not implement answer UNIMPLEMENTED instead of
        // needing a hand-written stub each; the services override them one
        // by one (see auraed's cri module for the reasons they give).
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
