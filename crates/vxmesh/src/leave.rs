//! Removing a node from etcd networks by hand (`vxmesh leave`): the guard
//! that refuses while that node's own agent runs here, since a running agent
//! would re-grant its lease and publish everything again.

use std::path::{Path, PathBuf};

use crate::state;

/// `leave` was refused: the node's agent runs with this state dir.
#[derive(Debug, thiserror::Error)]
#[error(
    "the agent of node {node} is running here (state dir {}): stop it first, or run it with --leave",
    state_dir.display()
)]
pub struct AgentStillRunning {
    pub node: String,
    pub state_dir: PathBuf,
}

/// Refuse if an agent holds the lock of `state_dir` and serves `node` (some
/// network's state file names it).
pub fn ensure_agent_stopped(state_dir: &Path, node: &str) -> Result<(), AgentStillRunning> {
    let running = state::agent_running(state_dir);
    // Read the state files only when an agent runs, as they change under it.
    let served_by = || {
        state::list_networks(state_dir)
            .into_iter()
            .filter_map(|n| state::read_network(state_dir, &n).ok())
            .map(|s| s.node)
    };
    if running && serves(served_by(), node) {
        return Err(AgentStillRunning {
            node: node.to_string(),
            state_dir: state_dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Does any of the nodes named by the served networks equal `node`?
fn serves(mut served_by: impl Iterator<Item = String>, node: &str) -> bool {
    served_by.any(|n| n == node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_itself_counts() {
        assert!(serves(["a".to_string(), "b".to_string()].into_iter(), "b"));
        assert!(!serves(["a".to_string()].into_iter(), "b"));
        assert!(!serves(std::iter::empty(), "b"));
    }

    #[test]
    fn no_agent_no_refusal() {
        let dir = tempfile::tempdir().unwrap();
        ensure_agent_stopped(dir.path(), "n1").unwrap();
        ensure_agent_stopped(&dir.path().join("missing"), "n1").unwrap();
    }

    #[test]
    fn a_running_agent_serving_nothing_is_no_reason_to_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let _lock = state::lock_agent(dir.path()).unwrap();
        assert!(state::agent_running(dir.path()));
        ensure_agent_stopped(dir.path(), "n1").unwrap();
    }

    #[test]
    fn the_refusal_names_node_and_state_dir() {
        let e = AgentStillRunning {
            node: "n1".into(),
            state_dir: "/run/vxmesh".into(),
        };
        assert_eq!(
            e.to_string(),
            "the agent of node n1 is running here (state dir /run/vxmesh): stop it first, or run it with --leave"
        );
    }
}
