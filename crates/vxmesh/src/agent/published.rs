//! The agent's side of published ports: the plan's `ports` from the
//! records in the state dir, after dropping the records of containers whose
//! veth is gone (a container that died without detaching).

use std::collections::BTreeSet;
use std::path::Path;

use super::{AgentError, Result};
use crate::dataplane::kernel::Netlink;
use crate::dataplane::{NodePlan, PortSpec};
use crate::ports::Ports;

/// The ports `p` must carry: every record of a network `p` serves whose
/// host veth exists. Records of gone veths are removed (under the ports
/// lock, with the links listed after taking it).
pub async fn published_ports(
    nl: &Netlink,
    state_dir: &Path,
    p: &NodePlan,
) -> Result<BTreeSet<PortSpec>> {
    let dir = state_dir.to_path_buf();
    let (ports, lock) = tokio::task::spawn_blocking(move || {
        let ports = Ports::new(&dir);
        let lock = ports.lock()?;
        Ok::<_, crate::ports::PortError>((ports, lock))
    })
    .await
    .map_err(AgentError::PortsTask)??;
    if ports.list()?.is_empty() {
        // Nothing published: no link dump (an incremental pass stays dump-free).
        return Ok(BTreeSet::new());
    }
    let veths: BTreeSet<String> = nl.list_links().await?.into_iter().map(|l| l.name).collect();
    let dropped = ports.retain_attached(&lock, &veths)?;
    let records = ports.list()?;
    drop(lock);
    for d in &dropped {
        tracing::info!(
            "dropped the published ports of {} on network {}: its veth {} is gone",
            d.owner_label(),
            d.network,
            d.host_veth()
        );
    }
    Ok(crate::ports::planned(&records, |n| {
        p.networks.contains_key(n)
    }))
}
