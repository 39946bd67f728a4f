//! The secure underlay's data path (issue 16): two hosts in namespaces, a
//! userspace WireGuard tunnel between them (boringtun behind `vxm-wg0`), a
//! VXLAN network whose VTEPs use the transport addresses; pings cross the
//! overlay while a capture on the underlay sees only WireGuard UDP.

mod common;
mod kernel_common;
mod secure_common;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use kernel_common::*;
use secure_common::Capture;
use vxmesh::secure::transport::{self, DEFAULT_PORT, DEFAULT_TRANSPORT_CIDR, TUN_ALIAS, TUN_NAME};
use vxmesh::secure::{DataPath, PeerSpec, PeerTable, PrivateKey, PublicKey, Tun};
use vxmesh_lab::probe::{PairJob, probe_pairs};

const VNI: u32 = 4242;

/// One host: its namespace, underlay address and (once started) data path.
struct Host {
    t: TestNs,
    underlay: Ipv4Addr,
    key: PrivateKey,
    subnet: Ipv4Net,
}

impl Host {
    fn transport(&self) -> Ipv4Addr {
        transport::derive(DEFAULT_TRANSPORT_CIDR, self.underlay)
    }
    fn vtep_ip(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

async fn up(nl: &Netlink, dev: &str, mtu: Option<u32>, alias: Option<&str>) {
    nl.set_link(
        dev,
        LinkOptions {
            up: Some(true),
            mtu,
            alias: alias.map(String::from),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

/// Two hosts joined by a veth underlay `u0` (198.18.0.1 and .2).
async fn hosts() -> (Host, Host) {
    let a = Host {
        t: TestNs::new("wga"),
        underlay: Ipv4Addr::new(198, 18, 0, 1),
        key: PrivateKey::generate().unwrap(),
        subnet: "172.18.1.0/24".parse().unwrap(),
    };
    let b = Host {
        t: TestNs::new("wgb"),
        underlay: Ipv4Addr::new(198, 18, 0, 2),
        key: PrivateKey::generate().unwrap(),
        subnet: "172.18.2.0/24".parse().unwrap(),
    };
    a.t.nl()
        .await
        .create_veth("u0", "u0", Some(&b.t.ns), 1500)
        .await
        .unwrap();
    for h in [&a, &b] {
        let nl = h.t.nl().await;
        up(&nl, "lo", None, None).await;
        up(&nl, "u0", None, None).await;
        nl.add_address("u0", Ipv4Net::new(h.underlay, 24).unwrap())
            .await
            .unwrap();
    }
    (a, b)
}

/// Start `me`'s data path with `peer` as its only peer, known by `peer_key`.
async fn start(me: &Host, peer: &Host, peer_key: PublicKey) -> DataPath {
    start_on(me, peer, peer_key, false).await
}

/// [`start`], on a TUN device with offloads (as the agent opens it) when
/// `offloaded`.
async fn start_on(me: &Host, peer: &Host, peer_key: PublicKey, offloaded: bool) -> DataPath {
    let (tun, socket) = me
        .t
        .ns
        .run(move || -> anyhow::Result<(Tun, UdpSocket)> {
            let tun = if offloaded {
                Tun::open_offloaded(TUN_NAME, false)?
            } else {
                Tun::open(TUN_NAME, false)?
            };
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_PORT))?;
            Ok((tun, socket))
        })
        .unwrap();
    let nl = me.t.nl().await;
    up(
        &nl,
        TUN_NAME,
        Some(transport::tun_mtu(1500)),
        Some(TUN_ALIAS),
    )
    .await;
    nl.add_address(
        TUN_NAME,
        Ipv4Net::new(me.transport(), DEFAULT_TRANSPORT_CIDR.prefix_len()).unwrap(),
    )
    .await
    .unwrap();
    let mut table = PeerTable::new(me.key.clone());
    table.set_peers(&[PeerSpec {
        node: "peer".into(),
        public_key: peer_key,
        next_public_key: None,
        endpoint: SocketAddrV4::new(peer.underlay, DEFAULT_PORT),
        transport: peer.transport(),
    }]);
    DataPath::start(tun, socket, table).unwrap()
}

/// The encrypted network's kernel objects on `me`, routed like vxmesh
/// plans them, but with the transport addresses as VTEP endpoints.
async fn overlay(me: &Host, peer: &Host) {
    let vni = Vni::new(VNI).unwrap();
    let vtep = format!("vxm-vx{VNI}");
    let peer_mac = vtep_mac(vni, peer.transport());
    let plan = NodePlan {
        links: vec![LinkSpec {
            name: vtep.clone(),
            kind: LinkKind::Vxlan(VxlanSpec {
                vni,
                local: me.transport(),
                underlay_dev: None,
                port: 4789,
                proxy: false,
            }),
            mtu: transport::tun_mtu(1500) - 50,
            mac: vtep_mac(vni, me.transport()),
            master: None,
            port_learning: false,
            alias: "vxmesh:net:enc".into(),
        }],
        addresses: [AddrSpec {
            dev: vtep.clone(),
            addr: Ipv4Net::new(me.vtep_ip(), 32).unwrap(),
        }]
        .into(),
        routes: [RouteSpec {
            dst: peer.subnet,
            via: peer.vtep_ip(),
            dev: vtep.clone(),
        }]
        .into(),
        neighbours: [NeighSpec {
            dev: vtep.clone(),
            ip: peer.vtep_ip(),
            mac: peer_mac,
        }]
        .into(),
        fdb: [FdbSpec {
            dev: vtep.clone(),
            mac: peer_mac,
            dst: peer.transport(),
        }]
        .into(),
        ..Default::default()
    };
    converge(&me.t.nl().await, &plan).await;
}

fn ping(from: &Host, to: Ipv4Addr) -> bool {
    let r = probe_pairs(&[PairJob::new(from.t.name(), to)], Duration::from_secs(2));
    r[0].reached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_over_wireguard_reaches_the_peer_and_the_underlay_sees_only_wireguard() {
    let (a, b) = hosts().await;
    let _da = start(&a, &b, b.key.public()).await;
    let _db = start(&b, &a, a.key.public()).await;
    overlay(&a, &b).await;
    overlay(&b, &a).await;

    // The capture sees clear text when there is some: a ping on the underlay.
    let cap = Capture::start(&b.t.ns, Some("u0"));
    assert!(ping(&a, b.underlay), "underlay ping");
    let plain = cap.stop();
    assert!(
        plain.icmp >= 2,
        "the capture must see a clear ping: {plain:?}"
    );

    let cap = Capture::start(&b.t.ns, Some("u0"));
    assert!(ping(&a, b.vtep_ip()), "a -> b over the encrypted overlay");
    assert!(ping(&b, a.vtep_ip()), "b -> a over the encrypted overlay");
    let seen = cap.stop();
    assert!(seen.wireguard >= 4, "WireGuard packets expected: {seen:?}");
    assert_eq!(seen.vxlan, 0, "no VXLAN in clear on the underlay: {seen:?}");
    assert_eq!(seen.icmp, 0, "no ICMP in clear on the underlay: {seen:?}");
    assert_eq!(seen.other_ip, 0, "only WireGuard on the underlay: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_wrong_key_gets_no_tunnel() {
    let (a, b) = hosts().await;
    let wrong = PrivateKey::generate().unwrap().public();
    let _da = start(&a, &b, b.key.public()).await;
    // b expects some other key from a: a's handshakes fail at b.
    let db = start(&b, &a, wrong).await;
    overlay(&a, &b).await;
    overlay(&b, &a).await;
    assert!(ping(&a, b.underlay), "the underlay itself works");
    assert!(
        !ping(&a, b.vtep_ip()),
        "no overlay traffic without the right key"
    );
    let stats = db.table().read().unwrap().stats();
    assert_eq!(stats[0].since_handshake, None, "{stats:?}");
    assert!(stats[0].decrypt_failures >= 1, "{stats:?}");
}

/// The product path: a cluster file with `encrypt = true` and each node's
/// `public_key`, planned by the planner, applied by the reconciler and
/// `SecureUnderlay` (key files in each node's state dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_encrypted_network_comes_up_and_a_plain_one_stays_plain() {
    let (a, b) = hosts().await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = [&a, &b];
    let underlays: Vec<_> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let state = dir.path().join(format!("state{i}"));
            let u = vxmesh::secure::SecureUnderlay::new(None, state);
            let key = u.public_key().unwrap();
            (h, u, key)
        })
        .collect();
    let text = format!(
        r#"
[[network]]
name = "secret"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100
encrypt = true

[[network]]
name = "open"
mode = "bridged"
cidr = "10.9.0.0/24"
subnet_len = 28
vni = 101
port = 4790

[[node]]
name = "a"
underlay_ip = "{}"
subnets = {{ secret = "172.18.1.0/24" }}
public_key = "{}"

[[node]]
name = "b"
underlay_ip = "{}"
subnets = {{ secret = "172.18.2.0/24" }}
public_key = "{}"
"#,
        a.underlay, underlays[0].2, b.underlay, underlays[1].2
    );
    let cluster = vxmesh::config::parse(&text, "t.toml").unwrap();
    let mut running = Vec::new();
    for ((h, mut u, _), name) in underlays.into_iter().zip(["a", "b"]) {
        let plan = vxmesh::dataplane::plan::plan(&vxmesh::dataplane::plan::PlanInput {
            cluster: &cluster,
            node: name,
            endpoints: None,
            underlay_mtu: 1500,
            vxlan_filter: true,
        })
        .unwrap();
        let nl = h.t.nl().await;
        // Another key than the one the cluster file lists: refused, nothing made.
        let mut stranger = vxmesh::secure::SecureUnderlay::new(None, dir.path().join("other"));
        let e = stranger.apply(&nl, plan.secure.as_ref()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("is not the public_key the store lists"),
            "{e}"
        );
        assert!(nl.get_link(TUN_NAME).await.unwrap().is_none());
        let changes = u.apply(&nl, plan.secure.as_ref()).await.unwrap();
        assert_eq!(changes.added.len(), 1, "{changes:?}");
        converge(&nl, &plan).await;
        // A second pass changes nothing.
        let again = u.apply(&nl, plan.secure.as_ref()).await.unwrap();
        assert_eq!(again, Default::default());
        running.push((u, nl, plan));
    }
    let gw_b = Ipv4Addr::new(172, 18, 2, 1);
    let cap = Capture::start(&b.t.ns, Some("u0"));
    assert!(
        ping(&a, gw_b),
        "a -> b's gateway over the encrypted network"
    );
    let seen = cap.stop();
    assert!(seen.wireguard >= 4, "{seen:?}");
    assert_eq!(
        (seen.vxlan, seen.icmp, seen.other_ip),
        (0, 0, 0),
        "{seen:?}"
    );
    let stats = running[0].0.stats();
    assert!(stats[0].since_handshake.is_some(), "{stats:?}");
    assert!(stats[0].tx_bytes > 0 && stats[0].rx_bytes > 0, "{stats:?}");

    // The plain network's VTEP stays on the underlay, its own port.
    let vx = a.t.ip(&["-d", "link", "show", "vxm-vx101"]);
    assert!(
        vx.contains("local 198.18.0.1") && vx.contains("dstport 4790"),
        "{vx}"
    );
    let enc = a.t.ip(&["-d", "link", "show", "vxm-vx100"]);
    assert!(enc.contains("local 10.255.0.1"), "{enc}");

    // No encrypted network left: the data path stops and the device goes.
    let (mut u, nl, _) = running.remove(0);
    u.apply(&nl, None).await.unwrap();
    assert!(nl.get_link(TUN_NAME).await.unwrap().is_none());

    // `down` removes the secure underlay's device too (b's is still up).
    let (_u, nl_b, _) = running.remove(0);
    assert!(nl_b.get_link(TUN_NAME).await.unwrap().is_some());
    let out = Command::new(common::exe())
        .args(["--netns", b.t.name(), "down", "--state-dir"])
        .arg(dir.path().join("down-state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(TUN_NAME),
        "down names what it removed: {text}"
    );
    assert!(nl_b.get_link(TUN_NAME).await.unwrap().is_none());
}

/// An IPv4/UDP datagram 10.255.0.2:40000 -> 10.255.0.1:4789 with `payload`
/// bytes starting at `fill` (zero UDP checksum, as VXLAN sends).
fn udp_datagram(payload: usize, fill: u8) -> Vec<u8> {
    let total = 28 + payload;
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 255, 0, 2]);
    p[16..20].copy_from_slice(&[10, 255, 0, 1]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4789u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    let sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend((0..payload).map(|i| fill.wrapping_add(i as u8)));
    p
}

/// Decrypted datagrams merged into one burst (`secure::gro`) and written to
/// `vxm-wg0` in one write reach a UDP socket behind it as the datagrams
/// they were, bytes intact: the kernel accepts UDP segmentation written
/// to an L3 TUN device and cuts the burst again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_udp_burst_written_to_the_tun_device_arrives_as_its_datagrams() {
    use vxmesh::secure::gro::Merger;
    let t = TestNs::new("wgm");
    let (mut tun, socket) =
        t.ns.run(|| -> anyhow::Result<(Tun, UdpSocket)> {
            Ok((
                Tun::open_offloaded(TUN_NAME, false)?,
                UdpSocket::bind("0.0.0.0:4789")?,
            ))
        })
        .unwrap();
    assert!(
        tun.offloaded(),
        "this kernel opened vxm-wg0 without offloads"
    );
    let nl = t.nl().await;
    up(&nl, "lo", None, None).await;
    up(&nl, TUN_NAME, None, None).await;
    nl.add_address(TUN_NAME, "10.255.0.1/16".parse().unwrap())
        .await
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    let sent: Vec<Vec<u8>> = (0..20u8)
        .map(|i| udp_datagram(if i == 19 { 333 } else { 1200 }, i))
        .collect();
    let mut merger = Merger::new();
    let mut writes = 0;
    let mut write = |w: vxmesh::secure::gro::Write| {
        writes += 1;
        tun.write_parts(&w.vnet, w.head, w.body)
    };
    for p in &sent {
        merger.push(p, &mut write);
    }
    merger.flush(&mut write);
    assert_eq!(writes, 1, "one write for the whole burst");
    assert_eq!((merger.counts().bursts, merger.counts().refused), (1, 0));

    let mut buf = vec![0u8; 65536];
    for (i, p) in sent.iter().enumerate() {
        let (n, from) = socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {}: {e}", sent.len()));
        assert_eq!(from.to_string(), "10.255.0.2:40000");
        assert_eq!(&buf[..n], &p[28..], "datagram {i}");
    }
}

/// Numbered datagrams from a socket behind `a`'s `vxm-wg0` reach a socket
/// behind `b`'s all and in order: the sending side hands batches of
/// encrypted datagrams from the encrypting thread to the sending thread
/// (`secure::sendq`), and a batch lost or overtaken there shows here. At
/// most `WINDOW` datagrams are on the way at once, so that no queue on the
/// path overflows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_datagrams_cross_the_tunnel_all_and_in_order() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const COUNT: u64 = 10_000;
    const WINDOW: u64 = 48;
    const PORT: u16 = 5001;

