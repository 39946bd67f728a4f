//! One change to the kernel state and the order changes are applied in.
//! A change prints as the `ip`/`bridge` command that would make it: the
//! reconciler's change log.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::dataplane::kernel::{ActualRoute, route_metric};
use crate::dataplane::{AddrSpec, FdbSpec, LinkKind, LinkSpec, NeighSpec, RouteSpec};
use crate::model::{self, Mac};

/// The order changes are applied in. A phase starts when the one before it
/// is done (its requests pipelined), except that the entry phases
/// ([`Phase::is_entry`]) form one ordered stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Phase {
    DeleteLinks,
    /// Sequential, in plan order (a bridge before the VTEP enslaved to it).
    CreateLinks,
    FixLinks,
    PortLearning,
    DeleteAddresses,
    AddAddresses,
    Forwarding,
    DeleteRoutes,
    ReplaceEntries,
    ReplaceRoutes,
    DeleteEntries,
}

impl Phase {
    /// The route, neighbour and FDB phases: they only add, replace or
    /// delete entries on devices that exist, so they go to the kernel as one
    /// ordered stream (it handles requests in order) with no wait between
    /// them.
    pub fn is_entry(self) -> bool {
        matches!(
            self,
            Phase::DeleteRoutes
                | Phase::ReplaceEntries
                | Phase::ReplaceRoutes
                | Phase::DeleteEntries
        )
    }
}

/// In-place fixes of a device's mutable attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkFix {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// `Some(None)`: release from its master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Bring it up.
    pub up: bool,
}

impl LinkFix {
    pub fn is_empty(&self) -> bool {
        *self == LinkFix::default()
    }
}

/// One change to the kernel state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    DeleteLink {
        name: String,
        kind: String,
        reason: String,
    },
    /// Create with mtu, mac, master, alias, up.
    CreateLink {
        link: LinkSpec,
    },
    SetLink {
        name: String,
        fix: LinkFix,
    },
    SetPortLearning {
        dev: String,
        learning: bool,
    },
    DeleteAddress {
        addr: AddrSpec,
    },
    AddAddress {
        addr: AddrSpec,
    },
    SetIpForward {
        on: bool,
    },
    DeleteRoute {
        route: ActualRoute,
    },
    ReplaceNeighbour {
        neigh: NeighSpec,
    },
    ReplaceFdb {
        fdb: FdbSpec,
    },
    ReplaceRoute {
        route: RouteSpec,
    },
    DeleteNeighbour {
        dev: String,
        ip: Ipv4Addr,
    },
    /// With `dst`, only that remote of the MAC goes.
    DeleteFdb {
        dev: String,
        mac: Mac,
        dst: Option<Ipv4Addr>,
    },
}

impl Change {
    pub fn phase(&self) -> Phase {
        match self {
            Change::DeleteLink { .. } => Phase::DeleteLinks,
            Change::CreateLink { .. } => Phase::CreateLinks,
            Change::SetLink { .. } => Phase::FixLinks,
            Change::SetPortLearning { .. } => Phase::PortLearning,
            Change::DeleteAddress { .. } => Phase::DeleteAddresses,
            Change::AddAddress { .. } => Phase::AddAddresses,
            Change::SetIpForward { .. } => Phase::Forwarding,
            Change::DeleteRoute { .. } => Phase::DeleteRoutes,
            Change::ReplaceNeighbour { .. } | Change::ReplaceFdb { .. } => Phase::ReplaceEntries,
            Change::ReplaceRoute { .. } => Phase::ReplaceRoutes,
            Change::DeleteNeighbour { .. } | Change::DeleteFdb { .. } => Phase::DeleteEntries,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::DeleteLink { name, kind, reason } => {
                write!(f, "delete {kind} {name} ({reason})")
            }
            Change::CreateLink { link: l } => {
                match &l.kind {
                    LinkKind::Bridge => write!(f, "create bridge {}", l.name)?,
                    LinkKind::Vxlan(v) => {
                        write!(f, "create vxlan {} id {} local {}", l.name, v.vni, v.local)?;
                        if let Some(d) = &v.underlay_dev {
                            write!(f, " dev {d}")?;
                        }
                        write!(f, " dstport {} nolearning", v.port)?;
                        if v.proxy {
                            write!(f, " proxy")?;
                        }
                    }
                }
                write!(f, " mtu {} address {}", l.mtu, l.mac)?;
                if let Some(m) = &l.master {
                    write!(f, " master {m}")?;
                }
                write!(f, " alias {} up", l.alias)
            }
            Change::SetLink { name, fix } => {
                write!(f, "set link {name}")?;
                if let Some(m) = fix.mtu {
                    write!(f, " mtu {m}")?;
                }
                if let Some(m) = fix.mac {
                    write!(f, " address {m}")?;
                }
                match &fix.master {
                    Some(Some(m)) => write!(f, " master {m}")?,
                    Some(None) => write!(f, " nomaster")?,
                    None => {}
                }
                if let Some(a) = &fix.alias {
                    write!(f, " alias {a}")?;
                }
                if fix.up {
                    write!(f, " up")?;
                }
                Ok(())
            }
            Change::SetPortLearning { dev, learning } => write!(
                f,
                "set bridge-port learning {} on {dev}",
                if *learning { "on" } else { "off" }
            ),
            Change::DeleteAddress { addr } => {
                write!(f, "delete address {} dev {}", addr.addr, addr.dev)
            }
            Change::AddAddress { addr } => write!(f, "add address {} dev {}", addr.addr, addr.dev),
            Change::SetIpForward { on } => {
                write!(f, "set net.ipv4.ip_forward={}", u8::from(*on))
            }
            Change::DeleteRoute { route: r } => {
                write!(f, "delete route {}", r.dst)?;
                if let Some(gw) = r.via {
                    write!(f, " via {gw}")?;
                }
                match (&r.dev, r.oif) {
                    (Some(d), _) => write!(f, " dev {d}")?,
                    (None, Some(i)) => write!(f, " dev #{i}")?,
                    _ => {}
                }
                write!(f, " proto {} metric {}", model::ROUTE_PROTOCOL, r.priority)
            }
            Change::ReplaceNeighbour { neigh: n } => write!(
                f,
                "replace neigh {} lladdr {} dev {} nud permanent",
                n.ip, n.mac, n.dev
            ),
            Change::ReplaceFdb { fdb: e } => {
                write!(f, "replace fdb {} dst {} dev {}", e.mac, e.dst, e.dev)
            }
            Change::ReplaceRoute { route: r } => write!(
                f,
                "replace route {} via {} dev {} onlink proto {} metric {}",
                r.dst,
                r.via,
                r.dev,
                model::ROUTE_PROTOCOL,
                route_metric(r.dst)
            ),
            Change::DeleteNeighbour { dev, ip } => write!(f, "delete neigh {ip} dev {dev}"),
            Change::DeleteFdb { dev, mac, dst } => {
                write!(f, "delete fdb {mac}")?;
                if let Some(d) = dst {
                    write!(f, " dst {d}")?;
                }
                write!(f, " dev {dev}")
            }
        }
    }
}
