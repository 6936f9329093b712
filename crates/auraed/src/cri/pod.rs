//! A pod sandbox's network and identity, set up after its cell exists and
//! undone at Stop/Remove (`sandbox.rs` calls these):
//!
//! - RunPodSandbox, pod network (not hostNetwork): the holder's network
//!   namespace is pinned on `<runtime-dir>/cri/netns/<id>` (a bind mount
//!   of ours), which is the `CNI_NETNS` of a CNI ADD (`cni.rs`); the
//!   result (the pod's IPs) is kept in the sandbox record. Loopback is
//!   already up: the holder brings `lo` up when it makes the namespace.
//! - the pod's hostname is set in the holder's uts namespace (when the pod
//!   has one; hostNetwork pods get the host's name), its namespaced sysctls
//!   are written inside its namespaces (`netns.rs`), and
//!   `<runtime-dir>/cri/sandboxes/<id>/{hostname,hosts,resolv.conf}` are
//!   written for the containers to bind-mount.
//! - StopPodSandbox: CNI DEL (in reverse, with the cached result); it
//!   works after the holder is gone, through the pinned namespace.
//! - RemovePodSandbox: DEL if Stop did not, then unpin and remove the
//!   namespace file and the pod's files.
//!
//! A failure anywhere in setup undoes what setup did (DEL after a partial
//! ADD, as containerd does, then unpin) before the cell is freed.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    cni::{self, Attachment, Cni, CniError, NetConfList, PortMapping},
    netns::{self, Ns, NsError},
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Ns(#[from] NsError),
    #[error("pod file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("pod sandbox cell {0} has no running holder")]
    NoHolder(String),
    #[error("pod setup task failed: {0}")]
    Task(String),
}

/// What the CRI config asks of the pod's network and identity.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub hostname: String,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
    pub port_mappings: Vec<PortMapping>,
    /// Validated: (path under /proc/sys, value).
    pub sysctls: Vec<(String, String)>,
}

/// The pod's CNI attachment, kept in its sandbox record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pinned network namespace (CNI_NETNS).
    pub netns: PathBuf,
    pub conf: NetConfList,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// The ADD result (JSON text), the `prevResult` of DEL.
    #[serde(default)]
    pub result: Option<String>,
    /// The pod's IPs, IPv4 first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// ADD succeeded and DEL has not yet.
    pub attached: bool,
}

/// Who the pod is (CNI_CONTAINERID and CNI_ARGS).
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
}

/// Which namespaces the pod's holder has of its own.
#[derive(Debug, Clone, Copy)]
pub struct OwnNs {
    pub net: bool,
    /// uts, ipc (and pid, mount) come together.
    pub ipc_uts: bool,
}

/// What setup made.
#[derive(Debug, Clone)]
pub struct PodSetup {
    pub network: Option<PodNetwork>,
    pub hostname: String,
}

pub struct Pods {
    pub cni: Cni,
    netns_dir: PathBuf,
    files_dir: PathBuf,
}

/// Validates the pod's sysctls: only namespaced ones, and only for the
/// namespaces the pod has of its own (a hostNetwork pod's `net.*` would be
/// the node's).
pub fn check_sysctls(
    sysctls: &HashMap<String, String>,
    own: OwnNs,
) -> Result<Vec<(String, String)>, PodError> {
    let mut out = Vec::with_capacity(sysctls.len());
    let mut names: Vec<&String> = sysctls.keys().collect();
    names.sort();
    for name in names {
        let path = netns::sysctl_path(name).ok_or_else(|| {
            PodError::Invalid(format!(
                "config.linux.sysctls: {name:?} is not a sysctl name"
            ))
        })?;
        let ok = match netns::sysctl_namespace(&path) {
            None => {
                return Err(PodError::Invalid(format!(
                    "config.linux.sysctls: {name} is not a namespaced sysctl (allowed: net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*)"
                )))
            }
            Some(Ns::Net) => own.net,
            Some(_) => own.ipc_uts,
        };
        if !ok {
            return Err(PodError::Invalid(format!(
                "config.linux.sysctls: {name} would change the node's: the pod shares that namespace with the host"
            )));
        }
        out.push((path, sysctls[name].clone()));
    }
    Ok(out)
}

/// The kernel takes up to 64 bytes (and kubelet sends DNS labels).
pub fn check_hostname(name: &str) -> Result<(), PodError> {
    if name.len() > 64 || name.contains(['\0', '/', ' ', '\n']) {
        return Err(PodError::Invalid(format!(
            "config.hostname: {name:?} is not a hostname (at most 64 bytes, no spaces)"
        )));
    }
    Ok(())
}

fn host_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// resolv.conf from the DNS config (containerd's format); None when it is
/// empty (then the host's is copied).
pub fn resolv_conf(spec: &PodSpec) -> Option<String> {
    if spec.dns_servers.is_empty() && spec.dns_searches.is_empty() && spec.dns_options.is_empty() {
        return None;
    }
    let mut s = String::new();
    if !spec.dns_searches.is_empty() {
        s.push_str(&format!("search {}\n", spec.dns_searches.join(" ")));
    }
    for n in &spec.dns_servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !spec.dns_options.is_empty() {
        s.push_str(&format!("options {}\n", spec.dns_options.join(" ")));
    }
    Some(s)
}

