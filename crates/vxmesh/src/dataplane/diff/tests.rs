//! Unit tests of the diff (no root needed).

use std::net::Ipv4Addr;

use super::*;
use crate::dataplane::VxlanSpec;
use crate::dataplane::kernel::{ActualNeigh, ActualVxlan};
use crate::model::{Vni, vtep_mac};

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
        .map(|r| ActualRoute {
            dst: r.dst,
            via: Some(r.via),
            dev: Some(r.dev.clone()),
            oif: Some(11),
            onlink: true,
            table: 254,
            priority: route_metric(r.dst),
            tos: 0,
            scope: 0,
            kind: 1,
        })
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

#[test]
fn from_empty_creates_everything_in_phase_order() {
    let plan = routed(3);
    let c = diff(&plan, &ActualState::default()).unwrap();
    assert_eq!(c.len(), 2 + 2 + 1 + 3 * 3, "{:#?}", lines(&c));
    // Sorted by phase; bridge created before the VTEP.
    assert!(c.windows(2).all(|w| w[0].phase() <= w[1].phase()));
    assert!(matches!(&c[0], Change::CreateLink { link } if link.name == "vxm-br0"));
    assert!(matches!(&c[1], Change::CreateLink { link } if link.name == "vxm-vx100"));
    let first_route = c
        .iter()
        .position(|x| matches!(x, Change::ReplaceRoute { .. }))
        .unwrap();
    let last_entry = c
        .iter()
        .rposition(|x| {
            matches!(
                x,
                Change::ReplaceNeighbour { .. } | Change::ReplaceFdb { .. }
            )
        })
        .unwrap();
    assert!(last_entry < first_route, "routes come after ARP/FDB");
    assert!(c.contains(&Change::SetIpForward { on: true }));
    // Routed VTEP has no master: no bridge-port change.
    assert!(
        !c.iter()
            .any(|x| matches!(x, Change::SetPortLearning { .. }))
    );
}

#[test]
fn converged_state_gives_no_change() {
    for plan in [routed(3), bridged(), NodePlan::default()] {
        assert_eq!(diff(&plan, &converged(&plan)).unwrap(), vec![]);
    }
}

#[test]
fn missing_entries_are_replaced_one_each() {
    let plan = routed(3);
    let (subnet, gw, mac, underlay) = peer(3);
    let mut st = converged(&plan);
    st.routes.retain(|r| r.dst != subnet);
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![format!(
            "replace route {subnet} via {gw} dev vxm-vx100 onlink proto 86 metric {}",
            route_metric(subnet)
        )]
    );
    let mut st = converged(&plan);
    st.neighbours.retain(|n| n.ip != gw);
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![format!(
            "replace neigh {gw} lladdr {mac} dev vxm-vx100 nud permanent"
        )]
    );
    let mut st = converged(&plan);
    st.fdb.retain(|e| e.mac != mac);
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![format!("replace fdb {mac} dst {underlay} dev vxm-vx100")]
    );
    let mut st = converged(&plan);
    st.addresses.clear();
    assert_eq!(diff(&plan, &st).unwrap().len(), 2);
}

#[test]
fn stale_peer_loses_exactly_its_three_entries() {
    let small = routed(2);
    let big = routed(3);
    let (subnet, gw, mac, underlay) = peer(4);
    let c = diff(&small, &converged(&big)).unwrap();
    assert_eq!(
        lines(&c),
        vec![
            format!(
                "delete route {subnet} via {gw} dev vxm-vx100 proto 86 metric {}",
                route_metric(subnet)
            ),
            format!("delete neigh {gw} dev vxm-vx100"),
            format!("delete fdb {mac} dst {underlay} dev vxm-vx100"),
        ]
    );
    assert_eq!(c[0].phase(), Phase::DeleteRoutes);
    assert_eq!(c[2].phase(), Phase::DeleteEntries);
}

