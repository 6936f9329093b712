//! The CNI, as a runtime calls it (the exec protocol of the CNI spec, the
//! way libcni does for kubelet's runtimes): the network configuration is
//! the first `.conf`/`.conflist`/`.json` file of `--cni-conf-dir` in
//! lexical order (a single `.conf` becomes a list of one); each plugin is
//! an executable named by its `type`, found in the `--cni-bin-dir` list;
//! it gets `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` and `CNI_PATH` in its environment and its configuration on
//! stdin: the plugin's object with the list's `name` and `cniVersion`, the
//! previous plugin's result as `prevResult`, and `runtimeConfig` with the
//! capabilities it declares (`portMappings`). ADD runs the plugins in
//! order, DEL in reverse with the cached ADD result as `prevResult`.
//!
//! Written here on serde_json rather than with a crate: the Rust CNI
//! crates are either the plugin side (`rscni`, `cni-plugin`) or young and
//! synchronous (`rust-cni`, "needs tests" in its own README); the caller
//! side is a few hundred lines, and this keeps it async and its errors
//! ours.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// How long one plugin call may take (host-local, bridge and portmap take
/// milliseconds; a hung plugin must not hang RunPodSandbox forever).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The interface a pod gets (as kubelet's runtimes name it).
pub const IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network configuration in {0}")]
    NoConfig(PathBuf),
    #[error("CNI network configuration {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NoPlugin { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} {command}: {msg}")]
    Plugin {
        plugin: String,
        command: &'static str,
        msg: String,
    },
}

/// A network configuration list, as loaded (kept in the sandbox record so
/// that DEL uses what ADD used, as libcni caches it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfList {
    pub name: String,
    pub cni_version: String,
    pub file: PathBuf,
    /// The plugins' objects, as JSON text.
    pub plugins: Vec<String>,
}

/// The first CNI network configuration file, as libcni picks it.
pub fn first_config(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

impl NetConfList {
    pub fn load(dir: &Path) -> Result<NetConfList, CniError> {
        let file = first_config(dir).ok_or_else(|| CniError::NoConfig(dir.to_owned()))?;
        let bad = |msg: String| CniError::Config {
            path: file.clone(),
            msg,
        };
        let text = std::fs::read(&file).map_err(|e| bad(e.to_string()))?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        Self::parse(&v, file.clone()).map_err(bad)
    }

    fn parse(v: &Value, file: PathBuf) -> Result<NetConfList, String> {
        let name = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("no \"name\"")?
            .to_owned();
        let cni_version = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.4.0")
            .to_owned();
        let plugins: Vec<&Value> = match v.get("plugins") {
            Some(Value::Array(p)) => p.iter().collect(),
            Some(_) => return Err("\"plugins\" is not a list".into()),
            // A single network configuration (`.conf`).
            None => vec![v],
        };
        if plugins.is_empty() {
            return Err("no plugins".into());
        }
        for p in &plugins {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err("a plugin without \"type\"".into());
            }
        }
        Ok(NetConfList {
            name,
            cni_version,
            file,
            plugins: plugins.iter().map(|p| p.to_string()).collect(),
        })
    }
}

