//! The daemon's configuration: the only place that holds defaults.

use std::path::PathBuf;

use clap::Parser;

pub const DEFAULT_SOCKET: &str = "/var/run/aurae/aurae.sock";
pub const DEFAULT_CA_CRT: &str = "/etc/aurae/pki/ca.crt";
pub const DEFAULT_SERVER_CRT: &str = "/etc/aurae/pki/_signed.server.crt";
pub const DEFAULT_SERVER_KEY: &str = "/etc/aurae/pki/server.key";
pub const DEFAULT_RUNTIME_DIR: &str = "/var/run/aurae";
pub const DEFAULT_LIBRARY_DIR: &str = "/var/lib/aurae";
/// How long in-flight calls get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 10;
/// How long a stopped executable gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 10;
/// Where auraed listens as a machine's init (as the public Aurae does).
pub const DEFAULT_INIT_LISTEN: &str = "[::]:8080";
/// How long Start waits for a guest's auraed to answer (TCG is slow).
pub const DEFAULT_VM_BOOT_TIMEOUT_SECS: u64 = 90;
/// How long Stop waits for a guest to power off after the ACPI request.
pub const DEFAULT_VM_STOP_TIMEOUT_SECS: u64 = 20;
/// The QEMU binary (found on PATH, else in the project's cache: see
/// scripts/guest-image).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
pub const DEFAULT_QEMU_CACHE: &str = "/var/cache/aurae-dev/bin/qemu-system-x86_64";
/// The Kubernetes CRI socket, when `--cri-socket` is given without a path.
pub const DEFAULT_CRI_SOCKET: &str = "/run/aurae/cri.sock";
pub const DEFAULT_REGISTRY_CONFIG_DIR: &str = "/etc/aurae/certs.d";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Where CNI plugins are looked for, in order: the upstream default, then
/// where Debian's containernetworking-plugins puts them.
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin:/usr/lib/cni";

/// auraed: the Aurae node daemon. Runs and isolates workloads (cells, VMs)
/// on this machine and serves the Aurae v0 gRPC API with mutual TLS.
#[derive(Debug, Clone, Parser)]
#[command(name = "auraed", version, about, long_about = None)]
pub struct Config {
    /// Where to listen: a unix socket path, or IP:PORT to listen on TCP
    /// instead (e.g. 127.0.0.1:8080 or [::]:8080). Mutual TLS either way.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: String,

    /// Serve Prometheus metrics (cells' cgroup stats under cAdvisor's names,
    /// the daemon's gRPC calls) at http://ADDR/metrics, plain HTTP without
    /// authentication: keep it on loopback or a private network, e.g.
    /// 127.0.0.1:9464. Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// CA certificate (PEM) that client certificates must chain to.
    #[arg(long, default_value = DEFAULT_CA_CRT)]
    pub ca_crt: PathBuf,

    /// The server's certificate (PEM), signed by the CA, for the name
    /// server.unsafe.aurae.io.
    #[arg(long, default_value = DEFAULT_SERVER_CRT)]
    pub server_crt: PathBuf,

    /// The server certificate's private key (PEM).
    #[arg(long, default_value = DEFAULT_SERVER_KEY)]
    pub server_key: PathBuf,

    /// Runtime state of this run (sockets, VM control sockets, records of
    /// cells and executables; usually a tmpfs, gone with a reboot).
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,

    /// Persistent state (VM definitions, images), and executables' output
    /// (`output/`: on disk, so that it is not unreclaimable memory charged
    /// to the cells; removed with its executable, and at start-up once no
    /// record in --runtime-dir names it).
    #[arg(long, default_value = DEFAULT_LIBRARY_DIR)]
    pub library_dir: PathBuf,

    /// Do not generate a development PKI when no certificate files exist.
    #[arg(long)]
    pub no_auto_pki: bool,

    /// Cgroup path (relative to each hierarchy's root) under which cells
    /// are created. Default: `<the daemon's own cgroup>/aurae`.
    #[arg(long)]
    pub cgroup_root: Option<String>,

    /// Seconds a stopped executable gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = DEFAULT_STOP_GRACE_SECS)]
    pub stop_grace_secs: u64,

    /// Run as the machine's init: mount the kernel filesystems, set up
    /// cgroup2, modules, hostname and network, reap orphans, listen on
    /// TCP [::]:8080 unless --socket says otherwise, power off at the end.
    /// Implied when auraed is PID 1.
    #[arg(long)]
    pub init: bool,

    /// The QEMU binary for VMs. Default: qemu-system-x86_64 on PATH, else
    /// the copy scripts/guest-image unpacks.
    #[arg(long)]
    pub qemu: Option<PathBuf>,

    /// VM acceleration: kvm, tcg, or auto (KVM only if /dev/kvm really
    /// runs a stock guest; otherwise TCG).
    #[arg(long, default_value = "auto")]
    pub vm_accel: String,

