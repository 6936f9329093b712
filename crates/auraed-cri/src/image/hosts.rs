//! Where to pull a registry's images from: containerd's registry host
//! configuration (`certs.d`), so one directory serves both runtimes.
//!
//! `<dir>/<registry>/hosts.toml` (e.g. `certs.d/registry.k8s.io/hosts.toml`,
//! a registry with a port as `certs.d/host:5000/`; `certs.d/_default/` for
//! every registry without a directory of its own):
//!
//! ```toml
//! server = "https://registry.k8s.io"     # optional: the upstream, tried last
//! [host."http://127.0.0.1:5000"]         # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = false                  # TLS: accept any certificate
//!   ca = "/etc/certs/mirror-ca.pem"      # or a list: extra trusted roots
//! ```
//!
//! A registry without configuration is reached over HTTPS at its own name
//! (docker.io at registry-1.docker.io); a loopback registry is also tried
//! over plain HTTP. When hosts are configured and `server` is not, only
//! the hosts are tried (no fallback to the upstream, as in containerd).
//! Supported from the format: `server`, `[host]` with `capabilities`,
//! `skip_verify`, `ca`. Not yet: `client` certificates, `header`,
//! `override_path`, a path other than `/v2` in a host URL (refused), `*.crt`
//! files beside `hosts.toml`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One place to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// `host` or `host:port`, as the registry client's "registry".
    pub host: String,
    pub skip_verify: bool,
    /// Extra trusted root certificates (PEM files).
    pub ca: Vec<PathBuf>,
    pub can_resolve: bool,
    pub can_pull: bool,
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    host: toml::map::Map<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct HostEntry {
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    ca: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn paths(&self, base: &Path) -> Vec<PathBuf> {
        let list = match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        // Relative paths are relative to the hosts.toml's directory.
        list.into_iter().map(|p| base.join(p)).collect()
    }
}

/// The registry host configuration directory.
#[derive(Debug, Clone)]
pub struct RegistryHosts {
    dir: PathBuf,
}

impl RegistryHosts {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RegistryHosts { dir: dir.into() }
    }

    /// The endpoints to try for `registry` (as written in the image
    /// reference, e.g. `docker.io`, `registry.k8s.io`, `host:5000`), in
    /// order.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, HostsError> {
        for name in [registry, "_default"] {
            let path = self.dir.join(name).join("hosts.toml");
            match fs::read_to_string(&path) {
                Ok(text) => return parse(&path, &text, registry),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A registry name that is not a valid file name (or a
                // directory we cannot read) is a configuration problem.
                Err(e) => return Err(HostsError::Read { path, source: e }),
            }
        }
        Ok(default_endpoints(registry))
    }
}

fn default_endpoints(registry: &str) -> Vec<Endpoint> {
    let host = if registry == "docker.io" {
        "registry-1.docker.io".to_string()
    } else {
        registry.to_string()
    };
    let https = Endpoint {
        plain_http: false,
        host: host.clone(),
        skip_verify: false,
        ca: Vec::new(),
        can_resolve: true,
        can_pull: true,
    };
    if is_loopback(&host) {
        vec![
            https.clone(),
            Endpoint {
                plain_http: true,
                ..https
            },
        ]
    } else {
        vec![https]
    }
}

fn is_loopback(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn parse(path: &Path, text: &str, registry: &str) -> Result<Vec<Endpoint>, HostsError> {
    let invalid = |reason: String| HostsError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let file: HostsFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    for (url, value) in &file.host {
        let entry: HostEntry = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| invalid(format!("[host.{url:?}]: {e}")))?;
        let mut ep = endpoint_from_url(url).map_err(|r| invalid(format!("[host.{url:?}]: {r}")))?;
        apply(
            &mut ep,
            &entry.capabilities,
            entry.skip_verify,
            &entry.ca,
            base,
        );
        out.push(ep);
    }
    match &file.server {
        Some(server) => {
            let mut ep = endpoint_from_url(server).map_err(|r| invalid(format!("server: {r}")))?;
            apply(
                &mut ep,
                &file.capabilities,
                file.skip_verify,
                &file.ca,
                base,
            );
            out.push(ep);
        }
        // Neither hosts nor a server: the registry itself.
        None if out.is_empty() => out = default_endpoints(registry),
        None => {}
    }
    Ok(out)
}

