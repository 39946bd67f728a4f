//! The actual state: what vxmesh owns on a node, read with one dump per
//! object type (links, IPv4 addresses, IPv4 routes, ARP, FDB) plus the
//! ip_forward sysctl.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoPortData, InfoVxlan, LinkAttribute, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage as R};
use serde::Serialize;

use super::{ATTACHED_ALIAS_PREFIX, KernelError, MANAGED_ALIAS_PREFIX, Netlink, NetlinkError, msg};
use crate::dataplane::{AddrSpec, ROUTE_SCOPE_UNIVERSE, ROUTE_TYPE_UNICAST, RouteSpec};
use crate::model::{self, Mac};

/// Who a `vxm-` device belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Ownership {
    /// Alias `vxmesh:net:...`: the reconciler creates, fixes and deletes it.
    Managed,
    /// Alias `vxmesh:veth:...`: a container veth made by attach; the
    /// reconciler never touches it.
    Attached,
    /// No vxmesh alias: somebody else's device; never touched.
    Foreign,
}

/// The vxlan attributes of a device, as the kernel reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActualVxlan {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    /// Underlay device (`dev`): index and, if it still exists, name.
    pub link_index: Option<u32>,
    pub link: Option<String>,
    pub port: u16,
    pub learning: bool,
    pub proxy: bool,
}

/// One `vxm-` device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActualLink {
    pub name: String,
    pub index: u32,
    /// `IFLA_INFO_KIND` ("bridge", "vxlan", "veth", ...), if any.
    pub kind: Option<String>,
    pub vxlan: Option<ActualVxlan>,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub master: Option<String>,
    pub master_index: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operational state ("up", "down", "unknown", ...).
    pub oper: String,
    pub alias: Option<String>,
    /// Bridge-port `learning`, when the device is a bridge port.
    pub port_learning: Option<bool>,
}

impl ActualLink {
    pub fn ownership(&self) -> Ownership {
        ownership(&self.name, self.alias.as_deref())
    }

    pub fn kind_name(&self) -> &str {
        self.kind.as_deref().unwrap_or("device of unknown kind")
    }
}

pub(crate) fn ownership(name: &str, alias: Option<&str>) -> Ownership {
    match alias {
        _ if !name.starts_with(model::DEVICE_PREFIX) => Ownership::Foreign,
        Some(a) if a.starts_with(MANAGED_ALIAS_PREFIX) => Ownership::Managed,
        Some(a) if a.starts_with(ATTACHED_ALIAS_PREFIX) => Ownership::Attached,
        _ => Ownership::Foreign,
    }
}

/// An IPv4 route with protocol [`model::ROUTE_PROTOCOL`] in the main table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActualRoute {
    pub dst: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    /// Output device (name if known).
    pub dev: Option<String>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub table: u32,
    pub priority: u32,
    pub tos: u8,
    /// `RT_SCOPE_*` (0 = universe).
    pub scope: u8,
    /// `RTN_*` (1 = unicast).
    pub kind: u8,
}

impl ActualRoute {
    /// The route the kernel holds once vxmesh has written `spec` (through
    /// the device of index `oif`, when known): main table, the shape
    /// [`Self::is_vxmesh_shape`] accepts.
    pub fn written(spec: &RouteSpec, oif: Option<u32>) -> ActualRoute {
        ActualRoute {
            dst: spec.dst,
            via: Some(spec.via),
            dev: Some(spec.dev.clone()),
            oif,
            onlink: true,
            table: msg::RT_TABLE_MAIN,
            priority: super::route_metric(spec.dst),
            tos: 0,
            scope: ROUTE_SCOPE_UNIVERSE,
            kind: ROUTE_TYPE_UNICAST,
        }
    }

    /// `dst via gw dev DEV onlink metric route_metric(dst)`, universe,
    /// unicast: the shape vxmesh writes.
    pub fn is_vxmesh_shape(&self) -> bool {
        self.onlink
            && self.scope == ROUTE_SCOPE_UNIVERSE
            && self.kind == ROUTE_TYPE_UNICAST
            && self.has_vxmesh_key()
    }

    /// Same (tos, metric) key as vxmesh's route to `dst`: a replace hits it.
    pub fn has_vxmesh_key(&self) -> bool {
        self.tos == 0 && self.priority == super::route_metric(self.dst)
    }
}

