//! The invariants themselves, as pure functions of one sample (what etcd
//! and every node's kernel held at about the same moment) and of what is
//! excused at that moment. No I/O: unit-tested here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;

/// A node's record in etcd (one network).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNode {
    pub subnet: Ipv4Net,
    pub underlay_ip: Ipv4Addr,
}

/// What etcd held (every network under the prefix).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdView {
    /// (network, subnet) -> the node named by the claim.
    pub claims: BTreeMap<(String, Ipv4Net), String>,
    /// (network, node) -> its record.
    pub nodes: BTreeMap<(String, String), StoredNode>,
    pub revision: i64,
}

/// What one node's kernel held, as programmed by its agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub underlay_ip: Ipv4Addr,
    /// Routed: the subnet of the address on the node's bridge (the subnet it
    /// serves); none in bridged mode or when it serves none.
    pub subnet: Option<Ipv4Net>,
    /// Its peer entries: (remote subnet or endpoint /32, remote underlay IP),
    /// each read from route -> neighbour -> FDB (0.0.0.0 when the chain is
    /// broken).
    pub peers: BTreeSet<(Ipv4Net, Ipv4Addr)>,
    /// Its containers' addresses: (container, network, address).
    pub containers: Vec<(String, String, Ipv4Addr)>,
}

impl Default for NodeView {
    fn default() -> Self {
        NodeView {
            underlay_ip: Ipv4Addr::UNSPECIFIED,
            subnet: None,
            peers: BTreeSet::new(),
            containers: Vec::new(),
        }
    }
}

/// One sample.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Since the checker started.
    pub at: Duration,
    pub routed: bool,
    /// None: no etcd member answered.
    pub etcd: Option<EtcdView>,
    pub nodes: BTreeMap<String, NodeView>,
    /// Nodes whose agent runs and has joined (per the lab's record).
    pub live: BTreeSet<String>,
    /// Nodes whose agent runs but has not joined yet (per the lab's record):
    /// peers may or may not hold them already.
    pub joining: BTreeSet<String>,
}

/// What may be wrong at this moment without counting as a violation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Excuses {
    /// Nodes whose records may be missing or stale (cut off from etcd, just
    /// restarted, rolled back).
    pub records: BTreeSet<String>,
    /// Peer tables may differ from the live members (a fault is on, or
    /// healed less than the grace period ago).
    pub peers: bool,
}

/// One broken promise seen in one sample.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub rule: Rule,
    pub node: String,
    pub what: String,
}

/// The promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// No subnet used by two nodes at once (kernels, or etcd records).
    SubnetTwice,
    /// No address used by two nodes at once.
    AddressTwice,
    /// A node serves only addresses of the subnet it holds.
    AddressOutside,
    /// A node serves a subnet etcd gives to another node.
    ForeignSubnet,
    /// A live node's records never disappear (nor disagree with its kernel).
    RecordMissing,
    /// Every node's peers are the live members (within the grace period
    /// after a fault heals).
    Peers,
    /// Zero lost replies between nodes not partitioned.
    LostReplies,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::SubnetTwice => "subnet-used-twice",
            Rule::AddressTwice => "address-used-twice",
            Rule::AddressOutside => "address-outside-subnet",
            Rule::ForeignSubnet => "serves-foreign-subnet",
            Rule::RecordMissing => "live-record-missing",
            Rule::Peers => "peers-not-live-members",
            Rule::LostReplies => "lost-replies",
        }
    }
}

/// The verdict on one sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Peers equal the live members and every live node's records are there
    /// (whether or not that was enforced in this sample).
    pub converged: bool,
    /// The peer rule was enforced in this sample.
    pub peers_checked: bool,
    /// Live nodes whose records were checked (not excused) in this sample.
    pub records_checked: u64,
}

