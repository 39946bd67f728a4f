//! Segmentation offload on the TUN device: the kernel hands the data path
//! whole VXLAN-encapsulated TCP bursts (up to 64 KiB, one read) with a
//! virtio-net header saying how to cut them, instead of cutting them itself
//! and queueing every piece for its own read. Here each burst is cut into
//! the packets the wire would have carried: outer IPv4 + UDP + VXLAN +
//! inner Ethernet + IPv4 + TCP, lengths, IP ids, sequence numbers, flags and
//! checksums fixed per packet. Pure byte work, tested on built packets.

use std::ops::Range;

/// The virtio-net header the device is set to (`virtio_net_hdr_v1` with
/// the hash and the UDP tunnel fields: 24 bytes).
pub const VNET_HDR_LEN: usize = 24;

const F_NEEDS_CSUM: u8 = 1;
const F_UDP_TUNNEL_CSUM: u8 = 8;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;
const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;

/// The fields of a read packet's virtio-net header this code uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Offset of the outer UDP header (tunnel bursts).
    pub outer_th: u16,
    /// Offset of the inner IP header (tunnel bursts).
    pub inner_nh: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
            outer_th: u16le(20),
            inner_nh: u16le(22),
        })
    }
}

/// Why a packet from the device could not be cut or completed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("segmentation type {0:#x} not offered")]
    Type(u8),
    #[error("malformed burst: {0}")]
    Malformed(&'static str),
}

/// What to do with one packet read from the device.
pub enum Prepared {
    /// Send it as it is (a checksum it lacked is filled in).
    One,
    /// Send these packets, cut into `scratch` one after another.
    Many(Vec<Range<usize>>),
}

/// Make one read packet (`packet`, after its header `hdr`) ready to send:
/// fill in a checksum left to the device, or cut a burst into `scratch`.
pub fn prepare(
    hdr: &VnetHdr,
    packet: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<Prepared, GsoError> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_csum(packet, hdr.csum_start.into(), hdr.csum_offset.into())?;
            }
            Ok(Prepared::One)
        }
        t if t == GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4 => {
            segment_vxlan_tcp(hdr, packet, scratch).map(Prepared::Many)
        }
        t => Err(GsoError::Type(t)),
    }
}