#[test]
fn different_entries_are_replaced_not_deleted() {
    let plan = routed(1);
    let (subnet, gw, mac, _) = peer(2);
    let other: Mac = "0a:64:c6:12:00:99".parse().unwrap();
    let mut st = converged(&plan);
    st.neighbours[0].mac = Some(other);
    st.fdb[0].dst = Some(ip("198.18.0.99"));
    st.routes[0].via = Some(ip("172.18.20.99"));
    let c = diff(&plan, &st).unwrap();
    assert_eq!(c.len(), 3, "{:#?}", lines(&c));
    assert!(c.iter().all(|x| matches!(
        x,
        Change::ReplaceNeighbour { .. } | Change::ReplaceFdb { .. } | Change::ReplaceRoute { .. }
    )));
    // A route without onlink, or with another scope, is rewritten too.
    let mut st = converged(&plan);
    st.routes[0].onlink = false;
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![format!(
            "replace route {subnet} via {gw} dev vxm-vx100 onlink proto 86 metric {}",
            route_metric(subnet)
        )]
    );
    // A route with another metric is another route: replace adds ours, the
    // other goes.
    let mut st = converged(&plan);
    st.routes[0].priority = 0;
    let c = diff(&plan, &st).unwrap();
    assert_eq!(c.len(), 2);
    assert!(matches!(&c[0], Change::DeleteRoute { route } if route.priority == 0));
    assert!(matches!(&c[1], Change::ReplaceRoute { .. }));
    let _ = mac;
}

#[test]
fn non_permanent_neighbours_are_not_ours() {
    let plan = routed(1);
    let mut st = converged(&plan);
    st.neighbours[0].permanent = false;
    st.neighbours.push(ActualNeigh {
        dev: "vxm-vx100".into(),
        ip: ip("172.18.99.1"),
        mac: None,
        permanent: false,
    });
    let c = diff(&plan, &st).unwrap();
    assert_eq!(c.len(), 1);
    assert!(matches!(&c[0], Change::ReplaceNeighbour { .. }));
}

#[test]
fn fdb_with_several_remotes_keeps_the_wanted_one() {
    let plan = routed(1);
    let (_, _, mac, underlay) = peer(2);
    let extra = |dst: &str| ActualFdb {
        dev: "vxm-vx100".into(),
        mac,
        dst: Some(ip(dst)),
        permanent: true,
    };
    // Wanted remote second: no replace, the other remote goes.
    let mut st = converged(&plan);
    st.fdb.insert(0, extra("198.18.0.50"));
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![format!("delete fdb {mac} dst 198.18.0.50 dev vxm-vx100")]
    );
    // Wanted remote absent: replace rewrites the first, the others go.
    let mut st = converged(&plan);
    st.fdb = vec![extra("198.18.0.50"), extra("198.18.0.51")];
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![
            format!("replace fdb {mac} dst {underlay} dev vxm-vx100"),
            format!("delete fdb {mac} dst 198.18.0.51 dev vxm-vx100"),
        ]
    );
    // A learned (non-permanent) copy of the wanted remote is made permanent.
    let mut st = converged(&plan);
    st.fdb[0].permanent = false;
    assert_eq!(diff(&plan, &st).unwrap().len(), 1);
    // An all-zero flood entry is not planned: it goes.
    let mut st = converged(&plan);
    st.fdb.push(ActualFdb {
        dev: "vxm-vx100".into(),
        mac: Mac([0; 6]),
        dst: Some(ip("198.18.0.7")),
        permanent: true,
    });
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec!["delete fdb 00:00:00:00:00:00 dst 198.18.0.7 dev vxm-vx100".to_string()]
    );
}

