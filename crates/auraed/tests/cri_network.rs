//! CRI pod networking end to end with the real CNI plugins (Debian's
//! containernetworking-plugins in /usr/lib/cni): a bridge + host-local +
//! portmap network of this test's own (bridge name, subnet and network
//! name unique to the test; never critest's critest0 / 10.88.77.0/24),
//! pods get an address, the host reaches it, a hostPort forwards
//! 127.0.0.1 to a listener in the pod, the hostname, sysctls and
//! resolv.conf/hosts files are set, Stop runs DEL, Remove leaves nothing;
//! failures (a broken plugin, a node-wide sysctl) leave nothing either.
//!
//! The kernel state the plugins make outside the test's directories (the
//! bridge, iptables rules and chains, ip_forward) is undone by [`Host`]'s
//! drop, also when an assertion fails.

mod common;

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use auraed_cri::proto::{self, runtime_service_client::RuntimeServiceClient};
use common::Daemon;
use tonic::{transport::Channel, Code};

const PLUGINS: &str = "/usr/lib/cni";
const HOLDER_ARG: &str = "__aurae_cell_holder__";

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).stderr(Stdio::null()).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}

fn nat_rules() -> Vec<String> {
    sh("iptables-save", &["-t", "nat"])
        .1
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What the test's network puts on the host, and its undoing.
struct Host {
    bridge: String,
    network: String,
    subnet_prefix: String,
    netns_dir: PathBuf,
    nat_before: Vec<String>,
    ip_forward_before: String,
}

impl Host {
    fn new(netns_dir: PathBuf) -> Host {
        // Unique per test (tests of this file may run in parallel).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        Host {
            bridge: format!("aut{}x{k}", pid % 100_000),
            network: format!("aurae-net-test-{pid}-{k}"),
            subnet_prefix: format!("10.231.{}.", (pid * 4 + k) % 250),
            netns_dir,
            nat_before: nat_rules(),
            ip_forward_before: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap_or_default(),
        }
    }

    fn subnet(&self) -> String {
        format!("{}0/24", self.subnet_prefix)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Namespaces a failed test left pinned (the daemon's dir cannot be
        // removed while they are mounted).
        if let Ok(rd) = std::fs::read_dir(&self.netns_dir) {
            for e in rd.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // Rules the plugins made for our network (their comments name it),
        // and the per-pod chains those rules jump to.
        let mut chains = Vec::new();
        for r in nat_rules() {
            if r.starts_with("-A ") && r.contains(&self.network) {
                let args: Vec<String> = shell_words(&r[3..]);
                if let Some(i) = args.iter().position(|a| a == "-j") {
                    if let Some(c) = args.get(i + 1).filter(|c| c.starts_with("CNI-")) {
                        if !c.starts_with("CNI-HOSTPORT-") {
                            chains.push(c.clone());
                        }
                    }
                }
                let mut del = vec!["-t".to_owned(), "nat".to_owned(), "-D".to_owned()];
                del.extend(args);
                let _ = Command::new("iptables").args(&del).status();
            }
        }
        for c in &chains {
            let _ = sh("iptables", &["-t", "nat", "-F", c]);
            let _ = sh("iptables", &["-t", "nat", "-X", c]);
        }
        // portmap's shared chains, if this test made them and no pod of
        // anyone's uses a host port now (portmap makes them again).
        let now = nat_rules();
        let dnat_empty = !now.iter().any(|r| r.starts_with("-A CNI-HOSTPORT-DNAT "));
        let ours = |c: &str| {
            !self
                .nat_before
                .iter()
                .any(|r| r.starts_with(&format!(":{c} ")))
        };
        if dnat_empty {
            for c in [
                "CNI-HOSTPORT-DNAT",
                "CNI-HOSTPORT-SETMARK",
                "CNI-HOSTPORT-MASQ",
            ] {
                if !ours(c) {
                    continue;
                }
                for r in &now {
                    if r.starts_with("-A ") && r.contains(&format!("-j {c}")) {
                        let mut del = vec!["-t".to_owned(), "nat".to_owned(), "-D".to_owned()];
                        del.extend(shell_words(&r[3..]));
                        let _ = Command::new("iptables").args(&del).status();
                    }
                }
                let _ = sh("iptables", &["-t", "nat", "-F", c]);
                let _ = sh("iptables", &["-t", "nat", "-X", c]);
            }
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
        if !self.ip_forward_before.is_empty() {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward_before);
        }
    }
}

/// Splits an iptables-save rule into arguments (double quotes group).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The tests of this file run one at a time: they share the host's nat
/// table (portmap's CNI-HOSTPORT-* chains, which a test removes at its end
/// when it made them) and ip_forward, which one test's cleanup would pull
/// from under another's pod.
static SERIAL: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Default::default);

struct Net {
    // Dropped first: undoes the host state while the daemon still runs.
    host: Host,
    daemon: Daemon,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    conf_dir: PathBuf,
    ipam_dir: PathBuf,
    // Dropped last: the next test starts once this one's host state is undone.
    _serial: tokio::sync::OwnedMutexGuard<()>,
}

fn conflist(host: &Host, ipam: &Path, extra: &str) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{name}",
  "plugins": [
    {{
      "type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "ipam": {{
        "type": "host-local", "dataDir": "{ipam}",
        "ranges": [[{{ "subnet": "{subnet}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}{extra}
  ]
}}"#,
        name = host.network,
        bridge = host.bridge,
        ipam = ipam.display(),
        subnet = host.subnet(),
    )
}

async fn start() -> Option<Net> {
    if !Path::new(PLUGINS).join("bridge").exists() {
        eprintln!("skipped: no CNI plugins in {PLUGINS} (containernetworking-plugins)");
        return None;
    }
    let serial = SERIAL.clone().lock_owned().await;
    let dir = tempfile::Builder::new()
        .prefix("auraed-cri-net-")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("cri.sock");
    let conf_dir = dir.path().join("net.d");
    let ipam_dir = dir.path().join("ipam");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let daemon = Daemon::start_with(
        None,
        &[
            "--cri-socket",
            socket.to_str().expect("utf-8"),
            "--cni-conf-dir",
            conf_dir.to_str().expect("utf-8"),
            // A list: the first does not exist.
            "--cni-bin-dir",
            &format!("{}/no-plugins:{PLUGINS}", dir.path().display()),
        ],
    )
    .await;
    let host = Host::new(daemon.dir.path().join("run/cri/netns"));
    std::fs::write(
        conf_dir.join("10-test.conflist"),
        conflist(&host, &ipam_dir, ""),
    )
    .expect("conflist");
    Some(Net {
        host,
        daemon,
        _dir: dir,
        socket,
        conf_dir,
        ipam_dir,
        _serial: serial,
    })
}

async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tonic::transport::Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(s).await?,
                ))
            }
        }))
        .await
        .expect("connect to the CRI socket")
}

