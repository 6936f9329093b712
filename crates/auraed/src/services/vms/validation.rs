//! Create's checks: every refusal names the field.

use std::path::{Path, PathBuf};

use aurae_proto::vms::VirtualMachine;

use crate::{
    host::hypervisor::{kernel_cmdline, Drive, GuestMount, KERNEL_CMDLINE_MAX},
    services::cells::validation::{CellName, Invalid},
};

pub const MIN_MEM_MB: u32 = 64;
/// VM ids become the cell `vm-<id>`; keep that within a component.
pub const MAX_ID: usize = 60;
/// Entries of `kernel_args`, at most. The whole command line is bounded
/// too: [`KERNEL_CMDLINE_MAX`] bytes with its NUL.
pub const MAX_KERNEL_ARGS: usize = 64;
/// Drive mounts of one VM, at most: each is a virtio-blk PCI device on
/// q35's root bus (32 slots, shared with the NIC and the chipset).
pub const MAX_DRIVE_MOUNTS: usize = 16;
/// Host paths (kernel, root, drives), at most: the kernel's PATH_MAX with
/// its NUL.
pub const MAX_HOST_PATH: usize = 4095;
/// `fs_type` of a drive mount, at most (`ext4`, `xfs`, `squashfs`…).
pub const MAX_FS_TYPE: usize = 32;

/// What the host has, against which a VM's size is checked.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// CPUs this process may use: the most vCPUs a VM gets.
    pub cpus: u32,
    /// MemTotal, in MiB: the most memory a VM gets.
    pub mem_mb: u64,
}

impl Host {
    /// This host, now: the CPUs this process may run on, /proc/meminfo's
    /// MemTotal (unknown: no memory bound beyond the field's type).
    pub fn current() -> Self {
        let cpus = std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .unwrap_or(1);
        let mem_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| mem_total_mb(&t))
            .unwrap_or(u64::MAX);
        Self { cpus, mem_mb }
    }
}

