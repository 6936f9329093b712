//! `aurae.vms.v0.VmService`: validation and the gRPC edge; the lifecycle
//! lives in `state.rs`, QEMU in `crate::host::hypervisor`.

pub mod identity;
pub mod state;
pub mod validation;

use std::{path::PathBuf, sync::Arc};

use aurae_proto::vms::{
    vm_service_server::VmService, DriveMount, RootDrive, VirtualMachine, VirtualMachineV2,
    VmServiceAllocateRequest, VmServiceAllocateResponse, VmServiceCreateRequest,
    VmServiceCreateResponse, VmServiceFreeRequest, VmServiceFreeResponse, VmServiceListRequest,
    VmServiceListResponse, VmServiceStartRequest, VmServiceStartResponse, VmServiceStopRequest,
    VmServiceStopResponse,
};
use tonic::{Request, Response, Status};

use crate::{
    host::hypervisor::HypervisorError,
    services::cells::{validation::Invalid, CellsError},
};
pub use state::{VmSettings, Vms};

#[derive(Debug, thiserror::Error)]
pub enum VmsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("cannot run the VM's cell: {0}")]
    Cells(#[from] CellsError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("cannot mint the guest's certificates: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, std::io::Error),
    #[error("boot failed: {0}")]
    Boot(String),
}

#[derive(Debug, Clone)]
pub struct VmServiceImpl {
    vms: Arc<Vms>,
}

impl VmServiceImpl {
    pub fn new(vms: Arc<Vms>) -> Self {
        Self { vms }
    }
}

/// Upstream's newer VirtualMachine as the seed's: `read_only` is the
/// opposite of `is_writeable`. Upstream's `auraed_address` is the node's to
/// choose.
fn from_v2(m: VirtualMachineV2) -> Result<VirtualMachine, Invalid> {
    if !m.auraed_address.is_empty() {
        return Err(Invalid {
            field: "machine.auraed_address",
            reason: "is chosen by the node (Start and List report it): leave it empty".into(),
        });
    }
    Ok(VirtualMachine {
        id: m.id,
        mem_size_mb: m.mem_size_mb,
        vcpu_count: m.vcpu_count,
        kernel_img_path: m.kernel_img_path,
        kernel_args: m.kernel_args,
        root_drive: m.root_drive.map(|r| RootDrive {
            host_path: r.image_path,
            is_writeable: !r.read_only,
        }),
        drive_mounts: m
            .drive_mounts
            .into_iter()
            .map(|d| DriveMount {
                host_path: d.image_path,
                vm_path: d.vm_path,
                fs_type: d.fs_type,
                is_writeable: !d.read_only,
            })
            .collect(),
    })
}

/// A refusal of a translated V2 definition names upstream's field.
fn v2_field(mut e: Invalid) -> Invalid {
    e.field = match e.field {
        "machine.root_drive.host_path" => "machine.root_drive.image_path",
        "machine.drive_mounts.host_path" => "machine.drive_mounts.image_path",
        f => f,
    };
    e
}

fn vm_id(id: &str) -> Result<&str, VmsError> {
    if id.is_empty() {
        return Err(Invalid {
            field: "vm_id",
            reason: "is required".into(),
        }
        .into());
    }
    Ok(id)
}

#[tonic::async_trait]
impl VmService for VmServiceImpl {
    async fn create(
        &self,
        request: Request<VmServiceCreateRequest>,
    ) -> Result<Response<VmServiceCreateResponse>, Status> {
        let machine = request.into_inner().machine.ok_or_else(|| {
            VmsError::Invalid(Invalid {
                field: "machine",
                reason: "is required".into(),
            })
        })?;
        let config =
            validation::validate(machine, validation::Host::current()).map_err(VmsError::from)?;
        let vm_id = self.vms.create(config)?;
        Ok(Response::new(VmServiceCreateResponse { vm_id }))
    }

