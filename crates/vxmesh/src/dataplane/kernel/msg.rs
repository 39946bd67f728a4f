//! Pure builders of the rtnetlink messages vxmesh sends. No I/O: every
//! request is plain data, so flags and attributes are unit-tested here.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVeth, InfoVxlan, LinkAttribute,
    LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage as R};

use crate::model::Mac;

pub const RT_TABLE_MAIN: u32 = 254;

// ---- links ----------------------------------------------------------------

fn link_by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m
}

fn set_up(m: &mut LinkMessage, up: bool) {
    m.header.change_mask |= LinkFlags::Up;
    if up {
        m.header.flags |= LinkFlags::Up;
    }
}

/// `RTM_GETLINK` for one device by name.
pub fn link_get(name: &str) -> R {
    R::GetLink(link_by_name(name))
}

/// `RTM_GETLINK` dump of every device.
pub fn link_dump() -> R {
    R::GetLink(LinkMessage::default())
}

/// `RTM_DELLINK` by name.
pub fn link_del(name: &str) -> R {
    R::DelLink(link_by_name(name))
}

/// Attributes vxmesh sets when it creates a device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewLink {
    pub name: String,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    pub master: Option<u32>,
    pub up: bool,
}

impl NewLink {
    fn message(&self, kind: InfoKind, data: Option<InfoData>) -> LinkMessage {
        let mut m = link_by_name(&self.name);
        if let Some(mtu) = self.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = self.mac {
            m.attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
        }
        if let Some(master) = self.master {
            m.attributes.push(LinkAttribute::Controller(master));
        }
        let mut info = vec![NlLinkInfo::Kind(kind)];
        if let Some(d) = data {
            info.push(NlLinkInfo::Data(d));
        }
        m.attributes.push(LinkAttribute::LinkInfo(info));
        if self.up {
            set_up(&mut m, true);
        }
        m
    }
}

/// `RTM_NEWLINK` (send with `NLM_F_CREATE | NLM_F_EXCL`) of a bridge.
pub fn bridge_new(l: &NewLink) -> R {
    R::NewLink(l.message(InfoKind::Bridge, None))
}

/// The vxlan attributes vxmesh sets: `id local [dev] dstport nolearning [proxy]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewVxlan {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub underlay: Option<u32>,
    pub port: u16,
    pub proxy: bool,
}

/// `RTM_NEWLINK` (send with `NLM_F_CREATE | NLM_F_EXCL`) of a VTEP.
pub fn vxlan_new(l: &NewLink, v: &NewVxlan) -> R {
    let mut data = vec![InfoVxlan::Id(v.vni), InfoVxlan::Local(v.local)];
    if let Some(i) = v.underlay {
        data.push(InfoVxlan::Link(i));
    }
    data.push(InfoVxlan::Port(v.port));
    data.push(InfoVxlan::Learning(false));
    if v.proxy {
        data.push(InfoVxlan::Proxy(true));
    }
    R::NewLink(l.message(InfoKind::Vxlan, Some(InfoData::Vxlan(data))))
}

/// `RTM_NEWLINK` (send with `NLM_F_CREATE | NLM_F_EXCL`) of a veth pair whose
/// peer is born in the namespace `peer_ns_fd` (or beside `name` if `None`).
pub fn veth_new(name: &str, peer: &str, peer_ns_fd: Option<RawFd>, mtu: Option<u32>) -> R {
    let mut p = link_by_name(peer);
    if let Some(mtu) = mtu {
        p.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(fd) = peer_ns_fd {
        p.attributes.push(LinkAttribute::NetNsFd(fd));
    }
    let l = NewLink {
        name: name.to_string(),
        mtu,
        ..Default::default()
    };
    R::NewLink(l.message(InfoKind::Veth, Some(InfoData::Veth(InfoVeth::Peer(p)))))
}

/// What `link_set` changes on an existing device; `None` leaves it alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetLink {
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    /// `Some(0)` releases the device from its master.
    pub master: Option<u32>,
    pub alias: Option<String>,
    pub up: Option<bool>,
    pub new_name: Option<String>,
    pub netns_fd: Option<RawFd>,
}

