//! The incremental diff: the changes between two plans that differ only in
//! peer entries, for a pass whose kernel state is known to equal the older
//! plan (no dump needed).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::dataplane::change::Change;
use crate::dataplane::kernel::ActualRoute;
use crate::dataplane::{FdbSpec, LinkKind, NeighSpec, NodePlan, RouteSpec};
use crate::model::Mac;

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
                route: ActualRoute::written(r, None),
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
fn routes_to(plan: &NodePlan, dst: Ipv4Net) -> usize {
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

/// The checks of the full diff's plan validation for the entries `changes` write, in time
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::split_difference;

    #[test]
    fn split_difference_is_both_differences() {
        let sets = [
            vec![],
            vec![1],
            vec![1, 2, 3],
            vec![2, 4, 6, 8],
            vec![0, 3, 4, 5, 9],
        ];
        for a in &sets {
            for b in &sets {
                let (a, b): (BTreeSet<i32>, BTreeSet<i32>) =
                    (a.iter().copied().collect(), b.iter().copied().collect());
                let (gone, added) = split_difference(&a, &b);
                assert_eq!(gone, a.difference(&b).collect::<Vec<_>>(), "{a:?} {b:?}");
                assert_eq!(added, b.difference(&a).collect::<Vec<_>>(), "{a:?} {b:?}");
            }
        }
    }
}