#[test]
fn foreign_device_is_an_error_and_untouched() {
    let plan = routed(1);
    let mut st = ActualState::default();
    st.links.push(ActualLink {
        name: "vxm-br0".into(),
        index: 3,
        kind: Some("dummy".into()),
        vxlan: None,
        mtu: 1500,
        mac: None,
        master: None,
        master_index: None,
        up: false,
        oper: "down".into(),
        alias: None,
        port_learning: None,
    });
    let err = diff(&plan, &st).unwrap_err();
    assert!(matches!(&err, DiffError::Foreign(v) if v.len() == 1));
    assert_eq!(
        err.to_string(),
        "device vxm-br0 (dummy) is not created by vxmesh; rename or delete it yourself"
    );
    // A container veth (attach's) with a planned name is refused too.
    st.links[0].alias = Some("vxmesh:veth:demo:eth0:c1".into());
    st.links[0].kind = Some("veth".into());
    assert!(
        diff(&plan, &st)
            .unwrap_err()
            .to_string()
            .contains("vxm-br0 (veth")
    );
    // A foreign or attached vxm- device the plan does not name is ignored.
    st.links[0].name = "vxm-other".into();
    let c = diff(&plan, &st).unwrap();
    assert!(!c.iter().any(|x| x.to_string().contains("vxm-other")));
}

#[test]
fn half_created_device_is_adopted() {
    // Killed between creating the VTEP and labelling it: no alias, but the
    // planned kind and derived MAC.
    let plan = routed(1);
    let mut st = converged(&plan);
    let v = link_mut(&mut st, "vxm-vx100");
    v.alias = None;
    st.addresses.retain(|a| a.dev != "vxm-vx100");
    st.neighbours.clear();
    st.fdb.clear();
    st.routes.clear();
    let c = lines(&diff(&plan, &st).unwrap());
    assert_eq!(c[0], "set link vxm-vx100 alias vxmesh:net:demo");
    assert_eq!(c.len(), 1 + 1 + 3, "{c:#?}");
    // Another MAC: somebody else's device.
    link_mut(&mut st, "vxm-vx100").mac = Some("02:00:00:00:00:01".parse().unwrap());
    assert!(matches!(diff(&plan, &st), Err(DiffError::Foreign(_))));
}

#[test]
fn immutable_vxlan_attributes_force_recreate() {
    let plan = routed(2);
    type Tweak = fn(&mut ActualVxlan);
    let cases: Vec<(Tweak, &str)> = vec![
        (|v| v.vni = 101, "id 101 -> 100"),
        (
            |v| v.local = Some("198.18.0.9".parse().unwrap()),
            "local 198.18.0.9 -> 198.18.0.1",
        ),
        (|v| v.port = 8472, "dstport 8472 -> 4789"),
        (
            |v| {
                v.link = Some("eth1".into());
                v.link_index = Some(3)
            },
            "dev eth1 -> eth0",
        ),
        (|v| v.learning = true, "learning -> nolearning"),
        (|v| v.proxy = true, "proxy -> noproxy"),
    ];
    for (tweak, reason) in cases {
        let mut st = converged(&plan);
        tweak(link_mut(&mut st, "vxm-vx100").vxlan.as_mut().unwrap());
        let c = diff(&plan, &st).unwrap();
        assert_eq!(
            c[0].to_string(),
            format!("delete vxlan vxm-vx100 ({reason})")
        );
        assert!(matches!(&c[1], Change::CreateLink { link } if link.name == "vxm-vx100"));
        // Everything on the VTEP vanished with it: re-added, nothing deleted.
        let n = |f: fn(&Change) -> bool| c.iter().filter(|x| f(x)).count();
        assert_eq!(n(|x| matches!(x, Change::AddAddress { .. })), 1);
        assert_eq!(n(|x| matches!(x, Change::ReplaceNeighbour { .. })), 2);
        assert_eq!(n(|x| matches!(x, Change::ReplaceFdb { .. })), 2);
        assert_eq!(n(|x| matches!(x, Change::ReplaceRoute { .. })), 2);
        assert_eq!(c.len(), 2 + 1 + 6, "{:#?}", lines(&c));
    }
}

