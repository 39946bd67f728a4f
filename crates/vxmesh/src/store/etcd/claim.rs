//! Claims as compare-and-swap transactions on mod revisions: a subnet claim
//! (together with the node record and the identity check), and an
//! endpoint claim, each with its quarantine marker (`held/...`, bound to
//! the node's hold lease, which outlives its node lease by a grace period:
//! a subnet or address freed by a lost lease cannot be taken by another
//! node before that grace has passed; its old holder can take it back).

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use ipnet::Ipv4Net;

use super::records::{self, Keys, NodeJson};
use super::view::Kv;
use super::{Me, lease_opts, op};
use crate::config::Network;
use crate::model::Endpoint;
use crate::store::error::{Result, StoreError};

/// How many times one claim re-reads and retries when a key changed under it.
const CAS_ROUNDS: usize = 5;

/// The two leases a node binds its keys to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseIds {
    /// Node record, subnet claim, endpoints: gone one TTL after the node
    /// stops renewing (peers drop it).
    pub node: i64,
    /// Quarantine markers: gone a grace period later.
    pub hold: i64,
}

/// A key as last read: its mod revision (0 = absent) and value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    pub mod_rev: i64,
    pub value: Vec<u8>,
}

impl Seen {
    pub(crate) fn of(kvs: &BTreeMap<String, Kv>, key: &str) -> Seen {
        kvs.get(key)
            .map(|kv| Seen {
                mod_rev: kv.mod_rev,
                value: kv.value.clone(),
            })
            .unwrap_or_default()
    }
    fn absent(&self) -> bool {
        self.mod_rev == 0
    }
}

/// Who may claim a key: free (absent), or held by `me` (by the value's
/// holder name), else `Err(holder)`.
fn holder_check(seen: &Seen, me: &str, holder_of: impl Fn(&[u8]) -> String) -> Result<(), String> {
    if seen.absent() {
        return Ok(());
    }
    let h = holder_of(&seen.value);
    if h == me { Ok(()) } else { Err(h) }
}

fn plain_holder(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// The holder named for an endpoint record that does not parse.
pub(crate) const UNREADABLE_HOLDER: &str = "an unreadable record";

fn endpoint_holder(v: &[u8]) -> String {
    serde_json::from_slice::<Endpoint>(v)
        .map(|e| e.node)
        .unwrap_or_else(|_| UNREADABLE_HOLDER.into())
}

/// The identity this node is about to take: refuse a name another live
/// host uses (other underlay IP), or an underlay IP another node uses.
/// Returns the mod revision of this node's record (0 = none), which the
/// claim transaction compares, so two hosts with one name never both pass.
pub(crate) fn check_identity(
    kvs: &BTreeMap<String, Kv>,
    keys: &Keys,
    me: &Me,
    net: &Network,
) -> Result<i64> {
    let mut mine = 0;
    let prefix = keys.nodes();
    for (key, kv) in kvs.range(prefix.clone()..) {
        let Some(name) = key.strip_prefix(&prefix) else {
            break;
        };
        let Ok(n) = records::parse_node(net, name, &kv.value) else {
            continue;
        };
        if n.name == me.node {
            if n.underlay_ip != me.underlay_ip {
                return Err(StoreError::Conflict(format!(
                    "node {} is already registered in network {} with underlay IP {} (its lease is still alive): \
                     another host uses this name — give this one its own node name, or wait up to the lease TTL if that host is gone",
                    me.node, net.name, n.underlay_ip
                )));
            }
            mine = kv.mod_rev;
        } else if n.underlay_ip == me.underlay_ip {
            return Err(StoreError::Conflict(format!(
                "underlay IP {} is already used by node {} in network {} (its lease is still alive): \
                 check underlay_ip, or wait up to the lease TTL if that node was renamed",
                me.underlay_ip, n.name, net.name
            )));
        }
    }
    Ok(mine)
}

/// The `Get` responses of a transaction, by key.
fn gets(resp: &etcd_client::TxnResponse) -> BTreeMap<String, Kv> {
    let mut out = BTreeMap::new();
    for r in resp.op_responses() {
        if let TxnOpResponse::Get(g) = r {
            for kv in g.kvs() {
                if let Ok(k) = kv.key_str() {
                    out.insert(
                        k.to_string(),
                        Kv {
                            value: kv.value().to_vec(),
                            create_rev: kv.create_revision(),
                            mod_rev: kv.mod_revision(),
                        },
                    );
                }
            }
        }
    }
    out
}

/// Outcome of one claim.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claimed {
    Yes,
    /// Held (or quarantined) by another node, named.
    Taken(String),
}

