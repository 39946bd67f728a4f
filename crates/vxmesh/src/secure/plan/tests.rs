use super::*;
use crate::dataplane::plan::{PlanInput, plan as plan_node};
use crate::dataplane::{FdbSpec, LinkKind};
use crate::secure::PrivateKey;

fn cluster(encrypt_secret: bool, key_b: Option<&PublicKey>) -> Cluster {
    let key_line = key_b
        .map(|k| format!("public_key = \"{k}\""))
        .unwrap_or_default();
    let text = format!(
        r#"
[[network]]
name = "secret"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100
encrypt = {encrypt_secret}

[[network]]
name = "open"
mode = "bridged"
cidr = "10.9.0.0/24"
subnet_len = 28
vni = 101

[[node]]
name = "a"
underlay_ip = "198.18.0.1"
underlay_dev = "eth0"

[[node]]
name = "b"
underlay_ip = "198.18.0.2"
{key_line}

[[node]]
name = "c"
underlay_ip = "198.18.0.3"
"#
    );
    crate::config::parse(&text, "t.toml").unwrap()
}

fn plan_of(c: &Cluster, node: &str) -> crate::dataplane::NodePlan {
    plan_node(&PlanInput {
        cluster: c,
        node,
        endpoints: None,
        underlay_mtu: 1500,
        vxlan_filter: true,
    })
    .unwrap()
}

fn vxlan(p: &crate::dataplane::NodePlan, vni: u32) -> (Ipv4Addr, Option<String>, u32) {
    let l = p
        .links
        .iter()
        .find(|l| matches!(&l.kind, LinkKind::Vxlan(v) if v.vni.get() == vni))
        .unwrap();
    let LinkKind::Vxlan(v) = &l.kind else {
        unreachable!()
    };
    (v.local, v.underlay_dev.clone(), l.mtu)
}

fn fdb_dsts(p: &crate::dataplane::NodePlan, vni: u32) -> Vec<Ipv4Addr> {
    let dev = format!("vxm-vx{vni}");
    let mut d: Vec<_> = p
        .fdb
        .iter()
        .filter(|f: &&FdbSpec| f.dev == dev)
        .map(|f| f.dst)
        .collect();
    d.sort();
    d.dedup();
    d
}

#[test]
fn an_encrypted_network_uses_transport_addresses_and_a_plain_one_does_not() {
    let kb = PrivateKey::generate().unwrap().public();
    let c = cluster(true, Some(&kb));
    let p = plan_of(&c, "a");
    let t = |i: u8| Ipv4Addr::new(10, 255, 0, i);
    assert_eq!(vxlan(&p, 100), (t(1), None, 1390));
    assert_eq!(fdb_dsts(&p, 100), vec![t(2), t(3)]);
    // The plain network on the same hosts stays on the underlay.
    assert_eq!(
        vxlan(&p, 101),
        (Ipv4Addr::new(198, 18, 0, 1), Some("eth0".into()), 1450)
    );
    assert_eq!(
        fdb_dsts(&p, 101),
        vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)]
    );
    let s = p.secure.as_ref().expect("a secure underlay");
    assert_eq!(s.dev, "vxm-wg0");
    assert_eq!(s.addr.to_string(), "10.255.0.1/16");
    assert_eq!((s.mtu, s.port), (1440, 51820));
    assert_eq!(s.peers.len(), 2);
    assert_eq!(s.peers["b"].endpoint.to_string(), "198.18.0.2:51820");
    // c lists no key: planned (so status can say so) but no tunnel.
    let specs = s.peer_specs();
    assert_eq!(specs.len(), 1);
    assert_eq!((specs[0].node.as_str(), specs[0].public_key), ("b", kb));
    assert_eq!(specs[0].transport, t(2));
}

#[test]
fn without_an_encrypted_network_nothing_changes() {
    let c = cluster(false, None);
    let p = plan_of(&c, "a");
    assert_eq!(p.secure, None);
    assert_eq!(vxlan(&p, 100).0, Ipv4Addr::new(198, 18, 0, 1));
    assert_eq!(fdb_dsts(&p, 100)[0], Ipv4Addr::new(198, 18, 0, 2));
    // The plan's JSON has no `secure` key then (older readers stay happy).
    assert!(!serde_json::to_string(&p).unwrap().contains("secure"));
}
