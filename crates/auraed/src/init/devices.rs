//! Kernel modules, the TLS identity from fw_cfg, and the ACPI power button.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::config::Config;

/// The initramfs lists the modules to load, dependencies first
/// (scripts/guest-image writes it from modules.dep).
pub const MODULE_LIST: &str = "/etc/aurae/modules";

/// Loads each module of the list; one that is built in or already loaded
/// (EEXIST) is fine, one that fails is logged and skipped.
pub fn load_modules(list: &Path) {
    let Ok(text) = std::fs::read_to_string(list) else {
        tracing::debug!("no {}; loading no modules", list.display());
        return;
    };
    let mut loaded = 0;
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match load_module(Path::new(path)) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => tracing::warn!("cannot load module {path}: {e}"),
        }
    }
    tracing::info!("loaded {loaded} kernel modules");
}

fn load_module(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    let params = c"";
    // SAFETY: finit_module reads the module from an open fd and a
    // NUL-terminated (empty) parameter string; both outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies the identity the host passed through fw_cfg to the paths the
/// config names. Without one, the daemon's development PKI takes over
/// (useful on a console, useless to the host, which cannot trust it).
pub fn install_identity(fw_cfg: &Path, config: &Config) {
    let items: [(&str, &PathBuf); 3] = [
        (super::FW_CFG_CA, &config.ca_crt),
        (super::FW_CFG_SERVER_CRT, &config.server_crt),
        (super::FW_CFG_SERVER_KEY, &config.server_key),
    ];
    if !fw_cfg.exists() {
        tracing::warn!(
            "no {}: no TLS identity from the host; a development PKI will be generated",
            fw_cfg.display()
        );
        return;
    }
    for (name, dest) in items {
        let src = fw_cfg.join(name).join("raw");
        let copied = std::fs::read_to_string(&src)
            .map_err(|e| e.to_string())
            .and_then(|t| crate::pki::write_private(dest, &t).map_err(|e| e.to_string()));
        match copied {
            Ok(()) => tracing::info!("TLS: {} from fw_cfg {name}", dest.display()),
            Err(e) => tracing::warn!("TLS: cannot install {name} from {}: {e}", src.display()),
        }
    }
}

/// The evdev node of the ACPI power button, if the driver bound one.
fn find_power_button() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/input").ok()?;
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .find(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|n| n.trim() == "Power Button")
        })
        .map(|e| Path::new("/dev/input").join(e.file_name()))
}

/// Completes when the ACPI power button is pressed (QMP
/// `system_powerdown`); pending forever if there is none.
pub async fn power_button() {
    use tokio::io::AsyncReadExt;
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Some(path) = find_power_button() else {
        tracing::info!("no ACPI power button; shut down with SIGTERM");
        return std::future::pending().await;
    };
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", path.display());
            return std::future::pending().await;
        }
    };
    tracing::info!("watching the power button at {}", path.display());
    // struct input_event on 64-bit: timeval (16), type u16, code u16, value i32.
    let mut ev = [0u8; 24];
    loop {
        if let Err(e) = f.read_exact(&mut ev).await {
            tracing::warn!("power button read failed: {e}");
            return std::future::pending().await;
        }
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            tracing::info!("power button pressed");
            return;
        }
    }
}
