//! What the diff found, object by object: every planned object is `ok`,
//! `missing` or `different` (with what differs), and every object vxmesh
//! owns that the plan does not list is `extra`. The diff derives its changes
//! from these verdicts; `status` and `doctor` render them.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::dataplane::kernel::{ActualFdb, ActualLink, ActualNeigh, ActualRoute};
use crate::dataplane::{AddrSpec, FdbSpec, LinkSpec, NeighSpec, RouteSpec};
use crate::model::Mac;

/// The judgement of one planned object. `D` says what differs (or what the
/// kernel holds instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "kernel", rename_all = "lowercase")]
pub enum Verdict<D> {
    /// In the kernel as planned.
    Ok,
    /// Planned, and nothing of it is in the kernel.
    Missing,
    /// In the kernel, but not as planned.
    Different(D),
}

impl<D> Verdict<D> {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok)
    }
}

/// An object vxmesh owns in the kernel that the plan does not list. The diff
/// deletes it, or lets it vanish with its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Extra<'a> {
    Device(&'a ActualLink),
    Address(&'a AddrSpec),
    Route(&'a ActualRoute),
    Neighbour(&'a ActualNeigh),
    Fdb(&'a ActualFdb),
}

/// A verdict for every planned object, in plan order (the sets in their
/// own order), and the extra objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdicts<'a> {
    pub links: Vec<(&'a LinkSpec, Verdict<Vec<LinkDrift>>)>,
    pub addresses: Vec<(&'a AddrSpec, Verdict<()>)>,
    /// `Different`: every route the kernel has to the destination.
    pub routes: Vec<(&'a RouteSpec, Verdict<Vec<&'a ActualRoute>>)>,
    pub neighbours: Vec<(&'a NeighSpec, Verdict<&'a ActualNeigh>)>,
    /// `Different`: every remote the kernel has for the MAC, in its order.
    pub fdb: Vec<(&'a FdbSpec, Verdict<Vec<&'a ActualFdb>>)>,
    /// `None` when the plan does not ask for forwarding.
    pub ip_forward: Option<Verdict<()>>,
    pub extra: Vec<Extra<'a>>,
}

/// The verdict of `key` in a list sorted by key (a plan's set order).
fn find<'v, K: Ord, V>(list: &'v [(&K, V)], key: &K) -> Option<&'v V> {
    list.binary_search_by(|(k, _)| (*k).cmp(key))
        .ok()
        .map(|i| &list[i].1)
}

impl<'a> Verdicts<'a> {
    /// Nothing missing, different or extra: the diff has no change.
    pub fn all_ok(&self) -> bool {
        self.links.iter().all(|(_, v)| v.is_ok())
            && self.addresses.iter().all(|(_, v)| v.is_ok())
            && self.routes.iter().all(|(_, v)| v.is_ok())
            && self.neighbours.iter().all(|(_, v)| v.is_ok())
            && self.fdb.iter().all(|(_, v)| v.is_ok())
            && self.ip_forward.as_ref().is_none_or(Verdict::is_ok)
            && self.extra.is_empty()
    }

    /// The verdict of the planned device `name`.
    pub fn link(&self, name: &str) -> Option<&Verdict<Vec<LinkDrift>>> {
        self.links
            .iter()
            .find(|(l, _)| l.name == name)
            .map(|(_, v)| v)
    }

    pub fn address(&self, a: &AddrSpec) -> Option<&Verdict<()>> {
        find(&self.addresses, a)
    }

    pub fn route(&self, r: &RouteSpec) -> Option<&Verdict<Vec<&'a ActualRoute>>> {
        find(&self.routes, r)
    }

    pub fn neighbour(&self, n: &NeighSpec) -> Option<&Verdict<&'a ActualNeigh>> {
        find(&self.neighbours, n)
    }

    pub fn fdb_entry(&self, e: &FdbSpec) -> Option<&Verdict<Vec<&'a ActualFdb>>> {
        find(&self.fdb, e)
    }
}

