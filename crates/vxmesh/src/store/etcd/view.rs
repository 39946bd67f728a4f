//! The in-memory copy of one network's keys and the [`Snapshot`] derived from
//! it. Pure (no I/O): the watcher feeds it key-values, it validates them and
//! says whether the derived view changed.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::records::{self, KeyKind, Keys};
use super::settle::{Vanished, held_by};
use crate::config::{Cluster, Mode, Network};
use crate::metrics::RecordKind;
use crate::model::{Endpoint, NodeRecord};
use crate::secure::config::Encryption;
use crate::store::Snapshot;

/// One stored key-value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kv {
    pub value: Vec<u8>,
    pub create_rev: i64,
    pub mod_rev: i64,
}

/// A record skipped because it failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub key: String,
    pub kind: RecordKind,
    pub mod_rev: i64,
    pub reason: String,
}

pub(crate) struct View {
    keys: Keys,
    /// The last valid network config seen (kept if the key becomes invalid or vanishes).
    network: Network,
    /// The network's secure underlay settings (its `encryption` key; the
    /// last valid ones are kept if the key becomes invalid).
    encryption: Encryption,
    kvs: BTreeMap<String, Kv>,
    /// key → revision already warned about (warn once per key and revision).
    warned: HashMap<String, i64>,
    config_missing_warned: bool,
    /// This node's own record, shown even while etcd lacks it (between a lost
    /// lease and its re-publication) so the local data plane never flaps.
    own: Option<NodeRecord>,
    /// Routed: the subnet of `own` that another node claimed while etcd
    /// lacked this node's record (logged once), and that node.
    lost: Option<(Ipv4Net, String)>,
    /// Other nodes' records and endpoints that vanished recently: shown
    /// while their quarantine markers name them (see `settle`).
    vanished: Vanished,
    snapshot: Snapshot,
    /// Keys changed since the last rebuild (the snapshot may be stale).
    dirty: bool,
}

impl View {
    pub fn new(keys: Keys, network: Network) -> Self {
        let snapshot = Snapshot {
            cluster: Cluster {
                networks: vec![network.clone()],
                nodes: vec![],
                encryption: Default::default(),
            },
            endpoints: Some(vec![]),
        };
        View {
            keys,
            network,
            encryption: Encryption::default(),
            kvs: BTreeMap::new(),
            warned: HashMap::new(),
            config_missing_warned: false,
            own: None,
            lost: None,
            vanished: Vanished::default(),
            snapshot,
            dirty: false,
        }
    }

    /// Keep other nodes' vanished records for `window` (zero: drop at once).
    pub fn set_settle(&mut self, window: Duration) {
        self.vanished = Vanished::new(window);
    }

    /// When a kept vanished record's window ends (rebuild then).
    pub fn settle_deadline(&self) -> Option<Instant> {
        self.vanished.deadline()
    }

    /// The snapshot of the last rebuild (stale while [`Self::is_dirty`]).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Whether keys changed since the last rebuild.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Note that keys changed without rebuilding now: a watch response
    /// marks the view, the next reader rebuilds it once (hundreds of nodes
    /// joining send a response each; a rebuild is O(records)).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Whether a change of `key` can change the snapshot: quarantine
    /// markers (and unknown keys) matter only while a vanished record is
    /// kept for its settle window.
    pub fn affects_snapshot(&self, key: &str) -> bool {
        !matches!(self.keys.classify(key), KeyKind::Other) || self.vanished.deadline().is_some()
    }

    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The keys as last listed and watched (what a re-grant claims from).
    pub fn kvs(&self) -> &BTreeMap<String, Kv> {
        &self.kvs
    }

    pub fn set_own(&mut self, own: NodeRecord) {
        self.own = Some(own);
    }

    /// The subnet (routed) or slice (bridged) this node serves: its own
    /// record's, unless that subnet was lost to another node (routed; the
    /// network is then left out of the snapshot until a new one is claimed).
    pub fn serving(&self) -> Option<Ipv4Net> {
        if self.lost.is_some() {
            return None;
        }
        self.own
            .as_ref()
            .and_then(|o| o.subnets.get(&self.network.name).copied())
    }

    /// Replace everything (after a list).
    pub fn reset(&mut self, kvs: BTreeMap<String, Kv>) {
        self.reset_at(kvs, Instant::now());
    }

