//! Hardening of CellService against client mistakes, against the real
//! daemon and kernel: every mistake is answered with a code that says whose
//! it is (INVALID_ARGUMENT naming the field, NOT_FOUND, ALREADY_EXISTS,
//! FAILED_PRECONDITION), never INTERNAL; the daemon keeps answering, logs
//! nothing at ERROR for them, and creates nothing outside its cgroup root.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellServiceAllocateRequest, CellServiceFreeRequest, CellServiceListRequest,
            CellServiceStartRequest, CellServiceStopRequest, CpuController, CpusetController,
            Executable, MemoryController,
        },
        discovery::DiscoverRequest,
    },
    Client,
};
use common::Daemon;
use tonic::Code;

/// SplitMix64: a seeded, deterministic generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())].clone()
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn maybe<T>(&mut self, percent: usize, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.chance(percent) {
            Some(f(self))
        } else {
            None
        }
    }
}

/// Top-level directories of the cgroup hierarchies this host has.
fn cgroup_tops() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for h in ["cpu", "memory", "cpuset", "unified"] {
        let Ok(entries) = std::fs::read_dir(Path::new("/sys/fs/cgroup").join(h)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                all.insert(format!("{h}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    all
}

/// New top-level cgroups, except other daemons' roots (`/aurae-test-<pid>-<n>`
/// and the like: tests and benchmarks run in parallel on this host). A cell
/// escaping its root would carry its own name, which never starts with
/// `aurae-` here.
fn created_outside(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    after
        .difference(before)
        .filter(|d| {
            let top = d.split_once('/').map_or(d.as_str(), |(_, t)| t);
            !top.starts_with("aurae-")
        })
        .cloned()
        .collect()
}

async fn allocate(c: &Client, cell: Cell) -> Result<(), tonic::Status> {
    c.cells()
        .allocate(CellServiceAllocateRequest { cell: Some(cell) })
        .await
        .map(|_| ())
}

async fn start(
    c: &Client,
    cell: Option<&str>,
    name: &str,
    command: &str,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<i32, tonic::Status> {
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: cell.map(str::to_owned),
            executable: Some(Executable {
                name: name.into(),
                command: command.into(),
                description: String::new(),
            }),
            uid,
            gid,
        })
        .await
        .map(|r| r.into_inner().pid)
}

async fn free(c: &Client, name: &str) -> Result<(), tonic::Status> {
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .map(|_| ())
}

fn named(name: &str) -> Cell {
    Cell {
        name: name.into(),
        ..Default::default()
    }
}

fn with_cpu(name: &str, max: i64) -> Cell {
    Cell {
        cpu: Some(CpuController {
            max: Some(max),
            ..Default::default()
        }),
        ..named(name)
    }
}

fn with_cpuset(name: &str, cpus: Option<&str>, mems: Option<&str>) -> Cell {
    Cell {
        cpuset: Some(CpusetController {
            cpus: cpus.map(str::to_owned),
            mems: mems.map(str::to_owned),
        }),
        ..named(name)
    }
}

fn expect_invalid(what: &str, r: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    assert!(
        e.message().starts_with(field),
        "{what}: message should name {field}: {:?}",
        e.message()
    );
}

fn assert_no_error_logged(d: &Daemon) {
    // The log may be coloured: drop the escape sequences first.
    let mut log = String::new();
    let mut esc = false;
    for ch in d.log().chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "logged at ERROR:\n{}", errors.join("\n"));
}

/// The mistakes of the issue, one by one, with the code and field each gets.
#[tokio::test]
async fn known_client_mistakes_get_clear_codes() {
    let before = cgroup_tops();
    let d = Daemon::start().await;
    let c = d.client().await;

    for max in [1 << 50, i64::MAX, (1 << 44)] {
        expect_invalid(
            "huge cpu.max",
            allocate(&c, with_cpu("big", max)).await,
            "cell.cpu.max",
        );
    }
    for cpus in ["5", "0-99999", "4294967295"] {
        let r = allocate(&c, with_cpuset("cs", Some(cpus), None)).await;
        expect_invalid(cpus, r, "cell.cpuset.cpus");
    }
    let r = allocate(&c, with_cpuset("cs", None, Some("7"))).await;
    expect_invalid("mems 7", r, "cell.cpuset.mems");
    for name in ["tasks", "cpus", "mems", "auraed", "x/tasks"] {
        expect_invalid(name, allocate(&c, named(name)).await, "cell.name");
    }
    let deep = vec!["x".repeat(63); 64].join("/");
    expect_invalid("64 x 63", allocate(&c, named(&deep)).await, "cell.name");

    // Nested: the parent's cpuset and (v1) the parent's cpu bandwidth bound the child.
    allocate(&c, with_cpuset("p", Some("0"), None))
        .await
        .unwrap();
    let e = allocate(&c, with_cpuset("p/q", Some("1"), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cell.cpuset.cpus"), "{e:?}");
    assert!(e.message().contains("its parent has \"0\""), "{e:?}");
    allocate(&c, with_cpuset("p/q", Some("0"), None))
        .await
        .unwrap();
    allocate(&c, with_cpu("slow", 10_000)).await.unwrap();
    match allocate(&c, with_cpu("slow/fast", 50_000)).await {
        // cgroup v1 refuses a child quota above its parent's (EINVAL).
        Err(e) => {
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().starts_with("cell.cpu.max"), "{e:?}");
        }
        Ok(()) => free(&c, "slow/fast").await.unwrap(),
    }

    // Start.
    let big = "x".repeat(1 << 20);
    for (cmd, what) in [(big.as_str(), "1 MiB"), ("echo a\0b", "NUL")] {
        let r = start(&c, Some("p"), "e", cmd, None, None).await;
        expect_invalid(what, r, "executable.command");
    }
    let r = start(&c, Some("p"), "e", "true", Some(u32::MAX), None).await;
    expect_invalid("uid -1", r, "uid");
    let r = start(&c, Some("p"), "e", "true", None, Some(u32::MAX)).await;
    expect_invalid("gid -1", r, "gid");
    // The longest command is fine.
    let longest = format!("true {}", "x".repeat(128 * 1024 - 1 - 5));
    start(&c, Some("p"), "longest", &longest, None, None)
        .await
        .unwrap();

    // Start racing Free: never INTERNAL.
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..10 {
        let cell = format!("race{i}");
        allocate(
            &c,
            Cell {
                isolate_process: i % 2 == 0,
                ..named(&cell)
            },
        )
        .await
        .unwrap();
        let (s, f) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(i * 3)).await;
                start(&c, Some(&cell), "r", "sleep 10", None, None).await
            },
            free(&c, &cell)
        );
        f.unwrap();
        let code = s.map_or_else(|e| e.code(), |_| Code::Ok);
        assert!(
            matches!(code, Code::Ok | Code::FailedPrecondition | Code::NotFound),
            "start racing free: {code:?}"
        );
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    eprintln!("start racing free: {codes:?}");

    for cell in ["p", "slow"] {
        free(&c, cell).await.unwrap();
    }
    d.client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap();
    assert_no_error_logged(&d);
    let outside = created_outside(&before, &cgroup_tops());
    assert!(outside.is_empty(), "created outside the root: {outside:?}");
}

