//! Hardening of VmService definitions, against the real daemon and
//! without booting anything: Create bounds what it keeps (kernel_args,
//! memory, vCPUs, drive mounts, path lengths, the number of VMs), naming
//! the field it refuses; refused definitions do not grow the daemon; and
//! the seed-era client's empty Free frees the only VM, or is refused with
//! INVALID_ARGUMENT naming `vm_id` when that is ambiguous.

mod common;

use std::path::PathBuf;

use aurae_client::proto::observe::{GetPosixSignalsStreamRequest, Workload, WorkloadType};
use aurae_client::proto::vms::{
    vm_service_client::VmServiceClient, DriveMount, RootDrive, VirtualMachine,
    VmServiceCreateRequest, VmServiceFreeRequest, VmServiceListRequest,
};
use common::{observe::rss_kib, Daemon};
use tonic::{transport::Channel, Code};

/// Must match `MAX_VMS` in services/vms/state.rs.
const MAX_VMS: usize = 64;

/// A kernel and a root file: Create only checks that they can be read.
fn files(d: &Daemon) -> (String, String) {
    let kernel = d.dir.path().join("vmlinuz");
    let root = d.dir.path().join("root.img");
    std::fs::write(&kernel, b"not booted").unwrap();
    std::fs::write(&root, vec![0u8; 4096]).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    (s(kernel), s(root))
}

fn machine(f: &(String, String), id: &str) -> VirtualMachine {
    VirtualMachine {
        id: id.into(),
        mem_size_mb: 128,
        vcpu_count: 1,
        kernel_img_path: f.0.clone(),
        kernel_args: vec!["quiet".into()],
        root_drive: Some(RootDrive {
            host_path: f.1.clone(),
            is_writeable: false,
        }),
        drive_mounts: vec![],
    }
}

async fn create(
    vms: &mut VmServiceClient<Channel>,
    m: VirtualMachine,
) -> Result<String, tonic::Status> {
    vms.create(VmServiceCreateRequest { machine: Some(m) })
        .await
        .map(|r| r.into_inner().vm_id)
}

async fn refused(vms: &mut VmServiceClient<Channel>, m: VirtualMachine, field: &str) {
    let e = create(vms, m).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
    assert!(
        e.message().contains(field),
        "the refusal names {field}: {e:?}"
    );
    assert!(
        e.message().len() < 1024,
        "a short message: {} bytes",
        e.message().len()
    );
}

async fn ids(vms: &mut VmServiceClient<Channel>) -> Vec<String> {
    vms.list(VmServiceListRequest {})
        .await
        .expect("list")
        .into_inner()
        .machines
        .into_iter()
        .map(|m| m.id)
        .collect()
}

