//! Turning a network namespace into a container on a node's network.
//!
//! `attach`: allocate an address (under the IPAM lock), create a veth pair
//! whose container end is born inside the container namespace, put the host
//! end on the network's bridge, address the container end and give it its
//! default route. A failure rolls back what that call made and nothing
//! else: attaching a container that already has the interface (a repeated
//! CNI ADD) is an error that leaves the working attachment as it is.
//! `detach` undoes an attachment and is idempotent. The lab and the CNI plugin use exactly this code.
//!
//! Where an address comes from is decided by the network's state file (see
//! [`crate::store::Allocator`]): the node's file IPAM, or, for bridged
//! networks on the etcd store, etcd (network-wide, compare-and-swap, the
//! endpoint published under the agent's lease; the file IPAM still records
//! which container holds it).

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::dataplane::kernel::{LinkOptions, Netlink, NetlinkError};
use crate::dataplane::netns::Netns;
use crate::ipam::{Ipam, IpamLock, Owner};
use crate::model::{self, Mac};
use crate::state;
use crate::store::{AddressAllocator, Allocator};

/// Why attaching or detaching a container failed. Failures of the modules
/// attach builds on (state file, file IPAM, etcd, netlink) that carry no
/// attach context of their own are passed on as they are.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The network's state file could not be read.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The network's allocator (file IPAM or etcd) failed; its error says
    /// which address, network, key or lease.
    #[error(transparent)]
    Store(#[from] crate::store::error::StoreError),
    /// The container's published ports could not be removed.
    #[error(transparent)]
    Ports(#[from] crate::ports::PortError),
    /// A netlink connection or query failed with no more to say.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The container already has an interface of that name.
    #[error(
        "attach container '{container_id}' to network '{network}' ({namespace}): interface {ifname} already exists in namespace {namespace}"
    )]
    InterfaceExists {
        container_id: String,
        network: String,
        ifname: String,
        namespace: String,
    },
    /// The container is already attached: its host veth exists.
    #[error(
        "attach container '{container_id}' to network '{network}': it is already attached as {ifname} (host veth {host_veth}); detach it first"
    )]
    AlreadyAttached {
        container_id: String,
        network: String,
        ifname: String,
        host_veth: String,
    },
    /// Creating or configuring the veth pair, address or route failed.
    #[error("attach container '{container_id}' to network '{network}' ({namespace})")]
    Plumb {
        container_id: String,
        network: String,
        ifname: String,
        namespace: String,
        #[source]
        source: NetlinkError,
    },
    /// Deleting the container's host veth failed.
    #[error("detach container '{container_id}' from network '{network}': delete {host_veth}")]
    DeleteVeth {
        container_id: String,
        network: String,
        ifname: String,
        host_veth: String,
        #[source]
        source: NetlinkError,
    },
}

type Result<T, E = AttachError> = std::result::Result<T, E>;

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

/// Put a new host veth on its bridge, then mark it (alias) and bring it
/// up: in this order the agent never sees a marked veth off its bridge or
/// down (the kernel applies a request's flags before its master), which
/// it would take for drift and answer with a full pass.
async fn enslave_then_mark(
    nl: &Netlink,
    veth: &str,
    bridge: &str,
    alias: String,
) -> Result<(), NetlinkError> {
    let on_bridge = LinkOptions {
        master: Some(bridge.to_string()),
        ..Default::default()
    };
    nl.set_link(veth, on_bridge).await?;
    let marked = LinkOptions {
        alias: Some(alias),
        up: Some(true),
        ..Default::default()
    };
    nl.set_link(veth, marked).await
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

/// What the CNI plugin adds to an [`AttachRequest`].
#[derive(Clone, Debug, Default)]
pub struct AttachOptions<'a> {
    /// The CNI network `name` the attachment is made under, recorded with
    /// its allocation so that GC collects only its own attachments.
    pub cni_network: Option<&'a str>,
    /// A MAC for the container interface instead of the one derived from
    /// its address.
    pub mac: Option<Mac>,
}

async fn host_netlink(host_ns: Option<&Netns>) -> Result<Netlink, NetlinkError> {
    match host_ns {
        Some(ns) => Netlink::connect_in(ns).await,
        None => Netlink::connect().await,
    }
}

/// Attach a container. Rolls back on failure.
pub async fn attach(req: &AttachRequest<'_>) -> Result<Attachment> {
    attach_with(req, &AttachOptions::default()).await
}

