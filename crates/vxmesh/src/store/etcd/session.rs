//! This node's side: the lease and its keep-alive, the subnet claim, and the
//! endpoints it publishes (all re-published if the lease is lost).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use ipnet::Ipv4Net;

use super::endpoints::put_endpoint;
use super::records::{self, Keys, NodeJson};
use super::{AbortOnDrop, Backoff, Inner, Me, TaskGuard, lease_opts, op, txn_get, watcher};
use crate::config::Network;
use crate::store::error::{Result, StoreError};

pub(crate) async fn grant(client: &Client, ttl_secs: i64) -> Result<(i64, i64)> {
    let resp = op(
        format!("grant a {ttl_secs}s lease"),
        client.lease_client().grant(ttl_secs, None),
    )
    .await?;
    if !resp.error().is_empty() {
        return Err(StoreError::EtcdRefused {
            op: format!("grant a {ttl_secs}s lease"),
            message: resp.error().to_string(),
        });
    }
    Ok((resp.id(), resp.ttl().max(1)))
}

pub(crate) fn period(ttl_secs: i64) -> Duration {
    Duration::from_millis((ttl_secs.max(1) as u64 * 1000) / 3)
}

/// Refuse to join under a name, or with an underlay IP, that another live
/// node is using (same IP = same VTEP MAC: peers could not tell them apart).
pub(crate) async fn check_identity_free(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
) -> Result<()> {
    let (kvs, _) = watcher::list(client, &keys.nodes()).await?;
    for (key, kv) in kvs {
        let Some(name) = key.strip_prefix(&keys.nodes()) else {
            continue;
        };
        let Ok(n) = records::parse_node(net, name, &kv.value) else {
            continue;
        };
        if n.name == me.node && n.underlay_ip != me.underlay_ip {
            return Err(StoreError::Conflict(format!(
                "node {} is already registered in network {} with underlay IP {} (its lease is still alive): \
                 another host uses this name — give this one its own node name, or wait up to the lease TTL if that host is gone",
                me.node, net.name, n.underlay_ip
            )));
        }
        if n.name != me.node && n.underlay_ip == me.underlay_ip {
            return Err(StoreError::Conflict(format!(
                "underlay IP {} is already used by node {} in network {} (its lease is still alive): \
                 check underlay_ip, or wait up to the lease TTL if that node was renamed",
                me.underlay_ip, n.name, net.name
            )));
        }
    }
    Ok(())
}

/// Keep a lease alive with nothing else (used while joining / re-granting).
pub(crate) async fn simple_keepalive(client: Client, lease: i64, ttl_secs: i64) {
    let Ok((mut keeper, mut stream)) = client.lease_client().keep_alive(lease).await else {
        return;
    };
    loop {
        tokio::time::sleep(period(ttl_secs)).await;
        if keeper.keep_alive().await.is_err() || !matches!(stream.message().await, Ok(Some(_))) {
            return;
        }
    }
}

/// Write claim + node record in one transaction if the subnet is free or
/// already this node's. Returns whether this node now holds it.
async fn try_claim(
    client: &Client,
    keys: &Keys,
    me: &Me,
    lease: i64,
    subnet: Ipv4Net,
) -> Result<bool> {
    let key = keys.subnet(subnet);
    let record = NodeJson {
        name: me.node.clone(),
        underlay_ip: me.underlay_ip,
        underlay_dev: me.underlay_dev.clone(),
        subnet,
    };
    let record = serde_json::to_string(&record).expect("a node record serializes");
    let puts = [
        TxnOp::put(key.clone(), me.node.clone(), lease_opts(lease)),
        TxnOp::put(keys.node(&me.node), record, lease_opts(lease)),
    ];
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(puts.clone())
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = op(format!("claim {key}"), client.kv_client().txn(txn)).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    if txn_get(&resp).is_some_and(|kv| kv.value() == me.node.as_bytes()) {
        // Ours (a previous run, or a previous lease): re-bind it to this lease.
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                me.node.clone(),
            )])
            .and_then(puts);
        return Ok(op(format!("re-claim {key}"), client.kv_client().txn(txn))
            .await?
            .succeeded());
    }
    Ok(false)
}

/// Claim a subnet for this node: its existing claim if any, else `hints`
/// (the subnet it had), else the first free candidate in this node's order.
pub(crate) async fn claim(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    lease: i64,
    hints: &[Ipv4Net],
) -> Result<Ipv4Net> {
    let (kvs, _) = watcher::list(client, &keys.subnets()).await?;
    let mut mine = Vec::new();
    let mut taken = HashSet::new();
    for (key, kv) in &kvs {
        let Some(s) = key
            .strip_prefix(&keys.subnets())
            .and_then(records::parse_subnet_key_part)
        else {
            continue;
        };
        if kv.value == me.node.as_bytes() {
            if records::check_subnet(net, s).is_ok() {
                mine.push(s);
            }
        } else {
            taken.insert(s);
        }
    }
    // Reuse the node record's subnet too (claim lost, record kept).
    let mut first: Vec<Ipv4Net> = mine.clone();
    let resp = op(
        "read node record",
        client.kv_client().get(keys.node(&me.node), None),
    )
    .await?;
    if let Some(kv) = resp.kvs().first()
        && let Ok(n) = records::parse_node(net, &me.node, kv.value())
    {
        first.push(n.subnet);
    }
    first.extend(
        hints
            .iter()
            .copied()
            .filter(|s| records::check_subnet(net, *s).is_ok()),
    );
    let mut tried = HashSet::new();
    let candidates = first
        .into_iter()
        .chain(records::subnet_candidates(net, &me.node).filter(|s| !taken.contains(s)));
    for s in candidates {
        if !tried.insert(s) {
            continue;
        }
        if try_claim(client, keys, me, lease, s).await? {
            // Drop stale duplicate claims of this node (only while still ours).
            for old in mine.iter().filter(|o| **o != s) {
                let k = keys.subnet(*old);
                let txn = Txn::new()
                    .when([Compare::value(k.clone(), CompareOp::Equal, me.node.clone())])
                    .and_then([TxnOp::delete(k.clone(), None)]);
                let _ = op(format!("drop stale claim {k}"), client.kv_client().txn(txn)).await;
            }
            return Ok(s);
        }
    }
    Err(StoreError::SubnetsFull {
        network: net.name.clone(),
        cidr: net.cidr,
        subnet_len: net.subnet_len,
        node: me.node.clone(),
    })
}