/// Claim `subnet` for this node in one transaction: the claim and the node
/// record under the node lease, the quarantine marker under the hold lease,
/// if the subnet and its marker are free or this node's (as seen at their
/// mod revisions) and this node's record is still at `ident` (its mod
/// revision when the identity was checked: 0 = absent). `seen` holds what
/// the caller last read (may be stale: the compare catches it, and the
/// network's subnet claims and their markers are read back in the same
/// transaction into `seen`, so that a node that lost a subnet to another
/// one picks its next from what is claimed now, not from its first
/// listing: nodes joining at once into a nearly full cidr otherwise lost
/// claim after claim, one round trip each). A change of this node's
/// record re-checks the identity.
#[allow(clippy::too_many_arguments)] // one claim: who, where, under which leases, from what was read
pub(crate) async fn claim_subnet(
    client: &Client,
    keys: &Keys,
    me: &Me,
    net: &Network,
    leases: LeaseIds,
    subnet: Ipv4Net,
    seen: &mut BTreeMap<String, Kv>,
    ident: &mut i64,
) -> Result<Claimed> {
    let key = keys.subnet(subnet);
    let claims = [keys.subnets(), keys.held_subnets()];
    let held = keys.held_subnet(subnet);
    let node_key = keys.node(&me.node);
    let record = serde_json::to_string(&NodeJson {
        name: me.node.clone(),
        underlay_ip: me.underlay_ip,
        underlay_dev: me.underlay_dev.clone(),
        subnet,
        public_key: me.keys().public_key,
        next_public_key: me.keys().next_public_key,
    })
    .expect("a node record serializes");
    let (mut s, mut h) = (Seen::of(seen, &key), Seen::of(seen, &held));
    for _ in 0..CAS_ROUNDS {
        if let Err(holder) = holder_check(&s, &me.node, plain_holder)
            .and_then(|()| holder_check(&h, &me.node, plain_holder))
        {
            return Ok(Claimed::Taken(holder));
        }
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, s.mod_rev),
                Compare::mod_revision(held.clone(), CompareOp::Equal, h.mod_rev),
                Compare::mod_revision(node_key.clone(), CompareOp::Equal, *ident),
            ])
            .and_then([
                TxnOp::put(key.clone(), me.node.clone(), lease_opts(leases.node)),
                TxnOp::put(node_key.clone(), record.clone(), lease_opts(leases.node)),
                TxnOp::put(held.clone(), me.node.clone(), lease_opts(leases.hold)),
            ])
            .or_else([
                TxnOp::get(claims[0].clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(claims[1].clone(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(node_key.clone(), None),
            ]);
        let resp = op(format!("claim {key}"), client.kv_client().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claimed::Yes);
        }
        let now = gets(&resp);
        // Every claim and marker as of now replaces what was seen.
        seen.retain(|k, _| !claims.iter().any(|p| k.starts_with(p.as_str())));
        seen.extend(now.iter().map(|(k, kv)| (k.clone(), kv.clone())));
        s = Seen::of(&now, &key);
        h = Seen::of(&now, &held);
        let n = Seen::of(&now, &node_key);
        if n.mod_rev != *ident {
            // This node's record changed since the identity check: check
            // it again (another host with this name may have joined).
            let mut one = BTreeMap::new();
            if let Some(kv) = now.get(&node_key) {
                one.insert(node_key.clone(), kv.clone());
            }
            *ident = check_identity(&one, keys, me, net)?;
        }
    }
    Err(StoreError::KeyKeptChanging { op: "claim", key })
}

