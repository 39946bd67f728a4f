//! Unit tests of the firewall plan, rendering and diff (no kernel).

use super::diff::{FwChange, diff};
use super::dump::parse;
use super::ruleset::{self, Elem};
use crate::dataplane::plan::{PlanInput, plan};
use crate::dataplane::{NodePlan, PortProto, PortSpec};

fn cluster(outbound_nat: bool) -> crate::config::Cluster {
    let t = format!(
        "[[network]]\nname = \"demo\"\ncidr = \"172.18.0.0/16\"\nsubnet_len = 24\nvni = 100\noutbound_nat = {outbound_nat}\n\
         [[node]]\nname = \"host1\"\nunderlay_ip = \"198.18.0.1\"\n\
         [[node]]\nname = \"host2\"\nunderlay_ip = \"198.18.0.2\"\n\
         [[node]]\nname = \"host3\"\nunderlay_ip = \"198.18.0.3\"\n"
    );
    crate::config::parse(&t, "t").unwrap()
}

fn node_plan(outbound_nat: bool, filter: bool) -> NodePlan {
    let c = cluster(outbound_nat);
    plan(&PlanInput {
        cluster: &c,
        node: "host1",
        endpoints: None,
        underlay_mtu: 1500,
        vxlan_filter: filter,
    })
    .unwrap()
}

fn port() -> PortSpec {
    PortSpec {
        proto: PortProto::Tcp,
        host_port: 8080,
        container_ip: "172.18.1.5".parse().unwrap(),
        container_port: 80,
        network: "demo".into(),
        owner: "docker:abc".into(),
    }
}

#[test]
fn plan_lists_peers_ports_and_nat_ranges() {
    let p = node_plan(true, true);
    let fw = &p.firewall;
    assert!(fw.vxlan_filter);
    let peers: Vec<String> = fw.peers.iter().map(ToString::to_string).collect();
    assert_eq!(peers, ["198.18.0.2", "198.18.0.3"]);
    assert_eq!(fw.vxlan_ports.iter().copied().collect::<Vec<_>>(), [4789]);
    assert_eq!(
        fw.nat_sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["172.18.0.0/16"]
    );
    assert_eq!(fw.hairpin["demo"].to_string(), "172.18.0.0/24");
}

fn chain_names(d: &ruleset::Desired) -> Vec<&'static str> {
    d.chains.iter().map(|c| c.name).collect()
}

#[test]
fn outbound_nat_off_has_no_masquerade_rule_and_no_nat_chains_without_ports() {
    // Nothing needs NAT: no NAT chain, so no connection tracking.
    let d = ruleset::desired(&node_plan(false, true)).unwrap();
    assert_eq!(chain_names(&d), ["vxlan_in", ruleset::ISOLATE_CHAIN]);
    assert!(!d.rules.contains_key("nat_post"));
    // A published port needs them, without the masquerade rule.
    let mut p = node_plan(false, true);
    p.ports.insert(port());
    let d = ruleset::desired(&p).unwrap();
    assert_eq!(chain_names(&d).len(), ruleset::CHAINS.len());
    assert!(
        d.rules["nat_post"]
            .iter()
            .all(|r| r.comment != ruleset::MASQUERADE_RULE)
    );
    let d = ruleset::desired(&node_plan(true, true)).unwrap();
    assert_eq!(chain_names(&d).len(), ruleset::CHAINS.len());
    assert_eq!(d.rules["nat_post"][0].comment, ruleset::MASQUERADE_RULE);
}

#[test]
fn nat_chains_come_and_go_with_the_need_for_nat() {
    let on = ruleset::desired(&node_plan(true, true)).unwrap();
    let off = ruleset::desired(&node_plan(false, true)).unwrap();
    let dump = |d: &ruleset::Desired| {
        parse(&dumped(d, false).replace("198.18.0.9", "198.18.0.3")).unwrap()
    };
    // On -> off: the NAT chains are deleted, the base chains before the
    // regular one they jump to; no rebuild.
    let changes = diff(Some(&off), Some(&dump(&on)));
    assert!(
        !changes
            .iter()
            .any(|c| matches!(c, FwChange::Rebuild { .. })),
        "{changes:?}"
    );
    let deleted: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c {
            FwChange::DeleteChain(def) => Some(def.name),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 4, "{changes:?}");
    assert_eq!(deleted[3], ruleset::PUBLISH_CHAIN, "{changes:?}");
    assert!(
        changes
            .iter()
            .any(|c| c.to_string() == format!("nft delete chain inet vxmesh {}", deleted[0])),
        "{changes:?}"
    );
    let json = super::nft::transaction(Some(&off), &changes).unwrap();
    assert!(json.contains(r#"{"delete":{"chain":"#), "{json}");
    // Off -> on: added, with their rules.
    let changes = diff(Some(&on), Some(&dump(&off)));
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, FwChange::AddChain(_)))
            .count(),
        4,
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| matches!(
            c,
            FwChange::RewriteChain {
                chain: "nat_post",
                ..
            }
        )),
        "{changes:?}"
    );
}

