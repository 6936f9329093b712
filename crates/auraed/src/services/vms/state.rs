//! The VMs of this node. A std Mutex guards the table and each VM's
//! summary (List never waits); a per-VM tokio Mutex serializes Start,
//! Stop and Free of that VM, which await QEMU and the guest.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aurae_client::{AuthConfig, ClientConfig, SystemConfig, Target};
use aurae_proto::{
    cells::{Cell, CpuController, MemoryController},
    discovery::DiscoverRequest,
    vms::VirtualMachineSummary,
};

use super::{
    identity,
    validation::{Root, VmConfig},
    VmsError,
};
use crate::{
    host::{
        hypervisor::{self, Accel, Hypervisor, LaunchSpec},
        shim::format::{self, ExitRecord},
    },
    init::{FW_CFG_CA, FW_CFG_SERVER_CRT, FW_CFG_SERVER_KEY},
    services::cells::{
        output::{Channel, OutputReader, OutputSource, ReadEvent},
        validation::{CellName, Invalid},
        Cells, Context, StartSpec,
    },
};

/// The guest's auraed listens here (its init-mode default).
const GUEST_PORT: u16 = 8080;
/// QEMU's own memory beyond the guest's RAM, for the VM's cgroup.
const VMM_OVERHEAD_MB: i64 = 256;
const CPU_PERIOD_US: u64 = 100_000;
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long QEMU gets to exit after QMP `quit`.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// The VMM's stderr kept in the VM's folder after a failed boot.
pub const VMM_STDERR: &str = "qemu.stderr";
/// Lines of the console and of the VMM's stderr a boot failure quotes.
const TAIL_LINES: usize = 15;
/// How long a boot failure's report waits for the VMM's exit record and
/// the end of its stderr.
const REPORT_WAIT: Duration = Duration::from_secs(2);
/// VMs defined on this node (created, running or stopped), at most:
/// each keeps its definition in memory until Free.
pub const MAX_VMS: usize = 64;
/// The executable name of the hypervisor inside the VM's cell.
const VMM_EXE: &str = "vmm";

#[derive(Debug, Clone)]
pub struct VmSettings {
    pub runtime_dir: PathBuf,
    pub ca_crt: PathBuf,
    pub accel: Accel,
    pub boot_timeout: Duration,
    pub stop_timeout: Duration,
}

#[derive(Debug)]
struct Running {
    cell: CellName,
    pid: i32,
    dir: PathBuf,
}

#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    summary: Mutex<VirtualMachineSummary>,
    /// How the node reaches the guest's auraed, while it runs.
    guest: Mutex<Option<ClientConfig>>,
    run: tokio::sync::Mutex<Option<Running>>,
}

impl Vm {
    fn set(&self, status: &str, address: &str) {
        let mut s = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        s.status = status.to_owned();
        s.auraed_address = address.to_owned();
    }
}

#[derive(Debug)]
pub struct Vms {
    hv: Arc<dyn Hypervisor>,
    cells: Arc<Cells>,
    settings: VmSettings,
    table: Mutex<BTreeMap<String, Arc<Vm>>>,
}

