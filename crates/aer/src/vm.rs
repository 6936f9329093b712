//! `aer vm create|start|stop|free|list`

use aurae_client::{
    proto::vms::{
        DriveMount, RootDrive, VirtualMachine, VmServiceCreateRequest, VmServiceFreeRequest,
        VmServiceListRequest, VmServiceStartRequest, VmServiceStopRequest,
    },
    Client,
};
use clap::Subcommand;
use serde_json::json;

use crate::{status, Failure};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define a VM (nothing runs until `start`).
    Create(CreateArgs),
    /// Boot a VM; prints the address of the guest's auraed once it answers.
    Start { id: String },
    /// Power a VM off (ACPI, then quit after a bounded wait).
    Stop { id: String },
    /// Stop a VM if running and forget it.
    Free { id: String },
    /// List the VMs of the node.
    List,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// VM id; generated when omitted.
    #[arg(long, default_value = "")]
    id: String,
    /// Memory in MiB (>= 64).
    #[arg(long, default_value_t = 512)]
    mem_mb: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Kernel image (bzImage) on the node.
    #[arg(long)]
    kernel: String,
    /// Root: an initramfs (cpio, gzip) or a raw disk image on the node.
    #[arg(long)]
    root: String,
    /// Attach the root disk read-write.
    #[arg(long)]
    root_rw: bool,
    /// Extra disks, HOST_PATH[:VM_PATH[:FS_TYPE]] (read-only).
    #[arg(long = "drive")]
    drives: Vec<String>,
    /// Extra kernel arguments.
    #[arg(last = true)]
    kernel_args: Vec<String>,
}

pub async fn run(client: &Client, cmd: Command, as_json: bool) -> Result<(), Failure> {
    let mut vms = client.vms();
    match cmd {
        Command::Create(a) => {
            let drive_mounts = a
                .drives
                .iter()
                .map(|d| {
                    let mut p = d.splitn(3, ':');
                    DriveMount {
                        host_path: p.next().unwrap_or_default().to_owned(),
                        vm_path: p.next().unwrap_or_default().to_owned(),
                        fs_type: p.next().unwrap_or_default().to_owned(),
                        is_writeable: false,
                    }
                })
                .collect();
            let machine = VirtualMachine {
                id: a.id,
                mem_size_mb: a.mem_mb,
                vcpu_count: a.vcpus,
                kernel_img_path: a.kernel,
                kernel_args: a.kernel_args,
                root_drive: Some(RootDrive {
                    host_path: a.root,
                    is_writeable: a.root_rw,
                }),
                drive_mounts,
            };
            let r = vms
                .create(VmServiceCreateRequest {
                    machine: Some(machine),
                })
                .await
                .map_err(status)?
                .into_inner();
            print(as_json, json!({ "vm_id": r.vm_id }), &r.vm_id);
        }
        Command::Start { id } => {
            // Start answers once the guest's auraed does (seconds under
            // TCG): meanwhile a person at a terminal sees it is booting.
            let progress = boot_progress(as_json, &id);
            let r = vms.start(VmServiceStartRequest { vm_id: id }).await;
            if let Some(p) = progress {
                p.finish_and_clear();
            }
            let r = r.map_err(status)?.into_inner();
            print(
                as_json,
                json!({ "auraed_address": r.auraed_address }),
                &r.auraed_address,
            );
        }
        Command::Stop { id } => {
            vms.stop(VmServiceStopRequest { vm_id: id })
                .await
                .map_err(status)?;
        }
        Command::Free { id } => {
            vms.free(VmServiceFreeRequest { vm_id: id })
                .await
                .map_err(status)?;
        }
        Command::List => {
            let r = vms
                .list(VmServiceListRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if as_json {
                let list: Vec<_> = r
                    .machines
                    .iter()
                    .map(|m| {
                        json!({
                            "id": m.id, "status": m.status, "mem_size_mb": m.mem_size_mb,
                            "vcpu_count": m.vcpu_count, "kernel_img_path": m.kernel_img_path,
                            "root_dir_path": m.root_dir_path, "auraed_address": m.auraed_address,
                        })
                    })
                    .collect();
                println!("{}", json!(list));
            } else {
                for m in r.machines {
                    println!(
                        "{}\t{}\t{} MiB\t{} vcpu\t{}",
                        m.id,
                        m.status,
                        m.mem_size_mb,
                        m.vcpu_count,
                        if m.auraed_address.is_empty() {
                            "-"
                        } else {
                            &m.auraed_address
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

fn print(as_json: bool, v: serde_json::Value, text: &str) {
    if as_json {
        println!("{v}");
    } else {
        println!("{text}");
    }
}

/// A spinner with the seconds elapsed, on stderr, only when stderr is a
/// terminal and the output is not JSON. (The daemon does not expose the
/// guest's console over the API, so there is no console line to show.)
fn boot_progress(as_json: bool, id: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if as_json || !std::io::stderr().is_terminal() {
        return None;
    }
    let p = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        p.set_style(style);
    }
    p.set_message(format!("booting {id}: waiting for the guest's auraed"));
    p.enable_steady_tick(std::time::Duration::from_millis(100));
    Some(p)
}
