//! Operating the secure underlay (issue 16) in labs with real agents: a
//! spoofing attacker on the underlay reaches no container of an encrypted
//! network. Root; namespaces only.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::frames::{in_echos, nft_counter, send_raw, udp_packet, vxlan_echo};
use common::underlay::stranger;
use common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{Netns, NetnsError};
use vxmesh::model::Mac;

const FRAMES: u64 = 5;
const ATTACKER: &str = "198.18.0.250";

/// A mixed bridged lab (net1 encrypted, net2 plain, one container per host
/// and network). An attacker on the underlay sends VXLAN echoes (to the
/// broadcast MAC, so no MAC need be known) to host1, from host2's underlay
/// address and from host2's transport address: with net1's VNI and with
/// net2's VNI to net1's container, and with net2's VNI to net2's container
/// (the control: a plain network takes frames from a member's address, so
/// the frames and the spoofing work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofing_attacker_reaches_no_container_of_an_encrypted_network() {
    let mut s = spec("sp", 2, 1, Mode::Bridged, 2);
    s.encrypt = true;
    let lab = up(&s).await;
    let report = lab.check(Duration::from_secs(2)).unwrap();
    assert!(report.failures().is_empty(), "{}", report.matrix());

    let cluster = vxmesh::config::load(&lab.info.cluster_file).unwrap();
    let (enc, plain) = (&cluster.networks[0], &cluster.networks[1]);
    assert!(enc.encrypt && !plain.encrypt);
    let host1 = lab.node("host1").unwrap().clone();
    let host2 = lab.node("host2").unwrap().clone();
    let rec2 = cluster.nodes.iter().find(|n| n.name == "host2").unwrap();
    let host2_transport = cluster.encryption.transport_addr(rec2).unwrap();
    let target = |net: &str| {
        lab.info
            .containers
            .iter()
            .find(|c| c.node == "host1" && c.network == net)
            .unwrap()
            .clone()
    };
    let (secret, open) = (target(&enc.name), target(&plain.name));

    // (source address, network whose VNI and port are used, container).
    let attacks = [
        (host2.underlay_ip, enc, &secret),
        (host2_transport, enc, &secret),
        (host2.underlay_ip, plain, &secret),
        (host2_transport, plain, &secret),
    ];
    let packets = |src: Ipv4Addr, net: &vxmesh::config::Network, dst: Ipv4Addr| {
        let inner_src = Ipv4Addr::from(u32::from(net.cidr.network()) + 200);
        (0..FRAMES as u16)
            .map(|seq| {
                let f = vxlan_echo(
                    net.vni.get(),
                    Mac([0xff; 6]),
                    Mac([0x02, 0, 0, 0, 0, 0x99]),
                    inner_src,
                    dst,
                    seq,
                );
                udp_packet(src, host1.underlay_ip, 40000 + seq, net.port, &f)
            })
            .collect::<Vec<_>>()
    };

    let attacker = unique_ns("spf");
    let _guard = stranger(&lab.info.underlay_ns, &attacker, ATTACKER);
    let send = |p: Vec<Vec<u8>>| {
        Netns::open(&attacker)
            .unwrap()
            .run(move || -> Result<(), NetnsError> {
                send_raw(&p).expect("send raw");
                Ok(())
            })
            .unwrap()
    };
    let spoofed_before = nft_counter(&host1.netns, "vxlan_spoofed");
    let mut delivered = Vec::new();
    for (src, net, c) in attacks {
        let before = in_echos(&c.netns);
        send(packets(src, net, c.ip));
        tokio::time::sleep(Duration::from_millis(300)).await;
        delivered.push((
            format!("from {src} vni {} to {} ({})", net.vni.get(), c.ip, c.network),
            in_echos(&c.netns) - before,
        ));
    }
    let spoofed = nft_counter(&host1.netns, "vxlan_spoofed") - spoofed_before;

    // The control: the same frames on the plain network reach its container.
    let before = in_echos(&open.netns);
    send(packets(host2.underlay_ip, plain, open.ip));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let control = in_echos(&open.netns) - before;
    assert_eq!(
        control, FRAMES,
        "the crafted frames do not work (a plain network takes them from a member's address)"
    );

    let reached: Vec<_> = delivered.iter().filter(|(_, n)| *n > 0).collect();
    assert!(
        reached.is_empty(),
        "spoofed frames reached a container of the encrypted network: {reached:?}"
    );
    // The frames with net1's VNI (net2's go to net2's bridge, where net1's
    // container is not).
    assert_eq!(
        spoofed,
        FRAMES * 2,
        "every spoofed frame counted in vxlan_spoofed: {delivered:?}"
    );
    // Encrypted traffic still flows after the attack.
    let report = lab.check(Duration::from_secs(2)).unwrap();
    assert!(report.failures().is_empty(), "{}", report.matrix());
}
