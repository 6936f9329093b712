//! `aurae.observe.v0.ObserveService`: three server streams.
//!
//! Each stream is a spawned producer feeding a bounded mpsc channel (tonic's
//! streaming example). The producer reads from a source that never waits
//! for it (the daemon's `LogBus`, an executable's output files written by
//! its shim, the eBPF `SignalObserver`), so a slow client can only lose its
//! own lines, never slow the daemon or a child's pipe. A failed send, or the
//! receiver being dropped, means the client is gone: the producer stops. All
//! producers stop when the daemon shuts down.

mod containers;
mod logs;
mod signals;
mod subprocess;

pub use containers::{ContainerLog, ContainerLogs};

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use aurae_proto::observe::{
    observe_service_server::ObserveService, GetAuraeDaemonLogStreamRequest,
    GetAuraeDaemonLogStreamResponse, GetPosixSignalsStreamRequest, GetPosixSignalsStreamResponse,
    GetSubProcessStreamRequest, GetSubProcessStreamResponse, LogChannelType, WorkloadType,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::cells::{
    output::{Channel, OutputReader},
    validation::CellName,
    validation::Invalid,
    Cells,
};
use super::vms::Vms;
use crate::{
    authz::{self, methods, Target},
    host::ebpf::SignalObserver,
    logging::LogBus,
};

/// Items buffered between a producer and tonic, per stream.
const STREAM_CAPACITY: usize = 128;
/// The same for output streams of many lines per response.
const BATCHED_STREAM_CAPACITY: usize = 4;
/// Streams open at once, over all clients; more are refused with
/// RESOURCE_EXHAUSTED rather than letting clients exhaust the daemon.
pub const MAX_STREAMS: usize = 1024;
/// How long a producer tries to tell its client that the daemon stops.
const SHUTDOWN_NOTICE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Precondition(String),
    #[error("too many open streams ({MAX_STREAMS}); close some and retry")]
    Exhausted,
}

/// The signal probe, loaded once in the background at start-up, or why it
/// could not be loaded. A stream asked for meanwhile waits for the load.
#[derive(Clone, Debug)]
pub struct SignalSource(Arc<tokio::sync::OnceCell<Result<Arc<SignalObserver>, String>>>);

impl SignalSource {
    /// Starts loading the probe; must be called inside the runtime.
    pub fn load_in_background() -> Self {
        let source = Self(Arc::new(tokio::sync::OnceCell::new()));
        let s = source.clone();
        tokio::spawn(async move {
            s.get().await.ok();
        });
        source
    }

    /// The probe if it is loaded by now (never waits): for the metrics.
    pub fn loaded(&self) -> Option<Arc<SignalObserver>> {
        self.0.get().and_then(|r| r.as_ref().ok()).cloned()
    }

    pub async fn get(&self) -> Result<Arc<SignalObserver>, String> {
        self.0
            .get_or_init(|| async {
                let loaded = tokio::task::spawn_blocking(|| {
                    let r = SignalObserver::start();
                    // Loading parsed the kernel's BTF (many MiB, freed):
                    // give that back rather than idle with it.
                    crate::host::memory::trim();
                    r
                })
                .await
                .map_err(|e| format!("the probe loader failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = &loaded {
                    tracing::warn!("POSIX signal stream disabled: {e}");
                }
                loaded
            })
            .await
            .clone()
    }
}

#[derive(Clone)]
pub struct ObserveServiceImpl {
    logs: Arc<LogBus>,
    cells: Arc<Cells>,
    /// For the signals of VM workloads (relayed from the guest's auraed).
    vms: Option<Arc<Vms>>,
    /// For the output of CRI containers (their init pids), when the CRI runs.
    containers: Option<Arc<dyn ContainerLogs>>,
    signals: SignalSource,
    shutdown: CancellationToken,
    streams: Arc<tokio::sync::Semaphore>,
}

impl ObserveServiceImpl {
    pub fn new(
        logs: Arc<LogBus>,
        cells: Arc<Cells>,
        signals: SignalSource,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            logs,
            cells,
            vms: None,
            containers: None,
            signals,
            shutdown,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    /// Serves the signals of WORKLOAD_TYPE_VM workloads from these VMs.
    /// Serves GetSubProcessStream for the CRI's containers too.
    pub fn with_containers(mut self, containers: Option<Arc<dyn ContainerLogs>>) -> Self {
        self.containers = containers;
        self
    }

    pub fn with_vms(mut self, vms: Arc<Vms>) -> Self {
        self.vms = Some(vms);
        self
    }
}

impl ObserveServiceImpl {
    /// The guest's own signal stream (all of the guest's processes; pids
    /// are the guest's), relayed: NOT_FOUND for an unknown VM,
    /// FAILED_PRECONDITION when it is not running, UNAVAILABLE when its
    /// auraed cannot give the stream.
    async fn vm_signals(
        &self,
        id: &str,
    ) -> Result<ItemStream<GetPosixSignalsStreamResponse>, ObserveError> {
        let vms = self
            .vms
            .as_ref()
            .ok_or_else(|| ObserveError::Unimplemented("this daemon serves no VMs".into()))?;
        let config = vms.guest_client(id).map_err(|e| match e {
            crate::services::vms::VmsError::NotFound(m) => ObserveError::NotFound(m),
            e => ObserveError::Precondition(e.to_string()),
        })?;
        let unavailable =
            |e: String| ObserveError::Unavailable(format!("vm {id:?}: the guest's auraed: {e}"));
        let guest = aurae_client::Client::connect(&config)
            .await
            .map_err(|e| unavailable(aurae_client::error_chain(&e)))?;
        let mut upstream = guest
            .observe()
            .get_posix_signals_stream(GetPosixSignalsStreamRequest { workload: None })
            .await
            .map_err(|s| unavailable(s.message().to_owned()))?
            .into_inner();
        spawn_stream(&self.shutdown, &self.streams, |tx| async move {
            loop {
                match upstream.message().await {
                    Ok(Some(item)) => {
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                    // The guest powered off or its daemon stopped.
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "the guest's signal stream ended: {}",
                                s.message()
                            ))))
                            .await;
                        return;
                    }
                }
            }
        })
    }
}

