//! Desired vs actual: the minimal list of changes that makes the kernel match
//! a [`NodePlan`]. Pure (no I/O), so every case is unit-tested without root.
//!
//! Rules:
//! - A planned device name held by a device vxmesh does not manage (no
//!   `vxmesh:net:` alias) is an error: vxmesh never touches it.
//! - A managed device of the wrong kind, or a vxlan whose creation-time
//!   attributes differ (VNI, local, dstport, underlay dev, learning, proxy),
//!   is deleted and recreated; mtu/mac/master/alias/down drift is fixed in
//!   place.
//! - Managed devices not in the plan are deleted; so are addresses, routes
//!   (protocol 86), permanent neighbours and FDB entries on managed devices
//!   that the plan does not list. Objects on a device that is deleted vanish
//!   with it and get no change of their own.
//! - `ip_forward` is only ever turned on, never off (other software may need
//!   it).
//! - The result is sorted by [`Phase`], the order [`crate::dataplane::kernel::Netlink::apply`]
//!   runs them in: neighbour and FDB entries before the onlink routes that
//!   need them, stale entries last.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::dataplane::kernel::{
    ActualFdb, ActualLink, ActualRoute, ActualState, MANAGED_ALIAS_PREFIX, Ownership, route_metric,
};
use crate::dataplane::{AddrSpec, FdbSpec, LinkKind, LinkSpec, NeighSpec, NodePlan, RouteSpec};
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
    fn is_empty(&self) -> bool {
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

/// A `vxm-` device the plan needs but vxmesh does not manage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignDevice {
    pub name: String,
    pub kind: String,
    pub alias: Option<String>,
}

