//! Addresses, routes, neighbours and FDB entries: each planned one judged by
//! its key (address; route destination; device and IP; device and MAC), the
//! owned ones at keys the plan does not list judged extra, and the changes
//! that follow. Entries on a device the diff deletes vanish with it; entries
//! on a device it creates are written whatever the kernel had.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::dataplane::kernel::{ActualFdb, ActualNeigh, ActualRoute, ActualState};
use crate::dataplane::verdict::{Extra, Verdict, Verdicts};
use crate::dataplane::{AddrSpec, NodePlan, RouteSpec};
use crate::model::Mac;

use super::Change;
use super::links::DeviceChanges;

pub(super) fn judge_addresses<'a>(
    plan: &'a NodePlan,
    actual: &'a ActualState,
    devices: &DeviceChanges,
    verdicts: &mut Verdicts<'a>,
    out: &mut Vec<Change>,
) {
    let have: HashSet<&AddrSpec> = actual.addresses.iter().collect();
    for a in &actual.addresses {
        if !plan.addresses.contains(a) {
            verdicts.extra.push(Extra::Address(a));
            if !devices.gone.contains(a.dev.as_str()) {
                out.push(Change::DeleteAddress { addr: a.clone() });
            }
        }
    }
    for a in &plan.addresses {
        let verdict = if have.contains(a) {
            Verdict::Ok
        } else {
            Verdict::Missing
        };
        if devices.fresh.contains(a.dev.as_str()) || !verdict.is_ok() {
            out.push(Change::AddAddress { addr: a.clone() });
        }
        verdicts.addresses.push((a, verdict));
    }
}

/// The route the plan wants, as vxmesh writes it.
fn is_planned_route(p: &RouteSpec, r: &ActualRoute) -> bool {
    r.is_vxmesh_shape() && r.via == Some(p.via) && r.dev.as_deref() == Some(p.dev.as_str())
}

/// A route is `ok` when it is the only one to its destination. Of the
/// routes to a planned destination the diff keeps the planned one, else the
/// one a replace rewrites (same tos and metric), and deletes the others.
pub(super) fn judge_routes<'a>(
    plan: &'a NodePlan,
    actual: &'a ActualState,
    devices: &DeviceChanges,
    verdicts: &mut Verdicts<'a>,
    out: &mut Vec<Change>,
) {
    let DeviceChanges { fresh, gone } = devices;
    let mut groups: BTreeMap<Ipv4Net, Vec<&ActualRoute>> = BTreeMap::new();
    for r in &actual.routes {
        groups.entry(r.dst).or_default().push(r);
    }
    for p in &plan.routes {
        let verdict = match groups.get(&p.dst) {
            None => Verdict::Missing,
            Some(rs) if rs.len() == 1 && is_planned_route(p, rs[0]) => Verdict::Ok,
            Some(rs) => Verdict::Different(rs.clone()),
        };
        verdicts.routes.push((p, verdict));
    }

    let want: HashMap<_, &RouteSpec> = plan.routes.iter().map(|r| (r.dst, r)).collect();
    // Routes that vanish with a deleted device need no delete.
    let vanished = |r: &ActualRoute| r.dev.as_deref().is_some_and(|d| gone.contains(d));
    let mut satisfied = HashSet::new();
    for (dst, all) in &groups {
        let Some(p) = want.get(dst) else {
            verdicts.extra.extend(all.iter().map(|r| Extra::Route(r)));
            out.extend(
                all.iter()
                    .filter(|r| !vanished(r))
                    .map(|r| Change::DeleteRoute {
                        route: (*r).clone(),
                    }),
            );
            continue;
        };
        let rs: Vec<&ActualRoute> = all.iter().copied().filter(|r| !vanished(r)).collect();
        let exact = |r: &&ActualRoute| is_planned_route(p, r) && !fresh.contains(p.dev.as_str());
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

/// Only permanent neighbours are vxmesh's; a planned one is `ok` when it is
/// permanent with the planned MAC.
pub(super) fn judge_neighbours<'a>(
    plan: &'a NodePlan,
    actual: &'a ActualState,
    devices: &DeviceChanges,
    verdicts: &mut Verdicts<'a>,
    out: &mut Vec<Change>,
) {
    let DeviceChanges { fresh, gone } = devices;
    let have: HashMap<(&str, Ipv4Addr), &ActualNeigh> = actual
        .neighbours
        .iter()
        .map(|n| ((n.dev.as_str(), n.ip), n))
        .collect();
    for n in &plan.neighbours {
        let verdict = match have.get(&(n.dev.as_str(), n.ip)) {
            None => Verdict::Missing,
            Some(a) if a.permanent && a.mac == Some(n.mac) => Verdict::Ok,
            Some(a) => Verdict::Different(*a),
        };
        if fresh.contains(n.dev.as_str()) || !verdict.is_ok() {
            out.push(Change::ReplaceNeighbour { neigh: n.clone() });
        }
        verdicts.neighbours.push((n, verdict));
    }
    let want: HashSet<(&str, Ipv4Addr)> = plan
        .neighbours
        .iter()
        .map(|n| (n.dev.as_str(), n.ip))
        .collect();
    for n in &actual.neighbours {
        if n.permanent && !want.contains(&(n.dev.as_str(), n.ip)) {
            verdicts.extra.push(Extra::Neighbour(n));
            if !gone.contains(n.dev.as_str()) {
                out.push(Change::DeleteNeighbour {
                    dev: n.dev.clone(),
                    ip: n.ip,
                });
            }
        }
    }
}

/// A planned FDB entry is `ok` when its MAC has exactly the planned remote,
/// permanent. Of the remotes of a planned MAC (in the kernel's order) the
/// diff keeps the planned one, else the first (a replace rewrites it), and
/// deletes the others.
pub(super) fn judge_fdb<'a>(
    plan: &'a NodePlan,
    actual: &'a ActualState,
    devices: &DeviceChanges,
    verdicts: &mut Verdicts<'a>,
    out: &mut Vec<Change>,
) {
    let DeviceChanges { fresh, gone } = devices;
    let mut groups: BTreeMap<(&str, Mac), Vec<&ActualFdb>> = BTreeMap::new();
    for e in &actual.fdb {
        groups.entry((e.dev.as_str(), e.mac)).or_default().push(e);
    }
    let alive = |e: &&ActualFdb| !gone.contains(e.dev.as_str());
    let delete = |e: &ActualFdb| Change::DeleteFdb {
        dev: e.dev.clone(),
        mac: e.mac,
        dst: e.dst,
    };
    let mut deletes = Vec::new();
    let mut planned = HashSet::new();
    for p in &plan.fdb {
        let key = (p.dev.as_str(), p.mac);
        let all = groups.get(&key).map_or(&[][..], Vec::as_slice);
        let verdict = match all {
            [] => Verdict::Missing,
            [e] if e.dst == Some(p.dst) && e.permanent => Verdict::Ok,
            _ => Verdict::Different(all.to_vec()),
        };
        verdicts.fdb.push((p, verdict));
        let rs: Vec<&ActualFdb> = all.iter().copied().filter(alive).collect();
        if !planned.insert(key) || rs.is_empty() || fresh.contains(p.dev.as_str()) {
            out.push(Change::ReplaceFdb { fdb: p.clone() });
            continue;
        }
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
    for (key, all) in &groups {
        if !planned.contains(key) {
            verdicts.extra.extend(all.iter().map(|e| Extra::Fdb(e)));
            deletes.extend(all.iter().copied().filter(alive).map(delete));
        }
    }
    out.extend(deletes);
}
