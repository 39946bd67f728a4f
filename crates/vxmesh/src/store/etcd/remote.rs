//! Operations of processes other than the node's agent: attach / CNI claim
//! and release container addresses of bridged networks (bound to the
//! agent's lease, read from the network's state file), and an operator
//! removes a node at once (`vxmesh leave`).

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use super::claim::{Claimed, LeaseIds, claim_endpoint, release_endpoint};
use super::client::{ClientOptions, TlsOptions, connect, op};
use super::records::{self, Keys};
use super::{network, require_bridged, watcher};
use crate::model::{self, Endpoint};
use crate::state::EtcdSection;
use crate::store::error::{Result, StoreError};

/// Connection settings of a state file's etcd section (reads the password file).
pub fn section_client_options(sec: &EtcdSection) -> Result<ClientOptions> {
    let user = match (&sec.user, &sec.password_file) {
        (Some(u), Some(f)) => Some((u.clone(), read_password(f)?)),
        (Some(u), None) => Some((u.clone(), String::new())),
        (None, _) => None,
    };
    Ok(ClientOptions {
        endpoints: sec.endpoints.clone(),
        tls: sec.ca.as_ref().map(|ca| TlsOptions {
            ca: ca.clone(),
            cert: sec.cert.clone(),
            key: sec.key.clone(),
        }),
        user,
    })
}

/// An etcd password file: its content without the trailing newline.
pub fn read_password(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::io("read etcd password file", path, e))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// Claim an address of a bridged network for a container on `sec.node`,
/// publishing its endpoint (IP, MAC derived from the IP, node) under the
/// agent's lease with a compare-and-swap: `want` if it is free or already
/// this node's (re-attach, or migration after a detach elsewhere); else the
/// first free address from `start` (the node's slice) on, wrapping around.
/// An address quarantined for another node (its lease expired less than a
/// grace period ago) is not free.
pub async fn claim_address(
    sec: &EtcdSection,
    want: Option<Ipv4Addr>,
    start: Ipv4Addr,
) -> Result<Endpoint> {
    claim_address_except(sec, want, start, &BTreeSet::new()).await
}

/// [`claim_address`], skipping the addresses in `local` when looking for a
/// free one: those this node's own allocator already holds (an etcd record
/// withdrawn while the container is still attached here), which attach
/// could never record.
pub async fn claim_address_except(
    sec: &EtcdSection,
    want: Option<Ipv4Addr>,
    start: Ipv4Addr,
    local: &BTreeSet<Ipv4Addr>,
) -> Result<Endpoint> {
    let client = connect(&section_client_options(sec)?).await?;
    let keys = Keys::new(&sec.prefix, &sec.network);
    let net = network::read_network(&client, &keys, &sec.network)
        .await?
        .ok_or_else(|| StoreError::NoSuchNetwork {
            network: sec.network.clone(),
            detail: "no longer exists in etcd".into(),
        })?;
    require_bridged(&net)?;
    let endpoint = |ip: Ipv4Addr| Endpoint {
        network: net.name.clone(),
        ip,
        mac: model::container_mac(ip),
        node: sec.node.clone(),
    };
    let lease_gone = |e: StoreError| {
        if e.is_lease_not_found() {
            StoreError::LeaseGone { lease: sec.lease }
        } else {
            e
        }
    };
    let leases = LeaseIds {
        node: sec.lease,
        hold: sec.hold_lease,
    };
    if let Some(ip) = want {
        records::check_endpoint_ip(&net, ip).map_err(|e| StoreError::invalid("", e))?;
        let ep = endpoint(ip);
        return match claim_endpoint(&client, &keys, leases, &ep, true)
            .await
            .map_err(lease_gone)?
        {
            Claimed::Yes => Ok(ep),
            Claimed::Taken(holder) => Err(StoreError::AttachedElsewhere {
                ip,
                network: net.name.clone(),
                holder: format!("node {holder}"),
            }),
        };
    }
    // Taken: published endpoints, and quarantine markers of other nodes.
    let (kvs, _) = watcher::list(&client, &keys.endpoints()).await?;
    let prefix = keys.endpoints();
    let mut taken: HashSet<Ipv4Addr> = kvs
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).and_then(|ip| ip.parse().ok()))
        .collect();
    let held_prefix = format!("{}held/endpoints/", keys.root());
    let (held, _) = watcher::list(&client, &held_prefix).await?;
    taken.extend(held.iter().filter_map(|(k, kv)| {
        (kv.value != sec.node.as_bytes())
            .then(|| {
                k.strip_prefix(&held_prefix)
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            })
            .flatten()
    }));
    taken.extend(local.iter().copied());
    for ip in records::address_candidates(&net, start).filter(|ip| !taken.contains(ip)) {
        let ep = endpoint(ip);
        if claim_endpoint(&client, &keys, leases, &ep, false)
            .await
            .map_err(lease_gone)?
            == Claimed::Yes
        {
            return Ok(ep);
        }
    }
    Err(StoreError::CidrFull {
        network: net.name.clone(),
        cidr: net.cidr,
    })
}

/// Withdraw the endpoint `ip` if `sec.node` holds it (idempotent; after a
/// migration the address belongs to another node and is left alone).
pub async fn release_address(sec: &EtcdSection, ip: Ipv4Addr) -> Result<()> {
    let client = connect(&section_client_options(sec)?).await?;
    let keys = Keys::new(&sec.prefix, &sec.network);
    release_endpoint(&client, &keys, &sec.node, ip).await
}

/// Remove node `node` from network `network` at once: revoke the lease its
/// record is bound to, which deletes its record, subnet claim and
/// endpoints. Returns false if the node has no record (already gone). Stop
/// the node's agent first: a running agent would re-grant a lease and
/// re-publish its records.
pub async fn leave_node(
    client: &ClientOptions,
    prefix: &str,
    network: &str,
    node: &str,
) -> Result<bool> {
    records::check_prefix(prefix).map_err(|e| StoreError::invalid("prefix", e))?;
    records::check_node_name(node).map_err(|e| StoreError::invalid("node", e))?;
    let c = connect(client).await?;
    let keys = Keys::new(prefix, network);
    let key = keys.node(node);
    let resp = op(format!("read {key}"), c.kv_client().get(key.clone(), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(false);
    };
    let lease = kv.lease();
    // The hold lease (quarantine markers) goes too: a node removed on
    // purpose frees its subnet and addresses at once.
    if let Ok(rec) = serde_json::from_slice::<records::NodeJson>(kv.value()) {
        let held = keys.held_subnet(rec.subnet);
        if let Ok(r) = op(
            format!("read {held}"),
            c.kv_client().get(held.clone(), None),
        )
        .await
            && let Some(h) = r.kvs().first()
            && h.value() == node.as_bytes()
            && h.lease() != 0
        {
            let _ = op(
                format!("revoke lease {}", h.lease()),
                c.lease_client().revoke(h.lease()),
            )
            .await;
        }
    }
    if lease == 0 {
        // Not lease-bound (written by hand): delete the record itself.
        op(
            format!("delete {key}"),
            c.kv_client().delete(key.clone(), None),
        )
        .await?;
        return Ok(true);
    }
    match op(
        format!("revoke lease {lease}"),
        c.lease_client().revoke(lease),
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_lease_not_found() => Ok(true),
        Err(e) => Err(e),
    }
}