impl Vms {
    pub fn new(hv: Arc<dyn Hypervisor>, cells: Arc<Cells>, settings: VmSettings) -> Self {
        Self {
            hv,
            cells,
            settings,
            table: Mutex::new(BTreeMap::new()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Vm>, VmsError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| VmsError::NotFound(format!("vm {id:?} not found")))
    }

    pub fn create(&self, config: VmConfig) -> Result<String, VmsError> {
        let mut t = self.table();
        if t.contains_key(&config.id) {
            return Err(VmsError::AlreadyExists(format!(
                "vm {:?} exists",
                config.id
            )));
        }
        if t.len() >= MAX_VMS {
            return Err(VmsError::Exhausted(format!(
                "this node has {} VMs defined, the most it keeps: free one first",
                t.len()
            )));
        }
        let summary = VirtualMachineSummary {
            id: config.id.clone(),
            status: "Created".into(),
            mem_size_mb: config.mem_mb,
            vcpu_count: config.vcpus,
            kernel_img_path: config.kernel.display().to_string(),
            root_dir_path: config.root_path.display().to_string(),
            auraed_address: String::new(),
        };
        let id = config.id.clone();
        t.insert(
            id.clone(),
            Arc::new(Vm {
                config,
                summary: Mutex::new(summary),
                guest: Mutex::new(None),
                run: tokio::sync::Mutex::new(None),
            }),
        );
        Ok(id)
    }

    /// The client config (address, the node's identity for the guest) of
    /// a running VM's auraed.
    pub fn guest_client(&self, id: &str) -> Result<ClientConfig, VmsError> {
        let vm = self.get(id)?;
        let guest = vm.guest.lock().unwrap_or_else(|p| p.into_inner()).clone();
        guest.ok_or_else(|| VmsError::Precondition(format!("vm {id:?} is not running")))
    }

    pub fn list(&self) -> Vec<VirtualMachineSummary> {
        let vms: Vec<Arc<Vm>> = self.table().values().cloned().collect();
        vms.iter()
            .map(|v| v.summary.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Boots the VM and returns the address of its auraed once that
    /// answers Discover over mTLS.
    pub async fn start(&self, id: &str) -> Result<String, VmsError> {
        let vm = self.get(id)?;
        let mut run = vm.run.lock().await;
        if run.is_some() {
            return Err(VmsError::Precondition(format!("vm {id:?} is running")));
        }
        let c = &vm.config;
        let dir = self.settings.runtime_dir.join("vms").join(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| VmsError::Io(dir.clone(), e))?;
        let ident = identity::mint(&self.settings.ca_crt, id, &dir)?;
        let port = free_port().map_err(|e| VmsError::Io("127.0.0.1:0".into(), e))?;
        let (initrd, root) = match &c.root {
            Root::Initramfs(p) => (Some(p.clone()), None),
            Root::Disk(d) => (None, Some(d.clone())),
        };
        let spec = LaunchSpec {
            name: id.to_owned(),
            mem_mb: c.mem_mb,
            vcpus: c.vcpus,
            kernel: c.kernel.clone(),
            initrd,
            kernel_args: c.kernel_args.clone(),
            root,
            drives: c.drives.clone(),
            files: vec![
                (format!("opt/aurae/{FW_CFG_CA}"), ident.ca_crt.clone()),
                (
                    format!("opt/aurae/{FW_CFG_SERVER_CRT}"),
                    ident.server_crt.clone(),
                ),
                (
                    format!("opt/aurae/{FW_CFG_SERVER_KEY}"),
                    ident.server_key.clone(),
                ),
            ],
            host_port: port,
            guest_port: GUEST_PORT,
            dir: dir.clone(),
            accel: self.settings.accel,
        };
        let command = format!("exec {}", shell_join(&self.hv.command_line(&spec)));
        let cell = self.allocate_cell(c).await?;
        let pid = match self
            .cells
            .start(
                Context::Cell(cell.clone()),
                StartSpec {
                    name: VMM_EXE.into(),
                    command,
                    description: format!("VMM of VM {id}"),
                    uid: None,
                    gid: None,
                },
            )
            .await
        {
            Ok(s) => s.pid,
            Err(e) => {
                let _ = self.cells.free(&cell).await;
                return Err(e.into());
            }
        };
        tracing::info!(
            "vm {id}: {} started (pid {pid}) in cell {cell}",
            self.hv.name()
        );
        let address = format!("127.0.0.1:{port}");
        let client = ClientConfig {
            auth: AuthConfig {
                ca_crt: ident.ca_crt.display().to_string(),
                client_crt: ident.client_crt.display().to_string(),
                client_key: ident.client_key.display().to_string(),
            },
            system: SystemConfig {
                socket: address.clone(),
            },
        };
        let started = Instant::now();
        let running = Running { cell, pid, dir };
        if let Err(e) = wait_ready(&client, pid, self.settings.boot_timeout).await {
            let vmm = self.vmm_report(pid, &running.dir).await;
            let console = console_tail(&running.dir);
            self.teardown(&running).await;
            return Err(VmsError::Boot(format!("vm {id}: {e}{vmm}\n{console}")));
        }
        tracing::info!(
            "vm {id}: auraed answers at {address} after {:.1}s",
            started.elapsed().as_secs_f32()
        );
        *run = Some(running);
        vm.set("Running", &address);
        *vm.guest.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        Ok(address)
    }

    /// Why a boot failed, as far as the VMM tells: how it ended (when it
    /// did) and the end of its stderr, read from the files its shim keeps
    /// (gone once the VM's cell is freed, so also copied to
    /// `<dir>/qemu.stderr`).
    async fn vmm_report(&self, pid: i32, dir: &std::path::Path) -> String {
        let Some(src) = self.cells.outputs().get(pid) else {
            return String::new();
        };
        let exited = !alive(pid);
        let mut report = String::new();
        if exited {
            let exit = wait_exit_record(&src.dir).await;
            let how = exit.map_or("exit status not recorded".to_owned(), |e| e.to_string());
            report.push_str(&format!("; {} {how}", self.hv.name()));
        }
        let (lines, lost) = stderr_tail(&src, exited).await;
        let _ = std::fs::write(dir.join(VMM_STDERR), lines.join("\n") + "\n");
        if lines.is_empty() {
            report.push_str("; its stderr is empty");
        } else {
            let skipped = if lost > 0 {
                format!(" (after {lost} more lines)")
            } else {
                String::new()
            };
            report.push_str(&format!(
                "; its stderr ends with{skipped}:\n{}",
                lines.join("\n")
            ));
        }
        report
    }

    async fn allocate_cell(&self, c: &VmConfig) -> Result<CellName, VmsError> {
        let name = CellName::parse("machine.id", &format!("vm-{}", c.id))?;
        // A cell left by a VM that died on its own: reuse the name.
        if self.cells.subtree(&name).is_some() {
            self.cells.free(&name).await?;
        }
        let mem = (i64::from(c.mem_mb) + VMM_OVERHEAD_MB) * 1024 * 1024;
        let cell = Cell {
            name: name.to_string(),
            cpu: Some(CpuController {
                weight: None,
                max: Some(i64::from(c.vcpus) * CPU_PERIOD_US as i64),
                period: Some(CPU_PERIOD_US),
            }),
            memory: Some(MemoryController {
                max: Some(mem),
                ..Default::default()
            }),
            ..Default::default()
        };
        let limits = crate::services::cells::validation::limits(&cell)?;
        self.cells.allocate(name.clone(), cell, limits).await?;
        Ok(name)
    }

    /// Power button, bounded wait, then quit; frees the VM's cell.
    pub async fn stop(&self, id: &str) -> Result<(), VmsError> {
        let vm = self.get(id)?;
        let mut run = vm.run.lock().await;
        let Some(r) = run.take() else {
            return Err(VmsError::Precondition(format!("vm {id:?} is not running")));
        };
        vm.guest.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = self.hv.powerdown(&r.dir).await {
            tracing::warn!("vm {id}: powerdown request failed: {e}");
        }
        if wait_exit(r.pid, self.settings.stop_timeout).await {
            tracing::info!("vm {id}: powered off");
        } else {
            tracing::warn!(
                "vm {id}: still running {}s after the power button; quitting it",
                self.settings.stop_timeout.as_secs()
            );
        }
        self.teardown(&r).await;
        vm.set("Stopped", "");
        Ok(())
    }

    async fn teardown(&self, r: &Running) {
        if !wait_exit(r.pid, Duration::ZERO).await {
            let _ = self.hv.quit(&r.dir).await;
            wait_exit(r.pid, QUIT_WAIT).await;
        }
        // Stops the VMM if it is still there (SIGTERM, SIGKILL).
        if let Err(e) = self.cells.free(&r.cell).await {
            tracing::warn!("cannot free cell {}: {e}", r.cell);
        }
    }

    /// The id of the only VM defined, for a Free that names none (the
    /// seed's VmServiceFreeRequest has no field); refused when there are
    /// none or several.
    pub fn only_vm(&self) -> Result<String, VmsError> {
        let t = self.table();
        let mut ids = t.keys();
        match (ids.next(), ids.next()) {
            (Some(id), None) => Ok(id.clone()),
            (None, _) => Err(VmsError::Invalid(Invalid {
                field: "vm_id",
                reason: "is required (no VM is defined, so an empty vm_id names none)".into(),
            })),
            (Some(_), Some(_)) => Err(VmsError::Invalid(Invalid {
                field: "vm_id",
                reason: format!(
                    "is required: {} VMs are defined, so an empty vm_id is ambiguous",
                    t.len()
                ),
            })),
        }
    }

    pub async fn free(&self, id: &str) -> Result<(), VmsError> {
        let vm = self.get(id)?;
        if vm.run.lock().await.is_some() {
            self.stop(id).await?;
        }
        let _ = std::fs::remove_dir_all(self.settings.runtime_dir.join("vms").join(id));
        self.table().remove(id);
        Ok(())
    }

    /// At daemon shutdown: stop every running VM.
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        for id in ids {
            let _ = self.free(&id).await;
        }
    }
}

async fn wait_ready(client: &ClientConfig, pid: i32, timeout: Duration) -> Result<(), String> {
    let tls = aurae_client::tls_config(client).map_err(|e| e.to_string())?;
    let target = Target::parse(&client.system.socket);
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if !alive(pid) {
            return Err("the VMM exited during boot".into());
        }
        let probe = async {
            let c = aurae_client::Client::connect_with(target.clone(), tls.clone())
                .await
                .map_err(|e| e.to_string())?;
            c.discovery()
                .discover(DiscoverRequest {})
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "probe timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "guest auraed did not answer within {}s ({last})",
        timeout.as_secs()
    ))
}

/// True while `pid` runs (not yet exited or only a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Waits up to `timeout` for `pid` to exit; true if it did.
async fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The end of the serial console, introduced.
fn console_tail(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(hypervisor::console_log(dir)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "the serial console is empty (the guest printed nothing)".into();
    }
    format!(
        "console ends with:\n{}",
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    )
}

/// The exit the shim records once it has reaped the VMM (it does so a
/// moment after the process is gone).
async fn wait_exit_record(exec_dir: &std::path::Path) -> Option<ExitRecord> {
    let deadline = Instant::now() + REPORT_WAIT;
    loop {
        if let Ok(Some(r)) = format::read_json::<ExitRecord>(&exec_dir.join(format::EXIT)) {
            return Some(r);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last [`TAIL_LINES`] lines of an executable's stderr and how many
/// came before them. An exited VMM's is read to its end (bounded by
/// [`REPORT_WAIT`]); a live one's as far as it was written.
async fn stderr_tail(src: &OutputSource, exited: bool) -> (Vec<String>, u64) {
    let Ok(mut reader) = OutputReader::open(src, Channel::Stderr) else {
        return (vec![], 0);
    };
    let deadline = Instant::now() + REPORT_WAIT;
    let idle = if exited {
        REPORT_WAIT
    } else {
        Duration::from_millis(200)
    };
    let mut tail = std::collections::VecDeque::new();
    let mut before = 0u64;
    loop {
        let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, reader.next()).await {
            Ok(Ok(ReadEvent::Lines(lines))) => {
                for (_, text) in lines.iter() {
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                        before += 1;
                    }
                    tail.push_back(String::from_utf8_lossy(text).into_owned());
                }
            }
            Ok(Ok(ReadEvent::Lost(n))) => before += n,
            Ok(Ok(ReadEvent::End) | Err(_)) | Err(_) => break,
        }
    }
    (tail.into(), before)
}

/// A loopback port free right now (QEMU binds it a moment later).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Quotes each word for `sh -c` (the cells run commands through sh).
fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}