/// Fill in a partial checksum: the field holds the pseudo-header sum; the
/// sum over `start..` goes there.
fn complete_csum(p: &mut [u8], start: usize, offset: usize) -> Result<(), GsoError> {
    let at = start + offset;
    if at + 2 > p.len() {
        return Err(GsoError::Malformed("checksum beyond the packet"));
    }
    let c = !fold(sum(&p[start..], 0));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Cut a VXLAN-encapsulated TCP burst into packets of `gso_size` payload
/// bytes, appended to `scratch`; returns where each lies.
fn segment_vxlan_tcp(
    hdr: &VnetHdr,
    p: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Vec<Range<usize>>, GsoError> {
    let bad = GsoError::Malformed;
    let outer_udp = usize::from(hdr.outer_th);
    let inner_ip = usize::from(hdr.inner_nh);
    let tcp = usize::from(hdr.csum_start);
    let mss = usize::from(hdr.gso_size);
    if outer_udp < 20 || p.len() < tcp + 20 || p[0] >> 4 != 4 || mss == 0 {
        return Err(bad("headers"));
    }
    if inner_ip + 20 > tcp || outer_udp + 8 > inner_ip || p[inner_ip] >> 4 != 4 {
        return Err(bad("header offsets"));
    }
    let tcp_hlen = usize::from(p[tcp + 12] >> 4) * 4;
    let payload_at = tcp + tcp_hlen;
    if tcp_hlen < 20 || payload_at > p.len() {
        return Err(bad("TCP header"));
    }
    let payload = &p[payload_at..];
    let outer_csum = hdr.flags & F_UDP_TUNNEL_CSUM != 0;
    let outer_id = u16::from_be_bytes([p[4], p[5]]);
    let inner_id = u16::from_be_bytes([p[inner_ip + 4], p[inner_ip + 5]]);
    let seq = u32::from_be_bytes([p[tcp + 4], p[tcp + 5], p[tcp + 6], p[tcp + 7]]);
    let flags = p[tcp + 13];
    let count = payload.len().div_ceil(mss).max(1);
    let mut out = Vec::with_capacity(count);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let start = scratch.len();
        scratch.extend_from_slice(&p[..payload_at]);
        scratch.extend_from_slice(chunk);
        let s = &mut scratch[start..];
        let total = s.len();
        let n = i as u16;
        // Outer IPv4.
        put16(s, 2, total as u16);
        put16(s, 4, outer_id.wrapping_add(n));
        ip_csum(s, 0);
        // Outer UDP.
        put16(s, outer_udp + 4, (total - outer_udp) as u16);
        put16(s, outer_udp + 6, 0);
        // Inner IPv4.
        put16(s, inner_ip + 2, (total - inner_ip) as u16);
        put16(s, inner_ip + 4, inner_id.wrapping_add(n));
        ip_csum(s, inner_ip);
        // TCP: sequence, flags of the first / last piece only, checksum.
        let this_seq = seq.wrapping_add((i * mss) as u32);
        s[tcp + 4..tcp + 8].copy_from_slice(&this_seq.to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(0x01 | 0x08); // FIN, PSH
        }
        if i > 0 {
            f &= !0x80; // CWR
        }
        s[tcp + 13] = f;
        l4_csum(s, inner_ip, tcp, 6, tcp + 16);
        if outer_csum {
            l4_csum(s, 0, outer_udp, 17, outer_udp + 6);
            if s[outer_udp + 6..outer_udp + 8] == [0, 0] {
                put16(s, outer_udp + 6, 0xffff);
            }
        }
        out.push(start..scratch.len());
    }
    Ok(out)
}

pub(super) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The IPv4 header checksum of the header at `at`.
pub(super) fn ip_csum(b: &mut [u8], at: usize) {
    let hlen = usize::from(b[at] & 0x0f) * 4;
    put16(b, at + 10, 0);
    let c = !fold(sum(&b[at..at + hlen], 0));
    put16(b, at + 10, c);
}

/// The TCP or UDP checksum of the segment at `l4` (to the end of `b`),
/// under the IPv4 header at `ip`, stored at `field`.
fn l4_csum(b: &mut [u8], ip: usize, l4: usize, proto: u8, field: usize) {
    put16(b, field, 0);
    let len = (b.len() - l4) as u32;
    let mut acc = sum(&b[ip + 12..ip + 20], 0);
    acc += u64::from(proto) + u64::from(len);
    acc = sum(&b[l4..], acc);
    put16(b, field, !fold(acc));
}

/// The ones' complement sum of `data` (big-endian 16-bit words) added to
/// `acc`, not folded. The words are summed in native order as 32-bit lanes
/// (which the compiler vectorises) and the folded result swapped back: the
/// ones' complement sum does not depend on byte order (RFC 1071).
pub(super) fn sum(data: &[u8], acc: u64) -> u64 {
    let mut lanes = [0u64; 8];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(b.chunks_exact(4)) {
            *lane += u64::from(u32::from_ne_bytes(w.try_into().expect("4 bytes")));
        }
    }
    let mut native: u64 = lanes.iter().map(|&l| (l >> 32) + (l & 0xffff_ffff)).sum();
    let mut rest = blocks.remainder();
    while rest.len() >= 2 {
        native += u64::from(u16::from_ne_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        native += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    acc + u64::from(u16::from_be(fold(native)))
}

pub(super) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checksum over a whole header or segment (with its pseudo-header)
    /// is right when the sum folds to 0xffff.
    fn verifies(data: &[u8], acc: u64) -> bool {
        fold(sum(data, acc)) == 0xffff
    }

    fn pseudo(b: &[u8], ip: usize, proto: u8, len: usize) -> u64 {
        sum(&b[ip + 12..ip + 20], 0) + u64::from(proto) + len as u64
    }

    /// Outer IPv4 (20) + UDP (8) + VXLAN (8) + Ethernet (14) + IPv4 (20) +
    /// TCP with 12 option bytes (32) + `payload` bytes, as the kernel hands
    /// a burst over (lengths of the whole burst, checksums left stale).
    fn burst(payload: usize, flags: u8) -> (VnetHdr, Vec<u8>) {
        let mut p = vec![0u8; 102];
        p[0] = 0x45;
        p[4..6].copy_from_slice(&0x1000u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 255, 0, 1]);
        p[16..20].copy_from_slice(&[10, 255, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&4789u16.to_be_bytes());
        p[28] = 0x08; // VXLAN flags: VNI valid
        p[31..34].copy_from_slice(&[0, 0, 100]);
        p[36..42].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        p[42..48].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        p[48..50].copy_from_slice(&0x0800u16.to_be_bytes());
        p[50] = 0x45;
        p[54..56].copy_from_slice(&0x2000u16.to_be_bytes());
        p[58] = 64;
        p[59] = 6;
        p[62..66].copy_from_slice(&[172, 18, 1, 2]);
        p[66..70].copy_from_slice(&[172, 18, 2, 2]);
        p[70..72].copy_from_slice(&5201u16.to_be_bytes());
        p[72..74].copy_from_slice(&33000u16.to_be_bytes());
        p[74..78].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        p[82] = 8 << 4;
        p[83] = flags;
        p[84..86].copy_from_slice(&502u16.to_be_bytes());
        p.extend((0..payload).map(|i| (i * 7 + 3) as u8));
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM | F_UDP_TUNNEL_CSUM,
            gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
            gso_size: 1000,
            csum_start: 70,
            csum_offset: 16,
            outer_th: 20,
            inner_nh: 50,
        };
        (hdr, p)
    }

    #[test]
    fn the_header_is_read_at_its_offsets() {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = 9;
        b[1] = 0x21;
        b[4..6].copy_from_slice(&1398u16.to_le_bytes());
        b[6..8].copy_from_slice(&70u16.to_le_bytes());
        b[8..10].copy_from_slice(&16u16.to_le_bytes());
        b[20..22].copy_from_slice(&20u16.to_le_bytes());
        b[22..24].copy_from_slice(&50u16.to_le_bytes());
        let h = VnetHdr::parse(&b).unwrap();
        assert_eq!(
            (
                h.flags,
                h.gso_type,
                h.gso_size,
                h.csum_start,
                h.csum_offset,
                h.outer_th,
                h.inner_nh
            ),
            (9, 0x21, 1398, 70, 16, 20, 50)
        );
        assert_eq!(VnetHdr::parse(&b[..23]), None);
    }

    #[test]
    fn a_burst_is_cut_into_packets_each_with_right_lengths_and_checksums() {
        let (hdr, mut p) = burst(2500, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
        let mut scratch = Vec::new();
        let Prepared::Many(segs) = prepare(&hdr, &mut p, &mut scratch).unwrap() else {
            panic!("a burst is cut")
        };
        assert_eq!(segs.len(), 3);
        let mut payload = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let s = &scratch[r.clone()];
            let len = s.len();
            assert_eq!(len, 102 + [1000, 1000, 500][i]);
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, len);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1000 + i as u16);
            assert!(verifies(&s[..20], 0), "outer IP checksum of piece {i}");
            assert_eq!(u16::from_be_bytes([s[24], s[25]]) as usize, len - 20);
            assert!(
                verifies(&s[20..], pseudo(s, 0, 17, len - 20)),
                "outer UDP of piece {i}"
            );
            assert_eq!(u16::from_be_bytes([s[52], s[53]]) as usize, len - 50);
            assert_eq!(u16::from_be_bytes([s[54], s[55]]), 0x2000 + i as u16);
            assert!(verifies(&s[50..70], 0), "inner IP checksum of piece {i}");
            assert!(
                verifies(&s[70..], pseudo(s, 50, 6, len - 70)),
                "TCP of piece {i}"
            );
            let seq = u32::from_be_bytes([s[74], s[75], s[76], s[77]]);
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1000 * i as u32));
            let want_flags = match i {
                0 => 0x10 | 0x80,
                1 => 0x10,
                _ => 0x10 | 0x08 | 0x01,
            };
            assert_eq!(s[83], want_flags, "flags of piece {i}");
            assert_eq!(&s[28..34], &[0x08, 0, 0, 0, 0, 100], "VXLAN header kept");
            payload.extend_from_slice(&s[102..]);
        }
        assert_eq!(payload, p[102..].to_vec(), "the payload, in order, once");
    }

    #[test]
    fn without_the_tunnel_checksum_flag_the_outer_udp_checksum_is_zero() {
        let (mut hdr, mut p) = burst(1500, 0x10);
        hdr.flags = F_NEEDS_CSUM;
        let mut scratch = Vec::new();
        let Prepared::Many(segs) = prepare(&hdr, &mut p, &mut scratch).unwrap() else {
            panic!()
        };
        for r in segs {
            assert_eq!(&scratch[r.start + 26..r.start + 28], &[0, 0]);
        }
    }

    #[test]
    fn a_single_packet_gets_its_partial_checksum_completed() {
        let (_, mut p) = burst(300, 0x18);
        let len = p.len();
        // The kernel leaves the pseudo-header sum in the field.
        let ph = fold(pseudo(&p, 50, 6, len - 70));
        p[86..88].copy_from_slice(&ph.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            gso_size: 0,
            csum_start: 70,
            csum_offset: 16,
            outer_th: 0,
            inner_nh: 0,
        };
        let mut scratch = Vec::new();
        assert!(matches!(
            prepare(&hdr, &mut p, &mut scratch).unwrap(),
            Prepared::One
        ));
        assert!(verifies(&p[70..], pseudo(&p, 50, 6, len - 70)));
    }

    #[test]
    fn unknown_types_and_bad_offsets_are_refused() {
        let (mut hdr, mut p) = burst(1500, 0x10);
        let mut scratch = Vec::new();
        hdr.gso_type = 4; // TCPv6
        assert_eq!(
            prepare(&hdr, &mut p, &mut scratch).err(),
            Some(GsoError::Type(4))
        );
        let (mut hdr, mut p) = burst(1500, 0x10);
        hdr.csum_start = 5000;
        assert!(prepare(&hdr, &mut p, &mut scratch).is_err());
        let (mut hdr, mut p) = burst(1500, 0x10);
        hdr.inner_nh = 90;
        assert!(prepare(&hdr, &mut p, &mut scratch).is_err());
    }

    #[test]
    fn the_checksum_sum_matches_a_plain_word_sum() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 31 + 7) as u8).collect();
        let mut plain: u64 = 0;
        for w in data.chunks(2) {
            plain += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        assert_eq!(fold(sum(&data, 0)), fold(plain));
    }

    #[test]
    fn the_checksum_sum_is_right_at_every_length_and_with_carries() {
        let plain = |d: &[u8]| -> u64 {
            d.chunks(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
                .sum()
        };
        for len in 0..200 {
            let data: Vec<u8> = (0..len).map(|i| (i * 131 + 17) as u8).collect();
            assert_eq!(fold(sum(&data, 5)), fold(plain(&data) + 5), "length {len}");
        }
        // All ones: every addition carries.
        let ones = vec![0xffu8; 65_535];
        assert_eq!(fold(sum(&ones, 0)), fold(plain(&ones)));
    }
}
