//! PodSandboxStats and ListPodSandboxStats: a pod's usage is its sandbox
//! cell's cgroup (the numbers `CellService.Stats` gives, from the active
//! cgroup backend), its network counters those of the interfaces in its
//! network namespace (`/proc/<holder>/net/dev`, without `lo`; `eth0` is
//! the default one). `usage_nano_cores` is the rate since the previous
//! call for the same pod (absent on the first), as cAdvisor and
//! containerd compute it.

use std::{collections::HashMap, sync::Mutex};

use auraed_cri::proto;
use tonic::Status;

use super::{
    cni::IFNAME,
    netns,
    sandbox::{Sandbox, Sandboxes},
};
use crate::services::cells::{stats::now_ns, validation::CellName};

/// The last (timestamp ns, cpu usage ns) per sandbox id.
#[derive(Debug, Default)]
pub struct CpuSamples(Mutex<HashMap<String, (i64, u64)>>);

impl CpuSamples {
    /// The cpu rate in nano cores since the last sample, and remember this one.
    fn rate(&self, id: &str, ts: i64, usage: u64) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let prev = m.insert(id.to_owned(), (ts, usage));
        let (pts, pusage) = prev?;
        let dt = u64::try_from(ts - pts).ok().filter(|d| *d > 0)?;
        let du = usage.checked_sub(pusage)?;
        Some((du as u128 * 1_000_000_000 / dt as u128) as u64)
    }

    /// Drops the samples of sandboxes that are gone.
    fn retain(&self, ids: &[String]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|k, _| ids.contains(k));
    }
}

fn u64v(v: Option<u64>) -> Option<proto::UInt64Value> {
    v.map(|value| proto::UInt64Value { value })
}

fn attributes(s: &Sandbox) -> proto::PodSandboxAttributes {
    proto::PodSandboxAttributes {
        id: s.id.clone(),
        metadata: Some(proto::PodSandboxMetadata {
            name: s.name.clone(),
            uid: s.uid.clone(),
            namespace: s.namespace.clone(),
            attempt: s.attempt,
        }),
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        annotations: s
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The stats of a ready sandbox; None when its cell is gone meanwhile.
async fn one(sandboxes: &Sandboxes, s: &Sandbox) -> Option<proto::PodSandboxStats> {
    let (cells, samples) = (sandboxes.cells(), sandboxes.cpu_samples());
    let name = CellName::parse("cell", &s.cell).ok()?;
    let (_, c) = cells
        .stats(Some(&name), false)
        .await
        .ok()?
        .into_iter()
        .next()?;
    let ts = now_ns();
    let network = if s.network.is_some() {
        cells.holder_pid(&name).and_then(|pid| {
            let ifs: Vec<proto::NetworkInterfaceUsage> = netns::net_dev(pid)
                .ok()?
                .into_iter()
                .filter(|i| i.name != "lo")
                .map(|i| proto::NetworkInterfaceUsage {
                    name: i.name,
                    rx_bytes: u64v(Some(i.rx_bytes)),
                    rx_errors: u64v(Some(i.rx_errors)),
                    tx_bytes: u64v(Some(i.tx_bytes)),
                    tx_errors: u64v(Some(i.tx_errors)),
                })
                .collect();
            Some(proto::NetworkUsage {
                timestamp: ts,
                default_interface: ifs.iter().find(|i| i.name == IFNAME).cloned(),
                interfaces: ifs,
            })
        })
    } else {
        None // a hostNetwork pod's traffic is the node's
    };
    let nano_cores = c.cpu_usage_ns.and_then(|u| samples.rate(&s.id, ts, u));
    let available = match (c.memory_limit_bytes, c.memory_working_set_bytes) {
        (Some(l), Some(w)) => Some(l.saturating_sub(w)),
        _ => None,
    };
    Some(proto::PodSandboxStats {
        attributes: Some(attributes(s)),
        linux: Some(proto::LinuxPodSandboxStats {
            cpu: Some(proto::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(c.cpu_usage_ns),
                usage_nano_cores: u64v(nano_cores),
                psi: None,
            }),
            memory: Some(proto::MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(c.memory_working_set_bytes),
                available_bytes: u64v(available),
                usage_bytes: u64v(c.memory_usage_bytes),
                rss_bytes: u64v(c.memory_rss_bytes),
                page_faults: None,
                major_page_faults: None,
                psi: None,
            }),
            network,
            process: Some(proto::ProcessUsage {
                timestamp: ts,
                process_count: u64v(c.pids_current),
            }),
            containers: vec![],
            io: None,
        }),
        windows: None,
    })
}

pub async fn pod_sandbox_stats(
    sandboxes: &Sandboxes,
    id: &str,
) -> Result<proto::PodSandboxStats, Status> {
    let s = sandboxes
        .resolve(id)
        .ok_or_else(|| Status::not_found(format!("pod sandbox {id:?} not found")))?;
    if !s.ready {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {} is not ready: it has no usage",
            s.id
        )));
    }
    one(sandboxes, &s)
        .await
        .ok_or_else(|| Status::not_found(format!("pod sandbox {}: its cell is gone", s.id)))
}

/// Every ready sandbox that matches the filter (as ListPodSandbox).
pub async fn list_pod_sandbox_stats(
    sandboxes: &Sandboxes,
    filter: Option<proto::PodSandboxStatsFilter>,
) -> Vec<proto::PodSandboxStats> {
    let filter = filter.unwrap_or_default();
    let all = sandboxes.list();
    sandboxes
        .cpu_samples()
        .retain(&all.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
    let mut out = Vec::new();
    for s in all.iter().filter(|s| s.ready) {
        if !filter.id.is_empty() && !s.id.starts_with(&filter.id) {
            continue;
        }
        if !filter
            .label_selector
            .iter()
            .all(|(k, v)| s.labels.get(k) == Some(v))
        {
            continue;
        }
        if let Some(st) = one(sandboxes, s).await {
            out.push(st);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nano_cores_from_two_samples() {
        let s = CpuSamples::default();
        assert_eq!(s.rate("a", 1_000_000_000, 5_000), None);
        // 0.5 s of cpu in 1 s: half a core.
        assert_eq!(s.rate("a", 2_000_000_000, 500_005_000), Some(500_000_000));
        s.retain(&[]);
        assert_eq!(s.rate("a", 3_000_000_000, 600_000_000), None);
    }
}
