//! Transport hardening against the real daemon: undecodable bodies,
//! a raw-bytes fuzz of every method, GOAWAY at shutdown, client
//! certificate usages, plain log files, and a bounded load-and-leak run.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use aurae_client::{
    proto::{
        cells::{
            Cell, CellGraphNode, CellServiceAllocateRequest, CellServiceFreeRequest,
            CellServiceListRequest, CellServiceStartRequest, CellServiceStopRequest, Executable,
        },
        discovery::DiscoverRequest,
        vms::{VmServiceFreeRequest, VmServiceListRequest},
    },
    Client, Target,
};
use bytes::{Buf, BufMut, Bytes};
use common::{unique, Daemon};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

/// Sends and receives message bodies as they are.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Every method the daemon serves; `true` for a streaming request.
const METHODS: &[(&str, bool)] = &[
    ("/aurae.discovery.v0.DiscoveryService/Discover", false),
    ("/aurae.cells.v0.CellService/Allocate", false),
    ("/aurae.cells.v0.CellService/Free", false),
    ("/aurae.cells.v0.CellService/Start", false),
    ("/aurae.cells.v0.CellService/Stop", false),
    ("/aurae.cells.v0.CellService/List", false),
    (
        "/aurae.observe.v0.ObserveService/GetAuraeDaemonLogStream",
        false,
    ),
    (
        "/aurae.observe.v0.ObserveService/GetSubProcessStream",
        false,
    ),
    (
        "/aurae.observe.v0.ObserveService/GetPosixSignalsStream",
        false,
    ),
    ("/aurae.vms.v0.VmService/Create", false),
    ("/aurae.vms.v0.VmService/Free", false),
    ("/aurae.vms.v0.VmService/Start", false),
    ("/aurae.vms.v0.VmService/Stop", false),
    ("/aurae.vms.v0.VmService/List", false),
    ("/grpc.health.v1.Health/Check", false),
    ("/grpc.health.v1.Health/Watch", false),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        true,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        true,
    ),
];

/// What one call came back with: a first message, a status, or nothing
/// yet (a stream with nothing to say).
#[derive(Debug)]
enum Answer {
    Message,
    /// The stream ended (status OK) without a message.
    Ended,
    Status(Status),
    Silent,
}

/// Calls `method` with `body` as the request message and waits (bounded)
/// for the first response message or the status. Every method is called
/// as server-streaming so that unary and streaming answers read alike.
async fn raw_call(client: &Client, method: &'static str, streaming: bool, body: Bytes) -> Answer {
    let mut grpc = tonic::client::Grpc::new(client.channel());
    let path = http::uri::PathAndQuery::from_static(method);
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unknown(e.to_string()))?;
        let response = if streaming {
            grpc.streaming(
                tonic::Request::new(tokio_stream::once(body)),
                path,
                RawCodec,
            )
            .await?
        } else {
            grpc.server_streaming(tonic::Request::new(body), path, RawCodec)
                .await?
        };
        let mut stream = response.into_inner();
        stream.message().await.map(|m| m.is_some())
    };
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(true)) => Answer::Message,
        Ok(Ok(false)) => Answer::Ended,
        Ok(Err(s)) => Answer::Status(s),
        Err(_) => Answer::Silent,
    }
}

/// A small deterministic PRNG (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Random bytes; half of them start like a protobuf field, so that
    /// decoding gets past the first byte more often.
    fn body(&mut self) -> Bytes {
        let len = self.below(48) as usize;
        let mut v: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
        if !v.is_empty() && self.below(2) == 0 {
            // field 1..=15, wire type LEN or VARINT
            let field = 1 + self.below(15) as u8;
            v[0] = (field << 3) | if self.below(2) == 0 { 2 } else { 0 };
            if v.len() > 1 && v[0] & 7 == 2 {
                v[1] = self.below(len as u64) as u8;
            }
        }
        Bytes::from(v)
    }
}

