//! This node's side: its two kept leases (node and hold), the subnet claim,
//! and the supervisor that re-grants a lost lease and re-publishes the
//! node's records under it (its own subnet and endpoints when still free).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::Client;
use ipnet::Ipv4Net;
use tokio::time::Instant;

use super::claim::{Claimed, LeaseIds, claim_endpoint, claim_subnet, release_subnet};
use super::client::ClientOptions;
use super::lease::{self, KeptLease, LeaseState};
use super::records::{self, Keys};
use super::view::Kv;
use super::{Backoff, Inner, Me, TaskGuard};
use crate::config::Network;
use crate::metrics::Metrics;
use crate::store::error::{Result, StoreError};

/// TTL of the hold lease for a node lease of `ttl_secs`: the grace period
/// during which a subnet or address freed by the node lease's expiry stays
/// quarantined (only its holder may take it back) is two more TTLs, so a
/// node cut off for somewhat longer than its TTL still finds its subnet
/// waiting when it comes back (renewals of the two leases are not in step:
/// one TTL of grace could be nearly gone by the time the node lease ends).
pub(crate) fn hold_ttl(ttl_secs: i64) -> i64 {
    ttl_secs * 3
}

/// Longest pause between re-grant attempts while a lease is lost: short,
/// so a node whose partition heals is back within a second, well inside
/// the grace period.
const REGRANT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// A node's two leases in one network, each kept alive from its grant on.
pub(crate) struct Kept {
    pub node: KeptLease,
    pub hold: KeptLease,
    /// How the keepers reconnect when their member stops answering.
    reconnect: Option<Arc<ClientOptions>>,
    /// Counts the re-grants (`vxmesh_etcd_lease_regrants_total`).
    metrics: Metrics,
}

impl Kept {
    pub(crate) async fn grant(
        client: &Client,
        ttl_secs: i64,
        reconnect: Option<Arc<ClientOptions>>,
        metrics: Metrics,
    ) -> Result<Kept> {
        // Both at once: one round trip to a loaded etcd, not two.
        let (node, hold) = tokio::try_join!(
            KeptLease::grant(client, ttl_secs, reconnect.clone()),
            KeptLease::grant(client, hold_ttl(ttl_secs), reconnect.clone()),
        )?;
        Ok(Kept {
            node,
            hold,
            reconnect,
            metrics,
        })
    }

    pub(crate) fn ids(&self) -> LeaseIds {
        LeaseIds {
            node: self.node.id,
            hold: self.hold.id,
        }
    }

    pub(crate) fn any_lost(&self) -> bool {
        self.node.is_lost() || self.hold.is_lost()
    }

    /// Resolves when etcd says either lease is gone.
    pub(crate) async fn lost(&self) {
        tokio::select! {
            _ = self.node.lost() => {}
            _ = self.hold.lost() => {}
        }
    }

    /// Replace the leases etcd said are gone (all of them when `all`: a
    /// request found one gone before its keeper did).
    /// When one lease is lost, the other is asked about too (both are
    /// often lost together: an outage, `vxmesh leave`), so that one
    /// re-grant renews both.
    async fn renew(&mut self, client: &Client, ttl_secs: i64, all: bool) -> Result<()> {
        let either = self.any_lost();
        let mut granted = false;
        if all || self.node.is_lost() || (either && !lease::exists(client, self.node.id).await?) {
            self.node = KeptLease::grant(client, ttl_secs, self.reconnect.clone()).await?;
            granted = true;
        }
        if all || self.hold.is_lost() || (either && !lease::exists(client, self.hold.id).await?) {
            self.hold =
                KeptLease::grant(client, hold_ttl(ttl_secs), self.reconnect.clone()).await?;
            granted = true;
        }
        if granted {
            self.metrics.lease_regranted();
        }
        Ok(())
    }
}

/// How many times one claim is redone at once because a lease vanished.
const LEASE_REGRANTS: u32 = 3;

/// [`claim`] under `kept`'s leases, run against their loss: a lease that
/// vanishes before or during the claim is re-granted and the claim (only
/// the claim) redone at once.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn claim_kept(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    ttl_secs: i64,
    kept: &mut Kept,
    seen: &BTreeMap<String, Kv>,
    hints: &[Ipv4Net],
    ident: &mut i64,
) -> Result<Ipv4Net> {
    let mut regrants = 0;
    loop {
        let mut all = false;
        if !kept.any_lost() {
            let r = tokio::select! {
                r = claim(client, keys, me, net, kept.ids(), seen, hints, ident) => Some(r),
                _ = kept.lost() => None,
            };
            match r {
                Some(Ok(s)) if !kept.any_lost() => return Ok(s),
                Some(Err(e)) if !e.is_lease_not_found() || regrants >= LEASE_REGRANTS => {
                    return Err(e);
                }
                Some(Err(_)) => all = true,
                _ => {}
            }
        }
        if regrants >= LEASE_REGRANTS {
            return Err(StoreError::LeaseGone {
                lease: kept.node.id,
            });
        }
        regrants += 1;
        tracing::info!(
            node = %me.node, network = %net.name,
            "a lease vanished during the claim (etcd slow or overloaded?): re-granting it and claiming again"
        );
        kept.renew(client, ttl_secs, all).await?;
    }
}

