//! The desired content of vxmesh's table, rendered from a node's plan
//! (pure): its named counter, sets with their elements, chains and rules.
//! Rules are kept as the JSON `nft -j` prints them, so a dump compares
//! with `==`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nftables::expr::{
    CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadBase,
    PayloadField, PayloadRaw, Prefix,
};
use nftables::stmt::{self, JumpTarget, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfHook};
use serde_json::Value;

use super::FirewallPlan;
use crate::dataplane::{NodePlan, PortProto, PortSpec};

/// The name of vxmesh's table (family `inet`). vxmesh never touches another.
pub const TABLE: &str = "vxmesh";
/// The named counter of the VXLAN packets the peer filter dropped.
pub const DROPPED_COUNTER: &str = "vxlan_dropped";
/// The named counter of the packets the secure underlay's guard dropped:
/// an encrypted network's VXLAN from outside the tunnel, or traffic into an
/// encrypted network from a plain network's VTEP.
pub const SPOOFED_COUNTER: &str = "vxlan_spoofed";
/// Every named counter of the table.
pub const COUNTERS: [&str; 2] = [DROPPED_COUNTER, SPOOFED_COUNTER];
/// Underlay addresses allowed to send VXLAN.
pub const PEERS_SET: &str = "vtep_peers";
/// UDP ports of the local VTEPs.
pub const PORTS_SET: &str = "vxlan_ports";
/// Every vxmesh network's range.
pub const OVERLAY_SET: &str = "overlay";
/// Ranges of the networks with outbound NAT.
pub const NAT_SOURCES_SET: &str = "nat_sources";
/// The chain holding one DNAT rule per published port.
pub const PUBLISH_CHAIN: &str = "publish";
/// The comment of the outbound masquerade rule.
pub const MASQUERADE_RULE: &str = "outbound-nat";
/// The comment of the VTEP filter rule.
pub const FILTER_RULE: &str = "vxlan-filter";
/// The chain keeping networks with a distributed gateway isolated.
pub const ISOLATE_CHAIN: &str = "isolate";

/// An element of one of vxmesh's sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Elem {
    Addr(Ipv4Addr),
    Net(Ipv4Net),
    Port(u16),
}

impl Elem {
    /// A /32 range is printed by nft as its address: normalise to that.
    pub fn net(n: Ipv4Net) -> Elem {
        if n.prefix_len() == 32 {
            Elem::Addr(n.addr())
        } else {
            Elem::Net(n.trunc())
        }
    }

    /// The JSON element as `nft -j` takes and prints it.
    pub fn expr(&self) -> Expression<'static> {
        match self {
            Elem::Addr(a) => Expression::String(a.to_string().into()),
            Elem::Net(n) => prefix(*n),
            Elem::Port(p) => Expression::Number((*p).into()),
        }
    }
}

impl fmt::Display for Elem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Elem::Addr(a) => a.fmt(f),
            Elem::Net(n) => n.fmt(f),
            Elem::Port(p) => p.fmt(f),
        }
    }
}

/// The definition of a named set (what `add set` says besides elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub name: &'static str,
    /// `ipv4_addr` or `inet_service`.
    pub kind: &'static str,
    pub interval: bool,
}

/// The definition of a chain: a base chain has its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainDef {
    pub name: &'static str,
    pub hook: Option<(NfChainType, NfHook, i32)>,
}

impl ChainDef {
    pub fn policy(&self) -> Option<NfChainPolicy> {
        self.hook.map(|_| NfChainPolicy::Accept)
    }
}

/// One rule: its comment names it (unique within its chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDef {
    pub comment: String,
    pub expr: Vec<Value>,
}

/// Everything the table must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub sets: Vec<(SetDef, BTreeSet<Elem>)>,
    /// Regular chains first (jump targets exist before base chains jump).
    pub chains: Vec<ChainDef>,
    /// Rules of each chain, in order.
    pub rules: BTreeMap<&'static str, Vec<RuleDef>>,
}

