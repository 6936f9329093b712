//! VmService end to end, with a real guest under QEMU (TCG): the host
//! daemon creates and boots a VM whose init is our auraed (built by
//! scripts/guest-image), the test talks to the guest's daemon over mTLS,
//! runs cells in it (the cells' cgroup v2 backend on a real v2 kernel),
//! and the VM powers off on Stop. TCG is slow, so two boots in all:
//!
//! - `vm_boots_auraed_as_init_and_runs_v2_cells`: the VmService refusals,
//!   then one guest for everything else: Discover through mTLS, ext4
//!   drive mounts (the seed's is_writeable: /data read-only, /rw
//!   writable), the cells' cgroup v2 backend on a real v2 kernel (every
//!   controller's limit in
//!   its v2 file, an OOM kill, cpu throttling, process and network
//!   isolation, Free leaves no cgroup), CellService.Stats reading the same
//!   numbers from the v2 files, and a clean power-off on Stop.
//! - `stop_quits_a_guest_that_ignores_the_power_button`: a second guest,
//!   defined through `Allocate` with upstream's newer messages (drive
//!   mounts `read_only` = true and false, checked in the guest; a SIGUSR1
//!   in the guest seen on the host's WORKLOAD_TYPE_VM signal stream), whose ACPI
//!   power button driver is unloaded (`rmmod button`), so nothing in it
//!   hears QMP `system_powerdown`; Stop with a 3 s bound still ends in
//!   time, by quitting QEMU.
//! - `start_says_why_qemu_exited`: QEMU refuses a kernel file that is not a
//!   kernel, and a drive image removed after Create; Start reports its exit
//!   status and stderr (no guest boots).
//!
//! What the guest sees is read through its own auraed: each check is an
//! executable whose stdout comes back over GetSubProcessStream. Every test
//! runs under an overall timeout, and a guard kills any QEMU of the test's
//! daemon on the way out, pass or fail.
//!
//! Needs root and the guest image; without the image the test says so
//! loudly and passes (scripts/test builds the image first, so CI runs it).

mod common;

use std::{
    future::Future,
    path::PathBuf,
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceListRequest,
            CellServiceStartRequest, CellServiceStatsRequest, CpuController, CpusetController,
            Executable, MemoryController,
        },
        discovery::DiscoverRequest,
        observe::{
            GetPosixSignalsStreamRequest, GetSubProcessStreamRequest, LogChannelType, Workload,
            WorkloadType,
        },
        vms::{
            DriveMount, DriveMountV2, RootDrive, RootDriveV2, VirtualMachine, VirtualMachineV2,
            VmServiceAllocateRequest, VmServiceCreateRequest, VmServiceFreeRequest,
            VmServiceListRequest, VmServiceStartRequest, VmServiceStopRequest,
        },
    },
    Client,
};
use common::Daemon;
use tonic::Code;

struct Guest {
    qemu: String,
    kernel: String,
    initrd: String,
}