impl fmt::Display for ForeignDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {} ({}", self.name, self.kind)?;
        if let Some(a) = &self.alias {
            write!(f, ", alias {a:?}")?;
        }
        write!(
            f,
            ") is not created by vxmesh; rename or delete it yourself"
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Foreign(Vec<ForeignDevice>),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
}

/// The plan must only name devices vxmesh can recognise afterwards, or the
/// next diff would not be empty.
fn validate(plan: &NodePlan) -> Result<(), DiffError> {
    let mut names = HashSet::new();
    for l in &plan.links {
        if !l.name.starts_with(model::DEVICE_PREFIX) || l.name.len() > 15 {
            return Err(DiffError::InvalidPlan(format!(
                "device name {:?} must start with {:?} and have at most 15 characters",
                l.name,
                model::DEVICE_PREFIX
            )));
        }
        if !l.alias.starts_with(MANAGED_ALIAS_PREFIX) {
            return Err(DiffError::InvalidPlan(format!(
                "device {} has alias {:?}, which does not start with {MANAGED_ALIAS_PREFIX:?}",
                l.name, l.alias
            )));
        }
        if !names.insert(l.name.as_str()) {
            return Err(DiffError::InvalidPlan(format!(
                "device {} is planned twice",
                l.name
            )));
        }
    }
    let devs = plan
        .addresses
        .iter()
        .map(|a| (&a.dev, "address"))
        .chain(plan.routes.iter().map(|r| (&r.dev, "route")));
    for (dev, what) in devs {
        if !names.contains(dev.as_str()) {
            return Err(DiffError::InvalidPlan(format!(
                "a planned {what} is on device {dev}, which is not a planned device"
            )));
        }
    }
    // ARP and FDB entries are only vxmesh's on its vxlan devices.
    let vteps: HashSet<&str> = plan
        .links
        .iter()
        .filter(|l| matches!(l.kind, LinkKind::Vxlan(_)))
        .map(|l| l.name.as_str())
        .collect();
    let entries = plan
        .neighbours
        .iter()
        .map(|n| (&n.dev, "neighbour"))
        .chain(plan.fdb.iter().map(|e| (&e.dev, "FDB entry")));
    for (dev, what) in entries {
        if !vteps.contains(dev.as_str()) {
            return Err(DiffError::InvalidPlan(format!(
                "a planned {what} is on device {dev}, which is not a planned vxlan device"
            )));
        }
    }
    let mut keys = HashSet::new();
    for r in &plan.routes {
        if !keys.insert(r.dst) {
            return Err(DiffError::InvalidPlan(format!(
                "route {} is planned twice",
                r.dst
            )));
        }
    }
    let mut keys = HashSet::new();
    for n in &plan.neighbours {
        if !keys.insert((&n.dev, n.ip)) {
            return Err(DiffError::InvalidPlan(format!(
                "neighbour {} on {} is planned twice",
                n.ip, n.dev
            )));
        }
    }
    let mut keys = HashSet::new();
    for e in &plan.fdb {
        if !keys.insert((&e.dev, e.mac)) {
            return Err(DiffError::InvalidPlan(format!(
                "FDB entry {} on {} is planned twice",
                e.mac, e.dev
            )));
        }
    }
    Ok(())
}

/// A device vxmesh created but could not label: the kernel ignores the alias
/// at creation, so it is set by a second request, and a crash in between
/// leaves a `vxm-` device without alias. It is recognised by its kind and its
/// derived MAC (which nothing else uses) and adopted; the alias drift is then
/// fixed like any other.
fn half_created(want: &LinkSpec, have: &ActualLink) -> bool {
    let kind = match want.kind {
        LinkKind::Bridge => "bridge",
        LinkKind::Vxlan(_) => "vxlan",
    };
    have.alias.is_none() && have.mac == Some(want.mac) && have.kind.as_deref() == Some(kind)
}

/// Why an existing managed device must be deleted and created again.
fn recreate_reason(want: &LinkSpec, have: &ActualLink) -> Option<String> {
    let kind = have.kind.as_deref().unwrap_or("no kind");
    match &want.kind {
        LinkKind::Bridge => (kind != "bridge").then(|| format!("it is a {kind}, want a bridge")),
        LinkKind::Vxlan(v) => {
            let Some(a) = (kind == "vxlan").then_some(have.vxlan.as_ref()).flatten() else {
                return Some(format!("it is a {kind}, want a vxlan"));
            };
            let mut diffs = Vec::new();
            if a.vni != v.vni.get() {
                diffs.push(format!("id {} -> {}", a.vni, v.vni));
            }
            if a.local != Some(v.local) {
                let have = a.local.map_or("none".to_string(), |l| l.to_string());
                diffs.push(format!("local {have} -> {}", v.local));
            }
            if a.port != v.port {
                diffs.push(format!("dstport {} -> {}", a.port, v.port));
            }
            let dev_ok = match &v.underlay_dev {
                Some(d) => a.link.as_deref() == Some(d.as_str()),
                None => a.link_index.is_none(),
            };
            if !dev_ok {
                let have = a
                    .link
                    .clone()
                    .or(a.link_index.map(|i| format!("#{i}")))
                    .unwrap_or("none".into());
                let want = v.underlay_dev.as_deref().unwrap_or("none");
                diffs.push(format!("dev {have} -> {want}"));
            }
            if a.learning {
                diffs.push("learning -> nolearning".into());
            }
            if a.proxy != v.proxy {
                diffs.push(format!(
                    "{} -> {}",
                    if a.proxy { "proxy" } else { "noproxy" },
                    if v.proxy { "proxy" } else { "noproxy" }
                ));
            }
            (!diffs.is_empty()).then(|| diffs.join(", "))
        }
    }
}

/// The minimal changes that turn `actual` into `plan`, in apply order.
pub fn diff(plan: &NodePlan, actual: &ActualState) -> Result<Vec<Change>, DiffError> {
    validate(plan)?;
    let by_name: HashMap<&str, &ActualLink> =
        actual.links.iter().map(|l| (l.name.as_str(), l)).collect();
    let foreign: Vec<ForeignDevice> = plan
        .links
        .iter()
        .filter_map(|l| by_name.get(l.name.as_str()).map(|a| (l, a)))
        .filter(|(l, a)| a.ownership() != Ownership::Managed && !half_created(l, a))
        .map(|(_, a)| ForeignDevice {
            name: a.name.clone(),
            kind: a.kind_name().to_string(),
            alias: a.alias.clone(),
        })
        .collect();
    if !foreign.is_empty() {
        return Err(DiffError::Foreign(foreign));
    }

    let mut out = Vec::new();
    let planned: HashSet<&str> = plan.links.iter().map(|l| l.name.as_str()).collect();
    // Devices created by this apply (nothing on them exists yet) and devices
    // deleted by it (everything on them vanishes with them).
    let mut fresh: HashSet<&str> = HashSet::new();
    let mut gone: HashSet<&str> = HashSet::new();

    for l in &plan.links {
        match by_name.get(l.name.as_str()) {
            None => {
                out.push(Change::CreateLink { link: l.clone() });
                fresh.insert(&l.name);
            }
            Some(a) => {
                if let Some(reason) = recreate_reason(l, a) {
                    out.push(Change::DeleteLink {
                        name: a.name.clone(),
                        kind: a.kind_name().to_string(),
                        reason,
                    });
                    out.push(Change::CreateLink { link: l.clone() });
                    fresh.insert(&l.name);
                    gone.insert(&l.name);
                }
            }
        }
    }
    for a in actual.managed_links() {
        if !planned.contains(a.name.as_str()) {
            out.push(Change::DeleteLink {
                name: a.name.clone(),
                kind: a.kind_name().to_string(),
                reason: "not in the plan".into(),
            });
            gone.insert(&a.name);
        }
    }

    // In-place drift of existing devices, and bridge-port learning.
    for l in &plan.links {
        let enslaved = l.master.is_some();
        if fresh.contains(l.name.as_str()) {
            if enslaved && !l.port_learning {
                // A new port starts with learning on.
                out.push(Change::SetPortLearning {
                    dev: l.name.clone(),
                    learning: false,
                });
            }
            continue;
        }
        let a = by_name[l.name.as_str()];
        let mut fix = LinkFix::default();
        if a.mtu != l.mtu {
            fix.mtu = Some(l.mtu);
        }
        if a.mac != Some(l.mac) {
            fix.mac = Some(l.mac);
        }
        let want_master = l.master.as_deref();
        if a.master.as_deref() != want_master || want_master.is_some_and(|m| fresh.contains(m)) {
            fix.master = Some(l.master.clone());
        }
        if a.alias.as_deref() != Some(l.alias.as_str()) {
            fix.alias = Some(l.alias.clone());
        }
        fix.up = !a.up;
        let reenslaved = matches!(fix.master, Some(Some(_)));
        if !fix.is_empty() {
            out.push(Change::SetLink {
                name: l.name.clone(),
                fix,
            });
        }
        if enslaved {
            let learning = if reenslaved {
                Some(true)
            } else {
                a.port_learning
            };
            if learning != Some(l.port_learning) {
                out.push(Change::SetPortLearning {
                    dev: l.name.clone(),
                    learning: l.port_learning,
                });
            }
        }
    }

    // Addresses on managed devices.
    let alive = |dev: &str| !gone.contains(dev);
    let have: HashSet<&AddrSpec> = actual.addresses.iter().filter(|a| alive(&a.dev)).collect();
    for a in &actual.addresses {
        if alive(&a.dev) && !plan.addresses.contains(a) {
            out.push(Change::DeleteAddress { addr: a.clone() });
        }
    }
    for a in &plan.addresses {
        if fresh.contains(a.dev.as_str()) || !have.contains(a) {
            out.push(Change::AddAddress { addr: a.clone() });
        }
    }

    if plan.ip_forward && !actual.ip_forward {
        out.push(Change::SetIpForward { on: true });
    }

    diff_routes(plan, actual, &fresh, &gone, &mut out);
    diff_neighbours(plan, actual, &fresh, &gone, &mut out);
    diff_fdb(plan, actual, &fresh, &gone, &mut out);

    out.sort_by_key(Change::phase);
    Ok(out)
}

/// The changes that turn a node holding exactly `old` into `new`, when the
/// two differ only in peer entries (routes, neighbours, FDB entries): the
/// incremental path of a pass whose kernel state is known to equal `old`
/// (no kernel event since it was applied). `None` when devices, addresses
/// or forwarding differ: those need a full pass over a fresh dump.
///
/// The result equals `diff(new, converged(old))` (property-tested), without
/// a dump and in time proportional to the plans, not to the kernel.
pub fn diff_entries(old: &NodePlan, new: &NodePlan) -> Option<Vec<Change>> {
    if old.links != new.links || old.addresses != new.addresses || old.ip_forward != new.ip_forward
    {
        return None;
    }
    let mut out = Vec::new();
    let (routes_gone, routes_new) = split_difference(&old.routes, &new.routes);
    let (neigh_gone, neigh_new) = split_difference(&old.neighbours, &new.neighbours);
    let (fdb_gone, fdb_new) = split_difference(&old.fdb, &new.fdb);
    // Routes are keyed by destination: a changed one is replaced in place.
    for r in routes_gone {
        if routes_to(new, r.dst) == 0 {
            out.push(Change::DeleteRoute {
                route: ActualRoute {
                    dst: r.dst,
                    via: Some(r.via),
                    dev: Some(r.dev.clone()),
                    oif: None,
                    onlink: true,
                    table: crate::dataplane::kernel::RT_TABLE_MAIN,
                    priority: route_metric(r.dst),
                    tos: 0,
                    scope: 0,
                    kind: 1,
                },
            });
        }
    }
    out.extend(
        routes_new
            .into_iter()
            .map(|r| Change::ReplaceRoute { route: r.clone() }),
    );
    // Neighbours are keyed by (device, IP).
    out.extend(
        neigh_new
            .into_iter()
            .map(|n| Change::ReplaceNeighbour { neigh: n.clone() }),
    );
    for n in neigh_gone {
        if neighbours_of(new, &n.dev, n.ip) == 0 {
            out.push(Change::DeleteNeighbour {
                dev: n.dev.clone(),
                ip: n.ip,
            });
        }
    }
    // FDB entries are keyed by (device, MAC); a replace rewrites the remote.
    out.extend(
        fdb_new
            .into_iter()
            .map(|e| Change::ReplaceFdb { fdb: e.clone() }),
    );
    for e in fdb_gone {
        if fdb_of(new, &e.dev, e.mac) == 0 {
            out.push(Change::DeleteFdb {
                dev: e.dev.clone(),
                mac: e.mac,
                dst: Some(e.dst),
            });
        }
    }
    out.sort_by_key(Change::phase);
    // The unchanged entries passed the full diff's validation with `old`;
    // check what is new (on a planned device, its key used once).
    validate_entries(new, &out).then_some(out)
}

/// `(only in old, only in new)` of two ordered sets, in one merge walk
/// (two `difference` calls would walk both sets twice).
fn split_difference<'a, T: Ord>(
    old: &'a BTreeSet<T>,
    new: &'a BTreeSet<T>,
) -> (Vec<&'a T>, Vec<&'a T>) {
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => gone.extend(a.next()),
                std::cmp::Ordering::Greater => added.extend(b.next()),
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next();
                }
            },
            (Some(_), None) => gone.extend(a.next()),
            (None, Some(_)) => added.extend(b.next()),
            (None, None) => return (gone, added),
        }
    }
}

