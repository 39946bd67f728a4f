//! Shared fixtures of the kernel tests (`kernel_*.rs`): a throwaway
//! namespace per test, an underlay inside it, the routed and bridged plans
//! they apply, and counters of what the kernel holds (via `ip`/`bridge`,
//! used only to inspect and to inject drift).
// Each kernel_*.rs file uses a part of these fixtures and imports.
#![allow(dead_code, unused_imports)]

pub use std::net::Ipv4Addr;
pub use std::process::Command;
pub use std::time::Instant;

pub use ipnet::Ipv4Net;
pub use vxmesh::dataplane::diff::diff;
pub use vxmesh::dataplane::kernel::{LinkOptions, Netlink, Ownership};
pub use vxmesh::dataplane::netns::{Netns, NetnsGuard};
pub use vxmesh::dataplane::{
    AddrSpec, FdbSpec, LinkKind, LinkSpec, NeighSpec, NodePlan, RouteSpec, VxlanSpec, reconcile,
};
pub use vxmesh::model::{Mac, Vni, container_mac, vtep_mac};

/// A namespace unique per test and process, deleted on drop.
pub struct TestNs {
    pub ns: Netns,
    _guard: NetnsGuard,
}

impl TestNs {
    pub fn new(tag: &str) -> Self {
        let name = crate::common::unique_ns(&format!("t-{tag}-"));
        let guard = NetnsGuard::create(&name).expect("create test namespace");
        TestNs {
            ns: guard.open().unwrap(),
            _guard: guard,
        }
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    pub async fn nl(&self) -> Netlink {
        Netlink::connect_in(&self.ns).await.expect("connect")
    }

    /// `ip -n NS ARGS` stdout (inspection / drift injection only).
    pub fn ip(&self, args: &[&str]) -> String {
        run("ip", self.name(), args)
    }

    pub fn bridge(&self, args: &[&str]) -> String {
        run("bridge", self.name(), args)
    }

    pub fn ip_forward(&self) -> bool {
        self.ns.run(vxmesh::dataplane::sysctl::ip_forward).unwrap()
    }
}

pub fn run(tool: &str, ns: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Underlay inside the namespace: veth eth0 <-> eth1, eth0 198.18.0.1/15, up.
pub async fn underlay(t: &TestNs) -> Netlink {
    let nl = t.nl().await;
    nl.create_veth("eth0", "eth1", None, 1500).await.unwrap();
    for d in ["eth0", "eth1"] {
        nl.set_link(
            d,
            LinkOptions {
                up: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    nl.add_address("eth0", "198.18.0.1/15".parse().unwrap())
        .await
        .unwrap();
    nl
}

pub fn vni(v: u32) -> Vni {
    Vni::new(v).unwrap()
}

pub fn bridge_spec(name: &str, net: &str) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        kind: LinkKind::Bridge,
        mtu: 1450,
        mac: "0e:64:c6:12:00:01".parse().unwrap(),
        master: None,
        port_learning: false,
        alias: format!("vxmesh:net:{net}"),
    }
}

pub fn vtep_spec(v: u32, proxy: bool, master: Option<&str>, net: &str) -> LinkSpec {
    LinkSpec {
        name: format!("vxm-vx{v}"),
        kind: LinkKind::Vxlan(VxlanSpec {
            vni: vni(v),
            local: LOCAL,
            underlay_dev: Some("eth0".into()),
            port: 4789,
            proxy,
        }),
        mtu: 1450,
        mac: vtep_mac(vni(v), LOCAL),
        master: master.map(String::from),
        port_learning: false,
        alias: format!("vxmesh:net:{net}"),
    }
}

/// Peer `i` (0-based): a /26 of 172.16.0.0/12 (172.18.x for the first ones),
/// underlay 198.18.0.0/15 + 2 + i.
pub fn peer(i: u32) -> (Ipv4Net, Ipv4Addr, Mac, Ipv4Addr) {
    let underlay = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 2)) + i);
    let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 18, 20, 0)) + i * 64);
    let subnet = Ipv4Net::new(net, 26).unwrap().trunc();
    assert!(
        "172.16.0.0/12"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&subnet)
    );
    (
        subnet,
        subnet.network(),
        vtep_mac(vni(100), underlay),
        underlay,
    )
}

