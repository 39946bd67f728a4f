//! Helpers of the etcd store tests: a network, per-node options, the
//! network's creation, a join, and the section attach reads - all with the
//! tests' short TTL and the default prefix.

use std::net::Ipv4Addr;
use std::time::Duration;

use vxmesh::config::{Mode, Network};
use vxmesh::model::Vni;
use vxmesh::state::EtcdSection;
use vxmesh::store::etcd::{self, ClientOptions, EtcdOptions, EtcdStore};

use super::EtcdServer;

/// The lease TTL of the store tests: short, so expiry is quick to see.
pub const TTL: Duration = Duration::from_secs(2);
pub const PREFIX: &str = "/vxmesh";

pub fn network(name: &str, mode: Mode, cidr: &str, subnet_len: u8) -> Network {
    Network {
        outbound_nat: true,
        name: name.into(),
        mode,
        cidr: cidr.parse().unwrap(),
        subnet_len,
        vni: Vni::new(100).unwrap(),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    }
}

/// Node `i`'s underlay address (198.18.0.1 + i).
pub fn underlay(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i)
}

pub fn opts(srv: &EtcdServer, net: &Network, node: &str, i: u32) -> EtcdOptions {
    let mut o = EtcdOptions::new(srv.endpoints(), &net.name, node, underlay(i));
    o.ttl = TTL;
    o
}

pub async fn setup(srv: &EtcdServer, net: &Network) {
    etcd::create_network(&ClientOptions::new(srv.endpoints()), PREFIX, net, None)
        .await
        .expect("create network");
}

pub async fn join(srv: &EtcdServer, net: &Network, node: &str, i: u32) -> EtcdStore {
    EtcdStore::join(opts(srv, net, node, i))
        .await
        .unwrap_or_else(|e| panic!("join {node}: {e:#}"))
}

/// What the agent writes into a bridged network's state file for attach on
/// `store`'s node (plain http, no user): the input of the production claim
/// path, [`etcd::claim_address`] / [`etcd::release_address`].
pub fn section(srv: &EtcdServer, store: &EtcdStore) -> EtcdSection {
    EtcdSection {
        endpoints: srv.endpoints(),
        prefix: PREFIX.into(),
        network: store.network().name,
        node: store.node().into(),
        lease: store.lease_id(),
        hold_lease: store.hold_lease_id(),
        ca: None,
        cert: None,
        key: None,
        user: None,
        password_file: None,
    }
}