/// Claim a subnet for this node: its existing claim if any, else its node
/// record's, else `hints` (the subnet it had), else the first free
/// candidate in this node's order. `seen` is a listing of the network read
/// before the lease was granted (stale values only cost a compare that
/// fails and reads them back); `ident` the mod revision of this node's
/// record at the identity check.
#[allow(clippy::too_many_arguments)] // one claim: who, where, under which leases, from what was read
pub(crate) async fn claim(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    leases: LeaseIds,
    seen: &BTreeMap<String, Kv>,
    hints: &[Ipv4Net],
    ident: &mut i64,
) -> Result<Ipv4Net> {
    let mut seen = seen.clone();
    let Holdings {
        mine,
        mut taken,
        held_mine,
    } = holdings(&seen, keys, &me.node, net);
    let mut first: Vec<Ipv4Net> = mine.clone();
    // Reuse the node record's subnet too (claim lost, record kept).
    if let Some(kv) = seen.get(&keys.node(&me.node))
        && let Ok(n) = records::parse_node(net, &me.node, &kv.value)
    {
        first.push(n.subnet);
    }
    first.extend(hints.iter().copied());
    first.extend(held_mine);
    first.retain(|s| records::check_subnet(net, *s).is_ok());
    let mut first = first.into_iter();
    let mut candidates = records::subnet_candidates(net, &me.node);
    let mut tried = HashSet::new();
    loop {
        let next = first.next().or_else(|| {
            candidates
                .by_ref()
                .find(|s| !taken.contains(s) && !tried.contains(s))
        });
        let Some(s) = next else { break };
        if !tried.insert(s) {
            continue;
        }
        match claim_subnet(client, keys, me, net, leases, s, &mut seen, ident).await? {
            Claimed::Yes => {
                // Drop stale duplicate claims of this node (only while still ours).
                for old in mine.iter().filter(|o| **o != s) {
                    let _ = release_subnet(client, keys, &me.node, *old).await;
                }
                return Ok(s);
            }
            // `seen` now holds the claims as they are: skip every subnet
            // taken since the listing.
            Claimed::Taken(_) => taken = holdings(&seen, keys, &me.node, net).taken,
        }
    }
    Err(StoreError::SubnetsFull {
        network: net.name.clone(),
        cidr: net.cidr,
        subnet_len: net.subnet_len,
        node: me.node.clone(),
    })
}

/// What a listing says about a network's subnets for one node.
struct Holdings {
    /// Valid subnets claimed by the node.
    mine: Vec<Ipv4Net>,
    /// Subnets claimed or quarantined by other nodes.
    taken: HashSet<Ipv4Net>,
    /// Subnets quarantined for the node.
    held_mine: Vec<Ipv4Net>,
}

fn holdings(seen: &BTreeMap<String, Kv>, keys: &Keys, node: &str, net: &Network) -> Holdings {
    let mut h = Holdings {
        mine: Vec::new(),
        taken: HashSet::new(),
        held_mine: Vec::new(),
    };
    let prefix = keys.subnets();
    for (key, kv) in seen.range(prefix.clone()..) {
        let Some(part) = key.strip_prefix(&prefix) else {
            break;
        };
        let Some(s) = records::parse_subnet_key_part(part) else {
            continue;
        };
        if kv.value == node.as_bytes() {
            if records::check_subnet(net, s).is_ok() {
                h.mine.push(s);
            }
        } else {
            h.taken.insert(s);
        }
    }
    // Quarantined subnets: this node's come first, others' are skipped.
    let held_prefix = keys.held_subnets();
    for (key, kv) in seen.range(held_prefix.clone()..) {
        let Some(part) = key.strip_prefix(&held_prefix) else {
            break;
        };
        let Some(s) = records::parse_subnet_key_part(part) else {
            continue;
        };
        if kv.value == node.as_bytes() {
            h.held_mine.push(s);
        } else {
            h.taken.insert(s);
        }
    }
    h
}

