//! The diff of devices: foreign, half created, recreated, fixed in place, unplanned; invalid plans.

use super::*;

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