/// Routed: bridge vxm-br0 172.18.10.1/24, VTEP vxm-vx100 172.18.10.0/32 and
/// `peers` remote nodes (route + permanent neighbour + FDB entry each).
pub fn routed(peers: std::ops::Range<u32>) -> NodePlan {
    let mut p = NodePlan {
        links: vec![
            bridge_spec("vxm-br0", "demo"),
            vtep_spec(100, false, None, "demo"),
        ],
        ip_forward: true,
        ..Default::default()
    };
    p.addresses.insert(AddrSpec {
        dev: "vxm-br0".into(),
        addr: "172.18.10.1/24".parse().unwrap(),
    });
    p.addresses.insert(AddrSpec {
        dev: "vxm-vx100".into(),
        addr: "172.18.10.0/32".parse().unwrap(),
    });
    for i in peers {
        let (subnet, gw, mac, underlay) = peer(i);
        p.routes.insert(RouteSpec {
            dst: subnet,
            via: gw,
            dev: "vxm-vx100".into(),
        });
        p.neighbours.insert(NeighSpec {
            dev: "vxm-vx100".into(),
            ip: gw,
            mac,
        });
        p.fdb.insert(FdbSpec {
            dev: "vxm-vx100".into(),
            mac,
            dst: underlay,
        });
    }
    p
}

/// Bridged: bridge vxm-br200 (no IP), VTEP vxm-vx200 proxy enslaved, two
/// remote endpoints.
pub fn bridged() -> NodePlan {
    let mut br = bridge_spec("vxm-br200", "blue");
    br.mac = "0e:c8:c6:12:00:01".parse().unwrap();
    let mut p = NodePlan {
        links: vec![br, vtep_spec(200, true, Some("vxm-br200"), "blue")],
        ..Default::default()
    };
    for i in 2..4u8 {
        let ip = Ipv4Addr::new(10, 20, 0, i);
        let mac = container_mac(ip);
        p.neighbours.insert(NeighSpec {
            dev: "vxm-vx200".into(),
            ip,
            mac,
        });
        p.fdb.insert(FdbSpec {
            dev: "vxm-vx200".into(),
            mac,
            dst: Ipv4Addr::new(198, 18, 0, i),
        });
    }
    p
}

/// (routes proto 86, permanent neighbours, FDB entries with dst) per `ip`.
pub fn counts(t: &TestNs, vtep: &str) -> (usize, usize, usize) {
    let routes = t.ip(&["route", "show", "proto", "86"]).lines().count();
    let neigh = t
        .ip(&["neigh", "show", "dev", vtep, "nud", "permanent"])
        .lines()
        .count();
    let fdb = t
        .bridge(&["fdb", "show", "dev", vtep])
        .lines()
        .filter(|l| l.contains(" dst ") && l.contains("self permanent"))
        .count();
    (routes, neigh, fdb)
}

/// (routes, permanent neighbours, FDB entries) in a dump.
pub fn owned(st: &vxmesh::dataplane::kernel::ActualState) -> (usize, usize, usize) {
    let perm = st.neighbours.iter().filter(|n| n.permanent).count();
    let others: Vec<_> = st.neighbours.iter().filter(|n| !n.permanent).collect();
    if !others.is_empty() {
        println!("kernel-made neighbours (not vxmesh's): {others:?}");
    }
    (st.routes.len(), perm, st.fdb.len())
}

pub async fn converge(nl: &Netlink, plan: &NodePlan) {
    let r = reconcile(nl, plan).await.expect("reconcile");
    assert!(r.changes > 0 || r.messages == 0);
    let again = reconcile(nl, plan).await.expect("second reconcile");
    assert_eq!(
        (again.changes, again.messages),
        (0, 0),
        "second pass must be empty: {:#?}",
        again.lines()
    );
}