/// Attach a container with the CNI plugin's extras. A container that
/// already has the interface or its host veth is refused before anything is
/// touched; a failure later undoes only what this call made (the veth it
/// created, the address it newly claimed).
pub async fn attach_with(req: &AttachRequest<'_>, opts: &AttachOptions<'_>) -> Result<Attachment> {
    let served = state::read_network(req.state_dir, req.network).map_err(AttachError::State)?;
    let net = &served.state;
    let owner = Owner {
        container_id: req.container_id.to_string(),
        ifname: req.ifname.to_string(),
    };
    let host_veth = host_veth_name(req.network, req.container_id, req.ifname);
    refuse_existing(req, &host_veth).await?;
    let ipam = Ipam::new(req.state_dir, req.network);
    let held_before = ipam.find(&owner)?;
    let allocator = Allocator::for_network(req.state_dir, &served, req.host_ns);
    let ip = allocator.claim(&owner, req.ip).await?;
    let labelled = match opts.cni_network {
        Some(name) => ipam.label(&owner, name).map_err(AttachError::from),
        None => Ok(()),
    };
    let result = match labelled {
        Ok(()) => plumb(req, net, ip, &host_veth, opts.mac).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(a) => Ok(a),
        Err(e) => {
            // Roll back what this call made: the veth (checked absent
            // above; the host end takes the container end with it) and the
            // address, unless the owner held it before.
            if let Ok(nl) = host_netlink(req.host_ns).await {
                let _ = nl.delete_link(&host_veth).await;
            }
            if held_before.is_none() {
                let _ = allocator.release(&owner).await;
            }
            Err(e)
        }
    }
}

/// Error if the container already has the interface or its host veth.
async fn refuse_existing(req: &AttachRequest<'_>, host_veth: &str) -> Result<()> {
    let ctx = |source: NetlinkError| AttachError::Plumb {
        container_id: req.container_id.to_string(),
        network: req.network.to_string(),
        ifname: req.ifname.to_string(),
        namespace: req.container_ns.name().to_string(),
        source,
    };
    let host = host_netlink(req.host_ns).await.map_err(ctx)?;
    if host.link_index(host_veth).await?.is_some() {
        return Err(AttachError::AlreadyAttached {
            container_id: req.container_id.to_string(),
            network: req.network.to_string(),
            ifname: req.ifname.to_string(),
            host_veth: host_veth.to_string(),
        });
    }
    let cont = Netlink::connect_in(req.container_ns).await.map_err(ctx)?;
    if cont.link_index(req.ifname).await?.is_some() {
        return Err(AttachError::InterfaceExists {
            container_id: req.container_id.to_string(),
            network: req.network.to_string(),
            ifname: req.ifname.to_string(),
            namespace: req.container_ns.name().to_string(),
        });
    }
    Ok(())
}