#[test]
fn wrong_kind_is_recreated() {
    let plan = routed(0);
    let mut st = converged(&plan);
    let br = link_mut(&mut st, "vxm-br0");
    br.kind = Some("veth".into());
    let c = diff(&plan, &st).unwrap();
    assert_eq!(
        lines(&c)[..2],
        [
            "delete veth vxm-br0 (it is a veth, want a bridge)".to_string(),
            "create bridge vxm-br0 mtu 1450 address 0e:64:c6:12:00:01 alias vxmesh:net:demo up"
                .to_string()
        ]
    );
    assert!(matches!(&c[2], Change::AddAddress { addr } if addr.dev == "vxm-br0"));
    assert_eq!(c.len(), 3);
}

#[test]
fn mutable_drift_is_fixed_in_place() {
    let plan = routed(1);
    let mut st = converged(&plan);
    let v = link_mut(&mut st, "vxm-vx100");
    v.mtu = 1400;
    v.mac = Some("0a:00:00:00:00:01".parse().unwrap());
    v.alias = Some("vxmesh:net:old".into());
    v.up = false;
    let c = diff(&plan, &st).unwrap();
    assert_eq!(
        lines(&c),
        vec![format!(
            "set link vxm-vx100 mtu 1450 address {} alias vxmesh:net:demo up",
            vtep_mac(vni(), local())
        )]
    );
}

#[test]
fn bridged_ports_get_master_and_learning_off() {
    let plan = bridged();
    let c = diff(&plan, &ActualState::default()).unwrap();
    assert!(c.contains(&Change::SetPortLearning {
        dev: "vxm-vx200".into(),
        learning: false
    }));
    assert!(!c.iter().any(|x| matches!(x, Change::SetIpForward { .. })));
    assert_eq!(c.len(), 2 + 1 + 2 + 2);
    // Learning back on: turned off again.
    let mut st = converged(&plan);
    link_mut(&mut st, "vxm-vx200").port_learning = Some(true);
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec!["set bridge-port learning off on vxm-vx200".to_string()]
    );
    // Released from the bridge: re-enslaved, and learning (reset) off.
    let mut st = converged(&plan);
    let v = link_mut(&mut st, "vxm-vx200");
    v.master = None;
    v.port_learning = None;
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec![
            "set link vxm-vx200 master vxm-br200".to_string(),
            "set bridge-port learning off on vxm-vx200".to_string()
        ]
    );
    // The bridge recreated: the VTEP (same name as master) is enslaved again.
    let mut st = converged(&plan);
    link_mut(&mut st, "vxm-br200").kind = Some("veth".into());
    let c = lines(&diff(&plan, &st).unwrap());
    assert!(
        c.contains(&"set link vxm-vx200 master vxm-br200".to_string()),
        "{c:#?}"
    );
}

#[test]
fn unplanned_managed_devices_are_deleted_with_their_objects() {
    let plan = routed(1);
    let mut st = converged(&plan);
    let other = bridged();
    st.links.extend(converged(&other).links);
    st.neighbours.extend(converged(&other).neighbours);
    st.fdb.extend(converged(&other).fdb);
    let c = diff(&plan, &st).unwrap();
    assert_eq!(
        lines(&c),
        vec![
            "delete bridge vxm-br200 (not in the plan)".to_string(),
            "delete vxlan vxm-vx200 (not in the plan)".to_string(),
        ]
    );
    // Stale routes through a deleted device vanish with it.
    let empty = NodePlan::default();
    let c = diff(&empty, &converged(&plan)).unwrap();
    assert_eq!(c.len(), 2, "{:#?}", lines(&c));
}