/// Check one sample.
pub fn check(s: &Sample, ex: &Excuses) -> Verdict {
    let mut v = Vec::new();
    let mut fail = |rule, node: &str, what: String| {
        v.push(Violation {
            rule,
            node: node.to_string(),
            what,
        })
    };
    // Kernels: no subnet on two nodes.
    let subnets: Vec<(&String, Ipv4Net)> = s
        .nodes
        .iter()
        .filter_map(|(n, k)| k.subnet.map(|sub| (n, sub)))
        .collect();
    for (i, (a, sa)) in subnets.iter().enumerate() {
        for (b, sb) in &subnets[i + 1..] {
            if sa.contains(sb) || sb.contains(sa) {
                fail(
                    Rule::SubnetTwice,
                    a,
                    format!("kernel: {a} serves {sa} and {b} serves {sb}"),
                );
            }
        }
    }
    // Kernels: no container address on two nodes (per network).
    let mut holders: BTreeMap<(&str, Ipv4Addr), Vec<(&str, &str)>> = BTreeMap::new();
    for (n, k) in &s.nodes {
        for (c, net, ip) in &k.containers {
            holders.entry((net, *ip)).or_default().push((n, c));
            if s.routed
                && let Some(sub) = k.subnet
                && !sub.contains(ip)
            {
                fail(
                    Rule::AddressOutside,
                    n,
                    format!("container {c} has {ip}, outside {n}'s subnet {sub}"),
                );
            }
            if s.routed && k.subnet.is_none() {
                fail(
                    Rule::AddressOutside,
                    n,
                    format!("container {c} has {ip} while {n} serves no subnet"),
                );
            }
        }
    }
    for ((net, ip), hs) in &holders {
        let nodes: BTreeSet<&str> = hs.iter().map(|(n, _)| *n).collect();
        if nodes.len() > 1 {
            let who: Vec<String> = hs.iter().map(|(n, c)| format!("{c} on {n}")).collect();
            fail(
                Rule::AddressTwice,
                hs[0].0,
                format!("{ip} ({net}) used by {}", who.join(" and ")),
            );
        }
    }
    let mut records_checked = 0;
    let mut records_ok = true;
    if let Some(e) = &s.etcd {
        // Records: no subnet in two node records of a network.
        let mut by_subnet: BTreeMap<(&str, Ipv4Net), Vec<&str>> = BTreeMap::new();
        for ((net, node), r) in &e.nodes {
            by_subnet.entry((net, r.subnet)).or_default().push(node);
        }
        for ((net, sub), nodes) in &by_subnet {
            if nodes.len() > 1 {
                fail(
                    Rule::SubnetTwice,
                    nodes[0],
                    format!(
                        "etcd: records of {} all name {sub} ({net})",
                        nodes.join(", ")
                    ),
                );
            }
        }
        // A node's kernel subnet claimed by another node.
        for (n, k) in &s.nodes {
            let Some(sub) = k.subnet else { continue };
            for ((net, claimed), owner) in &e.claims {
                if *claimed == sub && owner != n {
                    fail(
                        Rule::ForeignSubnet,
                        n,
                        format!("{n} serves {sub} but etcd gives it to {owner} ({net})"),
                    );
                }
            }
        }
        // Live nodes' records: there, claimed by them, and the subnet they serve.
        let networks: BTreeSet<&str> = e
            .claims
            .keys()
            .map(|(n, _)| n.as_str())
            .chain(e.nodes.keys().map(|(n, _)| n.as_str()))
            .collect();
        for n in &s.live {
            let mut problems = Vec::new();
            for net in &networks {
                match e.nodes.get(&(net.to_string(), n.clone())) {
                    None => problems.push(format!("no record of {n} in {net}")),
                    Some(r) => {
                        match e.claims.get(&(net.to_string(), r.subnet)) {
                            Some(o) if o == n => {}
                            Some(o) => problems.push(format!(
                                "{n}'s record names {} but the claim is {o}'s ({net})",
                                r.subnet
                            )),
                            None => {
                                problems.push(format!("no claim of {} for {n} ({net})", r.subnet))
                            }
                        }
                        if s.routed
                            && let Some(k) = s.nodes.get(n)
                            && k.subnet.is_some_and(|ks| ks != r.subnet)
                        {
                            problems.push(format!(
                                "{n} serves {:?} but its record says {} ({net})",
                                k.subnet, r.subnet
                            ));
                        }
                    }
                }
            }
            if !problems.is_empty() {
                records_ok = false;
            }
            if ex.records.contains(n) {
                continue;
            }
            records_checked += 1;
            for p in problems {
                fail(Rule::RecordMissing, n, p);
            }
        }
    } else {
        records_ok = false;
    }
    // Peers: every node's entries are exactly the other live members'.
    let mut peers_ok = true;
    for (n, k) in &s.nodes {
        if !s.live.contains(n) {
            continue;
        }
        let want = expected_peers(s, n);
        let may = joining_underlays(s);
        let extra_ok = k.peers.difference(&want).all(|p| may.contains(&p.1));
        if !want.is_subset(&k.peers) || !extra_ok {
            peers_ok = false;
            if !ex.peers {
                let missing: Vec<String> = want.difference(&k.peers).map(show).collect();
                let extra: Vec<String> = k
                    .peers
                    .difference(&want)
                    .filter(|p| !may.contains(&p.1))
                    .map(show)
                    .collect();
                fail(
                    Rule::Peers,
                    n,
                    format!(
                        "missing [{}] extra [{}]",
                        missing.join(", "),
                        extra.join(", ")
                    ),
                );
            }
        }
    }
    Verdict {
        violations: v,
        converged: peers_ok && records_ok,
        peers_checked: !ex.peers,
        records_checked,
    }
}

