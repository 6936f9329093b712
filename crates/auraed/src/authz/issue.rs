//! `auraed pki issue-client`: a client certificate, its key and a client
//! config, signed by the node CA (`ca.key` beside `ca.crt`).
//!
//! `--role` is recorded in the policy file (`alice = ["observer"]` under
//! `[identities]`), not in the certificate: a role baked into a
//! certificate (an OU, say) could only be taken back by revoking the
//! certificate, and auraed has no revocation list, so a certificate once
//! issued as admin would stay admin until it expires. In the policy the
//! grant is one line the operator can read, change or remove, and a
//! SIGHUP makes it take effect.

use std::path::{Path, PathBuf};

use aurae_client::{AuthConfig, ClientConfig, SystemConfig};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};

use super::policy::{Policy, PolicyError};
use crate::pki::{write_private, PkiError};

/// `auraed pki ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PkiCommand {
    /// Mint a client certificate (+ key + client config) from the node CA,
    /// with NAME in its CN and SAN, and optionally grant it roles in the
    /// policy file.
    IssueClient(IssueClient),
}

#[derive(Debug, Clone, clap::Args)]
pub struct IssueClient {
    /// The identity: a name (DNS-style: letters, digits, '.', '-', '_'),
    /// an email address or a URI (e.g. spiffe://example.org/ci).
    #[arg(long)]
    pub name: String,

    /// Grant this role (repeatable): adds NAME = [ROLE, ...] under
    /// [identities] in the --policy file (the role must be defined there).
    #[arg(long)]
    pub role: Vec<String>,

    /// The policy file --role edits (the daemon's --authz-policy); send
    /// auraed SIGHUP afterwards to apply it.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// The directory of the node CA (ca.crt and ca.key).
    #[arg(long, default_value = "/etc/aurae/pki")]
    pub pki_dir: PathBuf,

    /// Where to write NAME.crt, NAME.key and NAME.toml. Default:
    /// PKI_DIR/clients.
    #[arg(long)]
    pub out: Option<PathBuf>,

    /// The socket (or IP:PORT) written into the client config.
    #[arg(long, default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: String,

    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,

