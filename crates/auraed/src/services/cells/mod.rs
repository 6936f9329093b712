//! `aurae.cells.v0.CellService`: validation and the gRPC edge; the domain
//! lives in `state.rs`, the kernel work in `crate::host`.

mod adopt;
pub mod executable;
pub mod output;
pub mod persist;
pub mod state;
pub mod stats;
mod teardown;
pub mod validation;

use std::sync::Arc;

use aurae_proto::cells::{
    cell_service_server::CellService, CellServiceAllocateRequest, CellServiceAllocateResponse,
    CellServiceFreeRequest, CellServiceFreeResponse, CellServiceListRequest,
    CellServiceListResponse, CellServiceStartRequest, CellServiceStartResponse,
    CellServiceStatsRequest, CellServiceStatsResponse, CellServiceStopRequest,
    CellServiceStopResponse,
};
use tonic::{Request, Response, Status};

use crate::{
    authz::{self, methods, Target},
    host::{cgroup::CgroupError, spawn::SpawnError},
};
pub use adopt::Adopted;
pub use state::{Cells, Context, StartSpec};
use validation::{CellName, Invalid};

#[derive(Debug, thiserror::Error)]
pub enum CellsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("{0}")]
    Internal(String),
}

/// What the daemon does with its workloads when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Leave them running, recorded on disk, for the next start to re-adopt.
    Keep,
    /// Stop every executable and free every cell.
    Free,
}

#[derive(Debug, Clone)]
pub struct CellServiceImpl {
    cells: Arc<Cells>,
}

impl CellServiceImpl {
    pub fn new(cells: Arc<Cells>) -> Self {
        Self { cells }
    }
}

fn context(cell_name: Option<String>) -> Result<Context, CellsError> {
    Ok(match cell_name.filter(|c| !c.is_empty()) {
        None => Context::Host,
        Some(c) => Context::Cell(CellName::parse("cell_name", &c)?),
    })
}

/// What a policy rule must cover for `context`.
pub fn target(context: &Context) -> Target<'_> {
    match context {
        Context::Host => Target::Host,
        Context::Cell(c) => Target::Cell(c),
    }
}

/// The cells of `nodes` that `visible` keeps; a kept cell under one that
/// is not takes that one's place (its full name says where it is).
fn visible_only(
    nodes: Vec<aurae_proto::cells::CellGraphNode>,
    visible: &dyn Fn(&str) -> bool,
) -> Vec<aurae_proto::cells::CellGraphNode> {
    let mut out = Vec::new();
    for mut node in nodes {
        let children = visible_only(std::mem::take(&mut node.children), visible);
        if node.cell.as_ref().is_some_and(|c| visible(&c.name)) {
            node.children = children;
            out.push(node);
        } else {
            out.extend(children);
        }
    }
    out
}

#[tonic::async_trait]
impl CellService for CellServiceImpl {
    async fn allocate(
        &self,
        request: Request<CellServiceAllocateRequest>,
    ) -> Result<Response<CellServiceAllocateResponse>, Status> {
        let caller = authz::caller(&request)?;
        let cell = request.into_inner().cell.ok_or_else(|| {
            CellsError::Invalid(Invalid {
                field: "cell",
                reason: "is required".into(),
            })
        })?;
        let name = CellName::parse("cell.name", &cell.name)?;
        caller.check(methods::CELL_ALLOCATE, Target::Cell(&name), None)?;
        let limits = validation::limits(&cell)?;
        self.cells.allocate(name.clone(), cell, limits).await?;
        Ok(Response::new(CellServiceAllocateResponse {
            cell_name: name.to_string(),
            cgroup_v2: self.cells.is_v2(),
        }))
    }

    async fn free(
        &self,
        request: Request<CellServiceFreeRequest>,
    ) -> Result<Response<CellServiceFreeResponse>, Status> {
        let caller = authz::caller(&request)?;
        let name = CellName::parse("cell_name", &request.into_inner().cell_name)?;
        caller.check(methods::CELL_FREE, Target::Cell(&name), None)?;
        self.cells.free(&name).await?;
        Ok(Response::new(CellServiceFreeResponse {}))
    }

