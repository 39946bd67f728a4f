use std::collections::HashMap;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::{ExpectedLinks, Verdict};
use crate::dataplane::plan::owner_alias;
use crate::dataplane::{LinkKind, LinkSpec, NetworkState, NodePlan};
use crate::model::Mac;

const BR: u32 = 6;
const VTEP: u32 = 7;
const VETH: u32 = 9;
const MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 7];
const BR_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 6];

fn plan() -> NodePlan {
    let mut p = NodePlan::default();
    p.links.push(LinkSpec {
        name: "vxm-br200".into(),
        kind: LinkKind::Bridge,
        mtu: 1450,
        mac: Mac(BR_MAC),
        master: None,
        port_learning: false,
        alias: owner_alias("demo"),
    });
    p.links.push(LinkSpec {
        name: "vxm-vx200".into(),
        kind: LinkKind::Bridge, // the kind is not judged from notifications
        mtu: 1450,
        mac: Mac(MAC),
        master: Some("vxm-br200".into()),
        port_learning: false,
        alias: owner_alias("demo"),
    });
    p.networks.insert(
        "demo".into(),
        NetworkState {
            network: "demo".into(),
            mode: crate::config::Mode::Bridged,
            vni: crate::model::Vni::new(200).unwrap(),
            bridge: "vxm-br200".into(),
            vtep: "vxm-vx200".into(),
            mtu: 1450,
            subnet: "10.2.0.0/24".parse().unwrap(),
            pool: "10.2.0.16/28".parse().unwrap(),
            gateway: None,
        },
    );
    p
}

/// Both devices listed (a later pass).
fn listed() -> ExpectedLinks {
    let index = HashMap::from([
        ("vxm-br200".to_string(), BR),
        ("vxm-vx200".to_string(), VTEP),
    ]);
    ExpectedLinks::of(&plan(), &index)
}

/// The VTEP as the plan wants it, on its bridge and up.
fn vtep() -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = VTEP;
    m.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
    m.attributes = vec![
        LinkAttribute::IfName("vxm-vx200".into()),
        LinkAttribute::Mtu(1450),
        LinkAttribute::Address(MAC.to_vec()),
        LinkAttribute::Controller(BR),
        LinkAttribute::IfAlias(owner_alias("demo")),
    ];
    m
}

fn with(mut m: LinkMessage, f: impl FnOnce(&mut LinkMessage)) -> LinkMessage {
    f(&mut m);
    m
}

fn veth(up: bool, master: Option<u32>, alias: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = VETH;
    if up {
        m.header.flags = LinkFlags::Up;
    }
    m.attributes
        .push(LinkAttribute::IfName("vxm-00aabbccdd".into()));
    if let Some(b) = master {
        m.attributes.push(LinkAttribute::Controller(b));
    }
    if alias {
        m.attributes
            .push(LinkAttribute::IfAlias("vxmesh:veth:demo:eth0:c1".into()));
    }
    m
}

#[test]
fn the_agents_own_creations_are_not_drift() {
    // First pass: nothing listed yet; the creation goes through down, no
    // bridge, then up.
    let first = ExpectedLinks::of(&plan(), &HashMap::new());
    let created = with(vtep(), |m| {
        m.header.flags = LinkFlags::Broadcast;
        m.attributes
            .retain(|a| !matches!(a, LinkAttribute::Controller(_)));
    });
    assert_eq!(first.verdict(&created, false), Verdict::Ignore);
    assert_eq!(first.verdict(&vtep(), false), Verdict::Ignore);
    // Recreated after a deletion: a new index for a listed name.
    let again = with(created, |m| m.header.index = 42);
    assert_eq!(listed().verdict(&again, false), Verdict::Ignore);
    // A listed device that matches the plan (carrier, a port joining).
    assert_eq!(listed().verdict(&vtep(), false), Verdict::Ignore);
    let port = with(vtep(), |m| {
        m.header.interface_family = AddressFamily::Bridge;
        m.attributes
            .retain(|a| !matches!(a, LinkAttribute::IfAlias(_)));
    });
    assert_eq!(listed().verdict(&port, false), Verdict::Ignore);
    // Its deletion of a device no longer planned.
    let stale = with(vtep(), |m| {
        m.header.index = 30;
        m.attributes = vec![
            LinkAttribute::IfName("vxm-vx300".into()),
            LinkAttribute::IfAlias(owner_alias("old")),
        ];
    });
    assert_eq!(listed().verdict(&stale, true), Verdict::Ignore);
    // Somebody else's device.
    let other = with(vtep(), |m| {
        m.header.index = 3;
        m.attributes = vec![LinkAttribute::IfName("eth0".into())];
    });
    assert_eq!(listed().verdict(&other, false), Verdict::Ignore);
}

