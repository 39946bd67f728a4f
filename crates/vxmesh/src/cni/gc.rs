//! GC (spec 1.1): remove the attachments this CNI network made whose
//! (container, interface) the runtime no longer lists as in use.
//!
//! GC never guesses. Without a list (`cni.dev/attachments`, or
//! `cni.dev/valid-attachments` as libcni also sends) it deletes nothing.
//! It collects only attachments recorded as made under the same CNI
//! network `name`: those of another CNI configuration of the same vxmesh
//! network, of the Docker plugin, of `vxmesh attach` or the lab, and ones
//! made before vxmesh recorded the name, are left alone. One failure does
//! not stop it: every stale attachment is tried and every failure reported.

use super::config::{NetConf, ValidAttachment, at_least_1_1};
use super::error::{CniError, CniResult, Code, chain};
use crate::attach;
use crate::ipam::{Allocation, Ipam};

/// GC: detach every attachment of this CNI network not in the runtime's list.
pub(super) async fn gc(conf: &NetConf) -> CniResult<()> {
    if !at_least_1_1(&conf.cni_version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "GC needs cniVersion 1.1.0",
            "",
        ));
    }
    let net = conf.network()?;
    let Some(valid) = conf.gc_attachments() else {
        tracing::warn!(
            "GC of CNI network '{}': no cni.dev/attachments list was given, so nothing is deleted",
            conf.name
        );
        return Ok(());
    };
    let dir = conf.state_dir();
    let all = Ipam::new(&dir, net)
        .list()
        .map_err(|e| CniError::io("read allocations", e))?;
    let stale = stale_attachments(&all, &conf.name, &valid);
    let mut failures = Vec::new();
    for a in &stale {
        // detach deletes the veth before it releases the address (the
        // agent restores an allocation whose veth still exists), through
        // the network's own allocator.
        match attach::detach(&dir, net, &a.owner.container_id, &a.owner.ifname, None).await {
            Ok(_) => tracing::info!(
                "GC of CNI network '{}': detached {}/{} ({})",
                conf.name,
                a.owner.container_id,
                a.owner.ifname,
                a.ip
            ),
            Err(e) => failures.push(format!(
                "{}/{} ({}): {}",
                a.owner.container_id,
                a.owner.ifname,
                a.ip,
                chain(&e)
            )),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(CniError::new(
        Code::IoFailure,
        format!(
            "GC of CNI network '{}': {} of {} stale attachments could not be removed",
            conf.name,
            failures.len(),
            stale.len()
        ),
        failures.join("; "),
    ))
}

/// The allocations GC removes: made under the CNI network `cni_name` and
/// not in `valid`.
pub(super) fn stale_attachments(
    all: &[Allocation],
    cni_name: &str,
    valid: &[ValidAttachment],
) -> Vec<Allocation> {
    all.iter()
        .filter(|a| a.cni_network.as_deref() == Some(cni_name))
        .filter(|a| {
            !valid
                .iter()
                .any(|v| v.container_id == a.owner.container_id && v.ifname == a.owner.ifname)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Owner;

    fn alloc(last: u8, id: &str, cni: Option<&str>) -> Allocation {
        Allocation {
            ip: std::net::Ipv4Addr::new(10, 0, 0, last),
            owner: Owner {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            cni_network: cni.map(str::to_string),
        }
    }

    #[test]
    fn only_this_cni_networks_unlisted_attachments_are_stale() {
        let all = [
            alloc(2, "kept", Some("overlay")),
            alloc(3, "gone", Some("overlay")),
            alloc(4, "other-conf", Some("podman-net")),
            alloc(5, "docker-or-cli", None),
        ];
        let valid = [ValidAttachment {
            container_id: "kept".into(),
            ifname: "eth0".into(),
        }];
        let stale = stale_attachments(&all, "overlay", &valid);
        assert_eq!(stale, [all[1].clone()]);
        // An empty list (not an absent one) means none of ours is in use.
        assert_eq!(stale_attachments(&all, "overlay", &[]).len(), 2);
    }
}