enum KeepEnd {
    /// etcd says the lease no longer exists.
    Lost,
    Failed(String),
}

/// Keep the lease alive every TTL/3; on loss, grant a new one and re-publish.
pub(crate) async fn keepalive_loop(inner: Arc<Inner>, mut ttl: i64) {
    let _guard = TaskGuard(inner.clone());
    // Retry at least every TTL/3: once etcd is back (a restart extends
    // leases by about one TTL), the lease must be renewed before it expires.
    let mut backoff = Backoff::capped(period(ttl));
    loop {
        let lease = inner.lease_id.load(Ordering::SeqCst);
        match keep(&inner, lease, ttl, &mut backoff).await {
            KeepEnd::Lost => {
                tracing::warn!(
                    lease,
                    node = %inner.me.node,
                    "etcd lease expired (etcd was unreachable for longer than the TTL, or the lease was revoked): \
                     granting a new one and re-publishing this node's records"
                );
                loop {
                    match regrant(&inner).await {
                        Ok(t) => {
                            ttl = t;
                            break;
                        }
                        Err(e) => {
                            inner.health.lease(false, Some(&format!("{e:#}")));
                            tokio::time::sleep(backoff.next()).await;
                        }
                    }
                }
            }
            KeepEnd::Failed(e) => {
                inner.health.lease(false, Some(&e));
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

async fn keep(inner: &Inner, lease: i64, ttl: i64, backoff: &mut Backoff) -> KeepEnd {
    let period = period(ttl);
    let wait = period.max(Duration::from_secs(1));
    let mut lc = inner.client.lease_client();
    let (mut keeper, mut stream) = match tokio::time::timeout(wait, lc.keep_alive(lease)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
            return KeepEnd::Lost;
        }
        Ok(Err(e)) => return KeepEnd::Failed(format!("lease keep-alive: {e}")),
        Err(_) => return KeepEnd::Failed(format!("lease keep-alive: no answer within {wait:?}")),
    };
    inner.health.lease(true, None);
    backoff.reset();
    loop {
        tokio::time::sleep(period).await;
        let r = tokio::time::timeout(wait, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match r {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return KeepEnd::Lost,
            Ok(Ok(None)) => return KeepEnd::Failed("lease keep-alive stream closed".into()),
            Ok(Err(e)) => return KeepEnd::Failed(format!("lease keep-alive: {e}")),
            Err(_) => {
                return KeepEnd::Failed(format!("lease keep-alive: no answer within {wait:?}"));
            }
        }
    }
}

/// Grant a new lease and re-publish claim, record and endpoints under it.
async fn regrant(inner: &Inner) -> Result<i64> {
    let (lease, ttl) = grant(&inner.client, inner.ttl_secs).await?;
    let early = AbortOnDrop(tokio::spawn(simple_keepalive(
        inner.client.clone(),
        lease,
        ttl,
    )));
    let r = async {
        let mut owned = inner.owned.lock().await;
        let net = inner.network();
        let old = owned.subnet;
        let subnet = claim(&inner.client, &inner.keys, &inner.me, &net, lease, &[old]).await?;
        if subnet != old {
            tracing::warn!(
                %old, new = %subnet,
                "this node's subnet changed: the old one was claimed by another node while this node's lease was expired"
            );
        }
        let mut lost = Vec::new();
        for ep in owned.endpoints.values() {
            if let Err(holder) = put_endpoint(&inner.client, &inner.keys, &inner.me.node, lease, ep).await? {
                tracing::warn!(ip = %ep.ip, "endpoint was taken by {holder} while this node's lease was expired: dropping it");
                lost.push(ep.ip);
            }
        }
        for ip in lost {
            owned.endpoints.remove(&ip);
        }
        owned.lease = lease;
        owned.subnet = subnet;
        inner.lease_id.store(lease, Ordering::SeqCst);
        inner.set_own(subnet);
        // Wake the agent even if the snapshot is unchanged: what it publishes
        // for attach (the lease) changed.
        inner.changes.send_modify(|n| *n += 1);
        tracing::info!(lease, %subnet, endpoints = owned.endpoints.len(), "records re-published under a new lease");
        Ok(ttl)
    }
    .await;
    drop(early);
    if r.is_err() {
        let _ = op(
            "revoke unused lease",
            inner.client.lease_client().revoke(lease),
        )
        .await;
    }
    r
}
