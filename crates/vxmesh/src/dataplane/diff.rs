//! Desired vs actual: the one comparator of vxmesh. It judges every planned
//! object against a kernel dump ([`Verdicts`]: ok, missing, different,
//! extra) and derives from those verdicts the minimal list of changes that
//! makes the kernel match a [`NodePlan`]. Pure (no I/O), so every case is
//! unit-tested without root.
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
//!
//! [`Change`] and its `ip`-syntax display live in [`crate::dataplane::change`];
//! the incremental diff between two plans in [`crate::dataplane::incremental`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::dataplane::kernel::{ActualLink, ActualState, MANAGED_ALIAS_PREFIX, Ownership};
use crate::dataplane::{LinkKind, LinkSpec, NodePlan};
use crate::model;

pub use crate::dataplane::change::{Change, LinkFix, Phase};
pub use crate::dataplane::incremental::diff_entries;
pub use crate::dataplane::verdict::{Extra, LinkDrift, Verdict, Verdicts};

mod entries;
mod links;

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
    have.alias.is_none()
        && have.mac == Some(want.mac)
        && have.kind.as_deref() == Some(want.kind.name())
}

/// Planned device names held by devices vxmesh must not touch.
fn refuse_foreign(plan: &NodePlan, actual: &ActualState) -> Result<(), DiffError> {
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
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(DiffError::Foreign(foreign))
    }
}

/// What the diff found: a verdict per object, and the changes that turn the
/// kernel into the plan, or why vxmesh may make none.
#[derive(Clone, Debug)]
pub struct Comparison<'a> {
    pub verdicts: Verdicts<'a>,
    /// In apply order. An error when the plan is invalid or names a device
    /// vxmesh does not own (the verdicts are complete all the same).
    pub changes: Result<Vec<Change>, DiffError>,
}

/// Judge every object of `plan` against `actual` and derive the changes.
pub fn compare<'a>(plan: &'a NodePlan, actual: &'a ActualState) -> Comparison<'a> {
    let mut verdicts = Verdicts::default();
    let mut out = Vec::new();
    let devices = links::judge_links(plan, actual, &mut verdicts, &mut out);
    entries::judge_addresses(plan, actual, &devices, &mut verdicts, &mut out);
    if plan.ip_forward {
        let verdict = if actual.ip_forward {
            Verdict::Ok
        } else {
            out.push(Change::SetIpForward { on: true });
            Verdict::Different(())
        };
        verdicts.ip_forward = Some(verdict);
    }
    entries::judge_routes(plan, actual, &devices, &mut verdicts, &mut out);
    entries::judge_neighbours(plan, actual, &devices, &mut verdicts, &mut out);
    entries::judge_fdb(plan, actual, &devices, &mut verdicts, &mut out);
    out.sort_by_key(Change::phase);
    let changes = validate(plan)
        .and_then(|()| refuse_foreign(plan, actual))
        .map(|()| out);
    Comparison { verdicts, changes }
}

/// The minimal changes that turn `actual` into `plan`, in apply order.
pub fn diff(plan: &NodePlan, actual: &ActualState) -> Result<Vec<Change>, DiffError> {
    compare(plan, actual).changes
}

#[cfg(test)]
mod tests;
