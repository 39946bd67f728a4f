//! The planner: a pure function from (cluster, this node, endpoints) to the
//! node's desired data-plane state. No I/O; everything here is unit-tested
//! without root.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::plan_types::*;
use crate::config::{Cluster, Mode, Network};
use crate::model::{self, Endpoint, Mac, NodeRecord, Vni};
use crate::secure::plan as secure;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "node '{node}' is not in the cluster (known nodes: {known}): check --node or add it to the cluster file"
    )]
    UnknownNode { node: String, known: String },
    #[error("node '{node}' has no subnet in network '{network}'")]
    NoSubnet { node: String, network: String },
    /// An encrypted network's transport address (docs/encryption.md).
    #[error(transparent)]
    Transport(#[from] crate::secure::TransportError),
}

/// The alias that marks a network device as vxmesh's.
pub fn owner_alias(network: &str) -> String {
    format!("{}net:{network}", model::OWNER_ALIAS_PREFIX)
}

/// A bridge's MAC, fixed so the gateway MAC containers cache never changes as
/// ports come and go. Distinct from every VTEP MAC (first octet 0x0e vs 0x0a).
pub fn bridge_mac(vni: Vni, underlay: Ipv4Addr) -> Mac {
    let mut m = model::vtep_mac(vni, underlay).octets();
    m[0] = 0x0e;
    Mac(m)
}

/// The address of a routed node's VTEP (its subnet's network address, as /32).
pub fn vtep_addr(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

/// The gateway of a routed node's subnet (its first host address, on the bridge).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Addresses containers may get from a pool: hosts of `pool` that are neither
/// the network nor the broadcast address of `segment`, nor `gateway`.
pub fn usable_addresses(
    pool: Ipv4Net,
    segment: Ipv4Net,
    gateway: Option<Ipv4Addr>,
) -> impl Iterator<Item = Ipv4Addr> {
    let lo = u32::from(pool.network());
    let hi = u32::from(pool.broadcast());
    let (net, bcast) = (segment.network(), segment.broadcast());
    (lo..=hi)
        .map(Ipv4Addr::from)
        .filter(move |a| *a != net && *a != bcast && Some(*a) != gateway)
}

/// With the static store no node sees another's attachments, so every usable
/// address of every remote node's slice is an endpoint (MAC derived from IP).
pub fn derived_endpoints(cluster: &Cluster, network: &Network) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for n in &cluster.nodes {
        if let Some(slice) = n.subnets.get(&network.name) {
            for ip in usable_addresses(*slice, network.cidr, network.gateway) {
                out.push(Endpoint {
                    network: network.name.clone(),
                    ip,
                    mac: model::container_mac(ip),
                    node: n.name.clone(),
                });
            }
        }
    }
    out
}

/// Inputs of the planner besides the cluster.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub cluster: &'a Cluster,
    pub node: &'a str,
    /// Endpoints of bridged networks (any node; this node's own are skipped).
    /// `None` = derive them from node slices (static store).
    pub endpoints: Option<&'a [Endpoint]>,
    /// MTU of the underlay device, for networks without an explicit MTU.
    pub underlay_mtu: u32,
    /// Drop VXLAN from anything but the node's peers (agent `vxlan_filter`).
    pub vxlan_filter: bool,
}

/// Compute the desired state of `input.node`.
pub fn plan(input: &PlanInput) -> Result<NodePlan, PlanError> {
    let cluster = input.cluster;
    let me = cluster
        .node(input.node)
        .ok_or_else(|| PlanError::UnknownNode {
            node: input.node.to_string(),
            known: cluster.node_names(),
        })?;
    let mut p = NodePlan::default();
    for net in &cluster.networks {
        match net.mode {
            Mode::Routed => plan_routed(&mut p, cluster, me, net, input.underlay_mtu)?,
            Mode::Bridged => {
                let derived;
                let eps = match input.endpoints {
                    Some(e) => e,
                    None => {
                        derived = derived_endpoints(cluster, net);
                        &derived
                    }
                };
                plan_bridged(&mut p, cluster, me, net, eps, input.underlay_mtu)?
            }
        }
    }
    let served = cluster
        .networks
        .iter()
        .filter_map(|n| p.networks.get(&n.name).map(|st| (n, st.subnet)));
    p.firewall = crate::firewall::plan_firewall(cluster, me, served, input.vxlan_filter);
    p.secure = secure::plan(cluster, me, input.underlay_mtu)?;
    Ok(p)
}

