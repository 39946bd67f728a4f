//! vxmesh's nftables table `inet vxmesh`: the VTEP peer filter, outbound
//! NAT and the DNAT of published ports. Planned (pure) with the node's
//! plan, dumped, diffed and repaired in the same pass as routes and FDB
//! entries; no other table or chain is ever touched. See docs/firewall.md.

pub mod diff;
pub mod dump;
pub mod nfnl;
pub mod nft;
mod plan;
pub mod ruleset;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use diff::FwChange;
pub use nft::NftError;
pub use plan::{FirewallPlan, plan_firewall};
pub use ruleset::{DROPPED_COUNTER, SPOOFED_COUNTER, TABLE};

use crate::dataplane::NodePlan;

/// What the table holds against the plan, without changing anything.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// Whether the table exists.
    pub present: bool,
    /// The changes a reconcile would apply (empty: as planned).
    pub changes: Vec<FwChange>,
    /// Packets and bytes the VTEP filter dropped.
    pub dropped: Option<(u64, u64)>,
    /// Packets and bytes the secure underlay's guard dropped.
    pub spoofed: Option<(u64, u64)>,
    /// Elements of each set in the kernel.
    pub peers: usize,
    /// Rules in the table.
    pub rules: usize,
}

/// Dump vxmesh's table and diff it against `plan` (the current namespace).
pub fn inspect(plan: &NodePlan) -> Result<Inspection, NftError> {
    let desired = ruleset::desired(plan);
    let actual = nft::dump_table()?;
    let changes = diff::diff(desired.as_ref(), actual.as_ref());
    Ok(Inspection {
        present: actual.is_some(),
        changes,
        dropped: actual
            .as_ref()
            .and_then(|a| a.counters.get(DROPPED_COUNTER).copied()),
        spoofed: actual
            .as_ref()
            .and_then(|a| a.counters.get(SPOOFED_COUNTER).copied()),
        peers: actual
            .as_ref()
            .and_then(|a| a.sets.get(ruleset::PEERS_SET))
            .map_or(0, |s| s.elems.len()),
        rules: actual
            .as_ref()
            .map_or(0, |a| a.rules.values().map(Vec::len).sum()),
    })
}

/// What one firewall pass did.
#[derive(Clone, Debug, Default)]
pub struct FirewallReport {
    pub changes: Vec<FwChange>,
    pub duration: Duration,
    /// Packets and bytes the VTEP filter dropped, as dumped before the pass.
    pub dropped: Option<(u64, u64)>,
    /// Packets and bytes the secure underlay's guard dropped (ditto).
    pub spoofed: Option<(u64, u64)>,
    /// Underlay addresses the filter accepts (the plan's peers).
    pub peers: Option<usize>,
}

/// Dump, diff against `plan`, apply in one transaction (current namespace).
/// Blocking: it runs `nft`.
pub fn reconcile(plan: &NodePlan) -> Result<FirewallReport, NftError> {
    let t0 = Instant::now();
    let desired = ruleset::desired(plan);
    let actual = nft::dump_table()?;
    let changes = diff::diff(desired.as_ref(), actual.as_ref());
    for c in &changes {
        tracing::info!("{c}");
    }
    nft::apply(desired.as_ref(), &changes)?;
    Ok(FirewallReport {
        changes,
        duration: t0.elapsed(),
        dropped: actual
            .as_ref()
            .and_then(|a| a.counters.get(DROPPED_COUNTER).copied()),
        spoofed: actual
            .as_ref()
            .and_then(|a| a.counters.get(SPOOFED_COUNTER).copied()),
        peers: Some(plan.firewall.peers.len()),
    })
}

/// Set-element changes straight over nfnetlink ([`nfnl::update_elements`],
/// no process); through `nft` when that path cannot take them (an interval
/// set) or failed, so `nft` has the last word on a refusal.
fn apply_elements(desired: &ruleset::Desired, changes: &[FwChange]) -> Result<(), NftError> {
    let sets: Vec<nfnl::SetChange<'_>> = changes
        .iter()
        .filter_map(|c| match c {
            FwChange::Elements { set, add, delete } => Some((*set, &add[..], &delete[..])),
            _ => None,
        })
        .collect();
    if sets.len() == changes.len() {
        match nfnl::update_elements(&sets) {
            Ok(()) => return Ok(()),
            Err(e) => tracing::debug!("set elements over nfnetlink: {e}; running nft"),
        }
    }
    nft::apply(Some(desired), changes)
}

/// Apply only the set-element changes from `old` to `new` with no dump,
/// when the kernel is known to hold `old` and nothing else differs (a peer
/// joined or left). `None`: anything else changed, run [`reconcile`].
pub fn reconcile_from(old: &NodePlan, new: &NodePlan) -> Result<Option<FirewallReport>, NftError> {
    let t0 = Instant::now();
    let (Some(o), Some(n)) = (ruleset::desired(old), ruleset::desired(new)) else {
        return Ok(None);
    };
    if o.rules != n.rules || o.chains != n.chains {
        return Ok(None);
    }
    let mut changes = Vec::new();
    for ((def, was), (_, want)) in o.sets.iter().zip(&n.sets) {
        let add: Vec<_> = want.difference(was).copied().collect();
        let delete: Vec<_> = was.difference(want).copied().collect();
        if !add.is_empty() || !delete.is_empty() {
            changes.push(FwChange::Elements {
                set: def.name,
                add,
                delete,
            });
        }
    }
    for c in &changes {
        tracing::info!("{c}");
    }
    apply_elements(&n, &changes)?;
    Ok(Some(FirewallReport {
        changes,
        duration: t0.elapsed(),
        dropped: None,
        spoofed: None,
        peers: Some(new.firewall.peers.len()),
    }))
}
