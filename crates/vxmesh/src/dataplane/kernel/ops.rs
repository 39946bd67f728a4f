//! Generic link/address/route operations (attach, lab, CNI). Each is one or
//! two requests; errors name the device, the peer and the namespace.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::RouteNetlinkMessage as R;
use serde::Serialize;

use super::actual::{ActualLink, link_rows, parse_link};
use super::{KernelError, Netlink, NetlinkError, msg};
use crate::dataplane::netns::Netns;
use crate::model::Mac;

/// One device, as `ip link` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    /// `IFLA_INFO_KIND` ("bridge", "vxlan", "veth", ...); `None` for physical
    /// devices and loopback.
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: Option<Mac>,
    /// Index of the master (bridge) device.
    pub master: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Operational state ("up", "down", "unknown", "lowerlayerdown", ...).
    pub oper: String,
    pub alias: Option<String>,
}

impl From<ActualLink> for LinkInfo {
    fn from(r: ActualLink) -> Self {
        LinkInfo {
            name: r.name,
            index: r.index,
            kind: r.kind,
            mtu: r.mtu,
            mac: r.mac,
            master: r.master_index,
            up: r.up,
            oper: r.oper,
            alias: r.alias,
        }
    }
}

/// What [`Netlink::set_link`] changes; `None`/`false` leaves it alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkOptions {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
    /// Enslave to this device (a bridge).
    pub master: Option<String>,
    /// Release from its master (ignored when `master` is set).
    pub nomaster: bool,
    pub alias: Option<String>,
}

/// An interface with its IPv4 addresses and main-table routes through it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceFacts {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub addresses: Vec<Ipv4Net>,
    /// (destination, gateway) of every main-table IPv4 route out of it.
    pub routes: Vec<(Ipv4Net, Option<Ipv4Addr>)>,
}

impl Netlink {
    fn fail(&self, what: String, kernel: KernelError) -> NetlinkError {
        NetlinkError::Request {
            what,
            namespace: self.namespace().to_string(),
            kernel,
        }
    }

    /// A failed dump of `what` ("addresses", "routes", ...).
    pub(crate) fn dump_failed(&self, what: &'static str, kernel: KernelError) -> NetlinkError {
        NetlinkError::Dump {
            what,
            namespace: self.namespace().to_string(),
            kernel,
        }
    }

    /// Dump with `request`; a failure names `what` ("addresses", "routes", ...).
    pub(crate) async fn dump_rows(
        &self,
        request: R,
        what: &'static str,
    ) -> Result<Vec<R>, NetlinkError> {
        self.query(request, true)
            .await
            .map_err(|e| self.dump_failed(what, e))
    }

    /// Every device of the namespace as dumped (a failure names "links").
    pub(crate) async fn dump_links(&self) -> Result<Vec<ActualLink>, NetlinkError> {
        link_rows(self)
            .await
            .map_err(|e| self.dump_failed("links", e))
    }