fn subnet_of(node: &NodeRecord, net: &Network) -> Result<Ipv4Net, PlanError> {
    node.subnets
        .get(&net.name)
        .copied()
        .ok_or_else(|| PlanError::NoSubnet {
            node: node.name.clone(),
            network: net.name.clone(),
        })
}

fn vtep_spec(
    cluster: &Cluster,
    me: &NodeRecord,
    net: &Network,
    mtu: u32,
    bridged: bool,
    bridge: &str,
) -> Result<LinkSpec, PlanError> {
    Ok(LinkSpec {
        name: model::vtep_name(net.vni),
        kind: LinkKind::Vxlan(VxlanSpec {
            vni: net.vni,
            local: secure::vtep_addr(cluster, net, me)?,
            // An encrypted network's VTEP sends through the TUN device.
            underlay_dev: me.underlay_dev.clone().filter(|_| !net.encrypt),
            port: net.port,
            proxy: bridged,
        }),
        mtu,
        mac: model::vtep_mac(net.vni, me.underlay_ip),
        master: bridged.then(|| bridge.to_string()),
        port_learning: false,
        alias: owner_alias(&net.name),
    })
}

fn bridge_spec(name: &str, me: &NodeRecord, net: &Network, mtu: u32) -> LinkSpec {
    // A distributed gateway is the bridge itself: the same MAC everywhere.
    let mac = match (net.mode, net.gateway) {
        (Mode::Bridged, Some(_)) => model::gateway_mac(net.vni),
        _ => bridge_mac(net.vni, me.underlay_ip),
    };
    LinkSpec {
        name: name.to_string(),
        kind: LinkKind::Bridge,
        mtu,
        mac,
        master: None,
        port_learning: false,
        alias: owner_alias(&net.name),
    }
}

fn plan_routed(
    p: &mut NodePlan,
    cluster: &Cluster,
    me: &NodeRecord,
    net: &Network,
    underlay_mtu: u32,
) -> Result<(), PlanError> {
    let subnet = subnet_of(me, net)?;
    let mtu = secure::network_mtu(net, underlay_mtu);
    let bridge = model::ROUTED_BRIDGE.to_string();
    let vtep = model::vtep_name(net.vni);
    p.links.push(bridge_spec(&bridge, me, net, mtu));
    p.links
        .push(vtep_spec(cluster, me, net, mtu, false, &bridge)?);
    let gw = gateway(subnet);
    p.addresses.insert(AddrSpec {
        dev: bridge.clone(),
        addr: Ipv4Net::new(gw, subnet.prefix_len()).expect("valid prefix"),
    });
    p.addresses.insert(AddrSpec {
        dev: vtep.clone(),
        addr: Ipv4Net::new(vtep_addr(subnet), 32).expect("valid prefix"),
    });
    p.ip_forward = true;
    for peer in cluster.nodes.iter().filter(|n| n.name != me.name) {
        let Some(rs) = peer.subnets.get(&net.name) else {
            continue;
        };
        let peer_mac = model::vtep_mac(net.vni, peer.underlay_ip);
        p.routes.insert(RouteSpec {
            dst: *rs,
            via: vtep_addr(*rs),
            dev: vtep.clone(),
        });
        p.neighbours.insert(NeighSpec {
            dev: vtep.clone(),
            ip: vtep_addr(*rs),
            mac: peer_mac,
        });
        p.fdb.insert(FdbSpec {
            dev: vtep.clone(),
            mac: peer_mac,
            dst: secure::vtep_addr(cluster, net, peer)?,
        });
    }
    p.networks.insert(
        net.name.clone(),
        NetworkState {
            network: net.name.clone(),
            mode: Mode::Routed,
            vni: net.vni,
            bridge,
            vtep,
            mtu,
            subnet,
            pool: subnet,
            gateway: Some(gw),
        },
    );
    Ok(())
}