/// The paths scripts/guest-image wrote, or None (with a loud message).
fn guest_image() -> Option<Guest> {
    let cache = std::env::var("AURAE_CACHE_DIR").unwrap_or_else(|_| "/var/cache/aurae-dev".into());
    let env = PathBuf::from(cache).join("guest.env");
    let text = std::fs::read_to_string(&env).ok();
    let get = |k: &str| {
        text.as_deref()?.lines().find_map(|l| {
            l.strip_prefix(k)
                .and_then(|v| v.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    match (
        get("AURAE_QEMU"),
        get("AURAE_GUEST_KERNEL"),
        get("AURAE_GUEST_INITRD"),
    ) {
        (Some(qemu), Some(kernel), Some(initrd)) => {
            if let Some(missing) = [&qemu, &kernel, &initrd]
                .into_iter()
                .find(|p| !std::path::Path::new(p).is_file())
            {
                eprintln!(
                    "\n*** SKIPPED: {missing} (named in {}) is missing; run scripts/guest-image ***\n",
                    env.display()
                );
                return None;
            }
            if !common::observe::is_root() {
                eprintln!("\n*** SKIPPED: VM tests need root (cells, cgroups) ***\n");
                return None;
            }
            Some(Guest {
                qemu,
                kernel,
                initrd,
            })
        }
        _ => {
            eprintln!(
                "\n*** SKIPPED: no guest image ({} missing); run scripts/guest-image ***\n",
                env.display()
            );
            None
        }
    }
}

fn machine(g: &Guest, id: &str) -> VirtualMachine {
    VirtualMachine {
        id: id.into(),
        mem_size_mb: 512,
        vcpu_count: 1,
        kernel_img_path: g.kernel.clone(),
        kernel_args: vec!["quiet".into()],
        root_drive: Some(RootDrive {
            host_path: g.initrd.clone(),
            is_writeable: false,
        }),
        drive_mounts: vec![],
    }
}

async fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A whole test's bound: a boot is ~15 s under TCG, the checks less.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one guest executable's output may stall.
const STEP: Duration = Duration::from_secs(60);

/// Kills, when dropped, every QEMU whose command line names `marker` (the
/// test daemon's private folder): nothing outlives a failed test.
struct QemuReaper {
    marker: String,
}

impl QemuReaper {
    fn new(d: &Daemon) -> Self {
        Self {
            marker: d.dir.path().display().to_string(),
        }
    }

    fn pids(&self) -> Vec<i32> {
        qemu_pids(&self.marker)
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            eprintln!("killing leftover QEMU {pid}");
            common::signal(pid, libc::SIGKILL);
        }
    }
}

/// QEMU processes (not zombies) whose command line contains `marker`.
fn qemu_pids(marker: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // argv[0] is QEMU itself (the daemon's own command line
            // names the QEMU binary and the folder too).
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let mut args = cmd.split('\0');
            args.next().is_some_and(|a0| a0.contains("qemu-system"))
                && args.any(|a| a.contains(marker))
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

/// Runs `body` under [`TEST_TIMEOUT`]; a timeout is a panic (so the
/// guards still clean up).
async fn bounded(what: &str, body: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
        panic!("{what}: not done within {TEST_TIMEOUT:?}");
    }
}

/// Runs `sh -c script` in the guest (in `cell`, or the guest's own
/// context) and returns its stdout once it exits.
async fn guest_run(guest: &Client, cell: Option<&str>, name: &str, script: &str) -> Vec<String> {
    let pid = guest
        .cells()
        .start(CellServiceStartRequest {
            cell_name: cell.map(str::to_owned),
            executable: Some(Executable {
                name: name.into(),
                command: script.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .unwrap_or_else(|e| panic!("start {name} in the guest: {e:?}"))
        .into_inner()
        .pid;
    let mut s = guest
        .observe()
        .get_sub_process_stream(GetSubProcessStreamRequest {
            channel_type: LogChannelType::Stdout as i32,
            process_id: pid,
            max_lines_per_message: 0,
            line_blocks: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{name}'s output: {e:?}"))
        .into_inner();
    let mut lines = Vec::new();
    while let Some(r) = tokio::time::timeout(STEP, s.message())
        .await
        .unwrap_or_else(|_| panic!("{name}: no output for {STEP:?}; so far {lines:?}"))
        .unwrap_or_else(|e| panic!("{name}'s output: {e:?}"))
    {
        lines.push(r.item.map(|i| i.line).unwrap_or_default());
    }
    eprintln!("guest {name}: {lines:?}");
    lines
}

/// The value of `key=value` among `lines`.
fn value<'a>(lines: &'a [String], key: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {lines:?}"))
}

async fn allocate(guest: &Client, cell: Cell) -> bool {
    let name = cell.name.clone();
    guest
        .cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .unwrap_or_else(|e| panic!("allocate {name} in the guest: {e:?}"))
        .into_inner()
        .cgroup_v2
}

async fn free(guest: &Client, name: &str) {
    guest
        .cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("free {name} in the guest: {e:?}"));
}

#[tokio::test]
async fn vm_boots_auraed_as_init_and_runs_v2_cells() {
    let Some(g) = guest_image() else { return };
    let d = Daemon::start_with(None, &["--qemu", &g.qemu, "--vm-accel", "tcg"]).await;
    let reaper = QemuReaper::new(&d);
    bounded("boot, cells, stop", boot_cells_stop(&g, &d)).await;
    assert!(reaper.pids().is_empty(), "QEMU outlived Stop and Free");
}

async fn boot_cells_stop(g: &Guest, d: &Daemon) {
    let mut vms = d.client().await.vms();
    let id = common::unique("vm");

    // Refusals, before anything boots.
    let mut bad = machine(g, "x");
    bad.mem_size_mb = 32;
    let e = vms
        .create(VmServiceCreateRequest { machine: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("machine.mem_size_mb"), "{e:?}");
    let mut bad = machine(g, "x");
    bad.kernel_img_path = "/nonexistent/vmlinuz".into();
    let e = vms
        .create(VmServiceCreateRequest { machine: Some(bad) })
        .await
        .unwrap_err();
    assert!(e.message().contains("machine.kernel_img_path"), "{e:?}");
    let mut bad = machine(g, "x");
    bad.drive_mounts = vec![DriveMount {
        host_path: g.initrd.clone(),
        vm_path: "/data/../etc".into(),
        fs_type: "ext4".into(),
        is_writeable: false,
    }];
    let e = vms
        .create(VmServiceCreateRequest { machine: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("machine.drive_mounts.vm_path"),
        "{e:?}"
    );
    let start_unknown = vms.start(VmServiceStartRequest {
        vm_id: "nope".into(),
    });
    assert_eq!(code_of(start_unknown.await).await, Code::NotFound);

    // Two small ext4 images, mounted by the guest's init: /data read-only
    // (the seed's is_writeable = false), /rw writable.
    let data = ext4_image(d, "data");
    let rw = ext4_image(d, "rw");
    let mut with_data = machine(g, &id);
    with_data.drive_mounts = vec![
        DriveMount {
            host_path: data.display().to_string(),
            vm_path: "/data".into(),
            fs_type: "ext4".into(),
            is_writeable: false,
        },
        DriveMount {
            host_path: rw.display().to_string(),
            vm_path: "/rw".into(),
            fs_type: "ext4".into(),
            is_writeable: true,
        },
    ];
    let created = vms
        .create(VmServiceCreateRequest {
            machine: Some(with_data),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.vm_id, id);
    let dup = vms.create(VmServiceCreateRequest {
        machine: Some(machine(g, &id)),
    });
    assert_eq!(code_of(dup.await).await, Code::AlreadyExists);
    let stop_created = vms.stop(VmServiceStopRequest { vm_id: id.clone() });
    assert_eq!(code_of(stop_created.await).await, Code::FailedPrecondition);

    let t = Instant::now();
    let address = vms
        .start(VmServiceStartRequest { vm_id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("start: {e:?}\nhost log:\n{}", d.log()))
        .into_inner()
        .auraed_address;
    eprintln!(
        "guest booted; its auraed answered at {address} after {:?}",
        t.elapsed()
    );
    let again = vms.start(VmServiceStartRequest { vm_id: id.clone() });
    assert_eq!(code_of(again.await).await, Code::FailedPrecondition);
    let listed = vms
        .list(VmServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    let me = listed.machines.iter().find(|m| m.id == id).expect("listed");
    assert_eq!(
        (me.status.as_str(), me.auraed_address.as_str()),
        ("Running", address.as_str())
    );

    // The host's own client config reaches the guest: same CA.
    let mut cfg = d.client_config();
    cfg.system.socket = address.clone();
    let guest = Client::connect(&cfg).await.expect("connect to the guest");
    let r = guest
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap();
    assert!(r.into_inner().healthy);

    let console = d.dir.path().join("run/vms").join(&id).join("console.log");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.contains("auraed"),
        "the serial console is the VM's log; {}:\n{text}",
        console.display()
    );

    // The drive mounts: /data read-only, /rw writable, as asked.
    check_drives(&guest, &console).await;

    let t = Instant::now();
    v2_cells_in_the_guest(&guest).await;
    eprintln!("cgroup v2 checks in the guest took {:?}", t.elapsed());

    let t = Instant::now();
    vms.stop(VmServiceStopRequest { vm_id: id.clone() })
        .await
        .expect("stop");
    eprintln!("guest stopped in {:?}", t.elapsed());
    assert!(
        d.log().contains(&format!("vm {id}: powered off")),
        "the guest did not power off by itself; host log:\n{}",
        d.log()
    );
    vms.free(VmServiceFreeRequest { vm_id: id.clone() })
        .await
        .expect("free");
    let listed = vms
        .list(VmServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.machines.iter().all(|m| m.id != id));
    let free_again = vms.free(VmServiceFreeRequest { vm_id: id });
    assert_eq!(code_of(free_again.await).await, Code::NotFound);
}

const DATA_HELLO: &str = "hello from a drive mount";

/// GetPosixSignalsStream of the VM workload, asked of the host: the
/// guest's own stream, relayed (guest pids).
async fn guest_signals_are_relayed(d: &Daemon, guest: &Client, id: &str) {
    let mut stream = d
        .client()
        .await
        .observe()
        .get_posix_signals_stream(GetPosixSignalsStreamRequest {
            workload: Some(Workload {
                workload_type: WorkloadType::Vm as i32,
                id: id.into(),
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("the VM's signal stream: {e:?}\nhost log:\n{}", d.log()))
        .into_inner();
    let out = guest_run(
        guest,
        None,
        "signal",
        "sleep 60 & p=$!; kill -USR1 $p; wait $p; echo pid=$p",
    )
    .await;
    let pid: i32 = value(&out, "pid").parse().expect("a pid");
    let t = Instant::now();
    loop {
        let item = tokio::time::timeout(STEP, stream.message())
            .await
            .expect("a signal within STEP")
            .expect("the relayed stream")
            .expect("the relayed stream ended");
        let s = item.signal.expect("a signal");
        if (s.signal, s.process_id) == (libc::SIGUSR1, pid) {
            eprintln!("SIGUSR1 to guest pid {pid} relayed after {:?}", t.elapsed());
            return;
        }
    }
}

/// In the guest: /data and /rw hold `hello`; /data is a read-only ext4
/// mount that refuses a write, /rw a writable one that takes it.
async fn check_drives(guest: &Client, console: &std::path::Path) {
    let out = guest_run(
        guest,
        None,
        "check-drives",
        "for m in data rw; do echo ${m}_hello=$(cat /$m/hello); \
         touch /$m/x 2>/dev/null; echo ${m}_touch=$?; done; \
         awk '$2==\"/data\"||$2==\"/rw\"{print \"mount\" $2 \"=\" $3 \",\" $4}' /proc/mounts",
    )
    .await;
    let console = || std::fs::read_to_string(console).unwrap_or_default();
    for m in ["data", "rw"] {
        assert_eq!(
            value(&out, &format!("{m}_hello")),
            DATA_HELLO,
            "/{m}/hello in the guest: {out:?}\nconsole:\n{}",
            console()
        );
    }
    assert_ne!(value(&out, "data_touch"), "0", "/data is writable: {out:?}");
    assert!(
        value(&out, "mount/data").starts_with("ext4,ro"),
        "/data is not a read-only ext4 mount: {out:?}"
    );
    assert_eq!(value(&out, "rw_touch"), "0", "/rw is not writable: {out:?}");
    assert!(
        value(&out, "mount/rw").starts_with("ext4,rw"),
        "/rw is not a writable ext4 mount: {out:?}"
    );
}

/// An 8 MiB ext4 image `<name>.ext4` holding `hello`, in the test
/// daemon's folder.
fn ext4_image(d: &Daemon, name: &str) -> PathBuf {
    let content = d.dir.path().join(format!("{name}-content"));
    std::fs::create_dir_all(&content).expect("mkdir data-content");
    std::fs::write(content.join("hello"), format!("{DATA_HELLO}\n")).expect("write hello");
    let image = d.dir.path().join(format!("{name}.ext4"));
    let out = std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg("-d")
        .arg(&content)
        .arg(&image)
        .arg("8M")
        .output()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    image
}

/// The cells' cgroup v2 backend on the guest's real v2 kernel, through
/// the guest's auraed. Cgroup files are read from the guest's own context
/// (as the host cells tests read them from the host).
async fn v2_cells_in_the_guest(guest: &Client) {
    const ROOT: &str = "/sys/fs/cgroup/aurae";
    // The guest's own view, to compare the isolated cell with.
    let me = guest_run(
        guest,
        None,
        "look-root",
        "for n in pid net uts mnt; do echo ns_$n=$(readlink /proc/self/ns/$n); done; \
         echo host=$(hostname); echo procs=$(ps -o pid | tail -n +2 | wc -l); \
         echo ctl=$(cat /sys/fs/cgroup/cgroup.subtree_control); \
         awk '$2==\"/proc\"||$2==\"/sys/fs/cgroup\"{print \"mount\" $2 \"=\" $3}' /proc/mounts",
    )
    .await;
    for c in ["cpu", "cpuset", "memory", "pids"] {
        assert!(
            value(&me, "ctl").split(' ').any(|x| x == c),
            "{c} not delegated at the guest's cgroup root: {me:?}"
        );
    }
    assert_eq!(value(&me, "mount/proc"), "proc", "{me:?}");
    assert_eq!(value(&me, "mount/sys/fs/cgroup"), "cgroup2", "{me:?}");

    // 1. Every controller; each value lands in its v2 file.
    let all = Cell {
        name: "all".into(),
        cpu: Some(CpuController {
            weight: Some(250),
            max: Some(20_000),
            period: Some(50_000),
        }),
        cpuset: Some(CpusetController {
            cpus: Some("0".into()),
            mems: Some("0".into()),
        }),
        memory: Some(MemoryController {
            min: Some(1 << 20),
            low: Some(2 << 20),
            high: Some(96 << 20),
            max: Some(128 << 20),
        }),
        ..Default::default()
    };
    assert!(allocate(guest, all).await, "the guest is a cgroup v2 host");
    let files = [
        ("cpu.weight", "250"),
        ("cpu.max", "20000 50000"),
        ("cpuset.cpus", "0"),
        ("cpuset.mems", "0"),
        ("memory.min", "1048576"),
        ("memory.low", "2097152"),
        ("memory.high", "100663296"),
        ("memory.max", "134217728"),
    ];
    let script = files
        .iter()
        .map(|(f, _)| format!("echo {f}=$(cat {ROOT}/all/{f})"))
        .collect::<Vec<_>>()
        .join("; ");
    let got = guest_run(guest, None, "read-all", &script).await;
    for (file, want) in files {
        assert_eq!(value(&got, file), want, "{ROOT}/all/{file}");
    }
    // A process of the cell is in the cell's leaf.
    let inside = guest_run(
        guest,
        Some("all"),
        "where",
        "echo procs=$(cat /sys/fs/cgroup/aurae/all/_exec/cgroup.procs | wc -l)",
    )
    .await;
    assert!(
        value(&inside, "procs").parse::<u32>().is_ok_and(|n| n >= 1),
        "the executable is not in {ROOT}/all/_exec: {inside:?}"
    );

    // 2. An OOM kill at memory.max: dd's 64 MiB buffer in a 32 MiB cell.
    allocate(
        guest,
        Cell {
            name: "oom".into(),
            memory: Some(MemoryController {
                max: Some(32 << 20),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let hog = guest_run(
        guest,
        Some("oom"),
        "hog",
        "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo rc=$?",
    )
    .await;
    assert_eq!(value(&hog, "rc"), "137", "dd was not SIGKILLed: {hog:?}");
    let events = guest_run(
        guest,
        None,
        "read-oom",
        &format!("sed 's/ /=/' {ROOT}/oom/memory.events"),
    )
    .await;
    assert!(
        value(&events, "oom_kill")
            .parse::<u64>()
            .is_ok_and(|n| n >= 1),
        "memory.events: {events:?}"
    );

    // 3. CPU throttling at 10 ms per 100 ms.
    allocate(
        guest,
        Cell {
            name: "busy".into(),
            cpu: Some(CpuController {
                weight: None,
                max: Some(10_000),
                period: Some(100_000),
            }),
            ..Default::default()
        },
    )
    .await;
    guest_run(
        guest,
        Some("busy"),
        "spin",
        "timeout 2 sh -c 'while :; do :; done'; echo spun",
    )
    .await;
    let stat = guest_run(
        guest,
        None,
        "read-cpu",
        &format!("cat {ROOT}/busy/cpu.max; sed 's/ /=/' {ROOT}/busy/cpu.stat"),
    )
    .await;
    assert_eq!(stat.first().map(String::as_str), Some("10000 100000"));
    assert!(
        value(&stat, "nr_throttled")
            .parse::<u64>()
            .is_ok_and(|n| n > 0),
        "not throttled: {stat:?}"
    );
    assert!(
        value(&stat, "throttled_usec")
            .parse::<u64>()
            .is_ok_and(|n| n > 0),
        "not throttled: {stat:?}"
    );

    // 3b. CellService.Stats on the v2 backend: the same numbers as the
    // files just read (the spin and the hog are over, so they hold still).
    let st = guest
        .cells()
        .stats(CellServiceStatsRequest {
            cell_name: String::new(),
            recursive: false,
        })
        .await
        .expect("Stats in the guest")
        .into_inner();
    assert!(st.cgroup_v2, "the guest reads v2 files");
    let of = |n: &str| {
        st.cells
            .iter()
            .find(|c| c.cell_name == n)
            .unwrap_or_else(|| panic!("no stats of {n}: {st:?}"))
            .clone()
    };
    let (busy, oom, all) = (of("busy"), of("oom"), of("all"));
    eprintln!("guest stats:\n  busy {busy:?}\n  oom {oom:?}\n  all {all:?}");
    let file = |k: &str| value(&stat, k).parse::<u64>().ok();
    assert_eq!(busy.cpu_throttled_periods, file("nr_throttled"), "{busy:?}");
    // The period timer may run out one more period after the spin ends
    // (CFS counts the period in which the quota was last used).
    let periods = file("nr_periods").unwrap_or(0);
    let seen = busy.cpu_periods.unwrap_or(0);
    assert!(
        (periods..=periods + 2).contains(&seen),
        "{periods}: {busy:?}"
    );
    assert_eq!(
        busy.cpu_throttled_ns,
        file("throttled_usec").map(|u| u * 1000),
        "{busy:?}"
    );
    assert_eq!(busy.cpu_usage_ns, file("usage_usec").map(|u| u * 1000));
    // 2 s at 10 %: some 200 ms of CPU (TCG adds kernel time), split into
    // user and system time that add up to it.
    let used = busy.cpu_usage_ns.unwrap_or(0);
    assert!((100_000_000..2_000_000_000).contains(&used), "{busy:?}");
    let split = busy.cpu_user_ns.unwrap_or(0) + busy.cpu_system_ns.unwrap_or(0);
    assert!(busy.cpu_user_ns > Some(0), "{busy:?}");
    assert!(split.abs_diff(used) <= used / 100, "{busy:?}");
    // The guest delegates io: io.stat is read (zero IO here), not absent.
    assert!(busy.io_read_bytes.is_some(), "{busy:?}");
    assert_eq!(busy.memory_limit_bytes, None, "busy has no memory max");
    let kills = value(&events, "oom_kill").parse::<u64>().ok();
    assert_eq!(oom.oom_kills, kills, "{oom:?}");
    assert_eq!(oom.memory_limit_bytes, Some(32 << 20), "{oom:?}");
    assert_eq!(all.memory_limit_bytes, Some(128 << 20), "{all:?}");
    assert!(
        all.memory_usage_bytes.is_some() && all.pids_current.is_some(),
        "{all:?}"
    );
    let e = guest
        .cells()
        .stats(CellServiceStatsRequest {
            cell_name: "nope".into(),
            recursive: false,
        })
        .await
        .expect_err("unknown cell");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // 4. Isolation, seen from inside an isolate_process + isolate_network
    // cell: its own pid, net, uts and mount namespaces, its name as the
    // hostname, only its processes and only lo.
    allocate(
        guest,
        Cell {
            name: "iso".into(),
            isolate_process: true,
            isolate_network: true,
            ..Default::default()
        },
    )
    .await;
    let inside = guest_run(
        guest,
        Some("iso"),
        "look-iso",
        "for n in pid net uts mnt; do echo ns_$n=$(readlink /proc/self/ns/$n); done; \
         echo host=$(hostname); echo procs=$(ps -o pid | tail -n +2 | wc -l); \
         echo pid1=$(ps -o pid,comm | awk '$1==1{print $2}'); \
         echo links=$(ip -o link | awk -F': ' '{printf \"%s,\", $2}')",
    )
    .await;
    for ns in ["pid", "net", "uts", "mnt"] {
        let key = format!("ns_{ns}");
        assert_ne!(
            value(&inside, &key),
            value(&me, &key),
            "the cell shares the guest's {ns} namespace"
        );
    }
    assert_eq!(value(&inside, "host"), "iso", "{inside:?}");
    assert_ne!(value(&me, "host"), "iso", "{me:?}");
    let procs: u32 = value(&inside, "procs").parse().unwrap_or(u32::MAX);
    let all_procs: u32 = value(&me, "procs").parse().unwrap_or(0);
    assert!(
        (1..=8).contains(&procs) && procs < all_procs,
        "only the cell's processes ({procs} of the guest's {all_procs}): {inside:?}"
    );
    assert!(!value(&inside, "pid1").is_empty(), "no pid 1: {inside:?}");
    assert_eq!(value(&inside, "links"), "lo,", "only lo: {inside:?}");

    // 5. Free leaves no cgroup behind.
    for cell in ["all", "oom", "busy", "iso"] {
        free(guest, cell).await;
    }
    let left = guest_run(
        guest,
        None,
        "read-left",
        &format!(
            "for c in all oom busy iso; do [ -e {ROOT}/$c ] && echo left=$c; done; \
             echo dirs=$(find {ROOT} -mindepth 1 -type d | wc -l)"
        ),
    )
    .await;
    assert!(
        !left.iter().any(|l| l.starts_with("left=")),
        "cgroups left behind: {left:?}"
    );
    assert_eq!(value(&left, "dirs"), "0", "{left:?}");
    let cells = guest
        .cells()
        .list(CellServiceListRequest {})
        .await
        .expect("list in the guest")
        .into_inner()
        .cells;
    assert!(cells.is_empty(), "{cells:?}");
}

#[tokio::test]
async fn stop_quits_a_guest_that_ignores_the_power_button() {
    let Some(g) = guest_image() else { return };
    let d = Daemon::start_with(
        None,
        &[
            "--qemu",
            &g.qemu,
            "--vm-accel",
            "tcg",
            "--vm-stop-timeout-secs",
            "3",
        ],
    )
    .await;
    let reaper = QemuReaper::new(&d);
    bounded("deaf guest", deaf_guest(&g, &d, &reaper)).await;
}

async fn deaf_guest(g: &Guest, d: &Daemon, reaper: &QemuReaper) {
    let mut vms = d.client().await.vms();
    let id = common::unique("deaf");
    // Defined as a newer upstream client does: Allocate, with read_only
    // (the opposite of the seed's is_writeable, under the same numbers).
    let drive = |name: &str, read_only: bool| DriveMountV2 {
        image_path: ext4_image(d, name).display().to_string(),
        vm_path: format!("/{name}"),
        fs_type: "ext4".into(),
        read_only,
    };
    let m = machine(g, &id);
    let allocated = vms
        .allocate(VmServiceAllocateRequest {
            machine: Some(VirtualMachineV2 {
                id: m.id,
                mem_size_mb: m.mem_size_mb,
                vcpu_count: m.vcpu_count,
                kernel_img_path: m.kernel_img_path,
                kernel_args: m.kernel_args,
                root_drive: Some(RootDriveV2 {
                    image_path: g.initrd.clone(),
                    read_only: true,
                }),
                drive_mounts: vec![drive("data", true), drive("rw", false)],
                auraed_address: String::new(),
            }),
        })
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!(allocated.vm_id, id);
    let address = vms
        .start(VmServiceStartRequest { vm_id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("start: {e:?}\nhost log:\n{}", d.log()))
        .into_inner()
        .auraed_address;
    let qemu = reaper.pids();
    assert_eq!(qemu.len(), 1, "one QEMU for the VM: {qemu:?}");
    let mut cfg = d.client_config();
    cfg.system.socket = address;
    let guest = Client::connect(&cfg).await.expect("connect to the guest");
    let console = d.dir.path().join("run/vms").join(&id).join("console.log");
    check_drives(&guest, &console).await;
    guest_signals_are_relayed(d, &guest, &id).await;
    // Unload the ACPI button driver: the power button's input device goes,
    // and nothing in the guest hears the button any more.
    let out = guest_run(
        &guest,
        None,
        "deafen",
        "rmmod button && echo rmmod=ok; \
         echo buttons=$(cat /sys/class/input/*/name 2>/dev/null | grep -c 'Power Button')",
    )
    .await;
    assert_eq!(value(&out, "rmmod"), "ok", "{out:?}");
    assert_eq!(value(&out, "buttons"), "0", "{out:?}");

    let t = Instant::now();
    vms.stop(VmServiceStopRequest { vm_id: id.clone() })
        .await
        .expect("stop");
    let took = t.elapsed();
    eprintln!("deaf guest stopped in {took:?}");
    // 3 s for the power button, then QMP quit (QEMU gets 5 s to exit),
    // then the VM's cell is freed: well under 3 + 5 + 4 s.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(3 + 5 + 4),
        "Stop took {took:?}"
    );
    let log = d.log();
    assert!(
        !log.contains(&format!("vm {id}: powerdown request failed")),
        "QMP system_powerdown itself failed; log:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "vm {id}: still running 3s after the power button; quitting it"
        )),
        "the host did not say it quit the VM; log:\n{log}"
    );
    assert!(
        !log.contains(&format!("vm {id}: powered off")),
        "the guest heard the power button after all; log:\n{log}"
    );
    assert!(
        qemu.iter()
            .all(|&p| !qemu_pids(&reaper.marker).contains(&p)),
        "QEMU is still running after Stop"
    );
    let listed = vms
        .list(VmServiceListRequest {})
        .await
        .expect("list")
        .into_inner();
    let me = listed.machines.iter().find(|m| m.id == id).expect("listed");
    assert_eq!(me.status, "Stopped");
    vms.free(VmServiceFreeRequest { vm_id: id })
        .await
        .expect("free");
}

/// A QEMU that exits at boot: Start says why (QEMU's exit status and the
/// end of its stderr, also kept in `<runtime-dir>/vms/<id>/qemu.stderr`),
/// and cleans up. No guest boots: QEMU refuses before running anything.
#[tokio::test]
async fn start_says_why_qemu_exited() {
    let Some(g) = guest_image() else { return };
    let d = Daemon::start_with(None, &["--qemu", &g.qemu, "--vm-accel", "tcg"]).await;
    let reaper = QemuReaper::new(&d);
    bounded("qemu exits", qemu_exits(&g, &d)).await;
    assert!(reaper.pids().is_empty(), "a QEMU outlived a failed Start");
}

async fn qemu_exits(g: &Guest, d: &Daemon) {
    let mut vms = d.client().await.vms();

    // A kernel file that is not a kernel (with an initramfs).
    let not_a_kernel = d.dir.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, "this is not a bzImage\n").unwrap();
    let mut m = machine(g, "notkernel");
    m.kernel_img_path = not_a_kernel.display().to_string();
    // A drive image that is gone by Start: QEMU cannot open it.
    let gone = d.dir.path().join("gone.img");
    std::fs::write(&gone, vec![0u8; 4096]).unwrap();
    let mut m2 = machine(g, "nodrive");
    m2.drive_mounts = vec![DriveMount {
        host_path: gone.display().to_string(),
        vm_path: "/data".into(),
        fs_type: "ext4".into(),
        is_writeable: false,
    }];
    for m in [m, m2] {
        vms.create(VmServiceCreateRequest { machine: Some(m) })
            .await
            .expect("create");
    }
    std::fs::remove_file(&gone).unwrap();

    for (id, says) in [
        ("notkernel", "linux kernel too old to load a ram disk"),
        ("nodrive", "Could not open"),
    ] {
        let t = Instant::now();
        let e = vms
            .start(VmServiceStartRequest { vm_id: id.into() })
            .await
            .expect_err("QEMU exits");
        eprintln!(
            "{id}: Start failed after {:?}: {}",
            t.elapsed(),
            e.message()
        );
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        let msg = e.message();
        assert!(msg.contains("qemu exit status: 1"), "{id}: {msg}");
        assert!(msg.contains(says), "{id}: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{id}: {:?}",
            t.elapsed()
        );
        let kept = d.dir.path().join("run/vms").join(id).join("qemu.stderr");
        let kept = std::fs::read_to_string(&kept).unwrap_or_default();
        assert!(kept.contains(says), "{id}: qemu.stderr: {kept:?}");
        vms.free(VmServiceFreeRequest { vm_id: id.into() })
            .await
            .expect("free");
    }
}
