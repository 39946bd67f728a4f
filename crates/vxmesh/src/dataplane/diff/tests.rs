//! Unit tests of the diff (no root needed): the fixtures (plans and the
//! kernel state they converge to), then one file per topic.

use std::net::Ipv4Addr;

use super::*;
use crate::dataplane::kernel::{ActualFdb, ActualNeigh, ActualRoute, ActualVxlan, route_metric};
use crate::dataplane::{AddrSpec, FdbSpec, NeighSpec, RouteSpec, VxlanSpec};
use crate::model::{Mac, Vni, vtep_mac};

mod devices;
mod entries;
mod incremental;
mod verdicts;

const VNI: u32 = 100;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn local() -> Ipv4Addr {
    ip("198.18.0.1")
}

fn vni() -> Vni {
    Vni::new(VNI).unwrap()
}

fn peer(i: u8) -> (ipnet::Ipv4Net, Ipv4Addr, Mac, Ipv4Addr) {
    let underlay = Ipv4Addr::new(198, 18, 0, i);
    let subnet: ipnet::Ipv4Net = format!("172.18.{}.0/24", i * 10).parse().unwrap();
    (
        subnet,
        subnet.network(),
        vtep_mac(vni(), underlay),
        underlay,
    )
}

fn bridge(name: &str, mtu: u32) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        kind: LinkKind::Bridge,
        mtu,
        mac: "0e:64:c6:12:00:01".parse().unwrap(),
        master: None,
        port_learning: false,
        alias: "vxmesh:net:demo".into(),
    }
}

fn vtep(name: &str, proxy: bool, master: Option<&str>) -> LinkSpec {
    LinkSpec {
        name: name.into(),
        kind: LinkKind::Vxlan(VxlanSpec {
            vni: vni(),
            local: local(),
            underlay_dev: Some("eth0".into()),
            port: 4789,
            proxy,
        }),
        mtu: 1450,
        mac: vtep_mac(vni(), local()),
        master: master.map(String::from),
        port_learning: false,
        alias: "vxmesh:net:demo".into(),
    }
}

/// Routed: vxm-br0 172.18.10.1/24, vxm-vx100 172.18.10.0/32, peers 2..=n+1.
fn routed(peers: u8) -> NodePlan {
    let mut p = NodePlan {
        links: vec![bridge("vxm-br0", 1450), vtep("vxm-vx100", false, None)],
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
    for i in 2..peers + 2 {
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

/// Bridged: vxm-br200 (no IP), vxm-vx200 proxy enslaved, endpoints.
fn bridged() -> NodePlan {
    let mut v = vtep("vxm-vx200", true, Some("vxm-br200"));
    if let LinkKind::Vxlan(x) = &mut v.kind {
        x.vni = Vni::new(200).unwrap();
    }
    let mut p = NodePlan {
        links: vec![bridge("vxm-br200", 1450), v],
        ..Default::default()
    };
    for i in 2..4u8 {
        let eip = Ipv4Addr::new(10, 20, 0, i);
        let mac = model::container_mac(eip);
        p.neighbours.insert(NeighSpec {
            dev: "vxm-vx200".into(),
            ip: eip,
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

/// What the kernel shows once `plan` is applied.
fn converged(plan: &NodePlan) -> ActualState {
    let mut st = ActualState {
        ip_forward: plan.ip_forward,
        ..Default::default()
    };
    for (i, l) in plan.links.iter().enumerate() {
        let (kind, vxlan) = match &l.kind {
            LinkKind::Bridge => ("bridge", None),
            LinkKind::Vxlan(v) => (
                "vxlan",
                Some(ActualVxlan {
                    vni: v.vni.get(),
                    local: Some(v.local),
                    link_index: v.underlay_dev.as_ref().map(|_| 2),
                    link: v.underlay_dev.clone(),
                    port: v.port,
                    learning: false,
                    proxy: v.proxy,
                }),
            ),
        };
        st.links.push(ActualLink {
            name: l.name.clone(),
            index: 10 + i as u32,
            kind: Some(kind.into()),
            vxlan,
            mtu: l.mtu,
            mac: Some(l.mac),
            master: l.master.clone(),
            master_index: l.master.as_ref().map(|_| 10),
            up: true,
            oper: "up".into(),
            alias: Some(l.alias.clone()),
            port_learning: l.master.as_ref().map(|_| l.port_learning),
        });
    }
    st.addresses = plan.addresses.iter().cloned().collect();
    st.routes = plan
        .routes
        .iter()
        .map(|r| ActualRoute::written(r, Some(11)))
        .collect();
    st.neighbours = plan
        .neighbours
        .iter()
        .map(|n| ActualNeigh {
            dev: n.dev.clone(),
            ip: n.ip,
            mac: Some(n.mac),
            permanent: true,
        })
        .collect();
    st.fdb = plan
        .fdb
        .iter()
        .map(|e| ActualFdb {
            dev: e.dev.clone(),
            mac: e.mac,
            dst: Some(e.dst),
            permanent: true,
        })
        .collect();
    st
}

fn link_mut<'a>(st: &'a mut ActualState, name: &str) -> &'a mut ActualLink {
    st.links.iter_mut().find(|l| l.name == name).unwrap()
}

fn lines(changes: &[Change]) -> Vec<String> {
    changes.iter().map(ToString::to_string).collect()
}
