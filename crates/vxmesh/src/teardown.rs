//! `vxmesh down`: remove everything vxmesh owns on this node (its devices,
//! routes and nftables table) and forget the networks it served (the state
//! dir).

use std::path::Path;

use crate::dataplane::kernel::{Netlink, TeardownReport};
use crate::state;
use crate::status::PLAN_FILE;

/// An error of a layer below (netlink, state files), shown as it wrote it.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why `down` stopped or did not remove everything.
#[derive(Debug, thiserror::Error)]
pub enum DownError {
    /// The kernel could not be asked (connect or dump failed).
    #[error(transparent)]
    Kernel(Cause),
    /// A network's state file could not be removed.
    #[error(transparent)]
    State(Cause),
    /// Some objects could not be deleted; each entry names one.
    #[error("teardown incomplete: {}", .0.join("; "))]
    Incomplete(Vec<String>),
}

/// Delete vxmesh's devices and routes in this namespace, then wipe the state
/// of `state_dir`. The report lists what was removed, skipped and refused;
/// see [`check_complete`].
pub async fn down(state_dir: &Path) -> Result<TeardownReport, DownError> {
    let nl = Netlink::connect()
        .await
        .map_err(|e| DownError::Kernel(e.into()))?;
    let mut report = nl
        .teardown()
        .await
        .map_err(|e| DownError::Kernel(e.into()))?;
    crate::secure::underlay::teardown(&nl, &mut report).await;
    match crate::firewall::nft::delete_table() {
        Ok(deleted) => report.firewall_table = deleted,
        Err(e) => report
            .errors
            .push(format!("delete nftables table inet vxmesh: {e}")),
    }
    wipe_state(state_dir)?;
    Ok(report)
}

/// Forget every served network and the last plan: afterwards `status` and
/// attach see a node that serves nothing.
pub fn wipe_state(state_dir: &Path) -> Result<(), DownError> {
    for n in state::list_networks(state_dir) {
        state::remove_network(state_dir, &n).map_err(|e| DownError::State(e.into()))?;
    }
    let _ = std::fs::remove_file(state_dir.join(PLAN_FILE));
    Ok(())
}

/// What `down` prints: the removed devices and routes, and the `vxm-`
/// devices it left alone.
pub fn render(report: &TeardownReport) -> String {
    let mut out = format!(
        "removed {} device(s) ({}) and {} route(s)\n",
        report.links_deleted.len(),
        report.links_deleted.join(", "),
        report.routes_deleted
    );
    if report.firewall_table {
        out.push_str("removed nftables table inet vxmesh\n");
    }
    for s in &report.skipped {
        out.push_str(&format!("left alone (not vxmesh's): {s}\n"));
    }
    out
}

/// An error when some object could not be removed.
pub fn check_complete(report: &TeardownReport) -> Result<(), DownError> {
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(DownError::Incomplete(report.errors.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> TeardownReport {
        TeardownReport {
            links_deleted: vec!["vxm-br0".into(), "vxm-vx42".into()],
            routes_deleted: 3,
            skipped: vec!["vxm-foo (dummy, not a vxmesh kind)".into()],
            errors: Vec::new(),
            firewall_table: false,
        }
    }

    #[test]
    fn render_lists_removed_and_skipped() {
        assert_eq!(
            render(&report()),
            "removed 2 device(s) (vxm-br0, vxm-vx42) and 3 route(s)\n\
             left alone (not vxmesh's): vxm-foo (dummy, not a vxmesh kind)\n"
        );
        assert_eq!(
            render(&TeardownReport::default()),
            "removed 0 device(s) () and 0 route(s)\n"
        );
    }

    #[test]
    fn errors_make_the_teardown_incomplete() {
        assert!(check_complete(&report()).is_ok());
        let mut r = report();
        r.errors = vec!["delete vxm-br0: busy".into(), "delete route: gone".into()];
        let e = check_complete(&r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "teardown incomplete: delete vxm-br0: busy; delete route: gone"
        );
    }

    #[test]
    fn wipe_state_forgets_networks_and_plan_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let nets = dir.path().join("networks");
        std::fs::create_dir_all(&nets).unwrap();
        for n in ["blue", "red"] {
            std::fs::write(nets.join(format!("{n}.json")), "{}").unwrap();
        }
        std::fs::write(dir.path().join(PLAN_FILE), "{}").unwrap();
        std::fs::write(dir.path().join("ipam-note"), "x").unwrap();
        assert_eq!(state::list_networks(dir.path()), ["blue", "red"]);
        wipe_state(dir.path()).unwrap();
        assert!(state::list_networks(dir.path()).is_empty());
        assert!(!dir.path().join(PLAN_FILE).exists());
        assert!(dir.path().join("ipam-note").exists());
        // Twice, and on a state dir that never existed: nothing to do.
        wipe_state(dir.path()).unwrap();
        wipe_state(&dir.path().join("missing")).unwrap();
    }
}