type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs `produce` in its own task and returns the client's side of its
/// channel. The task ends when `produce` returns, when the client goes away
/// (the receiver is dropped; noticed even while `produce` waits for input),
/// or when the daemon shuts down (the client then gets UNAVAILABLE).
fn spawn_stream<T, F, Fut>(
    shutdown: &CancellationToken,
    streams: &Arc<tokio::sync::Semaphore>,
    produce: F,
) -> Result<ItemStream<T>, ObserveError>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    spawn_stream_with(shutdown, streams, STREAM_CAPACITY, produce)
}

/// [`spawn_stream`] with `capacity` items buffered.
fn spawn_stream_with<T, F, Fut>(
    shutdown: &CancellationToken,
    streams: &Arc<tokio::sync::Semaphore>,
    capacity: usize,
    produce: F,
) -> Result<ItemStream<T>, ObserveError>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permit = streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ObserveError::Exhausted)?;
    let (tx, rx) = mpsc::channel(capacity);
    let watch = tx.clone();
    let producer = produce(tx);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = producer => {}
            () = watch.closed() => {}
            () = shutdown.cancelled() => {
                let notice = Status::unavailable("auraed is shutting down");
                let _ = tokio::time::timeout(SHUTDOWN_NOTICE, watch.send(Err(notice))).await;
            }
        }
        drop(permit);
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Validates the channel of a GetSubProcessStream request.
fn channel(value: i32) -> Result<Channel, Invalid> {
    match LogChannelType::try_from(value) {
        Ok(LogChannelType::Stdout) => Ok(Channel::Stdout),
        Ok(LogChannelType::Stderr) => Ok(Channel::Stderr),
        Ok(LogChannelType::Unspecified) => Err(Invalid {
            field: "channel_type",
            reason: "must be LOG_CHANNEL_TYPE_STDOUT or LOG_CHANNEL_TYPE_STDERR, got UNSPECIFIED"
                .into(),
        }),
        Err(_) => Err(Invalid {
            field: "channel_type",
            reason: format!("must be LOG_CHANNEL_TYPE_STDOUT (1) or _STDERR (2), got {value}"),
        }),
    }
}

/// What a GetPosixSignalsStream request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Scope {
    Host,
    Cell(CellName),
    /// A CRI pod sandbox: the signals inside its cell.
    Pod {
        id: String,
        cell: CellName,
    },
    /// A VM's guest: its own auraed's host-wide stream, relayed.
    Vm(String),
}

fn scope(r: &GetPosixSignalsStreamRequest) -> Result<Scope, ObserveError> {
    let Some(w) = &r.workload else {
        return Ok(Scope::Host);
    };
    match WorkloadType::try_from(w.workload_type) {
        Ok(WorkloadType::Unspecified) => Ok(Scope::Host),
        Ok(WorkloadType::Cell) => Ok(Scope::Cell(CellName::parse("workload.id", &w.id)?)),
        // A CRI pod sandbox is a cell of its own (crate::cri::sandbox): its
        // signals are that cell's.
        Ok(WorkloadType::PodSandbox) => match crate::cri::sandbox::cell_of(&w.id) {
            Some(cell) => Ok(Scope::Pod {
                id: w.id.clone(),
                cell: CellName::parse("workload.id", &cell)?,
            }),
            None => Err(Invalid {
                field: "workload.id",
                reason: format!(
                    "must be a pod sandbox id (64 lowercase hex digits), got {:?}",
                    w.id
                ),
            }
            .into()),
        },
        Ok(WorkloadType::Vm) if w.id.is_empty() => Err(Invalid {
            field: "workload.id",
            reason: "is required (the VM's id)".into(),
        }
        .into()),
        Ok(WorkloadType::Vm) => Ok(Scope::Vm(w.id.clone())),
        Err(_) => Err(Invalid {
            field: "workload.workload_type",
            reason: format!("must be 0..=3, got {}", w.workload_type),
        }
        .into()),
    }
}

