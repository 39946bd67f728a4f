//! Endpoint records of bridged networks (`endpoints/IP`, bound to a
//! node's lease): the compare-and-swap writes that claim, publish, adopt and
//! withdraw them. Attach claims through [`super::claim_address`]; the agent
//! keeps its node's set equal to its local IPAM with [`sync_endpoints`],
//! which also names the allocated addresses another node owns now.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::Client;

use ipnet::Ipv4Net;

use super::claim::{Claimed, LeaseIds, UNREADABLE_HOLDER, claim_endpoint, release_endpoint};
use super::records::{self, Keys};
use super::view::Kv;
use super::{Inner, Me};
use crate::config::{Mode, Network};
use crate::model::{Endpoint, NodeRecord};
use crate::store::LostAddress;
use crate::store::error::Result;

/// An address allocated on this node that [`sync_endpoints`] could not
/// publish, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub ip: Ipv4Addr,
    pub why: String,
    /// The node that owns the address now (this node lost it: its
    /// container must be detached); `None`: the address is not usable
    /// here for another reason (outside the network, unreadable record).
    pub owner: Option<String>,
}

impl Refused {
    pub fn lost(&self) -> Option<LostAddress> {
        self.owner.as_ref().map(|owner| LostAddress {
            ip: self.ip,
            owner: owner.clone(),
        })
    }
}

/// At join: re-bind this node's endpoints left by a previous run (as
/// listed in `seen`, read before the grant) to the new leases.
pub(crate) async fn adopt_endpoints(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    leases: LeaseIds,
    seen: &BTreeMap<String, Kv>,
) -> Result<BTreeMap<Ipv4Addr, Endpoint>> {
    let prefix = keys.endpoints();
    let mut out = BTreeMap::new();
    for (key, kv) in seen.range(prefix.clone()..) {
        let Some(ip) = key.strip_prefix(&prefix) else {
            break;
        };
        let Ok(ep) = records::parse_endpoint(net, ip, &kv.value) else {
            continue;
        };
        if ep.node != me.node {
            continue;
        }
        if claim_endpoint(client, keys, leases, &ep, true).await? == Claimed::Yes {
            out.insert(ep.ip, ep);
        }
    }
    Ok(out)
}

/// Make this node's published endpoints equal `allocated`: publish the
/// missing ones (bound to the lease, so a re-grant re-publishes them),
/// withdraw the others. Returns the addresses that could not be published,
/// with the reason; those another node holds (it claimed them while this
/// node's lease was expired past the grace period: the claim is a fresh
/// compare-and-swap, never a stale view) name that node. Routed networks:
/// nothing is published; the addresses in a subnet another node holds are
/// returned as lost (never one of the subnet this node serves).
pub(crate) async fn sync_endpoints(
    inner: &Inner,
    allocated: &BTreeSet<Ipv4Addr>,
) -> Result<Vec<Refused>> {
    let net = inner.network();
    if net.mode != Mode::Bridged {
        let (serving, nodes) = {
            let v = inner.fresh_view();
            (v.serving(), v.snapshot().cluster.nodes.clone())
        };
        return Ok(lost_to_subnets(
            &inner.me.node,
            serving,
            &nodes,
            &net.name,
            allocated,
        ));
    }
    let mut owned = inner.owned.lock().await;
    let mut refused = Vec::new();
    let missing: Vec<Ipv4Addr> = allocated
        .iter()
        .filter(|ip| !owned.endpoints.contains_key(ip))
        .copied()
        .collect();
    for ip in missing {
        let ep = Endpoint {
            network: net.name.clone(),
            ip,
            mac: crate::model::container_mac(ip),
            node: inner.me.node.clone(),
        };
        if let Err(why) = records::check_endpoint(&net, &ep) {
            refused.push(Refused {
                ip,
                why,
                owner: None,
            });
            continue;
        }
        match claim_endpoint(&inner.client, &inner.keys, owned.leases, &ep, true).await? {
            Claimed::Yes => {
                owned.endpoints.insert(ip, ep);
            }
            Claimed::Taken(holder) if holder == UNREADABLE_HOLDER => refused.push(Refused {
                ip,
                why: format!("held by {holder}"),
                owner: None,
            }),
            Claimed::Taken(holder) => refused.push(Refused {
                ip,
                why: format!("held by node {holder}"),
                owner: Some(holder),
            }),
        }
    }
    // Withdraw what this node holds but no longer has attached: its own
    // endpoints, and any endpoint of this node the view shows (a claim whose
    // attach died before recording it locally). The caller holds the IPAM
    // lock, so no attach or detach is half-way.
    let mut stale: BTreeSet<Ipv4Addr> = owned
        .endpoints
        .keys()
        .filter(|ip| !allocated.contains(ip))
        .copied()
        .collect();
    let seen: Vec<Ipv4Addr> = inner
        .fresh_view()
        .snapshot()
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.node == inner.me.node && !allocated.contains(&e.ip))
        .map(|e| e.ip)
        .collect();
    stale.extend(seen);
    for ip in stale {
        release_endpoint(&inner.client, &inner.keys, &inner.me.node, ip).await?;
        owned.endpoints.remove(&ip);
    }
    Ok(refused)
}