/// `List` of the deepest tree the daemon allows decodes in `aer` and in
/// Python grpcio (both stop at 100 levels of protobuf nesting).
#[tokio::test]
async fn list_at_the_depth_cap_decodes_everywhere() {
    let d = Daemon::start().await;
    let c = d.client().await;
    // 16 components of 14 characters: 239 bytes, both caps at once.
    let mut name = String::new();
    for i in 0..16 {
        if i > 0 {
            name.push('/');
        }
        name.push_str(&format!("level{i:02}-abcdefg")[..14]);
        allocate(&c, named(&name)).await.unwrap();
    }
    assert_eq!(name.len(), 239);
    expect_invalid(
        "17 levels",
        allocate(&c, named(&format!("{name}/x"))).await,
        "cell.name",
    );
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.cells.len(), 1);

    let out = std::process::Command::new(common::aer_bin())
        .arg("--config")
        .arg(d.client_config_path())
        .args(["cell", "list"])
        .output()
        .expect("run aer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("level15-abcdef"));

    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        let cfg = d.client_config();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("python3")
            .arg(root.join("tests/interop/grpcio_cells_list.py"))
            .arg(root.join("api"))
            .arg(&d.socket)
            .args([&cfg.auth.ca_crt, &cfg.auth.client_crt, &cfg.auth.client_key])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["depth"], 16, "{v}");
        assert_eq!(v["cells"], 16, "{v}");
    } else {
        eprintln!("SKIPPED (grpcio part): python3 with grpcio and grpcio-tools is not installed");
    }
    free(&c, name.split('/').next().unwrap()).await.unwrap();
    assert_no_error_logged(&d);
}