/// A pod's own hosts file (as kubelet's managed one): localhost, the IPv6
/// names, and the pod's IPs with its hostname.
pub fn hosts_file(ips: &[String], hostname: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (auraed).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    for ip in ips {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    s
}

impl Pods {
    /// `runtime_dir/cri/netns` holds the pinned namespaces; the pods'
    /// files go to `sandboxes_dir/<id>/`.
    pub fn new(cni: Cni, runtime_dir: &Path, sandboxes_dir: &Path) -> Pods {
        Pods {
            cni,
            netns_dir: runtime_dir.join("cri/netns"),
            files_dir: sandboxes_dir.to_owned(),
        }
    }

    pub fn files_dir(&self, id: &str) -> PathBuf {
        self.files_dir.join(id)
    }

    fn attachment<'a>(pod: PodRef<'a>, net: &'a PodNetwork) -> Attachment<'a> {
        Attachment {
            container_id: pod.id,
            netns: &net.netns,
            args: vec![
                ("K8S_POD_NAMESPACE", pod.namespace.to_owned()),
                ("K8S_POD_NAME", pod.name.to_owned()),
                ("K8S_POD_INFRA_CONTAINER_ID", pod.id.to_owned()),
                ("K8S_POD_UID", pod.uid.to_owned()),
            ],
            port_mappings: &net.port_mappings,
        }
    }

    /// Sets up the pod (see the module comment); on error nothing of it is
    /// left. `holder`: the pid of the cell's holder, if it has one.
    pub async fn setup(
        &self,
        pod: PodRef<'_>,
        holder: Option<i32>,
        own: OwnNs,
        spec: &PodSpec,
    ) -> Result<PodSetup, PodError> {
        let mut network = None;
        if own.net {
            let pid = holder.ok_or_else(|| PodError::NoHolder(pod.id.to_owned()))?;
            network = Some(self.attach(pod, pid, spec).await?);
        }
        let result = self
            .identity(pod, holder, own, spec, network.as_ref())
            .await;
        match result {
            Ok(hostname) => Ok(PodSetup { network, hostname }),
            Err(e) => {
                if let Some(mut n) = network {
                    let _ = self.detach(pod, &mut n).await;
                }
                let _ = self.release(pod.id, None);
                Err(e)
            }
        }
    }

    /// Pin + ADD; undoes both on failure.
    async fn attach(
        &self,
        pod: PodRef<'_>,
        pid: i32,
        spec: &PodSpec,
    ) -> Result<PodNetwork, PodError> {
        let conf = NetConfList::load(&self.cni.conf_dir)?;
        let path = self.netns_dir.join(pod.id);
        let p = path.clone();
        tokio::task::spawn_blocking(move || netns::pin_netns(pid, &p))
            .await
            .map_err(|e| PodError::Task(e.to_string()))??;
        let mut net = PodNetwork {
            netns: path.clone(),
            conf,
            port_mappings: spec.port_mappings.clone(),
            result: None,
            ips: vec![],
            attached: false,
        };
        let added = self.cni.add(&net.conf, &Self::attachment(pod, &net)).await;
        match added {
            Ok(result) => {
                net.ips = cni::result_ips(&result);
                net.result = Some(result);
                net.attached = true;
                tracing::info!(
                    "pod sandbox {}: CNI network {:?} ADD: {:?}",
                    pod.id,
                    net.conf.name,
                    net.ips
                );
                Ok(net)
            }
            Err(e) => {
                // What the plugins before the failing one made.
                let _ = self
                    .cni
                    .del(&net.conf, &Self::attachment(pod, &net), None)
                    .await;
                let _ = netns::unpin_netns(&path);
                Err(e.into())
            }
        }
    }

    /// Hostname, sysctls and the pod's files; returns the hostname.
    async fn identity(
        &self,
        pod: PodRef<'_>,
        holder: Option<i32>,
        own: OwnNs,
        spec: &PodSpec,
        network: Option<&PodNetwork>,
    ) -> Result<String, PodError> {
        let hostname = if !own.net || spec.hostname.is_empty() {
            host_hostname()
        } else {
            spec.hostname.clone()
        };
        if let (true, Some(pid)) = (own.ipc_uts, holder) {
            let (h, sysctls) = (hostname.clone(), spec.sysctls.clone());
            let kinds: Vec<Ns> = [(own.net, Ns::Net), (own.ipc_uts, Ns::Ipc)]
                .into_iter()
                .filter_map(|(own, k)| own.then_some(k))
                .collect();
            tokio::task::spawn_blocking(move || {
                netns::set_hostname(pid, &h)?;
                netns::write_sysctls(pid, &kinds, &sysctls)
            })
            .await
            .map_err(|e| PodError::Task(e.to_string()))??;
        } else if let (Some(pid), false) = (holder, spec.sysctls.is_empty()) {
            // Only a network namespace of its own: net.* sysctls.
            let sysctls = spec.sysctls.clone();
            tokio::task::spawn_blocking(move || netns::write_sysctls(pid, &[Ns::Net], &sysctls))
                .await
                .map_err(|e| PodError::Task(e.to_string()))??;
        }
        let dir = self.files_dir(pod.id);
        let file_err = |path: &Path| {
            let path = path.to_owned();
            move |source| PodError::File { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(file_err(&p))
        };
        write("hostname", &format!("{hostname}\n"))?;
        match network {
            Some(n) => write("hosts", &hosts_file(&n.ips, &hostname))?,
            None => write(
                "hosts",
                &std::fs::read_to_string("/etc/hosts")
                    .map_err(file_err(Path::new("/etc/hosts")))?,
            )?,
        }
        match resolv_conf(spec) {
            Some(text) => write("resolv.conf", &text)?,
            // As containerd: the host's, when the pod gives no DNS config.
            None => match std::fs::read_to_string("/etc/resolv.conf") {
                Ok(text) => write("resolv.conf", &text)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(file_err(Path::new("/etc/resolv.conf"))(e)),
            },
        }
        Ok(hostname)
    }

    /// CNI DEL, once: a detached network is left alone.
    pub async fn detach(&self, pod: PodRef<'_>, net: &mut PodNetwork) -> Result<(), PodError> {
        if !net.attached {
            return Ok(());
        }
        if !netns::is_pinned(&net.netns) {
            // The namespace (and every interface in it) is gone already;
            // DEL still releases what plugins hold outside it (IPAM,
            // portmap rules), with an empty CNI_NETNS as the spec allows.
            tracing::warn!(
                "pod sandbox {}: its network namespace {} is gone; CNI DEL without it",
                pod.id,
                net.netns.display()
            );
            let mut n = net.clone();
            n.netns = PathBuf::new();
            self.cni
                .del(&n.conf, &Self::attachment(pod, &n), n.result.as_deref())
                .await?;
        } else {
            self.cni
                .del(
                    &net.conf,
                    &Self::attachment(pod, net),
                    net.result.as_deref(),
                )
                .await?;
        }
        tracing::info!("pod sandbox {}: CNI DEL done", pod.id);
        net.attached = false;
        Ok(())
    }

    /// CNI CHECK of an attached pod (None: nothing to check, or a
    /// configuration older than CHECK, 0.4.0).
    pub async fn check(&self, pod: PodRef<'_>, net: &PodNetwork) -> Option<Result<(), PodError>> {
        let old = ["0.1.0", "0.2.0", "0.3.0", "0.3.1"].contains(&net.conf.cni_version.as_str());
        if !net.attached || old {
            return None;
        }
        let r = self
            .cni
            .check(
                &net.conf,
                &Self::attachment(pod, net),
                net.result.as_deref(),
            )
            .await;
        Some(r.map_err(PodError::from))
    }

    /// Unpins the namespace and removes the pod's files (any number of
    /// times).
    pub fn release(&self, id: &str, net: Option<&PodNetwork>) -> Result<(), PodError> {
        let path = net.map_or_else(|| self.netns_dir.join(id), |n| n.netns.clone());
        netns::unpin_netns(&path)?;
        let dir = self.files_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PodError::File { path: dir, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_only_namespaced_and_own() {
        let own = OwnNs {
            net: true,
            ipc_uts: true,
        };
        let m = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert_eq!(
            check_sysctls(&m("net.ipv4.ip_unprivileged_port_start", "0"), own).expect("ok"),
            [(
                "net/ipv4/ip_unprivileged_port_start".to_owned(),
                "0".to_owned()
            )]
        );
        assert!(check_sysctls(&m("kernel.shm_rmid_forced", "1"), own).is_ok());
        assert!(matches!(
            check_sysctls(&m("kernel.pid_max", "1000"), own),
            Err(PodError::Invalid(_))
        ));
        let host_net = OwnNs {
            net: false,
            ipc_uts: true,
        };
        assert!(matches!(
            check_sysctls(&m("net.ipv4.ip_forward", "1"), host_net),
            Err(PodError::Invalid(_))
        ));
        assert!(check_sysctls(&m("kernel.msgmax", "1000"), host_net).is_ok());
    }

    #[test]
    fn dns_and_hosts() {
        let mut spec = PodSpec::default();
        assert_eq!(resolv_conf(&spec), None);
        spec.dns_servers = vec!["8.8.8.8".into(), "1.1.1.1".into()];
        spec.dns_searches = vec!["a.example".into(), "b.example".into()];
        spec.dns_options = vec!["ndots:5".into(), "timeout:1".into()];
        assert_eq!(
            resolv_conf(&spec).as_deref(),
            Some("search a.example b.example\nnameserver 8.8.8.8\nnameserver 1.1.1.1\noptions ndots:5 timeout:1\n")
        );
        let h = hosts_file(&["10.1.0.5".into()], "web");
        assert!(h.contains("127.0.0.1\tlocalhost\n") && h.ends_with("10.1.0.5\tweb\n"));
    }
}
