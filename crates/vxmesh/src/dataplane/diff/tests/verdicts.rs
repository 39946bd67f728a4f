//! The verdicts the diff yields: ok, missing, different and extra, and that they agree with its changes.

use super::*;

/// A change made to the kernel state by hand.
type Perturbation = Box<dyn Fn(&mut ActualState)>;

/// Every drift the tests below apply to a converged routed node.
fn perturbations() -> Vec<(&'static str, Perturbation)> {
    vec![
        ("nothing", Box::new(|_| {})),
        ("route gone", Box::new(|a| drop(a.routes.remove(0)))),
        (
            "second route",
            Box::new(|a| {
                let mut r = a.routes[0].clone();
                r.priority += 1;
                a.routes.push(r);
            }),
        ),
        (
            "neighbour mac",
            Box::new(|a| a.neighbours[0].mac = Some(Mac([2, 0, 0, 0, 0, 9]))),
        ),
        (
            "neighbour not permanent",
            Box::new(|a| a.neighbours[0].permanent = false),
        ),
        (
            "fdb remote",
            Box::new(|a| a.fdb[0].dst = Some(ip("198.18.0.99"))),
        ),
        (
            "fdb second remote",
            Box::new(|a| {
                let mut e = a.fdb[0].clone();
                e.dst = Some(ip("198.18.0.99"));
                a.fdb.push(e);
            }),
        ),
        ("address gone", Box::new(|a| drop(a.addresses.remove(0)))),
        ("forwarding off", Box::new(|a| a.ip_forward = false)),
        (
            "vtep down",
            Box::new(|a| link_mut(a, "vxm-vx100").up = false),
        ),
        (
            "vtep alias",
            Box::new(|a| link_mut(a, "vxm-vx100").alias = Some("vxmesh:net:other".into())),
        ),
        (
            "underlay dev",
            Box::new(|a| {
                let x = link_mut(a, "vxm-vx100").vxlan.as_mut().unwrap();
                x.link = Some("eth1".into());
            }),
        ),
        (
            "bridge mtu",
            Box::new(|a| link_mut(a, "vxm-br0").mtu = 1400),
        ),
        (
            "stale peer",
            Box::new(|a| {
                let old = converged(&routed(3));
                a.routes = old.routes;
                a.neighbours = old.neighbours;
                a.fdb = old.fdb;
            }),
        ),
        (
            "stale device",
            Box::new(|a| {
                let mut l = link_mut(a, "vxm-br0").clone();
                l.name = "vxm-br9".into();
                a.links.push(l);
            }),
        ),
    ]
}

#[test]
fn a_converged_node_is_all_ok() {
    for plan in [routed(3), bridged()] {
        let actual = converged(&plan);
        let c = compare(&plan, &actual);
        assert!(c.verdicts.all_ok(), "{:?}", c.verdicts);
        assert_eq!(c.verdicts.links.len(), plan.links.len());
        assert_eq!(c.verdicts.routes.len(), plan.routes.len());
        assert_eq!(c.verdicts.neighbours.len(), plan.neighbours.len());
        assert_eq!(c.verdicts.fdb.len(), plan.fdb.len());
        assert_eq!(c.verdicts.addresses.len(), plan.addresses.len());
        assert_eq!(c.verdicts.ip_forward.is_some(), plan.ip_forward);
        assert_eq!(c.changes, Ok(vec![]));
    }
}

#[test]
fn the_diff_changes_something_exactly_when_a_verdict_is_not_ok() {
    let plan = routed(2);
    for (what, perturb) in perturbations() {
        let mut actual = converged(&plan);
        perturb(&mut actual);
        let c = compare(&plan, &actual);
        let changes = c.changes.unwrap();
        assert_eq!(
            changes.is_empty(),
            c.verdicts.all_ok(),
            "{what}: {changes:?} {:?}",
            c.verdicts
        );
        assert_eq!(what == "nothing", changes.is_empty(), "{what}");
    }
}

