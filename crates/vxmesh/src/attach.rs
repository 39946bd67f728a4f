//! Turning a network namespace into a container on a node's network.
//!
//! `attach`: allocate an address (under the IPAM lock), create a veth pair
//! whose container end is born inside the container namespace, put the host
//! end on the network's bridge, address the container end and give it its
//! default route. Any failure rolls back what was done. `detach` undoes it
//! and is idempotent. The lab and the CNI plugin use exactly this code.
//!
//! Where an address comes from is decided by the network's state file (see
//! [`crate::store::Allocator`]): the node's file IPAM, or, for bridged
//! networks on the etcd store, etcd (network-wide, compare-and-swap, the
//! endpoint published under the agent's lease; the file IPAM still records
//! which container holds it).

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::kernel::{LinkOptions, Netlink};
use crate::dataplane::netns::Netns;
use crate::ipam::{Ipam, Owner};
use crate::model::{self, Mac};
use crate::state;
use crate::store::{AddressAllocator, Allocator};

/// What an attachment looks like once made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub host_veth: String,
    pub ip: Ipv4Net,
    pub mac: Mac,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
}

/// Host-side veth name: `vxm-` + 10 hex digits of a hash of (network,
/// container id, ifname): stable, unique enough, fits IFNAMSIZ.
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: tiny, stable across releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network
        .bytes()
        .chain([0])
        .chain(container_id.bytes())
        .chain([0])
        .chain(ifname.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}{:010x}", model::DEVICE_PREFIX, h & 0xff_ffff_ffff)
}

/// The alias that marks a container veth as vxmesh's (not managed by the reconciler).
pub fn veth_alias(network: &str, container_id: &str, ifname: &str) -> String {
    crate::names::VethAlias::render(network, ifname, container_id)
}

#[derive(Clone, Debug)]
pub struct AttachRequest<'a> {
    pub state_dir: &'a Path,
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    /// The node's namespace (where the bridge is); `None` = the caller's.
    pub host_ns: Option<&'a Netns>,
    pub container_ns: &'a Netns,
    /// Ask for a specific address.
    pub ip: Option<Ipv4Addr>,
    /// Override the network's MTU (only lower makes sense).
    pub mtu: Option<u32>,
}

async fn host_netlink(host_ns: Option<&Netns>) -> Result<Netlink> {
    match host_ns {
        Some(ns) => Netlink::connect_in(ns).await,
        None => Netlink::connect().await,
    }
}

/// Attach a container. Rolls back on failure.
pub async fn attach(req: &AttachRequest<'_>) -> Result<Attachment> {
    let served = state::read_network(req.state_dir, req.network)?;
    let net = &served.state;
    let owner = Owner {
        container_id: req.container_id.to_string(),
        ifname: req.ifname.to_string(),
    };
    let allocator = Allocator::for_network(req.state_dir, &served, req.host_ns);
    let ip = allocator.claim(&owner, req.ip).await?;
    let host_veth = host_veth_name(req.network, req.container_id, req.ifname);
    let result = plumb(req, net, ip, &host_veth).await;
    match result {
        Ok(a) => Ok(a),
        Err(e) => {
            // Roll back: the host end takes the container end with it.
            if let Ok(nl) = host_netlink(req.host_ns).await {
                let _ = nl.delete_link(&host_veth).await;
            }
            let _ = allocator.release(&owner).await;
            Err(e)
        }
    }
}

async fn plumb(
    req: &AttachRequest<'_>,
    net: &crate::dataplane::NetworkState,
    ip: Ipv4Addr,
    host_veth: &str,
) -> Result<Attachment> {
    let ctx = || {
        format!(
            "attach container '{}' to network '{}' ({})",
            req.container_id,
            req.network,
            req.container_ns.name()
        )
    };
    let host = host_netlink(req.host_ns).await.with_context(ctx)?;
    let cont = Netlink::connect_in(req.container_ns)
        .await
        .with_context(ctx)?;
    if cont.link_index(req.ifname).await?.is_some() {
        anyhow::bail!(
            "{}: interface {} already exists in namespace {}",
            ctx(),
            req.ifname,
            req.container_ns.name()
        );
    }
    let prefix = match net.mode {
        Mode::Routed => net.subnet.prefix_len(),
        Mode::Bridged => net.subnet.prefix_len(),
    };
    let addr = Ipv4Net::new(ip, prefix).expect("valid prefix");
    let mac = model::container_mac(ip);
    let mtu = req.mtu.unwrap_or(net.mtu);
    host.create_veth(host_veth, req.ifname, Some(req.container_ns), mtu)
        .await
        .with_context(ctx)?;
    host.set_link(
        host_veth,
        LinkOptions {
            master: Some(net.bridge.clone()),
            alias: Some(veth_alias(req.network, req.container_id, req.ifname)),
            up: Some(true),
            ..Default::default()
        },
    )
    .await
    .with_context(ctx)?;
    cont.set_link(
        req.ifname,
        LinkOptions {
            mac: Some(mac),
            mtu: Some(mtu),
            up: Some(true),
            ..Default::default()
        },
    )
    .await
    .with_context(ctx)?;
    cont.add_address(req.ifname, addr).await.with_context(ctx)?;
    let default: Ipv4Net = "0.0.0.0/0".parse().expect("valid");
    match net.gateway {
        Some(gw) => {
            cont.add_route(default, Some(gw), req.ifname, false, None)
                .await
        }
        // Bridged: the segment has no gateway; an on-link default route.
        None => cont.add_route(default, None, req.ifname, false, None).await,
    }
    .with_context(ctx)?;
    Ok(Attachment {
        network: req.network.to_string(),
        container_id: req.container_id.to_string(),
        ifname: req.ifname.to_string(),
        host_veth: host_veth.to_string(),
        ip: addr,
        mac,
        gateway: net.gateway,
        mtu,
    })
}

/// Detach a container: delete its veth (if any) and release its address.
/// Repeating it, or detaching an unknown container, succeeds.
pub async fn detach(
    state_dir: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
    host_ns: Option<&Netns>,
) -> Result<Option<Ipv4Addr>> {
    let host_veth = host_veth_name(network, container_id, ifname);
    let nl = host_netlink(host_ns).await?;
    nl.delete_link(&host_veth).await.with_context(|| {
        format!("detach container '{container_id}' from network '{network}': delete {host_veth}")
    })?;
    let owner = Owner {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    // The network may be gone from this node: then only the file IPAM is left.
    match state::read_network(state_dir, network) {
        Ok(served) => Ok(Allocator::for_network(state_dir, &served, host_ns)
            .release(&owner)
            .await?),
        Err(_) => Ok(Ipam::new(state_dir, network).release(&owner)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name("demo", "c1", "eth0");
        let b = host_veth_name("demo", "c2", "eth0");
        let c = host_veth_name("demo2", "c1", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("vxm-"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, host_veth_name("demo", "c1", "eth0"));
    }
}
