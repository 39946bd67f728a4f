//! The distributed gateway of bridged networks on real labs: every host's
//! bridge answers the gateway address with the same MAC for its own
//! containers only (nothing about it crosses the VTEP), and a container
//! that moved to another host keeps its address and routes through its new
//! host. Root; namespaces only.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;
use vxmesh::model::{Vni, gateway_mac};
use vxmesh_lab::lab::{LabContainer, LabStore};
use vxmesh_lab::probe;

const GW: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const BRIDGE: &str = "vxm-br200";
const VTEP: &str = "vxm-vx200";

fn reach(src: &LabContainer, dst: Ipv4Addr) -> bool {
    matches!(
        probe::icmp_echo(
            &Netns::open(&src.netns).unwrap(),
            dst,
            56,
            false,
            Duration::from_millis(300)
        ),
        Ok(probe::EchoOutcome::Reply { .. })
    )
}

/// Reach `dst` within a few attempts (the first echo may wait for ARP).
fn reaches(src: &LabContainer, dst: Ipv4Addr) -> bool {
    (0..5).any(|_| reach(src, dst))
}

/// The VTEP's (tx packets, rx packets) in a host's namespace.
fn vtep_packets(host_ns: &str) -> (u64, u64) {
    let out = ip(host_ns, &["-s", "-j", "link", "show", VTEP]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j link");
    let s = &v[0]["stats64"];
    (
        s["tx"]["packets"].as_u64().unwrap(),
        s["rx"]["packets"].as_u64().unwrap(),
    )
}

/// A container's neighbour entry for the gateway: its MAC, if any.
fn gateway_neighbour(c: &LabContainer) -> Option<String> {
    let out = ip(&c.netns, &["-j", "neigh", "show", &GW.to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v[0]["lladdr"].as_str().map(str::to_string)
}

fn flush_neighbours(c: &LabContainer) {
    ip(&c.netns, &["neigh", "flush", "dev", "eth0"]);
}

fn container<'a>(cs: &'a [LabContainer], name: &str) -> &'a LabContainer {
    cs.iter().find(|c| c.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_is_answered_by_the_local_host_only() {
    let mut s = spec("gw", 2, 1, Mode::Bridged, 1);
    s.external = true; // bridged networks get `gateway = true`
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let mac = gateway_mac(Vni::new(200).unwrap()).to_string();
        for n in &lab.info.nodes {
            let link = ip(&n.netns, &["link", "show", BRIDGE]);
            assert!(link.contains(&mac), "{}: {link}", n.name);
            let addr = ip(&n.netns, &["-4", "addr", "show", BRIDGE]);
            assert!(addr.contains("10.10.0.1/22"), "{}: {addr}", n.name);
        }
        let cs = lab.info.containers.clone();
        let (c1, c2) = (container(&cs, "host1-n1c1"), container(&cs, "host2-n1c1"));
        let routes = ip(&c1.netns, &["route", "show", "default"]);
        assert!(routes.contains("via 10.10.0.1"), "{routes}");
        let (ns1, ns2) = (
            lab.node("host1").unwrap().netns.clone(),
            lab.node("host2").unwrap().netns.clone(),
        );

        // ARP and echo to the gateway from both sides: answered with the
        // gateway MAC, and not one packet on either VTEP.
        let before = (vtep_packets(&ns1), vtep_packets(&ns2));
        for c in [c1, c2] {
            flush_neighbours(c);
            assert!(reaches(c, GW), "{} cannot reach its gateway", c.name);
            assert_eq!(
                gateway_neighbour(c).as_deref(),
                Some(mac.as_str()),
                "{}",
                c.name
            );
        }
        assert_eq!(
            (vtep_packets(&ns1), vtep_packets(&ns2)),
            before,
            "gateway traffic crossed a VTEP"
        );
        // The containers still reach each other across the VTEP.
        assert!(reaches(c1, c2.ip));

        // Host1 loses its gateway address (agent stopped, so it stays lost):
        // host2 still has it, but never answers host1's container.
        lab.stop_agent_async("host1", Signal::SIGTERM)
            .await
            .unwrap();
        ip(&ns1, &["addr", "del", "10.10.0.1/22", "dev", BRIDGE]);
        flush_neighbours(c1);
        let before2 = vtep_packets(&ns2);
        assert!(
            !reaches(c1, GW),
            "a remote host answered host1's container for the gateway"
        );
        assert_eq!(
            vtep_packets(&ns2).1,
            before2.1,
            "host2 received gateway traffic"
        );
        assert!(reaches(c2, GW), "host2's own container lost its gateway");

        // The restarted agent puts the address back (plan, diff, apply).
        lab.start_agent("host1").unwrap();
        lab.wait_agent_ready("host1", Duration::from_secs(20))
            .await
            .unwrap();
        let back = wait_until(Duration::from_secs(10), || {
            ip(&ns1, &["-4", "addr", "show", BRIDGE]).contains("10.10.0.1/22")
        })
        .await;
        assert!(
            back.is_some(),
            "the agent did not restore the gateway address"
        );
        assert!(reaches(c1, GW));
    }
    assert_all_gone(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_container_keeps_its_address_and_routes_through_its_new_host() {
    let mut s = spec("gwmv", 3, 1, Mode::Bridged, 1);
    s.external = true;
    s.store = LabStore::Etcd;
    let name = s.name.clone();
    {
        let mut lab = up(&s).await;
        let c = container(&lab.info.containers, "host1-n1c1").clone();
        let moved = lab.move_container(&c.name, "host2").await.unwrap();
        assert_eq!(moved.ip, c.ip);
        assert_eq!(moved.node, "host2");
        let routes = ip(&moved.netns, &["route", "show", "default"]);
        assert!(routes.contains("via 10.10.0.1"), "{routes}");

        // Host1's gateway is gone for good: the moved container's first hop
        // must be host2.
        let ns1 = lab.node("host1").unwrap().netns.clone();
        lab.stop_agent_async("host1", Signal::SIGTERM)
            .await
            .unwrap();
        ip(&ns1, &["addr", "del", "10.10.0.1/22", "dev", BRIDGE]);
        flush_neighbours(&moved);
        assert!(
            reaches(&moved, GW),
            "the moved container has no gateway on host2"
        );
        // Another subnet: host3's underlay address. Host2 routes it out,
        // host3 answers through its own bridge and the VTEP to host2.
        let host3 = lab.node("host3").unwrap().underlay_ip;
        let ok = wait_until(Duration::from_secs(10), || reach(&moved, host3)).await;
        assert!(
            ok.is_some(),
            "the moved container cannot reach {host3} through host2"
        );
    }
    assert_all_gone(&name);
}
