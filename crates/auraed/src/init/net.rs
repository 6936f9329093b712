//! Loopback and the first NIC, configured with the classic ioctls (no
//! netlink dependency for three calls).
//!
//! Address: from the kernel command line's `ip=CLIENT:SERVER:GW:NETMASK:…`
//! (the kernel's nfsroot syntax; Debian's kernel has no built-in IP
//! autoconfig, so it is ours to apply), otherwise QEMU user networking's
//! fixed plan: 10.0.2.15/24, gateway 10.0.2.2.

use std::{io, net::Ipv4Addr, os::fd::AsRawFd, time::Duration};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

pub const DEFAULT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const DEFAULT_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const DEFAULT_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

#[derive(Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub addr: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub device: Option<String>,
}

impl IpConfig {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut c = IpConfig {
            addr: DEFAULT_ADDR,
            mask: DEFAULT_MASK,
            gateway: Some(DEFAULT_GW),
            device: None,
        };
        let Some(ip) = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ip="))
        else {
            return c;
        };
        let f: Vec<&str> = ip.split(':').collect();
        let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
        if let Some(a) = field(0).and_then(|s| s.parse().ok()) {
            c.addr = a;
        }
        c.gateway = field(2).and_then(|s| s.parse().ok());
        if let Some(m) = field(3).and_then(|s| s.parse().ok()) {
            c.mask = m;
        }
        c.device = field(5).map(str::to_owned);
        c
    }
}

/// Brings lo up, then the NIC. Logs failures; never fails.
pub fn configure(cfg: &IpConfig) {
    if let Err(e) = set_up("lo") {
        tracing::warn!("cannot bring lo up: {e}");
    }
    let Some(dev) = cfg.device.clone().or_else(first_nic) else {
        tracing::warn!("no network interface found; the guest is unreachable over the network");
        return;
    };
    match configure_nic(&dev, cfg) {
        Ok(()) => tracing::info!(
            "network: {dev} {}/{} gw {}",
            cfg.addr,
            cfg.mask,
            cfg.gateway.map_or("none".to_owned(), |g| g.to_string())
        ),
        Err(e) => tracing::warn!("cannot configure {dev}: {e}"),
    }
}

/// The first interface other than lo; virtio-net appears a moment after
/// its module loads, so wait briefly.
fn first_nic() -> Option<String> {
    for _ in 0..20 {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n != "lo")
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn configure_nic(dev: &str, cfg: &IpConfig) -> io::Result<()> {
    ioctl_addr(dev, libc::SIOCSIFADDR, cfg.addr)?;
    ioctl_addr(dev, libc::SIOCSIFNETMASK, cfg.mask)?;
    set_up(dev)?;
    if let Some(gw) = cfg.gateway {
        add_default_route(dev, gw)?;
    }
    Ok(())
}

fn inet_socket() -> io::Result<std::os::fd::OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

fn ifreq(dev: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = dev.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); the
    // kernel reads it back as sockaddr_in because of sin_family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_addr(dev: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(dev)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: `req` is a valid ifreq for this request, alive for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(dev: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(dev)?;
    // SAFETY: a valid ifreq, alive for the call; the kernel fills ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just set the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_default_route(dev: &str, gw: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut name = dev.as_bytes().to_vec();
    name.push(0);
    // SAFETY: rtentry is plain old data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = name.as_mut_ptr().cast();
    // SAFETY: `rt` and the name it points to outlive the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_qemu_user_net() {
        let c = IpConfig::from_cmdline("console=ttyS0 quiet");
        assert_eq!(c.addr, DEFAULT_ADDR);
        assert_eq!(c.gateway, Some(DEFAULT_GW));
        assert_eq!(c.device, None);
    }

    #[test]
    fn parses_kernel_ip_syntax() {
        let c = IpConfig::from_cmdline("ip=192.168.7.2::192.168.7.1:255.255.255.0:guest:eth1:off");
        assert_eq!(c.addr, Ipv4Addr::new(192, 168, 7, 2));
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 7, 1)));
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.device.as_deref(), Some("eth1"));
    }
}