/// The sets vxmesh keeps.
pub const SETS: [SetDef; 4] = [
    SetDef {
        name: PEERS_SET,
        kind: "ipv4_addr",
        interval: false,
    },
    SetDef {
        name: PORTS_SET,
        kind: "inet_service",
        interval: false,
    },
    SetDef {
        name: OVERLAY_SET,
        kind: "ipv4_addr",
        interval: true,
    },
    SetDef {
        name: NAT_SOURCES_SET,
        kind: "ipv4_addr",
        interval: true,
    },
];

/// The chains vxmesh keeps: the VTEP filter before the usual filter
/// priority, DNAT at dstnat (and output, for the node's own connections),
/// masquerade at srcnat (the NAT ones only while needed, [`NAT_CHAINS`]).
pub const CHAINS: [ChainDef; 6] = [
    ChainDef {
        name: PUBLISH_CHAIN,
        hook: None,
    },
    ChainDef {
        name: "vxlan_in",
        hook: Some((NfChainType::Filter, NfHook::Input, -150)),
    },
    ChainDef {
        name: "nat_pre",
        hook: Some((NfChainType::NAT, NfHook::Prerouting, -100)),
    },
    ChainDef {
        name: "nat_out",
        hook: Some((NfChainType::NAT, NfHook::Output, -100)),
    },
    ChainDef {
        name: "nat_post",
        hook: Some((NfChainType::NAT, NfHook::Postrouting, 100)),
    },
    ChainDef {
        name: ISOLATE_CHAIN,
        hook: Some((NfChainType::Filter, NfHook::Forward, 0)),
    },
];

/// The chains that exist only while NAT is needed (see [`desired`]).
pub const NAT_CHAINS: [&str; 4] = [PUBLISH_CHAIN, "nat_pre", "nat_out", "nat_post"];

fn json(s: Statement<'_>) -> Value {
    serde_json::to_value(s).expect("a statement serializes")
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn prefix(n: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(n.network().to_string().into())),
        len: n.prefix_len().into(),
    }))
}

fn matches(op: Operator, left: Expression<'static>, right: Expression<'static>) -> Value {
    json(Statement::Match(Match { left, right, op }))
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(format!("@{name}").into())
}

fn fib_daddr_local() -> Value {
    matches(
        Operator::EQ,
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: [FibFlag::Daddr].into_iter().collect(),
        })),
        Expression::String("local".into()),
    )
}

fn proto_name(p: PortProto) -> &'static str {
    match p {
        PortProto::Tcp => "tcp",
        PortProto::Udp => "udp",
    }
}

/// The name of a published port's rules: `PROTO/HOST_PORT`.
pub fn port_comment(p: &PortSpec) -> String {
    // nft keeps at most 128 bytes of comment.
    let owner: String = p.owner.chars().take(80).collect();
    format!("port {}/{} {owner}", proto_name(p.proto), p.host_port)
}

/// `PROTO dport HOST_PORT dnat ip to CONTAINER_IP:CONTAINER_PORT`.
pub fn dnat_rule(p: &PortSpec) -> RuleDef {
    RuleDef {
        comment: port_comment(p),
        expr: vec![
            matches(
                Operator::EQ,
                payload(proto_name(p.proto), "dport"),
                Expression::Number(p.host_port.into()),
            ),
            json(Statement::DNAT(Some(NAT {
                addr: Some(Expression::String(p.container_ip.to_string().into())),
                family: Some(NATFamily::IP),
                port: Some(Expression::Number(p.container_port.into())),
                flags: None,
            }))),
        ],
    }
}

/// A flow DNATed to a published port from the container's own segment
/// (hairpin) is masqueraded, so the reply goes back through the host and
/// is un-DNATed there.
pub fn hairpin_rule(p: &PortSpec, segment: Ipv4Net) -> RuleDef {
    RuleDef {
        comment: format!("hairpin {}", port_comment(p)),
        expr: vec![
            matches(
                Operator::IN,
                Expression::Named(NamedExpression::CT(CT {
                    key: "status".into(),
                    family: None,
                    dir: None,
                })),
                Expression::String("dnat".into()),
            ),
            matches(Operator::EQ, payload("ip", "saddr"), prefix(segment)),
            matches(
                Operator::EQ,
                payload("ip", "daddr"),
                Expression::String(p.container_ip.to_string().into()),
            ),
            matches(
                Operator::EQ,
                payload(proto_name(p.proto), "dport"),
                Expression::Number(p.container_port.into()),
            ),
            json(Statement::Masquerade(None)),
        ],
    }
}

