//! Unit tests of the status report (no root needed).

use super::*;
use crate::dataplane::diff::compare as judge;
use crate::dataplane::kernel::{ActualFdb, ActualNeigh, ActualRoute, ActualState};
use crate::dataplane::{FdbSpec, NeighSpec, RouteSpec};
use crate::model::Mac;

fn mac(last: u8) -> Mac {
    Mac([0x0a, 0x64, 0xc6, 0x12, 0, last])
}

fn saved() -> SavedPlan {
    let mut plan = NodePlan::default();
    plan.routes.insert(RouteSpec {
        dst: "172.18.20.0/24".parse().unwrap(),
        via: "172.18.20.0".parse().unwrap(),
        dev: "vxm-vx100".into(),
    });
    plan.neighbours.insert(NeighSpec {
        dev: "vxm-vx100".into(),
        ip: "172.18.20.0".parse().unwrap(),
        mac: mac(2),
    });
    plan.fdb.insert(FdbSpec {
        dev: "vxm-vx100".into(),
        mac: mac(2),
        dst: "198.18.0.2".parse().unwrap(),
    });
    SavedPlan {
        node: "host1".into(),
        applied_at: 100,
        nodes: [("198.18.0.2".parse().unwrap(), "host2".to_string())].into(),
        plan,
    }
}

fn actual_of(s: &SavedPlan) -> ActualState {
    let r = s.plan.routes.first().unwrap();
    let n = s.plan.neighbours.first().unwrap();
    let f = s.plan.fdb.first().unwrap();
    ActualState {
        routes: vec![ActualRoute::written(r, Some(7))],
        neighbours: vec![ActualNeigh {
            dev: n.dev.clone(),
            ip: n.ip,
            mac: Some(n.mac),
            permanent: true,
        }],
        fdb: vec![ActualFdb {
            dev: f.dev.clone(),
            mac: f.mac,
            dst: Some(f.dst),
            permanent: true,
        }],
        ..Default::default()
    }
}

#[test]
fn entries_in_place_are_ok() {
    let s = saved();
    let a = actual_of(&s);
    assert_eq!(
        route_status(s.plan.routes.first().unwrap(), &judge(&s.plan, &a).verdicts).state,
        Check::Ok
    );
    assert_eq!(
        neigh_status(
            s.plan.neighbours.first().unwrap(),
            &judge(&s.plan, &a).verdicts
        )
        .state,
        Check::Ok
    );
    assert_eq!(
        fdb_status(s.plan.fdb.first().unwrap(), &judge(&s.plan, &a).verdicts).state,
        Check::Ok
    );
    let peers = peers_of("vxm-vx100", &s);
    assert_eq!(peers.len(), 1);
    assert_eq!((peers[0].1.len(), peers[0].2.len()), (1, 1));
}

#[test]
fn missing_and_different_entries_show_the_drift() {
    let s = saved();
    let mut a = actual_of(&s);
    a.routes.clear();
    a.neighbours[0].mac = Some(mac(9));
    a.fdb[0].dst = Some("198.18.0.9".parse().unwrap());
    assert_eq!(
        route_status(s.plan.routes.first().unwrap(), &judge(&s.plan, &a).verdicts).state,
        Check::Missing
    );
    let n = neigh_status(
        s.plan.neighbours.first().unwrap(),
        &judge(&s.plan, &a).verdicts,
    );
    assert_eq!(n.state, Check::Different);
    assert!(n.actual.unwrap().contains("0a:64:c6:12:00:09"));
    let f = fdb_status(s.plan.fdb.first().unwrap(), &judge(&s.plan, &a).verdicts);
    assert_eq!(f.state, Check::Different);
    assert!(f.actual.unwrap().contains("198.18.0.9"));
}

#[test]
fn saved_plan_round_trips_through_json() {
    let s = saved();
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<SavedPlan>(&text).unwrap(), s);
}

/// `saved()` with its VTEP, and the kernel holding exactly that.
fn with_vtep() -> (SavedPlan, ActualState) {
    use crate::dataplane::kernel::{ActualLink, ActualVxlan};
    use crate::dataplane::{LinkKind, LinkSpec, VxlanSpec};
    let mut s = saved();
    let local: std::net::Ipv4Addr = "198.18.0.1".parse().unwrap();
    s.plan.links.push(LinkSpec {
        name: "vxm-vx100".into(),
        kind: LinkKind::Vxlan(VxlanSpec {
            vni: crate::model::Vni::new(100).unwrap(),
            local,
            underlay_dev: Some("eth0".into()),
            port: 4789,
            proxy: false,
        }),
        mtu: 1450,
        mac: mac(1),
        master: None,
        port_learning: false,
        alias: "vxmesh:net:demo".into(),
    });
    let mut a = actual_of(&s);
    a.links.push(ActualLink {
        name: "vxm-vx100".into(),
        index: 7,
        kind: Some("vxlan".into()),
        vxlan: Some(ActualVxlan {
            vni: 100,
            local: Some(local),
            link_index: Some(2),
            link: Some("eth0".into()),
            port: 4789,
            learning: false,
            proxy: false,
        }),
        mtu: 1450,
        mac: Some(mac(1)),
        master: None,
        master_index: None,
        up: true,
        oper: "unknown".into(),
        alias: Some("vxmesh:net:demo".into()),
        port_learning: None,
    });
    (s, a)
}