#[test]
fn missing_and_different_entries_say_what_the_kernel_has() {
    let plan = routed(2);
    let mut actual = converged(&plan);
    let route = plan.routes.first().unwrap();
    actual.routes.retain(|r| r.dst != route.dst);
    actual.neighbours[0].mac = Some(Mac([2, 0, 0, 0, 0, 9]));
    actual.fdb[0].dst = Some(ip("198.18.0.99"));
    let c = compare(&plan, &actual);
    let v = &c.verdicts;
    assert_eq!(v.route(route), Some(&Verdict::Missing));
    let neigh = plan.neighbours.first().unwrap();
    assert_eq!(
        v.neighbour(neigh),
        Some(&Verdict::Different(&actual.neighbours[0]))
    );
    let fdb = plan.fdb.first().unwrap();
    assert_eq!(
        v.fdb_entry(fdb),
        Some(&Verdict::Different(vec![&actual.fdb[0]]))
    );
    let other = plan.routes.iter().nth(1).unwrap();
    assert_eq!(v.route(other), Some(&Verdict::Ok));
    assert!(v.extra.is_empty(), "{:?}", v.extra);
}

#[test]
fn underlay_device_and_alias_drift_are_judged() {
    let plan = routed(1);
    let mut actual = converged(&plan);
    link_mut(&mut actual, "vxm-vx100")
        .vxlan
        .as_mut()
        .unwrap()
        .link = Some("eth1".into());
    link_mut(&mut actual, "vxm-br0").alias = Some("vxmesh:net:other".into());
    let c = compare(&plan, &actual);
    let Some(Verdict::Different(vtep)) = c.verdicts.link("vxm-vx100") else {
        panic!("{:?}", c.verdicts.links);
    };
    assert_eq!(
        vtep.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["dev eth1 (want eth0)"]
    );
    let Some(Verdict::Different(br)) = c.verdicts.link("vxm-br0") else {
        panic!("{:?}", c.verdicts.links);
    };
    assert_eq!(
        br.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["alias vxmesh:net:other (want vxmesh:net:demo)"]
    );
    assert_eq!(
        lines(&c.changes.unwrap())[..2],
        [
            "delete vxlan vxm-vx100 (dev eth1 -> eth0)",
            "create vxlan vxm-vx100 id 100 local 198.18.0.1 dev eth0 dstport 4789 nolearning mtu 1450 address 0e:64:c6:12:00:01 alias vxmesh:net:demo up"
                .replace("0e:64:c6:12:00:01", &vtep_mac(vni(), local()).to_string())
                .as_str(),
        ]
    );
}

#[test]
fn stale_objects_are_extra() {
    let plan = routed(2);
    let mut actual = converged(&routed(3));
    let mut stale = link_mut(&mut actual, "vxm-br0").clone();
    stale.name = "vxm-br9".into();
    actual.links.push(stale);
    let c = compare(&plan, &actual);
    assert!(c.verdicts.routes.iter().all(|(_, v)| v.is_ok()));
    let kinds: Vec<&str> = c
        .verdicts
        .extra
        .iter()
        .map(|e| match e {
            Extra::Device(d) => d.name.as_str(),
            Extra::Address(_) => "address",
            Extra::Route(_) => "route",
            Extra::Neighbour(_) => "neighbour",
            Extra::Fdb(_) => "fdb",
        })
        .collect();
    assert_eq!(kinds, ["vxm-br9", "route", "neighbour", "fdb"]);
}

#[test]
fn a_foreign_device_is_judged_though_the_diff_refuses() {
    let plan = routed(1);
    let mut actual = converged(&plan);
    link_mut(&mut actual, "vxm-br0").alias = None;
    link_mut(&mut actual, "vxm-br0").mac = Some(Mac([2, 0, 0, 0, 0, 1]));
    let c = compare(&plan, &actual);
    assert!(matches!(c.changes, Err(DiffError::Foreign(_))));
    let Some(Verdict::Different(drift)) = c.verdicts.link("vxm-br0") else {
        panic!("{:?}", c.verdicts.links);
    };
    assert!(
        drift
            .iter()
            .any(|d| matches!(d, LinkDrift::Alias { have: None, .. }))
    );
    assert!(c.verdicts.link("vxm-vx100").unwrap().is_ok());
}