#[test]
fn stale_route_on_an_unmanaged_device_is_deleted() {
    let plan = routed(0);
    let mut st = converged(&plan);
    st.routes.push(ActualRoute {
        dst: "10.9.0.0/16".parse().unwrap(),
        via: Some(ip("198.18.0.254")),
        dev: Some("eth0".into()),
        oif: Some(2),
        onlink: false,
        table: 254,
        priority: 0,
        tos: 0,
        scope: 0,
        kind: 1,
    });
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec!["delete route 10.9.0.0/16 via 198.18.0.254 dev eth0 proto 86 metric 0".to_string()]
    );
}

#[test]
fn addresses_stale_and_changed_prefix() {
    let plan = routed(0);
    let mut st = converged(&plan);
    for a in st.addresses.iter_mut().filter(|a| a.dev == "vxm-br0") {
        a.addr = "172.18.10.1/16".parse().unwrap();
    }
    st.addresses.push(AddrSpec {
        dev: "vxm-vx100".into(),
        addr: "172.18.99.0/32".parse().unwrap(),
    });
    let c = lines(&diff(&plan, &st).unwrap());
    assert_eq!(
        c,
        vec![
            "delete address 172.18.10.1/16 dev vxm-br0",
            "delete address 172.18.99.0/32 dev vxm-vx100",
            "add address 172.18.10.1/24 dev vxm-br0",
        ]
    );
}

#[test]
fn ip_forward_is_only_turned_on() {
    let plan = routed(0);
    let mut st = converged(&plan);
    st.ip_forward = false;
    assert_eq!(
        lines(&diff(&plan, &st).unwrap()),
        vec!["set net.ipv4.ip_forward=1"]
    );
    let plan = bridged();
    let mut st = converged(&plan);
    st.ip_forward = true;
    assert!(diff(&plan, &st).unwrap().is_empty());
}

#[test]
fn invalid_plans_are_refused() {
    let mut plan = routed(1);
    plan.links[0].alias = "mine".into();
    assert!(matches!(
        diff(&plan, &ActualState::default()),
        Err(DiffError::InvalidPlan(_))
    ));
    let mut plan = routed(1);
    plan.links[1].name = "vx100".into();
    assert!(matches!(
        diff(&plan, &ActualState::default()),
        Err(DiffError::InvalidPlan(_))
    ));
    let mut plan = routed(1);
    plan.links.pop();
    let e = diff(&plan, &ActualState::default()).unwrap_err();
    assert!(e.to_string().contains("not a planned device"), "{e}");
}

#[test]
fn changes_serialize_for_logs() {
    let c = diff(&routed(1), &ActualState::default()).unwrap();
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j[0]["op"], "create_link");
    assert!(
        j.as_array()
            .unwrap()
            .iter()
            .any(|x| x["op"] == "replace_fdb")
    );
}

/// A routed plan whose peers are `peers`, each `(index, underlay host byte,
/// gateway host byte)`: varying the last two moves a peer's FDB remote or
/// its route's gateway and neighbour.
fn routed_with(peers: &[(u8, u8, u8)]) -> NodePlan {
    let mut p = routed(0);
    for &(i, host, gw_host) in peers {
        let subnet: ipnet::Ipv4Net = format!("172.19.{i}.0/24").parse().unwrap();
        let gw = Ipv4Addr::new(172, 19, i, gw_host);
        let underlay = Ipv4Addr::new(198, 18, 1, host);
        let mac = vtep_mac(vni(), underlay);
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
        // Keyed by MAC: a second peer with the same underlay is skipped.
        if !p.fdb.iter().any(|e| e.mac == mac) {
            p.fdb.insert(FdbSpec {
                dev: "vxm-vx100".into(),
                mac,
                dst: underlay,
            });
        }
    }
    p
}

fn sorted_lines(changes: &[Change]) -> Vec<String> {
    let mut l = lines(changes);
    l.sort();
    l
}