/// Frees every cell (deepest first), stops host executables and frees
/// VMs the calls may have created.
async fn clean_up(c: &Client) {
    fn names(nodes: &[CellGraphNode], out: &mut Vec<String>) {
        for n in nodes {
            names(&n.children, out);
            if let Some(cell) = &n.cell {
                out.push(cell.name.clone());
            }
        }
    }
    if let Ok(list) = c.cells().list(CellServiceListRequest {}).await {
        let list = list.into_inner();
        for e in &list.host_executables {
            let _ = c
                .cells()
                .stop(CellServiceStopRequest {
                    cell_name: None,
                    executable_name: e.name.clone(),
                })
                .await;
        }
        let mut all = Vec::new();
        names(&list.cells, &mut all);
        for name in all {
            let _ = c
                .cells()
                .free(CellServiceFreeRequest { cell_name: name })
                .await;
        }
    }
    if let Ok(vms) = c.vms().list(VmServiceListRequest {}).await {
        for m in vms.into_inner().machines {
            let _ = c.vms().free(VmServiceFreeRequest { vm_id: m.id }).await;
        }
    }
}

#[tokio::test]
async fn undecodable_bodies_are_invalid_argument_on_every_method() {
    let d = Daemon::start().await;
    let c = d.client().await;
    // 0x07 is a field with wire type 7, which does not exist.
    for &(method, streaming) in METHODS {
        let bad = Bytes::from_static(&[0x0f, 0xff, 0xff]);
        match raw_call(&c, method, streaming, bad).await {
            Answer::Status(s) => assert_eq!(
                s.code(),
                Code::InvalidArgument,
                "{method}: {} {}",
                s.code(),
                s.message()
            ),
            // tonic-reflection ends its stream (OK) on a request it cannot
            // decode: not INTERNAL either.
            Answer::Ended if streaming => {}
            other => panic!("{method}: an undecodable body was answered with {other:?}"),
        }
    }
}

/// Random bodies for every method: the daemon stays up, every answer is a
/// proper status, an undecodable body is never INTERNAL.
#[tokio::test]
async fn raw_bytes_fuzz_every_method() {
    let d = Daemon::start().await;
    let c = d.client().await;
    let mut rng = Rng(0x5eed_a0ae_2024);
    let budget = Duration::from_secs(25);
    let t = Instant::now();
    let mut tried = 0usize;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    'outer: for _round in 0..200 {
        for &(method, streaming) in METHODS {
            if t.elapsed() > budget {
                break 'outer;
            }
            let body = rng.body();
            let answer = raw_call(&c, method, streaming, body.clone()).await;
            tried += 1;
            let key = match &answer {
                Answer::Message => "message".to_owned(),
                Answer::Ended => "ended without a message".to_owned(),
                Answer::Silent => "silent stream".to_owned(),
                Answer::Status(s) => format!("{:?}", s.code()),
            };
            *seen.entry(key).or_default() += 1;
            match answer {
                Answer::Message | Answer::Ended => {}
                Answer::Silent => assert!(
                    method.contains("Stream") || method.ends_with("/Watch"),
                    "{method} did not answer within 3s for body {body:02x?}"
                ),
                Answer::Status(s) => {
                    let allowed_unavailable = method.ends_with("GetPosixSignalsStream")
                        || method.starts_with("/aurae.vms");
                    assert!(
                        !matches!(s.code(), Code::Internal | Code::Unknown)
                            && (s.code() != Code::Unavailable || allowed_unavailable),
                        "{method} answered {:?} {:?} for body {body:02x?}",
                        s.code(),
                        s.message()
                    );
                }
            }
            assert!(
                d.child.try_wait_alive(),
                "the daemon died; log:\n{}",
                d.log()
            );
        }
    }
    eprintln!(
        "fuzz: {tried} calls over {} methods in {:?}: {seen:?}",
        METHODS.len(),
        t.elapsed()
    );
    assert!(tried >= 500, "only {tried} calls in the budget");
    clean_up(&c).await;
    let r = c.discovery().discover(DiscoverRequest {}).await.unwrap();
    assert!(r.into_inner().healthy);
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.cells.is_empty(), "cells left: {:?}", list.cells);
}

trait AliveExt {
    fn try_wait_alive(&self) -> bool;
}

impl AliveExt for std::process::Child {
    fn try_wait_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.id())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.id()))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
    }
}