/// One port mapping for the `portMappings` capability (portmap's format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// What the runtime tells the plugins about the pod.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    /// `CNI_ARGS` pairs (K8S_POD_NAMESPACE, ...).
    pub args: Vec<(&'static str, String)>,
    pub port_mappings: &'a [PortMapping],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// Finds and runs the plugins.
#[derive(Debug, Clone)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl Cni {
    fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        // A type is a file name, never a path.
        if !plugin.contains('/') {
            for d in &self.bin_dirs {
                let p = d.join(plugin);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
        Err(CniError::NoPlugin {
            plugin: plugin.to_owned(),
            dirs: self.cni_path(),
        })
    }

    fn cni_path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// ADD through every plugin; returns the last result (JSON text).
    pub async fn add(&self, list: &NetConfList, a: &Attachment<'_>) -> Result<String, CniError> {
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let out = self.call(Command::Add, list, p, prev.as_ref(), a).await?;
            prev = Some(out);
        }
        Ok(prev.map(|v| v.to_string()).unwrap_or_default())
    }

    /// DEL through every plugin in reverse order, each given the cached
    /// ADD result. Every plugin is called even if one fails (so that one
    /// broken plugin does not leak what the others hold); the first error
    /// is returned.
    pub async fn del(
        &self,
        list: &NetConfList,
        a: &Attachment<'_>,
        cached: Option<&str>,
    ) -> Result<(), CniError> {
        let prev: Option<Value> = cached.and_then(|c| serde_json::from_str(c).ok());
        let mut first = None;
        for p in list.plugins.iter().rev() {
            if let Err(e) = self.call(Command::Del, list, p, prev.as_ref(), a).await {
                tracing::warn!("CNI DEL for {}: {e}", a.container_id);
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK through every plugin (CNI 0.4.0 and later), with the cached
    /// ADD result.
    pub async fn check(
        &self,
        list: &NetConfList,
        a: &Attachment<'_>,
        cached: Option<&str>,
    ) -> Result<(), CniError> {
        let prev: Option<Value> = cached.and_then(|c| serde_json::from_str(c).ok());
        for p in &list.plugins {
            self.call(Command::Check, list, p, prev.as_ref(), a).await?;
        }
        Ok(())
    }

    async fn call(
        &self,
        command: Command,
        list: &NetConfList,
        plugin: &str,
        prev: Option<&Value>,
        a: &Attachment<'_>,
    ) -> Result<Value, CniError> {
        let conf = plugin_config(list, plugin, prev, a.port_mappings);
        let kind = conf
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let fail = |msg: String| CniError::Plugin {
            plugin: kind.clone(),
            command: command.as_str(),
            msg,
        };
        let exe = self.find(&kind)?;
        let args = std::iter::once("IgnoreUnknown=1".to_owned())
            .chain(a.args.iter().map(|(k, v)| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(";");
        let mut child = tokio::process::Command::new(&exe)
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", a.container_id)
            .env("CNI_NETNS", a.netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", exe.display())))?;
        let stdin = conf.to_string();
        let mut pipe = child.stdin.take();
        let run = async {
            if let Some(p) = pipe.as_mut() {
                // A plugin that exits without reading is judged by its exit.
                let _ = p.write_all(stdin.as_bytes()).await;
            }
            drop(pipe);
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(PLUGIN_TIMEOUT, run)
            .await
            .map_err(|_| fail(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            // The spec's error: {"code": N, "msg": "...", "details": "..."}.
            let err: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let mut msg = match (err.get("msg").and_then(Value::as_str), err.get("code")) {
                (Some(m), code) => {
                    let details = err.get("details").and_then(Value::as_str).unwrap_or("");
                    let code = code.map(|c| format!(" (code {c})")).unwrap_or_default();
                    if details.is_empty() {
                        format!("{m}{code}")
                    } else {
                        format!("{m}: {details}{code}")
                    }
                }
                _ => format!("{}", out.status),
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !stderr.trim().is_empty() {
                msg.push_str(&format!("; stderr: {}", stderr.trim()));
            }
            return Err(fail(msg));
        }
        if command != Command::Add {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("its result is not JSON: {e}")))
    }
}

/// The stdin of one plugin call.
fn plugin_config(
    list: &NetConfList,
    plugin: &str,
    prev: Option<&Value>,
    port_mappings: &[PortMapping],
) -> Value {
    let mut conf: Value = serde_json::from_str(plugin).unwrap_or_else(|_| json!({}));
    let Some(obj) = conf.as_object_mut() else {
        return conf;
    };
    obj.insert("name".into(), json!(list.name));
    obj.insert("cniVersion".into(), json!(list.cni_version));
    match prev {
        Some(p) if !p.is_null() => {
            obj.insert("prevResult".into(), p.clone());
        }
        _ => {}
    }
    // Only the capabilities the plugin asks for, and only when there is
    // something to pass (libcni's injectRuntimeConfig).
    let wants = |cap: &str| {
        obj.get("capabilities")
            .and_then(|c| c.get(cap))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    if wants("portMappings") && !port_mappings.is_empty() {
        obj.insert(
            "runtimeConfig".into(),
            json!({ "portMappings": port_mappings }),
        );
    }
    conf
}

/// The pod's addresses from a result (without prefix length), IPv4 first:
/// those on our interface inside the sandbox (or every one whose interface
/// the result does not say), in the result's order. Reads 0.3.0+ (`ips`)
/// and 0.1/0.2 (`ip4`, `ip6`) results.
pub fn result_ips(result: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<Value>(result) else {
        return vec![];
    };
    let bare = |a: &str| a.split('/').next().unwrap_or(a).to_owned();
    let mut ips: Vec<String> = Vec::new();
    if let Some(list) = v.get("ips").and_then(Value::as_array) {
        let ifaces = v.get("interfaces").and_then(Value::as_array);
        for ip in list {
            let ours = match (ip.get("interface").and_then(Value::as_u64), ifaces) {
                (Some(i), Some(ifs)) => ifs.get(i as usize).is_some_and(|f| {
                    f.get("name").and_then(Value::as_str) == Some(IFNAME)
                        && f.get("sandbox")
                            .and_then(Value::as_str)
                            .is_some_and(|s| !s.is_empty())
                }),
                _ => true,
            };
            if let (true, Some(a)) = (ours, ip.get("address").and_then(Value::as_str)) {
                ips.push(bare(a));
            }
        }
    } else {
        for k in ["ip4", "ip6"] {
            if let Some(a) = v.get(k).and_then(|x| x.get("ip")).and_then(Value::as_str) {
                ips.push(bare(a));
            }
        }
    }
    ips.sort_by_key(|ip| ip.contains(':'));
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> NetConfList {
        NetConfList::parse(&serde_json::from_str(text).expect("json"), "x".into()).expect("parse")
    }

    #[test]
    fn configs_lists_and_single() {
        let l = list(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        );
        assert_eq!((l.name.as_str(), l.plugins.len()), ("n", 2));
        let s = list(r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#);
        assert_eq!(s.plugins.len(), 1);
        assert_eq!(s.cni_version, "0.3.1");
        for bad in [
            r#"{"plugins":[{"type":"x"}]}"#,
            r#"{"name":"n","plugins":[]}"#,
            r#"{"name":"n","plugins":[{"x":1}]}"#,
        ] {
            assert!(
                NetConfList::parse(&serde_json::from_str(bad).expect("json"), "x".into()).is_err()
            );
        }
    }

    #[test]
    fn plugin_stdin_has_name_version_prev_result_and_capabilities() {
        let l = list(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        );
        let pm = [PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }];
        let first = plugin_config(&l, &l.plugins[0], None, &pm);
        assert_eq!(first["name"], "n");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none() && first.get("runtimeConfig").is_none());
        let prev = json!({"ips":[{"address":"10.0.0.2/24"}]});
        let second = plugin_config(&l, &l.plugins[1], Some(&prev), &pm);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]})
        );
        assert!(plugin_config(&l, &l.plugins[1], None, &[])
            .get("runtimeConfig")
            .is_none());
    }

    #[test]
    fn ips_of_the_pod_interface_v4_first() {
        let r = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"address":"fd00::5/64","interface":2},{"address":"10.1.0.5/24","interface":2,"gateway":"10.1.0.1"},{"address":"10.1.0.1/24","interface":0}]}"#;
        assert_eq!(result_ips(r), ["10.1.0.5", "fd00::5"]);
        assert_eq!(
            result_ips(r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.2.0.3/16"}}"#),
            ["10.2.0.3"]
        );
        assert!(result_ips("not json").is_empty());
    }
}
