//! Unit tests of the view (records, conflicts, own record).

use super::*;
use crate::config::Mode;

fn net() -> Network {
    records::test_network("demo", Mode::Bridged, "10.1.0.0/24", 28, 100)
}

fn kv(v: &str, rev: i64) -> Kv {
    Kv {
        value: v.as_bytes().to_vec(),
        create_rev: rev,
        mod_rev: rev,
    }
}

fn view() -> (View, Keys) {
    let keys = Keys::new("/vxmesh", "demo");
    let mut v = View::new(keys.clone(), net());
    v.put(keys.config(), kv(&records::network_json(&net()), 1));
    (v, keys)
}

fn node(name: &str, ip: &str, subnet: &str) -> String {
    format!(r#"{{"name":"{name}","underlay_ip":"{ip}","subnet":"{subnet}"}}"#)
}

#[test]
fn valid_records_make_the_snapshot() {
    let (mut v, k) = view();
    v.put(k.subnet("10.1.0.16/28".parse().unwrap()), kv("h1", 2));
    v.put(
        k.node("h1"),
        kv(&node("h1", "198.18.0.1", "10.1.0.16/28"), 2),
    );
    v.put(
        k.node("h2"),
        kv(&node("h2", "198.18.0.2", "10.1.0.32/28"), 3),
    );
    v.put(
        k.endpoint(Ipv4Addr::new(10, 1, 0, 17)),
        kv(
            r#"{"network":"demo","ip":"10.1.0.17","mac":"02:42:0a:01:00:11","node":"h1"}"#,
            4,
        ),
    );
    let (changed, skipped) = v.rebuild();
    assert!(changed);
    assert!(skipped.is_empty(), "{skipped:?}");
    let s = v.snapshot();
    assert_eq!(s.cluster.nodes.len(), 2);
    assert_eq!(
        s.cluster.nodes[0].subnets["demo"].to_string(),
        "10.1.0.16/28"
    );
    assert_eq!(s.endpoints.as_ref().unwrap().len(), 1);
    let (changed, _) = v.rebuild();
    assert!(!changed);
}

#[test]
fn invalid_records_are_skipped_and_warned_once_per_revision() {
    let (mut v, k) = view();
    v.put(
        k.node("h1"),
        kv(&node("h1", "198.18.0.1", "10.1.0.16/28"), 2),
    );
    v.put(k.node("bad"), kv("{not json", 3));
    v.put(
        k.node("lo"),
        kv(&node("lo", "127.0.0.1", "10.1.0.48/28"), 4),
    );
    v.put(
        k.node("out"),
        kv(&node("out", "198.18.0.9", "10.9.0.0/28"), 5),
    );
    v.put(
        k.node("dup"),
        kv(&node("dup", "198.18.0.1", "10.1.0.64/28"), 6),
    );
    v.put(k.subnet("10.1.0.80/28".parse().unwrap()), kv("h1", 7));
    v.put(
        k.node("thief"),
        kv(&node("thief", "198.18.0.7", "10.1.0.80/28"), 8),
    );
    v.put(
        k.endpoint(Ipv4Addr::new(10, 1, 0, 18)),
        kv(
            r#"{"network":"demo","ip":"10.1.0.18","mac":"01:00:5e:00:00:01","node":"h1"}"#,
            9,
        ),
    );
    let (_, skipped) = v.rebuild();
    let keys: Vec<&str> = skipped
        .iter()
        .map(|s| s.key.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(skipped.len(), 6, "{skipped:#?}");
    for k in ["bad", "lo", "out", "dup", "thief", "10.1.0.18"] {
        assert!(keys.contains(&k), "{k} not skipped: {skipped:#?}");
    }
    let kinds: Vec<RecordKind> = skipped.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == RecordKind::Node).count(),
        5,
        "{skipped:#?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == RecordKind::Endpoint).count(),
        1
    );
    let s = v.snapshot();
    assert_eq!(
        s.cluster
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["h1"]
    );
    assert!(s.endpoints.as_ref().unwrap().is_empty());
    // Same revisions: no new warnings.
    assert!(v.rebuild().1.is_empty());
    // A new revision of a still-bad key warns again; fixing a key clears it.
    v.put(k.node("bad"), kv("{still not json", 10));
    v.put(
        k.node("lo"),
        kv(&node("lo", "198.18.0.4", "10.1.0.48/28"), 11),
    );
    let (changed, skipped) = v.rebuild();
    assert!(changed);
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].key.ends_with("/bad"));
    assert_eq!(v.snapshot().cluster.nodes.len(), 2);
}