#[test]
fn planned_devices_deleted_renamed_or_changed_are_drift() {
    let e = listed();
    assert_eq!(e.verdict(&vtep(), true), Verdict::Drift);
    let first = ExpectedLinks::of(&plan(), &HashMap::new());
    assert_eq!(
        first.verdict(&vtep(), true),
        Verdict::Drift,
        "deleted while created"
    );
    let changes: Vec<(&str, LinkMessage)> = vec![
        (
            "down",
            with(vtep(), |m| m.header.flags = LinkFlags::Broadcast),
        ),
        (
            "mtu",
            with(vtep(), |m| m.attributes[1] = LinkAttribute::Mtu(1300)),
        ),
        (
            "mac",
            with(vtep(), |m| {
                m.attributes[2] = LinkAttribute::Address(vec![2; 6])
            }),
        ),
        (
            "nomaster",
            with(vtep(), |m| {
                m.attributes.remove(3);
            }),
        ),
        (
            "other bridge",
            with(vtep(), |m| m.attributes[3] = LinkAttribute::Controller(55)),
        ),
        (
            "alias",
            with(vtep(), |m| {
                m.attributes[4] = LinkAttribute::IfAlias("x".into())
            }),
        ),
        (
            "alias removed",
            with(vtep(), |m| {
                m.attributes.remove(4);
            }),
        ),
        (
            "renamed",
            with(vtep(), |m| {
                m.attributes[0] = LinkAttribute::IfName("foo".into())
            }),
        ),
    ];
    for (what, m) in changes {
        assert_eq!(e.verdict(&m, false), Verdict::Drift, "{what}");
    }
    // A port removed from its bridge (`AF_BRIDGE` delete).
    let port = with(vtep(), |m| {
        m.header.interface_family = AddressFamily::Bridge
    });
    assert_eq!(e.verdict(&port, true), Verdict::Drift);
    // The bridge put on a bridge.
    let bridge = with(vtep(), |m| {
        m.header.index = BR;
        m.attributes[0] = LinkAttribute::IfName("vxm-br200".into());
        m.attributes[2] = LinkAttribute::Address(BR_MAC.to_vec());
    });
    assert_eq!(e.verdict(&bridge, false), Verdict::Drift);
    let bridge = with(bridge, |m| {
        m.attributes.remove(3);
    });
    assert_eq!(e.verdict(&bridge, false), Verdict::Ignore);
    // A device marked vxmesh's that the plan does not want.
    let foreign = with(vtep(), |m| {
        m.header.index = 31;
        m.attributes = vec![
            LinkAttribute::IfName("vxm-vx300".into()),
            LinkAttribute::IfAlias(owner_alias("old")),
        ];
    });
    assert_eq!(e.verdict(&foreign, false), Verdict::Drift);
}

#[test]
fn container_veths_wake_the_agent_and_off_their_bridge_are_drift() {
    let e = listed();
    // The attach: created (no alias yet), then on the bridge, alias, up.
    assert_eq!(e.verdict(&veth(false, None, false), false), Verdict::Wake);
    assert_eq!(
        e.verdict(&veth(false, Some(BR), false), false),
        Verdict::Wake
    );
    assert_eq!(e.verdict(&veth(true, Some(BR), true), false), Verdict::Wake);
    // The detach.
    assert_eq!(e.verdict(&veth(true, Some(BR), true), true), Verdict::Wake);
    // Someone took it off its bridge, or set it down.
    assert_eq!(e.verdict(&veth(true, None, true), false), Verdict::Drift);
    assert_eq!(
        e.verdict(&veth(false, Some(BR), true), false),
        Verdict::Drift
    );
}
