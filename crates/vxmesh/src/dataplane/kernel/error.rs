//! What the kernel answers when a request fails ([`KernelError`], parsed
//! from `NLMSG_ERROR` with its extended-ack text), and the errors of the
//! netlink layer built on it: each names the operation and the namespace.

use std::fmt;

use netlink_packet_core::NLM_F_ACK_TLVS;

use crate::dataplane::netns::NetnsError;
use crate::dataplane::sysctl::SysctlError;

/// An error the kernel (or the connection) returned for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelError {
    /// Positive errno; 0 when the connection itself failed.
    pub errno: i32,
    /// The kernel's extended-ack message, if it sent one.
    pub message: Option<String>,
}

impl KernelError {
    pub(crate) fn closed() -> Self {
        KernelError {
            errno: 0,
            message: Some("the netlink connection is closed".into()),
        }
    }

    /// The socket's receive buffer overflowed while the request was in
    /// flight: an error the kernel sent for it may have been dropped.
    pub(crate) fn overrun() -> Self {
        KernelError {
            errno: libc::ENOBUFS,
            message: Some("netlink receive buffer overrun: the outcome is unknown".into()),
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == errno
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.errno, &self.message) {
            (0, Some(m)) => write!(f, "{m}"),
            (0, None) => write!(f, "netlink request failed"),
            (e, None) => write!(f, "{}", std::io::Error::from_raw_os_error(e)),
            (e, Some(m)) => write!(f, "{} ({m})", std::io::Error::from_raw_os_error(e)),
        }
    }
}

impl std::error::Error for KernelError {}

/// Turn an `NLMSG_ERROR` message into a [`KernelError`]; `None` for an ack.
pub(crate) fn kernel_error(
    flags: u16,
    e: &netlink_packet_core::ErrorMessage,
) -> Option<KernelError> {
    let code = e.code?.get();
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let mut message = None;
    // The payload is the request's header (NETLINK_CAP_ACK, "capped") or the
    // whole request, followed by the extended-ack attributes.
    const NLM_F_CAPPED: u16 = 0x100;
    let skip = if flags & NLM_F_CAPPED != 0 || e.header.len() < 16 {
        16
    } else {
        let len = u32::from_ne_bytes([e.header[0], e.header[1], e.header[2], e.header[3]]);
        (len as usize + 3) & !3
    };
    if flags & NLM_F_ACK_TLVS != 0 && e.header.len() > skip {
        let mut tlvs = &e.header[skip..];
        while tlvs.len() >= 4 {
            let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
            let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
            if len < 4 || len > tlvs.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &tlvs[4..len];
                let s = s.split(|b| *b == 0).next().unwrap_or_default();
                let s = String::from_utf8_lossy(s).trim().to_string();
                if !s.is_empty() {
                    message = Some(s);
                }
            }
            tlvs = &tlvs[(len + 3) & !3..];
            if tlvs.len() < 4 {
                break;
            }
        }
    }
    Some(KernelError {
        errno: code.abs(),
        message,
    })
}

/// A failed operation of the netlink layer. The message names what was
/// asked, the device and the namespace, followed by the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused a request (or the connection broke).
    #[error("{what} in {namespace}: {kernel}{}", hint(kernel))]
    Request {
        /// "create veth a (peer b in namespace c)", "look up device d", ...
        what: String,
        namespace: String,
        kernel: KernelError,
    },
    /// A dump failed: "dump links", "dump routes", ...
    #[error("dump {what} in {namespace}: {kernel}")]
    Dump {
        what: &'static str,
        namespace: String,
        kernel: KernelError,
    },
    /// A device an operation needs is missing.
    #[error("{purpose}: device {device} does not exist in {namespace}")]
    NeedsDevice {
        purpose: String,
        device: String,
        namespace: String,
    },
    /// A device the caller expected is missing.
    #[error("device {device} does not exist in {namespace}")]
    NoDevice { device: String, namespace: String },
    /// The rtnetlink sockets could not be opened.
    #[error("connect to rtnetlink in {namespace}: open rtnetlink socket: {io}")]
    Connect {
        namespace: String,
        io: std::io::Error,
    },
    #[error("{0}")]
    Netns(#[from] NetnsError),
    /// A sysctl read or write inside the connection's namespace.
    #[error("{what} in {namespace}: {sysctl}")]
    Sysctl {
        what: &'static str,
        namespace: String,
        sysctl: SysctlError,
    },
}

/// A short hint for the errors people hit most.
pub(crate) fn hint(e: &KernelError) -> &'static str {
    match e.errno {
        libc::EEXIST => "; it already exists",
        libc::ENODEV => "; no such device",
        libc::EBUSY => "; the device must be down for this",
        libc::EPERM => "; run as root (CAP_NET_ADMIN)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_ack_message_is_parsed() {
        let mut header = vec![0u8; 16];
        let text = b"A VXLAN device with the specified VNI already exists\0";
        let len = (4 + text.len()) as u16;
        header.extend_from_slice(&len.to_ne_bytes());
        header.extend_from_slice(&1u16.to_ne_bytes());
        header.extend_from_slice(text);
        while !header.len().is_multiple_of(4) {
            header.push(0);
        }
        let mut e = netlink_packet_core::ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-libc::EEXIST);
        e.header = header;
        let err = kernel_error(0x300, &e).unwrap();
        assert_eq!(err.errno, libc::EEXIST);
        assert_eq!(
            err.message.as_deref(),
            Some("A VXLAN device with the specified VNI already exists")
        );
        assert!(err.to_string().contains("File exists"));
        let mut ack = netlink_packet_core::ErrorMessage::default();
        ack.header = vec![0; 16];
        assert!(kernel_error(0, &ack).is_none());
    }
}
