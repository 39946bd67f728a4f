//! GC (spec 1.1): remove the veths and addresses of this network whose
//! attachment the runtime no longer lists as valid.

use super::config::{NetConf, at_least_1_1};
use super::error::{CniError, CniResult, Code};
use crate::attach;
use crate::dataplane::kernel::Netlink;
use crate::ipam::Ipam;
use crate::names::VethAlias;

/// GC: delete this network's container veths and release its addresses
/// unless `cni.dev/valid-attachments` lists their (container, interface).
pub(super) async fn gc(conf: &NetConf) -> CniResult<()> {
    if !at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "GC needs cniVersion 1.1.0",
            "",
        ));
    }
    let net = conf.network()?;
    let valid = conf.valid_attachments.clone().unwrap_or_default();
    let keep = |id: &str, ifname: &str| {
        valid
            .iter()
            .any(|v| v.container_id == id && v.ifname == ifname)
    };
    let dir = conf.state_dir();
    let nl = Netlink::connect()
        .await
        .map_err(|e| CniError::io("netlink", e))?;
    // Veths first, addresses after, as detach does: the agent restores an
    // allocation whose veth still exists (a deleted state dir), so an
    // address must never be released while its veth is there.
    // Host veths of this network whose attachment is not valid (including
    // ones whose allocation was already lost).
    let links = nl
        .list_links()
        .await
        .map_err(|e| CniError::io("list links", e))?;
    for l in links {
        let Some(alias) = l.alias.as_deref().and_then(|a| a.parse::<VethAlias>().ok()) else {
            continue;
        };
        if alias.network == net && !keep(&alias.container_id, &alias.ifname) {
            nl.delete_link(&l.name)
                .await
                .map_err(|e| CniError::io("delete stale veth", e))?;
        }
    }
    let released = Ipam::new(&dir, net)
        .retain(|a| keep(&a.owner.container_id, &a.owner.ifname))
        .map_err(|e| CniError::io("release stale allocations", e))?;
    for a in released {
        let _ = nl
            .delete_link(&attach::host_veth_name(
                net,
                &a.owner.container_id,
                &a.owner.ifname,
            ))
            .await;
    }
    Ok(())
}