/// `udp dport @vxlan_ports ip saddr != @vtep_peers counter name vxlan_dropped drop`.
fn filter_rule() -> RuleDef {
    RuleDef {
        comment: FILTER_RULE.into(),
        expr: vec![
            matches(Operator::EQ, payload("udp", "dport"), set_ref(PORTS_SET)),
            matches(Operator::NEQ, payload("ip", "saddr"), set_ref(PEERS_SET)),
            json(Statement::Counter(stmt::Counter::Named(
                DROPPED_COUNTER.into(),
            ))),
            json(Statement::Drop(None)),
        ],
    }
}

fn iifname() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::Iifname,
    }))
}

fn count_spoofed_and_drop() -> [Value; 2] {
    [
        json(Statement::Counter(stmt::Counter::Named(
            SPOOFED_COUNTER.into(),
        ))),
        json(Statement::Drop(None)),
    ]
}

/// `udp dport PORT @th,96,24 VNI iifname != "vxm-wg0" counter name
/// vxlan_spoofed drop`: an encrypted network's VXLAN (the VNI is the 24
/// bits after the UDP header's 8 bytes and VXLAN's flags and reserved
/// 4 bytes) counts only when it came out of the tunnel. The kernel's VXLAN
/// socket listens on every address, so without this a frame to the
/// underlay address with the encrypted VNI reaches the VTEP.
fn secure_vni_rule(vni: u32, port: u16) -> RuleDef {
    let mut expr = vec![
        matches(
            Operator::EQ,
            payload("udp", "dport"),
            Expression::Number(port.into()),
        ),
        matches(
            Operator::EQ,
            Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
                base: PayloadBase::TH,
                offset: 96,
                len: 24,
            }))),
            Expression::Number(vni),
        ),
        matches(
            Operator::NEQ,
            iifname(),
            Expression::String(crate::secure::transport::TUN_NAME.into()),
        ),
    ];
    expr.extend(count_spoofed_and_drop());
    RuleDef {
        comment: format!("secure vni {vni}"),
        expr,
    }
}

/// `iifname PLAIN_VTEP ip daddr RANGE counter name vxlan_spoofed drop`: a
/// frame a plain network took in (unauthenticated) is never routed into an
/// encrypted network.
fn secure_range_rule(vtep: &str, range: Ipv4Net) -> RuleDef {
    let mut expr = vec![
        matches(
            Operator::EQ,
            iifname(),
            Expression::String(vtep.to_string().into()),
        ),
        matches(Operator::EQ, payload("ip", "daddr"), prefix(range)),
    ];
    expr.extend(count_spoofed_and_drop());
    RuleDef {
        comment: format!("secure {range} from {vtep}"),
        expr,
    }
}

/// `ip saddr @nat_sources ip daddr != @overlay masquerade`.
fn masquerade_rule() -> RuleDef {
    RuleDef {
        comment: MASQUERADE_RULE.into(),
        expr: vec![
            matches(
                Operator::EQ,
                payload("ip", "saddr"),
                set_ref(NAT_SOURCES_SET),
            ),
            matches(Operator::NEQ, payload("ip", "daddr"), set_ref(OVERLAY_SET)),
            json(Statement::Masquerade(None)),
        ],
    }
}

/// The rules of [`ISOLATE_CHAIN`]: published ports (DNATed flows) may
/// cross; otherwise nothing is forwarded between a network with a gateway
/// and another vxmesh network, either way.
fn isolate_rules(isolated: &BTreeSet<Ipv4Net>) -> Vec<RuleDef> {
    if isolated.is_empty() {
        return Vec::new();
    }
    let ct_dnat = matches(
        Operator::IN,
        Expression::Named(NamedExpression::CT(CT {
            key: "status".into(),
            family: None,
            dir: None,
        })),
        Expression::String("dnat".into()),
    );
    let mut rules = vec![RuleDef {
        comment: "published ports cross networks".into(),
        expr: vec![ct_dnat, json(Statement::Accept(None))],
    }];
    for g in isolated {
        for (dir, own, other) in [("out", "saddr", "daddr"), ("in", "daddr", "saddr")] {
            rules.push(RuleDef {
                comment: format!("isolate {g} {dir}"),
                expr: vec![
                    matches(Operator::EQ, payload("ip", own), prefix(*g)),
                    matches(Operator::EQ, payload("ip", other), set_ref(OVERLAY_SET)),
                    matches(Operator::NEQ, payload("ip", other), prefix(*g)),
                    json(Statement::Drop(None)),
                ],
            });
        }
    }
    rules
}