/// After SIGTERM, a new call on an open connection fails at once with
/// UNAVAILABLE while the call in flight completes.
#[tokio::test]
async fn sigterm_refuses_new_calls_on_open_connections_at_once() {
    let mut d = Daemon::start_with(None, &["--stop-grace-secs", "3"]).await;
    let c = d.client().await;
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: None,
            executable: Some(Executable {
                name: "stubborn".into(),
                command: "trap '' TERM; exec sleep 300".into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .unwrap();
    // Warm the connection: it is open and idle when SIGTERM comes.
    c.discovery().discover(DiscoverRequest {}).await.unwrap();

    // The long call: Stop waits the 3 s grace, then SIGKILLs.
    let mut cells = c.cells();
    let stopping = tokio::spawn(async move {
        let t = Instant::now();
        let r = cells
            .stop(CellServiceStopRequest {
                cell_name: None,
                executable_name: "stubborn".into(),
            })
            .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::signal(d.pid(), libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.discovery().discover(DiscoverRequest {}),
    )
    .await
    .expect("a new call after SIGTERM must not hang");
    let took = t.elapsed();
    eprintln!("new call after SIGTERM: {r:?} after {took:?}");
    let err = r.expect_err("a new call after SIGTERM must be refused");
    // The daemon's GOAWAY makes the client's connection refuse the call
    // before it is sent: tonic reports that as CANCELLED ("connection
    // closed", a transport error, so the call never reached the daemon);
    // had it been sent, UNAVAILABLE.
    assert!(
        err.code() == Code::Unavailable
            || (err.code() == Code::Cancelled && format!("{err:?}").contains("connection closed")),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    // The next call finds no daemon to connect to: UNAVAILABLE, at once.
    let t = Instant::now();
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        c.discovery().discover(DiscoverRequest {}),
    )
    .await
    .expect("must not hang");
    eprintln!("next call: {again:?} after {:?}", t.elapsed());
    assert_eq!(again.unwrap_err().code(), Code::Unavailable);
    assert!(t.elapsed() < Duration::from_secs(1));
    let (r, took_stop) = stopping.await.unwrap();
    eprintln!("Stop in flight: {r:?} after {took_stop:?}");
    r.expect("the call in flight completes");
    assert!(
        took_stop >= Duration::from_millis(2500),
        "Stop took {took_stop:?}"
    );
    let status = d.wait_exit(Duration::from_secs(30)).expect("daemon exits");
    assert!(status.success(), "{status:?}");
}

/// Mints a client certificate signed by the daemon's CA.
fn mint_client(
    d: &Daemon,
    key_usages: Vec<rcgen::KeyUsagePurpose>,
    ekus: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> rustls::ClientConfig {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let pki = d.dir.path().join("pki");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap()).unwrap();
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(pki.join("ca.crt")).unwrap(),
    )
    .unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "aurae-client");
    p.key_usages = key_usages;
    p.extended_key_usages = ekus;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

async fn discover_with(d: &Daemon, cfg: rustls::ClientConfig) -> Result<(), String> {
    let client = Client::connect_with(Target::parse(&d.socket), Arc::new(cfg))
        .await
        .map_err(|e| e.to_string())?;
    client
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn client_certificates_need_the_client_usages() {
    use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
    let d = Daemon::start().await;
    discover_with(
        &d,
        mint_client(&d, vec![Ku::KeyEncipherment], vec![Eku::ClientAuth]),
    )
    .await
    .expect_err("a client certificate without digitalSignature must be refused");
    assert!(d.log().contains("digitalSignature"), "log:\n{}", d.log());
    discover_with(&d, mint_client(&d, vec![], vec![Eku::ServerAuth]))
        .await
        .expect_err("a certificate for servers only must be refused");
    // Right usages, minted the same way: accepted, so the refusals were
    // about the usages.
    discover_with(
        &d,
        mint_client(&d, vec![Ku::DigitalSignature], vec![Eku::ClientAuth]),
    )
    .await
    .unwrap();
    // And the daemon's own development client certificate still works.
    d.client()
        .await
        .discovery()
        .discover(DiscoverRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn log_file_has_no_colour_codes() {
    let d = Daemon::start().await;
    let c = d.client().await;
    // Some warnings and errors too, not only info lines.
    let _ = c
        .cells()
        .free(CellServiceFreeRequest {
            cell_name: "no-such-cell".into(),
        })
        .await;
    let log = d.log();
    assert!(log.contains("serving on"), "log:\n{log}");
    assert!(!log.contains("\x1b["), "colour codes in the log:\n{log:?}");
}

// ---- load and leaks ----

#[derive(Debug, Clone, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    cgroup_dirs: usize,
    processes: usize,
    mounts: usize,
}

fn count_dirs(p: &Path) -> usize {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| 1 + count_dirs(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn procs_in(p: &Path, out: &mut std::collections::BTreeSet<i32>) {
    if let Ok(s) = std::fs::read_to_string(p.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.filter_map(Result::ok) {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                procs_in(&e.path(), out);
            }
        }
    }
}

fn usage(d: &Daemon) -> Usage {
    let pid = d.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let roots: Vec<_> = [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "unified", "",
    ]
    .iter()
    .map(|h| {
        Path::new("/sys/fs/cgroup")
            .join(h)
            .join(d.cgroup_root.trim_start_matches('/'))
    })
    .filter(|p| p.is_dir())
    .collect();
    let cgroup_dirs = roots.iter().map(|r| count_dirs(r)).sum();
    // The daemon's children (shims, holders, zombies) and everything in
    // its cells.
    let mut procs = std::collections::BTreeSet::new();
    for r in &roots {
        procs_in(r, &mut procs);
    }
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(pid) {
            procs.insert(p);
        }
    }
    procs.remove(&pid);
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .count();
    Usage {
        fds,
        threads,
        cgroup_dirs,
        processes: procs.len(),
        mounts,
    }
}

async fn cycle(c: &Client, name: &str) {
    c.cells()
        .allocate(CellServiceAllocateRequest {
            cell: Some(Cell {
                name: name.into(),
                isolate_process: true,
                isolate_network: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("allocate {name}: {e:?}"));
    c.cells()
        .start(CellServiceStartRequest {
            cell_name: Some(name.into()),
            executable: Some(Executable {
                name: "sleeper".into(),
                command: "sleep 300".into(),
                description: String::new(),
            }),
            uid: None,
            gid: None,
        })
        .await
        .unwrap_or_else(|e| panic!("start in {name}: {e:?}"));
    c.cells()
        .stop(CellServiceStopRequest {
            cell_name: Some(name.into()),
            executable_name: "sleeper".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("stop in {name}: {e:?}"));
    c.cells()
        .free(CellServiceFreeRequest {
            cell_name: name.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("free {name}: {e:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_cycles_leak_nothing() {
    const CLIENTS: usize = 8;
    const CYCLES: usize = 40;
    let d = Arc::new(Daemon::start().await);
    let run = |cycles: usize| {
        let d = d.clone();
        async move {
            let mut tasks = Vec::new();
            for _ in 0..CLIENTS {
                let d = d.clone();
                tasks.push(tokio::spawn(async move {
                    // Each client its own connection.
                    let c = d.client().await;
                    let deadline = Instant::now() + Duration::from_secs(45);
                    let mut done = 0;
                    for _ in 0..cycles {
                        if Instant::now() > deadline {
                            break;
                        }
                        cycle(&c, &unique("load")).await;
                        done += 1;
                    }
                    done
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        }
    };
    // Warm-up: lazily made things (watchers, pools) exist before the
    // baseline is taken.
    run(1).await;
    // The signal probe loads in the background (its maps and ring buffer
    // are fds of the daemon): a signal stream answers once it is loaded.
    {
        let c = d.client().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            c.observe().get_posix_signals_stream(
                aurae_client::proto::observe::GetPosixSignalsStreamRequest { workload: None },
            ),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = usage(&d);
    let t = Instant::now();
    let cycles = run(CYCLES).await;
    let took = t.elapsed();
    // Give stopped things a moment to be reaped and idle threads to go.
    let mut after = usage(&d);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15) {
        after = usage(&d);
        if after.fds <= before.fds
            && after.threads <= before.threads + 4
            && after.cgroup_dirs <= before.cgroup_dirs
            && after.processes <= before.processes
            && after.mounts <= before.mounts
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("load: {cycles} cycles from {CLIENTS} clients in {took:?}; before {before:?}, after {after:?}");
    assert!(cycles >= 100, "only {cycles} cycles within the budget");
    assert!(after.fds <= before.fds, "fds grew: {before:?} -> {after:?}");
    assert!(
        after.threads <= before.threads + 4,
        "threads grew: {before:?} -> {after:?}"
    );
    assert!(
        after.cgroup_dirs <= before.cgroup_dirs,
        "cgroup directories grew: {before:?} -> {after:?}"
    );
    assert!(
        after.processes <= before.processes,
        "processes grew: {before:?} -> {after:?}"
    );
    assert!(
        after.mounts <= before.mounts,
        "mounts grew: {before:?} -> {after:?}"
    );
    let c = d.client().await;
    let list = c
        .cells()
        .list(CellServiceListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.cells.is_empty(), "cells left: {:?}", list.cells);
}
