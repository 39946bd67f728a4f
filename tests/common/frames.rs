//! Crafted VXLAN frames for the injection and spoofing tests: a VXLAN
//! header with an inner ICMP echo, an IPv4/UDP wrapper with any source
//! (sent on a raw socket), and the ICMP counter that shows delivery.

use std::net::Ipv4Addr;
use std::process::Command;

use vxmesh::model::Mac;

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) for `payload_len` bytes of `proto`.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// VXLAN header + Ethernet + IPv4 + ICMP echo request.
pub fn vxlan_echo(
    vni: u32,
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    seq: u16,
) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"vxmesh-injection");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ipv4 = ipv4_header(src, dst, 1, icmp.len());
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&dst_mac.0);
    f.extend_from_slice(&src_mac.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ipv4);
    f.extend_from_slice(&icmp);
    f
}

/// `payload` in UDP (checksum 0: none) in IPv4 from `src`, which may be
/// any address (a spoofed one): what a raw socket sends as is.
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut p = ipv4_header(src, dst, 17, udp.len());
    p.extend_from_slice(&udp);
    p
}

/// Send whole IPv4 packets (headers included, any source address) from
/// the current namespace: a raw socket with `IP_HDRINCL`.
pub fn send_raw(packets: &[Vec<u8>]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for p in packets {
        // SAFETY: sockaddr_in is plain data; zero is a valid start.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from_ne_bytes([p[16], p[17], p[18], p[19]]);
        // SAFETY: sends p's bytes to a valid sockaddr_in of the right size.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// `Icmp: InEchos` of a namespace (/proc/net/snmp is per namespace).
pub fn in_echos(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut icmp = text.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Packets counted by the named counter `name` of vxmesh's table in `ns`
/// (0 without table or counter).
pub fn nft_counter(ns: &str, name: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "list", "counter", "inet", "vxmesh", name,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map_or(0, |n| n.parse().unwrap())
}
