//! The Prometheus endpoint (`--metrics-listen`): one [`Registry`] built at
//! start, with
//! - per cell, collected at scrape time from the cgroup files (no
//!   background polling), cAdvisor's names and units (`cells.rs`);
//! - the daemon's own: gRPC calls by method and code, their latency, open
//!   calls and streams (`rpc.rs`, a tower layer around the gRPC server),
//!   cells and executables, eBPF signal events the kernel dropped.
//!
//! Served over plain HTTP/1 (`http.rs`) in the OpenMetrics text format,
//! which Prometheus asks for first.

mod cells;
mod http;
pub mod rpc;

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::services::{cells::Cells, observe::SignalSource};

/// The registry and the instruments the daemon updates itself.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Builds the registry: the RPC instruments of `rpc` plus collectors
    /// that read `cells` and `signals` at scrape time.
    pub fn new(rpc: &rpc::RpcMetrics, cells: Arc<Cells>, signals: SignalSource) -> Self {
        let mut registry = Registry::default();
        rpc.register(&mut registry);
        registry.register_collector(Box::new(cells::CellCollector::new(cells, signals)));
        Self { registry }
    }

    /// The exposition, OpenMetrics text (ends with `# EOF`). Reads cgroup
    /// files: call it off the async runtime.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The RPC instruments for every method the daemon serves.
pub fn rpc_metrics() -> rpc::RpcMetrics {
    rpc::RpcMetrics::new(&[
        aurae_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
}

/// Binds `addr` now (a bad address fails the start) and serves `/metrics`
/// in the background until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    rpc: &rpc::RpcMetrics,
    cells: Arc<Cells>,
    signals: SignalSource,
    shutdown: CancellationToken,
) -> Result<(), crate::DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::DaemonError::Metrics { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let metrics = Arc::new(Metrics::new(rpc, cells, signals));
    tokio::spawn(http::serve(listener, metrics, shutdown));
    tracing::info!("metrics on http://{bound}/metrics (plain HTTP)");
    Ok(())
}
