//! The VTEP accepts only its peers: a namespace on the underlay that is no
//! member sends well-formed VXLAN frames (the network's VNI, an inner ICMP
//! echo to a container, from an address of a peer's subnet). With the
//! filter they are dropped and counted; with `--vxlan-filter false` the same
//! frames reach the container (its ICMP InEchos counter moves), so the test
//! fails without the filter. Root; namespaces only.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::frames::{self, in_echos, vxlan_echo};
use common::underlay::stranger;
use common::*;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::{Netns, NetnsError};
use vxmesh::model;

const FRAMES: u64 = 5;

/// Packets counted by the host's `vxlan_dropped` counter (0 without table).
fn dropped(ns: &str) -> u64 {
    frames::nft_counter(ns, "vxlan_dropped")
}

/// Bring up a routed lab of two hosts, then let a stranger inject echoes
/// to host1's container; returns (echoes the container saw, packets host1 dropped).
async fn inject(filter: bool) -> (u64, u64) {
    let mut s = spec(if filter { "inj" } else { "ijo" }, 2, 1, Mode::Routed, 1);
    if !filter {
        s.agent_args = vec!["--vxlan-filter".into(), "false".into()];
    }
    let lab = up(&s).await;
    let report = lab.check(Duration::from_secs(2)).unwrap();
    assert!(
        report.failures().is_empty(),
        "peers still talk: {}",
        report.matrix()
    );

    let cluster = vxmesh::config::load(&lab.info.cluster_file).unwrap();
    let net = &cluster.networks[0];
    let host1 = lab.node("host1").unwrap().clone();
    let host2 = lab.node("host2").unwrap().clone();
    let target = lab
        .info
        .containers
        .iter()
        .find(|c| c.node == "host1")
        .unwrap()
        .clone();
    let peer_subnet = host2.subnets[&net.name];
    let src = Ipv4Addr::from(u32::from(peer_subnet.network()) + 99);
    let frames: Vec<Vec<u8>> = (0..FRAMES as u16)
        .map(|seq| {
            vxlan_echo(
                net.vni.get(),
                model::vtep_mac(net.vni, host1.underlay_ip),
                model::vtep_mac(net.vni, host2.underlay_ip),
                src,
                target.ip,
                seq,
            )
        })
        .collect();

    let attacker = unique_ns("atk");
    let guard = stranger(&lab.info.underlay_ns, &attacker, "198.18.0.250");
    let before = (in_echos(&target.netns), dropped(&host1.netns));
    let to = SocketAddrV4::new(host1.underlay_ip, net.port);
    Netns::open(&attacker)
        .unwrap()
        .run(move || -> Result<(), NetnsError> {
            let sock = UdpSocket::bind("198.18.0.250:0").expect("bind");
            for f in &frames {
                sock.send_to(f, to).expect("send");
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = (in_echos(&target.netns), dropped(&host1.netns));
    drop(guard);
    (after.0 - before.0, after.1 - before.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_frames_are_dropped_and_counted_with_the_filter() {
    let (echoes, dropped) = inject(true).await;
    assert_eq!(
        echoes, 0,
        "the container saw injected echoes through the filter"
    );
    assert_eq!(
        dropped, FRAMES,
        "every injected frame counted in vxlan_dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_filter_the_same_frames_reach_the_container() {
    let (echoes, dropped) = inject(false).await;
    assert_eq!(
        echoes, FRAMES,
        "with --vxlan-filter false the injected echoes arrive"
    );
    assert_eq!(dropped, 0);
}
