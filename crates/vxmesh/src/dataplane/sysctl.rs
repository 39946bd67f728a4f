//! Per-namespace sysctls. `/proc/sys/net` shows the namespace of the calling
//! thread, so call these from a thread inside the target namespace
//! (see [`crate::dataplane::netns::Netns::run`]).

use anyhow::{Context, Result};

fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value} to {path}"))
}

pub fn read(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {path}"))?
        .trim()
        .to_string())
}

pub fn ip_forward() -> Result<bool> {
    Ok(read("/proc/sys/net/ipv4/ip_forward")? == "1")
}

pub fn set_ip_forward(on: bool) -> Result<()> {
    write("/proc/sys/net/ipv4/ip_forward", if on { "1" } else { "0" })
}

/// Bring `lo` up in the calling thread's namespace (a new namespace starts with
/// it down). Uses an ioctl on a throwaway socket: no netlink connection needed.
pub fn set_loopback_up() -> Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket for loopback ioctl")?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: ifreq is a plain C struct and the fd is valid for the call.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo up");
        }
    }
    Ok(())
}