    /// Seconds Start waits for a guest's auraed to accept mTLS.
    #[arg(long, default_value_t = DEFAULT_VM_BOOT_TIMEOUT_SECS)]
    pub vm_boot_timeout_secs: u64,

    /// Seconds Stop waits for a guest to power off before quitting QEMU.
    #[arg(long, default_value_t = DEFAULT_VM_STOP_TIMEOUT_SECS)]
    pub vm_stop_timeout_secs: u64,

    /// What happens to workloads when the daemon stops (SIGTERM/SIGINT):
    /// `keep` leaves cells and executables running, recorded under
    /// --runtime-dir, and the next auraed started with the same directories
    /// and cgroup root re-adopts them (as containerd does); `free` stops
    /// every executable and frees every cell. As PID 1 (a VM guest) auraed
    /// always frees before powering off. A crash or `kill -9` is always
    /// `keep`.
    #[arg(long, value_enum, default_value = "keep")]
    pub on_exit: crate::services::cells::OnExit,

    /// Output kept per executable and channel (stdout, stderr), in bytes
    /// (suffixes K, M, G). Older lines are rotated away; a reader that
    /// falls behind is told how many it missed.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub output_cap: u64,

    /// Authorization policy (TOML): which client certificate identities
    /// may call which methods on which cells (README "Authorization").
    /// Without it every certificate signed by the CA may do everything.
    /// Reloaded on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub authz_policy: Option<PathBuf>,
    /// Serve the Kubernetes CRI (runtime.v1 RuntimeService and ImageService)
    /// on this unix socket, plain gRPC (kubelet speaks no TLS; mode 0660 is
    /// the guard). `--cri-socket` alone: /run/aurae/cri.sock. Off by default.
    #[arg(long, num_args = 0..=1, default_missing_value = DEFAULT_CRI_SOCKET, value_name = "PATH")]
    pub cri_socket: Option<PathBuf>,

    /// Registry mirrors and plain-HTTP registries for CRI image pulls, as
    /// containerd reads them: `<dir>/<registry>/hosts.toml`.
    #[arg(long, default_value = DEFAULT_REGISTRY_CONFIG_DIR)]
    pub registry_config_dir: PathBuf,

    /// CNI network configurations for CRI pods (NetworkReady in Status).
    #[arg(long, default_value = DEFAULT_CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,

    /// Where the CRI streaming server (Exec, Attach, PortForward URLs)
    /// listens: plain HTTP with SPDY upgrades, so loopback only by default;
    /// port 0 picks a free port (the URLs name the bound one).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub cri_streaming_addr: std::net::SocketAddr,

    /// Directories of CNI plugin executables, colon-separated, searched in
    /// order (also the plugins' CNI_PATH).
    #[arg(long, default_value = DEFAULT_CNI_BIN_DIR, value_name = "DIRS")]
    pub cni_bin_dir: String,

    /// Log more: -v for debug, -vv for trace. RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands: tools that run instead of the daemon.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The node's PKI.
    #[command(subcommand)]
    Pki(crate::authz::issue::PkiCommand),
}

impl Config {
    pub fn log_level(&self) -> tracing::Level {
        match self.verbose {
            0 => tracing::Level::INFO,
            1 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        }
    }
}

/// `16M`, `512K`, `1G` or plain bytes; at least the shim's minimum.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 16M"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    let min = crate::host::shim::format::MIN_OUTPUT_CAP;
    if v < min {
        return Err(format!("must be at least {min} bytes (256K)"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_kept_by_default() {
        let c = Config::try_parse_from(["auraed"]).expect("defaults parse");
        assert_eq!(c.on_exit, crate::services::cells::OnExit::Keep);
        assert_eq!(c.output_cap, crate::host::shim::format::DEFAULT_OUTPUT_CAP);
        let c = Config::try_parse_from(["auraed", "--on-exit", "free", "--output-cap", "1M"])
            .expect("flags parse");
        assert_eq!(c.on_exit, crate::services::cells::OnExit::Free);
        assert_eq!(c.output_cap, 1 << 20);
    }

    #[test]
    fn cri_is_off_unless_asked_for() {
        let c = Config::try_parse_from(["auraed"]).expect("defaults parse");
        assert_eq!(c.cri_socket, None);
        // The streaming server: loopback, any free port, unless told.
        assert_eq!(c.cri_streaming_addr.to_string(), "127.0.0.1:0");
        let c = Config::try_parse_from(["auraed", "--cri-streaming-addr", "127.0.0.1:10010"])
            .expect("addr");
        assert_eq!(c.cri_streaming_addr.port(), 10010);
        let c = Config::try_parse_from(["auraed", "--cri-socket", "-v"]).expect("bare flag");
        assert_eq!(c.cri_socket, Some(PathBuf::from(DEFAULT_CRI_SOCKET)));
        let c = Config::try_parse_from(["auraed", "--cri-socket", "/tmp/x.sock"]).expect("path");
        assert_eq!(c.cri_socket, Some(PathBuf::from("/tmp/x.sock")));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("262144"), Ok(256 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1K").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