#[test]
fn filter_off_has_no_filter_rule() {
    let d = ruleset::desired(&node_plan(true, false)).unwrap();
    assert!(d.rules["vxlan_in"].is_empty());
}

#[test]
fn published_port_renders_dnat_and_hairpin() {
    let mut p = node_plan(true, true);
    p.ports.insert(port());
    let d = ruleset::desired(&p).unwrap();
    let dnat = serde_json::to_string(&d.rules["publish"][0].expr).unwrap();
    assert_eq!(
        dnat,
        r#"[{"match":{"left":{"payload":{"field":"dport","protocol":"tcp"}},"op":"==","right":8080}},{"dnat":{"addr":"172.18.1.5","family":"ip","port":80}}]"#
    );
    assert_eq!(
        d.rules["nat_post"][1].comment,
        "hairpin port tcp/8080 docker:abc"
    );
}

#[test]
fn no_network_no_table() {
    assert!(ruleset::desired(&NodePlan::default()).is_none());
    assert_eq!(diff(None, None), vec![]);
}

/// The JSON nft 1.0.6 printed for a table vxmesh wrote (one peer missing,
/// one unplanned, the masquerade rule deleted).
fn dumped(d: &ruleset::Desired, drop_masquerade: bool) -> String {
    let mut objs =
        vec![serde_json::json!({"table": {"family": "inet", "name": "vxmesh", "handle": 1}})];
    objs.push(serde_json::json!({"counter": {"family": "inet", "name": "vxlan_dropped", "table": "vxmesh", "handle": 2, "packets": 5_000_000_000u64, "bytes": 7}}));
    objs.push(serde_json::json!({"counter": {"family": "inet", "name": "vxlan_spoofed", "table": "vxmesh", "handle": 5, "packets": 3, "bytes": 9}}));
    for (def, elems) in &d.sets {
        let mut elems: Vec<serde_json::Value> = elems
            .iter()
            .map(|e| serde_json::to_value(e.expr()).unwrap())
            .collect();
        if def.name == ruleset::PEERS_SET {
            elems = vec!["198.18.0.2".into(), "198.18.0.9".into()];
        }
        let mut s = serde_json::json!({"family": "inet", "name": def.name, "table": "vxmesh", "type": def.kind, "handle": 3, "elem": elems});
        if def.interval {
            s["flags"] = serde_json::json!(["interval"]);
        }
        objs.push(serde_json::json!({ "set": s }));
    }
    for c in &d.chains {
        let mut ch =
            serde_json::json!({"family": "inet", "table": "vxmesh", "name": c.name, "handle": 4});
        if let Some((t, h, p)) = c.hook {
            ch["type"] = serde_json::to_value(t).unwrap();
            ch["hook"] = serde_json::to_value(h).unwrap();
            ch["prio"] = p.into();
            ch["policy"] = "accept".into();
        }
        objs.push(serde_json::json!({ "chain": ch }));
        for (i, r) in d.rules[c.name].iter().enumerate() {
            if drop_masquerade && r.comment == ruleset::MASQUERADE_RULE {
                continue;
            }
            objs.push(serde_json::json!({"rule": {"family": "inet", "table": "vxmesh", "chain": c.name, "handle": 10 + i, "comment": r.comment, "expr": r.expr}}));
        }
    }
    serde_json::json!({ "nftables": objs }).to_string()
}

#[test]
fn diff_repairs_elements_and_rules_and_reads_big_counters() {
    let d = ruleset::desired(&node_plan(true, true)).unwrap();
    let a = parse(&dumped(&d, true)).unwrap();
    assert_eq!(a.counters[ruleset::DROPPED_COUNTER], (5_000_000_000, 7));
    let changes = diff(Some(&d), Some(&a));
    assert_eq!(
        changes,
        vec![
            FwChange::Elements {
                set: ruleset::PEERS_SET,
                add: vec![Elem::Addr("198.18.0.3".parse().unwrap())],
                delete: vec![Elem::Addr("198.18.0.9".parse().unwrap())],
            },
            FwChange::RewriteChain {
                chain: "nat_post",
                reasons: vec!["rule \"outbound-nat\" missing from chain nat_post".into()],
            },
        ]
    );
}

#[test]
fn diff_of_a_matching_dump_is_empty() {
    let mut p = node_plan(true, true);
    p.ports.insert(port());
    let d = ruleset::desired(&p).unwrap();
    let mut text = dumped(&d, false);
    text = text.replace("198.18.0.9", "198.18.0.3");
    assert_eq!(diff(Some(&d), Some(&parse(&text).unwrap())), vec![]);
}

#[test]
fn a_chain_hooked_elsewhere_rebuilds_the_table() {
    let d = ruleset::desired(&node_plan(true, true)).unwrap();
    let text = dumped(&d, false).replace("\"prio\":-150", "\"prio\":0");
    let changes = diff(Some(&d), Some(&parse(&text).unwrap()));
    assert!(
        matches!(&changes[0], FwChange::Rebuild { reasons } if reasons[0].contains("vxlan_in")),
        "{changes:?}"
    );
}

