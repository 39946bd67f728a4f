//! `lab up --encrypt`: the lab's first network goes over the secure
//! underlay; each host's key is made in its state dir (as its agent would)
//! and listed as its `public_key` in the cluster file.

use anyhow::{Context, Result};
use vxmesh::config::ClusterFile;
use vxmesh::secure::keys;

use super::Lab;

impl Lab {
    pub(super) fn encrypt_first_network(&self, cluster: &mut ClusterFile) -> Result<()> {
        let first = cluster
            .networks
            .first_mut()
            .context("the lab declares no network")?;
        first.encrypt = true;
        for node in &mut cluster.nodes {
            // The state dir LabNode::state_dir will name (see hosts.rs).
            let state_dir = self.info.dir.join(&node.name).join("state");
            let key = keys::load_or_create(None, &state_dir)
                .with_context(|| format!("key of {}", node.name))?;
            node.public_key = Some(key.public().to_string());
        }
        Ok(())
    }
}
