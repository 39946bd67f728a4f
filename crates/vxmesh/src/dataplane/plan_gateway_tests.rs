//! Tests of the planner's distributed gateway of bridged networks.

use std::net::Ipv4Addr;

use super::*;
use crate::config;

fn cluster() -> Cluster {
    let t = r#"
[[network]]
name = "a"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 29
vni = 200
gateway = true
[[node]]
name = "h1"
underlay_ip = "198.18.0.1"
[[node]]
name = "h2"
underlay_ip = "198.18.0.2"
"#;
    config::parse(t, "t").unwrap()
}

fn plan_of(c: &Cluster, node: &str, eps: Option<&[Endpoint]>) -> NodePlan {
    plan(&PlanInput {
        cluster: c,
        node,
        endpoints: eps,
        underlay_mtu: 1500,
        vxlan_filter: true,
    })
    .unwrap()
}

#[test]
fn every_node_has_the_same_gateway_address_and_mac() {
    let c = cluster();
    let gw = Ipv4Addr::new(10, 1, 0, 1);
    let (p1, p2) = (plan_of(&c, "h1", None), plan_of(&c, "h2", None));
    for p in [&p1, &p2] {
        let br = &p.links[0];
        assert_eq!(br.name, "vxm-br200");
        assert_eq!(br.mac, model::gateway_mac(c.networks[0].vni));
        assert!(p.addresses.contains(&AddrSpec {
            dev: "vxm-br200".into(),
            addr: "10.1.0.1/24".parse().unwrap(),
        }));
        assert!(p.ip_forward);
        assert_eq!(p.networks["a"].gateway, Some(gw));
        // Never a neighbour or FDB entry for the gateway on the VTEP.
        assert!(!p.neighbours.iter().any(|n| n.ip == gw));
        assert!(!p.fdb.iter().any(|f| f.mac == br.mac));
    }
}

#[test]
fn the_gateway_is_not_an_endpoint_even_if_a_record_claims_it() {
    let c = cluster();
    let gw = Ipv4Addr::new(10, 1, 0, 1);
    let eps = vec![Endpoint {
        network: "a".into(),
        ip: gw,
        mac: model::container_mac(gw),
        node: "h1".into(),
    }];
    let p = plan_of(&c, "h2", Some(&eps));
    assert!(p.neighbours.is_empty() && p.fdb.is_empty());
    // Derived endpoints (static store) skip it too.
    let derived = derived_endpoints(&c, &c.networks[0]);
    assert!(!derived.iter().any(|e| e.ip == gw));
    assert!(derived.iter().any(|e| e.ip == Ipv4Addr::new(10, 1, 0, 2)));
}

#[test]
fn the_allocator_pool_skips_the_gateway() {
    let c = cluster();
    let p = plan_of(&c, "h1", None);
    let st = &p.networks["a"];
    let free: Vec<_> = usable_addresses(st.pool, st.subnet, st.gateway).collect();
    assert_eq!(free.first(), Some(&Ipv4Addr::new(10, 1, 0, 2)));
    assert!(!free.contains(&Ipv4Addr::new(10, 1, 0, 1)));
}

#[test]
fn without_gateway_the_bridge_keeps_its_own_mac_and_no_address() {
    let mut c = cluster();
    c.networks[0].gateway = None;
    let p = plan_of(&c, "h1", None);
    assert_eq!(
        p.links[0].mac,
        bridge_mac(c.networks[0].vni, Ipv4Addr::new(198, 18, 0, 1))
    );
    assert!(p.addresses.is_empty() && !p.ip_forward);
    assert_eq!(p.networks["a"].gateway, None);
}

#[test]
fn a_gateway_network_is_isolated_from_the_other_networks_in_the_firewall() {
    let t = r#"
[[network]]
name = "a"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 29
vni = 200
gateway = true
[[network]]
name = "b"
mode = "bridged"
cidr = "10.2.0.0/24"
subnet_len = 29
vni = 201
[[node]]
name = "h1"
underlay_ip = "198.18.0.1"
"#;
    let c = config::parse(t, "t").unwrap();
    let p = plan_of(&c, "h1", None);
    let isolated: Vec<String> = p.firewall.isolated.iter().map(|n| n.to_string()).collect();
    assert_eq!(isolated, ["10.1.0.0/24"]);
    let d = crate::firewall::ruleset::desired(&p).unwrap();
    let rules: Vec<&str> = d.rules[crate::firewall::ruleset::ISOLATE_CHAIN]
        .iter()
        .map(|r| r.comment.as_str())
        .collect();
    assert_eq!(
        rules,
        [
            "published ports cross networks",
            "isolate 10.1.0.0/24 out",
            "isolate 10.1.0.0/24 in"
        ]
    );
    // Without a gateway nothing routes between networks: no rule at all.
    let mut c = c;
    c.networks[0].gateway = None;
    let d = crate::firewall::ruleset::desired(&plan_of(&c, "h1", None)).unwrap();
    assert!(d.rules[crate::firewall::ruleset::ISOLATE_CHAIN].is_empty());
}
