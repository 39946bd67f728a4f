//! `vxmesh status`: what the agent last applied on this node (STATE/plan.json)
//! against what the kernel holds now, per network, device and peer entry.
//!
//! The agent writes [`SavedPlan`] atomically after each successful pass; the
//! status reads it, dumps the owned kernel objects and renders the diff's
//! verdict of every planned object (`ok`, `missing` or `different`, with
//! what the kernel has instead) and of every extra object it owns.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataplane::NodePlan;
use crate::dataplane::kernel::{Netlink, NetlinkError};
use crate::state::StateError;

mod firewall;
mod render;
mod report;
mod secure;

pub use firewall::{FirewallStatus, NatStatus, firewall_status};

pub use render::render;
pub use report::{
    Check, DeviceStatus, EntryStatus, ExtraStatus, NetworkStatus, PeerStatus, StatusReport,
    compare, fdb_status, fdb_text, neigh_status, neigh_text, peers_of, route_status, route_text,
};
pub use secure::{SecurePeerStatus, SecureStatus, secure_status};

/// File name of the saved plan in the state dir.
pub const PLAN_FILE: &str = "plan.json";

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("read {}: has the agent completed a pass with this --state-dir?", path.display())]
    ReadPlan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {}", path.display())]
    ParsePlan {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("write the plan")]
    WritePlan(#[source] StateError),
    #[error("connect to rtnetlink")]
    Connect(#[source] NetlinkError),
    #[error("dump the kernel state")]
    Dump(#[source] NetlinkError),
    #[error("read the nftables table inet vxmesh")]
    Firewall(#[source] crate::firewall::NftError),
}

/// The plan the agent last applied, with who and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub node: String,
    /// Seconds since the epoch of the first pass that applied this plan (the
    /// file is rewritten only when the plan changes).
    pub applied_at: u64,
    /// Underlay IP -> node name of every node of the cluster.
    pub nodes: BTreeMap<Ipv4Addr, String>,
    pub plan: NodePlan,
}

/// Write the plan atomically to `STATE/plan.json` (what the agent's
/// [`PlanStore`](crate::state::PlanStore) does after a pass).
pub fn write_plan(state_dir: &Path, saved: &SavedPlan) -> Result<(), StatusError> {
    crate::state::write_plan(state_dir, saved).map_err(StatusError::WritePlan)
}

/// Read `STATE/plan.json`.
pub fn read_plan(state_dir: &Path) -> Result<SavedPlan, StatusError> {
    let path = state_dir.join(PLAN_FILE);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(source) => return Err(StatusError::ReadPlan { path, source }),
    };
    parse_plan(&data).map_err(|source| StatusError::ParsePlan { path, source })
}

/// Parse the contents of a `STATE/plan.json` file.
pub fn parse_plan(data: &[u8]) -> Result<SavedPlan, serde_json::Error> {
    serde_json::from_slice(data)
}

/// Status of the node in the current network namespace.
pub async fn status(state_dir: &Path) -> Result<StatusReport, StatusError> {
    let saved = read_plan(state_dir)?;
    let nl = Netlink::connect().await.map_err(StatusError::Connect)?;
    let actual = nl.dump().await.map_err(StatusError::Dump)?;
    let mut report = compare(
        &saved,
        &actual,
        crate::state::agent_running(state_dir),
        crate::state::now_secs(),
    );
    let inspection = firewall::inspect(&saved.plan)
        .await
        .map_err(StatusError::Firewall)?;
    let fw = firewall_status(&saved.plan, &inspection);
    report.ok &= fw.ok();
    report.pending_changes.extend(fw.drift.iter().cloned());
    report.firewall = Some(fw);
    if let Some(sp) = &saved.plan.secure {
        let link = nl.get_link(&sp.dev).await.map_err(StatusError::Dump)?;
        let agent = crate::secure::underlay::report::read_report(state_dir);
        let s = secure_status(
            sp,
            link.as_ref(),
            agent.as_ref(),
            crate::secure::underlay::report::now_ms(),
        );
        report.ok &= s.device_ok && !s.key_mismatch();
        report.secure = Some(s);
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