/// MemTotal of a /proc/meminfo text, in MiB.
fn mem_total_mb(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// How the guest gets its root filesystem.
#[derive(Debug, Clone)]
pub enum Root {
    /// A cpio archive (gzip or plain): loaded as the initramfs.
    Initramfs(PathBuf),
    /// Anything else: a raw disk image, the guest's /dev/vda.
    Disk(Drive),
}

/// A VM definition that passed validation.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub id: String,
    pub mem_mb: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub kernel_args: Vec<String>,
    pub root: Root,
    pub root_path: PathBuf,
    pub drives: Vec<Drive>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

pub fn validate(m: VirtualMachine, host: Host) -> Result<VmConfig, Invalid> {
    let id = if m.id.is_empty() {
        generated_id()
    } else {
        m.id.clone()
    };
    if id.contains('/') || id.len() > MAX_ID {
        return Err(invalid(
            "machine.id",
            format!(
                "{:?}: must be one name component of 1..={MAX_ID} characters",
                clip(&id)
            ),
        ));
    }
    CellName::parse("machine.id", &id)?;
    if m.mem_size_mb < MIN_MEM_MB {
        return Err(invalid(
            "machine.mem_size_mb",
            format!("must be >= {MIN_MEM_MB}, got {}", m.mem_size_mb),
        ));
    }
    if u64::from(m.mem_size_mb) > host.mem_mb {
        return Err(invalid(
            "machine.mem_size_mb",
            format!(
                "must be <= {} (this host's memory, MiB), got {}",
                host.mem_mb, m.mem_size_mb
            ),
        ));
    }
    let host_cpus = host.cpus;
    if m.vcpu_count < 1 || m.vcpu_count > host_cpus {
        return Err(invalid(
            "machine.vcpu_count",
            format!(
                "must be 1..={host_cpus} (this host's cpus), got {}",
                m.vcpu_count
            ),
        ));
    }
    if m.kernel_args.len() > MAX_KERNEL_ARGS {
        return Err(invalid(
            "machine.kernel_args",
            format!(
                "at most {MAX_KERNEL_ARGS} entries, got {}",
                m.kernel_args.len()
            ),
        ));
    }
    if m.drive_mounts.len() > MAX_DRIVE_MOUNTS {
        return Err(invalid(
            "machine.drive_mounts",
            format!(
                "at most {MAX_DRIVE_MOUNTS} entries, got {}",
                m.drive_mounts.len()
            ),
        ));
    }
    let kernel = readable_file("machine.kernel_img_path", &m.kernel_img_path)?;
    let root_drive = m
        .root_drive
        .ok_or_else(|| invalid("machine.root_drive", "is required"))?;
    let root_path = readable_file("machine.root_drive.host_path", &root_drive.host_path)?;
    let root = if is_cpio(&root_path) {
        Root::Initramfs(root_path.clone())
    } else {
        Root::Disk(Drive {
            path: root_path.clone(),
            writable: root_drive.is_writeable,
            mount: None,
        })
    };
    let mut drives = Vec::new();
    for d in m.drive_mounts {
        let path = readable_file("machine.drive_mounts.host_path", &d.host_path)?;
        drives.push(Drive {
            path,
            writable: d.is_writeable,
            mount: guest_mount(&d.vm_path, &d.fs_type)?,
        });
    }
    if let Some(a) = m.kernel_args.iter().find(|a| a.contains(['\n', '\0'])) {
        return Err(invalid(
            "machine.kernel_args",
            format!("{:?}: must not contain newlines or NULs", clip(a)),
        ));
    }
    let root_disk = match &root {
        Root::Disk(d) => Some(d),
        Root::Initramfs(_) => None,
    };
    let line = kernel_cmdline(root_disk, &drives, &m.kernel_args).join(" ");
    if line.len() >= KERNEL_CMDLINE_MAX {
        return Err(invalid(
            "machine.kernel_args",
            format!(
                "the kernel command line would be {} bytes (with the console, root and \
                 drive mount parameters the node adds); the kernel takes at most {}",
                line.len(),
                KERNEL_CMDLINE_MAX - 1
            ),
        ));
    }
    Ok(VmConfig {
        id,
        mem_mb: m.mem_size_mb,
        vcpus: m.vcpu_count,
        kernel,
        kernel_args: m.kernel_args,
        root,
        root_path,
        drives,
    })
}

/// The filesystem type assumed when a drive mount names none.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// Where and how the guest mounts a drive; an empty `vm_path` only
/// attaches it. Both travel on the kernel command line
/// (`aurae.mount=<serial>:<vm_path>:<fs_type>:<ro|rw>`), hence no spaces,
/// colons or quotes, and nothing that would escape the path (`..`).
fn guest_mount(vm_path: &str, fs_type: &str) -> Result<Option<GuestMount>, Invalid> {
    if vm_path.is_empty() {
        return Ok(None);
    }
    let field = "machine.drive_mounts.vm_path";
    if !vm_path.starts_with('/') {
        return Err(invalid(
            field,
            format!("{vm_path:?}: must be an absolute path"),
        ));
    }
    if vm_path == "/" || vm_path.split('/').any(|c| c == "..") {
        return Err(invalid(
            field,
            format!("{vm_path:?}: must not be / nor contain `..`"),
        ));
    }
    if let Some(c) = vm_path
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, ':' | '"' | '\\'))
    {
        return Err(invalid(
            field,
            format!("{vm_path:?}: must not contain {c:?} (spaces, colons, quotes)"),
        ));
    }
    if vm_path.len() > MAX_VM_PATH {
        return Err(invalid(
            field,
            format!("{:?}: longer than {MAX_VM_PATH} bytes", clip(vm_path)),
        ));
    }
    let fs_type = if fs_type.is_empty() {
        DEFAULT_FS_TYPE
    } else {
        fs_type
    };
    if fs_type.len() > MAX_FS_TYPE
        || !fs_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(invalid(
            "machine.drive_mounts.fs_type",
            format!(
                "{:?}: must match [a-z0-9]{{1,{MAX_FS_TYPE}}}",
                clip(fs_type)
            ),
        ));
    }
    Ok(Some(GuestMount {
        vm_path: vm_path.to_owned(),
        fs_type: fs_type.to_owned(),
    }))
}

