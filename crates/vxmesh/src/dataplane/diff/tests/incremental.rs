//! The incremental diff against the full diff.

use super::*;

use crate::dataplane::incremental::diff_entries;

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
