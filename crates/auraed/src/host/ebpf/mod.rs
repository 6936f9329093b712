//! Host-wide signal observation through eBPF.
//!
//! The probe (`auraed-ebpf`, `signal.bpf.c`) hooks the `signal_generate` BTF
//! tracepoint and pushes one record per signal delivered to any process on
//! the host into a ring buffer. [`SignalObserver`] loads it with aya, drains the
//! ring buffer from a tokio task (`AsyncFd`) and fans the events out on a
//! `broadcast` channel. Events the kernel could not queue (full ring buffer)
//! are counted on the eBPF side and exposed by [`SignalObserver::kernel_drops`].

mod aya;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Capacity of the broadcast channel; a subscriber that falls further behind
/// gets `RecvError::Lagged(n)`. The channel allocates (and touches) every
/// slot up front, ~56 bytes each: 65,536 slots held 3.5 MiB of the idle
/// daemon; 16,384 are 900 KiB, a little less than the ring buffer holds
/// (a burst of 10,000 signals to one cell must all be reported).
pub const EVENT_CHANNEL_CAPACITY: usize = 16384;

/// How often the poll task reads the kernel drop counter.
const DROP_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// One signal delivered (queued) to a process on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalEvent {
    /// Signal number (`SIGUSR1`, `SIGRTMIN + n`, ...).
    pub signal: i32,
    /// Host pid (tgid) of the process the signal was sent to.
    pub pid: i32,
    /// Id of the target's cgroup in the unified (cgroup2) hierarchy: the inode
    /// number of its directory under the cgroup2 mount.
    pub cgroup_id: u64,
}

/// Why the signal probe could not be started or stopped working. Each message
/// is one line that names the step and the reason.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF unavailable: cannot read kernel BTF (/sys/kernel/btf/vmlinux): {0}")]
    Btf(String),
    #[error("eBPF unavailable: cannot load the signal probe: {0}")]
    Load(String),
    #[error("eBPF unavailable: cannot attach the signal probe to tp_btf/{tracepoint}: {reason}")]
    Attach {
        tracepoint: &'static str,
        reason: String,
    },
    #[error("eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("polling the eBPF ring buffer failed: {0}")]
    Poll(#[source] std::io::Error),
}

/// The loaded and attached signal probe. Dropping it stops the poll task and
/// detaches the probe.
pub struct SignalObserver {
    events: broadcast::Sender<SignalEvent>,
    drops: Arc<aya::DropCounter>,
    cancel: CancellationToken,
    /// Owns the program and its link; dropping it detaches the probe.
    _probe: Mutex<aya::Probe>,
}

impl std::fmt::Debug for SignalObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalObserver")
            .field("subscribers", &self.events.receiver_count())
            .field("kernel_drops", &self.drops.last())
            .finish_non_exhaustive()
    }
}

impl SignalObserver {
    /// Loads and attaches the probe, then spawns a tokio task that polls the
    /// ring buffer and publishes every event to a broadcast channel.
    ///
    /// Must be called inside a tokio runtime. Fails (without side effects that
    /// outlive the call) when the kernel has no BPF or BTF, or without
    /// CAP_BPF/CAP_PERFMON (root).
    pub fn start() -> Result<Arc<Self>, EbpfError> {
        let mut probe = aya::Probe::load()?;
        let ring = probe.take_events()?;
        let drops = Arc::new(probe.take_drops()?);
        probe.attach()?;

        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let cancel = CancellationToken::new();
        let task = aya::poll(
            ring,
            Arc::clone(&drops),
            events.clone(),
            cancel.clone(),
            DROP_CHECK_INTERVAL,
        )?;
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "signal observer stopped");
            }
        });
        tracing::info!("eBPF signal observer attached to tp_btf/signal_generate");
        Ok(Arc::new(Self {
            events,
            drops,
            cancel,
            _probe: Mutex::new(probe),
        }))
    }

    /// A new receiver that sees every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SignalEvent> {
        self.events.subscribe()
    }

    /// Events the kernel dropped because the ring buffer was full (sum over
    /// CPUs). Returns the last value read if the map cannot be read now.
    pub fn kernel_drops(&self) -> u64 {
        self.drops.read().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read eBPF drop counter");
            self.drops.last()
        })
    }
}

impl Drop for SignalObserver {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Last successfully read drop count, shared by [`SignalObserver`] and the
/// poll task.
#[derive(Debug, Default)]
struct LastDrops(AtomicU64);

impl LastDrops {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::{fs::MetadataExt, process::CommandExt},
        path::{Path, PathBuf},
        process::{Child, Command},
        time::Instant,
    };

    use super::*;

    const SENT: usize = 10_000;