fn apply(
    ep: &mut Endpoint,
    caps: &Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: &Option<OneOrMany>,
    base: &Path,
) {
    if let Some(caps) = caps {
        ep.can_pull = caps.iter().any(|c| c == "pull");
        ep.can_resolve = caps.iter().any(|c| c == "resolve");
    }
    ep.skip_verify = skip_verify.unwrap_or(false);
    ep.ca = ca.as_ref().map(|c| c.paths(base)).unwrap_or_default();
}

/// `http://host:port`, `https://host`, `host` (HTTPS), optionally with the
/// `/v2` path the registry API has anyway.
fn endpoint_from_url(url: &str) -> Result<Endpoint, String> {
    let (plain_http, rest) = if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else if url.contains("://") {
        return Err("only http:// and https:// are supported".into());
    } else {
        (false, url)
    };
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, p.trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if !(path.is_empty() || path == "v2") {
        return Err(format!(
            "path /{path} is not supported (only the registry root)"
        ));
    }
    Ok(Endpoint {
        plain_http,
        host: host.to_string(),
        skip_verify: false,
        ca: Vec::new(),
        can_resolve: true,
        can_pull: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, registry: &str, text: &str) {
        fs::create_dir_all(dir.join(registry)).expect("mkdir");
        fs::write(dir.join(registry).join("hosts.toml"), text).expect("write");
    }

    #[test]
    fn critest_mapping_is_a_plain_http_mirror_with_the_upstream_last() {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "registry.k8s.io",
            "server = \"http://127.0.0.1:5000\"\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        );
        let eps = RegistryHosts::new(d.path())
            .endpoints("registry.k8s.io")
            .expect("parse");
        assert_eq!(eps.len(), 2);
        assert!(eps
            .iter()
            .all(|e| e.plain_http && e.host == "127.0.0.1:5000" && e.can_pull));
    }

    #[test]
    fn hosts_keep_file_order_and_options() {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "docker.io",
            r#"
server = "https://registry-1.docker.io"
[host."https://zz-mirror.local"]
  capabilities = ["pull"]
  skip_verify = true
[host."https://aa-mirror.local/v2"]
  ca = ["ca.pem"]
"#,
        );
        let eps = RegistryHosts::new(d.path())
            .endpoints("docker.io")
            .expect("parse");
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(
            hosts,
            ["zz-mirror.local", "aa-mirror.local", "registry-1.docker.io"]
        );
        assert!(eps[0].skip_verify && eps[0].can_pull && !eps[0].can_resolve);
        assert_eq!(eps[1].ca, vec![d.path().join("docker.io/ca.pem")]);
        assert!(!eps[2].plain_http);
    }

    #[test]
    fn defaults_and_the_default_directory() {
        let d = tempfile::tempdir().expect("tempdir");
        let hosts = RegistryHosts::new(d.path());
        assert_eq!(
            hosts.endpoints("quay.io").expect("default")[0].host,
            "quay.io"
        );
        assert_eq!(
            hosts.endpoints("docker.io").expect("default")[0].host,
            "registry-1.docker.io"
        );
        let local = hosts.endpoints("127.0.0.1:5000").expect("default");
        assert_eq!(local.len(), 2);
        assert!(!local[0].plain_http && local[1].plain_http);
        write(d.path(), "_default", "[host.\"http://10.0.0.1:5000\"]\n");
        assert_eq!(
            hosts.endpoints("quay.io").expect("_default")[0].host,
            "10.0.0.1:5000"
        );
    }

    #[test]
    fn mistakes_name_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), "a.io", "[host.\"ftp://x\"]\n");
        write(d.path(), "b.io", "[host.\"https://x/prefix\"]\n");
        write(d.path(), "c.io", "server = [1]\n");
        for r in ["a.io", "b.io", "c.io"] {
            let e = RegistryHosts::new(d.path()).endpoints(r).expect_err(r);
            assert!(e.to_string().contains(&format!("{r}/hosts.toml")), "{e}");
        }
    }
}
