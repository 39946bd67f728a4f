//! The agent's error: what failed, with the store, node, network or device
//! the agent was working on, wrapping the typed error of the layer below.

use std::net::Ipv4Addr;

use crate::dataplane::events::SubscribeError;
use crate::dataplane::kernel::{NetlinkError, ReconcileError};
use crate::dataplane::plan::PlanError;
use crate::state::StateError;
use crate::store::StoreError;

/// Why the agent (or one of its passes) failed. The errors of the layers it
/// calls are kept whole; the agent adds which store, node, network or
/// device it was working on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state dir: network files, the plan, the agent lock.
    #[error(transparent)]
    State(#[from] StateError),
    /// The node's address allocations (IPAM files), or joining the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A kernel request or dump.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The published-port records (STATE/ports/).
    #[error(transparent)]
    Ports(#[from] crate::ports::PortError),
    /// The task reading the published-port records failed.
    #[error("read the published ports: {0}")]
    PortsTask(tokio::task::JoinError),
    /// The wake-up socket of the state dir.
    #[error(transparent)]
    Wake(#[from] crate::wake::WakeError),
    /// The cluster cannot be planned for this node.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The secure underlay of encrypted networks (docs/encryption.md).
    #[error(transparent)]
    Secure(#[from] crate::secure::SecureError),
    /// The reconcile pass failed (its apply report is inside; boxed, it is
    /// large).
    #[error(transparent)]
    Reconcile(Box<ReconcileError>),
    /// vxmesh's nftables table could not be read or repaired.
    #[error("firewall (nftables table inet vxmesh): {0}")]
    Firewall(#[from] crate::firewall::NftError),
    /// The firewall pass's thread failed.
    #[error("firewall pass: {0}")]
    FirewallTask(tokio::task::JoinError),
    /// The kernel event subscription could not be set up.
    #[error(transparent)]
    Events(#[from] SubscribeError),
    /// The store's snapshot could not be read.
    #[error("read {store}")]
    Snapshot {
        store: String,
        #[source]
        error: StoreError,
    },
    /// The node's WireGuard keys could not be listed in its record.
    #[error("list this node's WireGuard keys in {store}")]
    PublishKeys {
        store: String,
        #[source]
        error: StoreError,
    },
    /// The store's change watch failed: the agent stops.
    #[error("watching {store}: {error}")]
    Watch { store: String, error: StoreError },
    /// The endpoints of a bridged network could not be published.
    #[error("publish the endpoints of network {network}")]
    PublishEndpoints {
        network: String,
        #[source]
        error: StoreError,
    },
    #[error("node '{node}' is not in the cluster (known: {known}): check --node")]
    UnknownNode {
        node: String,
        /// The cluster's node names, comma separated.
        known: String,
    },
    #[error(
        "underlay IP {ip} of node '{node}' is not on any interface of this host: fix underlay_ip in the cluster file or add the address"
    )]
    UnderlayIpNotHere { ip: Ipv4Addr, node: String },
    #[error("underlay device '{device}' of node '{node}' does not exist")]
    NoUnderlayDevice { device: String, node: String },
    #[error("list interface addresses")]
    Addresses(#[source] nix::Error),
    /// A container veth could not be put back on its network's bridge.
    #[error("re-attach container veth {veth} to {bridge}")]
    Reattach {
        veth: String,
        bridge: String,
        #[source]
        error: Box<NetlinkError>,
    },
    /// A container whose address another node owns now could not be
    /// detached.
    #[error(
        "detach container '{container_id}' from network {network} ({ip} is another node's now)"
    )]
    DetachLost {
        network: String,
        container_id: String,
        ip: Ipv4Addr,
        #[source]
        error: Box<crate::attach::AttachError>,
    },
    /// The blocking task that takes a network's IPAM lock failed.
    #[error("IPAM lock task")]
    IpamTask {
        network: String,
        #[source]
        error: tokio::task::JoinError,
    },
    #[error("install {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("connect to rtnetlink")]
    Connect(#[source] NetlinkError),
}

impl From<ReconcileError> for AgentError {
    fn from(e: ReconcileError) -> Self {
        AgentError::Reconcile(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::chain;

    fn no_device() -> NetlinkError {
        NetlinkError::NoDevice {
            device: "vxm-br0".into(),
            namespace: "host1".into(),
        }
    }

    #[test]
    fn context_comes_first_then_the_cause() {
        let e = AgentError::Reattach {
            veth: "vxm-c1".into(),
            bridge: "vxm-br0".into(),
            error: Box::new(no_device()),
        };
        assert_eq!(
            chain(&e),
            "re-attach container veth vxm-c1 to vxm-br0: device vxm-br0 does not exist in host1"
        );
        let e = AgentError::Snapshot {
            store: "cluster file c.toml".into(),
            error: StoreError::Closed("the store was closed"),
        };
        assert_eq!(chain(&e), "read cluster file c.toml: the store was closed");
    }

    #[test]
    fn errors_of_the_layers_below_read_unchanged() {
        let e = AgentError::from(no_device());
        assert_eq!(chain(&e), chain(&no_device()));
        let e = AgentError::Watch {
            store: "etcd".into(),
            error: StoreError::Closed("watch ended"),
        };
        assert_eq!(chain(&e), "watching etcd: watch ended");
    }

    #[test]
    fn node_errors_say_what_to_fix() {
        let e = AgentError::UnknownNode {
            node: "n9".into(),
            known: "n1, n2".into(),
        };
        assert_eq!(
            e.to_string(),
            "node 'n9' is not in the cluster (known: n1, n2): check --node"
        );
        let e = AgentError::UnderlayIpNotHere {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            node: "n9".into(),
        };
        assert!(
            e.to_string().starts_with(
                "underlay IP 10.0.0.9 of node 'n9' is not on any interface of this host"
            )
        );
    }
}