/// An IPv4 neighbour on a managed device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActualNeigh {
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    /// `NUD_PERMANENT`: only these are vxmesh's.
    pub permanent: bool,
}

/// An `NTF_SELF` FDB entry (one remote) on a managed vxlan device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActualFdb {
    pub dev: String,
    pub mac: Mac,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

/// Everything vxmesh owns on a node (see the module docs of `kernel`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActualState {
    /// Every device whose name starts with `vxm-` (managed, attached and
    /// foreign: the diff needs to see the foreign ones to refuse them).
    pub links: Vec<ActualLink>,
    /// IPv4 addresses on managed devices.
    pub addresses: Vec<AddrSpec>,
    /// Main-table IPv4 routes with protocol 86.
    pub routes: Vec<ActualRoute>,
    /// IPv4 neighbours on managed vxlan devices (all states; `permanent`
    /// marks ours). Neighbours on bridges (containers' ARP) are not vxmesh's.
    pub neighbours: Vec<ActualNeigh>,
    /// `NTF_SELF` FDB entries on managed vxlan devices, in dump order (the
    /// kernel's remote-list order per MAC).
    pub fdb: Vec<ActualFdb>,
    pub ip_forward: bool,
}

impl ActualState {
    pub fn link(&self, name: &str) -> Option<&ActualLink> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn managed_links(&self) -> impl Iterator<Item = &ActualLink> {
        self.links
            .iter()
            .filter(|l| l.ownership() == Ownership::Managed)
    }
}

fn mac_of(b: &[u8]) -> Option<Mac> {
    <[u8; 6]>::try_from(b).ok().map(Mac)
}

/// A parsed `RTM_NEWLINK` (any device). Names of other devices (`master`,
/// the vxlan's `link`) are left for the caller to resolve from the indexes.
pub(crate) fn parse_link(m: &LinkMessage) -> Option<ActualLink> {
    let mut row = ActualLink {
        name: String::new(),
        index: m.header.index,
        kind: None,
        vxlan: None,
        mtu: 0,
        mac: None,
        master: None,
        master_index: None,
        up: m.header.flags.contains(LinkFlags::Up),
        oper: "unknown".into(),
        alias: None,
        port_learning: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => row.name = n.clone(),
            LinkAttribute::Mtu(v) => row.mtu = *v,
            LinkAttribute::Address(b) => row.mac = mac_of(b),
            LinkAttribute::Controller(i) if *i != 0 => row.master_index = Some(*i),
            LinkAttribute::IfAlias(s) if !s.is_empty() => row.alias = Some(s.clone()),
            LinkAttribute::OperState(s) => row.oper = s.to_string().to_lowercase(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => row.kind = Some(k.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(v)) => row.vxlan = Some(parse_vxlan(v)),
                        NlLinkInfo::PortData(InfoPortData::BridgePort(p)) => {
                            row.port_learning = p.iter().find_map(|x| match x {
                                InfoBridgePort::Learning(b) => Some(*b),
                                _ => None,
                            })
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (!row.name.is_empty()).then_some(row)
}

fn parse_vxlan(attrs: &[InfoVxlan]) -> ActualVxlan {
    let mut v = ActualVxlan {
        vni: 0,
        local: None,
        link_index: None,
        link: None,
        port: 0,
        learning: true,
        proxy: false,
    };
    for a in attrs {
        match a {
            InfoVxlan::Id(i) => v.vni = *i,
            InfoVxlan::Local(ip) if !ip.is_unspecified() => v.local = Some(*ip),
            InfoVxlan::Link(i) if *i != 0 => v.link_index = Some(*i),
            InfoVxlan::Port(p) => v.port = *p,
            InfoVxlan::Learning(b) => v.learning = *b,
            InfoVxlan::Proxy(b) => v.proxy = *b,
            _ => {}
        }
    }
    v
}

fn ipv4_of_neigh(a: &NeighbourAddress) -> Option<Ipv4Addr> {
    match a {
        NeighbourAddress::Inet(ip) => Some(*ip),
        NeighbourAddress::Other(b) if b.len() == 4 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        _ => None,
    }
}

/// Index → name of every device, and the parsed rows.
pub(crate) async fn link_rows(nl: &Netlink) -> Result<Vec<ActualLink>, KernelError> {
    let msgs = nl.query(msg::link_dump(), true).await?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            R::NewLink(l) => parse_link(l),
            _ => None,
        })
        .collect())
}