/// `RTM_NEWLINK` without `NLM_F_CREATE` on an existing device, found by
/// `index` if known, else by `name` (a rename needs the index).
pub fn link_set(index: Option<u32>, name: &str, s: &SetLink) -> R {
    let mut m = LinkMessage::default();
    match index {
        Some(i) => m.header.index = i,
        None => m.attributes.push(LinkAttribute::IfName(name.to_string())),
    }
    if let Some(n) = &s.new_name {
        m.attributes.push(LinkAttribute::IfName(n.clone()));
    }
    if let Some(mtu) = s.mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(mac) = s.mac {
        m.attributes
            .push(LinkAttribute::Address(mac.octets().to_vec()));
    }
    if let Some(master) = s.master {
        m.attributes.push(LinkAttribute::Controller(master));
    }
    if let Some(alias) = &s.alias {
        m.attributes.push(LinkAttribute::IfAlias(alias.clone()));
    }
    if let Some(fd) = s.netns_fd {
        m.attributes.push(LinkAttribute::NetNsFd(fd));
    }
    if let Some(up) = s.up {
        set_up(&mut m, up);
    }
    R::NewLink(m)
}

/// `RTM_NEWLINK` setting the bridge-port `learning` flag of an enslaved
/// device (`IFLA_INFO_SLAVE_DATA`; no kind needed, the master handles it).
pub fn port_learning(name: &str, learning: bool) -> R {
    let mut m = link_by_name(name);
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![NlLinkInfo::PortData(
            InfoPortData::BridgePort(vec![InfoBridgePort::Learning(learning)]),
        )]));
    R::NewLink(m)
}

// ---- addresses ------------------------------------------------------------

fn addr(index: u32, net: Ipv4Net) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = net.prefix_len();
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    m.attributes
        .push(AddressAttribute::Local(IpAddr::V4(net.addr())));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V4(net.addr())));
    if net.prefix_len() < 31 {
        m.attributes
            .push(AddressAttribute::Broadcast(net.broadcast()));
    }
    m
}

/// `RTM_NEWADDR`.
pub fn addr_new(index: u32, net: Ipv4Net) -> R {
    R::NewAddress(addr(index, net))
}

/// `RTM_DELADDR`.
pub fn addr_del(index: u32, net: Ipv4Net) -> R {
    let mut m = addr(index, net);
    m.attributes
        .retain(|a| matches!(a, AddressAttribute::Local(_)));
    R::DelAddress(m)
}

/// `RTM_GETADDR` dump of IPv4 addresses.
pub fn addr_dump() -> R {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    R::GetAddress(m)
}

// ---- routes ---------------------------------------------------------------

/// An IPv4 route as vxmesh writes or deletes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub protocol: Option<u8>,
    pub table: u32,
    pub priority: u32,
    pub tos: u8,
}

fn route(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    let h = &mut m.header;
    h.address_family = AddressFamily::Inet;
    h.destination_prefix_length = r.dst.prefix_len();
    h.tos = r.tos;
    h.table = if r.table < 256 {
        r.table as u8
    } else {
        RouteHeader::RT_TABLE_UNSPEC
    };
    h.protocol = RouteProtocol::from(r.protocol.unwrap_or(3 /* boot */));
    h.scope = if r.via.is_none() && !r.onlink {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    h.kind = RouteType::Unicast;
    if r.onlink {
        h.flags |= RouteFlags::Onlink;
    }
    if r.table >= 256 {
        m.attributes.push(RouteAttribute::Table(r.table));
    }
    if r.dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                r.dst.network(),
            )));
    }
    if let Some(gw) = r.via {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if r.priority != 0 {
        m.attributes.push(RouteAttribute::Priority(r.priority));
    }
    m
}

/// `RTM_NEWROUTE` (send with `NLM_F_CREATE | NLM_F_REPLACE`).
pub fn route_new(r: &Route) -> R {
    R::NewRoute(route(r))
}

/// `RTM_DELROUTE`: matches dst/tos/priority/table, and protocol, gateway and
/// device when given, so only the route meant is removed.
pub fn route_del(r: &Route) -> R {
    let mut m = route(r);
    m.header.scope = RouteScope::from(255 /* RT_SCOPE_NOWHERE: any scope */);
    m.header.kind = RouteType::Unspec;
    m.header.flags = RouteFlags::empty();
    if r.protocol.is_none() {
        m.header.protocol = RouteProtocol::Unspec;
    }
    R::DelRoute(m)
}

/// `RTM_GETROUTE` dump of IPv4 routes (all tables).
pub fn route_dump() -> R {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    R::GetRoute(m)
}

// ---- neighbours and FDB -----------------------------------------------------