    #[test]
    fn observer_is_shareable() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<SignalObserver>();
    }

    #[test]
    fn parses_records() {
        let mut record = Vec::new();
        record.extend_from_slice(&10u32.to_ne_bytes());
        record.extend_from_slice(&4242u32.to_ne_bytes());
        record.extend_from_slice(&77u64.to_ne_bytes());
        assert_eq!(
            aya::parse(&record),
            Some(SignalEvent {
                signal: 10,
                pid: 4242,
                cgroup_id: 77
            })
        );
        assert_eq!(aya::parse(&record[..15]), None);
    }

    #[test]
    fn one_line_error_keeps_the_reason() {
        #[derive(Debug, thiserror::Error)]
        #[error("the bpf syscall failed\nverifier log line")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(libc::EPERM));
        let line = aya::one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("the bpf syscall failed: "), "{line}");
        assert!(line.contains("needs root"), "{line}");
    }

    #[tokio::test]
    async fn start_without_privileges_fails_with_one_line_reason() {
        if nix::unistd::geteuid().is_root() {
            return; // covered by reports_every_signal_with_pid_and_cgroup
        }
        let err = SignalObserver::start().expect_err("loading eBPF needs privileges");
        let msg = err.to_string();
        eprintln!("unprivileged start: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    /// The cgroup2 mount: /sys/fs/cgroup/unified on a hybrid host,
    /// /sys/fs/cgroup on a unified one.
    fn cgroup2_root() -> PathBuf {
        let hybrid = Path::new("/sys/fs/cgroup/unified");
        if hybrid.join("cgroup.procs").exists() {
            hybrid.to_path_buf()
        } else {
            PathBuf::from("/sys/fs/cgroup")
        }
    }

    /// Inode of `pid`'s directory in the cgroup2 hierarchy ("0::" line).
    fn cgroup2_inode(pid: u32) -> u64 {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
        let path = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup2 line in /proc/<pid>/cgroup");
        let dir = cgroup2_root().join(path.trim_start_matches('/'));
        std::fs::metadata(&dir)
            .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
            .ino()
    }

    /// `sleep 60` with `signal` blocked: every real-time signal sent to it is
    /// queued (result TRACE_SIGNAL_DELIVERED), none is merged or ignored.
    fn spawn_blocking_target(signal: i32) -> Child {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: the closure runs between fork and exec and only calls
        // async-signal-safe functions on a local sigset.
        unsafe {
            cmd.pre_exec(move || {
                let mut set = std::mem::zeroed::<libc::sigset_t>();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawn sleep")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_every_signal_with_pid_and_cgroup() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "!!!!! SKIPPED reports_every_signal_with_pid_and_cgroup: needs root (eBPF) !!!!!"
            );
            return;
        }
        let observer = SignalObserver::start().expect("start the signal observer");
        let mut rx = observer.subscribe();

        let signal = libc::SIGRTMIN() + 1;
        let mut child = spawn_blocking_target(signal);
        let pid = child.id();

        // Put the target in its own cgroup2 cgroup, so the id is not the root's (1).
        let cgroup = cgroup2_root().join(format!("auraed-ebpf-test-{}", std::process::id()));
        let moved = std::fs::create_dir(&cgroup)
            .and_then(|()| std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()));
        if let Err(e) = &moved {
            eprintln!(
                "cannot move the target to {}: {e}; using its current cgroup",
                cgroup.display()
            );
        }
        let expected_cgroup = cgroup2_inode(pid);

        let sender = tokio::task::spawn_blocking(move || {
            for _ in 0..SENT {
                // SAFETY: kill has no memory-safety preconditions.
                let rc = unsafe { libc::kill(pid as i32, signal) };
                assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
            }
        });

        let mut seen = 0usize;
        let mut wrong_cgroup = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen < SENT && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Ok(ev)) if ev.pid == pid as i32 && ev.signal == signal => {
                    seen += 1;
                    if ev.cgroup_id != expected_cgroup && wrong_cgroup.len() < 5 {
                        wrong_cgroup.push(ev.cgroup_id);
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    panic!("test subscriber lagged by {n} events")
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => panic!("channel closed"),
            }
        }
        sender.await.expect("sender task");
        let drops = observer.kernel_drops();

        let _ = child.kill();
        let _ = child.wait();
        if moved.is_ok() {
            let _ = std::fs::remove_dir(&cgroup);
        }

        eprintln!(
            "signal observer: sent {SENT}, seen {seen}, kernel drops {drops}, cgroup id {expected_cgroup}"
        );
        assert_eq!(seen, SENT, "events seen for pid {pid}");
        assert_eq!(drops, 0, "kernel drops");
        assert!(
            wrong_cgroup.is_empty(),
            "cgroup ids {wrong_cgroup:?}, expected inode {expected_cgroup}"
        );
    }
}
