//! Endpoint records of bridged networks (`endpoints/IP`, bound to a
//! node's lease): the compare-and-swap writes that claim, publish, adopt and
//! withdraw them. Attach claims through [`super::claim_address`]; the agent
//! keeps its node's set equal to its local IPAM with [`sync_endpoints`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::Client;

use super::claim::{Claimed, LeaseIds, claim_endpoint, release_endpoint};
use super::records::{self, Keys};
use super::view::Kv;
use super::{Inner, Me};
use crate::config::{Mode, Network};
use crate::model::Endpoint;
use crate::store::error::Result;

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
/// with the reason (another node holds them, or they are not usable).
pub(crate) async fn sync_endpoints(
    inner: &Inner,
    allocated: &BTreeSet<Ipv4Addr>,
) -> Result<Vec<(Ipv4Addr, String)>> {
    let net = inner.network();
    if net.mode != Mode::Bridged {
        return Ok(Vec::new());
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
        if let Err(e) = records::check_endpoint(&net, &ep) {
            refused.push((ip, e));
            continue;
        }
        match claim_endpoint(&inner.client, &inner.keys, owned.leases, &ep, true).await? {
            Claimed::Yes => {
                owned.endpoints.insert(ip, ep);
            }
            Claimed::Taken(holder) => refused.push((ip, format!("held by node {holder}"))),
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
        .view()
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
