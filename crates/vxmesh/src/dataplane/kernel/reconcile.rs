//! One reconciliation pass: dump, diff against the plan, apply (or, when
//! the kernel is known to hold the previous plan, apply the difference of
//! the two plans with no dump).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ApplyError, ApplyReport, Netlink, NetlinkError};
use crate::dataplane::NodePlan;
use crate::dataplane::diff::{Change, DiffError, diff, diff_entries};

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;

/// Why a reconcile pass failed. A failed apply carries its report: what was
/// sent and every change that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The kernel state could not be read.
    #[error("{0}")]
    Dump(#[from] NetlinkError),
    /// The plan cannot be compared with the kernel (foreign devices in the
    /// way, an invalid plan).
    #[error("reconcile {namespace}: {diff}")]
    Diff { namespace: String, diff: DiffError },
    /// Some changes failed.
    #[error("{0}")]
    Apply(#[from] ApplyError),
}

impl ReconcileError {
    /// The apply's report, when the pass got as far as applying.
    pub fn apply_report(&self) -> Option<&ApplyReport> {
        match self {
            ReconcileError::Apply(a) => Some(&a.report),
            _ => None,
        }
    }
}

/// What one [`reconcile`] did.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileReport {
    /// Number of changes the diff produced (0 = already converged).
    pub changes: usize,
    /// Netlink requests sent to apply them.
    pub messages: usize,
    pub duration: Duration,
    /// The changes (their `Display` is the log line).
    pub applied: Vec<Change>,
    pub apply: ApplyReport,
}

impl ReconcileReport {
    /// The changes as log lines.
    pub fn lines(&self) -> Vec<String> {
        self.applied.iter().map(ToString::to_string).collect()
    }
}

/// Dump, diff against `plan`, apply: one reconciliation pass.
pub async fn reconcile(nl: &Netlink, plan: &NodePlan) -> Result<ReconcileReport, ReconcileError> {
    let t0 = Instant::now();
    let changes = dump_and_diff(nl, plan).await?;
    apply_logged(nl, changes, t0).await
}

/// The changes that make the kernel's state (dumped now) match `plan`.
async fn dump_and_diff(nl: &Netlink, plan: &NodePlan) -> Result<Vec<Change>, ReconcileError> {
    let actual = nl.dump().await?;
    diff(plan, &actual).map_err(|diff| ReconcileError::Diff {
        namespace: nl.namespace().to_string(),
        diff,
    })
}

/// A full pass in two steps, for a node that must be usable before its
/// peers are programmed: [`reconcile_local`] dumps, diffs and applies the
/// node's own part (devices, addresses, forwarding); [`Staged::finish`]
/// then applies the peer entries (routes, neighbours, FDB entries). The
/// two apply exactly the changes of one [`reconcile`], in the same order:
/// the entry phases come last in it too.
#[derive(Debug)]
pub struct Staged {
    t0: Instant,
    local: ReconcileReport,
    entries: Vec<Change>,
}

/// Dump, diff against `plan`, apply all but the peer entries (see [`Staged`]).
pub async fn reconcile_local(nl: &Netlink, plan: &NodePlan) -> Result<Staged, ReconcileError> {
    let t0 = Instant::now();
    let changes = dump_and_diff(nl, plan).await?;
    let (local, entries) = split_entries(changes);
    let local = apply_logged(nl, local, t0).await?;
    Ok(Staged { t0, local, entries })
}

impl Staged {
    /// Apply the peer entries; the report covers both steps.
    pub async fn finish(self, nl: &Netlink) -> Result<ReconcileReport, ReconcileError> {
        let Staged { t0, local, entries } = self;
        match apply_logged(nl, entries, t0).await {
            Ok(r) => Ok(local.merged(r)),
            Err(ReconcileError::Apply(mut e)) => {
                e.report = local.apply.merged(e.report);
                Err(ReconcileError::Apply(e))
            }
            Err(e) => Err(e),
        }
    }
}

/// `(the node's own changes, the peer entries)`, each in the given order.
pub fn split_entries(changes: Vec<Change>) -> (Vec<Change>, Vec<Change>) {
    changes.into_iter().partition(|c| !c.phase().is_entry())
}

impl ReconcileReport {
    /// This report followed by `then` (a later step of the same pass).
    fn merged(self, then: ReconcileReport) -> ReconcileReport {
        let mut applied = self.applied;
        applied.extend(then.applied);
        ReconcileReport {
            changes: self.changes + then.changes,
            messages: self.messages + then.messages,
            duration: self.duration.max(then.duration),
            applied,
            apply: self.apply.merged(then.apply),
        }
    }
}

/// The incremental pass: the kernel is known to hold exactly `old` (it was
/// applied and no kernel event came since), so the changes to `new` are
/// computed from the two plans, with no dump. `None` when more than peer
/// entries differ: the caller then runs a full [`reconcile`].
pub async fn reconcile_from(
    nl: &Netlink,
    old: &NodePlan,
    new: &NodePlan,
) -> Result<Option<ReconcileReport>, ReconcileError> {
    let t0 = Instant::now();
    let Some(changes) = diff_entries(old, new) else {
        return Ok(None);
    };
    apply_logged(nl, changes, t0).await.map(Some)
}

async fn apply_logged(
    nl: &Netlink,
    changes: Vec<Change>,
    t0: Instant,
) -> Result<ReconcileReport, ReconcileError> {
    const LOGGED: usize = 50;
    for (i, c) in changes.iter().enumerate() {
        if i < LOGGED {
            tracing::info!(namespace = nl.namespace(), "{c}");
        } else {
            tracing::debug!(namespace = nl.namespace(), "{c}");
        }
    }
    if changes.len() > LOGGED {
        tracing::info!(
            namespace = nl.namespace(),
            "... and {} more changes",
            changes.len() - LOGGED
        );
    }
    let apply = if changes.is_empty() {
        ApplyReport::default()
    } else {
        nl.apply(&changes).await?
    };
    Ok(ReconcileReport {
        changes: changes.len(),
        messages: apply.messages(),
        duration: t0.elapsed(),
        applied: changes,
        apply,
    })
}