/// One attribute of a device that differs from its plan: the kernel's value
/// (`have`) and the planned one (`want`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "attribute", rename_all = "snake_case")]
pub enum LinkDrift {
    /// Another kind of device (`None`: the kernel reports no kind).
    Kind {
        have: Option<String>,
        want: &'static str,
    },
    /// A vxlan device whose vxlan attributes the kernel does not report.
    NoVxlanAttributes,
    Vni {
        have: u32,
        want: u32,
    },
    Local {
        have: Option<Ipv4Addr>,
        want: Ipv4Addr,
    },
    Port {
        have: u16,
        want: u16,
    },
    /// The vxlan's underlay device: a name, or an index whose device is gone.
    UnderlayDev {
        have: Option<String>,
        have_index: Option<u32>,
        want: Option<String>,
    },
    /// The vxlan learns source addresses (vxmesh wants `nolearning`).
    Learning,
    Proxy {
        have: bool,
        want: bool,
    },
    Down,
    Mtu {
        have: u32,
        want: u32,
    },
    Mac {
        have: Option<Mac>,
        want: Mac,
    },
    Master {
        have: Option<String>,
        want: Option<String>,
    },
    Alias {
        have: Option<String>,
        want: String,
    },
    /// Bridge-port learning of an enslaved device.
    PortLearning {
        have: Option<bool>,
        want: bool,
    },
}

impl LinkDrift {
    /// Set only when the device is created: fixing it means a new device.
    pub fn needs_recreate(&self) -> bool {
        matches!(
            self,
            LinkDrift::Kind { .. }
                | LinkDrift::NoVxlanAttributes
                | LinkDrift::Vni { .. }
                | LinkDrift::Local { .. }
                | LinkDrift::Port { .. }
                | LinkDrift::UnderlayDev { .. }
                | LinkDrift::Learning
                | LinkDrift::Proxy { .. }
        )
    }

    /// The reason logged with the delete of a device that is recreated
    /// (`id 100 -> 200`), for drift that [`Self::needs_recreate`].
    pub fn recreate_reason(&self) -> String {
        let proxy = |on: bool| if on { "proxy" } else { "noproxy" };
        match self {
            LinkDrift::Kind { have, want } => {
                format!(
                    "it is a {}, want a {want}",
                    have.as_deref().unwrap_or("no kind")
                )
            }
            LinkDrift::NoVxlanAttributes => "it is a vxlan, want a vxlan".into(),
            LinkDrift::Vni { have, want } => format!("id {have} -> {want}"),
            LinkDrift::Local { have, want } => format!("local {} -> {want}", or_none(have)),
            LinkDrift::Port { have, want } => format!("dstport {have} -> {want}"),
            LinkDrift::UnderlayDev { want, .. } => format!(
                "dev {} -> {}",
                self.underlay_have().unwrap_or("none".into()),
                want.as_deref().unwrap_or("none")
            ),
            LinkDrift::Learning => "learning -> nolearning".into(),
            LinkDrift::Proxy { have, want } => format!("{} -> {}", proxy(*have), proxy(*want)),
            other => other.to_string(),
        }
    }

    fn underlay_have(&self) -> Option<String> {
        match self {
            LinkDrift::UnderlayDev {
                have, have_index, ..
            } => have.clone().or(have_index.map(|i| format!("#{i}"))),
            _ => None,
        }
    }
}

fn or_none<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("none".into(), |v| v.to_string())
}

fn or_dash<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

/// As `status` shows it: `mtu 1400 (want 1450)`.
impl fmt::Display for LinkDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        match self {
            LinkDrift::Kind { have, want } => write!(
                f,
                "kind {} (want {want})",
                have.as_deref().unwrap_or("device of unknown kind")
            ),
            LinkDrift::NoVxlanAttributes => write!(f, "no vxlan attributes"),
            LinkDrift::Vni { have, want } => write!(f, "vni {have} (want {want})"),
            LinkDrift::Local { have, want } => write!(f, "local {} (want {want})", or_dash(have)),
            LinkDrift::Port { have, want } => write!(f, "dstport {have} (want {want})"),
            LinkDrift::UnderlayDev { want, .. } => write!(
                f,
                "dev {} (want {})",
                self.underlay_have().unwrap_or("-".into()),
                or_dash(want)
            ),
            LinkDrift::Learning => write!(f, "learning (want nolearning)"),
            LinkDrift::Proxy { have, want } => write!(f, "proxy {have} (want {want})"),
            LinkDrift::Down => write!(f, "down (want up)"),
            LinkDrift::Mtu { have, want } => write!(f, "mtu {have} (want {want})"),
            LinkDrift::Mac { have, want } => write!(f, "mac {} (want {want})", or_dash(have)),
            LinkDrift::Master { have, want } => {
                write!(f, "master {} (want {})", or_dash(have), or_dash(want))
            }
            LinkDrift::Alias { have, want } => write!(f, "alias {} (want {want})", or_dash(have)),
            LinkDrift::PortLearning { have, want } => write!(
                f,
                "bridge-port learning {} (want {})",
                have.map_or("-", on),
                on(*want)
            ),
        }
    }
}