#[test]
fn config_changes_apply_and_bad_configs_keep_the_last() {
    let (mut v, k) = view();
    v.rebuild();
    let mut n = net();
    n.mtu = Some(1400);
    v.put(k.config(), kv(&records::network_json(&n), 5));
    assert!(v.rebuild().0);
    assert_eq!(v.network().mtu, Some(1400));
    v.put(k.config(), kv("garbage", 6));
    let (changed, skipped) = v.rebuild();
    assert!(!changed);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].kind, RecordKind::Network);
    assert_eq!(v.network().mtu, Some(1400));
    v.delete(&k.config());
    v.rebuild();
    assert_eq!(v.network().mtu, Some(1400));
}

#[test]
fn the_secure_underlay_settings_reach_the_snapshot_and_bad_ones_keep_the_last() {
    let (mut v, k) = view();
    v.rebuild();
    assert_eq!(v.snapshot().cluster.encryption, Encryption::default());
    v.put(
        k.encryption(),
        kv(r#"{"transport_cidr":"100.64.0.0/24","port":51999}"#, 5),
    );
    assert!(v.rebuild().0);
    let e = v.snapshot().cluster.encryption;
    assert_eq!(
        (e.transport.to_string().as_str(), e.port),
        ("100.64.0.0/24", 51999)
    );
    // The network's VXLAN port is no WireGuard port.
    v.put(k.encryption(), kv(r#"{"port":4789}"#, 6));
    let (changed, skipped) = v.rebuild();
    assert!(!changed);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].reason.contains("VXLAN port"), "{skipped:?}");
    assert_eq!(v.snapshot().cluster.encryption, e);
}

#[test]
fn own_record_is_always_present() {
    let (mut v, _) = view();
    v.set_own(NodeRecord {
        name: "me".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
        underlay_dev: None,
        subnets: BTreeMap::from([("demo".to_string(), "10.1.0.16/28".parse().unwrap())]),
        public_key: None,
        next_public_key: None,
    });
    v.rebuild();
    assert_eq!(v.snapshot().cluster.nodes.len(), 1);
}

#[test]
fn a_routed_subnet_claimed_by_another_node_is_not_served() {
    let mut n = net();
    n.mode = Mode::Routed;
    n.cidr = "10.9.0.0/23".parse().unwrap();
    n.subnet_len = 24;
    let k = Keys::new("/vxmesh", "demo");
    let mut v = View::new(k.clone(), n.clone());
    v.put(k.config(), kv(&records::network_json(&n), 1));
    let own: Ipv4Net = "10.9.0.0/24".parse().unwrap();
    v.set_own(NodeRecord {
        name: "me".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
        underlay_dev: None,
        subnets: BTreeMap::from([("demo".to_string(), own)]),
        public_key: None,
        next_public_key: None,
    });
    v.put(k.node("b"), kv(&node("b", "198.18.0.2", "10.9.1.0/24"), 2));
    v.put(k.subnet("10.9.1.0/24".parse().unwrap()), kv("b", 2));
    v.rebuild();
    assert_eq!(v.serving(), Some(own), "nobody else claims it");
    assert_eq!(v.snapshot().cluster.networks.len(), 1);
    // This node's record expired; c claims its subnet.
    v.put(k.subnet(own), kv("c", 3));
    v.put(k.node("c"), kv(&node("c", "198.18.0.3", "10.9.0.0/24"), 3));
    let (changed, _) = v.rebuild();
    assert!(changed);
    assert_eq!(v.serving(), None);
    let s = v.snapshot();
    assert!(
        s.cluster.networks.is_empty(),
        "the lost subnet is still planned"
    );
    assert!(
        s.cluster.node("me").is_some(),
        "the node itself stays known"
    );
    assert!(s.cluster.node("c").is_some());
    // Its record published again (a new subnet claimed): served again.
    let new: Ipv4Net = "10.9.1.0/24".parse().unwrap();
    v.delete(&k.subnet(new));
    v.delete(&k.node("b"));
    v.put(k.subnet(new), kv("me", 4));
    v.put(
        k.node("me"),
        kv(&node("me", "198.18.0.1", "10.9.1.0/24"), 4),
    );
    v.set_own(NodeRecord {
        name: "me".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
        underlay_dev: None,
        subnets: BTreeMap::from([("demo".to_string(), new)]),
        public_key: None,
        next_public_key: None,
    });
    v.rebuild();
    assert_eq!(v.serving(), Some(new));
    assert_eq!(v.snapshot().cluster.networks.len(), 1);
}

#[test]
fn a_bridged_slice_claimed_by_another_node_stays_served() {
    let (mut v, k) = view();
    let own: Ipv4Net = "10.1.0.16/28".parse().unwrap();
    v.set_own(NodeRecord {
        name: "me".into(),
        underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
        underlay_dev: None,
        subnets: BTreeMap::from([("demo".to_string(), own)]),
        public_key: None,
        next_public_key: None,
    });
    v.put(k.subnet(own), kv("c", 3));
    v.put(k.node("c"), kv(&node("c", "198.18.0.3", "10.1.0.16/28"), 3));
    v.rebuild();
    // Its addresses are claimed one by one: the slice is only where
    // attach looks first.
    assert_eq!(v.serving(), Some(own));
    assert_eq!(v.snapshot().cluster.networks.len(), 1);
}

#[test]
fn subnet_overlaps_are_found_as_by_a_scan() {
    let accepted: Vec<(Ipv4Net, &str)> = [
        ("10.0.0.0/24", "a"),
        ("10.0.2.0/23", "b"),
        ("10.1.0.0/16", "c"),
        ("10.0.1.128/25", "d"),
    ]
    .iter()
    .map(|(s, n)| (s.parse().unwrap(), *n))
    .collect();
    let mut set = super::Subnets::default();
    for (s, n) in &accepted {
        set.insert(*s, n);
    }
    let scan = |s: Ipv4Net, me: &str| {
        accepted
            .iter()
            .find(|(t, n)| *n != me && (t.contains(&s) || s.contains(t)))
            .map(|(_, n)| *n)
    };
    let probes = [
        "10.0.0.0/24",
        "10.0.0.0/25",
        "10.0.0.128/26",
        "10.0.1.0/24",
        "10.0.1.0/25",
        "10.0.3.0/24",
        "10.0.0.0/16",
        "10.1.200.0/24",
        "10.2.0.0/24",
        "0.0.0.0/0",
        "10.0.4.0/22",
    ];
    for p in probes {
        let s: Ipv4Net = p.parse().unwrap();
        assert_eq!(set.overlapping(s).is_some(), scan(s, "").is_some(), "{p}");
        for me in ["", "a", "b", "c", "d"] {
            let found = set.overlapping_other(s, me);
            // Whichever other overlapping node is named, one must exist
            // exactly when the scan finds one.
            assert_eq!(found.is_some(), scan(s, me).is_some(), "{p} except {me}");
            if let Some(n) = found {
                let t = accepted.iter().find(|(_, x)| *x == n).unwrap().0;
                assert!(n != me && (t.contains(&s) || s.contains(&t)), "{p}: {n}");
            }
        }
    }
}

#[test]
fn quarantine_markers_change_the_snapshot_only_while_a_record_settles() {
    let keys = Keys::new("/vxmesh", "demo");
    let mut v = View::new(keys.clone(), net());
    v.set_settle(Duration::from_secs(2));
    let s = "10.1.0.32/28".parse().unwrap();
    // Records and claims do; a marker with nothing settling does not.
    assert!(v.affects_snapshot(&keys.node("h2")));
    assert!(v.affects_snapshot(&keys.subnet(s)));
    assert!(v.affects_snapshot(&keys.config()));
    assert!(!v.affects_snapshot(&keys.held_subnet(s)));
    assert!(!v.affects_snapshot(&keys.held_endpoint(Ipv4Addr::new(10, 1, 0, 33))));
    // h2's record vanishes: its marker now decides whether it is kept.
    let t0 = Instant::now();
    v.put(
        keys.node("h2"),
        kv(&node("h2", "198.18.0.2", "10.1.0.32/28"), 2),
    );
    v.rebuild_at(t0);
    v.delete_at(&keys.node("h2"), t0);
    assert!(v.affects_snapshot(&keys.held_subnet(s)));
}

#[test]
fn a_dirty_view_is_clean_after_a_rebuild() {
    let (mut v, k) = view();
    v.rebuild();
    assert!(!v.is_dirty());
    v.put(
        k.node("h1"),
        kv(&node("h1", "198.18.0.1", "10.1.0.16/28"), 2),
    );
    v.mark_dirty();
    assert!(v.is_dirty());
    // Stale until rebuilt.
    assert!(v.snapshot().cluster.nodes.is_empty());
    let (changed, _) = v.rebuild();
    assert!(changed && !v.is_dirty());
    assert_eq!(v.snapshot().cluster.nodes.len(), 1);
}
