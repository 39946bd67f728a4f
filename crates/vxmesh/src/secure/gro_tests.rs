use super::*;

/// An IPv4/UDP datagram from `sport` with `payload` bytes of `fill`
/// (a VXLAN packet as the peer's kernel sends it: UDP checksum zero).
fn datagram(sport: u16, payload: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![0u8; HEADER_LEN];
    p[0] = 0x45;
    p[1] = 0x02; // ECN capable
    put16(&mut p, 2, (HEADER_LEN + payload) as u16);
    put16(&mut p, 4, 0x1234 ^ u16::from(fill));
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 255, 0, 1]);
    p[16..20].copy_from_slice(&[10, 255, 0, 2]);
    put16(&mut p, 20, sport);
    put16(&mut p, 22, 4789);
    put16(&mut p, 24, (8 + payload) as u16);
    ip_csum(&mut p, 0);
    p.extend((0..payload).map(|i| fill.wrapping_add(i as u8)));
    p
}

/// What was written: each write's virtio-net header and bytes.
#[derive(Default)]
struct Device {
    writes: Vec<([u8; VNET_HDR_LEN], Vec<u8>)>,
    refuse_bursts: bool,
}

impl Device {
    fn sink(&mut self) -> impl FnMut(Write) -> std::io::Result<()> + '_ {
        |w: Write| {
            if self.refuse_bursts && w.vnet != PLAIN {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.writes.push((w.vnet, [w.head, w.body].concat()));
            Ok(())
        }
    }

    /// The packets written one by one (no burst header).
    fn singles(&self) -> Vec<Vec<u8>> {
        assert!(self.writes.iter().all(|(v, _)| *v == PLAIN));
        self.writes.iter().map(|(_, p)| p.clone()).collect()
    }
}

fn run(packets: &[Vec<u8>], dev: &mut Device) -> Merger {
    let mut m = Merger::new();
    let mut sink = dev.sink();
    for p in packets {
        m.push(p, &mut sink);
    }
    m.flush(&mut sink);
    m
}

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

#[test]
fn equal_datagrams_of_one_flow_become_one_burst_with_every_field_right() {
    let packets: Vec<_> = (0..5).map(|i| datagram(40000, 1000, i)).collect();
    let mut dev = Device::default();
    let m = run(&packets, &mut dev);
    assert_eq!(dev.writes.len(), 1);
    let (vnet, b) = &dev.writes[0];
    // Virtio-net header: partial checksum, UDP segmentation of 1000.
    assert_eq!((vnet[0], vnet[1]), (F_NEEDS_CSUM, GSO_UDP_L4));
    assert_eq!(u16le(vnet, 2), 28, "header length");
    assert_eq!(u16le(vnet, 4), 1000, "segment size");
    assert_eq!(
        (u16le(vnet, 6), u16le(vnet, 8)),
        (20, 6),
        "checksum start, offset"
    );
    assert!(vnet[10..].iter().all(|&x| x == 0));
    // IPv4: total length of the burst, valid header checksum, the rest of
    // the first datagram's header unchanged.
    assert_eq!(b.len(), 28 + 5000);
    assert_eq!(be16(b, 2), b.len());
    assert_eq!(fold(sum(&b[..20], 0)), 0xffff, "IPv4 header checksum");
    assert_eq!(b[..2], packets[0][..2]);
    assert_eq!(b[4..10], packets[0][4..10]);
    assert_eq!(b[12..24], packets[0][12..24]);
    // UDP: length of the burst; the checksum field holds the folded
    // pseudo-header sum (addresses, protocol, UDP length).
    assert_eq!(be16(b, 24), 8 + 5000);
    let pseudo = sum(&b[12..20], 0) + 17 + 5008;
    assert_eq!(be16(b, 26), usize::from(fold(pseudo)));
    // Payloads back to back, in order.
    let payloads: Vec<u8> = packets.iter().flat_map(|p| p[28..].to_vec()).collect();
    assert_eq!(b[28..], payloads[..]);
    assert_eq!(
        m.counts(),
        MergeCounts {
            packets: 5,
            bursts: 1,
            refused: 0
        }
    );
}

#[test]
fn a_shorter_last_datagram_joins_and_ends_the_burst() {
    let packets = vec![
        datagram(40000, 1000, 1),
        datagram(40000, 1000, 2),
        datagram(40000, 300, 3),
        datagram(40000, 1000, 4),
    ];
    let mut dev = Device::default();
    run(&packets, &mut dev);
    assert_eq!(dev.writes.len(), 2);
    assert_eq!(dev.writes[0].1.len(), 28 + 2300);
    assert_eq!(u16le(&dev.writes[0].0, 4), 1000);
    // The datagram after the short one is written as it came.
    assert_eq!(dev.writes[1], (PLAIN, packets[3].clone()));
}

#[test]
fn a_longer_datagram_starts_a_new_group() {
    let packets = vec![
        datagram(40000, 500, 1),
        datagram(40000, 500, 2),
        datagram(40000, 900, 3),
        datagram(40000, 900, 4),
    ];
    let mut dev = Device::default();
    run(&packets, &mut dev);
    let sizes: Vec<_> = dev
        .writes
        .iter()
        .map(|(v, b)| (u16le(v, 4), b.len()))
        .collect();
    assert_eq!(sizes, vec![(500, 28 + 1000), (900, 28 + 1800)]);
}