fn jump_publish(loopback_excluded: bool) -> RuleDef {
    let mut expr = Vec::new();
    if loopback_excluded {
        // 127/8 cannot be DNATed to another host (martian source).
        expr.push(matches(
            Operator::NEQ,
            payload("ip", "daddr"),
            prefix("127.0.0.0/8".parse().expect("valid prefix")),
        ));
    }
    expr.push(fib_daddr_local());
    expr.push(json(Statement::Jump(JumpTarget {
        target: PUBLISH_CHAIN.into(),
    })));
    RuleDef {
        comment: "published ports".into(),
        expr,
    }
}

/// The table `plan` asks for; `None` when the node serves no network.
pub fn desired(plan: &NodePlan) -> Option<Desired> {
    let fw: &FirewallPlan = &plan.firewall;
    if fw.is_empty() {
        return None;
    }
    let elems = |it: &mut dyn Iterator<Item = Elem>| it.collect::<BTreeSet<_>>();
    let sets = vec![
        (SETS[0], elems(&mut fw.peers.iter().map(|a| Elem::Addr(*a)))),
        (
            SETS[1],
            elems(&mut fw.vxlan_ports.iter().map(|p| Elem::Port(*p))),
        ),
        (
            SETS[2],
            elems(&mut fw.overlay.iter().map(|n| Elem::net(*n))),
        ),
        (
            SETS[3],
            elems(&mut fw.nat_sources.iter().map(|n| Elem::net(*n))),
        ),
    ];
    // NAT (outbound masquerade, published ports) turns on connection
    // tracking, which every packet of the node then pays for: the NAT
    // chains exist only while a served network masquerades or a port is
    // published.
    let nat = !fw.nat_sources.is_empty() || !plan.ports.is_empty();
    let chains: Vec<ChainDef> = CHAINS
        .iter()
        .filter(|c| nat || !NAT_CHAINS.contains(&c.name))
        .copied()
        .collect();
    let mut rules: BTreeMap<&'static str, Vec<RuleDef>> =
        chains.iter().map(|c| (c.name, Vec::new())).collect();
    // The guard of the encrypted networks first (it holds with or without
    // the peer filter), then the peer filter.
    let mut vxlan_in: Vec<RuleDef> = fw
        .secure_vnis
        .iter()
        .map(|(vni, port)| secure_vni_rule(*vni, *port))
        .collect();
    if fw.vxlan_filter {
        vxlan_in.push(filter_rule());
    }
    rules.insert("vxlan_in", vxlan_in);
    if nat {
        rules.insert("nat_pre", vec![jump_publish(false)]);
        rules.insert("nat_out", vec![jump_publish(true)]);
        let mut post = Vec::new();
        if !fw.nat_sources.is_empty() {
            post.push(masquerade_rule());
        }
        let mut publish = Vec::new();
        for p in &plan.ports {
            publish.push(dnat_rule(p));
            if let Some(seg) = fw.hairpin.get(&p.network) {
                post.push(hairpin_rule(p, *seg));
            }
        }
        rules.insert(PUBLISH_CHAIN, publish);
        rules.insert("nat_post", post);
    }
    let mut isolate: Vec<RuleDef> = fw
        .plain_vteps
        .iter()
        .flat_map(|v| fw.secure_ranges.iter().map(|r| secure_range_rule(v, *r)))
        .collect();
    isolate.extend(isolate_rules(&fw.isolated));
    rules.insert(ISOLATE_CHAIN, isolate);
    Some(Desired {
        sets,
        chains,
        rules,
    })
}
