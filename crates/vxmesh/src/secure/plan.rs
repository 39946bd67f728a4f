//! The planner's part of the secure underlay: where an encrypted network's
//! VTEP sends (transport addresses instead of underlay addresses), its MTU,
//! and the TUN device and peers this node needs ([`SecurePlan`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::keys::PublicKey;
use super::peers::PeerSpec;
use super::transport::{TUN_NAME, TransportError, tun_mtu};
use crate::config::{Cluster, Network, VXLAN_OVERHEAD};
use crate::model::NodeRecord;

/// The secure underlay of one node, as planned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurePlan {
    /// The TUN device (`vxm-wg0`).
    pub dev: String,
    /// This node's transport address, with the range's prefix.
    pub addr: Ipv4Net,
    pub mtu: u32,
    /// The WireGuard UDP port (every node's).
    pub port: u16,
    /// This node's public key as the store lists it (checked against the
    /// node's own key: peers would fail every handshake otherwise).
    pub own_key: Option<PublicKey>,
    /// The key the store lists beside it during a rotation: once this
    /// node's next key is listed, the node switches to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_next_key: Option<PublicKey>,
    /// Every node this one reaches over an encrypted network, by name.
    pub peers: BTreeMap<String, PlannedPeer>,
}

/// A peer of the secure underlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPeer {
    /// `None`: the store lists no key for it, so it gets no tunnel.
    pub public_key: Option<PublicKey>,
    /// During its rotation, the key it switches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
    pub endpoint: SocketAddrV4,
    pub transport: Ipv4Addr,
}

impl SecurePlan {
    /// The peers that get a tunnel (those with a public key).
    pub fn peer_specs(&self) -> Vec<PeerSpec> {
        self.peers
            .iter()
            .filter_map(|(node, p)| {
                Some(PeerSpec {
                    node: node.clone(),
                    public_key: p.public_key?,
                    next_public_key: p.next_public_key,
                    endpoint: p.endpoint,
                    transport: p.transport,
                })
            })
            .collect()
    }
}

/// The addresses a network's VTEP uses: underlay addresses for a plain
/// network, transport addresses for an encrypted one.
pub fn vtep_addr(
    cluster: &Cluster,
    net: &Network,
    node: &NodeRecord,
) -> Result<Ipv4Addr, TransportError> {
    if net.encrypt {
        cluster.encryption.transport_addr(node)
    } else {
        Ok(node.underlay_ip)
    }
}

/// A network's MTU: as configured, else what fits the underlay (and, for
/// an encrypted network, the TUN device).
pub fn network_mtu(net: &Network, underlay_mtu: u32) -> u32 {
    if net.encrypt {
        net.mtu
            .unwrap_or(tun_mtu(underlay_mtu).saturating_sub(VXLAN_OVERHEAD))
    } else {
        net.effective_mtu(underlay_mtu)
    }
}

/// The secure underlay `me` needs: `None` when it serves no encrypted network.
pub fn plan(
    cluster: &Cluster,
    me: &NodeRecord,
    underlay_mtu: u32,
) -> Result<Option<SecurePlan>, TransportError> {
    let encrypted: Vec<&Network> = cluster
        .networks
        .iter()
        .filter(|n| n.encrypt && me.subnets.contains_key(&n.name))
        .collect();
    if encrypted.is_empty() {
        return Ok(None);
    }
    let enc = &cluster.encryption;
    let mut peers = BTreeMap::new();
    for peer in cluster.nodes.iter().filter(|n| n.name != me.name) {
        if !encrypted.iter().any(|n| peer.subnets.contains_key(&n.name)) {
            continue;
        }
        peers.insert(
            peer.name.clone(),
            PlannedPeer {
                public_key: peer.public_key,
                next_public_key: peer.next_public_key,
                endpoint: SocketAddrV4::new(peer.underlay_ip, enc.port),
                transport: enc.transport_addr(peer)?,
            },
        );
    }
    let addr = Ipv4Net::new(enc.transport_addr(me)?, enc.transport.prefix_len())
        .expect("the range's prefix is valid");
    Ok(Some(SecurePlan {
        dev: TUN_NAME.to_string(),
        addr,
        mtu: tun_mtu(underlay_mtu),
        port: enc.port,
        own_key: me.public_key,
        own_next_key: me.next_public_key,
        peers,
    }))
}

#[cfg(test)]
mod tests;