    let (a, b) = hosts().await;
    let _da = start_on(&a, &b, b.key.public(), true).await;
    let _db = start_on(&b, &a, a.key.public(), true).await;
    let to = SocketAddrV4::new(b.transport(), PORT);
    let from_a = a.transport();
    let bind = |t: &TestNs, at: SocketAddrV4| {
        t.ns.run(move || -> anyhow::Result<UdpSocket> { Ok(UdpSocket::bind(at)?) })
            .unwrap()
    };
    let (tx, rx) = (bind(&a.t, SocketAddrV4::new(from_a, 0)), bind(&b.t, to));
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // Until the handshake is done, packets wait in boringtun's queue and
    // leave from the receiving thread: warm the tunnel up first.
    let mut buf = vec![0u8; 2048];
    let warm = std::time::Instant::now();
    loop {
        tx.send_to(b"warm", to).unwrap();
        if rx.recv(&mut buf).is_ok() {
            break;
        }
        assert!(warm.elapsed() < Duration::from_secs(10), "no handshake");
    }
    while rx.recv(&mut buf).is_ok() {}

    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let reader = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 2048];
        let mut idle = 0;
        while got.load(Ordering::Relaxed) < COUNT {
            let n = match rx.recv(&mut buf) {
                Ok(n) => n,
                Err(_) if idle < 25 => {
                    idle += 1;
                    continue;
                }
                Err(e) => return Err(format!("nothing for 5 s: {e}")),
            };
            idle = 0;
            let want = got.load(Ordering::Relaxed);
            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
            if seq != want {
                return Err(format!("datagram {seq} arrived where {want} was due"));
            }
            if n != size(seq) || buf[8..n].iter().any(|&x| x != seq as u8) {
                return Err(format!("datagram {seq}: {n} bytes, wrong content"));
            }
            got.store(want + 1, Ordering::Relaxed);
        }
        Ok(())
    });
    // Full-sized datagrams with a short one now and then (which ends a
    // segmentation run on the sending side).
    fn size(seq: u64) -> usize {
        if seq % 9 == 8 { 200 } else { 1200 }
    }
    let mut out = vec![0u8; 1200];
    for seq in 0..COUNT {
        let since = std::time::Instant::now();
        while seq - received.load(Ordering::Relaxed) >= WINDOW && !reader.is_finished() {
            assert!(since.elapsed() < Duration::from_secs(6), "stalled at {seq}");
            std::thread::yield_now();
        }
        if reader.is_finished() {
            break;
        }
        let n = size(seq);
        out[..8].copy_from_slice(&seq.to_le_bytes());
        out[8..n].fill(seq as u8);
        tx.send_to(&out[..n], to).unwrap();
    }
    let verdict = reader.join().unwrap();
    assert_eq!(
        verdict,
        Ok(()),
        "after {} of {COUNT} datagrams in order",
        received.load(Ordering::Relaxed)
    );
}