/// Structured random Allocate/Start requests (seeded, bounded in count and
/// time): no INTERNAL, the daemon still answers, nothing logged at ERROR,
/// nothing created outside its cgroup root, everything freed.
#[tokio::test]
async fn random_requests_never_get_internal() {
    const SEED: u64 = 0x5eed_cafe_2024;
    const REQUESTS: usize = 300;
    const BUDGET: Duration = Duration::from_secs(30);
    let before = cgroup_tops();
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut rng = Rng(SEED);
    let mut cells: Vec<String> = Vec::new();
    let mut host_execs: Vec<String> = Vec::new();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut sent = 0;
    let t0 = Instant::now();

    let alphabet: Vec<char> = "abcXYZ019-/_. \0\nä".chars().collect();
    let cpus = [
        "0",
        "1",
        "0-1",
        "0,1",
        "5",
        "0-99999",
        "4294967295",
        "1-0",
        "",
        "a",
        "0-",
    ];
    let mems = ["0", "7", "0-1", "", "0-0"];
    let i64s = [
        -5,
        0,
        999,
        1000,
        50_000,
        (1 << 44) - 1,
        1 << 44,
        1 << 50,
        i64::MAX,
    ];
    let u64s = [
        0,
        1,
        100,
        999,
        1000,
        10_000,
        10_001,
        100_000,
        1_000_001,
        u64::MAX,
    ];
    let mem_values = [-1, 64 << 20, 256 << 20, i64::MAX];
    let commands = ["true", "exit 3", "sleep 0.2", "echo hi", "", "  ", "a\0b"];
    let ids = [0, 65534, 1000, 123_456_789, u32::MAX];

    while sent < REQUESTS && t0.elapsed() < BUDGET {
        sent += 1;
        let (what, result) = if rng.chance(60) || cells.is_empty() {
            let name = match rng.below(10) {
                0..=4 => format!("hz{sent}"),
                5 | 6 if !cells.is_empty() => format!("{}/c{sent}", rng.pick(&cells)),
                7 => rng
                    .pick(&["tasks", "cpus", "mems", "auraed", "a-", "-a"])
                    .to_owned(),
                8 => {
                    let n = 1 + rng.below(20);
                    let len = 1 + rng.below(70);
                    vec!["y".repeat(len); n].join("/")
                }
                _ => (0..rng.below(12))
                    .map(|_| rng.pick(&alphabet))
                    .collect::<String>(),
            };
            let cell = Cell {
                name: name.clone(),
                cpu: rng.maybe(30, |r| CpuController {
                    weight: r.maybe(50, |r| r.pick(&u64s)),
                    max: r.maybe(60, |r| r.pick(&i64s)),
                    period: r.maybe(30, |r| r.pick(&u64s)),
                }),
                cpuset: rng.maybe(30, |r| CpusetController {
                    cpus: r.maybe(70, |r| r.pick(&cpus).to_owned()),
                    mems: r.maybe(40, |r| r.pick(&mems).to_owned()),
                }),
                memory: rng.maybe(20, |r| MemoryController {
                    min: r.maybe(10, |r| r.pick(&mem_values)),
                    low: r.maybe(30, |r| r.pick(&mem_values)),
                    high: r.maybe(10, |r| r.pick(&mem_values)),
                    max: r.maybe(50, |r| r.pick(&mem_values)),
                }),
                isolate_process: rng.chance(10),
                isolate_network: rng.chance(5),
            };
            let r = allocate(&c, cell).await;
            if r.is_ok() {
                cells.push(name);
            }
            ("allocate", r.map(|_| ()))
        } else {
            let host = rng.chance(20);
            let cell = (!host).then(|| rng.pick(&cells));
            let name = match rng.below(10) {
                0 => String::new(),
                1 => "bad\nname".to_owned(),
                _ => format!("e{sent}"),
            };
            let command = match rng.below(10) {
                0 => "x".repeat(1 << 20),
                1 => format!("true {}", "x".repeat(128 * 1024 - 6)),
                _ => rng.pick(&commands).to_owned(),
            };
            let uid = rng.maybe(30, |r| r.pick(&ids));
            let gid = rng.maybe(30, |r| r.pick(&ids));
            let r = start(&c, cell.as_deref(), &name, &command, uid, gid).await;
            if r.is_ok() && host {
                host_execs.push(name);
            }
            ("start", r.map(|_| ()))
        };
        let code = result.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
        *codes.entry(format!("{what} {code:?}")).or_default() += 1;
        if let Err(e) = &result {
            assert!(
                !matches!(e.code(), Code::Internal | Code::Unknown | Code::Unavailable),
                "request {sent} ({what}) got {e:?}"
            );
            if e.code() == Code::InvalidArgument {
                let m = e.message();
                assert!(
                    ["cell", "executable", "uid", "gid"]
                        .iter()
                        .any(|f| m.starts_with(f)),
                    "request {sent}: message names no field: {m:?}"
                );
            }
        }
    }
    eprintln!(
        "seed {SEED:#x}: {sent} requests in {:?}, {} cells allocated; codes: {codes:?}",
        t0.elapsed(),
        cells.len()
    );

    for name in &host_execs {
        c.cells()
            .stop(CellServiceStopRequest {
                cell_name: None,
                executable_name: name.clone(),
            })
            .await
            .unwrap();
    }
    for name in cells.iter().filter(|n| !n.contains('/')) {
        free(&c, name).await.unwrap();
    }
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.cells.is_empty() && list.host_executables.is_empty());
    let r = c.discovery().discover(DiscoverRequest {}).await.unwrap();
    assert!(r.into_inner().healthy);
    assert_no_error_logged(&d);
    let outside = created_outside(&before, &cgroup_tops());
    assert!(outside.is_empty(), "created outside the root: {outside:?}");
    assert!(sent >= 100, "only {sent} requests within {BUDGET:?}");
}
