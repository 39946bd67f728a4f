//! Where node and endpoint records come from.
//!
//! A [`Store`] yields snapshots of the cluster (networks + node records, and
//! for bridged networks the endpoint records if the store knows them) and
//! tells the agent when something may have changed, and says which
//! [`AddressAllocator`] attach must use for a network ([`AllocatorSpec`]).
//! Nothing outside this module reaches etcd or the cluster file directly.

pub mod allocator;
pub mod error;
pub mod etcd;
pub mod open;
pub mod static_file;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

pub use allocator::{AddressAllocator, Allocator, AllocatorSpec};
pub use error::StoreError;

use crate::config::Cluster;
use crate::model::Endpoint;
use error::Result;

/// A consistent view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub cluster: Cluster,
    /// Endpoints of bridged networks; `None` when the store cannot know them
    /// (static file): the planner then derives them from node slices.
    pub endpoints: Option<Vec<Endpoint>>,
}

/// An address allocated on this node that another node owns now: it claimed
/// the address (bridged) or the subnet holding it (routed) after this
/// node's lease had expired for longer than the grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostAddress {
    pub ip: Ipv4Addr,
    /// The node that owns it now.
    pub owner: String,
}

#[allow(async_fn_in_trait)]
pub trait Store {
    /// Human-readable origin, for logs ("cluster file /etc/vxmesh/cluster.toml").
    fn describe(&self) -> String;
    /// The current records.
    async fn snapshot(&mut self) -> Result<Snapshot>;
    /// Resolves when the records may have changed since the last snapshot.
    async fn changed(&mut self) -> Result<()>;

    /// Which allocator attach/CNI on this node must use for the addresses
    /// of `network` (the agent writes it into the network's state file).
    /// [`AllocatorSpec::Local`]: the node's file IPAM allocates from the
    /// node's pool (static store, routed networks).
    fn allocator(&self, _network: &str) -> AllocatorSpec {
        AllocatorSpec::Local
    }

    /// Make the endpoints this node publishes in `network` equal the
    /// addresses allocated on this node (`allocated`, from the local IPAM):
    /// adopt what attach published, withdraw what is no longer attached.
    /// Returns the allocated addresses another node owns now (this node's
    /// lease expired for longer than the grace period and the other node
    /// claimed them): the agent detaches the containers using them. Stores
    /// without dynamic membership (a static file) do nothing.
    async fn sync_endpoints(
        &mut self,
        _network: &str,
        _allocated: &BTreeSet<Ipv4Addr>,
    ) -> Result<Vec<LostAddress>> {
        Ok(Vec::new())
    }

    /// Whether peers read this node's WireGuard keys from records this
    /// node publishes ([`Store::publish_keys`]).
    fn lists_keys(&self) -> bool {
        false
    }

    /// List this node's WireGuard keys where peers read them (the etcd
    /// node records; secure underlay, docs/encryption.md). Stores whose
    /// keys the operator writes (a cluster file) do nothing.
    async fn publish_keys(&mut self, _keys: crate::secure::ListedKeys) -> Result<()> {
        Ok(())
    }

    /// Graceful leave: withdraw this node's records at once (peers drop it
    /// immediately). Stores without membership (a static file) do nothing.
    async fn leave(self) -> Result<()>
    where
        Self: Sized,
    {
        Ok(())
    }
}