fn show(p: &(Ipv4Net, Ipv4Addr)) -> String {
    format!("{} at {}", p.0, p.1)
}

/// The peer entries node `me` should hold: routed, every other live node's
/// subnet at its underlay IP; bridged, every container of another live node.
pub fn expected_peers(s: &Sample, me: &str) -> BTreeSet<(Ipv4Net, Ipv4Addr)> {
    peers_of(s, me, &s.live)
}

/// The underlay addresses of joining nodes: peers may hold their entries
/// already (published, not yet programmed on the node itself).
pub fn joining_underlays(s: &Sample) -> BTreeSet<Ipv4Addr> {
    s.nodes
        .iter()
        .filter(|(n, _)| s.joining.contains(*n))
        .map(|(_, k)| k.underlay_ip)
        .collect()
}

fn peers_of(s: &Sample, me: &str, of: &BTreeSet<String>) -> BTreeSet<(Ipv4Net, Ipv4Addr)> {
    let mut want = BTreeSet::new();
    for (o, k) in &s.nodes {
        if o == me || !of.contains(o) {
            continue;
        }
        if s.routed {
            if let Some(sub) = k.subnet {
                want.insert((sub, k.underlay_ip));
            }
        } else {
            for (_, _, ip) in &k.containers {
                want.insert((Ipv4Net::from(*ip), k.underlay_ip));
            }
        }
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Three routed nodes, all live, consistent in etcd and kernels.
    fn healthy() -> Sample {
        let mut s = Sample {
            routed: true,
            ..Default::default()
        };
        let mut e = EtcdView::default();
        for i in 1..=3u8 {
            let name = format!("host{i}");
            let sub = net(&format!("172.18.{i}.0/24"));
            let ul = Ipv4Addr::new(198, 18, 0, i);
            e.claims.insert(("demo".into(), sub), name.clone());
            e.nodes.insert(
                ("demo".into(), name.clone()),
                StoredNode {
                    subnet: sub,
                    underlay_ip: ul,
                },
            );
            s.nodes.insert(
                name.clone(),
                NodeView {
                    underlay_ip: ul,
                    subnet: Some(sub),
                    peers: BTreeSet::new(),
                    containers: vec![(
                        format!("{name}-c1"),
                        "demo".into(),
                        Ipv4Addr::new(172, 18, i, 2),
                    )],
                },
            );
            s.live.insert(name);
        }
        s.etcd = Some(e);
        for n in ["host1", "host2", "host3"] {
            let want = expected_peers(&s, n);
            s.nodes.get_mut(n).unwrap().peers = want;
        }
        s
    }

    fn rules(v: &Verdict) -> Vec<Rule> {
        v.violations.iter().map(|x| x.rule).collect()
    }

    #[test]
    fn a_healthy_cluster_is_converged_and_clean() {
        let v = check(&healthy(), &Excuses::default());
        assert_eq!(v.violations, vec![]);
        assert!(v.converged && v.peers_checked);
        assert_eq!(v.records_checked, 3);
    }

    #[test]
    fn a_subnet_on_two_nodes_is_never_excused() {
        let mut s = healthy();
        // host3 lost its lease, host4 took its subnet: both serve it.
        s.nodes.insert(
            "host4".into(),
            NodeView {
                underlay_ip: ip("198.18.0.4"),
                subnet: Some(net("172.18.3.0/24")),
                ..Default::default()
            },
        );
        let ex = Excuses {
            records: ["host3".to_string(), "host4".to_string()].into(),
            peers: true,
        };
        let v = check(&s, &ex);
        assert!(rules(&v).contains(&Rule::SubnetTwice), "{v:?}");
        // etcd now gives 172.18.3.0/24 to host4: host3 serves a foreign subnet.
        let e = s.etcd.as_mut().unwrap();
        e.claims
            .insert(("demo".into(), net("172.18.3.0/24")), "host4".into());
        let v = check(&s, &ex);
        assert!(
            v.violations
                .iter()
                .any(|x| x.rule == Rule::ForeignSubnet && x.node == "host3"),
            "{v:?}"
        );
    }

    #[test]
    fn an_address_on_two_nodes_or_outside_the_subnet_is_a_violation() {
        let mut s = healthy();
        s.nodes.get_mut("host2").unwrap().containers.push((
            "x".into(),
            "demo".into(),
            ip("172.18.1.2"),
        ));
        let v = check(&s, &Excuses::default());
        let r = rules(&v);
        assert!(r.contains(&Rule::AddressTwice), "{v:?}");
        assert!(r.contains(&Rule::AddressOutside), "{v:?}");
        // A node that re-granted a new subnet but kept its containers.
        let mut s = healthy();
        s.nodes.get_mut("host1").unwrap().subnet = Some(net("172.18.9.0/24"));
        let v = check(&s, &Excuses::default());
        assert!(rules(&v).contains(&Rule::AddressOutside), "{v:?}");
    }

    #[test]
    fn a_live_nodes_missing_record_counts_unless_excused() {
        let mut s = healthy();
        s.etcd
            .as_mut()
            .unwrap()
            .nodes
            .remove(&("demo".to_string(), "host2".to_string()));
        let v = check(&s, &Excuses::default());
        assert_eq!(rules(&v), vec![Rule::RecordMissing]);
        assert!(!v.converged);
        let ex = Excuses {
            records: ["host2".to_string()].into(),
            peers: false,
        };
        let v = check(&s, &ex);
        assert_eq!(v.violations, vec![]);
        assert!(!v.converged, "excused is not converged");
        assert_eq!(v.records_checked, 2);
        // A record whose claim is another node's.
        let mut s = healthy();
        s.etcd
            .as_mut()
            .unwrap()
            .claims
            .insert(("demo".into(), net("172.18.2.0/24")), "host1".into());
        let v = check(&s, &Excuses::default());
        assert!(
            v.violations
                .iter()
                .any(|x| x.rule == Rule::RecordMissing && x.node == "host2"),
            "{v:?}"
        );
        // etcd did not answer: not converged, nothing checked, no violation.
        let mut s = healthy();
        s.etcd = None;
        let v = check(&s, &Excuses::default());
        assert_eq!(v.violations, vec![]);
        assert!(!v.converged);
        assert_eq!(v.records_checked, 0);
    }

    #[test]
    fn peers_must_be_the_live_members_unless_excused() {
        let mut s = healthy();
        // host3 died: host1 and host2 still route to it.
        s.live.remove("host3");
        let v = check(&s, &Excuses::default());
        let who: BTreeSet<&str> = v
            .violations
            .iter()
            .filter(|x| x.rule == Rule::Peers)
            .map(|x| x.node.as_str())
            .collect();
        assert_eq!(who, ["host1", "host2"].into());
        assert!(
            v.violations[0]
                .what
                .contains("extra [172.18.3.0/24 at 198.18.0.3]")
        );
        let ex = Excuses {
            records: BTreeSet::new(),
            peers: true,
        };
        let v = check(&s, &ex);
        assert!(!rules(&v).contains(&Rule::Peers));
        assert!(!v.converged && !v.peers_checked);
        // A broken chain (no FDB entry) is a wrong peer too.
        let mut s = healthy();
        let p = s.nodes.get_mut("host1").unwrap();
        p.peers.remove(&(net("172.18.2.0/24"), ip("198.18.0.2")));
        p.peers
            .insert((net("172.18.2.0/24"), Ipv4Addr::UNSPECIFIED));
        let v = check(&s, &Excuses::default());
        assert_eq!(rules(&v), vec![Rule::Peers]);
    }

    #[test]
    fn a_joining_node_may_be_a_peer_already_but_nothing_else_may() {
        let mut s = healthy();
        s.live.remove("host3");
        s.joining.insert("host3".into());
        // host1 and host2 already hold host3 (it published, the lab has not
        // marked it ready yet): fine; host3's own table is not checked.
        let h3 = s.nodes.get_mut("host3").unwrap();
        h3.peers.clear();
        // Not even its bridge is programmed yet, and no container attached.
        h3.subnet = None;
        h3.containers.clear();
        let v = check(&s, &Excuses::default());
        assert_eq!(v.violations, vec![]);
        // A stray entry is still one.
        s.nodes
            .get_mut("host1")
            .unwrap()
            .peers
            .insert((net("172.18.7.0/24"), ip("198.18.0.7")));
        let v = check(&s, &Excuses::default());
        assert_eq!(rules(&v), vec![Rule::Peers]);
        assert!(
            v.violations[0]
                .what
                .contains("extra [172.18.7.0/24 at 198.18.0.7]")
        );
    }

    #[test]
    fn bridged_peers_are_the_other_live_nodes_containers() {
        let mut s = healthy();
        s.routed = false;
        for k in s.nodes.values_mut() {
            k.subnet = None;
        }
        let want = expected_peers(&s, "host1");
        assert_eq!(
            want,
            [
                (net("172.18.2.2/32"), ip("198.18.0.2")),
                (net("172.18.3.2/32"), ip("198.18.0.3"))
            ]
            .into()
        );
    }
}
