//! Create's checks: every refusal names the field.

use std::path::{Path, PathBuf};

use aurae_proto::vms::VirtualMachine;

use crate::{
    host::hypervisor::Drive,
    services::cells::validation::{CellName, Invalid},
};

pub const MIN_MEM_MB: u32 = 64;
/// VM ids become the cell `vm-<id>`; keep that within a component.
pub const MAX_ID: usize = 60;

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

pub fn validate(m: VirtualMachine, host_cpus: u32) -> Result<VmConfig, Invalid> {
    let id = if m.id.is_empty() {
        generated_id()
    } else {
        m.id.clone()
    };
    if id.contains('/') || id.len() > MAX_ID {
        return Err(invalid(
            "machine.id",
            format!("{id:?}: must be one name component of 1..={MAX_ID} characters"),
        ));
    }
    CellName::parse("machine.id", &id)?;
    if m.mem_size_mb < MIN_MEM_MB {
        return Err(invalid(
            "machine.mem_size_mb",
            format!("must be >= {MIN_MEM_MB}, got {}", m.mem_size_mb),
        ));
    }
    if m.vcpu_count < 1 || m.vcpu_count > host_cpus {
        return Err(invalid(
            "machine.vcpu_count",
            format!(
                "must be 1..={host_cpus} (this host's cpus), got {}",
                m.vcpu_count
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
        })
    };
    let mut drives = Vec::new();
    for d in m.drive_mounts {
        let path = readable_file("machine.drive_mounts.host_path", &d.host_path)?;
        if !d.vm_path.is_empty() && !d.vm_path.starts_with('/') {
            return Err(invalid(
                "machine.drive_mounts.vm_path",
                format!("{:?}: must be an absolute path", d.vm_path),
            ));
        }
        drives.push(Drive {
            path,
            writable: d.is_writeable,
        });
    }
    if let Some(a) = m.kernel_args.iter().find(|a| a.contains(['\n', '\0'])) {
        return Err(invalid(
            "machine.kernel_args",
            format!("{a:?}: must not contain newlines or NULs"),
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

fn readable_file(field: &'static str, p: &str) -> Result<PathBuf, Invalid> {
    if p.is_empty() {
        return Err(invalid(field, "is required"));
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
    use aurae_proto::vms::RootDrive;

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

    fn field(m: VirtualMachine) -> &'static str {
        validate(m, 2).unwrap_err().field
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
        assert!(validate(vm(|m| m.id.clear()), 2)
            .unwrap()
            .id
            .starts_with("vm-"));
    }
}