    /// Replace everything at `now`: keys missing from `kvs` vanished then.
    pub fn reset_at(&mut self, kvs: BTreeMap<String, Kv>, now: Instant) {
        let old = std::mem::replace(&mut self.kvs, kvs);
        for (key, kv) in old {
            if !self.kvs.contains_key(&key) {
                self.vanish(&key, kv, now);
            }
        }
        for key in self.kvs.keys() {
            self.vanished.returned(key);
        }
    }

    pub fn put(&mut self, key: String, kv: Kv) {
        self.vanished.returned(&key);
        self.kvs.insert(key, kv);
    }

    pub fn delete(&mut self, key: &str) {
        self.delete_at(key, Instant::now());
    }

    pub fn delete_at(&mut self, key: &str, now: Instant) {
        if let Some(kv) = self.kvs.remove(key) {
            self.vanish(key, kv, now);
        }
    }

    /// Remember another node's record or an endpoint that vanished.
    fn vanish(&mut self, key: &str, kv: Kv, now: Instant) {
        let own = self.own.as_ref().map(|o| o.name.as_str());
        match self.keys.classify(key) {
            KeyKind::Node(name) if Some(name) != own => self.vanished.vanished(key, kv, now),
            KeyKind::Endpoint(_) => self.vanished.vanished(key, kv, now),
            _ => {}
        }
    }

    /// Recompute the snapshot. Returns whether it changed and the records
    /// skipped for the first time at their current revision (each is logged
    /// once with `tracing::warn`).
    pub fn rebuild(&mut self) -> (bool, Vec<Skipped>) {
        self.rebuild_at(Instant::now())
    }

