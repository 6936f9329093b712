//! gRPC services: each module turns requests into domain calls and domain
//! errors into status codes (through `crate::error`).

pub mod cells;
pub mod discovery;
pub mod observe;
pub mod vms;
