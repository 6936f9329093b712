//! VmService end to end, with a real guest under QEMU (TCG): the host
//! daemon creates and boots a VM whose init is our auraed (built by
//! scripts/guest-image), the test talks to the guest's daemon over mTLS,
//! runs cells in it (the cells' cgroup v2 backend on a real v2 kernel),
//! and the VM powers off on Stop. One boot for everything: TCG is slow.
//!
//! Needs root and the guest image; without the image the test says so
//! loudly and passes (scripts/test builds the image first, so CI runs it).

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceStartRequest,
            CpuController, Executable, MemoryController,
        },
        discovery::DiscoverRequest,
        vms::{
            RootDrive, VirtualMachine, VmServiceCreateRequest, VmServiceFreeRequest,
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
        (Some(qemu), Some(kernel), Some(initrd)) => Some(Guest {
            qemu,
            kernel,
            initrd,
        }),
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

#[tokio::test]
async fn vm_boots_auraed_as_init_and_runs_v2_cells() {
    let Some(g) = guest_image() else { return };
    let d = Daemon::start_with(None, &["--qemu", &g.qemu, "--vm-accel", "tcg"]).await;
    let mut vms = d.client().await.vms();
    let id = common::unique("vm");

    // Refusals, before anything boots.
    let mut bad = machine(&g, "x");
    bad.mem_size_mb = 32;
    let e = vms
        .create(VmServiceCreateRequest { machine: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("machine.mem_size_mb"), "{e:?}");
    let mut bad = machine(&g, "x");
    bad.kernel_img_path = "/nonexistent/vmlinuz".into();
    let e = vms
        .create(VmServiceCreateRequest { machine: Some(bad) })
        .await
        .unwrap_err();
    assert!(e.message().contains("machine.kernel_img_path"), "{e:?}");
    let start_unknown = vms.start(VmServiceStartRequest {
        vm_id: "nope".into(),
    });
    assert_eq!(code_of(start_unknown.await).await, Code::NotFound);

    let created = vms
        .create(VmServiceCreateRequest {
            machine: Some(machine(&g, &id)),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.vm_id, id);
    let dup = vms.create(VmServiceCreateRequest {
        machine: Some(machine(&g, &id)),
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

    check_guest_cells(&guest, &d, &id).await;

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

/// Through the guest's auraed: a cell with cpu and memory limits on the
/// guest's cgroup2. The check executable writes what it sees to the
/// guest's console, which the host keeps as the VM's log.
async fn check_guest_cells(guest: &Client, d: &Daemon, id: &str) {
    let mut cells = guest.cells();
    let r = cells
        .allocate(CellServiceAllocateRequest {
            cell: Some(Cell {
                name: "t1".into(),
                cpu: Some(CpuController {
                    weight: None,
                    max: Some(50_000),
                    period: Some(100_000),
                }),
                memory: Some(MemoryController {
                    max: Some(64 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("allocate in the guest")
        .into_inner();
    assert!(r.cgroup_v2, "the guest is a cgroup v2 host");
    let script = "c=/sys/fs/cgroup/aurae/t1; echo \"AURAE-CHECK mem=$(cat $c/memory.max) \
                  cpu=$(cat $c/cpu.max | tr ' ' /) ctl=$(cat /sys/fs/cgroup/cgroup.subtree_control | tr ' ' ,) \
                  mounts=$(awk '$2==\"/proc\"||$2==\"/sys/fs/cgroup\"{printf \"%s:%s,\", $2, $3}' /proc/mounts) \
                  in=$(cat /proc/self/cgroup) END\" > /dev/console";
    cells
        .start(CellServiceStartRequest {
            cell_name: Some("t1".into()),
            executable: Some(Executable {
                name: "check".into(),
                command: script.into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .expect("start in the guest");
    let console = d.dir.path().join("run/vms").join(id).join("console.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("AURAE-CHECK") && l.contains("END"))
        {
            break l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no check output; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("guest says: {line}");
    assert!(line.contains("mem=67108864 "), "{line}");
    assert!(line.contains("cpu=50000/100000 "), "{line}");
    for c in ["cpu", "cpuset", "memory", "pids"] {
        assert!(
            line.split("ctl=")
                .nth(1)
                .is_some_and(|s| s.split([',', ' ']).any(|x| x == c)),
            "{c}: {line}"
        );
    }
    assert!(line.contains("/proc:proc,"), "{line}");
    assert!(line.contains("/sys/fs/cgroup:cgroup2,"), "{line}");
    cells
        .free(CellServiceFreeRequest {
            cell_name: "t1".into(),
        })
        .await
        .expect("free in the guest");
}
