//! `runtime.v1.RuntimeService`: the runtime's identity and readiness, pod
//! sandboxes on cells (`sandbox.rs`), containers on crun (`container/`;
//! the container RPCs here only delegate).
//!
//! RPCs not overridden here answer UNIMPLEMENTED with a reason (generated
//! default stubs; see `server.rs`). Stopping or removing an unknown
//! container or sandbox succeeds (the CRI requires both to be idempotent:
//! kubelet retries them for ids that are gone).

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use auraed_cri::proto::{self, runtime_service_server::RuntimeService};
use tonic::{Request, Response, Status};

use super::{
    cni::{first_config as first_cni_config, PortMapping},
    container::{Containers, NewContainer, Record},
    pod::PodSpec,
    sandbox::{NewSandbox, Sandbox, Sandboxes},
};

/// The kubelet-facing API version (`VersionResponse.version`).
const KUBELET_API_VERSION: &str = "0.1.0";
const RUNTIME_NAME: &str = "auraed";
const RUNTIME_API_VERSION: &str = "v1";

pub struct RuntimeServiceImpl {
    cni_conf_dir: PathBuf,
    sandboxes: Arc<Sandboxes>,
    containers: Arc<Containers>,
    /// Exec, Attach and PortForward (`streaming/`).
    streaming: Option<Arc<super::streaming::StreamingRpcs>>,
}

impl RuntimeServiceImpl {
    pub fn new(
        cni_conf_dir: PathBuf,
        sandboxes: Arc<Sandboxes>,
        containers: Arc<Containers>,
    ) -> Self {
        RuntimeServiceImpl {
            cni_conf_dir,
            sandboxes,
            containers,
            streaming: None,
        }
    }

    pub fn with_streaming(mut self, s: Arc<super::streaming::StreamingRpcs>) -> Self {
        self.streaming = Some(s);
        self
    }

    /// The record of a running container (Exec and Attach need one).
    fn running(&self, id: &str) -> Result<super::container::Record, Status> {
        require_id(id, "container_id")?;
        let r = self.containers.status(id)?;
        if r.state != super::container::State::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                r.id
            )));
        }
        Ok(r)
    }

    fn streaming(&self) -> Result<&super::streaming::StreamingRpcs, Status> {
        self.streaming
            .as_deref()
            .ok_or_else(|| Status::unavailable("the CRI streaming server is not running"))
    }
}

fn container(r: &Record) -> proto::Container {
    proto::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: Some(r.metadata()),
        image: Some(proto::ImageSpec {
            image: r.image.clone(),
            ..Default::default()
        }),
        image_ref: r.image_ref.clone(),
        state: r.state.cri(),
        created_at: r.created_at,
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        image_id: r.image_ref.clone(),
    }
}

fn container_status(r: &Record) -> proto::ContainerStatus {
    proto::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(r.metadata()),
        state: r.state.cri(),
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        exit_code: r.exit_code,
        image: Some(proto::ImageSpec {
            image: r.image.clone(),
            ..Default::default()
        }),
        image_ref: r.image_ref.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        mounts: r
            .mounts
            .iter()
            .map(|m| proto::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation,
                ..Default::default()
            })
            .collect(),
        log_path: r.log_path.clone(),
        image_id: r.image_ref.clone(),
        user: Some(proto::ContainerUser {
            linux: Some(proto::LinuxContainerUser {
                uid: i64::from(r.uid),
                gid: i64::from(r.gid),
                supplemental_groups: vec![],
            }),
        }),
        ..Default::default()
    }
}

fn state(s: &Sandbox) -> i32 {
    if s.ready {
        proto::PodSandboxState::SandboxReady as i32
    } else {
        proto::PodSandboxState::SandboxNotready as i32
    }
}

fn metadata(s: &Sandbox) -> proto::PodSandboxMetadata {
    proto::PodSandboxMetadata {
        name: s.name.clone(),
        uid: s.uid.clone(),
        namespace: s.namespace.clone(),
        attempt: s.attempt,
    }
}