    async fn start(
        &self,
        request: Request<CellServiceStartRequest>,
    ) -> Result<Response<CellServiceStartResponse>, Status> {
        let caller = authz::caller(&request)?;
        let r = request.into_inner();
        let ctx = context(r.cell_name)?;
        caller.check(methods::CELL_START, target(&ctx), None)?;
        let exe = r.executable.ok_or_else(|| {
            CellsError::Invalid(Invalid {
                field: "executable",
                reason: "is required".into(),
            })
        })?;
        let name = validation::executable_name("executable.name", &exe.name)?;
        validation::command("executable.command", &exe.command)?;
        let spec = StartSpec {
            name,
            command: exe.command,
            description: exe.description,
            uid: validation::id("uid", r.uid)?,
            gid: validation::id("gid", r.gid)?,
        };
        let s = self.cells.start(ctx, spec).await?;
        Ok(Response::new(CellServiceStartResponse {
            pid: s.pid,
            uid: s.uid,
            gid: s.gid,
        }))
    }

    async fn stop(
        &self,
        request: Request<CellServiceStopRequest>,
    ) -> Result<Response<CellServiceStopResponse>, Status> {
        let caller = authz::caller(&request)?;
        let r = request.into_inner();
        let ctx = context(r.cell_name)?;
        caller.check(methods::CELL_STOP, target(&ctx), None)?;
        let name = validation::executable_name("executable_name", &r.executable_name)?;
        self.cells.stop(ctx, &name).await?;
        Ok(Response::new(CellServiceStopResponse {}))
    }

    async fn list(
        &self,
        request: Request<CellServiceListRequest>,
    ) -> Result<Response<CellServiceListResponse>, Status> {
        let caller = authz::caller(&request)?;
        let mut cells = self.cells.list();
        if !caller.unrestricted(methods::CELL_LIST) {
            cells = visible_only(cells, &|name| {
                CellName::parse("cell.name", name)
                    .is_ok_and(|n| caller.may(methods::CELL_LIST, Target::Cell(&n)))
            });
        }
        let host_executables = if caller.may(methods::CELL_LIST, Target::Host) {
            self.cells.host_executables()
        } else {
            Vec::new()
        };
        Ok(Response::new(CellServiceListResponse {
            cells,
            host_executables,
        }))
    }

    async fn stats(
        &self,
        request: Request<CellServiceStatsRequest>,
    ) -> Result<Response<CellServiceStatsResponse>, Status> {
        let caller = authz::caller(&request)?;
        let r = request.into_inner();
        let of = match r.cell_name.as_str() {
            "" => None,
            n => Some(CellName::parse("cell_name", n)?),
        };
        // A named cell must be allowed; what a subtree or "every cell"
        // answers is filtered to the cells the caller may see (as List).
        if let Some(name) = &of {
            caller.check(methods::CELL_STATS, Target::Cell(name), None)?;
        }
        let timestamp = stats::now_ns();
        let mut read = self.cells.stats(of.as_ref(), r.recursive).await?;
        if !caller.unrestricted(methods::CELL_STATS) {
            read.retain(|(n, _)| caller.may(methods::CELL_STATS, Target::Cell(n)));
        }
        Ok(Response::new(CellServiceStatsResponse {
            cells: read.iter().map(|(n, s)| stats::to_proto(n, s)).collect(),
            timestamp,
            cgroup_v2: self.cells.is_v2(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use aurae_proto::cells::{Cell, CellGraphNode};

    fn node(name: &str, children: Vec<CellGraphNode>) -> CellGraphNode {
        CellGraphNode {
            cell: Some(Cell {
                name: name.into(),
                ..Default::default()
            }),
            children,
            ..Default::default()
        }
    }

    fn names(nodes: &[CellGraphNode]) -> Vec<String> {
        nodes
            .iter()
            .map(|n| {
                let c = names(&n.children);
                let name = n.cell.as_ref().map(|c| c.name.clone()).unwrap_or_default();
                if c.is_empty() {
                    name
                } else {
                    format!("{name}({})", c.join(","))
                }
            })
            .collect()
    }

    #[test]
    fn list_keeps_visible_cells_and_lifts_them_over_hidden_parents() {
        let forest = vec![
            node("a", vec![node("a/x", vec![node("a/x/y", vec![])])]),
            node("b", vec![node("b/x", vec![])]),
            node("c", vec![]),
        ];
        let kept = super::visible_only(forest.clone(), &|n| n.starts_with('a'));
        assert_eq!(names(&kept), ["a(a/x(a/x/y))"]);
        let kept = super::visible_only(forest.clone(), &|n| n.ends_with("/x") || n == "c");
        assert_eq!(names(&kept), ["a/x", "b/x", "c"]);
        assert!(super::visible_only(forest, &|_| false).is_empty());
    }
}
