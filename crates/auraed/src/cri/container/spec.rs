//! The OCI runtime spec (`config.json`) of a CRI container, built the way
//! containerd's CRI plugin builds it: the image's config (entrypoint, cmd,
//! env, working dir, user) under the CRI config (command, args, envs,
//! security context, mounts), containerd's default capabilities, masked
//! and read-only paths, and the pod's namespaces joined by path
//! (`/proc/<holder pid>/ns/*`: the sandbox cell's holder plays the pause
//! container's part).
//!
//! The document is assembled as JSON, starting from `oci_spec`'s defaults
//! for the standard mounts, then parsed into `oci_spec::runtime::Spec`
//! before it is written, so that a malformed field fails CreateContainer
//! rather than crun.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use auraed_cri::proto;
use serde_json::{json, Value};

use super::ContainerError;

/// containerd's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability (privileged containers and "ALL"), in the kernel's
/// numbering (index = capability number).
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's defaults.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What the image's config says (`config` of the image config blob).
#[derive(Debug, Default, Clone)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageConfig {
    pub fn parse(blob: &[u8]) -> ImageConfig {
        let v: Value = serde_json::from_slice(blob).unwrap_or(Value::Null);
        let c = &v["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_owned(),
            user: c["User"].as_str().unwrap_or("").to_owned(),
        }
    }
}

/// kubelet's rule: the CRI command replaces the entrypoint (and then the
/// image's cmd is not used), the CRI args replace the image's cmd.
pub fn process_args(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    let mut out: Vec<String> = if command.is_empty() {
        image.entrypoint.clone()
    } else {
        command.to_vec()
    };
    if !args.is_empty() {
        out.extend(args.iter().cloned());
    } else if command.is_empty() {
        out.extend(image.cmd.iter().cloned());
    }
    out
}

/// Image env, then the CRI's (a later KEY wins, in the first KEY's place).
pub fn env(image: &[String], cri: &[proto::KeyValue]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut vals: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: String, v: String| {
        if !vals.contains_key(&k) {
            keys.push(k.clone());
        }
        vals.insert(k, v);
    };
    for e in image {
        let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
        put(k.to_owned(), v.to_owned());
    }
    for kv in cri {
        put(
            kv.key.clone(),
            String::from_utf8_lossy(&kv.value).into_owned(),
        );
    }
    if !keys.iter().any(|k| k == "PATH") {
        keys.push("PATH".into());
        vals.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    keys.into_iter()
        .map(|k| {
            let v = vals.get(&k).cloned().unwrap_or_default();
            format!("{k}={v}")
        })
        .collect()
}

/// Who the process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
}

fn passwd(rootfs: &Path) -> Vec<Passwd> {
    let text = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// (name, gid, members) of /etc/group.
fn groups(rootfs: &Path) -> Vec<(String, u32, Vec<String>)> {
    let text = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((
                f.first()?.to_string(),
                f.get(2)?.parse().ok()?,
                f.get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            ))
        })
        .collect()
}