/// How many planned routes go to `dst` (the set is ordered by `dst` first).
fn routes_to(plan: &NodePlan, dst: ipnet::Ipv4Net) -> usize {
    let from = RouteSpec {
        dst,
        via: Ipv4Addr::UNSPECIFIED,
        dev: String::new(),
    };
    plan.routes
        .range(from..)
        .take_while(|r| r.dst == dst)
        .count()
}

/// How many planned neighbours `dev` has for `ip`.
fn neighbours_of(plan: &NodePlan, dev: &str, ip: Ipv4Addr) -> usize {
    let from = NeighSpec {
        dev: dev.to_string(),
        ip,
        mac: Mac([0; 6]),
    };
    plan.neighbours
        .range(from..)
        .take_while(|n| n.dev == dev && n.ip == ip)
        .count()
}

/// How many planned FDB entries `dev` has for `mac`.
fn fdb_of(plan: &NodePlan, dev: &str, mac: Mac) -> usize {
    let from = FdbSpec {
        dev: dev.to_string(),
        mac,
        dst: Ipv4Addr::UNSPECIFIED,
    };
    plan.fdb
        .range(from..)
        .take_while(|e| e.dev == dev && e.mac == mac)
        .count()
}

/// The checks of [`validate`] for the entries `changes` write, in time
/// proportional to the changes (the sets are ordered by key first).
fn validate_entries(plan: &NodePlan, changes: &[Change]) -> bool {
    let vtep = |dev: &str| {
        plan.links
            .iter()
            .any(|l| l.name == dev && matches!(l.kind, LinkKind::Vxlan(_)))
    };
    changes.iter().all(|c| match c {
        Change::ReplaceRoute { route: r } => {
            plan.links.iter().any(|l| l.name == r.dev) && routes_to(plan, r.dst) == 1
        }
        Change::ReplaceNeighbour { neigh: n } => {
            vtep(&n.dev) && neighbours_of(plan, &n.dev, n.ip) == 1
        }
        Change::ReplaceFdb { fdb: e } => vtep(&e.dev) && fdb_of(plan, &e.dev, e.mac) == 1,
        _ => true,
    })
}

