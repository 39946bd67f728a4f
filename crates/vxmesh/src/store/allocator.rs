//! Where a container's address comes from. The [`AddressAllocator`] trait
//! is what attach (CLI, CNI, lab) calls; the store decides which one a
//! network uses ([`AllocatorSpec`], written by the agent into the network's
//! state file) and [`Allocator::for_network`] turns that into the allocator.

use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::Result;
use super::etcd::EtcdAllocator;
use crate::config::Mode;
use crate::dataplane::netns::Netns;
use crate::ipam::{Ipam, LocalAllocator, Owner};
use crate::state::{EtcdSection, ServedNetwork};

/// Which allocator hands out a network's addresses on a node, as the store
/// says. In the state file it is the optional `etcd` section: absent means
/// [`AllocatorSpec::Local`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Option<EtcdSection>", into = "Option<EtcdSection>")]
pub enum AllocatorSpec {
    /// The node's file IPAM, from the node's pool (static store; routed
    /// networks, whose node subnet is the node's alone).
    #[default]
    Local,
    /// etcd, network-wide, each address bound to the agent's lease (bridged
    /// networks on the etcd store).
    Etcd(Box<EtcdSection>),
}

impl AllocatorSpec {
    pub fn is_local(&self) -> bool {
        matches!(self, AllocatorSpec::Local)
    }
}

impl From<Option<EtcdSection>> for AllocatorSpec {
    fn from(s: Option<EtcdSection>) -> Self {
        s.map_or(AllocatorSpec::Local, |sec| {
            AllocatorSpec::Etcd(Box::new(sec))
        })
    }
}

impl From<AllocatorSpec> for Option<EtcdSection> {
    fn from(s: AllocatorSpec) -> Self {
        match s {
            AllocatorSpec::Local => None,
            AllocatorSpec::Etcd(sec) => Some(*sec),
        }
    }
}

/// Hands out the addresses of one network on one node. Every claim is
/// recorded in the node's file IPAM too (which container holds which
/// address), so detach, GC and the agent's endpoint sync read one place.
#[allow(async_fn_in_trait)]
pub trait AddressAllocator {
    /// An address for `owner`: the one it already holds, else `want` if
    /// given (an error if it is not free), else a free one.
    async fn claim(&self, owner: &Owner, want: Option<Ipv4Addr>) -> Result<Ipv4Addr>;
    /// Give back what `owner` holds, returning it (`None`: nothing held;
    /// releasing twice is fine).
    async fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>>;
}

/// The allocator a network's state file names.
pub enum Allocator<'a> {
    Local(LocalAllocator),
    Etcd(EtcdAllocator<'a>),
}

impl<'a> Allocator<'a> {
    /// The allocator of `served` (a network's state file in `state_dir`).
    /// `host_ns`: the node's namespace when attaching from outside it (the
    /// lab); network-wide allocators talk to their store from in there.
    pub fn for_network(
        state_dir: &Path,
        served: &ServedNetwork,
        host_ns: Option<&'a Netns>,
    ) -> Allocator<'a> {
        let ipam = Ipam::new(state_dir, &served.state.network);
        match &served.allocator {
            AllocatorSpec::Etcd(sec) if served.state.mode == Mode::Bridged => Allocator::Etcd(
                EtcdAllocator::new(ipam, state_dir, served, (**sec).clone(), host_ns),
            ),
            _ => Allocator::Local(LocalAllocator::new(ipam, served.state.clone())),
        }
    }
}

impl AddressAllocator for Allocator<'_> {
    async fn claim(&self, owner: &Owner, want: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        match self {
            Allocator::Local(a) => a.claim(owner, want).await,
            Allocator::Etcd(a) => a.claim(owner, want).await,
        }
    }

    async fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        match self {
            Allocator::Local(a) => a.release(owner).await,
            Allocator::Etcd(a) => a.release(owner).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_reads_and_writes_the_state_file_etcd_section() {
        let sec = EtcdSection {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/vxmesh".into(),
            network: "seg".into(),
            node: "a".into(),
            lease: 7,
            hold_lease: 0,
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        };
        let etcd = AllocatorSpec::Etcd(Box::new(sec.clone()));
        assert_eq!(
            serde_json::to_value(&etcd).unwrap(),
            serde_json::to_value(Some(&sec)).unwrap()
        );
        let back: AllocatorSpec =
            serde_json::from_value(serde_json::to_value(&sec).unwrap()).unwrap();
        assert_eq!(back, etcd);
        let local: AllocatorSpec = serde_json::from_str("null").unwrap();
        assert!(local.is_local());
    }
}