fn pod_config(name: &str) -> proto::PodSandboxConfig {
    proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "net-test".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

async fn run(
    rt: &mut RuntimeServiceClient<Channel>,
    config: proto::PodSandboxConfig,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(proto::RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> proto::PodSandboxStatusResponse {
    rt.pod_sandbox_status(proto::PodSandboxStatusRequest {
        pod_sandbox_id: id.to_owned(),
        verbose: true,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
}

/// The holder whose network namespace is the pinned `netns` file.
fn holder_of(netns: &Path) -> i32 {
    let ino = std::fs::metadata(netns).expect("pinned netns").ino();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let same = std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino);
        let holder = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(HOLDER_ARG));
        if same && holder {
            return pid;
        }
    }
    panic!("no holder in the network namespace {}", netns.display());
}

fn in_pod(pid: i32, ns: &str, args: &[&str]) -> String {
    let t = pid.to_string();
    let mut a = vec!["-t", t.as_str(), ns];
    a.extend_from_slice(args);
    let (ok, out) = sh("nsenter", &a);
    assert!(ok, "nsenter {a:?} failed");
    out
}

fn mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

fn veths_on(bridge: &str) -> usize {
    sh("ip", &["-o", "link", "show", "master", bridge])
        .1
        .lines()
        .count()
}

fn ipam_ips(dir: &Path, network: &str) -> Vec<String> {
    std::fs::read_dir(dir.join(network))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

async fn cell_names(d: &Daemon) -> Vec<String> {
    d.client()
        .await
        .cells()
        .list(aurae_client::proto::cells::CellServiceListRequest::default())
        .await
        .expect("List")
        .into_inner()
        .cells
        .into_iter()
        .filter_map(|c| c.cell.map(|c| c.name))
        .collect()
}

#[tokio::test]
async fn pods_get_a_cni_network_and_lose_it() {
    let Some(net) = start().await else { return };
    let mut rt = RuntimeServiceClient::new(channel(&net.socket).await);
    let host_port = 23_000 + (std::process::id() % 2_000) as i32;
    let mut config = pod_config(&common::unique("netpod"));
    config.hostname = "net-test-host".into();
    config.dns_config = Some(proto::DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec!["svc.example".into()],
        options: vec!["ndots:3".into()],
    });
    config.port_mappings = vec![
        proto::PortMapping {
            protocol: proto::Protocol::Tcp as i32,
            container_port: 8080,
            host_port,
            host_ip: String::new(),
        },
        // Without a host port: nothing for portmap.
        proto::PortMapping {
            protocol: proto::Protocol::Tcp as i32,
            container_port: 9090,
            host_port: 0,
            host_ip: String::new(),
        },
    ];
    config.linux = Some(proto::LinuxPodSandboxConfig {
        sysctls: [
            (
                "net.ipv4.ip_unprivileged_port_start".to_owned(),
                "81".to_owned(),
            ),
            ("kernel.shm_rmid_forced".to_owned(), "1".to_owned()),
            ("fs.mqueue.msg_max".to_owned(), "100".to_owned()),
        ]
        .into(),
        ..Default::default()
    });
    let t0 = std::time::Instant::now();
    let id = run(&mut rt, config).await.expect("RunPodSandbox");
    eprintln!("RunPodSandbox with CNI: {:?}", t0.elapsed());

    // The pod's address, from the CNI result, in the test's subnet.
    let st = status(&mut rt, &id).await;
    let ip = st
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(
        ip.starts_with(&net.host.subnet_prefix),
        "pod IP {ip:?} not in {}",
        net.host.subnet()
    );
    let info: serde_json::Value =
        serde_json::from_str(st.info.get("info").expect("verbose info")).expect("json");
    // CNI CHECK ran, through every plugin up to portmap; portmap 1.1.1's
    // CHECK is unreliable (it checks ip6tables for an IPv4-only pod, and
    // compares its DNAT rules as text: `-s 10.x.y.2/24` is listed by
    // iptables as `10.x.y.0/24`), so its verdict is not asserted (a plugin
    // bug; kubelet's runtimes do not CHECK). Any other plugin must pass.
    let check = info["network"]["cniCheck"].as_str().unwrap_or_default();
    assert!(
        check == "ok" || check.starts_with("CNI plugin portmap CHECK:"),
        "{info}"
    );
    let netns = PathBuf::from(info["network"]["netns"].as_str().expect("netns"));
    assert!(mounted(&netns), "{} is not a mount", netns.display());
    let holder = holder_of(&netns);

    // Inside: eth0 has it; hostname and sysctls are the pod's.
    let addrs = in_pod(holder, "-n", &["ip", "-o", "-4", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("{ip}/24")), "{addrs}");
    let lo = in_pod(holder, "-n", &["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "lo is down in the pod: {lo}");
    assert_eq!(in_pod(holder, "-u", &["hostname"]).trim(), "net-test-host");
    assert_eq!(
        in_pod(
            holder,
            "-n",
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        )
        .trim(),
        "81"
    );
    assert_eq!(
        in_pod(holder, "-i", &["cat", "/proc/sys/kernel/shm_rmid_forced"]).trim(),
        "1"
    );
    assert_eq!(
        in_pod(holder, "-i", &["cat", "/proc/sys/fs/mqueue/msg_max"]).trim(),
        "100"
    );
    let host_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .unwrap_or_default();
    assert_ne!(host_start.trim(), "81", "the host's sysctl changed");

    // The files containers bind-mount.
    let files = net.daemon.dir.path().join("run/cri/sandboxes").join(&id);
    let read = |f: &str| std::fs::read_to_string(files.join(f)).unwrap_or_default();
    assert_eq!(read("hostname"), "net-test-host\n");
    assert_eq!(
        read("resolv.conf"),
        "search svc.example\nnameserver 192.0.2.53\noptions ndots:3\n"
    );
    assert!(read("hosts").contains(&format!("{ip}\tnet-test-host\n")));
    assert!(read("hosts").contains("127.0.0.1\tlocalhost\n"));

    // The host reaches the pod, and 127.0.0.1:<hostPort> reaches a
    // listener in it.
    let (ok, _) = sh("busybox", &["ping", "-c", "1", "-W", "3", &ip]);
    assert!(ok, "the host cannot ping {ip}");
    let script = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(1)\ns.settimeout(20)\nc,_=s.accept()\nc.sendall(b'pong-from-pod')\nc.close()\n";
    let mut listener = Command::new("nsenter")
        .args(["-t", &holder.to_string(), "-n", "python3", "-c", script])
        .stdout(Stdio::null())
        .spawn()
        .expect("listener");
    let mut got = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", host_port as u16)),
        )
        .await
        {
            use tokio::io::AsyncReadExt;
            let mut b = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut b)).await;
            got = String::from_utf8_lossy(&b).into_owned();
            if !got.is_empty() {
                break;
            }
        }
    }
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(got, "pong-from-pod", "127.0.0.1:{host_port} -> pod:8080");

    // Stats: the cell's cgroup and eth0's counters.
    let stats = rt
        .pod_sandbox_stats(proto::PodSandboxStatsRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .expect("linux stats");
    let eth0 = stats
        .network
        .as_ref()
        .and_then(|n| n.default_interface.clone())
        .expect("eth0 stats");
    assert_eq!(eth0.name, "eth0");
    assert!(eth0.rx_bytes.map(|v| v.value).unwrap_or(0) > 0, "{eth0:?}");
    assert!(eth0.tx_bytes.map(|v| v.value).unwrap_or(0) > 0, "{eth0:?}");
    assert!(stats.process.and_then(|p| p.process_count).map(|v| v.value) >= Some(1));
    assert!(stats.memory.and_then(|m| m.working_set_bytes).is_some());
    assert!(stats.cpu.and_then(|c| c.usage_core_nano_seconds).is_some());
    let listed = rt
        .list_pod_sandbox_stats(proto::ListPodSandboxStatsRequest::default())
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);

    assert_eq!(ipam_ips(&net.ipam_dir, &net.host.network), vec![ip.clone()]);
    assert_eq!(veths_on(&net.host.bridge), 1);

    // Stop: DEL (address released, veth gone); twice is fine.
    let t0 = std::time::Instant::now();
    for _ in 0..2 {
        rt.stop_pod_sandbox(proto::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    }
    eprintln!("StopPodSandbox (DEL + free) twice: {:?}", t0.elapsed());
    let st = status(&mut rt, &id).await.status.expect("status");
    assert_eq!(
        st.network.map(|n| n.ip),
        Some(String::new()),
        "no IP once DEL ran"
    );
    assert!(ipam_ips(&net.ipam_dir, &net.host.network).is_empty());
    assert_eq!(veths_on(&net.host.bridge), 0);
    assert!(!nat_rules().iter().any(|r| r.contains(&id[..12])));

    // Remove: no mount, no netns file, no pod files.
    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    assert!(!mounted(&netns));
    assert!(!netns.exists());
    assert!(!files.exists());
    assert!(cell_names(&net.daemon).await.is_empty());
}

#[tokio::test]
async fn failed_setups_leave_nothing() {
    let Some(net) = start().await else { return };
    let mut rt = RuntimeServiceClient::new(channel(&net.socket).await);

    // A node-wide sysctl: refused before anything is made.
    let mut c = pod_config(&common::unique("badsysctl"));
    c.linux = Some(proto::LinuxPodSandboxConfig {
        sysctls: [("kernel.pid_max".to_owned(), "100000".to_owned())].into(),
        ..Default::default()
    });
    let e = run(&mut rt, c).await.expect_err("node-wide sysctl");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // A plugin that fails after the bridge made its part: ADD fails, the
    // bridge's part is deleted, the cell freed, the namespace unpinned.
    std::fs::write(
        net.conf_dir.join("00-broken.conflist"),
        conflist(
            &net.host,
            &net.ipam_dir,
            r#", { "type": "no-such-plugin" }"#,
        ),
    )
    .expect("conflist");
    let e = run(&mut rt, pod_config(&common::unique("badcni")))
        .await
        .expect_err("a missing plugin");
    assert!(e.message().contains("no-such-plugin"), "{e}");
    assert!(cell_names(&net.daemon).await.is_empty());
    assert!(ipam_ips(&net.ipam_dir, &net.host.network).is_empty());
    assert_eq!(veths_on(&net.host.bridge), 0);
    let netns_dir = net.daemon.dir.path().join("run/cri/netns");
    let left: Vec<_> = std::fs::read_dir(&netns_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&netns_dir.display().to_string()));
    assert!(rt
        .list_pod_sandbox(proto::ListPodSandboxRequest::default())
        .await
        .expect("List")
        .into_inner()
        .items
        .is_empty());
    std::fs::remove_file(net.conf_dir.join("00-broken.conflist")).expect("rm");

    // A hostNetwork pod: no CNI, the host's name and resolv.conf.
    let mut c = pod_config(&common::unique("hostnet"));
    c.hostname = "ignored".into();
    c.linux = Some(proto::LinuxPodSandboxConfig {
        security_context: Some(proto::LinuxSandboxSecurityContext {
            namespace_options: Some(proto::NamespaceOption {
                network: proto::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = run(&mut rt, c).await.expect("hostNetwork pod");
    let st = status(&mut rt, &id).await;
    assert_eq!(
        st.status.and_then(|s| s.network).map(|n| n.ip),
        Some(String::new())
    );
    let files = net.daemon.dir.path().join("run/cri/sandboxes").join(&id);
    let host_name = nix::unistd::gethostname().expect("hostname");
    assert_eq!(
        std::fs::read_to_string(files.join("hostname")).unwrap_or_default(),
        format!("{}\n", host_name.to_string_lossy())
    );
    if let Ok(r) = std::fs::read_to_string("/etc/resolv.conf") {
        assert_eq!(
            std::fs::read_to_string(files.join("resolv.conf")).ok(),
            Some(r)
        );
    }
    assert_eq!(veths_on(&net.host.bridge), 0);
    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .expect("RemovePodSandbox");
    assert!(!files.exists());
}

#[tokio::test]
async fn del_works_after_the_holder_and_the_daemon_are_gone() {
    let Some(mut net) = start().await else { return };
    let mut rt = RuntimeServiceClient::new(channel(&net.socket).await);
    let id = run(&mut rt, pod_config(&common::unique("orphan")))
        .await
        .expect("RunPodSandbox");
    let info: serde_json::Value = serde_json::from_str(
        status(&mut rt, &id)
            .await
            .info
            .get("info")
            .expect("verbose info"),
    )
    .expect("json");
    let netns = PathBuf::from(info["network"]["netns"].as_str().expect("netns"));
    let holder = holder_of(&netns);
    assert_eq!(ipam_ips(&net.ipam_dir, &net.host.network).len(), 1);

    // The holder dies and the daemon crashes: the pinned namespace keeps
    // the pod's interface, and the record its CNI result.
    common::signal(holder, libc::SIGKILL);
    net.daemon.restart(libc::SIGKILL, None).await;
    let mut rt = RuntimeServiceClient::new(channel(&net.socket).await);
    assert!(mounted(&netns));
    assert_eq!(veths_on(&net.host.bridge), 1);

    rt.stop_pod_sandbox(proto::StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await
    .expect("StopPodSandbox");
    assert!(ipam_ips(&net.ipam_dir, &net.host.network).is_empty());
    assert_eq!(veths_on(&net.host.bridge), 0);
    rt.remove_pod_sandbox(proto::RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .expect("RemovePodSandbox");
    assert!(!mounted(&netns) && !netns.exists());
}