#[test]
fn transaction_is_valid_json_for_nft() {
    let mut p = node_plan(true, true);
    p.ports.insert(port());
    let d = ruleset::desired(&p).unwrap();
    let json = super::nft::transaction(Some(&d), &[FwChange::Create]).unwrap();
    assert!(json.contains("\"dnat\""), "{json}");
    assert!(json.contains("vtep_peers"), "{json}");
}

/// host1 and host2 share an encrypted bridged network (VNI 100) and a
/// plain routed one (VNI 300); host3 is only in the plain one.
fn mixed_plan() -> NodePlan {
    let t = "[[network]]\nname = \"secret\"\nmode = \"bridged\"\ncidr = \"172.18.0.0/16\"\nsubnet_len = 24\nvni = 100\nencrypt = true\n\
             [[network]]\nname = \"open\"\ncidr = \"172.19.0.0/16\"\nsubnet_len = 24\nvni = 300\nport = 4790\n\
             [[node]]\nname = \"host1\"\nunderlay_ip = \"198.18.0.1\"\n\
             [[node]]\nname = \"host2\"\nunderlay_ip = \"198.18.0.2\"\n\
             [[node]]\nname = \"host3\"\nunderlay_ip = \"198.18.0.3\"\n";
    let c = crate::config::parse(t, "t").unwrap();
    plan(&PlanInput {
        cluster: &c,
        node: "host1",
        endpoints: None,
        underlay_mtu: 1500,
        vxlan_filter: true,
    })
    .unwrap()
}

#[test]
fn an_encrypted_vni_is_accepted_only_from_the_tunnel() {
    let p = mixed_plan();
    let fw = &p.firewall;
    assert_eq!(
        fw.secure_vnis.iter().copied().collect::<Vec<_>>(),
        [(100, 4789)]
    );
    assert_eq!(fw.plain_vteps.iter().collect::<Vec<_>>(), ["vxm-vx300"]);
    let d = ruleset::desired(&p).unwrap();
    let vxlan_in = &d.rules["vxlan_in"];
    // The guard first, then the peer filter.
    assert_eq!(vxlan_in[0].comment, "secure vni 100");
    assert_eq!(vxlan_in[1].comment, ruleset::FILTER_RULE);
    // As nft 1.0.6 prints `udp dport 4789 @th,96,24 100 iifname != "vxm-wg0"
    // counter name "vxlan_spoofed" drop` (so a dump compares equal).
    assert_eq!(
        serde_json::to_value(&vxlan_in[0].expr).unwrap(),
        serde_json::json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}},
            {"match": {"op": "==", "left": {"payload": {"base": "th", "offset": 96, "len": 24}}, "right": 100}},
            {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "vxm-wg0"}},
            {"counter": "vxlan_spoofed"},
            {"drop": null}
        ])
    );
    let isolate = &d.rules[ruleset::ISOLATE_CHAIN];
    assert_eq!(isolate[0].comment, "secure 172.18.0.0/16 from vxm-vx300");
    assert_eq!(
        serde_json::to_value(&isolate[0].expr).unwrap(),
        serde_json::json!([
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "vxm-vx300"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "172.18.0.0", "len": 16}}}},
            {"counter": "vxlan_spoofed"},
            {"drop": null}
        ])
    );
    // Even with the peer filter off, the guard stays.
    let mut off = p.clone();
    off.firewall.vxlan_filter = false;
    let d = ruleset::desired(&off).unwrap();
    assert_eq!(d.rules["vxlan_in"].len(), 1);
    // And the table with it round-trips through a dump.
    let text = dumped(&d, false).replace("198.18.0.9", "198.18.0.3");
    let a = parse(&text).unwrap();
    assert_eq!(a.counters[ruleset::SPOOFED_COUNTER], (3, 9));
    let json = super::nft::transaction(Some(&d), &[FwChange::Create]).unwrap();
    assert!(json.contains("vxlan_spoofed"), "{json}");
}

#[test]
fn plain_networks_alone_have_no_guard() {
    let d = ruleset::desired(&node_plan(true, true)).unwrap();
    assert_eq!(d.rules["vxlan_in"].len(), 1);
    assert!(d.rules[ruleset::ISOLATE_CHAIN].is_empty());
}

#[test]
fn a_missing_counter_is_added() {
    let d = ruleset::desired(&node_plan(true, true)).unwrap();
    let text = dumped(&d, false)
        .replace("198.18.0.9", "198.18.0.3")
        .replace("vxlan_spoofed", "other");
    let changes = diff(Some(&d), Some(&parse(&text).unwrap()));
    assert!(
        matches!(&changes[0], FwChange::Rebuild { reasons } if reasons[0] == "unplanned counter other"),
        "{changes:?}"
    );
}