fn diff_routes(
    plan: &NodePlan,
    actual: &ActualState,
    fresh: &HashSet<&str>,
    gone: &HashSet<&str>,
    out: &mut Vec<Change>,
) {
    let want: HashMap<_, &RouteSpec> = plan.routes.iter().map(|r| (r.dst, r)).collect();
    // Routes that vanish with a deleted device need no delete.
    let vanished = |r: &ActualRoute| r.dev.as_deref().is_some_and(|d| gone.contains(d));
    let mut groups: BTreeMap<_, Vec<&ActualRoute>> = BTreeMap::new();
    for r in actual.routes.iter().filter(|r| !vanished(r)) {
        groups.entry(r.dst).or_default().push(r);
    }
    let mut satisfied = HashSet::new();
    for (dst, rs) in &groups {
        let Some(p) = want.get(dst) else {
            for r in rs {
                out.push(Change::DeleteRoute {
                    route: (*r).clone(),
                });
            }
            continue;
        };
        let exact = |r: &&ActualRoute| {
            r.is_vxmesh_shape()
                && r.via == Some(p.via)
                && r.dev.as_deref() == Some(p.dev.as_str())
                && !fresh.contains(p.dev.as_str())
        };
        // Else keep the one the kernel's replace rewrites (same tos/metric).
        let keep = rs
            .iter()
            .position(exact)
            .or_else(|| rs.iter().position(|r| r.has_vxmesh_key()));
        if rs.get(keep.unwrap_or(usize::MAX)).is_some_and(exact) {
            satisfied.insert(*dst);
        }
        for (i, r) in rs.iter().enumerate() {
            if Some(i) != keep {
                out.push(Change::DeleteRoute {
                    route: (*r).clone(),
                });
            }
        }
    }
    for r in &plan.routes {
        if !satisfied.contains(&r.dst) {
            out.push(Change::ReplaceRoute { route: r.clone() });
        }
    }
}

