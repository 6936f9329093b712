//! The aya side of the signal probe: load, attach, read maps, poll the ring
//! buffer.

use std::{future::Future, sync::Arc, time::Duration};

use ::aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
    Btf, Ebpf, EbpfLoader,
};
use auraed_ebpf::{
    SIGNAL_DROPS_MAP, SIGNAL_EVENTS_MAP, SIGNAL_EVENT_SIZE, SIGNAL_PROBE, SIGNAL_PROGRAM,
    SIGNAL_TRACEPOINT,
};
use tokio::{io::unix::AsyncFd, sync::broadcast, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{EbpfError, LastDrops, SignalEvent};

/// Bytes of the events ring buffer (the object says 4 MiB; set at load).
/// The kernel maps its data pages twice into the daemon, all resident: 4
/// MiB cost 8 MiB of RSS while idle. 512 KiB hold about 21,000 events
/// (24 bytes each with the ring's header), drained as they come.
pub(super) const RING_BYTES: u32 = 512 << 10;

/// The loaded object; owns the program and, once attached, its link.
pub(super) struct Probe {
    ebpf: Ebpf,
    /// The kernel's BTF, parsed once for loading and attaching (several
    /// MiB while parsed; dropped once attached).
    btf: Option<Btf>,
}

impl Probe {
    pub(super) fn load() -> Result<Self, EbpfError> {
        raise_memlock_limit();
        let btf = Btf::from_sys_fs().map_err(|e| EbpfError::Btf(one_line(&e)))?;
        let ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .set_max_entries(SIGNAL_EVENTS_MAP, RING_BYTES)
            .load(SIGNAL_PROBE)
            .map_err(|e| {
                tracing::debug!(error = ?e, "loading the eBPF signal probe failed");
                EbpfError::Load(one_line(&e))
            })?;
        Ok(Self {
            ebpf,
            btf: Some(btf),
        })
    }

    pub(super) fn take_events(&mut self) -> Result<RingBuf<MapData>, EbpfError> {
        let map = self
            .ebpf
            .take_map(SIGNAL_EVENTS_MAP)
            .ok_or(EbpfError::Map {
                map: SIGNAL_EVENTS_MAP,
                reason: "missing from the probe object".into(),
            })?;
        RingBuf::try_from(map).map_err(|e| EbpfError::Map {
            map: SIGNAL_EVENTS_MAP,
            reason: one_line(&e),
        })
    }

    pub(super) fn take_drops(&mut self) -> Result<DropCounter, EbpfError> {
        let map = self.ebpf.take_map(SIGNAL_DROPS_MAP).ok_or(EbpfError::Map {
            map: SIGNAL_DROPS_MAP,
            reason: "missing from the probe object".into(),
        })?;
        let map = PerCpuArray::try_from(map).map_err(|e| EbpfError::Map {
            map: SIGNAL_DROPS_MAP,
            reason: one_line(&e),
        })?;
        Ok(DropCounter {
            map,
            last: LastDrops::default(),
        })
    }

    pub(super) fn attach(&mut self) -> Result<(), EbpfError> {
        let attach_err = |reason: String| EbpfError::Attach {
            tracepoint: SIGNAL_TRACEPOINT,
            reason,
        };
        let btf = match self.btf.take() {
            Some(b) => b,
            None => Btf::from_sys_fs().map_err(|e| EbpfError::Btf(one_line(&e)))?,
        };
        let program: &mut BtfTracePoint = self
            .ebpf
            .program_mut(SIGNAL_PROGRAM)
            .ok_or_else(|| attach_err(format!("program {SIGNAL_PROGRAM} missing from the object")))?
            .try_into()
            .map_err(|e| attach_err(one_line(&e)))?;
        program.load(SIGNAL_TRACEPOINT, &btf).map_err(|e| {
            tracing::debug!(error = ?e, "verifying the eBPF signal probe failed");
            EbpfError::Load(one_line(&e))
        })?;
        program.attach().map_err(|e| attach_err(one_line(&e)))?;
        Ok(())
    }
}

/// The per-CPU `DROPS` counter.
pub(super) struct DropCounter {
    map: PerCpuArray<MapData, u64>,
    last: LastDrops,
}

impl DropCounter {
    /// Sum over CPUs of the events the probe could not reserve space for.
    pub(super) fn read(&self) -> Result<u64, EbpfError> {
        let values = self.map.get(&0, 0).map_err(|e| EbpfError::Map {
            map: SIGNAL_DROPS_MAP,
            reason: one_line(&e),
        })?;
        let sum = values.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
        self.last.set(sum);
        Ok(sum)
    }

    pub(super) fn last(&self) -> u64 {
        self.last.get()
    }
}

/// Registers the ring buffer with the reactor (so it fails here, not in the
/// task) and returns the task that drains it until `cancel`.
pub(super) fn poll(
    ring: RingBuf<MapData>,
    drops: Arc<DropCounter>,
    events: broadcast::Sender<SignalEvent>,
    cancel: CancellationToken,
    drop_check: Duration,
) -> Result<impl Future<Output = Result<(), EbpfError>> + Send + 'static, EbpfError> {
    // SAFETY: the RingBuf owns its map fd (an OwnedFd inside MapData): it stays
    // open, and as_raw_fd() returns it unchanged, for as long as the AsyncFd
    // owns the RingBuf.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = registered.map_err(|e| EbpfError::Poll(e.into_parts().1))?;
    Ok(async move {
        let mut tick = tokio::time::interval(drop_check);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut reported = 0u64;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    // Also drain here: cheap, and a safety net for a missed wakeup.
                    drain(ring.get_mut(), &events);
                    match drops.read() {
                        Ok(total) if total > reported => {
                            tracing::warn!(
                                dropped = total - reported,
                                total,
                                "eBPF ring buffer full: the kernel dropped signal events"
                            );
                            reported = total;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot read eBPF drop counter"),
                    }
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.map_err(EbpfError::Poll)?;
                    // Clear before draining: a wakeup that arrives while we drain
                    // keeps the fd ready, so no record is left behind.
                    guard.clear_ready();
                    drain(guard.get_inner_mut(), &events);
                }
            }
        }
    })
}

