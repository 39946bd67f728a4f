//! Receive offload toward the TUN device: consecutive decrypted IPv4/UDP
//! datagrams of one flow (VXLAN from one peer, one inner flow) and one
//! size are written as one burst behind one header with a UDP segmentation
//! header; the kernel cuts it again at the VXLAN socket. One write and one
//! trip through the device's NAPI context per burst instead of per packet.
//! Anything else is written as it came, in the order it came.

use super::gso::{VNET_HDR_LEN, fold, ip_csum, put16, sum};

/// The IPv4 and UDP headers of a packet that can join a burst.
pub const HEADER_LEN: usize = 28;

/// Most datagrams in one burst (the kernel takes 64 everywhere).
pub const MAX_SEGMENTS: usize = 64;

/// Most bytes of one burst, headers included (an IPv4 total length).
pub const MAX_BURST: usize = 65_535;

const F_NEEDS_CSUM: u8 = 1;
const GSO_UDP_L4: u8 = 5;

/// The virtio-net header of a packet written as it is.
pub const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// One write to the device: its virtio-net header, then `head` and `body`
/// one after the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write<'a> {
    pub vnet: [u8; VNET_HDR_LEN],
    pub head: &'a [u8],
    pub body: &'a [u8],
}

/// What the merger did (read by tests and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeCounts {
    /// Packets handed in.
    pub packets: u64,
    /// Bursts written (two datagrams or more each).
    pub bursts: u64,
    /// Bursts the device refused, written again one datagram at a time.
    pub refused: u64,
}

/// Gathers decrypted packets into bursts; [`Merger::flush`] after each
/// batch so nothing waits for the next one.
pub struct Merger {
    /// Payloads of the open group, back to back.
    payload: Vec<u8>,
    /// Each grouped datagram's own headers, to write it alone if needed.
    headers: Vec<[u8; HEADER_LEN]>,
    /// Payload size of the group's first datagram.
    segment: usize,
    /// A shorter datagram ended the group: nothing more joins.
    closed: bool,
    /// Bursts are still believed to be accepted.
    enabled: bool,
    counts: MergeCounts,
}

impl Default for Merger {
    fn default() -> Self {
        Merger::new()
    }
}

impl Merger {
    pub fn new() -> Merger {
        Merger {
            payload: Vec::with_capacity(MAX_BURST),
            headers: Vec::with_capacity(MAX_SEGMENTS),
            segment: 0,
            closed: false,
            enabled: true,
            counts: MergeCounts::default(),
        }
    }

    pub fn counts(&self) -> MergeCounts {
        self.counts
    }

    /// Bursts are written (false once the device refused one).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Take `packet`: join it to the open group, or write what is open and
    /// then either open a new group with it or write it as it is.
    pub fn push(&mut self, packet: &[u8], write: &mut dyn FnMut(Write) -> std::io::Result<()>) {
        self.counts.packets += 1;
        let Some(len) = self.enabled.then(|| mergeable(packet)).flatten() else {
            self.flush(write);
            report(write(Write {
                vnet: PLAIN,
                head: packet,
                body: &[],
            }));
            return;
        };
        let header: [u8; HEADER_LEN] = packet[..HEADER_LEN].try_into().expect("checked length");
        if !self.joins(&header, len) {
            self.flush(write);
            self.segment = len;
        }
        self.closed = len < self.segment;
        self.headers.push(header);
        self.payload.extend_from_slice(&packet[HEADER_LEN..]);
    }

    /// Whether a datagram with `header` and `len` payload bytes can join
    /// the open group.
    fn joins(&self, header: &[u8; HEADER_LEN], len: usize) -> bool {
        let Some(first) = self.headers.first() else {
            return false;
        };
        !self.closed
            && len <= self.segment
            && self.headers.len() < MAX_SEGMENTS
            && HEADER_LEN + self.payload.len() + len <= MAX_BURST
            && same_flow(first, header)
    }

    /// Write the open group: one datagram as it came, several as a burst
    /// (each alone if the device refuses the burst).
    pub fn flush(&mut self, write: &mut dyn FnMut(Write) -> std::io::Result<()>) {
        match self.headers.len() {
            0 => {}
            1 => report(write(Write {
                vnet: PLAIN,
                head: &self.headers[0],
                body: &self.payload,
            })),
            n => {
                let (vnet, head) = burst_headers(&self.headers[0], self.segment, &self.payload);
                let r = write(Write {
                    vnet,
                    head: &head,
                    body: &self.payload,
                });
                match r {
                    Ok(()) => self.counts.bursts += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.counts.refused += 1;
                        self.enabled = false;
                        tracing::debug!(
                            "the TUN device refused a UDP burst of {n} datagrams ({e}); writing one datagram at a time from now on"
                        );
                        for (h, body) in self.headers.iter().zip(self.payload.chunks(self.segment))
                        {
                            report(write(Write {
                                vnet: PLAIN,
                                head: h,
                                body,
                            }));
                        }
                    }
                    Err(e) => report(Err(e)),
                }
            }
        }
        self.headers.clear();
        self.payload.clear();
        self.closed = false;
    }
}

fn report(r: std::io::Result<()>) {
    if let Err(e) = r {
        tracing::debug!("write to TUN: {e}");
    }
}

/// The UDP payload length of `packet` if it may join a burst: IPv4 with no
/// options and not a fragment, UDP, lengths consistent, payload not empty.
pub fn mergeable(packet: &[u8]) -> Option<usize> {
    if packet.len() <= HEADER_LEN || packet[0] != 0x45 || packet[9] != 17 {
        return None;
    }
    let be16 = |i: usize| usize::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
    // More-fragments bit or a fragment offset.
    if be16(6) & 0x3fff != 0 {
        return None;
    }
    if be16(2) != packet.len() || be16(24) != packet.len() - 20 {
        return None;
    }
    Some(packet.len() - HEADER_LEN)
}

/// Same addresses, ports, protocol, TOS (ECN included), TTL and DF bit:
/// every field but lengths, identification and checksums.
fn same_flow(a: &[u8; HEADER_LEN], b: &[u8; HEADER_LEN]) -> bool {
    a[..2] == b[..2] && a[6..10] == b[6..10] && a[12..24] == b[12..24]
}

/// The virtio-net header and IPv4+UDP header of a burst: the first
/// datagram's headers with the burst's lengths, a fresh IPv4 checksum and
/// the UDP pseudo-header sum left for the kernel's segmentation to finish.
pub fn burst_headers(
    first: &[u8; HEADER_LEN],
    segment: usize,
    payload: &[u8],
) -> ([u8; VNET_HDR_LEN], [u8; HEADER_LEN]) {
    let mut h = *first;
    let udp_len = 8 + payload.len();
    put16(&mut h, 2, (20 + udp_len) as u16);
    ip_csum(&mut h, 0);
    put16(&mut h, 24, udp_len as u16);
    let pseudo = sum(&h[12..20], 17 + udp_len as u64);
    put16(&mut h, 26, fold(pseudo));
    let mut vnet = [0u8; VNET_HDR_LEN];
    vnet[0] = F_NEEDS_CSUM;
    vnet[1] = GSO_UDP_L4;
    vnet[2..4].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    vnet[4..6].copy_from_slice(&(segment as u16).to_le_bytes());
    vnet[6..8].copy_from_slice(&20u16.to_le_bytes());
    vnet[8..10].copy_from_slice(&6u16.to_le_bytes());
    (vnet, h)
}

#[cfg(test)]
#[path = "gro_tests.rs"]
mod tests;
