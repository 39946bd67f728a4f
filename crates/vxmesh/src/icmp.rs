//! ICMP echo over a raw socket: one request and its outcome (`doctor`'s hop
//! check), and the socket that the lab's echo streams and pair matrix reuse.
//!
//! Every socket is created on a thread that has entered the probing namespace
//! (see [`Netns::run`]). A socket stays in the namespace it was created in, so it
//! is then used from any thread. No external tool (ping, iperf) is run.

use std::fmt;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::dataplane::netns::{Netns, NetnsError};

/// A probe could not be made (refusals and ICMP errors are outcomes, not
/// errors): every variant names the namespace, and the echo its target.
#[derive(Debug, thiserror::Error)]
pub enum IcmpError {
    #[error("in network namespace '{namespace}': create raw ICMP socket (needs CAP_NET_RAW): {io}")]
    CreateSocket { namespace: String, io: io::Error },
    #[error("in network namespace '{namespace}': {netns}")]
    Netns {
        namespace: String,
        netns: NetnsError,
    },
    /// A socket option ("set ICMP_FILTER", ...).
    #[error("{step}: {io}")]
    SetupSocket { step: &'static str, io: io::Error },
    #[error(
        "ICMP echo from network namespace '{namespace}' to {dst}: payload of {len} bytes exceeds the IPv4 maximum of {MAX_PAYLOAD}"
    )]
    PayloadTooLarge {
        namespace: String,
        dst: Ipv4Addr,
        len: usize,
    },
    /// Sending or receiving failed for a reason that is not a refusal.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// One echo failed: which namespace, which target, and why.
    #[error("ICMP echo from network namespace '{namespace}' to {dst}: {cause}")]
    Echo {
        namespace: String,
        dst: Ipv4Addr,
        cause: Box<IcmpError>,
    },
}

/// ICMP payload of the stream and the pair matrix (the classic ping size).
pub const DEFAULT_PAYLOAD: usize = 56;
/// A reply counts for a continuous probe if it arrives this soon after its request.
pub const REPLY_WINDOW: Duration = Duration::from_secs(1);
/// Attempts per pair in [`probe_pairs`] (the first may be lost while ARP resolves).
pub const PAIR_ATTEMPTS: u16 = 3;
/// Source namespaces probed at once by [`probe_pairs`].
pub const PAIR_THREADS: usize = 16;

const IP_HEADER: usize = 20;
const ICMP_HEADER: usize = 8;
const MAX_PAYLOAD: usize = 65_535 - IP_HEADER - ICMP_HEADER;
const ECHO_REPLY: u8 = 0;
const DEST_UNREACHABLE: u8 = 3;
const ECHO_REQUEST: u8 = 8;
const TIME_EXCEEDED: u8 = 11;
const FRAG_NEEDED: u8 = 4;
// <linux/icmp.h>: a bit set in the ICMP_FILTER mask drops that type.
const SOL_RAW: libc::c_int = 255;
const ICMP_FILTER: libc::c_int = 1;
const MAGIC: &[u8; 4] = b"vxmP";

/// ICMP payload size giving an IP datagram of `ip_len` bytes (20 + 8 + payload).
pub fn icmp_payload_for_ip_len(ip_len: usize) -> usize {
    ip_len.saturating_sub(IP_HEADER + ICMP_HEADER)
}

// ---------------------------------------------------------------------------
// Single echo

/// The result of one echo request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum EchoOutcome {
    Reply { rtt: Duration },
    Timeout,
    Refused { reason: Refusal },
}

