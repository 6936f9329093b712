//! auraed as a machine's init (PID 1, or `--init`).
//!
//! Before serving, [`bring_up`] makes a bare system usable: the kernel's
//! virtual filesystems, cgroup2 with the controllers delegated, the virtio
//! drivers, the VM's drive mounts (`aurae.mount=`), hostname, loopback and
//! the first NIC, and the TLS identity the host passed through QEMU fw_cfg.
//! Each step logs its failure and the next
//! one runs anyway: a guest without networking can still be debugged on its
//! serial console.
//!
//! As PID 1 we must never exit (the kernel panics): on shutdown (SIGTERM,
//! SIGINT from ctrl-alt-del, the ACPI power button) `run()` stops the cells
//! as usual, then [`power_off`] ends the machine. A panic does the same.

mod devices;
mod drives;
mod mounts;
mod net;

use std::path::Path;

pub use devices::power_button;

use crate::config::Config;

/// Where the host puts the guest's identity (`-fw_cfg name=opt/aurae/…`).
pub const FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/aurae";
/// fw_cfg item names, and the Config paths their contents go to.
pub const FW_CFG_CA: &str = "ca.crt";
pub const FW_CFG_SERVER_CRT: &str = "server.crt";
pub const FW_CFG_SERVER_KEY: &str = "server.key";

/// True when this process is the machine's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Brings the machine up. Never fails: every step logs and goes on.
/// With `--init` but not PID 1 (a container's init, a test), only what is
/// missing is mounted and delegated: the hostname, ctrl-alt-del and the
/// NICs belong to the real init, whose machine we must not reconfigure.
pub fn bring_up(config: &Config) {
    mounts::mount_all();
    if !is_pid1() {
        tracing::info!("--init without being PID 1: leaving hostname, network and modules alone");
        if let Err(e) = mounts::delegate_controllers(Path::new("/sys/fs/cgroup")) {
            tracing::warn!("cgroup2 controllers not delegated: {e}");
        }
        return;
    }
    if let Err(e) = mounts::delegate_controllers(Path::new("/sys/fs/cgroup")) {
        tracing::warn!("cgroup2 controllers not delegated: {e}");
    }
    devices::load_modules(Path::new(devices::MODULE_LIST));
    // ctrl-alt-del sends SIGINT to init instead of rebooting at once, so a
    // guest asked to reboot by its hypervisor stops its cells first.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        tracing::warn!("cannot make ctrl-alt-del a signal: {e}");
    }
    set_hostname();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    // After the modules: virtio_blk and the filesystems are loaded by now.
    drives::mount_all(&cmdline);
    net::configure(&net::IpConfig::from_cmdline(&cmdline));
    devices::install_identity(Path::new(FW_CFG_DIR), config);
}

fn set_hostname() {
    let name = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "aurae".to_owned());
    if let Err(e) = nix::unistd::sethostname(&name) {
        tracing::warn!("cannot set hostname {name:?}: {e}");
    }
}

/// Ends the machine: terminate what is left, sync, power off. Only
/// returns if the kernel refuses, which leaves us to sleep forever (exit
/// would panic the kernel).
pub fn power_off() -> ! {
    tracing::info!("init: terminating remaining processes, syncing, powering off");
    // SAFETY: kill(-1, sig) signals every process but us; no memory involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!("power off refused: {e}");
    loop {
        std::thread::park();
    }
}

/// As PID 1 a panic would panic the kernel without a word of why; log it
/// and power off instead.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!("auraed panicked as init: {info}");
        power_off();
    }));
}