#[tokio::test]
async fn definitions_are_bounded() {
    let d = Daemon::start().await;
    let mut vms = d.client().await.vms();
    let f = files(&d);

    // 3 MiB of kernel arguments: refused, and not kept. The first ten
    // set the allocator's high-water mark (decode buffers); forty more
    // must not grow the daemon further.
    let big = |i: usize| {
        let mut m = machine(&f, &format!("big{i}"));
        m.kernel_args = vec!["x".repeat(3 << 20)];
        m
    };
    let rss0 = rss_kib(d.pid());
    for i in 0..10 {
        refused(&mut vms, big(i), "machine.kernel_args").await;
    }
    let rss1 = rss_kib(d.pid());
    for i in 10..50 {
        refused(&mut vms, big(i), "machine.kernel_args").await;
    }
    let rss2 = rss_kib(d.pid());
    eprintln!("refused 3 MiB definitions: daemon RSS {rss0} KiB, {rss1} after 10, {rss2} after 50");
    assert!(
        rss2 < rss1 + 8 * 1024,
        "refused definitions grow the daemon: {rss0} -> {rss1} -> {rss2} KiB"
    );
    let mut m = machine(&f, "many-args");
    m.kernel_args = vec!["a".into(); 65];
    refused(&mut vms, m, "machine.kernel_args").await;
    let mut m = machine(&f, "long-line");
    m.kernel_args = vec!["y".repeat(2100)];
    refused(&mut vms, m, "machine.kernel_args").await;

    // Sizes beyond the host.
    let mut m = machine(&f, "huge");
    m.mem_size_mb = u32::MAX; // 4 PiB
    refused(&mut vms, m, "machine.mem_size_mb").await;
    let mut m = machine(&f, "many-cpus");
    m.vcpu_count = 100_000;
    refused(&mut vms, m, "machine.vcpu_count").await;

    // Counts and lengths.
    let mut m = machine(&f, "drives");
    m.drive_mounts = (0..17)
        .map(|i| DriveMount {
            host_path: f.1.clone(),
            vm_path: format!("/d{i}"),
            fs_type: "ext4".into(),
            is_writeable: false,
        })
        .collect();
    refused(&mut vms, m, "machine.drive_mounts").await;
    refused(&mut vms, machine(&f, &"i".repeat(1 << 20)), "machine.id").await;
    let mut m = machine(&f, "path");
    m.kernel_img_path = format!("/{}", "p".repeat(1 << 20));
    refused(&mut vms, m, "machine.kernel_img_path").await;
    assert!(ids(&mut vms).await.is_empty(), "nothing refused is defined");

    // At most MAX_VMS defined: then RESOURCE_EXHAUSTED, until one is freed.
    for i in 0..MAX_VMS {
        create(&mut vms, machine(&f, &format!("vm{i}")))
            .await
            .unwrap_or_else(|e| panic!("vm{i}: {e:?}"));
    }
    let e = create(&mut vms, machine(&f, "one-too-many"))
        .await
        .expect_err("one too many");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    vms.free(VmServiceFreeRequest {
        vm_id: "vm0".into(),
    })
    .await
    .expect("free vm0");
    create(&mut vms, machine(&f, "one-more"))
        .await
        .expect("room again after a Free");
    for id in ids(&mut vms).await {
        vms.free(VmServiceFreeRequest { vm_id: id })
            .await
            .expect("free");
    }
    assert!(ids(&mut vms).await.is_empty());
    let log = d.log();
    assert!(!log.contains("ERROR"), "refusals logged as errors:\n{log}");
}

#[tokio::test]
async fn empty_free_frees_the_only_vm() {
    let d = Daemon::start().await;
    let mut vms = d.client().await.vms();
    let f = files(&d);
    let empty = || VmServiceFreeRequest {
        vm_id: String::new(),
    };

    // None defined: nothing to name.
    let e = vms.free(empty()).await.expect_err("no VM");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("vm_id"), "{e:?}");

    // Two defined: ambiguous, and both stay.
    create(&mut vms, machine(&f, "a")).await.expect("create a");
    create(&mut vms, machine(&f, "b")).await.expect("create b");
    let e = vms.free(empty()).await.expect_err("ambiguous");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("vm_id"), "{e:?}");
    assert_eq!(ids(&mut vms).await, ["a", "b"]);

    // One defined: the seed's empty request frees it, and says which.
    vms.free(VmServiceFreeRequest { vm_id: "a".into() })
        .await
        .expect("free a");
    let freed = vms.free(empty()).await.expect("free the only VM");
    assert_eq!(freed.into_inner().vm_id, "b");
    assert!(ids(&mut vms).await.is_empty());
}

/// GetPosixSignalsStream of a VM workload relays the guest's own stream
/// (tests/vm.rs checks a signal through it); without a running guest it
/// says why.
#[tokio::test]
async fn vm_signal_streams_need_a_running_vm() {
    let d = Daemon::start().await;
    let client = d.client().await;
    let mut vms = client.vms();
    let f = files(&d);
    let observe = client.observe();
    let ask = |id: &str| {
        let r = GetPosixSignalsStreamRequest {
            workload: Some(Workload {
                workload_type: WorkloadType::Vm as i32,
                id: id.into(),
            }),
        };
        let mut observe = observe.clone();
        async move { observe.get_posix_signals_stream(r).await.map(|_| ()) }
    };
    let e = ask("nope").await.expect_err("unknown VM");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = ask("").await.expect_err("no id");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("workload.id"), "{e:?}");
    create(&mut vms, machine(&f, "idle")).await.expect("create");
    let e = ask("idle").await.expect_err("not running");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not running"), "{e:?}");
}