#[tonic::async_trait]
impl ObserveService for ObserveServiceImpl {
    type GetAuraeDaemonLogStreamStream = ItemStream<GetAuraeDaemonLogStreamResponse>;
    type GetSubProcessStreamStream = ItemStream<GetSubProcessStreamResponse>;
    type GetPosixSignalsStreamStream = ItemStream<GetPosixSignalsStreamResponse>;

    async fn get_aurae_daemon_log_stream(
        &self,
        _: Request<GetAuraeDaemonLogStreamRequest>,
    ) -> Result<Response<Self::GetAuraeDaemonLogStreamStream>, Status> {
        // Subscribe before returning, so every line logged after the
        // response headers reach the client is in the stream.
        let (backlog, live) = self.logs.subscribe();
        Ok(Response::new(spawn_stream(
            &self.shutdown,
            &self.streams,
            |tx| logs::produce(backlog, live, tx),
        )?))
    }

    async fn get_sub_process_stream(
        &self,
        request: Request<GetSubProcessStreamRequest>,
    ) -> Result<Response<Self::GetSubProcessStreamStream>, Status> {
        let caller = authz::caller(&request)?;
        let r = request.into_inner();
        let channel = channel(r.channel_type).map_err(ObserveError::from)?;
        let shape = subprocess::Shape::of(&r);
        if r.process_id <= 0 {
            return Err(ObserveError::from(Invalid {
                field: "process_id",
                reason: format!("must be a host pid > 0, got {}", r.process_id),
            })
            .into());
        }
        // By the cell the pid is in; a host executable and a pid of no
        // executable need the host. The message names the pid only: which
        // cell it is in is not the caller's business.
        let owner = self.cells.owner_of(r.process_id);
        // A CRI container's init pid: its CRI log, checked against its cell.
        let container = match (&owner, &self.containers) {
            (None, Some(c)) => c.by_pid(r.process_id).map(|log| (c.clone(), log)),
            _ => None,
        };
        if let Some((containers, log)) = container {
            let cell = CellName::parse("cell", &log.cell).map_err(ObserveError::from)?;
            caller.check(
                methods::OBSERVE_OUTPUT,
                Target::Cell(&cell),
                Some(&format!("pid {}", r.process_id)),
            )?;
            return Ok(Response::new(spawn_stream_with(
                &self.shutdown,
                &self.streams,
                BATCHED_STREAM_CAPACITY,
                move |tx| containers::produce(containers, log, channel, shape, tx),
            )?));
        }
        let target = match &owner {
            Some(ctx) => super::cells::target(ctx),
            None => Target::Host,
        };
        caller.check(
            methods::OBSERVE_OUTPUT,
            target,
            Some(&format!("pid {}", r.process_id)),
        )?;
        let not_found = || {
            ObserveError::NotFound(format!(
                "no executable with pid {} (never started by this daemon, or stopped)",
                r.process_id
            ))
        };
        let source = self
            .cells
            .outputs()
            .get(r.process_id)
            .ok_or_else(not_found)?;
        // Opened before returning: the stream starts at the oldest line kept
        // when it was asked for.
        let reader = OutputReader::open(&source, channel).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                // Removed meanwhile (Stop, Free).
                not_found()
            } else {
                ObserveError::Unavailable(format!(
                    "cannot read the output of pid {} in {}: {e}",
                    r.process_id,
                    source.dir.display()
                ))
            }
        })?;
        // Batched responses are large (up to ~640 KiB): buffer few of them,
        // so that a slow client costs the daemon little memory (it falls
        // behind in the files instead).
        let capacity = match shape {
            subprocess::Shape::One => STREAM_CAPACITY,
            _ => BATCHED_STREAM_CAPACITY,
        };
        Ok(Response::new(spawn_stream_with(
            &self.shutdown,
            &self.streams,
            capacity,
            |tx| subprocess::produce(reader, channel, shape, tx),
        )?))
    }

    async fn get_posix_signals_stream(
        &self,
        request: Request<GetPosixSignalsStreamRequest>,
    ) -> Result<Response<Self::GetPosixSignalsStreamStream>, Status> {
        let caller = authz::caller(&request)?;
        let scope = scope(request.get_ref())?;
        const SIGNALS: &str = methods::OBSERVE_SIGNALS;
        match &scope {
            Scope::Host => caller.check(SIGNALS, Target::Host, None)?,
            Scope::Cell(name) | Scope::Pod { cell: name, .. } => {
                caller.check(SIGNALS, Target::Cell(name), None)?
            }
            // A guest's signals are the whole guest's: the host's business.
            Scope::Vm(id) => caller.check(
                SIGNALS,
                Target::Host,
                Some(&format!("vm {id:?} (needs the host context)")),
            )?,
        }
        if let Scope::Vm(id) = scope {
            return Ok(Response::new(self.vm_signals(&id).await?));
        }
        // Only the cells the caller may see, unless that is every cell.
        let visible = (!caller.unrestricted(SIGNALS)).then(|| -> signals::Visible {
            Arc::new(move |c| caller.may(SIGNALS, Target::Cell(c)))
        });
        let observer = self
            .signals
            .get()
            .await
            .map_err(ObserveError::Unavailable)?;
        let pod = match &scope {
            Scope::Pod { id, .. } => Some(id.clone()),
            _ => None,
        };
        let filter = match (scope, visible) {
            (Scope::Host, None) => None,
            (Scope::Host, Some(v)) => Some(signals::CellFilter::host_wide(self.cells.clone(), v)?),
            (Scope::Cell(name), v) | (Scope::Pod { cell: name, .. }, v) => {
                let f = signals::CellFilter::new(self.cells.clone(), name).map_err(|e| {
                    match (&pod, e) {
                        (Some(id), ObserveError::NotFound(_)) => {
                            ObserveError::NotFound(format!("pod sandbox {id} not found"))
                        }
                        (_, e) => e,
                    }
                })?;
                Some(match v {
                    Some(v) => f.only(v),
                    None => f,
                })
            }
            (Scope::Vm(_), _) => unreachable!("answered above"),
        };
        let live = observer.subscribe();
        Ok(Response::new(spawn_stream(
            &self.shutdown,
            &self.streams,
            |tx| signals::produce(live, filter, tx),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use aurae_proto::observe::Workload;

    use super::*;

    #[test]
    fn channel_is_validated() {
        assert_eq!(channel(1).ok(), Some(Channel::Stdout));
        assert_eq!(channel(2).ok(), Some(Channel::Stderr));
        assert!(channel(0).is_err());
        let e = channel(7).expect_err("unknown channel");
        assert!(e.to_string().contains("channel_type"), "{e}");
    }

    fn req(t: i32, id: &str) -> GetPosixSignalsStreamRequest {
        GetPosixSignalsStreamRequest {
            workload: Some(Workload {
                workload_type: t,
                id: id.into(),
            }),
        }
    }

    #[test]
    fn scope_is_validated() {
        let none = GetPosixSignalsStreamRequest { workload: None };
        assert_eq!(scope(&none).ok(), Some(Scope::Host));
        assert_eq!(scope(&req(0, "")).ok(), Some(Scope::Host));
        assert!(matches!(scope(&req(1, "a/b")), Ok(Scope::Cell(_))));
        assert!(matches!(scope(&req(1, "")), Err(ObserveError::Invalid(_))));
        assert!(matches!(
            scope(&req(1, "a b")),
            Err(ObserveError::Invalid(_))
        ));
        assert!(matches!(scope(&req(2, "x")), Err(ObserveError::Invalid(_))));
        let id = "0123456789abcdef".repeat(4);
        match scope(&req(2, &id)) {
            Ok(Scope::Pod { id: i, cell }) => {
                assert_eq!(i, id);
                assert_eq!(cell.to_string(), "cri-0123456789abcdef");
            }
            other => panic!("{other:?}"),
        }
        let upper = id.to_uppercase();
        assert!(matches!(
            scope(&req(2, &upper)),
            Err(ObserveError::Invalid(_))
        ));
        assert_eq!(scope(&req(3, "x")).ok(), Some(Scope::Vm("x".into())));
        assert!(matches!(scope(&req(3, "")), Err(ObserveError::Invalid(_))));
        assert!(matches!(scope(&req(9, "x")), Err(ObserveError::Invalid(_))));
    }

    #[tokio::test]
    async fn streams_beyond_the_cap_are_refused_and_freed_on_disconnect() {
        let shutdown = CancellationToken::new();
        let cap = Arc::new(tokio::sync::Semaphore::new(1));
        let open = |cap: &Arc<tokio::sync::Semaphore>| {
            spawn_stream::<(), _, _>(&shutdown, cap, |_tx| std::future::pending::<()>())
        };
        let first = open(&cap).expect("first stream");
        assert!(matches!(open(&cap), Err(ObserveError::Exhausted)));
        drop(first);
        // The producer notices the vanished client and gives the slot back.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open(&cap).is_err() {
            assert!(std::time::Instant::now() < deadline, "slot not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