/// Routed: the addresses of `allocated` that lie in the subnet of another
/// node of `nodes` (the view's accepted records), that node named; never
/// one in `serving`, the subnet this node serves.
fn lost_to_subnets(
    me: &str,
    serving: Option<Ipv4Net>,
    nodes: &[NodeRecord],
    network: &str,
    allocated: &BTreeSet<Ipv4Addr>,
) -> Vec<Refused> {
    let mut out = Vec::new();
    for ip in allocated {
        if serving.is_some_and(|s| s.contains(ip)) {
            continue;
        }
        let owner = nodes
            .iter()
            .filter(|n| n.name != me)
            .find(|n| n.subnets.get(network).is_some_and(|s| s.contains(ip)));
        if let Some(n) = owner {
            out.push(Refused {
                ip: *ip,
                why: format!("in subnet {} of node {}", n.subnets[network], n.name),
                owner: Some(n.name.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(name: &str, subnet: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), subnet.parse().unwrap())]),
            public_key: None,
            next_public_key: None,
        }
    }

    #[test]
    fn routed_addresses_in_another_nodes_subnet_are_lost() {
        let nodes = [
            node("a", "10.9.1.0/24"),
            node("b", "10.9.0.0/24"),
            node("c", "10.9.2.0/24"),
        ];
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let allocated = BTreeSet::from([ip("10.9.0.5"), ip("10.9.1.7"), ip("10.9.3.9")]);
        // a lost 10.9.0.0/24 to b and serves 10.9.1.0/24 now: only the
        // address in b's subnet is lost (10.9.3.9 is nobody's).
        let lost = lost_to_subnets(
            "a",
            Some("10.9.1.0/24".parse().unwrap()),
            &nodes,
            "demo",
            &allocated,
        );
        assert_eq!(
            lost.iter().filter_map(Refused::lost).collect::<Vec<_>>(),
            [LostAddress {
                ip: ip("10.9.0.5"),
                owner: "b".into()
            }]
        );
        // Never an address of the subnet this node serves, even if another
        // record (stale or conflicting) covers it.
        let nodes = [node("b", "10.9.0.0/16")];
        let lost = lost_to_subnets(
            "a",
            Some("10.9.1.0/24".parse().unwrap()),
            &nodes,
            "demo",
            &allocated,
        );
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(lost.iter().all(|r| r.ip != ip("10.9.1.7")));
        // Not serving (its subnet is another node's, none free): every
        // address in another node's subnet is lost; other networks' records
        // count for nothing.
        let lost = lost_to_subnets("a", None, &nodes, "demo", &allocated);
        assert_eq!(lost.len(), 3);
        assert!(lost_to_subnets("a", None, &nodes, "other", &allocated).is_empty());
    }
}