fn drain(ring: &mut RingBuf<MapData>, events: &broadcast::Sender<SignalEvent>) {
    while let Some(item) = ring.next() {
        match parse(&item) {
            // Err only means nobody is subscribed right now.
            Some(event) => {
                let _ = events.send(event);
            }
            None => tracing::warn!(len = item.len(), "malformed eBPF signal record"),
        }
    }
}

/// Decodes `struct signal_event { u32 sig; u32 tgid; u64 cgroup_id; }`
/// (native byte order).
pub(super) fn parse(record: &[u8]) -> Option<SignalEvent> {
    let record: &[u8; SIGNAL_EVENT_SIZE] = record.get(..SIGNAL_EVENT_SIZE)?.try_into().ok()?;
    let (sig, rest) = record.split_at(4);
    let (tgid, cgroup_id) = rest.split_at(4);
    Some(SignalEvent {
        signal: i32::from_ne_bytes(sig.try_into().ok()?),
        pid: i32::from_ne_bytes(tgid.try_into().ok()?),
        cgroup_id: u64::from_ne_bytes(cgroup_id.try_into().ok()?),
    })
}

/// The error and its sources on one line, e.g. "the BPF_PROG_LOAD syscall
/// failed: Operation not permitted (os error 1) (needs root, or CAP_BPF and
/// CAP_PERFMON)". Multi-line parts (verifier logs) keep their first line only;
/// the full error is logged at debug level where it happens.
pub(super) fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    let mut eperm = false;
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            eperm |= io.kind() == std::io::ErrorKind::PermissionDenied;
        }
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().trim().to_owned();
        if !first.is_empty() && !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
        next = e.source();
    }
    let mut line = parts.join(": ");
    if eperm {
        line.push_str(" (needs root, or CAP_BPF and CAP_PERFMON)");
    }
    line
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use
/// memcg and ignore it. Best effort: raise the soft limit to the hard limit.
fn raise_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur == limit.rlim_max {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads the valid `limit`.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK"
        );
    }
}