/// Why an echo request was refused rather than answered or lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Refusal {
    /// The local kernel refused to send it: EMSGSIZE for a DF datagram over the
    /// path MTU, ENETUNREACH without a route, EPERM/EACCES from a filter...
    Local { errno: i32, error: String },
    /// An ICMP error about the request: type 3 (destination unreachable; code 4 =
    /// fragmentation needed, with the next-hop MTU) or 11 (time exceeded).
    Icmp {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        next_hop_mtu: Option<u16>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Local { errno, error } => {
                write!(f, "refused locally: {error} (errno {errno})")
            }
            Refusal::Icmp {
                from,
                icmp_type,
                code,
                next_hop_mtu,
            } => {
                let what = match (*icmp_type, *code) {
                    (DEST_UNREACHABLE, FRAG_NEEDED) => "fragmentation needed",
                    (DEST_UNREACHABLE, 0) => "network unreachable",
                    (DEST_UNREACHABLE, 1) => "host unreachable",
                    (DEST_UNREACHABLE, 3) => "port unreachable",
                    (DEST_UNREACHABLE, 13) => "administratively prohibited",
                    (DEST_UNREACHABLE, _) => "destination unreachable",
                    (TIME_EXCEEDED, _) => "time exceeded",
                    _ => "error",
                };
                write!(f, "ICMP {what} (type {icmp_type} code {code}) from {from}")?;
                if let Some(mtu) = next_hop_mtu {
                    write!(f, ", next-hop MTU {mtu}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for EchoOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EchoOutcome::Reply { rtt } => write!(f, "reply in {:.3} ms", ms(*rtt)),
            EchoOutcome::Timeout => write!(f, "no reply (timeout)"),
            EchoOutcome::Refused { reason } => write!(f, "{reason}"),
        }
    }
}

/// Send one ICMP echo request from namespace `ns` to `dst` and wait up to
/// `timeout` for the matching reply. `payload_len` is the ICMP payload (IP total
/// length = 28 + payload_len). With `dont_fragment` the datagram carries DF and
/// is never fragmented (IP_PMTUDISC_DO); without it the kernel fragments.
/// Kernel refusals and ICMP errors about the request give `Refused`; only
/// failures to probe at all (no such namespace, no CAP_NET_RAW) are `Err`.
pub fn icmp_echo(
    ns: &Netns,
    dst: Ipv4Addr,
    payload_len: usize,
    dont_fragment: bool,
    timeout: Duration,
) -> Result<EchoOutcome, IcmpError> {
    let ctx = |cause: IcmpError| IcmpError::Echo {
        namespace: ns.name().to_string(),
        dst,
        cause: Box::new(cause),
    };
    if payload_len > MAX_PAYLOAD {
        return Err(IcmpError::PayloadTooLarge {
            namespace: ns.name().to_string(),
            dst,
            len: payload_len,
        });
    }
    let mut sock = EchoSocket::open(ns, payload_len, dont_fragment).map_err(ctx)?;
    let seq = 1;
    let sent_at = Instant::now();
    if let Err(e) = sock.send(dst, seq) {
        return match local_refusal(&e) {
            Some(reason) => Ok(EchoOutcome::Refused { reason }),
            None => Err(ctx(e.into())),
        };
    }
    let deadline = sent_at + timeout;
    while let Some(event) = sock.next_event(deadline).map_err(|e| ctx(e.into()))? {
        match event {
            Event::Reply { from, seq: s, at } if from == dst && s == seq => {
                return Ok(EchoOutcome::Reply { rtt: at - sent_at });
            }
            Event::Error {
                orig_dst,
                seq: s,
                reason,
            } if orig_dst == dst && s == seq => {
                return Ok(EchoOutcome::Refused { reason });
            }
            _ => {}
        }
    }
    Ok(EchoOutcome::Timeout)
}

pub fn local_refusal(e: &io::Error) -> Option<Refusal> {
    let errno = e.raw_os_error()?;
    let refusals = [
        libc::EMSGSIZE,
        libc::ENETUNREACH,
        libc::EHOSTUNREACH,
        libc::ENETDOWN,
        libc::EHOSTDOWN,
        libc::EPERM,
        libc::EACCES,
    ];
    refusals.contains(&errno).then(|| Refusal::Local {
        errno,
        error: e.to_string(),
    })
}

// ---------------------------------------------------------------------------
// The raw ICMP socket shared by all echo probes

/// Process-wide counter making identifiers and payload nonces unique.
static PROBES: AtomicU32 = AtomicU32::new(0);

/// Something a raw ICMP socket saw that concerns one of its own requests.
#[derive(Debug)]
pub enum Event {
    Reply {
        from: Ipv4Addr,
        seq: u16,
        at: Instant,
    },
    Error {
        orig_dst: Ipv4Addr,
        seq: u16,
        reason: Refusal,
    },
}

/// A raw ICMP socket with its own echo identifier and recognisable payload
/// (magic + per-socket nonce + pattern). Raw sockets see all ICMP traffic of the
/// namespace; only replies carrying our identifier and exact payload, and errors
/// quoting our identifier, are reported.
pub struct EchoSocket {
    sock: Socket,
    ident: u16,
    packet: Vec<u8>,
    buf: Vec<u8>,
}

impl EchoSocket {
    pub fn open(ns: &Netns, payload_len: usize, dont_fragment: bool) -> Result<Self, IcmpError> {
        let namespace = || ns.name().to_string();
        let sock = ns
            .run(|| {
                Ok::<_, NetnsError>(Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))
            })
            .map_err(|netns| IcmpError::Netns {
                namespace: namespace(),
                netns,
            })?
            .map_err(|io| IcmpError::CreateSocket {
                namespace: namespace(),
                io,
            })?;
        let setup = |step| move |io| IcmpError::SetupSocket { step, io };
        let pmtu = if dont_fragment {
            libc::IP_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DONT
        };
        setsockopt(&sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, pmtu)
            .map_err(setup("set IP_MTU_DISCOVER"))?;
        let wanted = (1u32 << ECHO_REPLY) | (1 << DEST_UNREACHABLE) | (1 << TIME_EXCEEDED);
        setsockopt(&sock, SOL_RAW, ICMP_FILTER, !wanted).map_err(setup("set ICMP_FILTER"))?;
        sock.set_nonblocking(true)
            .map_err(setup("make ICMP socket non-blocking"))?;
        let _ = sock.set_recv_buffer_size(1 << 20);

        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Multiplying by an odd constant permutes u16: 65536 sockets in a row differ.
        let ident = (pid as u16).wrapping_add((n as u16).wrapping_mul(0x9e37));
        let nonce = (u64::from(pid) << 32) | u64::from(n);
        let mut payload: Vec<u8> = MAGIC.iter().copied().chain(nonce.to_be_bytes()).collect();
        payload.extend((0..payload_len.saturating_sub(payload.len())).map(|i| i as u8));
        payload.truncate(payload_len);
        let mut packet = vec![ECHO_REQUEST, 0, 0, 0];
        packet.extend(ident.to_be_bytes());
        packet.extend([0, 0]);
        packet.extend(payload);
        Ok(EchoSocket {
            sock,
            ident,
            packet,
            buf: vec![0; 65_536],
        })
    }

    pub fn send(&mut self, dst: Ipv4Addr, seq: u16) -> io::Result<()> {
        self.packet[2..4].copy_from_slice(&[0, 0]);
        self.packet[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum = checksum(&self.packet);
        self.packet[2..4].copy_from_slice(&sum.to_be_bytes());
        self.sock
            .send_to(&self.packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))?;
        Ok(())
    }

    /// The next event about our requests, or None once `until` has passed.
    pub fn next_event(&mut self, until: Instant) -> io::Result<Option<Event>> {
        loop {
            match (&self.sock).read(&mut self.buf) {
                Ok(n) => {
                    if let Some(event) = self.parse(n, Instant::now()) {
                        return Ok(Some(event));
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            wait_readable(self.sock.as_raw_fd(), until - now)?;
        }
    }

    fn parse(&self, n: usize, at: Instant) -> Option<Event> {
        let (from, _, icmp) = ipv4_icmp(&self.buf[..n], true)?;
        if icmp.len() < ICMP_HEADER || checksum(icmp) != 0 {
            return None;
        }
        let ident = u16::from_be_bytes([icmp[4], icmp[5]]);
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        match icmp[0] {
            ECHO_REPLY
                if ident == self.ident && icmp[ICMP_HEADER..] == self.packet[ICMP_HEADER..] =>
            {
                Some(Event::Reply { from, seq, at })
            }
            icmp_type @ (DEST_UNREACHABLE | TIME_EXCEEDED) => {
                // The error quotes our IP header and at least 8 bytes of our request.
                let (_, orig_dst, quoted) = ipv4_icmp(&icmp[ICMP_HEADER..], false)?;
                if quoted.len() < ICMP_HEADER
                    || quoted[0] != ECHO_REQUEST
                    || u16::from_be_bytes([quoted[4], quoted[5]]) != self.ident
                {
                    return None;
                }
                let code = icmp[1];
                let mtu = u16::from_be_bytes([icmp[6], icmp[7]]);
                let next_hop_mtu =
                    (icmp_type == DEST_UNREACHABLE && code == FRAG_NEEDED && mtu != 0)
                        .then_some(mtu);
                let seq = u16::from_be_bytes([quoted[6], quoted[7]]);
                let reason = Refusal::Icmp {
                    from,
                    icmp_type,
                    code,
                    next_hop_mtu,
                };
                Some(Event::Error {
                    orig_dst,
                    seq,
                    reason,
                })
            }
            _ => None,
        }
    }
}

/// (source, destination, ICMP message) of an IPv4 datagram carrying ICMP.
/// `whole` trims to the total length; a quoted header's length is not checked.
fn ipv4_icmp(pkt: &[u8], whole: bool) -> Option<(Ipv4Addr, Ipv4Addr, &[u8])> {
    if pkt.len() < IP_HEADER || pkt[0] >> 4 != 4 || pkt[9] != libc::IPPROTO_ICMP as u8 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let mut end = pkt.len();
    if whole {
        end = end.min(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])));
    }
    if ihl < IP_HEADER || ihl > end {
        return None;
    }
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    Some((src, dst, &pkt[ihl..end]))
}

/// The Internet checksum (RFC 1071). Over a message that contains its own
/// checksum it is 0.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn setsockopt<T: Copy>(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: `value` is a plain integer that outlives the call; the fd is valid.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Wait until `fd` is readable or `timeout` passes (spurious returns are fine).
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example_and_verifies_to_zero() {
        // RFC 1071 section 3 example: sum 0xddf2, checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        let mut msg = vec![ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 7, 1, 2, 3];
        let sum = checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(checksum(&msg), 0);
    }

    #[test]
    fn payload_for_ip_length() {
        assert_eq!(icmp_payload_for_ip_len(1500), 1472);
        assert_eq!(icmp_payload_for_ip_len(84), 56);
        assert_eq!(icmp_payload_for_ip_len(10), 0);
    }
}
