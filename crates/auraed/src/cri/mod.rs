//! The Kubernetes CRI (`runtime.v1.RuntimeService` and
//! `runtime.v1.ImageService`), served on a unix socket of its own with plain
//! gRPC: kubelet speaks no TLS to its runtime, the socket's mode (0660,
//! root's group) is the guard, as with containerd. Off unless
//! `--cri-socket` is given.
//!
//! The generated API and the image side (pull, store, unpack) are in the
//! `auraed-cri` crate; `runtime.rs` is the RuntimeService (pods and
//! containers on cells), `server.rs` binds the socket and serves both.

mod cni;
pub mod container;
mod netns;
mod pod;
mod runtime;
pub mod sandbox;
mod server;
mod stats;
pub mod streaming;

use std::path::PathBuf;

pub use server::{start, Cri, CriError};

/// What the CRI server needs from the daemon's configuration.
#[derive(Debug, Clone)]
pub struct CriSettings {
    pub socket: PathBuf,
    /// Pod sandbox records live in `<runtime_dir>/cri/sandboxes`.
    pub runtime_dir: PathBuf,
    /// Images live in `<library_dir>/cri/images`.
    pub library_dir: PathBuf,
    /// containerd-style `certs.d` (`<registry>/hosts.toml`).
    pub registry_config_dir: PathBuf,
    /// CNI network configuration (NetworkReady in Status).
    pub cni_conf_dir: PathBuf,
    /// The streaming server's listen address (`streaming/`).
    pub streaming_addr: std::net::SocketAddr,
    /// CNI plugin directories, searched in order.
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl CriSettings {
    /// None when the CRI is not enabled.
    pub fn from_config(config: &crate::Config) -> Option<CriSettings> {
        Some(CriSettings {
            socket: config.cri_socket.clone()?,
            runtime_dir: config.runtime_dir.clone(),
            library_dir: config.library_dir.clone(),
            registry_config_dir: config.registry_config_dir.clone(),
            cni_conf_dir: config.cni_conf_dir.clone(),
            streaming_addr: config.cri_streaming_addr,
            cni_bin_dirs: std::env::split_paths(&config.cni_bin_dir)
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        })
    }
}