fn diff_neighbours(
    plan: &NodePlan,
    actual: &ActualState,
    fresh: &HashSet<&str>,
    gone: &HashSet<&str>,
    out: &mut Vec<Change>,
) {
    let have: HashMap<(&str, Ipv4Addr), _> = actual
        .neighbours
        .iter()
        .filter(|n| !gone.contains(n.dev.as_str()))
        .map(|n| ((n.dev.as_str(), n.ip), n))
        .collect();
    for n in &plan.neighbours {
        let ok = !fresh.contains(n.dev.as_str())
            && have
                .get(&(n.dev.as_str(), n.ip))
                .is_some_and(|a| a.permanent && a.mac == Some(n.mac));
        if !ok {
            out.push(Change::ReplaceNeighbour { neigh: n.clone() });
        }
    }
    let want: HashSet<(&str, Ipv4Addr)> = plan
        .neighbours
        .iter()
        .map(|n| (n.dev.as_str(), n.ip))
        .collect();
    for n in &actual.neighbours {
        if n.permanent && !gone.contains(n.dev.as_str()) && !want.contains(&(n.dev.as_str(), n.ip))
        {
            out.push(Change::DeleteNeighbour {
                dev: n.dev.clone(),
                ip: n.ip,
            });
        }
    }
}

fn diff_fdb(
    plan: &NodePlan,
    actual: &ActualState,
    fresh: &HashSet<&str>,
    gone: &HashSet<&str>,
    out: &mut Vec<Change>,
) {
    // Remotes per (dev, mac), in the kernel's order: a replace rewrites the
    // first remote unless the wanted one is already among them.
    let mut groups: BTreeMap<(&str, Mac), Vec<&ActualFdb>> = BTreeMap::new();
    for e in actual.fdb.iter().filter(|e| !gone.contains(e.dev.as_str())) {
        groups.entry((e.dev.as_str(), e.mac)).or_default().push(e);
    }
    let delete = |e: &ActualFdb| Change::DeleteFdb {
        dev: e.dev.clone(),
        mac: e.mac,
        dst: e.dst,
    };
    let mut deletes = Vec::new();
    for p in &plan.fdb {
        let key = (p.dev.as_str(), p.mac);
        let rs = match groups.remove(&key) {
            Some(rs) if !fresh.contains(p.dev.as_str()) => rs,
            _ => {
                out.push(Change::ReplaceFdb { fdb: p.clone() });
                continue;
            }
        };
        let same_dst = rs.iter().position(|e| e.dst == Some(p.dst));
        let keep = same_dst.unwrap_or(0);
        if !same_dst.is_some_and(|i| rs[i].permanent) {
            out.push(Change::ReplaceFdb { fdb: p.clone() });
        }
        for (i, e) in rs.iter().enumerate() {
            if i != keep {
                deletes.push(delete(e));
            }
        }
    }
    for rs in groups.values() {
        for e in rs {
            deletes.push(delete(e));
        }
    }
    out.extend(deletes);
}

#[cfg(test)]
mod tests;