#[test]
fn a_converged_node_is_ok_with_nothing_pending() {
    let (s, a) = with_vtep();
    let r = compare(&s, &a, true, 150);
    assert!(r.ok, "{r:#?}");
    assert_eq!(r.plan_age_secs, 50);
    assert!(r.pending_changes.is_empty() && r.extra.is_empty(), "{r:#?}");
    assert_eq!(r.devices[0].state, Check::Ok);
    let text = render(&r);
    assert!(text.starts_with("node host1: plan applied 50 s ago, agent running, all in place\n"));
    assert!(
        text.contains("devices:\n  ok        vxlan  vxm-vx100      up mtu 1450"),
        "{text}"
    );
}

#[test]
fn device_drift_shows_what_the_diff_judges_underlay_device_and_alias_too() {
    let (s, mut a) = with_vtep();
    let vtep = a.links.iter_mut().find(|l| l.name == "vxm-vx100").unwrap();
    vtep.vxlan.as_mut().unwrap().link = Some("eth1".into());
    vtep.alias = Some("vxmesh:net:other".into());
    vtep.mtu = 1400;
    let r = compare(&s, &a, false, 100);
    assert!(!r.ok);
    let d = &r.devices[0];
    assert_eq!(d.state, Check::Different);
    assert_eq!(
        d.drift,
        [
            "dev eth1 (want eth0)",
            "mtu 1400 (want 1450)",
            "alias vxmesh:net:other (want vxmesh:net:demo)"
        ]
    );
    assert!(
        r.pending_changes[0].starts_with("delete vxlan vxm-vx100 (dev eth1 -> eth0)"),
        "{:?}",
        r.pending_changes
    );
    let text = render(&r);
    assert!(
        text.contains("DIFFERENT vxlan  vxm-vx100      up mtu 1400 dev eth1 (want eth0); "),
        "{text}"
    );
    assert!(text.contains("the reconciler would make"), "{text}");
}

#[test]
fn stale_objects_are_listed_as_extra() {
    let (s, mut a) = with_vtep();
    let mut stale = a.routes[0].clone();
    stale.dst = "172.18.30.0/24".parse().unwrap();
    a.routes.push(stale);
    let r = compare(&s, &a, true, 100);
    assert!(r.ok, "extra objects are not a missing plan");
    assert_eq!(r.extra.len(), 1);
    assert_eq!(r.extra[0].kind, "route");
    assert!(
        r.extra[0]
            .actual
            .starts_with("172.18.30.0/24 via 172.18.20.0 dev vxm-vx100 onlink")
    );
    let text = render(&r);
    assert!(
        text.contains(
            "not in the plan (the reconciler removes them):\n  EXTRA     route     172.18.30.0/24"
        ),
        "{text}"
    );
    assert_eq!(r.pending_changes.len(), 1);
}

#[test]
fn a_foreign_device_is_shown_and_nothing_is_pending() {
    let (s, mut a) = with_vtep();
    a.links[0].alias = None;
    a.links[0].mac = Some(mac(9));
    let r = compare(&s, &a, true, 100);
    assert_eq!(r.devices[0].state, Check::Different);
    assert!(
        r.devices[0]
            .drift
            .iter()
            .any(|d| d.starts_with("alias - (want"))
    );
    assert!(
        r.pending_changes[0].starts_with("cannot reconcile: device vxm-vx100"),
        "{:?}",
        r.pending_changes
    );
}

#[test]
fn the_report_keeps_its_json_fields() {
    let (s, a) = with_vtep();
    let v = serde_json::to_value(compare(&s, &a, true, 100)).unwrap();
    for field in [
        "node",
        "applied_at",
        "plan_age_secs",
        "agent_running",
        "ip_forward",
        "devices",
        "networks",
        "extra",
        "pending_changes",
        "ok",
    ] {
        assert!(v.get(field).is_some(), "{field}");
    }
    for field in [
        "name",
        "kind",
        "state",
        "up",
        "oper",
        "mtu",
        "want_mtu",
        "drift",
        "addresses",
    ] {
        assert!(v["devices"][0].get(field).is_some(), "{field}");
    }
}