async fn plumb(
    req: &AttachRequest<'_>,
    net: &crate::dataplane::NetworkState,
    ip: Ipv4Addr,
    host_veth: &str,
    mac: Option<Mac>,
) -> Result<Attachment> {
    let ctx = |source: NetlinkError| AttachError::Plumb {
        container_id: req.container_id.to_string(),
        network: req.network.to_string(),
        ifname: req.ifname.to_string(),
        namespace: req.container_ns.name().to_string(),
        source,
    };
    let host = host_netlink(req.host_ns).await.map_err(ctx)?;
    let cont = Netlink::connect_in(req.container_ns).await.map_err(ctx)?;
    let prefix = match net.mode {
        Mode::Routed => net.subnet.prefix_len(),
        Mode::Bridged => net.subnet.prefix_len(),
    };
    let addr = Ipv4Net::new(ip, prefix).expect("valid prefix");
    let mac = mac.unwrap_or_else(|| model::container_mac(ip));
    let mtu = req.mtu.unwrap_or(net.mtu);
    host.create_veth(host_veth, req.ifname, Some(req.container_ns), mtu)
        .await
        .map_err(ctx)?;
    let alias = veth_alias(req.network, req.container_id, req.ifname);
    enslave_then_mark(&host, host_veth, &net.bridge, alias)
        .await
        .map_err(ctx)?;
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
    .map_err(ctx)?;
    cont.add_address(req.ifname, addr).await.map_err(ctx)?;
    let default: Ipv4Net = "0.0.0.0/0".parse().expect("valid");
    match net.gateway {
        Some(gw) => {
            cont.add_route(default, Some(gw), req.ifname, false, None)
                .await
        }
        // Bridged: the segment has no gateway; an on-link default route.
        None => cont.add_route(default, None, req.ifname, false, None).await,
    }
    .map_err(ctx)?;
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

/// A veth pair born in the node's namespace for a runtime that moves the
/// container end into the container itself and addresses it there (Docker):
/// the host end `host_veth_name(..)` on the network's bridge with the
/// attachment alias (so repair and GC treat it as any attachment), the
/// container end `peer` with the container's MAC and the network's MTU.
/// Rolls back on failure. Returns the host end's name.
pub async fn plumb_host_pair(
    net: &crate::dataplane::NetworkState,
    container_id: &str,
    ifname: &str,
    peer: &str,
    mac: Mac,
    host_ns: Option<&Netns>,
) -> Result<String> {
    let host_veth = host_veth_name(&net.network, container_id, ifname);
    let ctx = |source: NetlinkError| AttachError::Plumb {
        container_id: container_id.to_string(),
        network: net.network.clone(),
        ifname: ifname.to_string(),
        namespace: host_ns.map_or("the node".to_string(), |n| n.name().to_string()),
        source,
    };
    let nl = host_netlink(host_ns).await.map_err(ctx)?;
    // A pair left by an earlier attempt (a Join retried) is made anew.
    let _ = nl.delete_link(&host_veth).await;
    nl.create_veth(&host_veth, peer, None, net.mtu)
        .await
        .map_err(ctx)?;
    let configured = async {
        let alias = veth_alias(&net.network, container_id, ifname);
        enslave_then_mark(&nl, &host_veth, &net.bridge, alias).await?;
        nl.set_link(
            peer,
            LinkOptions {
                mac: Some(mac),
                mtu: Some(net.mtu),
                ..Default::default()
            },
        )
        .await
    }
    .await;
    if let Err(e) = configured {
        let _ = nl.delete_link(&host_veth).await;
        return Err(ctx(e));
    }
    Ok(host_veth)
}

/// Delete the host end of a container's veth (the container end goes with
/// it); deleting one that is gone succeeds.
pub async fn unplumb(
    network: &str,
    container_id: &str,
    ifname: &str,
    host_ns: Option<&Netns>,
) -> Result<()> {
    let host_veth = host_veth_name(network, container_id, ifname);
    let nl = host_netlink(host_ns).await.map_err(AttachError::Netlink)?;
    nl.delete_link(&host_veth)
        .await
        .map_err(|source| AttachError::DeleteVeth {
            container_id: container_id.to_string(),
            network: network.to_string(),
            ifname: ifname.to_string(),
            host_veth: host_veth.clone(),
            source,
        })
}

/// Detach a container: delete its veth (if any), unpublish its ports and
/// release its address.
/// Repeating it, or detaching an unknown container, succeeds.
pub async fn detach(
    state_dir: &Path,
    network: &str,
    container_id: &str,
    ifname: &str,
    host_ns: Option<&Netns>,
) -> Result<Option<Ipv4Addr>> {
    let host_veth = host_veth_name(network, container_id, ifname);
    let nl = host_netlink(host_ns).await.map_err(AttachError::Netlink)?;
    nl.delete_link(&host_veth)
        .await
        .map_err(|source| AttachError::DeleteVeth {
            container_id: container_id.to_string(),
            network: network.to_string(),
            ifname: ifname.to_string(),
            host_veth: host_veth.clone(),
            source,
        })?;
    let owner = Owner {
        container_id: container_id.to_string(),
        ifname: ifname.to_string(),
    };
    crate::ports::unpublish(state_dir, network, &owner)?;
    // The network may be gone from this node: then only the file IPAM is left.
    match state::read_network(state_dir, network) {
        Ok(served) => Ok(Allocator::for_network(state_dir, &served, host_ns)
            .release(&owner)
            .await?),
        Err(_) => Ok(Ipam::new(state_dir, network).release(&owner)?),
    }
}

/// Detach a container whose address `ip` another node owns now (this node
/// lost it while its etcd lease was expired): delete its veth and release
/// its allocation in the file IPAM, under the IPAM lock `lock` the caller
/// holds (no attach or detach of this network is half-way meanwhile), and
/// only if `owner` still holds `ip`. The address is not released in etcd:
/// it is the other node's. Returns whether anything was detached.
pub async fn detach_lost(
    ipam: &Ipam,
    lock: &IpamLock,
    network: &str,
    owner: &Owner,
    ip: Ipv4Addr,
    host_ns: Option<&Netns>,
) -> Result<bool> {
    if ipam.holder(ip)?.as_ref() != Some(owner) {
        return Ok(false);
    }
    unplumb(network, &owner.container_id, &owner.ifname, host_ns).await?;
    Ok(ipam.release_locked(lock, owner)?.is_some())
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

    #[test]
    fn errors_name_the_container_and_read_as_before() {
        let exists = AttachError::InterfaceExists {
            container_id: "c2".into(),
            network: "demo".into(),
            ifname: "eth0".into(),
            namespace: "ns2".into(),
        };
        assert_eq!(
            exists.to_string(),
            "attach container 'c2' to network 'demo' (ns2): interface eth0 already exists in namespace ns2"
        );
        let plumb = anyhow::Error::from(AttachError::Plumb {
            container_id: "c2".into(),
            network: "demo".into(),
            ifname: "eth0".into(),
            namespace: "ns2".into(),
            source: NetlinkError::NoDevice {
                device: "vxm-br0".into(),
                namespace: "host1".into(),
            },
        });
        assert_eq!(
            format!("{plumb:#}"),
            "attach container 'c2' to network 'demo' (ns2): device vxm-br0 does not exist in host1"
        );
    }
}