    /// Overwrite existing files of the same name.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("--name {0:?}: {1}")]
    Name(String, &'static str),
    #[error(
        "--role needs --policy FILE: roles are granted in the policy file, not the certificate"
    )]
    NoPolicy,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot edit {path}: {reason}")]
    Edit { path: PathBuf, reason: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot sign with the node CA: {0}")]
    Sign(#[from] rcgen::Error),
    #[error(transparent)]
    Write(#[from] PkiError),
}

/// The files written.
#[derive(Debug)]
pub struct Issued {
    pub crt: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
}

enum Kind {
    Dns,
    Email,
    Uri,
}

fn name_kind(name: &str) -> Result<Kind, IssueError> {
    let bad = |why| Err(IssueError::Name(name.to_owned(), why));
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1..=253 characters");
    }
    if name.bytes().any(|b| !b.is_ascii_graphic()) {
        return bad("must be printable ASCII without spaces");
    }
    if name.contains("://") {
        return Ok(Kind::Uri);
    }
    if name.contains('@') {
        return Ok(Kind::Email);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return bad("a name must be letters, digits, '.', '-' or '_' (or an email or a URI)");
    }
    Ok(Kind::Dns)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

fn read(path: &Path) -> Result<String, IssueError> {
    std::fs::read_to_string(path).map_err(|source| IssueError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The policy text with `name` granted `roles` (kept as it was written
/// otherwise, comments included), checked like the daemon checks it.
fn grant(path: &Path, name: &str, roles: &[String]) -> Result<String, IssueError> {
    let edit = |reason: String| IssueError::Edit {
        path: path.to_owned(),
        reason,
    };
    let mut doc: toml_edit::DocumentMut = read(path)?.parse().map_err(|e| edit(format!("{e}")))?;
    let ids = doc
        .entry("identities")
        .or_insert(toml_edit::table())
        .as_table_like_mut()
        .ok_or_else(|| edit("[identities] is not a table".into()))?;
    let list = ids
        .entry(name)
        .or_insert(toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .ok_or_else(|| edit(format!("identities.{name:?} is not an array")))?;
    for role in roles {
        if !list.iter().any(|v| v.as_str() == Some(role)) {
            list.push(role.as_str());
        }
    }
    let text = doc.to_string();
    Policy::parse(&text, path)?;
    Ok(text)
}

pub fn issue(args: &IssueClient) -> Result<Issued, IssueError> {
    let kind = name_kind(&args.name)?;
    let policy_text = match (&args.policy, args.role.is_empty()) {
        (None, false) => return Err(IssueError::NoPolicy),
        (Some(p), false) => Some((p, grant(p, &args.name, &args.role)?)),
        (_, true) => None,
    };
    let ca_crt = args.pki_dir.join("ca.crt");
    let ca_pem = read(&ca_crt)?;
    let ca_key = KeyPair::from_pem(&read(&args.pki_dir.join("ca.key"))?)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, &args.name);
    p.subject_alt_names.push(match kind {
        Kind::Dns => SanType::DnsName(args.name.as_str().try_into()?),
        Kind::Email => SanType::Rfc822Name(args.name.as_str().try_into()?),
        Kind::Uri => SanType::URI(args.name.as_str().try_into()?),
    });
    // auraed's verifier requires both (listener.rs).
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // From yesterday, so that a clock a little behind accepts it at once.
    let (y, m, d) = civil(today - 1);
    p.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + i64::from(args.days));
    p.not_after = rcgen::date_time_ymd(y, m, d);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.pki_dir.join("clients"));
    let stem: String = args
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let issued = Issued {
        crt: out.join(format!("{stem}.crt")),
        key: out.join(format!("{stem}.key")),
        config: out.join(format!("{stem}.toml")),
    };
    if !args.force {
        for f in [&issued.crt, &issued.key, &issued.config] {
            if f.exists() {
                return Err(IssueError::Exists(f.clone()));
            }
        }
    }
    let abs = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_owned())
            .display()
            .to_string()
    };
    let config = ClientConfig {
        auth: AuthConfig {
            ca_crt: abs(&ca_crt),
            client_crt: abs(&issued.crt),
            client_key: abs(&issued.key),
        },
        system: SystemConfig {
            socket: if args.socket.parse::<std::net::SocketAddr>().is_ok() {
                args.socket.clone()
            } else {
                abs(Path::new(&args.socket))
            },
        },
    };
    write_private(&issued.key, &key.serialize_pem())?;
    write_private(&issued.crt, &cert.pem())?;
    write_private(&issued.config, &config.to_toml())?;
    if let Some((path, text)) = policy_text {
        write_keeping_mode(path, &text)?;
    }
    Ok(issued)
}

/// Replaces `path` whole (temp file + rename) with its permissions kept.
fn write_keeping_mode(path: &Path, text: &str) -> Result<(), IssueError> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions())
        .map_err(|source| IssueError::Read {
            path: path.to_owned(),
            source,
        })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |source| {
        IssueError::Write(PkiError::Write {
            path: path.to_owned(),
            source,
        })
    };
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::set_permissions(&tmp, mode).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Runs the subcommand; the process's exit code.
pub fn main(cmd: &PkiCommand) -> std::process::ExitCode {
    let PkiCommand::IssueClient(args) = cmd;
    match issue(args) {
        Ok(i) => {
            println!("certificate {}", i.crt.display());
            println!("key         {}", i.key.display());
            println!("config      {}  (aer --config {0} ...)", i.config.display());
            if let Some(p) = &args.policy {
                if !args.role.is_empty() {
                    println!(
                        "granted {:?} the roles {} in {}; send auraed SIGHUP (or restart it) to apply",
                        args.name,
                        args.role.join(", "),
                        p.display()
                    );
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("auraed pki issue-client: {}", aurae_client::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(20_424), (2025, 12, 2));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn names() {
        assert!(matches!(name_kind("alice"), Ok(Kind::Dns)));
        assert!(matches!(name_kind("a@b.c"), Ok(Kind::Email)));
        assert!(matches!(name_kind("spiffe://x/y"), Ok(Kind::Uri)));
        for bad in ["", "a b", "a/b", "a\u{e9}"] {
            assert!(name_kind(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn grant_keeps_the_file_and_checks_roles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let text = "# who\n[identities]\nbob = [\"obs\"]\n\n[[roles.obs.rules]]\nmethods = [\"aurae.cells.v0.CellService/List\"]\ncells = [\"**\"]\n";
        std::fs::write(&path, text).unwrap();
        let out = grant(&path, "alice", &["obs".into()]).unwrap();
        assert!(
            out.starts_with("# who\n[identities]\nbob = [\"obs\"]\nalice = [\"obs\"]\n"),
            "{out}"
        );
        let again = grant(&path, "bob", &["obs".into()]).unwrap();
        assert_eq!(again, text);
        let e = grant(&path, "alice", &["admin".into()]).unwrap_err();
        assert!(e.to_string().contains("no role \"admin\""), "{e}");
    }
}