    /// [`View::rebuild`] at `now` (vanished records whose window ended go).
    pub fn rebuild_at(&mut self, now: Instant) -> (bool, Vec<Skipped>) {
        self.dirty = false;
        self.vanished.prune(now);
        let mut skipped = Vec::new();
        let mut skip = |key: &str, kind: RecordKind, kv: &Kv, reason: String| {
            skipped.push(Skipped {
                key: key.to_string(),
                kind,
                mod_rev: kv.mod_rev,
                reason,
            });
        };

        // The network config.
        let config_key = self.keys.config();
        match self.kvs.get(&config_key) {
            Some(kv) => {
                self.config_missing_warned = false;
                match records::parse_network(&self.network.name, &kv.value) {
                    Ok(n) => self.network = n,
                    Err(e) => skip(
                        &config_key,
                        RecordKind::Network,
                        kv,
                        format!("{e} (keeping the last valid config)"),
                    ),
                }
            }
            None => {
                if !self.config_missing_warned {
                    self.config_missing_warned = true;
                    tracing::warn!(key = %config_key, "network config was deleted from etcd: keeping the last known config");
                }
            }
        }
        let net = self.network.clone();

        // An encrypted network's secure underlay settings (the defaults
        // when the network was created without them).
        let enc_key = self.keys.encryption();
        match self.kvs.get(&enc_key) {
            Some(kv) => match records::parse_encryption(&net, &kv.value) {
                Ok(e) => self.encryption = e,
                Err(e) => skip(
                    &enc_key,
                    RecordKind::Network,
                    kv,
                    format!("{e} (keeping the last valid settings)"),
                ),
            },
            None => self.encryption = Encryption::default(),
        }

        // Claims, nodes, endpoints.
        let mut claims: HashMap<Ipv4Net, &str> = HashMap::new();
        let mut nodes: Vec<(i64, &str, NodeRecord)> = Vec::new();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (key, kv) in &self.kvs {
            match self.keys.classify(key) {
                KeyKind::Config | KeyKind::Encryption | KeyKind::Other => {}
                KeyKind::Subnet(part) => match records::parse_claim(&net, part, &kv.value) {
                    Ok((s, owner)) => {
                        claims.insert(s, owner);
                    }
                    Err(e) => skip(key, RecordKind::Subnet, kv, e),
                },
                KeyKind::Node(name) => match records::parse_node(&net, name, &kv.value) {
                    Ok(n) => nodes.push((
                        kv.create_rev,
                        key,
                        NodeRecord {
                            name: n.name,
                            underlay_ip: n.underlay_ip,
                            underlay_dev: n.underlay_dev,
                            subnets: BTreeMap::from([(net.name.clone(), n.subnet)]),
                            public_key: n.public_key,
                            next_public_key: n.next_public_key,
                        },
                    )),
                    Err(e) => skip(key, RecordKind::Node, kv, e),
                },
                KeyKind::Endpoint(ip) => match records::parse_endpoint(&net, ip, &kv.value) {
                    Ok(ep) => endpoints.push(ep),
                    Err(e) => skip(key, RecordKind::Endpoint, kv, e),
                },
            }
        }

        // Conflicts between node records: a subnet claimed by another node,
        // a duplicate underlay IP, overlapping subnets. First come (lowest
        // create revision) wins.
        nodes.sort_by(|a, b| (a.0, &a.2.name).cmp(&(b.0, &b.2.name)));
        let mut accepted: Vec<NodeRecord> = Vec::new();
        let mut ips: HashMap<Ipv4Addr, String> = HashMap::new();
        let mut subnets = Subnets::default();
        for (_, key, rec) in nodes {
            let kv = &self.kvs[key];
            let s = rec.subnets[&net.name];
            if let Some(owner) = claims.get(&s)
                && *owner != rec.name
            {
                skip(
                    key,
                    RecordKind::Node,
                    kv,
                    format!("subnet {s} is claimed by node '{owner}'"),
                );
            } else if let Some(other) = ips.get(&rec.underlay_ip) {
                skip(
                    key,
                    RecordKind::Node,
                    kv,
                    format!(
                        "underlay IP {} is already used by node '{other}'",
                        rec.underlay_ip
                    ),
                );
            } else if let Some(other) = subnets.overlapping(s) {
                skip(
                    key,
                    RecordKind::Node,
                    kv,
                    format!("subnet {s} overlaps the one of node '{other}'"),
                );
            } else {
                ips.insert(rec.underlay_ip, rec.name.clone());
                subnets.insert(s, &rec.name);
                accepted.push(rec);
            }
        }
        // Other nodes' records that vanished within the settle window, while
        // their subnet's quarantine marker still names them (the hold lease
        // lives: the node lease expired or was revoked, no leave): no other
        // node can claim that subnet meanwhile, and one that holds it or its
        // underlay IP anyway ends the settling at once.
        let own_name = self.own.as_ref().map(|o| o.name.as_str());
        for (key, kv) in self.vanished.iter() {
            let KeyKind::Node(name) = self.keys.classify(key) else {
                continue;
            };
            if self.kvs.contains_key(key) || Some(name) == own_name {
                continue;
            }
            let Ok(n) = records::parse_node(&net, name, &kv.value) else {
                continue;
            };
            let s = n.subnet;
            let free = claims.get(&s).is_none_or(|o| *o == name)
                && !ips.contains_key(&n.underlay_ip)
                && subnets.overlapping(s).is_none();
            if free && held_by(&self.kvs, &self.keys.held_subnet(s), name) {
                ips.insert(n.underlay_ip, n.name.clone());
                subnets.insert(s, &n.name);
                accepted.push(NodeRecord {
                    name: n.name,
                    underlay_ip: n.underlay_ip,
                    underlay_dev: n.underlay_dev,
                    subnets: BTreeMap::from([(net.name.clone(), s)]),
                    public_key: n.public_key,
                    next_public_key: n.next_public_key,
                });
            }
        }
        // Their endpoints (or those of a node already back, not yet
        // re-published) likewise, while the address's marker names the node.
        for (key, kv) in self.vanished.iter() {
            let KeyKind::Endpoint(ip) = self.keys.classify(key) else {
                continue;
            };
            if self.kvs.contains_key(key) {
                continue;
            }
            let Ok(ep) = records::parse_endpoint(&net, ip, &kv.value) else {
                continue;
            };
            if accepted.iter().any(|r| r.name == ep.node)
                && held_by(&self.kvs, &self.keys.held_endpoint(ep.ip), &ep.node)
                && !endpoints.iter().any(|e| e.ip == ep.ip)
            {
                endpoints.push(ep);
            }
        }
        // Overlay this node's own record only while etcd has none (a record
        // that is there but invalid or conflicting stays skipped). A routed
        // subnet another node claimed meanwhile (this node's lease expired
        // for longer than the grace period) is not served: the record stays
        // (the node is known) but the network is left out of the snapshot,
        // so no bridge address or route of that subnet is planned here.
        let mut lost = None;
        if let Some(own) = &self.own
            && !self.kvs.contains_key(&self.keys.node(&own.name))
        {
            if net.mode == Mode::Routed
                && let Some(s) = own.subnets.get(&net.name)
            {
                lost = lost_to(s, &own.name, &claims, &subnets);
            }
            accepted.push(own.clone());
        }
        if let Some((s, holder)) = &lost
            && lost != self.lost
        {
            tracing::error!(
                network = %net.name, subnet = %s, owner = %holder,
                "THIS NODE LOST ITS SUBNET: {s} is now claimed by node {holder} (this node's lease expired for \
                 longer than the grace period): network {} is not served here until a free subnet is claimed; \
                 containers with addresses of {s} are detached",
                net.name
            );
        }
        let serving = lost.is_none();
        self.lost = lost;
        accepted.sort_by(|a, b| a.name.cmp(&b.name));
        endpoints.sort_by_key(|e| e.ip);

        // Warn once per key and revision; forget keys that became valid or vanished.
        let mut fresh = Vec::new();
        let mut warned = HashMap::new();
        for s in skipped {
            if self.warned.get(&s.key) != Some(&s.mod_rev) {
                tracing::warn!(key = %s.key, revision = s.mod_rev, "skipping invalid etcd record: {}", s.reason);
                fresh.push(s.clone());
            }
            warned.insert(s.key, s.mod_rev);
        }
        self.warned = warned;

        let snapshot = Snapshot {
            cluster: Cluster {
                networks: if serving { vec![net] } else { Vec::new() },
                nodes: accepted,
                encryption: self.encryption,
            },
            endpoints: Some(endpoints),
        };
        let changed = snapshot != self.snapshot;
        self.snapshot = snapshot;
        (changed, fresh)
    }
}