/// Resolves the user: the CRI's run_as_user / run_as_username, else the
/// image's `User` (`name`, `uid`, `uid:gid`, `name:group`), names looked up
/// in the image's /etc/passwd and /etc/group; run_as_group overrides the
/// group; the user's groups in /etc/group and supplemental_groups are
/// added.
pub fn user(
    rootfs: &Path,
    image_user: &str,
    sc: Option<&proto::LinuxContainerSecurityContext>,
) -> Result<User, ContainerError> {
    if let Some(s) = sc {
        if s.run_as_group.is_some() && s.run_as_user.is_none() && s.run_as_username.is_empty() {
            return Err(ContainerError::Invalid(
                "run_as_group needs run_as_user or run_as_username".into(),
            ));
        }
    }
    let pw = passwd(rootfs);
    let gr = groups(rootfs);
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
        None => (image_user.to_owned(), None),
    };
    let by_name = |n: &str| pw.iter().find(|p| p.name == n);
    let (uid, mut gid, name) = if let Some(u) = sc.and_then(|s| s.run_as_user.as_ref()) {
        let uid = u32::try_from(u.value).map_err(|_| {
            ContainerError::Invalid(format!("run_as_user {} is out of range", u.value))
        })?;
        let p = pw.iter().find(|p| p.uid == uid);
        (uid, p.map(|p| p.gid), p.map(|p| p.name.clone()))
    } else if let Some(n) = sc
        .map(|s| s.run_as_username.as_str())
        .filter(|n| !n.is_empty())
    {
        let p = by_name(n).ok_or_else(|| {
            ContainerError::Invalid(format!("user {n:?} is not in the image's /etc/passwd"))
        })?;
        (p.uid, Some(p.gid), Some(p.name.clone()))
    } else if user_part.is_empty() {
        (0, Some(0), Some("root".to_owned()))
    } else if let Ok(uid) = user_part.parse::<u32>() {
        let p = pw.iter().find(|p| p.uid == uid);
        (uid, p.map(|p| p.gid), p.map(|p| p.name.clone()))
    } else {
        let p = by_name(&user_part).ok_or_else(|| {
            ContainerError::Invalid(format!(
                "image user {user_part:?} is not in the image's /etc/passwd"
            ))
        })?;
        (p.uid, Some(p.gid), Some(p.name.clone()))
    };
    if let Some(g) = group_part.filter(|_| sc.and_then(|s| s.run_as_user.as_ref()).is_none()) {
        gid = Some(match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => gr.iter().find(|x| x.0 == g).map(|x| x.1).ok_or_else(|| {
                ContainerError::Invalid(format!("group {g:?} is not in the image's /etc/group"))
            })?,
        });
    }
    if let Some(g) = sc.and_then(|s| s.run_as_group.as_ref()) {
        gid = Some(u32::try_from(g.value).map_err(|_| {
            ContainerError::Invalid(format!("run_as_group {} is out of range", g.value))
        })?);
    }
    let gid = gid.unwrap_or(0);
    let mut additional: Vec<u32> = Vec::new();
    if let Some(n) = &name {
        for (_, g, members) in &gr {
            if members.iter().any(|m| m == n) && *g != gid && !additional.contains(g) {
                additional.push(*g);
            }
        }
    }
    for g in sc.map(|s| s.supplemental_groups.as_slice()).unwrap_or(&[]) {
        if let Ok(g) = u32::try_from(*g) {
            if !additional.contains(&g) {
                additional.push(g);
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids: additional,
    })
}

fn cap_name(c: &str) -> String {
    let up = c.to_ascii_uppercase();
    if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// The capability set: defaults (or all when privileged), then add, then
/// drop (containerd's order; "ALL" in either).
pub fn capabilities(privileged: bool, caps: Option<&proto::Capability>) -> Vec<String> {
    let all = || -> Vec<String> { ALL_CAPS.iter().map(|s| s.to_string()).collect() };
    let mut set: Vec<String> = if privileged {
        all()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if let Some(c) = caps {
        for a in &c.add_capabilities {
            if a.eq_ignore_ascii_case("ALL") {
                set = all();
            } else {
                let n = cap_name(a);
                if !set.contains(&n) {
                    set.push(n);
                }
            }
        }
        for d in &c.drop_capabilities {
            if d.eq_ignore_ascii_case("ALL") {
                set.clear();
            } else {
                let n = cap_name(d);
                set.retain(|x| *x != n);
            }
        }
    }
    // Only what the daemon itself may hand out: the runtime fails on a
    // capability outside its bounding set (here root lacks some, e.g.
    // CAP_SYS_RESOURCE), as containerd's "all" is its own set.
    let bounding = own_bounding_set();
    set.retain(|c| {
        ALL_CAPS
            .iter()
            .position(|a| a == c)
            .is_none_or(|i| bounding.is_none_or(|b| b & (1u64 << i) != 0))
    });
    set
}

/// CapBnd of this process (None if unreadable: then nothing is filtered).
fn own_bounding_set() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = text.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The syscalls the default profile withholds: containerd's default
/// profile is an allowlist derived from Docker's; this is its complement
/// for what a container without extra capabilities has no business
/// calling (kernel modules, kexec, reboot, swap, accounting, raw I/O,
/// keyrings, BPF/perf, userfaultfd, handles), plus the cap-gated ones
/// unless the container holds the capability.
const DENIED_ALWAYS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "query_module",
    "reboot",
    "request_key",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];
const DENIED_WITHOUT_SYS_ADMIN: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "unshare",
    "setns",
    "pivot_root",
    "name_to_handle_at",
    "quotactl",
    "fsopen",
    "fsmount",
    "fsconfig",
    "move_mount",
    "open_tree",
    "fspick",
];
const DENIED_WITHOUT_SYS_TIME: &[&str] =
    &["settimeofday", "stime", "clock_settime", "clock_adjtime"];