#[test]
fn a_lone_datagram_is_written_unchanged() {
    let p = datagram(40000, 1000, 9);
    let mut dev = Device::default();
    let m = run(std::slice::from_ref(&p), &mut dev);
    assert_eq!(dev.singles(), vec![p]);
    assert_eq!(m.counts().bursts, 0);
}

#[test]
fn other_flows_are_written_in_arrival_order() {
    let (a, b) = (40000, 40001);
    let packets = vec![
        datagram(a, 1000, 1),
        datagram(a, 1000, 2),
        datagram(b, 1000, 3),
        datagram(a, 1000, 4),
        datagram(a, 1000, 5),
    ];
    let mut dev = Device::default();
    run(&packets, &mut dev);
    let order: Vec<_> = dev
        .writes
        .iter()
        .map(|(_, w)| (be16(w, 20) as u16, w.len()))
        .collect();
    assert_eq!(order, vec![(a, 2028), (b, 1028), (a, 2028)]);
}

#[test]
fn differing_tos_ttl_or_df_keep_datagrams_apart() {
    let base = datagram(40000, 1000, 1);
    for (at, value) in [(1, 0x03u8), (8, 63), (6, 0x00)] {
        let mut other = datagram(40000, 1000, 2);
        other[at] = value;
        ip_csum(&mut other, 0);
        let mut dev = Device::default();
        run(&[base.clone(), other.clone()], &mut dev);
        assert_eq!(dev.singles(), vec![base.clone(), other], "byte {at}");
    }
}

#[test]
fn non_udp_fragments_options_and_ipv6_pass_through_in_order() {
    let udp = datagram(40000, 1000, 1);
    let mut tcp = datagram(40000, 1000, 2);
    tcp[9] = 6;
    let mut more_fragments = datagram(40000, 1000, 3);
    more_fragments[6] = 0x20;
    let mut offset = datagram(40000, 1000, 4);
    offset[7] = 0x10;
    let mut options = datagram(40000, 1000, 5);
    options[0] = 0x46;
    let mut ipv6 = vec![0x60u8; 1040];
    ipv6[6] = 17;
    let mut bad_length = datagram(40000, 1000, 6);
    put16(&mut bad_length, 24, 900);
    let empty = datagram(40000, 0, 7);
    for odd in [
        tcp,
        more_fragments,
        offset,
        options,
        ipv6,
        bad_length,
        empty,
    ] {
        let packets = vec![udp.clone(), odd.clone(), udp.clone(), udp.clone()];
        let mut dev = Device::default();
        run(&packets, &mut dev);
        assert_eq!(dev.writes.len(), 3);
        assert_eq!(dev.writes[0], (PLAIN, udp.clone()));
        assert_eq!(dev.writes[1], (PLAIN, odd));
        assert_eq!(dev.writes[2].1.len(), 28 + 2000);
    }
}

#[test]
fn bursts_stop_at_64_datagrams_and_64_kib() {
    let many: Vec<_> = (0..70).map(|i| datagram(40000, 100, i)).collect();
    let mut dev = Device::default();
    run(&many, &mut dev);
    let lens: Vec<_> = dev.writes.iter().map(|(_, b)| b.len()).collect();
    assert_eq!(lens, vec![28 + 6400, 28 + 600]);

    let big: Vec<_> = (0..50).map(|i| datagram(40000, 1400, i)).collect();
    let mut dev = Device::default();
    run(&big, &mut dev);
    let lens: Vec<_> = dev.writes.iter().map(|(_, b)| b.len()).collect();
    // 46 * 1400 + 28 = 64 428 <= 65 535; one more would not fit.
    assert_eq!(lens, vec![28 + 46 * 1400, 28 + 4 * 1400]);
    assert!(lens.iter().all(|&l| l <= MAX_BURST));
}

#[test]
fn a_refused_burst_is_written_again_one_datagram_at_a_time_and_bursts_stop() {
    let packets: Vec<_> = (0..6).map(|i| datagram(40000, 800, i)).collect();
    let mut dev = Device {
        refuse_bursts: true,
        ..Device::default()
    };
    let mut m = Merger::new();
    {
        let mut sink = dev.sink();
        for p in &packets[..3] {
            m.push(p, &mut sink);
        }
        m.flush(&mut sink);
        assert!(!m.enabled());
        for p in &packets[3..] {
            m.push(p, &mut sink);
        }
        m.flush(&mut sink);
    }
    // Each datagram exactly as it came (its own lengths and checksums).
    assert_eq!(dev.singles(), packets);
    assert_eq!(
        m.counts(),
        MergeCounts {
            packets: 6,
            bursts: 0,
            refused: 1
        }
    );
}

#[test]
fn other_write_errors_do_not_turn_bursts_off() {
    let packets: Vec<_> = (0..2).map(|i| datagram(40000, 800, i)).collect();
    let mut m = Merger::new();
    let mut fail = |_: Write| Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
    for p in &packets {
        m.push(p, &mut fail);
    }
    m.flush(&mut fail);
    assert!(m.enabled());
    assert_eq!(m.counts().refused, 0);
}
