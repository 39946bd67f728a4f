//! Taking a lab down: its agents, its etcd server, its namespaces and its
//! record, whether this process built it, loaded it, or only knows its name.

use anyhow::Result;
use anyhow::bail;
use nix::sys::signal::Signal;

use super::agents::kill_stray_agents;
use super::{Lab, docker, etcd, lab_dir, memfs, ns_prefix, validate_lab_name};
use vxmesh::dataplane::netns;

/// Tears the lab down when dropped (tests, `lab demo`).
pub struct LabGuard(pub Lab);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("lab {}: teardown problems: {e:#}", self.0.info.name);
        }
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}
impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.0
    }
}

impl Lab {
    /// Remove everything: agents, namespaces, files. Keeps going on errors and
    /// reports them all.
    pub fn down(&mut self) -> Result<()> {
        // Docker first: its containers leave through the plugin.
        let mut problems = self.docker_down();
        let nodes: Vec<String> = self.info.nodes.iter().map(|n| n.name.clone()).collect();
        if let Err(e) = self.stop_agents(&nodes, Signal::SIGTERM) {
            problems.push(format!("stop agents: {e:#}"));
        }
        // Agents whose pid we lost track of (e.g. a crashed `lab up`).
        kill_stray_agents(&self.info.name);
        if let Err(e) = self.stop_etcd() {
            problems.push(format!("stop etcd: {e:#}"));
        }
        etcd::kill_lab_etcd(&self.info.dir);
        if let Err(e) = etcd::unmount_data(&self.info.dir) {
            problems.push(format!("{e:#}"));
        }
        for ns in netns::list(&ns_prefix(&self.info.name)) {
            if let Err(e) = netns::delete(&ns) {
                problems.push(format!("delete namespace {ns}: {e:#}"));
            }
        }
        if let Err(e) = memfs::unmount(&self.info.dir) {
            problems.push(format!("{e:#}"));
        }
        if self.info.dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.info.dir)
        {
            problems.push(format!("remove {}: {e}", self.info.dir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

/// Tear down a lab by name, even if its record is gone or corrupt.
pub fn down_by_name(name: &str) -> Result<()> {
    validate_lab_name(name)?;
    match Lab::load(name) {
        Ok(mut lab) => lab.down(),
        Err(_) => {
            docker::docker_down_by_name(name, &lab_dir(name));
            kill_stray_agents(name);
            etcd::kill_lab_etcd(&lab_dir(name));
            etcd::unmount_data(&lab_dir(name))?;
            for ns in netns::list(&ns_prefix(name)) {
                netns::delete(&ns)?;
            }
            let dir = lab_dir(name);
            memfs::unmount(&dir)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            Ok(())
        }
    }
}