fn default_seccomp(caps: &[String]) -> Value {
    let mut names: Vec<&str> = DENIED_ALWAYS.to_vec();
    if !caps.iter().any(|c| c == "CAP_SYS_ADMIN") {
        names.extend_from_slice(DENIED_WITHOUT_SYS_ADMIN);
    }
    if !caps.iter().any(|c| c == "CAP_SYS_TIME") {
        names.extend_from_slice(DENIED_WITHOUT_SYS_TIME);
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [{"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

/// A Docker-format profile file (what kubelet's Localhost profiles are)
/// as the OCI `linux.seccomp`: the same fields, minus Docker's own.
fn localhost_seccomp(path: &str) -> Result<Value, ContainerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ContainerError::Invalid(format!("seccomp profile {path}: {e}")))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ContainerError::Invalid(format!("seccomp profile {path}: {e}")))?;
    let mut out = serde_json::Map::new();
    for k in [
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "flags",
        "listenerPath",
    ] {
        if let Some(x) = v.get(k) {
            out.insert(k.into(), x.clone());
        }
    }
    if let Some(arches) = v.get("archMap").and_then(|a| a.as_array()) {
        if !out.contains_key("architectures") {
            let mut list = Vec::new();
            for a in arches {
                if let Some(x) = a.get("architecture") {
                    list.push(x.clone());
                }
                if let Some(subs) = a.get("subArchitectures").and_then(|s| s.as_array()) {
                    list.extend(subs.iter().cloned());
                }
            }
            out.insert("architectures".into(), Value::Array(list));
        }
    }
    let mut syscalls = Vec::new();
    for sc in v
        .get("syscalls")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        let mut c = serde_json::Map::new();
        let names = match (sc.get("names"), sc.get("name")) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) => json!([n]),
            _ => continue,
        };
        c.insert("names".into(), names);
        for k in ["action", "errnoRet", "args"] {
            if let Some(x) = sc.get(k).filter(|x| !x.is_null()) {
                c.insert(k.into(), x.clone());
            }
        }
        syscalls.push(Value::Object(c));
    }
    out.insert("syscalls".into(), Value::Array(syscalls));
    Ok(Value::Object(out))
}

/// `linux.seccomp`: none when privileged or unconfined (or unset, as
/// kubelet means it), the default profile, or a Localhost file.
pub fn seccomp(
    sc: &proto::LinuxContainerSecurityContext,
    caps: &[String],
) -> Result<Option<Value>, ContainerError> {
    if sc.privileged {
        return Ok(None);
    }
    if let Some(p) = &sc.seccomp {
        return match p.profile_type {
            0 => Ok(Some(default_seccomp(caps))),
            2 => localhost_seccomp(&p.localhost_ref).map(Some),
            _ => Ok(None),
        };
    }
    // The field older kubelets still send.
    #[allow(deprecated)]
    let path = sc.seccomp_profile_path.as_str();
    if path == "runtime/default" || path == "docker/default" {
        Ok(Some(default_seccomp(caps)))
    } else if let Some(file) = path.strip_prefix("localhost/") {
        localhost_seccomp(file).map(Some)
    } else {
        Ok(None)
    }
}

/// Where the pod's namespaces are (None: the host's).
#[derive(Debug, Clone, Default)]
pub struct PodNamespaces {
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub pid: Option<PathBuf>,
}

/// Everything `build` needs besides the CRI config.
pub struct Inputs<'a> {
    pub config: &'a proto::ContainerConfig,
    pub image: &'a ImageConfig,
    pub rootfs: &'a Path,
    pub pod: PodNamespaces,
    /// `hosts`, `resolv.conf`, `hostname` files the sandbox has, by
    /// container path.
    pub sandbox_files: Vec<(String, PathBuf)>,
    /// The container's own sysctls (from the pod's config).
    pub sysctls: BTreeMap<String, String>,
    /// The pod's hostname ("" for none).
    pub hostname: String,
}

fn propagation(p: i32) -> &'static str {
    match p {
        1 => "rslave",
        2 => "rshared",
        _ => "rprivate",
    }
}

