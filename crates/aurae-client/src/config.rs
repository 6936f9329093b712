//! The client config file, in the same TOML format and search order as the
//! public Aurae client:
//!
//! ```toml
//! [auth]
//! ca_crt = "~/.aurae/pki/ca.crt"
//! client_crt = "~/.aurae/pki/_signed.client.crt"
//! client_key = "~/.aurae/pki/client.key"
//!
//! [system]
//! socket = "/var/run/aurae/aurae.sock"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable naming a config file; looked at first.
pub const CONFIG_ENV: &str = "AURAE_CONFIG";
/// Where the config is searched after `$AURAE_CONFIG`, in order.
pub const CONFIG_SEARCH_PATH: [&str; 3] = [
    "~/.aurae/config",
    "/etc/aurae/config",
    "/var/lib/aurae/config",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    pub auth: AuthConfig,
    pub system: SystemConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthConfig {
    pub ca_crt: String,
    pub client_crt: String,
    pub client_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemConfig {
    /// A unix socket path, or `IP:PORT` for TCP.
    pub socket: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no client config found (looked at ${CONFIG_ENV}, {})", CONFIG_SEARCH_PATH.join(", "))]
    NotFound,
    #[error("cannot read client config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("client config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl ClientConfig {
    /// Loads the config from `explicit` if given, else from the search path.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(p) = explicit {
            return Self::from_file(&expand_tilde(&p.to_string_lossy()));
        }
        let env = std::env::var(CONFIG_ENV).ok().filter(|s| !s.is_empty());
        for candidate in env.iter().map(String::as_str).chain(CONFIG_SEARCH_PATH) {
            let path = expand_tilde(candidate);
            if path.is_file() {
                return Self::from_file(&path);
            }
        }
        Err(ConfigError::NotFound)
    }

    /// Reads one config file; `~` in the paths it names is expanded.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: ClientConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        for p in [
            &mut cfg.auth.ca_crt,
            &mut cfg.auth.client_crt,
            &mut cfg.auth.client_key,
            &mut cfg.system.socket,
        ] {
            *p = expand_tilde(p).to_string_lossy().into_owned();
        }
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain strings into TOML cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

/// Expands a leading `~` to `$HOME`.
pub fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix('~'), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
            PathBuf::from(format!("{}{}", home.to_string_lossy(), rest))
        }
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aurae_format_and_expands_tilde() {
        let dir = std::env::temp_dir().join(format!("aurae-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config");
        std::fs::write(
            &path,
            "[auth]\nca_crt = \"~/pki/ca.crt\"\nclient_crt = \"/c.crt\"\nclient_key = \"/c.key\"\n\n[system]\nsocket = \"/run/a.sock\"\n",
        )
        .unwrap();
        let cfg = ClientConfig::from_file(&path).unwrap();
        assert!(!cfg.auth.ca_crt.starts_with('~'));
        assert!(cfg.auth.ca_crt.ends_with("/pki/ca.crt"));
        assert_eq!(cfg.system.socket, "/run/a.sock");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_explicit_file_is_a_read_error() {
        let err = ClientConfig::load(Some(Path::new("/nonexistent/aurae/config"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