/// The kernel command line is a few KiB in all; one mount path gets a
/// bounded share of it.
const MAX_VM_PATH: usize = 256;

fn readable_file(field: &'static str, p: &str) -> Result<PathBuf, Invalid> {
    if p.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if p.len() > MAX_HOST_PATH {
        return Err(invalid(
            field,
            format!(
                "{:?}: longer than {MAX_HOST_PATH} bytes ({})",
                clip(p),
                p.len()
            ),
        ));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(invalid(field, format!("{p:?}: must be an absolute path")));
    }
    match std::fs::File::open(path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => Ok(path.to_owned()),
        Ok(_) => Err(invalid(field, format!("{p:?}: not a regular file"))),
        Err(e) => Err(invalid(field, format!("{p:?}: cannot be read: {e}"))),
    }
}

/// The start of a long value, for a message.
fn clip(s: &str) -> String {
    const SHOWN: usize = 64;
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// gzip magic or the cpio "newc" magic.
fn is_cpio(p: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 6];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && (head.starts_with(&[0x1f, 0x8b]) || &head == b"070701")
}

fn generated_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "vm-{:08x}{}",
        nanos ^ std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aurae_proto::vms::{DriveMount, RootDrive};

    fn vm(f: impl FnOnce(&mut VirtualMachine)) -> VirtualMachine {
        let mut m = VirtualMachine {
            id: "a".into(),
            mem_size_mb: 128,
            vcpu_count: 1,
            kernel_img_path: "/proc/self/exe".into(),
            root_drive: Some(RootDrive {
                host_path: "/proc/self/exe".into(),
                is_writeable: false,
            }),
            ..Default::default()
        };
        f(&mut m);
        m
    }

    const HOST: Host = Host {
        cpus: 2,
        mem_mb: 4096,
    };

    fn field(m: VirtualMachine) -> &'static str {
        validate(m, HOST).unwrap_err().field
    }

    fn mount(vm_path: &str, fs_type: &str) -> DriveMount {
        DriveMount {
            host_path: "/proc/self/exe".into(),
            vm_path: vm_path.into(),
            fs_type: fs_type.into(),
            is_writeable: false,
        }
    }

    #[test]
    fn drive_mounts_become_guest_mounts() {
        let c = validate(
            vm(|m| {
                m.drive_mounts = vec![
                    mount("/data/x.y", "ext4"),
                    mount("/d", ""),
                    mount("", "ext4"),
                ]
            }),
            HOST,
        )
        .unwrap();
        let mounts: Vec<_> = c.drives.iter().map(|d| d.mount.clone()).collect();
        let gm = |p: &str, t: &str| {
            Some(GuestMount {
                vm_path: p.into(),
                fs_type: t.into(),
            })
        };
        assert_eq!(
            mounts,
            vec![gm("/data/x.y", "ext4"), gm("/d", DEFAULT_FS_TYPE), None]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(field(vm(|m| m.mem_size_mb = 63)), "machine.mem_size_mb");
        assert_eq!(field(vm(|m| m.vcpu_count = 0)), "machine.vcpu_count");
        assert_eq!(field(vm(|m| m.vcpu_count = 3)), "machine.vcpu_count");
        assert_eq!(field(vm(|m| m.id = "a_b".into())), "machine.id");
        assert_eq!(
            field(vm(|m| m.kernel_img_path = "/nope".into())),
            "machine.kernel_img_path"
        );
        assert_eq!(field(vm(|m| m.root_drive = None)), "machine.root_drive");
        for bad in ["data", "/a/../b", "/", "/a b", "/a:b", "/a\"b", "/a\tb"] {
            assert_eq!(
                field(vm(|m| m.drive_mounts = vec![mount(bad, "ext4")])),
                "machine.drive_mounts.vm_path",
                "{bad:?}"
            );
        }
        for bad in ["EXT4", "ext-4", "ext4 ro", "a:b"] {
            assert_eq!(
                field(vm(|m| m.drive_mounts = vec![mount("/data", bad)])),
                "machine.drive_mounts.fs_type",
                "{bad:?}"
            );
        }
        assert!(validate(vm(|m| m.id.clear()), HOST)
            .unwrap()
            .id
            .starts_with("vm-"));
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        // Memory: up to the host's, not a 4 PiB VM.
        assert!(validate(vm(|m| m.mem_size_mb = 4096), HOST).is_ok());
        assert_eq!(field(vm(|m| m.mem_size_mb = 4097)), "machine.mem_size_mb");
        assert_eq!(
            field(vm(|m| m.mem_size_mb = u32::MAX)),
            "machine.mem_size_mb"
        );
        // Kernel arguments: a count, and the whole line within the
        // kernel's buffer (with what the node adds).
        let many = vec!["a".to_owned(); MAX_KERNEL_ARGS];
        assert!(validate(vm(|m| m.kernel_args = many.clone()), HOST).is_ok());
        let too_many = vec!["a".to_owned(); MAX_KERNEL_ARGS + 1];
        assert_eq!(
            field(vm(|m| m.kernel_args = too_many)),
            "machine.kernel_args"
        );
        assert!(validate(vm(|m| m.kernel_args = vec!["x".repeat(1900)]), HOST).is_ok());
        assert_eq!(
            field(vm(|m| m.kernel_args = vec!["x".repeat(2040)])),
            "machine.kernel_args"
        );
        let e = validate(vm(|m| m.kernel_args = vec!["x".repeat(3 << 20)]), HOST).unwrap_err();
        assert_eq!(e.field, "machine.kernel_args");
        assert!(e.reason.len() < 400, "{}", e.reason);
        // Drive mount parameters count against the same line.
        let long_mounts = (0..MAX_DRIVE_MOUNTS)
            .map(|i| mount(&format!("/{}{i}", "d".repeat(200)), "ext4"))
            .collect::<Vec<_>>();
        assert_eq!(
            field(vm(|m| m.drive_mounts = long_mounts)),
            "machine.kernel_args"
        );
        // Drive mounts: a count.
        let mounts = (0..=MAX_DRIVE_MOUNTS)
            .map(|i| mount(&format!("/d{i}"), "ext4"))
            .collect::<Vec<_>>();
        assert_eq!(
            field(vm(
                |m| m.drive_mounts = mounts[..MAX_DRIVE_MOUNTS + 1].to_vec()
            )),
            "machine.drive_mounts"
        );
        assert!(validate(
            vm(|m| m.drive_mounts = mounts[..MAX_DRIVE_MOUNTS].to_vec()),
            HOST
        )
        .is_ok());
        // Lengths: ids, host paths, fs types; messages stay short.
        let e = validate(vm(|m| m.id = "a".repeat(1 << 20)), HOST).unwrap_err();
        assert_eq!(e.field, "machine.id");
        assert!(e.reason.len() < 400, "{}", e.reason);
        let long_path = format!("/{}", "p".repeat(MAX_HOST_PATH));
        assert_eq!(
            field(vm(|m| m.kernel_img_path = long_path.clone())),
            "machine.kernel_img_path"
        );
        assert_eq!(
            field(vm(
                |m| m.root_drive.as_mut().unwrap().host_path = long_path.clone()
            )),
            "machine.root_drive.host_path"
        );
        let mut d = mount("/data", "ext4");
        d.host_path = long_path;
        assert_eq!(
            field(vm(|m| m.drive_mounts = vec![d])),
            "machine.drive_mounts.host_path"
        );
        assert_eq!(
            field(vm(
                |m| m.drive_mounts = vec![mount("/data", &"x".repeat(33))]
            )),
            "machine.drive_mounts.fs_type"
        );
        assert_eq!(
            field(vm(
                |m| m.drive_mounts = vec![mount(&format!("/{}", "v".repeat(300)), "")]
            )),
            "machine.drive_mounts.vm_path"
        );
    }

    #[test]
    fn mem_total_is_read_in_mib() {
        let meminfo = "MemTotal:       24570084 kB\nMemFree:        10960092 kB\n";
        assert_eq!(mem_total_mb(meminfo), Some(23994));
        assert_eq!(mem_total_mb("MemFree: 1 kB\n"), None);
        assert!(Host::current().mem_mb > 0);
    }
}