/// The bind mounts of the CRI config: a host path that is a symlink is
/// resolved, a missing one is created as a directory (as containerd does).
fn cri_mounts(mounts: &[proto::Mount]) -> Result<Vec<Value>, ContainerError> {
    let mut out = Vec::new();
    for m in mounts {
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(ContainerError::Unimplemented(format!(
                "mounts: image volumes ({}) are not supported yet",
                m.container_path
            )));
        }
        if m.container_path.is_empty() || m.host_path.is_empty() {
            return Err(ContainerError::Invalid(
                "mounts: container_path and host_path are required".into(),
            ));
        }
        let host = Path::new(&m.host_path);
        if std::fs::symlink_metadata(host).is_err() {
            std::fs::create_dir_all(host).map_err(|e| {
                ContainerError::Invalid(format!("mount host path {}: {e}", m.host_path))
            })?;
        }
        let src = std::fs::canonicalize(host).map_err(|e| {
            ContainerError::Invalid(format!("mount host path {}: {e}", m.host_path))
        })?;
        let mut opts = vec!["rbind", propagation(m.propagation)];
        opts.push(if m.readonly { "ro" } else { "rw" });
        out.push(json!({
            "destination": m.container_path,
            "type": "bind",
            "source": src,
            "options": opts,
        }));
    }
    Ok(out)
}

