//! Kubernetes CRI support for auraed.
//!
//! `proto`: the CRI v1 API (`runtime.v1`), generated from the vendored
//! `proto/runtime/v1/api.proto`. `image`: the image side of a CRI runtime
//! (registry configuration in containerd's `certs.d` format, pulling with
//! digest verification, a content-addressed store, layer unpacking into
//! overlayfs lower directories) and the `runtime.v1.ImageService` on top.
//!
//! A crate of its own so that the generated code, the registry client and
//! its HTTP stack are compiled once and cached, whatever changes in the
//! daemon, and so that the image code is unit-tested without building it.

pub mod image;

/// The generated CRI v1 types and gRPC stubs.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("runtime.v1");
}
