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
    let (tun, socket) = me
        .t
        .ns
        .run(|| -> anyhow::Result<(Tun, UdpSocket)> {
            let tun = Tun::open(TUN_NAME, false)?;
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
