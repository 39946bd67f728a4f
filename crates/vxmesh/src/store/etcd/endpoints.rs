//! Endpoint records of bridged networks (`endpoints/IP`, bound to a
//! node's lease): the compare-and-swap writes that claim, publish, adopt and
//! withdraw them. Attach claims through [`super::claim_address`]; the agent
//! keeps its node's set equal to its local IPAM with [`sync_endpoints`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use super::records::{self, Keys};
use super::{Inner, Me, lease_opts, op, txn_get, watcher};
use crate::config::{Mode, Network};
use crate::model::Endpoint;
use crate::store::error::{Result, StoreError};

/// Create `endpoints/IP` under `lease` if absent.
pub(crate) async fn create_endpoint(
    client: &Client,
    keys: &Keys,
    lease: i64,
    ep: &Endpoint,
) -> Result<bool> {
    let key = keys.endpoint(ep.ip);
    let value = serde_json::to_string(ep).expect("an endpoint serializes");
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), value, lease_opts(lease))]);
    Ok(op(format!("allocate {key}"), client.kv_client().txn(txn))
        .await?
        .succeeded())
}

/// Publish `ep` under `lease` if its address is free or already `node`'s.
/// `Ok(Err(holder))` names whoever holds it otherwise.
pub(crate) async fn put_endpoint(
    client: &Client,
    keys: &Keys,
    node: &str,
    lease: i64,
    ep: &Endpoint,
) -> Result<std::result::Result<(), String>> {
    let key = keys.endpoint(ep.ip);
    let value = serde_json::to_string(ep).expect("an endpoint serializes");
    for _ in 0..5 {
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.clone(), lease_opts(lease))])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = op(format!("publish {key}"), client.kv_client().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Ok(()));
        }
        let Some(kv) = txn_get(&resp) else { continue };
        match serde_json::from_slice::<Endpoint>(kv.value()) {
            Ok(old) if old.node == node => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([TxnOp::put(key.clone(), value.clone(), lease_opts(lease))]);
                if op(format!("re-publish {key}"), client.kv_client().txn(txn))
                    .await?
                    .succeeded()
                {
                    return Ok(Ok(()));
                }
            }
            Ok(old) => return Ok(Err(format!("node {}", old.node))),
            Err(_) => return Ok(Err(format!("an unreadable record (delete key {key})"))),
        }
    }
    Err(StoreError::KeyKeptChanging { op: "publish", key })
}

/// At join: re-bind this node's endpoints left by a previous run to the new lease.
pub(crate) async fn adopt_endpoints(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    lease: i64,
) -> Result<BTreeMap<Ipv4Addr, Endpoint>> {
    let (kvs, _) = watcher::list(client, &keys.endpoints()).await?;
    let mut out = BTreeMap::new();
    for (key, kv) in kvs {
        let Some(ip) = key.strip_prefix(&keys.endpoints()) else {
            continue;
        };
        let Ok(ep) = records::parse_endpoint(net, ip, &kv.value) else {
            continue;
        };
        if ep.node != me.node {
            continue;
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_rev,
            )])
            .and_then([TxnOp::put(key.clone(), kv.value.clone(), lease_opts(lease))]);
        if op(format!("adopt {key}"), client.kv_client().txn(txn))
            .await?
            .succeeded()
        {
            out.insert(ep.ip, ep);
        }
    }
    Ok(out)
}

/// Delete `endpoints/IP` if `node` holds it (absent, or held by another
/// node after a migration, is fine and deletes nothing).
pub(crate) async fn delete_endpoint_if_ours(
    client: &Client,
    keys: &Keys,
    node: &str,
    ip: Ipv4Addr,
) -> Result<()> {
    let key = keys.endpoint(ip);
    for _ in 0..5 {
        let resp = op(
            format!("read {key}"),
            client.kv_client().get(key.clone(), None),
        )
        .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(());
        };
        match serde_json::from_slice::<Endpoint>(kv.value()) {
            Ok(ep) if ep.node == node => {}
            Ok(ep) => {
                tracing::debug!(%ip, holder = %ep.node, "release: the address is now held by another node, leaving it");
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(key.clone(), None)]);
        if op(format!("release {key}"), client.kv_client().txn(txn))
            .await?
            .succeeded()
        {
            return Ok(());
        }
    }
    Err(StoreError::KeyKeptChanging { op: "release", key })
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
        let lease = owned.lease;
        match put_endpoint(&inner.client, &inner.keys, &inner.me.node, lease, &ep).await? {
            Ok(()) => {
                owned.endpoints.insert(ip, ep);
            }
            Err(holder) => refused.push((ip, format!("held by {holder}"))),
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
        delete_endpoint_if_ours(&inner.client, &inner.keys, &inner.me.node, ip).await?;
        owned.endpoints.remove(&ip);
    }
    Ok(refused)
}
