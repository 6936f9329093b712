//! Kernel-facing code. Nothing here imports tonic: each module has its own
//! error enum, mapped to gRPC status once, in `crate::error`.
pub mod cgroup;
pub mod ebpf;
pub mod hypervisor;
pub mod memory;
pub mod proc;
pub mod rlimit;
pub mod shim;
pub mod spawn;
