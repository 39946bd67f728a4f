//! Turning a network namespace into a container on a node's network.
//!
//! `attach`: allocate an address (under the IPAM lock), create a veth pair
//! whose container end is born inside the container namespace, put the host
//! end on the network's bridge, address the container end and give it its
//! default route. Any failure rolls back what was done. `detach` undoes it
//! and is idempotent. The lab and the CNI plugin use exactly this code.
//!
//! Where an address comes from is decided by the network's state file (see
//! [`Allocator`]): the node's file IPAM, or, for bridged networks on the etcd
//! store, etcd (network-wide, compare-and-swap, the endpoint published under
//! the agent's lease; the file IPAM still records which container holds it).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::kernel::{LinkOptions, Netlink};
use crate::dataplane::netns::Netns;
use crate::ipam::{Ipam, IpamLock, Owner};
use crate::model::{self, Mac};
use crate::state::{self, EtcdSection, ServedNetwork};
use crate::store::etcd;

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
    format!(
        "{}veth:{network}:{ifname}:{container_id}",
        model::OWNER_ALIAS_PREFIX
    )
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
    Ok(match host_ns {
        Some(ns) => Netlink::connect_in(ns).await?,
        None => Netlink::connect().await?,
    })
}

/// Where the addresses of a network come from, as its state file says.
pub enum Allocator<'a> {
    /// The node's file IPAM, from the node's pool (static store; routed
    /// networks, whose node subnet is the node's alone).
    Local,
    /// etcd, network-wide, bound to the agent's lease (bridged networks on
    /// the etcd store).
    Etcd(&'a EtcdSection),
}

impl Allocator<'_> {
    pub fn of(served: &ServedNetwork) -> Allocator<'_> {
        match &served.etcd {
            Some(sec) if served.state.mode == Mode::Bridged => Allocator::Etcd(sec),
            _ => Allocator::Local,
        }
    }
}

/// Run an etcd job where etcd is reachable: in the node's namespace when
/// attaching from outside it (the lab), else right here.
async fn in_host_ns<T, F, Fut>(host_ns: Option<&Netns>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    match host_ns {
        Some(ns) => ns.run_async(f).await,
        None => f().await,
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
    let ipam = Ipam::new(req.state_dir, req.network);
    let (ip, etcd) = match Allocator::of(&served) {
        Allocator::Local => (ipam.allocate(net, &owner, req.ip)?, None),
        Allocator::Etcd(sec) => {
            let (ip, sec) = allocate_in_etcd(req, &served, &ipam, &owner, sec.clone()).await?;
            (ip, Some(sec))
        }
    };
    let host_veth = host_veth_name(req.network, req.container_id, req.ifname);
    let result = plumb(req, net, ip, &host_veth).await;
    match result {
        Ok(a) => Ok(a),
        Err(e) => {
            // Roll back: the host end takes the container end with it.
            if let Ok(nl) = host_netlink(req.host_ns).await {
                let _ = nl.delete_link(&host_veth).await;
            }
            let _ = ipam.release(&owner);
            if let Some(sec) = etcd {
                let _ = in_host_ns(req.host_ns, move || async move {
                    etcd::release_address(&sec, ip).await
                })
                .await;
            }
            Err(e)
        }
    }
}

/// Claim an address network-wide in etcd (the owner's own, `req.ip`, or a
/// free one from the node's slice on) and record it in the file IPAM, all
/// under the IPAM lock (the agent publishes the node's endpoints under it
/// too). If the agent's lease is gone, wait a moment for the agent to write
/// a renewed one into the state file and retry. Returns the address and the
/// etcd section used.
async fn allocate_in_etcd(
    req: &AttachRequest<'_>,
    served: &ServedNetwork,
    ipam: &Ipam,
    owner: &Owner,
    mut sec: EtcdSection,
) -> Result<(Ipv4Addr, EtcdSection)> {
    let lock: IpamLock = ipam.lock()?;
    let held = ipam.find(owner)?;
    let want = held.or(req.ip);
    if held.is_none()
        && let Some(w) = want
        && let Some(a) = ipam.list()?.into_iter().find(|a| a.ip == w)
    {
        anyhow::bail!(
            "address {w} of network '{}' is already allocated on this node to {}/{}",
            req.network,
            a.owner.container_id,
            a.owner.ifname
        );
    }
    let start = served.state.pool.network();
    let mut renewals = 0;
    let ep = loop {
        let s = sec.clone();
        match in_host_ns(req.host_ns, move || async move {
            etcd::claim_address(&s, want, start).await
        })
        .await
        {
            Ok(ep) => break ep,
            Err(e) if renewals < 3 && e.downcast_ref::<etcd::LeaseGone>().is_some() => {
                renewals += 1;
                sec = wait_for_new_lease(
                    req.state_dir,
                    req.network,
                    sec.lease,
                    Duration::from_secs(5),
                )
                .await
                .ok_or(e)?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("allocate an address of network '{}' in etcd", req.network)
                });
            }
        }
    };
    if let Err(e) = ipam.record(&lock, owner, ep.ip) {
        let (s, ip) = (sec.clone(), ep.ip);
        let _ = in_host_ns(req.host_ns, move || async move {
            etcd::release_address(&s, ip).await
        })
        .await;
        return Err(e);
    }
    Ok((ep.ip, sec))
}

/// The network's etcd section once the agent has written a lease other
/// than `old` (it renews a lost lease within a few seconds), or None.
async fn wait_for_new_lease(
    state_dir: &Path,
    network: &str,
    old: i64,
    timeout: Duration,
) -> Option<EtcdSection> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(s) = state::read_network(state_dir, network)
            && let Some(sec) = s.etcd
            && sec.lease != old
        {
            return Some(sec);
        }
    }
    None
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
    let ipam = Ipam::new(state_dir, network);
    // The network may be gone from this node: then only the file IPAM is left.
    let served = state::read_network(state_dir, network).ok();
    let Some(Allocator::Etcd(sec)) = served.as_ref().map(Allocator::of) else {
        return ipam.release(&owner);
    };
    let sec = sec.clone();
    let lock = ipam.lock()?;
    let ip = ipam.release_locked(&lock, &owner)?;
    if let Some(ip) = ip
        && let Err(e) = in_host_ns(host_ns, move || async move {
            etcd::release_address(&sec, ip).await
        })
        .await
    {
        // The agent withdraws it (it publishes exactly what the file IPAM holds).
        tracing::warn!(
            "detach {container_id}: {ip} stays published in etcd until the agent withdraws it: {e:#}"
        );
    }
    drop(lock);
    Ok(ip)
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
