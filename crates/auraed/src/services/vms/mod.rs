//! `aurae.vms.v0.VmService`: validation and the gRPC edge; the lifecycle
//! lives in `state.rs`, QEMU in `crate::host::hypervisor`.

pub mod identity;
pub mod state;
pub mod validation;

use std::{path::PathBuf, sync::Arc};

use aurae_proto::vms::{
    vm_service_server::VmService, VmServiceCreateRequest, VmServiceCreateResponse,
    VmServiceFreeRequest, VmServiceFreeResponse, VmServiceListRequest, VmServiceListResponse,
    VmServiceStartRequest, VmServiceStartResponse, VmServiceStopRequest, VmServiceStopResponse,
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

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
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
        let config = validation::validate(machine, host_cpus()).map_err(VmsError::from)?;
        let vm_id = self.vms.create(config)?;
        Ok(Response::new(VmServiceCreateResponse { vm_id }))
    }

    async fn free(
        &self,
        request: Request<VmServiceFreeRequest>,
    ) -> Result<Response<VmServiceFreeResponse>, Status> {
        let r = request.into_inner();
        self.vms.free(vm_id(&r.vm_id)?).await?;
        Ok(Response::new(VmServiceFreeResponse { vm_id: r.vm_id }))
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
