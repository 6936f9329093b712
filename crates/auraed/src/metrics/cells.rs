//! Per-cell metrics under cAdvisor's names and units (so dashboards made
//! for containers work), and the daemon's cells/executables/eBPF gauges,
//! all read at scrape time. A value the host does not have is left out of
//! the exposition, never reported as 0.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use crate::{
    host::cgroup::CellStats,
    services::{cells::Cells, observe::SignalSource},
};

#[derive(Debug)]
pub(super) struct CellCollector {
    cells: Arc<Cells>,
    signals: SignalSource,
}

impl CellCollector {
    pub(super) fn new(cells: Arc<Cells>, signals: SignalSource) -> Self {
        Self { cells, signals }
    }
}

/// Nanoseconds as seconds.
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One per-cell series: name (counters without `_total`, which the encoder
/// appends), help, type, and how to get its value out of a cell's stats.
struct Series {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    value: fn(&CellStats) -> Option<f64>,
}

/// Integers up to 2^53 are exact in f64; beyond that a few units of
/// rounding in a byte or nanosecond count do not matter.
fn f(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

const SERIES: &[Series] = &[
    Series {
        name: "container_cpu_usage_seconds",
        help: "Cumulative CPU time consumed by the cell, in seconds.",
        kind: MetricType::Counter,
        value: |s| s.cpu_usage_ns.map(secs),
    },
    Series {
        name: "container_cpu_user_seconds",
        help: "Cumulative user CPU time consumed by the cell, in seconds.",
        kind: MetricType::Counter,
        value: |s| s.cpu_user_ns.map(secs),
    },
    Series {
        name: "container_cpu_system_seconds",
        help: "Cumulative system CPU time consumed by the cell, in seconds.",
        kind: MetricType::Counter,
        value: |s| s.cpu_system_ns.map(secs),
    },
    Series {
        name: "container_cpu_cfs_periods",
        help: "Number of elapsed CFS enforcement period intervals.",
        kind: MetricType::Counter,
        value: |s| f(s.cpu_periods),
    },
    Series {
        name: "container_cpu_cfs_throttled_periods",
        help: "Number of throttled CFS period intervals.",
        kind: MetricType::Counter,
        value: |s| f(s.cpu_throttled_periods),
    },
    Series {
        name: "container_cpu_cfs_throttled_seconds",
        help: "Total time duration the cell has been throttled, in seconds.",
        kind: MetricType::Counter,
        value: |s| s.cpu_throttled_ns.map(secs),
    },
    Series {
        name: "container_memory_usage_bytes",
        help: "Current memory usage of the cell, including all memory regardless of when it was accessed, in bytes.",
        kind: MetricType::Gauge,
        value: |s| f(s.memory_usage_bytes),
    },
    Series {
        name: "container_memory_working_set_bytes",
        help: "Current working set of the cell (usage minus inactive file cache), in bytes.",
        kind: MetricType::Gauge,
        value: |s| f(s.memory_working_set_bytes),
    },
    Series {
        name: "container_memory_rss",
        help: "Size of anonymous memory (RSS) of the cell, in bytes.",
        kind: MetricType::Gauge,
        value: |s| f(s.memory_rss_bytes),
    },
    Series {
        name: "container_memory_cache",
        help: "Size of the page cache charged to the cell, in bytes.",
        kind: MetricType::Gauge,
        value: |s| f(s.memory_cache_bytes),
    },
    Series {
        name: "container_spec_memory_limit_bytes",
        help: "Memory limit of the cell, in bytes (absent when unlimited).",
        kind: MetricType::Gauge,
        value: |s| f(s.memory_limit_bytes),
    },
    Series {
        name: "container_oom_events",
        help: "Count of processes of the cell killed by the OOM killer.",
        kind: MetricType::Counter,
        value: |s| f(s.oom_kills),
    },
    Series {
        name: "container_threads",
        help: "Number of tasks (threads) in the cell (pids.current).",
        kind: MetricType::Gauge,
        value: |s| f(s.pids_current),
    },
    Series {
        name: "container_threads_max",
        help: "Maximum number of tasks allowed in the cell (pids.max; absent when unlimited).",
        kind: MetricType::Gauge,
        value: |s| f(s.pids_limit),
    },
    Series {
        name: "container_fs_reads_bytes",
        help: "Cumulative count of bytes read from block devices.",
        kind: MetricType::Counter,
        value: |s| f(s.io_read_bytes),
    },
    Series {
        name: "container_fs_writes_bytes",
        help: "Cumulative count of bytes written to block devices.",
        kind: MetricType::Counter,
        value: |s| f(s.io_write_bytes),
    },
    Series {
        name: "container_fs_reads",
        help: "Cumulative count of block device reads completed.",
        kind: MetricType::Counter,
        value: |s| f(s.io_read_ops),
    },
    Series {
        name: "container_fs_writes",
        help: "Cumulative count of block device writes completed.",
        kind: MetricType::Counter,
        value: |s| f(s.io_write_ops),
    },
];

fn put(kind: MetricType, v: f64, e: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(e),
        _ => ConstGauge::new(v).encode(e),
    }
}

fn encode_one(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Vec<(&'static str, String)>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    match samples {
        // One sample without labels: the family's own (no empty `{}`).
        [(labels, v)] if labels.is_empty() => put(kind, *v, family),
        _ => {
            for (labels, v) in samples {
                put(kind, *v, family.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

impl Collector for CellCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self.cells.read_stats(None, false).unwrap_or_else(|e| {
            tracing::warn!("metrics: cannot read cell stats: {e}");
            Vec::new()
        });
        for s in SERIES {
            let samples: Vec<_> = stats
                .iter()
                .filter_map(|(n, st)| Some((vec![("cell", n.to_string())], (s.value)(st)?)))
                .collect();
            encode_one(&mut encoder, s.name, s.help, s.kind, &samples)?;
        }

        let (cells, execs) = self.cells.counts();
        encode_one(
            &mut encoder,
            "auraed_cells",
            "Cells allocated on this node.",
            MetricType::Gauge,
            &[(vec![], cells as f64)],
        )?;
        let by_state: Vec<_> = execs
            .into_iter()
            .map(|(state, n)| (vec![("state", state)], n as f64))
            .collect();
        encode_one(
            &mut encoder,
            "auraed_executables",
            "Executables known to the daemon (until Stop or Free), by state.",
            MetricType::Gauge,
            &by_state,
        )?;
        // Only once the probe is loaded: without eBPF there is no count.
        if let Some(observer) = self.signals.loaded() {
            encode_one(
                &mut encoder,
                "auraed_ebpf_signal_events_dropped",
                "Signal events the kernel dropped because the eBPF ring buffer was full.",
                MetricType::Counter,
                &[(vec![], observer.kernel_drops() as f64)],
            )?;
        }
        Ok(())
    }
}
