//! The diff of addresses, routes, neighbours, FDB entries and forwarding.

use super::*;

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