fn plan_bridged(
    p: &mut NodePlan,
    cluster: &Cluster,
    me: &NodeRecord,
    net: &Network,
    endpoints: &[Endpoint],
    underlay_mtu: u32,
) -> Result<(), PlanError> {
    let slice = subnet_of(me, net)?;
    let mtu = secure::network_mtu(net, underlay_mtu);
    let bridge = model::bridged_bridge_name(net.vni);
    let vtep = model::vtep_name(net.vni);
    p.links.push(bridge_spec(&bridge, me, net, mtu));
    p.links
        .push(vtep_spec(cluster, me, net, mtu, true, &bridge)?);
    if let Some(gw) = net.gateway {
        // Every node answers for the gateway on its own bridge; the VTEP
        // gets no neighbour or FDB entry for it (its ARP is answered from
        // the VTEP's table only, and unknown MACs are not flooded), so the
        // gateway's ARP and frames never cross the overlay.
        p.addresses.insert(AddrSpec {
            dev: bridge.clone(),
            addr: Ipv4Net::new(gw, net.cidr.prefix_len()).expect("valid prefix"),
        });
        p.ip_forward = true;
    }
    let mut seen_ips = BTreeSet::new();
    for ep in endpoints
        .iter()
        .filter(|e| e.network == net.name && e.node != me.name)
    {
        let Some(peer) = cluster.node(&ep.node) else {
            continue;
        };
        // One IP is one endpoint: if two records claim it, the first wins.
        // The gateway is never a remote endpoint: each node is its own.
        if !net.cidr.contains(&ep.ip) || net.gateway == Some(ep.ip) || !seen_ips.insert(ep.ip) {
            continue;
        }
        p.neighbours.insert(NeighSpec {
            dev: vtep.clone(),
            ip: ep.ip,
            mac: ep.mac,
        });
        p.fdb.insert(FdbSpec {
            dev: vtep.clone(),
            mac: ep.mac,
            dst: secure::vtep_addr(cluster, net, peer)?,
        });
    }
    p.networks.insert(
        net.name.clone(),
        NetworkState {
            network: net.name.clone(),
            mode: Mode::Bridged,
            vni: net.vni,
            bridge,
            vtep,
            mtu,
            subnet: net.cidr,
            pool: slice,
            gateway: net.gateway,
        },
    );
    Ok(())
}

