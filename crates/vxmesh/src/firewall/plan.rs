//! What vxmesh's nftables table must hold on one node, as plain data in the
//! node's plan: the VTEP peer filter's inputs and the outbound NAT ranges
//! (the published ports are `NodePlan::ports`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{Cluster, Network};
use crate::model::NodeRecord;

/// The firewall part of a node's plan. Empty (no VXLAN port) when the node
/// serves no network: then vxmesh keeps no table at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallPlan {
    /// Drop VXLAN packets from anything but a peer (`vxlan_filter`).
    pub vxlan_filter: bool,
    /// UDP ports of the VTEPs of the networks this node serves.
    pub vxlan_ports: BTreeSet<u16>,
    /// Underlay addresses of the nodes that share a network with this one.
    pub peers: BTreeSet<Ipv4Addr>,
    /// Every vxmesh network's range: traffic to them is never masqueraded.
    pub overlay: BTreeSet<Ipv4Net>,
    /// Ranges of the served networks with `outbound_nat`: their traffic to
    /// anything outside `overlay` is masqueraded.
    pub nat_sources: BTreeSet<Ipv4Net>,
    /// Per served network, the range whose containers reach a published
    /// port on the same segment (hairpin): the node subnet (routed) or the
    /// segment (bridged), by network name.
    pub hairpin: std::collections::BTreeMap<String, Ipv4Net>,
    /// Ranges of the served bridged networks with a distributed gateway:
    /// the node routes for them, so forwarding between them and any other
    /// vxmesh network is dropped (networks stay isolated).
    #[serde(default)]
    pub isolated: BTreeSet<Ipv4Net>,
    /// The secure underlay's guard (docs/encryption.md, "Spoofing"): the
    /// served encrypted networks' (VNI, UDP port). VXLAN carrying one of
    /// these VNIs is accepted only from the TUN device `vxm-wg0`.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secure_vnis: BTreeSet<(u32, u16)>,
    /// Served encrypted networks' ranges: nothing arriving on a plain
    /// network's VTEP is forwarded into them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secure_ranges: BTreeSet<Ipv4Net>,
    /// VTEPs of the served plain networks (only when an encrypted network
    /// is served too).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub plain_vteps: BTreeSet<String>,
}

impl Default for FirewallPlan {
    fn default() -> Self {
        FirewallPlan {
            vxlan_filter: true,
            vxlan_ports: BTreeSet::new(),
            peers: BTreeSet::new(),
            overlay: BTreeSet::new(),
            nat_sources: BTreeSet::new(),
            hairpin: Default::default(),
            isolated: BTreeSet::new(),
            secure_vnis: BTreeSet::new(),
            secure_ranges: BTreeSet::new(),
            plain_vteps: BTreeSet::new(),
        }
    }
}

impl FirewallPlan {
    /// No network served: vxmesh wants no table.
    pub fn is_empty(&self) -> bool {
        self.vxlan_ports.is_empty()
    }
}

/// Whether `node` is a member of `net` (holds a subnet or slice of it).
fn member(node: &NodeRecord, net: &Network) -> bool {
    node.subnets.contains_key(&net.name)
}

/// The firewall plan of `me` (pure). `served` are the networks the node
/// serves with the range used for hairpin traffic of each.
pub fn plan_firewall<'a>(
    cluster: &Cluster,
    me: &NodeRecord,
    served: impl IntoIterator<Item = (&'a Network, Ipv4Net)>,
    vxlan_filter: bool,
) -> FirewallPlan {
    let mut p = FirewallPlan {
        vxlan_filter,
        overlay: cluster.networks.iter().map(|n| n.cidr).collect(),
        ..FirewallPlan::default()
    };
    for (net, hairpin) in served {
        p.vxlan_ports.insert(net.port);
        if net.outbound_nat {
            p.nat_sources.insert(net.cidr);
        }
        if net.gateway.is_some() {
            p.isolated.insert(net.cidr);
        }
        p.hairpin.insert(net.name.clone(), hairpin);
        if net.encrypt {
            p.secure_vnis.insert((net.vni.get(), net.port));
            p.secure_ranges.insert(net.cidr);
        } else {
            p.plain_vteps.insert(crate::model::vtep_name(net.vni));
        }
        for n in &cluster.nodes {
            // An encrypted network's VXLAN comes from the peer's transport
            // address (through the secure underlay), a plain one's from its
            // underlay address.
            if n.name != me.name
                && member(n, net)
                && let Ok(addr) = crate::secure::plan::vtep_addr(cluster, net, n)
            {
                p.peers.insert(addr);
            }
        }
    }
    if p.secure_vnis.is_empty() {
        p.plain_vteps.clear();
    }
    // Overlapping ranges cannot share an interval set: keep the covering ones.
    p.overlay = Ipv4Net::aggregate(&p.overlay.into_iter().collect())
        .into_iter()
        .collect();
    p.nat_sources = Ipv4Net::aggregate(&p.nat_sources.into_iter().collect())
        .into_iter()
        .collect();
    p
}