/// Who holds subnet `s` of `me` now, if another node: its claim, or an
/// accepted record whose subnet overlaps it.
fn lost_to(
    s: &Ipv4Net,
    me: &str,
    claims: &HashMap<Ipv4Net, &str>,
    subnets: &Subnets,
) -> Option<(Ipv4Net, String)> {
    if let Some(owner) = claims.get(s).filter(|o| **o != me) {
        return Some((*s, owner.to_string()));
    }
    subnets
        .overlapping_other(*s, me)
        .map(|n| (*s, n.to_string()))
}

/// Accepted subnets, none overlapping another, by first address: whether
/// a subnet overlaps one of them is O(log n) (at most 33 look-ups of its
/// supernets and one range), not a scan; a rebuild of n records is
/// O(n log n), not O(n²) (hundreds of nodes rebuild on every join).
#[derive(Default)]
pub(crate) struct Subnets {
    by_start: BTreeMap<u32, (u8, String)>,
}

impl Subnets {
    pub(crate) fn insert(&mut self, s: Ipv4Net, node: &str) {
        self.by_start
            .insert(u32::from(s.network()), (s.prefix_len(), node.to_string()));
    }

    /// The node of an accepted subnet that overlaps `s` (contains it, is it,
    /// or lies within it).
    pub(crate) fn overlapping(&self, s: Ipv4Net) -> Option<&str> {
        self.overlapping_other(s, "")
    }

    /// As [`Self::overlapping`], ignoring node `me`'s subnet: accepted
    /// subnets never overlap each other, so at most one other can contain `s`
    /// at each length, and any inside `s` starts within it.
    pub(crate) fn overlapping_other(&self, s: Ipv4Net, me: &str) -> Option<&str> {
        let start = u32::from(s.network());
        let end = u32::from(s.broadcast());
        if let Some((_, (_, n))) = self.by_start.range(start..=end).find(|(_, (_, n))| n != me) {
            return Some(n);
        }
        (0..s.prefix_len()).find_map(|len| {
            let sup = Ipv4Net::new(s.network(), len).ok()?.trunc();
            match self.by_start.get(&u32::from(sup.network())) {
                Some((l, n)) if *l == len && n != me => Some(n.as_str()),
                _ => None,
            }
        })
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