impl Netlink {
    /// Read everything vxmesh owns in this namespace: five dumps (links,
    /// addresses, routes, ARP, FDB) and one sysctl read.
    ///
    /// The ARP and FDB dumps only while a managed VTEP exists (the only
    /// devices whose entries are vxmesh's): the kernel keeps the ARP
    /// entries of every namespace in one table and a dump walks all of
    /// them, so on a machine holding many namespaces (a lab of 250 hosts:
    /// 125 000 entries, 16 ms of kernel time per dump) a starting node,
    /// which has no VTEP yet, would pay for every other node's entries.
    pub async fn dump(&self) -> Result<ActualState, NetlinkError> {
        let (rows, addrs, routes) = futures::try_join!(
            self.dump_links(),
            self.dump_rows(msg::addr_dump(), "addresses"),
            self.dump_rows(msg::route_dump(), "routes"),
        )?;
        let (neighs, fdbs) = if rows.iter().any(holds_entries) {
            futures::try_join!(
                self.dump_rows(msg::neigh_dump(AddressFamily::Inet), "neighbours"),
                self.dump_rows(msg::neigh_dump(AddressFamily::Bridge), "FDB entries"),
            )?
        } else {
            (Vec::new(), Vec::new())
        };
        let ip_forward = self
            .run_in_ns(|| Ok::<_, NetlinkError>(crate::dataplane::sysctl::ip_forward()))?
            .map_err(|sysctl| NetlinkError::Sysctl {
                what: "read net.ipv4.ip_forward",
                namespace: self.namespace().to_string(),
                sysctl,
            })?;
        Ok(assemble(rows, &addrs, &routes, &neighs, &fdbs, ip_forward))
    }
}

/// IPv4 routes with protocol 86, any table.
pub(crate) fn routes_of(routes: &[R], names: &HashMap<u32, String>) -> Vec<ActualRoute> {
    let mut out = Vec::new();
    for m in routes {
        let R::NewRoute(r) = m else { continue };
        if u8::from(r.header.protocol) != model::ROUTE_PROTOCOL
            || r.header.address_family != AddressFamily::Inet
        {
            continue;
        }
        let mut route = ActualRoute {
            dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, r.header.destination_prefix_length)
                .unwrap_or_default(),
            via: None,
            dev: None,
            oif: None,
            onlink: r.header.flags.contains(RouteFlags::Onlink),
            table: r.header.table as u32,
            priority: 0,
            tos: r.header.tos,
            scope: u8::from(r.header.scope),
            kind: u8::from(r.header.kind),
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    route.dst =
                        Ipv4Net::new(*ip, r.header.destination_prefix_length).unwrap_or_default()
                }
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.via = Some(*ip),
                RouteAttribute::Oif(i) => {
                    route.oif = Some(*i);
                    route.dev = names.get(i).cloned();
                }
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Priority(p) => route.priority = *p,
                _ => {}
            }
        }
        out.push(route);
    }
    out
}

/// Whether vxmesh keeps ARP and FDB entries on `link`: a managed VTEP.
fn holds_entries(link: &ActualLink) -> bool {
    link.name.starts_with(model::DEVICE_PREFIX)
        && link.ownership() == Ownership::Managed
        && link.kind.as_deref() == Some("vxlan")
}

