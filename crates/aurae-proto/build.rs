//! Generates the Aurae v0 API from `api/*.proto` with protox (a pure Rust
//! protobuf compiler), so building needs no `protoc` on the machine.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: [&str; 4] = [
    "cells.proto",
    "discovery.proto",
    "observe.proto",
    "vms.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../api");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| api.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&api])?;
    // The encoded descriptor set feeds gRPC server reflection.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("aurae_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        // prost's codec with an encoder that reserves room first (src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
