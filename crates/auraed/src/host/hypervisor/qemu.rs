//! QEMU: a `q35` machine booting the kernel directly (`-kernel`, plus an
//! initramfs when the root is one), user-mode networking with one loopback
//! port forwarded to the guest daemon, the serial console to a file, and
//! QMP on a unix socket for control.
//!
//! q35 rather than microvm: it boots Debian's stock bzImage and has ACPI
//! (the power button) without extra firmware; under TCG the difference in
//! boot time is small next to the kernel's own start-up.

use std::path::{Path, PathBuf};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::{
    drive_serial, kernel_cmdline, Accel, BoxFuture, Hypervisor, HypervisorError, LaunchSpec,
};

/// TCG's translation cache defaults to 1 GiB; a small guest needs far less
/// and the VM's cgroup would count it.
const TCG_TB_SIZE_MB: u32 = 64;

#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Qemu {
    /// `explicit`, else qemu-system-x86_64 on PATH, else the project cache.
    pub fn locate(explicit: Option<&Path>) -> Self {
        use crate::config::{DEFAULT_QEMU, DEFAULT_QEMU_CACHE};
        let binary = explicit.map(Path::to_owned).unwrap_or_else(|| {
            std::env::var_os("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join(DEFAULT_QEMU))
                        .find(|p| p.is_file())
                })
                .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU_CACHE))
        });
        Self { binary }
    }
}

pub fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn command_line(&self, s: &LaunchSpec) -> Vec<String> {
        let mut a: Vec<String> = vec![self.binary.display().to_string()];
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
        push(&[
            "-name",
            &s.name,
            "-M",
            "q35",
            "-nodefaults",
            "-no-user-config",
        ]);
        push(&["-display", "none", "-no-reboot"]);
        match s.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MB}")]),
        }
        push(&["-m", &s.mem_mb.to_string(), "-smp", &s.vcpus.to_string()]);
        push(&[
            "-chardev",
            &format!("file,id=con,path={}", s.console_log().display()),
            "-serial",
            "chardev:con",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_socket(&s.dir).display()),
        ]);
        push(&[
            "-netdev",
            &format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{}",
                s.host_port, s.guest_port
            ),
            // No option ROM: we boot the kernel directly, not from the NIC.
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
        push(&["-kernel", &s.kernel.display().to_string()]);
        if let Some(initrd) = &s.initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        let cmdline = kernel_cmdline(s.root.as_ref(), &s.drives, &s.kernel_args);
        push(&["-append", &cmdline.join(" ")]);
        // Explicit devices, root first: with `-drive if=virtio` QEMU would
        // create them after every `-device`, and the guest would not find
        // its root at /dev/vda. Each drive mount carries its serial.
        let root = s.root.iter().map(|d| (d, "root".to_owned(), None));
        let mounts = s
            .drives
            .iter()
            .enumerate()
            .map(|(i, d)| (d, format!("d{i}"), Some(drive_serial(i))));
        for (d, id, serial) in root.chain(mounts) {
            let ro = if d.writable { "off" } else { "on" };
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id={id},format=raw,readonly={ro}",
                    // QEMU's option syntax escapes a comma by doubling it.
                    d.path.display().to_string().replace(',', ",,")
                ),
            ]);
            let serial = serial.map(|s| format!(",serial={s}")).unwrap_or_default();
            push(&["-device", &format!("virtio-blk-pci,drive={id}{serial}")]);
        }
        for (name, file) in &s.files {
            push(&["-fw_cfg", &format!("name={name},file={}", file.display())]);
        }
        a
    }

    fn powerdown<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(qmp(dir, "system_powerdown"))
    }

    fn quit<'a>(&'a self, dir: &'a Path) -> BoxFuture<'a, Result<(), HypervisorError>> {
        Box::pin(async move {
            match qmp(dir, "quit").await {
                // QEMU may close the socket before answering `quit`.
                Err(HypervisorError::Control { .. }) | Ok(()) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

/// One QMP exchange: greeting, capabilities negotiation, the command;
/// events that arrive meanwhile are skipped.
async fn qmp(dir: &Path, command: &str) -> Result<(), HypervisorError> {
    let path = qmp_socket(dir);
    let io_err = |source| HypervisorError::Control {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(&path).await.map_err(io_err)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // Greeting.
    lines.next_line().await.map_err(io_err)?;
    for cmd in ["qmp_capabilities", command] {
        write
            .write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
            .await
            .map_err(io_err)?;
        loop {
            let Some(line) = lines.next_line().await.map_err(io_err)? else {
                return Err(io_err(std::io::ErrorKind::UnexpectedEof.into()));
            };
            if line.contains("\"return\"") {
                break;
            }
            if line.contains("\"error\"") {
                return Err(HypervisorError::Refused {
                    command: cmd.to_owned(),
                    reason: line,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::hypervisor::{Drive, GuestMount};

    #[test]
    fn command_line_has_forward_console_and_readonly_root() {
        let q = Qemu {
            binary: "/q".into(),
        };
        let spec = LaunchSpec {
            name: "vm1".into(),
            mem_mb: 256,
            vcpus: 1,
            kernel: "/k".into(),
            initrd: None,
            kernel_args: vec!["quiet".into()],
            root: Some(Drive {
                path: "/r,oot.img".into(),
                writable: false,
                mount: None,
            }),
            drives: vec![
                Drive {
                    path: "/attached.img".into(),
                    writable: true,
                    mount: None,
                },
                Drive {
                    path: "/data.img".into(),
                    writable: false,
                    mount: Some(GuestMount {
                        vm_path: "/data".into(),
                        fs_type: "ext4".into(),
                    }),
                },
            ],
            files: vec![("opt/aurae/ca.crt".into(), "/d/ca.crt".into())],
            host_port: 4000,
            guest_port: 8080,
            dir: "/d".into(),
            accel: Accel::Tcg,
        };
        let line = q.command_line(&spec).join(" ");
        assert!(line.contains("hostfwd=tcp:127.0.0.1:4000-:8080"), "{line}");
        assert!(line.contains("path=/d/console.log"), "{line}");
        assert!(
            line.contains(
                "-drive file=/r,,oot.img,if=none,id=root,format=raw,readonly=on \
                 -device virtio-blk-pci,drive=root -drive file=/attached.img,if=none,id=d0,\
                 format=raw,readonly=off -device virtio-blk-pci,drive=d0,serial=aurae0 \
                 -drive file=/data.img,if=none,id=d1,format=raw,readonly=on \
                 -device virtio-blk-pci,drive=d1,serial=aurae1"
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "console=ttyS0 panic=-1 root=/dev/vda ro aurae.mount=aurae1:/data:ext4:ro quiet"
            ),
            "{line}"
        );
        assert!(
            line.contains("name=opt/aurae/ca.crt,file=/d/ca.crt"),
            "{line}"
        );
    }
}
