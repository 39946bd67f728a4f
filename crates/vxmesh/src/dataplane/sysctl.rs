//! Per-namespace sysctls. `/proc/sys/net` shows the namespace of the calling
//! thread, so call these from a thread inside the target namespace
//! (see [`crate::dataplane::netns::Netns::run`]).

/// A sysctl could not be read or written, or loopback not brought up. The
/// key is the `/proc/sys` path; callers add the namespace (see
/// [`crate::dataplane::kernel::NetlinkError::Sysctl`]).
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("write {value} to {key}: {io}")]
    Write {
        key: String,
        value: String,
        io: std::io::Error,
    },
    #[error("read {key}: {io}")]
    Read { key: String, io: std::io::Error },
    /// The namespace could not be entered to read or write there (see
    /// [`Netns::run`](crate::dataplane::netns::Netns::run)).
    #[error("{0}")]
    Namespace(Box<crate::dataplane::netns::NetnsError>),
    /// A step of bringing `lo` up ("SIOCGIFFLAGS lo", ...).
    #[error("{step}: {io}")]
    Loopback {
        step: &'static str,
        io: std::io::Error,
    },
}

impl From<crate::dataplane::netns::NetnsError> for SysctlError {
    fn from(e: crate::dataplane::netns::NetnsError) -> Self {
        SysctlError::Namespace(Box::new(e))
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Write `value` to the sysctl at `key` (a `/proc/sys` path) in the calling
/// thread's namespace.
pub fn write(key: &str, value: &str) -> Result<(), SysctlError> {
    std::fs::write(key, value).map_err(|io| SysctlError::Write {
        key: key.to_string(),
        value: value.to_string(),
        io,
    })
}

pub fn read(key: &str) -> Result<String, SysctlError> {
    Ok(std::fs::read_to_string(key)
        .map_err(|io| SysctlError::Read {
            key: key.to_string(),
            io,
        })?
        .trim()
        .to_string())
}

pub fn ip_forward() -> Result<bool, SysctlError> {
    Ok(read(IP_FORWARD)? == "1")
}

pub fn set_ip_forward(on: bool) -> Result<(), SysctlError> {
    write(IP_FORWARD, if on { "1" } else { "0" })
}

/// Bring `lo` up in the calling thread's namespace (a new namespace starts with
/// it down). Uses an ioctl on a throwaway socket: no netlink connection needed.
pub fn set_loopback_up() -> Result<(), SysctlError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    let failed = |step| SysctlError::Loopback {
        step,
        io: std::io::Error::last_os_error(),
    };
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| SysctlError::Loopback {
        step: "socket for loopback ioctl",
        io: e.into(),
    })?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: ifreq is a plain C struct and the fd is valid for the call.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(failed("SIOCGIFFLAGS lo"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(failed("SIOCSIFFLAGS lo up"));
        }
    }
    Ok(())
}