/// Publish endpoint `ep` (its node's) in one transaction, with its
/// quarantine marker: if the address and its marker are free, or (when
/// `allow_own`) already `ep.node`'s. `hold` 0: no marker is written (an
/// attach from a state file of an older agent), but an existing one is
/// still respected.
pub(crate) async fn claim_endpoint(
    client: &Client,
    keys: &Keys,
    leases: LeaseIds,
    ep: &Endpoint,
    allow_own: bool,
) -> Result<Claimed> {
    let key = keys.endpoint(ep.ip);
    let held = keys.held_endpoint(ep.ip);
    let value = serde_json::to_string(ep).expect("an endpoint serializes");
    let (mut s, mut h) = (Seen::default(), Seen::default());
    for _ in 0..CAS_ROUNDS {
        if !allow_own && !s.absent() {
            return Ok(Claimed::Taken(endpoint_holder(&s.value)));
        }
        if let Err(holder) = holder_check(&s, &ep.node, endpoint_holder)
            .and_then(|()| holder_check(&h, &ep.node, plain_holder))
        {
            return Ok(Claimed::Taken(holder));
        }
        let mut puts = vec![TxnOp::put(
            key.clone(),
            value.clone(),
            lease_opts(leases.node),
        )];
        if leases.hold != 0 {
            puts.push(TxnOp::put(
                held.clone(),
                ep.node.clone(),
                lease_opts(leases.hold),
            ));
        }
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key.clone(), CompareOp::Equal, s.mod_rev),
                Compare::mod_revision(held.clone(), CompareOp::Equal, h.mod_rev),
            ])
            .and_then(puts)
            .or_else([
                TxnOp::get(key.clone(), None),
                TxnOp::get(held.clone(), None),
            ]);
        let resp = op(format!("publish {key}"), client.kv_client().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(Claimed::Yes);
        }
        let now = gets(&resp);
        s = Seen::of(&now, &key);
        h = Seen::of(&now, &held);
    }
    Err(StoreError::KeyKeptChanging { op: "publish", key })
}

/// Delete `key` and its quarantine marker `held` if `node` holds the key
/// (as read at its mod revision); a marker of another node stays.
pub(crate) async fn release(
    client: &Client,
    key: String,
    held: String,
    node: &str,
    holder_of: fn(&[u8]) -> String,
) -> Result<()> {
    for _ in 0..CAS_ROUNDS {
        let txn = Txn::new().and_then([
            TxnOp::get(key.clone(), None),
            TxnOp::get(held.clone(), None),
        ]);
        let now = gets(&op(format!("read {key}"), client.kv_client().txn(txn)).await?);
        let s = Seen::of(&now, &key);
        let h = Seen::of(&now, &held);
        let key_ours = !s.absent() && holder_of(&s.value) == node;
        let held_ours = !h.absent() && plain_holder(&h.value) == node;
        if !key_ours && !held_ours {
            if !s.absent() {
                tracing::debug!(%key, holder = %holder_of(&s.value), "release: now held by another node, leaving it");
            }
            return Ok(());
        }
        let mut when = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            s.mod_rev,
        )];
        let mut dels = Vec::new();
        if key_ours {
            dels.push(TxnOp::delete(key.clone(), None));
        }
        when.push(Compare::mod_revision(
            held.clone(),
            CompareOp::Equal,
            h.mod_rev,
        ));
        if held_ours {
            dels.push(TxnOp::delete(held.clone(), None));
        }
        let txn = Txn::new().when(when).and_then(dels);
        if op(format!("release {key}"), client.kv_client().txn(txn))
            .await?
            .succeeded()
        {
            return Ok(());
        }
    }
    Err(StoreError::KeyKeptChanging { op: "release", key })
}

/// [`release`] of an endpoint.
pub(crate) async fn release_endpoint(
    client: &Client,
    keys: &Keys,
    node: &str,
    ip: std::net::Ipv4Addr,
) -> Result<()> {
    release(
        client,
        keys.endpoint(ip),
        keys.held_endpoint(ip),
        node,
        endpoint_holder,
    )
    .await
}

/// [`release`] of a subnet claim.
pub(crate) async fn release_subnet(
    client: &Client,
    keys: &Keys,
    node: &str,
    subnet: Ipv4Net,
) -> Result<()> {
    release(
        client,
        keys.subnet(subnet),
        keys.held_subnet(subnet),
        node,
        plain_holder,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_may_claim() {
        let free = Seen::default();
        let mine = Seen {
            mod_rev: 7,
            value: b"a".to_vec(),
        };
        assert_eq!(holder_check(&free, "a", plain_holder), Ok(()));
        assert_eq!(holder_check(&mine, "a", plain_holder), Ok(()));
        assert_eq!(holder_check(&mine, "b", plain_holder), Err("a".into()));
        let ep = Seen {
            mod_rev: 3,
            value: br#"{"network":"n","ip":"10.0.0.2","mac":"02:0a:00:00:00:02","node":"x"}"#
                .to_vec(),
        };
        assert_eq!(holder_check(&ep, "x", endpoint_holder), Ok(()));
        assert_eq!(holder_check(&ep, "y", endpoint_holder), Err("x".into()));
    }
}
