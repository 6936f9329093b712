//! Errors: each layer has its own `thiserror` enum; this module holds the
//! daemon's start-up error and the one mapping of service errors to gRPC
//! status codes.

use crate::{listener::ListenError, pki::PkiError};

/// Why the daemon could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
}