fn map(m: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// PortMappings as portmap takes them (those with a host port: kubelet
/// sends every declared container port, most without one).
fn port_mappings(pms: &[proto::PortMapping]) -> Vec<PortMapping> {
    pms.iter()
        .filter(|p| p.host_port > 0)
        .map(|p| PortMapping {
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: proto::Protocol::try_from(p.protocol)
                .unwrap_or(proto::Protocol::Tcp)
                .as_str_name()
                .to_ascii_lowercase(),
            host_ip: p.host_ip.clone(),
        })
        .collect()
}

/// The pod's IPs (the first, and the others as additional ones) while it
/// is attached: after Stop's DEL they may be another pod's (containerd
/// reports none once the namespace is closed, too).
fn network_status(s: &Sandbox) -> proto::PodSandboxNetworkStatus {
    let ips = s
        .network
        .as_ref()
        .filter(|n| n.attached)
        .map(|n| n.ips.as_slice())
        .unwrap_or(&[]);
    proto::PodSandboxNetworkStatus {
        ip: ips.first().cloned().unwrap_or_default(),
        additional_ips: ips
            .iter()
            .skip(1)
            .map(|ip| proto::PodIp { ip: ip.clone() })
            .collect(),
    }
}

fn condition(kind: &str, ready: bool, reason: &str, message: String) -> proto::RuntimeCondition {
    proto::RuntimeCondition {
        r#type: kind.to_string(),
        status: ready,
        reason: if ready {
            String::new()
        } else {
            reason.to_string()
        },
        message: if ready { String::new() } else { message },
    }
}

fn require_id(id: &str, field: &str) -> Result<(), Status> {
    if id.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: an id is required"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl RuntimeService for RuntimeServiceImpl {
    async fn version(
        &self,
        _request: Request<proto::VersionRequest>,
    ) -> Result<Response<proto::VersionResponse>, Status> {
        Ok(Response::new(proto::VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: crate::VERSION.into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let cni = first_cni_config(&self.cni_conf_dir);
        let conditions = vec![
            condition("RuntimeReady", true, "", String::new()),
            condition(
                "NetworkReady",
                cni.is_some(),
                "NetworkPluginNotReady",
                format!(
                    "no CNI network configuration in {}",
                    self.cni_conf_dir.display()
                ),
            ),
        ];
        let mut info = HashMap::new();
        if request.into_inner().verbose {
            let v = serde_json::json!({
                "cniConfDir": self.cni_conf_dir.display().to_string(),
                "cniConfig": cni.map(|p| p.display().to_string()),
                "cgroupDriver": "cgroupfs",
            });
            info.insert("config".to_string(), v.to_string());
        }
        Ok(Response::new(proto::StatusResponse {
            status: Some(proto::RuntimeStatus { conditions }),
            info,
            runtime_handlers: vec![proto::RuntimeHandler {
                name: String::new(),
                features: Some(proto::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            }],
            features: Some(proto::RuntimeFeatures {
                supplemental_groups_policy: false,
                user_namespaces_host_network: false,
            }),
        }))
    }

    async fn runtime_config(
        &self,
        _request: Request<proto::RuntimeConfigRequest>,
    ) -> Result<Response<proto::RuntimeConfigResponse>, Status> {
        Ok(Response::new(proto::RuntimeConfigResponse {
            linux: Some(proto::LinuxRuntimeConfiguration {
                cgroup_driver: proto::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        _request: Request<proto::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<proto::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the node's pod CIDR; the CNI configuration decides
        // addresses (as with containerd), so there is nothing to change.
        Ok(Response::new(proto::UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<proto::RunPodSandboxRequest>,
    ) -> Result<Response<proto::RunPodSandboxResponse>, Status> {
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config: is required"))?;
        let meta = config
            .metadata
            .ok_or_else(|| Status::invalid_argument("config.metadata: is required"))?;
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|sc| sc.namespace_options.clone())
            .unwrap_or_default();
        let dns = config.dns_config.unwrap_or_default();
        let pod = PodSpec {
            hostname: config.hostname,
            dns_servers: dns.servers,
            dns_searches: dns.searches,
            dns_options: dns.options,
            port_mappings: port_mappings(&config.port_mappings),
            sysctls: vec![],
        };
        let sysctls = config
            .linux
            .as_ref()
            .map(|l| l.sysctls.clone())
            .unwrap_or_default();
        let s = self
            .sandboxes
            .run(NewSandbox {
                name: meta.name,
                uid: meta.uid,
                namespace: meta.namespace,
                attempt: meta.attempt,
                labels: config.labels.into_iter().collect(),
                annotations: config.annotations.into_iter().collect(),
                runtime_handler: req.runtime_handler,
                ns_network: ns.network,
                ns_pid: ns.pid,
                ns_ipc: ns.ipc,
                pod,
                sysctls,
            })
            .await?;
        Ok(Response::new(proto::RunPodSandboxResponse {
            pod_sandbox_id: s.id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<proto::StopPodSandboxRequest>,
    ) -> Result<Response<proto::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        require_id(&id, "pod_sandbox_id")?;
        if let Some(s) = self.sandboxes.resolve(&id) {
            self.containers.stop_sandbox(&s.id).await?;
        }
        self.sandboxes.stop(&id).await?;
        Ok(Response::new(proto::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<proto::RemovePodSandboxRequest>,
    ) -> Result<Response<proto::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        require_id(&id, "pod_sandbox_id")?;
        if let Some(s) = self.sandboxes.resolve(&id) {
            self.containers.remove_sandbox(&s.id).await?;
        }
        self.sandboxes.remove(&id).await?;
        Ok(Response::new(proto::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<proto::PodSandboxStatusRequest>,
    ) -> Result<Response<proto::PodSandboxStatusResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        let s = self.sandboxes.resolve(&req.pod_sandbox_id).ok_or_else(|| {
            Status::not_found(format!("pod sandbox {:?} not found", req.pod_sandbox_id))
        })?;
        let mut info = HashMap::new();
        if req.verbose {
            let mut v = serde_json::json!({"cell": s.cell, "hostname": s.hostname});
            if let Some(n) = &s.network {
                let check = match self.sandboxes.pods().check(s.pod_ref(), n).await {
                    None => serde_json::Value::Null,
                    Some(Ok(())) => "ok".into(),
                    Some(Err(e)) => e.to_string().into(),
                };
                v["network"] = serde_json::json!({
                    "netns": n.netns.display().to_string(),
                    "cniConfig": n.conf.file.display().to_string(),
                    "cniNetwork": n.conf.name,
                    "attached": n.attached,
                    "cniCheck": check,
                });
            }
            info.insert("info".to_string(), v.to_string());
        }
        Ok(Response::new(proto::PodSandboxStatusResponse {
            status: Some(proto::PodSandboxStatus {
                id: s.id.clone(),
                metadata: Some(metadata(&s)),
                state: state(&s),
                created_at: s.created_at,
                network: Some(network_status(&s)),
                linux: Some(proto::LinuxPodSandboxStatus {
                    namespaces: Some(proto::Namespace {
                        options: Some(proto::NamespaceOption {
                            network: s.ns_network,
                            pid: s.ns_pid,
                            ipc: s.ns_ipc,
                            ..Default::default()
                        }),
                    }),
                }),
                labels: map(&s.labels),
                annotations: map(&s.annotations),
                runtime_handler: s.runtime_handler.clone(),
            }),
            info,
            containers_statuses: vec![],
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<proto::ListPodSandboxRequest>,
    ) -> Result<Response<proto::ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let items = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|s| filter.id.is_empty() || s.id.starts_with(&filter.id))
            .filter(|s| filter.state.as_ref().is_none_or(|st| st.state == state(s)))
            .filter(|s| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .map(|s| proto::PodSandbox {
                id: s.id.clone(),
                metadata: Some(metadata(&s)),
                state: state(&s),
                created_at: s.created_at,
                labels: map(&s.labels),
                annotations: map(&s.annotations),
                runtime_handler: s.runtime_handler.clone(),
            })
            .collect();
        Ok(Response::new(proto::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<proto::CreateContainerRequest>,
    ) -> Result<Response<proto::CreateContainerResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        let id = self
            .containers
            .create(NewContainer {
                sandbox_id: req.pod_sandbox_id,
                config: req
                    .config
                    .ok_or_else(|| Status::invalid_argument("config: is required"))?,
                sandbox_config: req.sandbox_config.unwrap_or_default(),
            })
            .await?;
        Ok(Response::new(proto::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<proto::StartContainerRequest>,
    ) -> Result<Response<proto::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        require_id(&id, "container_id")?;
        self.containers.start(&id).await?;
        Ok(Response::new(proto::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<proto::StopContainerRequest>,
    ) -> Result<Response<proto::StopContainerResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.container_id, "container_id")?;
        self.containers.stop(&req.container_id, req.timeout).await?;
        Ok(Response::new(proto::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<proto::RemoveContainerRequest>,
    ) -> Result<Response<proto::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        require_id(&id, "container_id")?;
        self.containers.remove(&id).await?;
        Ok(Response::new(proto::RemoveContainerResponse {}))
    }

    async fn container_status(
        &self,
        request: Request<proto::ContainerStatusRequest>,
    ) -> Result<Response<proto::ContainerStatusResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.container_id, "container_id")?;
        let r = self.containers.status(&req.container_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".to_string(),
                serde_json::json!({
                    "cell": r.cell,
                    "pid": r.init_pid,
                    "sandboxID": r.sandbox_id,
                    "runtime": self.containers.runtime_name(),
                })
                .to_string(),
            );
        }
        Ok(Response::new(proto::ContainerStatusResponse {
            status: Some(container_status(&r)),
            info,
        }))
    }

    async fn list_containers(
        &self,
        request: Request<proto::ListContainersRequest>,
    ) -> Result<Response<proto::ListContainersResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let containers = self
            .containers
            .list()
            .into_iter()
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|r| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == r.state.cri())
            })
            .filter(|r| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| r.labels.get(k) == Some(v))
            })
            .map(|r| container(&r))
            .collect();
        Ok(Response::new(proto::ListContainersResponse { containers }))
    }

    async fn update_container_resources(
        &self,
        request: Request<proto::UpdateContainerResourcesRequest>,
    ) -> Result<Response<proto::UpdateContainerResourcesResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.container_id, "container_id")?;
        if let Some(l) = &req.linux {
            self.containers.update_resources(&req.container_id, l)?;
        }
        Ok(Response::new(proto::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<proto::ReopenContainerLogRequest>,
    ) -> Result<Response<proto::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        require_id(&id, "container_id")?;
        self.containers.reopen_log(&id).await?;
        Ok(Response::new(proto::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<proto::ExecSyncRequest>,
    ) -> Result<Response<proto::ExecSyncResponse>, Status> {
        let req = request.into_inner();
        require_id(&req.container_id, "container_id")?;
        let out = self
            .containers
            .exec_sync(&req.container_id, &req.cmd, req.timeout)
            .await?;
        Ok(Response::new(out))
    }

    async fn container_stats(
        &self,
        request: Request<proto::ContainerStatsRequest>,
    ) -> Result<Response<proto::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        require_id(&id, "container_id")?;
        let r = self.containers.status(&id)?;
        Ok(Response::new(proto::ContainerStatsResponse {
            stats: Some(self.containers.stats(&r)),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<proto::ListContainerStatsRequest>,
    ) -> Result<Response<proto::ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let stats = self
            .containers
            .list()
            .into_iter()
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|r| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| r.labels.get(k) == Some(v))
            })
            .map(|r| self.containers.stats(&r))
            .collect();
        Ok(Response::new(proto::ListContainerStatsResponse { stats }))
    }

    async fn exec(
        &self,
        request: Request<proto::ExecRequest>,
    ) -> Result<Response<proto::ExecResponse>, Status> {
        let mut req = request.into_inner();
        super::streaming::validate_exec(&req)?;
        req.container_id = self.running(&req.container_id)?.id;
        Ok(Response::new(self.streaming()?.exec(req)?))
    }

    async fn attach(
        &self,
        request: Request<proto::AttachRequest>,
    ) -> Result<Response<proto::AttachResponse>, Status> {
        let mut req = request.into_inner();
        super::streaming::validate_attach(&req)?;
        let r = self.running(&req.container_id)?;
        if req.stdin && !r.stdin {
            return Err(Status::failed_precondition(format!(
                "container {} was not created with stdin",
                r.id
            )));
        }
        req.container_id = r.id;
        let log = (!r.log_path.is_empty()).then(|| PathBuf::from(r.log_path));
        Ok(Response::new(self.streaming()?.attach(req, log)?))
    }

    async fn port_forward(
        &self,
        request: Request<proto::PortForwardRequest>,
    ) -> Result<Response<proto::PortForwardResponse>, Status> {
        Ok(Response::new(
            self.streaming()?.port_forward(request.into_inner())?,
        ))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<proto::PodSandboxStatsRequest>,
    ) -> Result<Response<proto::PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        require_id(&id, "pod_sandbox_id")?;
        let stats = super::stats::pod_sandbox_stats(&self.sandboxes, &id).await?;
        Ok(Response::new(proto::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<proto::ListPodSandboxStatsRequest>,
    ) -> Result<Response<proto::ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        Ok(Response::new(proto::ListPodSandboxStatsResponse {
            stats: super::stats::list_pod_sandbox_stats(&self.sandboxes, filter).await,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cni_config_in_lexical_order() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(first_cni_config(d.path()), None);
        std::fs::write(d.path().join("README"), "").expect("write");
        assert_eq!(first_cni_config(d.path()), None);
        std::fs::write(d.path().join("99-loopback.conf"), "{}").expect("write");
        std::fs::write(d.path().join("10-critest.conflist"), "{}").expect("write");
        assert_eq!(
            first_cni_config(d.path()),
            Some(d.path().join("10-critest.conflist"))
        );
        assert_eq!(first_cni_config(&d.path().join("missing")), None);
    }
}