    /// Index of device `name`, `None` if there is no such device.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        match self.query(msg::link_get(name), false).await {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
                R::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.fail(format!("look up device {name}"), e)),
        }
    }

    async fn require_index(&self, name: &str, purpose: &str) -> Result<u32, NetlinkError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetlinkError::NeedsDevice {
                purpose: purpose.to_string(),
                device: name.to_string(),
                namespace: self.namespace().to_string(),
            })
    }

    /// One device by name, `None` if missing.
    pub async fn get_link(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        match self.query(msg::link_get(name), false).await {
            Ok(msgs) => Ok(msgs
                .iter()
                .find_map(|m| match m {
                    R::NewLink(l) => parse_link(l),
                    _ => None,
                })
                .map(LinkInfo::from)),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.fail(format!("look up device {name}"), e)),
        }
    }

    /// Every device of the namespace.
    pub async fn list_links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        Ok(self
            .dump_links()
            .await?
            .into_iter()
            .map(LinkInfo::from)
            .collect())
    }

    /// Create a veth pair `name` <-> `peer_name`. With `peer_ns`, the peer is
    /// born directly inside that namespace (`IFLA_NET_NS_FD` in the peer
    /// info): nothing named `peer_name` ever appears here. Both ends get `mtu`
    /// and stay down.
    pub async fn create_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_ns: Option<&Netns>,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        let fd = peer_ns.map(|ns| ns.fd().as_raw_fd());
        let req = msg::veth_new(name, peer_name, fd, Some(mtu));
        // `peer_ns` stays borrowed (its fd open) until the kernel answered.
        let res = self.ack(req, NLM_F_CREATE | NLM_F_EXCL).await;
        res.map_err(|e| {
            let peer_where = match peer_ns {
                Some(ns) => format!("namespace {}", ns.name()),
                None => "the same namespace".into(),
            };
            self.fail(
                format!("create veth {name} (peer {peer_name} in {peer_where})"),
                e,
            )
        })
    }

    /// Create a bridge (down). `mtu` is set so that it sticks: the kernel
    /// stops auto-adjusting a bridge's MTU to its ports' only once the MTU was
    /// changed after creation, so the bridge is created one byte off and then
    /// set (together with the alias, which creation ignores).
    pub async fn create_bridge(
        &self,
        name: &str,
        mtu: u32,
        mac: Option<Mac>,
        alias: Option<&str>,
    ) -> Result<(), NetlinkError> {
        self.create_bridge_msgs(name, mtu, mac, None, false, alias)
            .await
            .map(|_| ())
    }

    /// Create a bridge; returns the number of requests sent.
    pub(crate) async fn create_bridge_msgs(
        &self,
        name: &str,
        mtu: u32,
        mac: Option<Mac>,
        master: Option<u32>,
        up: bool,
        alias: Option<&str>,
    ) -> Result<usize, NetlinkError> {
        let first_mtu = if mtu > 68 { mtu - 1 } else { mtu + 1 };
        let l = msg::NewLink {
            name: name.to_string(),
            mtu: Some(first_mtu),
            mac,
            master,
            up,
        };
        self.ack(msg::bridge_new(&l), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|e| self.fail(format!("create bridge {name}"), e))?;
        let set = msg::SetLink {
            mtu: Some(mtu),
            alias: alias.map(str::to_string),
            ..Default::default()
        };
        self.ack(msg::link_set(None, name, &set), 0)
            .await
            .map_err(|e| self.fail(format!("set mtu {mtu} and alias of new bridge {name}"), e))?;
        Ok(2)
    }

    /// Change a device: up/down, mtu, mac, master, alias (one request).
    pub async fn set_link(&self, name: &str, opts: LinkOptions) -> Result<(), NetlinkError> {
        let master = match (&opts.master, opts.nomaster) {
            (Some(m), _) => Some(
                self.require_index(m, &format!("enslave {name} to {m}"))
                    .await?,
            ),
            (None, true) => Some(0),
            (None, false) => None,
        };
        let set = msg::SetLink {
            mtu: opts.mtu,
            mac: opts.mac,
            master,
            alias: opts.alias.clone(),
            up: opts.up,
            ..Default::default()
        };
        self.ack(msg::link_set(None, name, &set), 0)
            .await
            .map_err(|e| self.fail(format!("set {} on device {name}", describe(&opts)), e))
    }

    /// Rename a device (it must be down).
    pub async fn rename_link(&self, name: &str, new_name: &str) -> Result<(), NetlinkError> {
        let index = self
            .require_index(name, &format!("rename {name} to {new_name}"))
            .await?;
        let set = msg::SetLink {
            new_name: Some(new_name.to_string()),
            ..Default::default()
        };
        self.ack(msg::link_set(Some(index), name, &set), 0)
            .await
            .map_err(|e| self.fail(format!("rename device {name} to {new_name}"), e))
    }

    /// Move a device into another namespace (it keeps its name there).
    pub async fn move_link_to_ns(&self, name: &str, ns: &Netns) -> Result<(), NetlinkError> {
        let set = msg::SetLink {
            netns_fd: Some(ns.fd().as_raw_fd()),
            ..Default::default()
        };
        self.ack(msg::link_set(None, name, &set), 0)
            .await
            .map_err(|e| self.fail(format!("move device {name} to namespace {}", ns.name()), e))
    }

    /// Delete a device; a missing device is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        match self.ack(msg::link_del(name), 0).await {
            Ok(()) => Ok(()),
            Err(e) if e.is(libc::ENODEV) => Ok(()),
            Err(e) => Err(self.fail(format!("delete device {name}"), e)),
        }
    }

    /// Add an IPv4 address; an existing identical address is not an error.
    pub async fn add_address(&self, dev: &str, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let what = format!("add address {addr} to {dev}");
        let index = self.require_index(dev, &what).await?;
        match self
            .ack(msg::addr_new(index, addr), NLM_F_CREATE | NLM_F_EXCL)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is(libc::EEXIST) => Ok(()),
            Err(e) => Err(self.fail(what, e)),
        }
    }

    /// `ip route replace DST [via GW] dev DEV [onlink] [proto P]` in the main
    /// table (proto defaults to "boot", like `ip route`).
    pub async fn add_route(
        &self,
        dst: Ipv4Net,
        via: Option<Ipv4Addr>,
        dev: &str,
        onlink: bool,
        protocol: Option<u8>,
    ) -> Result<(), NetlinkError> {
        let what = match via {
            Some(gw) => format!("add route {dst} via {gw} dev {dev}"),
            None => format!("add route {dst} dev {dev}"),
        };
        let index = self.require_index(dev, &what).await?;
        let r = msg::Route {
            dst: dst.trunc(),
            via,
            oif: Some(index),
            onlink,
            protocol,
            table: msg::RT_TABLE_MAIN,
            priority: 0,
            tos: 0,
        };
        self.ack(msg::route_new(&r), NLM_F_CREATE | NLM_F_REPLACE)
            .await
            .map_err(|e| self.fail(what, e))
    }

    /// Bridge-port `learning` of a device enslaved to a bridge.
    pub async fn set_bridge_port_learning(
        &self,
        dev: &str,
        learning: bool,
    ) -> Result<(), NetlinkError> {
        self.ack(msg::port_learning(dev, learning), 0)
            .await
            .map_err(|e| {
                self.fail(
                    format!(
                        "set bridge-port learning {} on {dev}",
                        if learning { "on" } else { "off" }
                    ),
                    e,
                )
            })
    }

    /// A device with its IPv4 addresses and main-table routes (CNI CHECK).
    pub async fn interface_facts(
        &self,
        name: &str,
    ) -> Result<Option<InterfaceFacts>, NetlinkError> {
        let Some(link) = self.get_link(name).await? else {
            return Ok(None);
        };
        let (addrs, routes) = futures::try_join!(
            self.dump_rows(msg::addr_dump(), "addresses"),
            self.dump_rows(msg::route_dump(), "routes"),
        )?;
        let mut facts = InterfaceFacts {
            name: link.name,
            index: link.index,
            up: link.up,
            mtu: link.mtu,
            mac: link.mac,
            addresses: Vec::new(),
            routes: Vec::new(),
        };
        use netlink_packet_route::address::AddressAttribute as A;
        use netlink_packet_route::route::{RouteAddress, RouteAttribute as RA};
        for m in &addrs {
            let R::NewAddress(a) = m else { continue };
            if a.header.index != facts.index {
                continue;
            }
            for at in &a.attributes {
                if let A::Local(std::net::IpAddr::V4(ip)) = at
                    && let Ok(n) = Ipv4Net::new(*ip, a.header.prefix_len)
                {
                    facts.addresses.push(n);
                }
            }
        }
        for m in &routes {
            let R::NewRoute(r) = m else { continue };
            let mut table = r.header.table as u32;
            let mut dst = Ipv4Net::new(Ipv4Addr::UNSPECIFIED, r.header.destination_prefix_length)
                .unwrap_or_default();
            let mut gw = None;
            let mut oif = None;
            for at in &r.attributes {
                match at {
                    RA::Table(t) => table = *t,
                    RA::Destination(RouteAddress::Inet(ip)) => {
                        dst = Ipv4Net::new(*ip, r.header.destination_prefix_length)
                            .unwrap_or_default()
                    }
                    RA::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    RA::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if table == msg::RT_TABLE_MAIN && oif == Some(facts.index) {
                facts.routes.push((dst, gw));
            }
        }
        Ok(Some(facts))
    }

    /// Fail unless `name` exists (for callers that want a clear message).
    pub async fn expect_link(&self, name: &str) -> Result<LinkInfo, NetlinkError> {
        match self.get_link(name).await? {
            Some(l) => Ok(l),
            None => Err(NetlinkError::NoDevice {
                device: name.to_string(),
                namespace: self.namespace().to_string(),
            }),
        }
    }
}

fn describe(o: &LinkOptions) -> String {
    let mut parts = Vec::new();
    if let Some(up) = o.up {
        parts.push(if up {
            "up".to_string()
        } else {
            "down".to_string()
        });
    }
    if let Some(m) = o.mtu {
        parts.push(format!("mtu {m}"));
    }
    if let Some(m) = o.mac {
        parts.push(format!("address {m}"));
    }
    if let Some(m) = &o.master {
        parts.push(format!("master {m}"));
    } else if o.nomaster {
        parts.push("nomaster".into());
    }
    if let Some(a) = &o.alias {
        parts.push(format!("alias {a:?}"));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(" ")
    }
}