    async fn allocate(
        &self,
        request: Request<VmServiceAllocateRequest>,
    ) -> Result<Response<VmServiceAllocateResponse>, Status> {
        let machine = request.into_inner().machine.ok_or_else(|| {
            VmsError::Invalid(Invalid {
                field: "machine",
                reason: "is required".into(),
            })
        })?;
        let config = from_v2(machine)
            .and_then(|m| validation::validate(m, validation::Host::current()))
            .map_err(|e| VmsError::from(v2_field(e)))?;
        let vm_id = self.vms.create(config)?;
        Ok(Response::new(VmServiceAllocateResponse { vm_id }))
    }

    async fn free(
        &self,
        request: Request<VmServiceFreeRequest>,
    ) -> Result<Response<VmServiceFreeResponse>, Status> {
        let r = request.into_inner();
        // The seed's request has no field: an empty vm_id frees the only
        // VM, and is refused when that is ambiguous.
        let id = if r.vm_id.is_empty() {
            self.vms.only_vm()?
        } else {
            r.vm_id
        };
        self.vms.free(&id).await?;
        Ok(Response::new(VmServiceFreeResponse { vm_id: id }))
    }

    async fn start(
        &self,
        request: Request<VmServiceStartRequest>,
    ) -> Result<Response<VmServiceStartResponse>, Status> {
        let r = request.into_inner();
        let auraed_address = self.vms.start(vm_id(&r.vm_id)?).await?;
        Ok(Response::new(VmServiceStartResponse { auraed_address }))
    }

    async fn stop(
        &self,
        request: Request<VmServiceStopRequest>,
    ) -> Result<Response<VmServiceStopResponse>, Status> {
        let r = request.into_inner();
        self.vms.stop(vm_id(&r.vm_id)?).await?;
        Ok(Response::new(VmServiceStopResponse {}))
    }

    async fn list(
        &self,
        _request: Request<VmServiceListRequest>,
    ) -> Result<Response<VmServiceListResponse>, Status> {
        Ok(Response::new(VmServiceListResponse {
            machines: self.vms.list(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aurae_proto::vms::{DriveMountV2, RootDriveV2};

    fn v2(read_only: bool) -> VirtualMachineV2 {
        VirtualMachineV2 {
            id: "a".into(),
            mem_size_mb: 128,
            vcpu_count: 1,
            kernel_img_path: "/k".into(),
            kernel_args: vec!["quiet".into()],
            root_drive: Some(RootDriveV2 {
                image_path: "/r".into(),
                read_only,
            }),
            drive_mounts: vec![DriveMountV2 {
                image_path: "/d".into(),
                vm_path: "/data".into(),
                fs_type: "ext4".into(),
                read_only,
            }],
            auraed_address: String::new(),
        }
    }

    #[test]
    fn v2_read_only_is_the_opposite_of_is_writeable() {
        for read_only in [false, true] {
            let m = from_v2(v2(read_only)).unwrap();
            let root = m.root_drive.unwrap();
            assert_eq!(
                (root.host_path.as_str(), root.is_writeable),
                ("/r", !read_only)
            );
            let d = &m.drive_mounts[0];
            assert_eq!(
                (d.host_path.as_str(), d.vm_path.as_str(), d.fs_type.as_str()),
                ("/d", "/data", "ext4")
            );
            assert_eq!(d.is_writeable, !read_only);
            assert_eq!((m.id.as_str(), m.mem_size_mb, m.vcpu_count), ("a", 128, 1));
            assert_eq!((m.kernel_img_path.as_str(), m.kernel_args.len()), ("/k", 1));
        }
    }

    #[test]
    fn v2_refusals_name_upstream_fields() {
        let mut m = v2(true);
        m.auraed_address = "10.0.0.1:8080".into();
        assert_eq!(from_v2(m).unwrap_err().field, "machine.auraed_address");
        let e = validation::validate(
            from_v2(v2(true)).unwrap(),
            validation::Host {
                cpus: 1,
                mem_mb: 1024,
            },
        )
        .unwrap_err();
        assert_eq!(v2_field(e).field, "machine.kernel_img_path");
        let mut m = v2(true);
        m.kernel_img_path = "/proc/self/exe".into();
        let e = validation::validate(
            from_v2(m).unwrap(),
            validation::Host {
                cpus: 1,
                mem_mb: 1024,
            },
        )
        .unwrap_err();
        assert_eq!(v2_field(e).field, "machine.root_drive.image_path");
    }
}