/// The container's `config.json`, checked against the OCI types.
pub fn build(i: &Inputs<'_>) -> Result<(Value, User), ContainerError> {
    let c = i.config;
    let linux = c.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;
    let args = process_args(i.image, &c.command, &c.args);
    if args.is_empty() {
        return Err(ContainerError::Invalid(
            "no command: neither the config nor the image names one".into(),
        ));
    }
    let user = user(i.rootfs, &i.image.user, linux.security_context.as_ref())?;
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else if !i.image.working_dir.is_empty() {
        i.image.working_dir.clone()
    } else {
        "/".into()
    };
    let caps = capabilities(privileged, sc.capabilities.as_ref());
    let ambient: Vec<String> = sc
        .capabilities
        .as_ref()
        .map(|c| {
            c.add_ambient_capabilities
                .iter()
                .map(|a| cap_name(a))
                .collect()
        })
        .unwrap_or_default();

    // Mounts: the standard ones (oci-spec's defaults), the sandbox's files,
    // then the CRI's (a CRI mount on the same path replaces ours).
    let defaults = serde_json::to_value(oci_spec::runtime::Spec::default())
        .map_err(|e| ContainerError::Internal(e.to_string()))?;
    let mut mounts: Vec<Value> = defaults["mounts"].as_array().cloned().unwrap_or_default();
    if privileged {
        for m in &mut mounts {
            if m["destination"] == "/sys" || m["destination"] == "/sys/fs/cgroup" {
                if let Some(opts) = m["options"].as_array_mut() {
                    opts.retain(|o| o != "ro");
                    opts.push(json!("rw"));
                }
            }
        }
    }
    let cri = cri_mounts(&c.mounts)?;
    let cri_dests: Vec<String> = c.mounts.iter().map(|m| m.container_path.clone()).collect();
    mounts.retain(|m| {
        !cri_dests
            .iter()
            .any(|d| m["destination"].as_str() == Some(d.as_str()))
    });
    for (dest, src) in &i.sandbox_files {
        if cri_dests.iter().any(|d| d == dest) {
            continue;
        }
        mounts.push(json!({
            "destination": dest,
            "type": "bind",
            "source": src,
            "options": ["rbind", "rprivate", if sc.readonly_rootfs { "ro" } else { "rw" }],
        }));
    }
    mounts.extend(cri);

    let ns = sc.namespace_options.clone().unwrap_or_default();
    let mut namespaces = vec![json!({"type": "mount"})];
    let mut join = |kind: &str, p: &Option<PathBuf>| {
        if let Some(p) = p {
            namespaces.push(json!({"type": kind, "path": p}));
        }
    };
    join("network", &i.pod.network);
    join("ipc", &i.pod.ipc);
    join("uts", &i.pod.uts);
    // pid: the pod's (POD), the host's (NODE) or one of its own.
    match ns.pid {
        0 if i.pod.pid.is_some() => join("pid", &i.pod.pid),
        2 => {}
        _ => namespaces.push(json!({"type": "pid"})),
    }

    let (masked, readonly): (Vec<String>, Vec<String>) = if privileged {
        (vec![], vec![])
    } else {
        (
            if sc.masked_paths.is_empty() {
                MASKED_PATHS.iter().map(|s| s.to_string()).collect()
            } else {
                sc.masked_paths.clone()
            },
            if sc.readonly_paths.is_empty() {
                READONLY_PATHS.iter().map(|s| s.to_string()).collect()
            } else {
                sc.readonly_paths.clone()
            },
        )
    };

    let mut spec = json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {
                "uid": user.uid,
                "gid": user.gid,
                "additionalGids": user.additional_gids,
            },
            "args": args,
            "env": env(&i.image.env, &c.envs),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "ambient": ambient,
            },
            "noNewPrivileges": sc.no_new_privs,
        },
        "root": {"path": i.rootfs, "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": c.annotations,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            "sysctl": i.sysctls,
        },
    });
    // The pod's hostname, set in the UTS namespace the container is in
    // (the pod's: every container sets the same; never the host's).
    if !i.hostname.is_empty() && namespaces.iter().any(|n| n["type"] == "uts") {
        spec["hostname"] = json!(i.hostname);
    }
    // Bidirectional mounts need the rootfs shared, host-to-container ones
    // at least slave (containerd's rule), or propagation stops there.
    if c.mounts.iter().any(|m| m.propagation == 2) {
        spec["linux"]["rootfsPropagation"] = json!("rshared");
    } else if c.mounts.iter().any(|m| m.propagation == 1) {
        spec["linux"]["rootfsPropagation"] = json!("rslave");
    }
    if let Some(profile) = seccomp(&sc, &caps)? {
        spec["linux"]["seccomp"] = profile;
    }
    // Typed check: a field oci-spec cannot read is a bug here, not crun's.
    serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
        .map_err(|e| ContainerError::Internal(format!("OCI spec: {e}")))?;
    Ok((spec, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(ep: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: ep.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_follow_kubelet() {
        let i = img(&["/ep"], &["c1"]);
        assert_eq!(process_args(&i, &[], &[]), v(&["/ep", "c1"]));
        assert_eq!(process_args(&i, &v(&["x"]), &[]), v(&["x"]));
        assert_eq!(process_args(&i, &[], &v(&["a"])), v(&["/ep", "a"]));
        assert_eq!(process_args(&i, &v(&["x"]), &v(&["a"])), v(&["x", "a"]));
    }

    #[test]
    fn env_later_wins_in_place() {
        let e = env(
            &v(&["PATH=/bin", "A=1"]),
            &[proto::KeyValue {
                key: "A".into(),
                value: b"2".to_vec(),
            }],
        );
        assert_eq!(e, v(&["PATH=/bin", "A=2"]));
    }

    #[test]
    fn users_from_passwd_and_group() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww:x:33:34::/:/bin/sh\n",
        )
        .expect("write");
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\ndata:x:34:\nextra:x:50:www\n",
        )
        .expect("write");
        let u = user(d.path(), "www", None).expect("www");
        assert_eq!(
            (u.uid, u.gid, u.additional_gids.clone()),
            (33, 34, vec![50])
        );
        let u = user(d.path(), "1000:data", None).expect("1000");
        assert_eq!((u.uid, u.gid), (1000, 34));
        let sc = proto::LinuxContainerSecurityContext {
            run_as_username: "www".into(),
            run_as_group: Some(proto::Int64Value { value: 7 }),
            supplemental_groups: vec![8],
            ..Default::default()
        };
        let u = user(d.path(), "", Some(&sc)).expect("sc");
        assert_eq!((u.uid, u.gid, u.additional_gids), (33, 7, vec![50, 8]));
        assert!(user(d.path(), "nobody", None).is_err());
    }

    #[test]
    fn caps_add_then_drop() {
        let c = proto::Capability {
            add_capabilities: v(&["sys_admin"]),
            drop_capabilities: v(&["CAP_CHOWN"]),
            ..Default::default()
        };
        let s = capabilities(false, Some(&c));
        assert!(s.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(!s.contains(&"CAP_CHOWN".to_string()));
        let c = proto::Capability {
            drop_capabilities: v(&["ALL"]),
            ..Default::default()
        };
        assert!(capabilities(false, Some(&c)).is_empty());
    }
}
