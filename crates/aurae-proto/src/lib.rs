//! The Aurae v0 API, generated at build time from `api/*.proto`.
//! No logic lives here.

#![allow(clippy::all, clippy::pedantic)]

pub mod codec;

pub mod cells {
    tonic::include_proto!("aurae.cells.v0");
}
pub mod discovery {
    tonic::include_proto!("aurae.discovery.v0");
}
pub mod observe {
    tonic::include_proto!("aurae.observe.v0");
}
pub mod vms {
    tonic::include_proto!("aurae.vms.v0");
}

/// Encoded `FileDescriptorSet` of every Aurae service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/aurae_descriptor.bin"));