/// `RTM_NEWNEIGH` (send with `NLM_F_CREATE | NLM_F_REPLACE`): a permanent ARP
/// entry `ip lladdr mac` on `index`.
pub fn neigh_new(index: u32, ip: Ipv4Addr, mac: Mac) -> R {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    R::NewNeighbour(m)
}

/// `RTM_DELNEIGH` of the ARP entry for `ip` on `index`.
pub fn neigh_del(index: u32, ip: Ipv4Addr) -> R {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = index;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    R::DelNeighbour(m)
}

fn fdb(index: u32, mac: Mac, dst: Option<Ipv4Addr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    // NTF_SELF: the entry belongs to the vxlan device itself, not to a bridge.
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    if let Some(dst) = dst {
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    }
    m
}

/// `RTM_NEWNEIGH` AF_BRIDGE NTF_SELF (send with `NLM_F_CREATE | NLM_F_REPLACE`):
/// the vxlan FDB entry `mac dst ip self permanent`.
pub fn fdb_new(index: u32, mac: Mac, dst: Ipv4Addr) -> R {
    R::NewNeighbour(fdb(index, mac, Some(dst)))
}

/// `RTM_DELNEIGH` AF_BRIDGE NTF_SELF: with `dst`, removes only that remote.
pub fn fdb_del(index: u32, mac: Mac, dst: Option<Ipv4Addr>) -> R {
    R::DelNeighbour(fdb(index, mac, dst))
}

/// `RTM_GETNEIGH` dump of one family (Inet: ARP; Bridge: FDB).
pub fn neigh_dump(family: AddressFamily) -> R {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    R::GetNeighbour(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NetlinkMessage};

    fn bytes(r: R) -> Vec<u8> {
        let mut m = NetlinkMessage::from(r);
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        buf
    }

    #[test]
    fn fdb_entry_has_ntf_self_permanent_lladdr_and_dst() {
        let mac: Mac = "0a:01:c6:12:00:02".parse().unwrap();
        let R::NewNeighbour(m) = fdb_new(7, mac, Ipv4Addr::new(198, 18, 0, 2)) else {
            panic!()
        };
        assert_eq!(m.header.family, AddressFamily::Bridge);
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert!(
            m.attributes
                .contains(&NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()))
        );
        assert!(
            m.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    Ipv4Addr::new(198, 18, 0, 2)
                )))
        );
        // Encodes: family byte 7 (AF_BRIDGE), NTF_SELF 0x02.
        let b = bytes(fdb_new(7, mac, Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(b[16], libc::AF_BRIDGE as u8);
        assert_eq!(b[16 + 10], 0x02);
    }

    #[test]
    fn onlink_route_is_universe_unicast_main_proto() {
        let r = Route {
            dst: "172.18.20.0/24".parse().unwrap(),
            via: Some(Ipv4Addr::new(172, 18, 20, 0)),
            oif: Some(5),
            onlink: true,
            protocol: Some(86),
            table: RT_TABLE_MAIN,
            priority: 0,
            tos: 0,
        };
        let R::NewRoute(m) = route_new(&r) else {
            panic!()
        };
        assert_eq!(m.header.table, 254);
        assert_eq!(u8::from(m.header.protocol), 86);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert_eq!(m.header.kind, RouteType::Unicast);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert!(m.attributes.contains(&RouteAttribute::Oif(5)));
        assert!(
            !m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Priority(_)))
        );
    }

    #[test]
    fn vxlan_sets_nolearning_port_and_link() {
        let l = NewLink {
            name: "vxm-vx100".into(),
            mtu: Some(1450),
            mac: Some("0a:64:c6:12:00:01".parse().unwrap()),
            master: None,
            up: true,
        };
        let v = NewVxlan {
            vni: 100,
            local: Ipv4Addr::new(198, 18, 0, 1),
            underlay: Some(2),
            port: 4789,
            proxy: false,
        };
        let R::NewLink(m) = vxlan_new(&l, &v) else {
            panic!()
        };
        let info = m
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap();
        let NlLinkInfo::Data(InfoData::Vxlan(d)) = &info[1] else {
            panic!()
        };
        assert!(d.contains(&InfoVxlan::Learning(false)));
        assert!(d.contains(&InfoVxlan::Port(4789)));
        assert!(d.contains(&InfoVxlan::Link(2)));
        assert!(!d.iter().any(|a| matches!(a, InfoVxlan::Proxy(_))));
        assert!(m.header.flags.contains(LinkFlags::Up));
        bytes(vxlan_new(&l, &v));
    }
}