/// Watch this node's leases; when etcd says one is gone, grant a new one
/// and re-publish the node's records under it (its own subnet and
/// endpoints when still free: the hold lease keeps them quarantined for a
/// grace period). Failed re-grants back off with jitter, never a hot loop.
pub(crate) async fn keepalive_loop(inner: Arc<Inner>, mut kept: Kept) {
    let _guard = TaskGuard(inner.clone());
    let period = lease::period(inner.ttl_secs);
    let ttl = Duration::from_secs(inner.ttl_secs as u64);
    let mut backoff = Backoff::capped(REGRANT_BACKOFF_CAP);
    loop {
        tokio::select! {
            _ = kept.lost() => {}
            _ = tokio::time::sleep(period / 2) => {
                // Connected while renewals come in: the last one at most
                // two periods ago.
                let ok = match kept.node.state() {
                    LeaseState::Alive { expires_at } => {
                        expires_at + 2 * period + Duration::from_millis(250) >= Instant::now() + ttl
                    }
                    LeaseState::Lost => false,
                };
                inner.health.lease(ok, (!ok).then_some("lease renewals are not answered"));
                continue;
            }
        }
        tracing::warn!(
            lease = kept.node.id,
            hold_lease = kept.hold.id,
            node = %inner.me.node,
            "etcd lease expired (etcd was unreachable for longer than the TTL, or the lease was revoked): \
             granting a new one and re-publishing this node's records"
        );
        let mut last: Option<String> = None;
        loop {
            match regrant(&inner, &mut kept).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(node = %inner.me.node, "re-granting the lease failed, retrying with backoff: {msg}");
                        last = Some(msg.clone());
                    }
                    inner.health.lease(false, Some(&msg));
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

/// Grant new leases for the lost ones and re-publish claim, record and
/// endpoints under them. Claims from the watched view, never a new list of
/// the network: the view is as fresh as a list would be (the watch resumes
/// from its revision; a stale key only fails its compare, which reads it
/// back), and a mass expiry then costs etcd O(1) per node, not a range over
/// the whole network each (which, at hundreds of nodes on one overloaded
/// etcd, made it slower still and more leases expire).
/// Never revokes: whatever it bound stays bound to a kept lease.
async fn regrant(inner: &Inner, kept: &mut Kept) -> Result<()> {
    let seen = inner.kvs();
    let net = inner.network();
    let mut ident = super::claim::check_identity(&seen, &inner.keys, &inner.me, &net)?;
    kept.renew(&inner.client, inner.ttl_secs, false).await?;
    let mut owned = inner.owned.lock().await;
    let old = owned.subnet;
    let subnet = claim_kept(
        &inner.client,
        &inner.keys,
        &inner.me,
        &net,
        inner.ttl_secs,
        kept,
        &seen,
        &[old],
        &mut ident,
    )
    .await?;
    if subnet != old {
        tracing::error!(
            node = %inner.me.node, network = %net.name, %old, new = %subnet,
            "THIS NODE LOST ITS SUBNET: {old} was claimed by another node while this node's lease was expired \
             (longer than the grace period): it now serves {subnet}; containers with addresses of {old} are \
             detached by the agent"
        );
    }
    let leases = kept.ids();
    let mut lost = Vec::new();
    for ep in owned.endpoints.values() {
        if let Claimed::Taken(holder) =
            claim_endpoint(&inner.client, &inner.keys, leases, ep, true).await?
        {
            tracing::warn!(
                node = %inner.me.node, network = %net.name, ip = %ep.ip, owner = %holder,
                "address {} is now held by node {holder} (taken while this node's lease was expired): no longer \
                 published; the agent detaches the container using it",
                ep.ip
            );
            lost.push(ep.ip);
        }
    }
    for ip in lost {
        owned.endpoints.remove(&ip);
    }
    owned.leases = leases;
    owned.subnet = subnet;
    // Hold first: whoever sees the new node lease sees the new hold lease.
    inner.hold_lease_id.store(leases.hold, Ordering::SeqCst);
    inner.lease_id.store(leases.node, Ordering::SeqCst);
    inner.set_own(subnet);
    // Wake the agent even if the snapshot is unchanged: what it publishes
    // for attach (the leases) changed.
    inner.changes.send_modify(|n| *n += 1);
    inner.health.lease(true, None);
    tracing::info!(lease = leases.node, hold_lease = leases.hold, %subnet, endpoints = owned.endpoints.len(), "records re-published under a new lease");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    #[test]
    fn holdings_split_own_others_and_quarantined_subnets() {
        let net = records::test_network("demo", Mode::Routed, "172.18.0.0/16", 24, 100);
        let keys = Keys::new("/vxmesh", "demo");
        let s = |x: &str| x.parse::<Ipv4Net>().unwrap();
        let mut seen = BTreeMap::new();
        let mut put = |key: String, holder: &str| {
            seen.insert(
                key,
                Kv {
                    value: holder.as_bytes().to_vec(),
                    create_rev: 1,
                    mod_rev: 1,
                },
            );
        };
        put(keys.subnet(s("172.18.1.0/24")), "me");
        put(keys.subnet(s("172.18.2.0/24")), "other");
        put(keys.held_subnet(s("172.18.3.0/24")), "me");
        put(keys.held_subnet(s("172.18.4.0/24")), "gone");
        // Not a subnet claim: ignored.
        put(keys.node("other"), "{}");
        let h = holdings(&seen, &keys, "me", &net);
        assert_eq!(h.mine, [s("172.18.1.0/24")]);
        assert_eq!(h.held_mine, [s("172.18.3.0/24")]);
        let mut taken: Vec<_> = h.taken.into_iter().collect();
        taken.sort();
        assert_eq!(taken, [s("172.18.2.0/24"), s("172.18.4.0/24")]);
    }
}
