//! The desired data-plane state of one node: plain data, produced by the
//! planner and consumed by the kernel layer's diff.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{Mac, Vni};

/// What kind of device a link is, with the attributes vxmesh sets at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkKind {
    Bridge,
    Vxlan(VxlanSpec),
}

impl LinkKind {
    /// The kernel's name of the kind (`IFLA_INFO_KIND`).
    pub fn name(&self) -> &'static str {
        match self {
            LinkKind::Bridge => "bridge",
            LinkKind::Vxlan(_) => "vxlan",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanSpec {
    pub vni: Vni,
    /// Local underlay address (`local`).
    pub local: Ipv4Addr,
    /// Underlay device name (`dev`), if pinned.
    pub underlay_dev: Option<String>,
    /// UDP destination port (`dstport`).
    pub port: u16,
    /// `proxy`: answer ARP from the device's neighbour table (bridged mode).
    pub proxy: bool,
    // `nolearning` is always set: vxmesh programs every entry itself.
}

/// A device vxmesh owns on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub name: String,
    pub kind: LinkKind,
    pub mtu: u32,
    /// Fixed MAC (VTEPs: derived; bridges: derived too, so it never flaps).
    pub mac: Mac,
    /// Bridge this device is a port of (bridged-mode VTEP).
    pub master: Option<String>,
    /// Bridge port learning: only meaningful with `master`; vxmesh turns it off.
    pub port_learning: bool,
    /// The ownership marker written as the interface alias (`vxmesh:net:NAME`).
    pub alias: String,
}

/// An IPv4 address on one of vxmesh's devices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AddrSpec {
    pub dev: String,
    pub addr: Ipv4Net,
}

/// `dst via gateway dev DEV onlink proto vxmesh` in the main table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: String,
}

/// The scope of the routes vxmesh writes: `RT_SCOPE_UNIVERSE` (the route
/// dump reports it as a number).
pub const ROUTE_SCOPE_UNIVERSE: u8 = 0;

/// The type of the routes vxmesh writes: `RTN_UNICAST`.
pub const ROUTE_TYPE_UNICAST: u8 = 1;

/// A permanent ARP entry `ip lladdr mac` on `dev`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NeighSpec {
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// A vxlan FDB entry `mac dst underlay_ip self permanent` on `dev`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FdbSpec {
    pub dev: String,
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// Everything vxmesh wants on one node. Links are in creation order (a
/// bridge before the VTEP enslaved to it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub links: Vec<LinkSpec>,
    pub addresses: BTreeSet<AddrSpec>,
    pub routes: BTreeSet<RouteSpec>,
    pub neighbours: BTreeSet<NeighSpec>,
    pub fdb: BTreeSet<FdbSpec>,
    /// net.ipv4.ip_forward must be on (routed mode).
    pub ip_forward: bool,
    /// Per network served: what attach/CNI need (written to the state dir).
    pub networks: BTreeMap<String, NetworkState>,
    /// Ports published on this node's addresses (Docker `-p`, `vxmesh
    /// attach --publish`): rendered as DNAT rules in vxmesh's nftables table.
    #[serde(default)]
    pub ports: BTreeSet<PortSpec>,
    /// The VTEP peer filter and outbound NAT (vxmesh's nftables table).
    #[serde(default)]
    pub firewall: crate::firewall::FirewallPlan,
    /// The secure underlay (TUN device, transport address, peers) when
    /// the node serves an encrypted network (docs/encryption.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<crate::secure::plan::SecurePlan>,
}

/// The transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProto {
    Tcp,
    Udp,
}

/// A published port: traffic to one of this node's addresses on
/// `host_port` (from anywhere, also from containers on this node) goes to
/// `container_ip:container_port` on `network`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub proto: PortProto,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
    pub network: String,
    /// Who published it (`docker:ENDPOINT_ID`, a container id), for errors
    /// and `status`.
    pub owner: String,
}

/// What a node knows about one network it serves, for attaching containers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NetworkState {
    pub network: String,
    pub mode: crate::config::Mode,
    pub vni: Vni,
    pub bridge: String,
    pub vtep: String,
    pub mtu: u32,
    /// Routed: the node subnet. Bridged: the network's subnet (the segment).
    pub subnet: Ipv4Net,
    /// Addresses this node hands out: routed, the node subnet minus network,
    /// gateway and broadcast; bridged, the node's slice.
    pub pool: Ipv4Net,
    /// Routed: the bridge address containers use as default gateway.
    pub gateway: Option<Ipv4Addr>,
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::route::{RouteScope, RouteType};

    #[test]
    fn route_constants_are_the_kernel_values() {
        assert_eq!(super::ROUTE_SCOPE_UNIVERSE, u8::from(RouteScope::Universe));
        assert_eq!(super::ROUTE_TYPE_UNICAST, u8::from(RouteType::Unicast));
    }
}