#[cfg(test)]
#[path = "plan_gateway_tests.rs"]
mod gateway_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use proptest::prelude::*;

    fn routed(n: usize) -> Cluster {
        let mut t = String::from(
            "[[network]]\nname = \"demo\"\ncidr = \"172.18.0.0/16\"\nsubnet_len = 24\nvni = 100\n",
        );
        for i in 0..n {
            t += &format!(
                "[[node]]\nname = \"host{}\"\nunderlay_ip = \"198.18.0.{}\"\nsubnet = \"172.18.{}.0/24\"\n",
                i + 1,
                i + 1,
                (i + 1) * 10
            );
        }
        config::parse(&t, "t").unwrap()
    }

    fn input<'a>(c: &'a Cluster, node: &'a str) -> PlanInput<'a> {
        PlanInput {
            vxlan_filter: true,
            cluster: c,
            node,
            endpoints: None,
            underlay_mtu: 1500,
        }
    }

    #[test]
    fn routed_two_nodes_matches_design() {
        let c = routed(2);
        let p = plan(&input(&c, "host1")).unwrap();
        assert_eq!(p.links.len(), 2);
        assert_eq!(p.links[0].name, "vxm-br0");
        assert_eq!(p.links[0].kind, LinkKind::Bridge);
        assert_eq!(p.links[1].name, "vxm-vx100");
        assert_eq!(p.links[1].mtu, 1450);
        assert_eq!(p.links[1].mac.to_string(), "0a:64:c6:12:00:01");
        let LinkKind::Vxlan(vx) = &p.links[1].kind else {
            panic!()
        };
        assert_eq!((vx.vni.get(), vx.port, vx.proxy), (100, 4789, false));
        assert_eq!(vx.local, Ipv4Addr::new(198, 18, 0, 1));
        let addrs: Vec<String> = p
            .addresses
            .iter()
            .map(|a| format!("{} {}", a.dev, a.addr))
            .collect();
        assert_eq!(
            addrs,
            vec!["vxm-br0 172.18.10.1/24", "vxm-vx100 172.18.10.0/32"]
        );
        let r: Vec<_> = p.routes.iter().collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].dst.to_string(), "172.18.20.0/24");
        assert_eq!(r[0].via, Ipv4Addr::new(172, 18, 20, 0));
        let n: Vec<_> = p.neighbours.iter().collect();
        assert_eq!(n[0].ip, Ipv4Addr::new(172, 18, 20, 0));
        assert_eq!(n[0].mac.to_string(), "0a:64:c6:12:00:02");
        let f: Vec<_> = p.fdb.iter().collect();
        assert_eq!(
            (f[0].mac, f[0].dst),
            (n[0].mac, Ipv4Addr::new(198, 18, 0, 2))
        );
        assert!(p.ip_forward);
        let st = &p.networks["demo"];
        assert_eq!(st.gateway, Some(Ipv4Addr::new(172, 18, 10, 1)));
        assert_eq!(st.mtu, 1450);
    }

    #[test]
    fn explicit_mtu_wins() {
        let mut c = routed(2);
        c.networks[0].mtu = Some(1400);
        let p = plan(&input(&c, "host2")).unwrap();
        assert!(p.links.iter().all(|l| l.mtu == 1400));
    }

    #[test]
    fn unknown_node_is_an_error() {
        let c = routed(2);
        let e = plan(&input(&c, "nope")).unwrap_err();
        assert!(e.to_string().contains("known nodes: host1, host2"));
    }

    #[test]
    fn usable_addresses_skip_special_ones() {
        let seg: Ipv4Net = "10.1.0.0/24".parse().unwrap();
        let first: Vec<_> = usable_addresses("10.1.0.0/29".parse().unwrap(), seg, None).collect();
        assert_eq!(first.first(), Some(&Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(first.len(), 7);
        let last: Vec<_> = usable_addresses("10.1.0.248/29".parse().unwrap(), seg, None).collect();
        assert_eq!(last.len(), 7);
        assert!(!last.contains(&Ipv4Addr::new(10, 1, 0, 255)));
        let routed: Vec<_> = usable_addresses(
            "172.18.10.0/24".parse().unwrap(),
            "172.18.10.0/24".parse().unwrap(),
            Some(Ipv4Addr::new(172, 18, 10, 1)),
        )
        .collect();
        assert_eq!(routed.len(), 253);
        assert_eq!(routed[0], Ipv4Addr::new(172, 18, 10, 2));
    }

    fn bridged_cluster() -> Cluster {
        let t = r#"
[[network]]
name = "a"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 29
vni = 200
[[network]]
name = "b"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 29
vni = 201
[[node]]
name = "h1"
underlay_ip = "198.18.0.1"
[[node]]
name = "h2"
underlay_ip = "198.18.0.2"
[[node]]
name = "h3"
underlay_ip = "198.18.0.3"
"#;
        config::parse(t, "t").unwrap()
    }

    #[test]
    fn bridged_derives_remote_slices() {
        let c = bridged_cluster();
        let p = plan(&input(&c, "h1")).unwrap();
        // Two networks x (bridge + vtep).
        assert_eq!(
            p.links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            vec!["vxm-br200", "vxm-vx200", "vxm-br201", "vxm-vx201"]
        );
        assert_eq!(p.links[1].master.as_deref(), Some("vxm-br200"));
        assert!(p.addresses.is_empty());
        assert!(!p.ip_forward);
        // h2 holds 10.1.0.8/29 and h3 10.1.0.16/29: 8 + 8 addresses per network.
        let on200: Vec<_> = p
            .neighbours
            .iter()
            .filter(|n| n.dev == "vxm-vx200")
            .collect();
        assert_eq!(on200.len(), 16);
        assert!(on200.iter().all(|n| n.mac == model::container_mac(n.ip)));
        assert!(p.fdb.iter().any(|f| f.dev == "vxm-vx201"
            && f.mac == model::container_mac(Ipv4Addr::new(10, 1, 0, 9))
            && f.dst == Ipv4Addr::new(198, 18, 0, 2)));
        // Its own slice (10.1.0.0/29) is not programmed.
        assert!(
            !p.neighbours
                .iter()
                .any(|n| n.ip == Ipv4Addr::new(10, 1, 0, 1))
        );
        assert_eq!(p.networks["a"].pool.to_string(), "10.1.0.0/29");
        assert_eq!(p.networks["a"].gateway, None);
    }

    #[test]
    fn bridged_with_real_endpoints_only() {
        let c = bridged_cluster();
        let ip = Ipv4Addr::new(10, 1, 0, 9);
        let eps = vec![
            Endpoint {
                network: "a".into(),
                ip,
                mac: model::container_mac(ip),
                node: "h2".into(),
            },
            // Duplicate claim of the same IP from another node: first one wins.
            Endpoint {
                network: "a".into(),
                ip,
                mac: model::container_mac(ip),
                node: "h3".into(),
            },
            // Outside the network: ignored.
            Endpoint {
                network: "a".into(),
                ip: Ipv4Addr::new(10, 9, 0, 1),
                mac: model::container_mac(ip),
                node: "h3".into(),
            },
            // Own endpoint: not programmed.
            Endpoint {
                network: "a".into(),
                ip: Ipv4Addr::new(10, 1, 0, 2),
                mac: model::container_mac(Ipv4Addr::new(10, 1, 0, 2)),
                node: "h1".into(),
            },
        ];
        let p = plan(&PlanInput {
            cluster: &c,
            node: "h1",
            endpoints: Some(&eps),
            underlay_mtu: 1500,
            vxlan_filter: true,
        })
        .unwrap();
        assert_eq!(p.neighbours.len(), 1);
        assert_eq!(
            p.fdb.iter().next().unwrap().dst,
            Ipv4Addr::new(198, 18, 0, 2)
        );
    }

    proptest! {
        /// Every node's plan holds exactly three entries per other node, and
        /// they agree with what that node plans for itself.
        #[test]
        fn routed_plans_are_mutually_consistent(n in 1usize..24, vni in 1u32..16_777_215, mtu in 1200u32..9000) {
            let mut c = routed(n);
            c.networks[0].vni = Vni::new(vni).unwrap();
            let plans: Vec<NodePlan> = c.nodes.iter().map(|node| plan(&PlanInput { cluster: &c, node: &node.name, endpoints: None, underlay_mtu: mtu, vxlan_filter: true }).unwrap()).collect();
            for (i, pa) in plans.iter().enumerate() {
                prop_assert_eq!(pa.routes.len(), n - 1);
                prop_assert_eq!(pa.neighbours.len(), n - 1);
                prop_assert_eq!(pa.fdb.len(), n - 1);
                for (j, pb) in plans.iter().enumerate() {
                    if i == j { continue; }
                    let b = &c.nodes[j];
                    let b_vtep = pb.links.iter().find(|l| matches!(l.kind, LinkKind::Vxlan(_))).unwrap();
                    let b_subnet = b.subnets["demo"];
                    let b_vtep_ip = pb.addresses.iter().find(|a| a.dev == b_vtep.name).unwrap().addr.addr();
                    let r = pa.routes.iter().find(|r| r.dst == b_subnet).unwrap();
                    prop_assert_eq!(r.via, b_vtep_ip);
                    let nb = pa.neighbours.iter().find(|x| x.ip == b_vtep_ip).unwrap();
                    prop_assert_eq!(nb.mac, b_vtep.mac);
                    let f = pa.fdb.iter().find(|f| f.mac == b_vtep.mac).unwrap();
                    prop_assert_eq!(f.dst, b.underlay_ip);
                    // No route of A covers A's own subnet.
                    prop_assert!(!pa.routes.iter().any(|r| r.dst.contains(&c.nodes[i].subnets["demo"])));
                }
                // All MACs distinct (VTEPs and bridges).
                let macs: BTreeSet<Mac> = plans.iter().flat_map(|p| p.links.iter().map(|l| l.mac)).collect();
                prop_assert_eq!(macs.len(), 2 * n);
            }
        }

        /// Derived subnets never overlap and stay inside the cluster CIDR.
        #[test]
        fn derived_subnets_are_disjoint(n in 1usize..60, len in 20u8..28) {
            prop_assume!(n <= 1usize << (len - 16));
            let mut t = format!("[[network]]\nname = \"d\"\ncidr = \"10.0.0.0/16\"\nsubnet_len = {len}\nvni = 7\n");
            for i in 0..n {
                t += &format!("[[node]]\nname = \"n{i}\"\nunderlay_ip = \"198.18.{}.{}\"\n", i / 200, i % 200 + 1);
            }
            let c = config::parse(&t, "t").unwrap();
            let subs: Vec<Ipv4Net> = c.nodes.iter().map(|n| n.subnets["d"]).collect();
            for (i, a) in subs.iter().enumerate() {
                prop_assert!(c.networks[0].cidr.contains(a));
                for b in &subs[i + 1..] {
                    prop_assert!(!a.contains(b) && !b.contains(a));
                }
            }
        }
    }
}