#[test]
fn entries_diff_is_none_when_devices_or_addresses_change() {
    let old = routed(2);
    let mut new = routed(3);
    assert!(diff_entries(&old, &new).is_some());
    new.links[1].mtu = 1400;
    assert!(diff_entries(&old, &new).is_none());
    let mut new = routed(3);
    new.addresses.clear();
    assert!(diff_entries(&old, &new).is_none());
    let mut new = routed(3);
    new.ip_forward = false;
    assert!(diff_entries(&old, &new).is_none());
}

#[test]
fn entries_diff_of_one_joining_peer_is_its_three_entries() {
    let changes = diff_entries(&routed(5), &routed(6)).unwrap();
    assert_eq!(
        lines(&changes)
            .iter()
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect::<Vec<_>>(),
        ["replace", "replace", "replace"],
        "{changes:?}"
    );
    assert!(diff_entries(&routed(5), &routed(5)).unwrap().is_empty());
}

proptest::proptest! {
    /// The incremental diff is exactly what a full pass over a kernel
    /// converged on `old` would do.
    #[test]
    fn entries_diff_equals_full_diff_over_the_old_plan(
        old in proptest::collection::btree_map(0u8..12, (1u8..5, 1u8..3), 0..10),
        new in proptest::collection::btree_map(0u8..12, (1u8..5, 1u8..3), 0..10),
    ) {
        let flat = |m: &std::collections::BTreeMap<u8, (u8, u8)>| {
            m.iter().map(|(&i, &(h, g))| (i, h, g)).collect::<Vec<_>>()
        };
        let (old, new) = (routed_with(&flat(&old)), routed_with(&flat(&new)));
        let incremental = diff_entries(&old, &new).expect("same devices");
        let full = diff(&new, &converged(&old)).unwrap();
        proptest::prop_assert_eq!(sorted_lines(&incremental), sorted_lines(&full));
        // And phases stay ordered.
        let phases: Vec<Phase> = incremental.iter().map(Change::phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        proptest::prop_assert_eq!(phases, sorted);
    }
}

#[test]
fn entries_diff_refuses_what_the_full_diff_refuses() {
    let old = routed(2);
    // A second neighbour for a gateway already planned.
    let mut new = routed(2);
    let n = new.neighbours.iter().next().unwrap().clone();
    new.neighbours.insert(NeighSpec {
        mac: "02:00:00:00:00:09".parse().unwrap(),
        ..n
    });
    assert!(diff(&new, &converged(&old)).is_err());
    assert!(diff_entries(&old, &new).is_none());
    // An FDB entry on a device that is not a vxlan.
    let mut new = routed(2);
    new.fdb.insert(FdbSpec {
        dev: "vxm-br0".into(),
        mac: "02:00:00:00:00:09".parse().unwrap(),
        dst: ip("198.18.0.9"),
    });
    assert!(diff(&new, &converged(&old)).is_err());
    assert!(diff_entries(&old, &new).is_none());
    // A second route to a planned destination.
    let mut new = routed(2);
    let r = new.routes.iter().next().unwrap().clone();
    new.routes.insert(RouteSpec {
        via: ip("172.18.99.1"),
        ..r
    });
    assert!(diff(&new, &converged(&old)).is_err());
    assert!(diff_entries(&old, &new).is_none());
}

#[test]
fn split_difference_is_both_differences() {
    let sets = [
        vec![],
        vec![1],
        vec![1, 2, 3],
        vec![2, 4, 6, 8],
        vec![0, 3, 4, 5, 9],
    ];
    for a in &sets {
        for b in &sets {
            let (a, b): (BTreeSet<i32>, BTreeSet<i32>) =
                (a.iter().copied().collect(), b.iter().copied().collect());
            let (gone, added) = split_difference(&a, &b);
            assert_eq!(gone, a.difference(&b).collect::<Vec<_>>(), "{a:?} {b:?}");
            assert_eq!(added, b.difference(&a).collect::<Vec<_>>(), "{a:?} {b:?}");
        }
    }
}
