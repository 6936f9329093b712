//! Hypervisor backends behind one small trait. The first drives QEMU
//! through its QMP socket; a cloud-hypervisor backend (REST over a unix
//! socket) fits the same shape: a command line to run inside the VM's
//! cell, and two control calls.
//!
//! The process itself is started and supervised by the cells machinery
//! (so the VM is bounded by a cgroup like any workload); a backend only
//! says what to run and how to ask it to stop.

pub mod qemu;

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot reach the VM's control socket {path}: {source}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VM refused {command}: {reason}")]
    Refused { command: String, reason: String },
    #[error("unknown --vm-accel {0:?} (kvm, tcg or auto)")]
    Accel(String),
    #[error("--vm-accel kvm, but KVM cannot run a stock guest here: {0}")]
    NoKvm(String),
}

/// How guest code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's portable binary translator: slow, works everywhere.
    Tcg,
}

/// A disk attached to the guest.
#[derive(Debug, Clone)]
pub struct Drive {
    pub path: PathBuf,
    pub writable: bool,
    /// Where the guest's init mounts it; None: attached only.
    pub mount: Option<GuestMount>,
}

/// A drive mount as the guest's init performs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    /// Absolute, without `..`, spaces or colons (validated at Create).
    pub vm_path: String,
    /// `[a-z0-9]+`, e.g. ext4.
    pub fs_type: String,
}

/// The serial number the host gives the `index`th drive mount (0-based,
/// in `drive_mounts` order), which the guest reads back from
/// `/sys/block/vd*/serial`. The serial, not the attach order (vdb, vdc…),
/// names the disk: PCI enumeration order is not a promise.
pub fn drive_serial(index: usize) -> String {
    format!("aurae{index}")
}

/// The kernel command line parameter that asks the guest's init to mount
/// a drive: `aurae.mount=<serial>:<vm_path>:<fs_type>:<ro|rw>`. The
/// kernel ignores it (a dotted parameter of no loaded module) and leaves
/// it in /proc/cmdline, where init reads it (crates/auraed/src/init/drives.rs).
pub fn mount_param(serial: &str, m: &GuestMount, writable: bool) -> String {
    let mode = if writable { "rw" } else { "ro" };
    format!("aurae.mount={serial}:{}:{}:{mode}", m.vm_path, m.fs_type)
}

/// The kernel's command line buffer on x86 (`COMMAND_LINE_SIZE`, with its
/// terminating NUL): QEMU refuses a longer `-append` for a bzImage that
/// says so, and an older kernel would cut it. Create checks the whole line
/// ([`kernel_cmdline`]) against it.
pub const KERNEL_CMDLINE_MAX: usize = 2048;

/// The guest kernel's command line: the console, the root disk (if the
/// root is not an initramfs), one `aurae.mount=` per drive mount, then the
/// VM's own `kernel_args`.
pub fn kernel_cmdline(
    root: Option<&Drive>,
    drives: &[Drive],
    kernel_args: &[String],
) -> Vec<String> {
    let mut cmdline = vec!["console=ttyS0".to_owned(), "panic=-1".to_owned()];
    if let Some(root) = root {
        cmdline.push("root=/dev/vda".into());
        cmdline.push(if root.writable { "rw" } else { "ro" }.into());
    }
    for (i, d) in drives.iter().enumerate() {
        if let Some(m) = &d.mount {
            cmdline.push(mount_param(&drive_serial(i), m, d.writable));
        }
    }
    cmdline.extend(kernel_args.iter().cloned());
    cmdline
}

/// Everything a backend needs to build a VM's command line.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub name: String,
    pub mem_mb: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_args: Vec<String>,
    /// The root disk, when the root is not an initramfs.
    pub root: Option<Drive>,
    pub drives: Vec<Drive>,
    /// Small files handed to the guest (fw_cfg name → host file).
    pub files: Vec<(String, PathBuf)>,
    /// Loopback port on the host forwarded to `guest_port` in the guest.
    pub host_port: u16,
    pub guest_port: u16,
    /// The VM's private folder: control socket, console log.
    pub dir: PathBuf,
    pub accel: Accel,
}

impl LaunchSpec {
    /// The guest's serial console, as the host keeps it.
    pub fn console_log(&self) -> PathBuf {
        console_log(&self.dir)
    }
}

pub fn console_log(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// The program and arguments that run the VM in the foreground.
    fn command_line(&self, spec: &LaunchSpec) -> Vec<String>;
    /// Asks the guest to shut down (ACPI power button); returns once the
    /// request is delivered, not when the guest is off.
    fn powerdown<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), HypervisorError>>;
    /// Ends the VM at once.
    fn quit<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), HypervisorError>>;
}

/// Chooses the accelerator once, at start-up. `auto` uses KVM only when
/// it can run a stock guest: /dev/kvm answers KVM_GET_API_VERSION and the
/// module behind it is kvm_intel or kvm_amd (a PVM host's kvm_pvm runs
/// only PVM-enabled guests, so a stock kernel would not boot there).
pub fn detect_accel(mode: &str) -> Result<Accel, HypervisorError> {
    match mode {
        "tcg" => Ok(Accel::Tcg),
        "kvm" => kvm_usable()
            .map(|()| Accel::Kvm)
            .map_err(HypervisorError::NoKvm),
        "auto" => Ok(match kvm_usable() {
            Ok(()) => {
                tracing::info!("VMs: KVM acceleration");
                Accel::Kvm
            }
            Err(why) => {
                tracing::info!("VMs: falling back to TCG (slow emulation): {why}");
                Accel::Tcg
            }
        }),
        other => Err(HypervisorError::Accel(other.to_owned())),
    }
}

fn kvm_usable() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != 12 {
        return Err(format!("KVM API version {version}, expected 12"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is PVM (kvm_pvm), which cannot run a stock guest".into());
    }
    if !["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists())
    {
        return Err("neither kvm_intel nor kvm_amd is loaded".into());
    }
    Ok(())
}
