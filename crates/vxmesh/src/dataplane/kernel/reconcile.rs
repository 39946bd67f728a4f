//! One reconciliation pass: dump, diff against the plan, apply (or, when
//! the kernel is known to hold the previous plan, apply the difference of
//! the two plans with no dump).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ApplyError, ApplyReport, Netlink, NetlinkError};
use crate::dataplane::NodePlan;
use crate::dataplane::diff::{Change, DiffError, diff, diff_entries};

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
    let actual = nl.dump().await?;
    let changes = diff(plan, &actual).map_err(|diff| ReconcileError::Diff {
        namespace: nl.namespace().to_string(),
        diff,
    })?;
    apply_logged(nl, changes, t0).await
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