fn assemble(
    rows: Vec<ActualLink>,
    addrs: &[R],
    routes: &[R],
    neighs: &[R],
    fdbs: &[R],
    ip_forward: bool,
) -> ActualState {
    let names: HashMap<u32, String> = rows.iter().map(|r| (r.index, r.name.clone())).collect();
    let mut st = ActualState {
        ip_forward,
        ..Default::default()
    };
    // Devices whose objects are vxmesh's: managed ones (addresses); ARP and
    // FDB entries only on managed vxlans.
    let mut managed: HashMap<u32, (String, bool)> = HashMap::new();
    for mut link in rows {
        if !link.name.starts_with(model::DEVICE_PREFIX) {
            continue;
        }
        if let Some(v) = link.vxlan.as_mut() {
            v.link = v.link_index.and_then(|i| names.get(&i).cloned());
        }
        link.master = link.master_index.and_then(|i| names.get(&i).cloned());
        if link.ownership() == Ownership::Managed {
            managed.insert(link.index, (link.name.clone(), holds_entries(&link)));
        }
        st.links.push(link);
    }
    for m in addrs {
        let R::NewAddress(a) = m else { continue };
        let Some((dev, _)) = managed.get(&a.header.index) else {
            continue;
        };
        let ip = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
        if let Some(ip) = ip
            && let Ok(net) = Ipv4Net::new(ip, a.header.prefix_len)
        {
            st.addresses.push(AddrSpec {
                dev: dev.clone(),
                addr: net,
            });
        }
    }
    st.routes = routes_of(routes, &names)
        .into_iter()
        .filter(|r| r.table == msg::RT_TABLE_MAIN)
        .collect();
    for m in neighs {
        let R::NewNeighbour(n) = m else { continue };
        if n.header.family != AddressFamily::Inet {
            continue;
        }
        let Some((dev, true)) = managed.get(&n.header.ifindex) else {
            continue;
        };
        let (ip, mac, permanent) = neigh_fields(n);
        if let Some(ip) = ip {
            st.neighbours.push(ActualNeigh {
                dev: dev.clone(),
                ip,
                mac,
                permanent,
            });
        }
    }
    for m in fdbs {
        let R::NewNeighbour(n) = m else { continue };
        if n.header.family != AddressFamily::Bridge || !n.header.flags.contains(NeighbourFlags::Own)
        {
            continue;
        }
        let Some((dev, true)) = managed.get(&n.header.ifindex) else {
            continue;
        };
        let (dst, mac, permanent) = neigh_fields(n);
        if let Some(mac) = mac {
            st.fdb.push(ActualFdb {
                dev: dev.clone(),
                mac,
                dst,
                permanent,
            });
        }
    }
    st
}

/// Destination, link-layer address and permanence of a neighbour/FDB message.
/// The state is a bit set: a permanent entry may carry other bits too
/// (e.g. NUD_NOARP on entries written by other tools), so test the bit.
fn neigh_fields(
    n: &netlink_packet_route::neighbour::NeighbourMessage,
) -> (Option<Ipv4Addr>, Option<Mac>, bool) {
    const NUD_PERMANENT: u16 = 0x80;
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(d) => ip = ipv4_of_neigh(d),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
            _ => {}
        }
    }
    (ip, mac, u16::from(n.header.state) & NUD_PERMANENT != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_needs_prefix_and_alias() {
        assert_eq!(
            ownership("vxm-br0", Some("vxmesh:net:demo")),
            Ownership::Managed
        );
        assert_eq!(
            ownership("vxm-0123456789", Some("vxmesh:veth:demo:eth0:c1")),
            Ownership::Attached
        );
        assert_eq!(ownership("vxm-br0", None), Ownership::Foreign);
        assert_eq!(ownership("vxm-br0", Some("mine")), Ownership::Foreign);
        assert_eq!(
            ownership("br0", Some("vxmesh:net:demo")),
            Ownership::Foreign
        );
    }

    fn link(name: &str, kind: &str, alias: Option<&str>) -> ActualLink {
        ActualLink {
            name: name.into(),
            index: 7,
            kind: Some(kind.into()),
            vxlan: None,
            mtu: 1450,
            mac: None,
            master: None,
            master_index: None,
            up: true,
            oper: "up".into(),
            alias: alias.map(Into::into),
            port_learning: None,
        }
    }

    /// ARP and FDB entries are read only where vxmesh keeps them: on a
    /// managed VTEP. A node with none (a fresh start) skips both dumps.
    #[test]
    fn only_a_managed_vtep_holds_entries() {
        let managed = Some("vxmesh:net:demo");
        assert!(holds_entries(&link("vxm-vx100", "vxlan", managed)));
        assert!(!holds_entries(&link("vxm-br0", "bridge", managed)));
        assert!(!holds_entries(&link("vxm-vx100", "vxlan", None)));
        assert!(!holds_entries(&link("vx100", "vxlan", managed)));
        assert!(!holds_entries(&link(
            "vxm-0123456789",
            "veth",
            Some("vxmesh:veth:demo:eth0:c1")
        )));
    }
}
