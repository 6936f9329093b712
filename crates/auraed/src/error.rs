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
    #[error(transparent)]
    Policy(#[from] crate::authz::PolicyError),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(tonic_reflection::server::Error),
    #[error("cannot set up cgroups: {0}")]
    Cgroup(crate::host::cgroup::CgroupError),
    #[error("cannot set up VMs: {0}")]
    Hypervisor(#[from] crate::host::hypervisor::HypervisorError),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cri(#[from] crate::cri::CriError),
    #[error("cannot open the state directory {path}: {source}")]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl From<crate::services::cells::CellsError> for tonic::Status {
    fn from(e: crate::services::cells::CellsError) -> Self {
        use crate::{host::cgroup::CgroupError, services::cells::CellsError as E};
        use tonic::Code;
        let code = match &e {
            E::Invalid(_) => Code::InvalidArgument,
            E::NotFound(_) => Code::NotFound,
            E::AlreadyExists(_) => Code::AlreadyExists,
            // The kernel refused a value the request gave.
            E::Cgroup(CgroupError::Refused { .. }) => Code::InvalidArgument,
            E::Precondition(_) | E::Cgroup(CgroupError::Unsupported { .. }) => {
                Code::FailedPrecondition
            }
            E::Cgroup(_) | E::Spawn(_) | E::Internal(_) => Code::Internal,
        };
        let message = aurae_client::error_chain(&e);
        if code == Code::Internal {
            tracing::error!("{message}");
        }
        tonic::Status::new(code, message)
    }
}

impl From<crate::services::cells::validation::Invalid> for tonic::Status {
    fn from(e: crate::services::cells::validation::Invalid) -> Self {
        crate::services::cells::CellsError::from(e).into()
    }
}

impl From<crate::services::observe::ObserveError> for tonic::Status {
    fn from(e: crate::services::observe::ObserveError) -> Self {
        use crate::services::observe::ObserveError as E;
        use tonic::Code;
        let code = match &e {
            E::Invalid(_) => Code::InvalidArgument,
            E::NotFound(_) => Code::NotFound,
            E::Unimplemented(_) => Code::Unimplemented,
            E::Unavailable(_) => Code::Unavailable,
            E::Precondition(_) => Code::FailedPrecondition,
            E::Exhausted => Code::ResourceExhausted,
        };
        tonic::Status::new(code, aurae_client::error_chain(&e))
    }
}

impl From<crate::services::vms::VmsError> for tonic::Status {
    fn from(e: crate::services::vms::VmsError) -> Self {
        use crate::services::{cells::CellsError, vms::VmsError as E};
        use tonic::Code;
        let code = match &e {
            E::Invalid(_) => Code::InvalidArgument,
            E::NotFound(_) => Code::NotFound,
            E::AlreadyExists(_) => Code::AlreadyExists,
            E::Precondition(_) => Code::FailedPrecondition,
            E::Exhausted(_) => Code::ResourceExhausted,
            // A limit the cells refuse is the caller's sizing.
            E::Cells(
                CellsError::Invalid(_)
                | CellsError::Cgroup(crate::host::cgroup::CgroupError::Refused { .. }),
            ) => Code::InvalidArgument,
            E::Cells(_) => Code::Internal,
            E::Boot(_) => Code::Unavailable,
            E::Hypervisor(_) | E::Identity(_) | E::Io(..) => Code::Internal,
        };
        let message = aurae_client::error_chain(&e);
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!("{message}");
        }
        tonic::Status::new(code, message)
    }
}
