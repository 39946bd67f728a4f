//! The in-memory copy of one network's keys and the [`Snapshot`] derived from
//! it. Pure (no I/O): the watcher feeds it key-values, it validates them and
//! says whether the derived view changed.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::records::{self, KeyKind, Keys};
use crate::config::{Cluster, Mode, Network};
use crate::metrics::RecordKind;
use crate::model::{Endpoint, NodeRecord};
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
    snapshot: Snapshot,
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
            kvs: BTreeMap::new(),
            warned: HashMap::new(),
            config_missing_warned: false,
            own: None,
            lost: None,
            snapshot,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn network(&self) -> &Network {
        &self.network
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
        self.kvs = kvs;
    }

    pub fn put(&mut self, key: String, kv: Kv) {
        self.kvs.insert(key, kv);
    }

    pub fn delete(&mut self, key: &str) {
        self.kvs.remove(key);
    }

    /// Recompute the snapshot. Returns whether it changed and the records
    /// skipped for the first time at their current revision (each is logged
    /// once with `tracing::warn`).
    pub fn rebuild(&mut self) -> (bool, Vec<Skipped>) {
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

        // Claims, nodes, endpoints.
        let mut claims: HashMap<Ipv4Net, &str> = HashMap::new();
        let mut nodes: Vec<(i64, &str, NodeRecord)> = Vec::new();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (key, kv) in &self.kvs {
            match self.keys.classify(key) {
                KeyKind::Config | KeyKind::Other => {}
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
                            // Not yet in the etcd node record (issue 16).
                            public_key: None,
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
        let mut subnets: Vec<(Ipv4Net, String)> = Vec::new();
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
            } else if let Some((_, other)) = subnets
                .iter()
                .find(|(t, _)| t.contains(&s) || s.contains(t))
            {
                skip(
                    key,
                    RecordKind::Node,
                    kv,
                    format!("subnet {s} overlaps the one of node '{other}'"),
                );
            } else {
                ips.insert(rec.underlay_ip, rec.name.clone());
                subnets.push((s, rec.name.clone()));
                accepted.push(rec);
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
                encryption: Default::default(),
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
    subnets: &[(Ipv4Net, String)],
) -> Option<(Ipv4Net, String)> {
    if let Some(owner) = claims.get(s).filter(|o| **o != me) {
        return Some((*s, owner.to_string()));
    }
    subnets
        .iter()
        .find(|(t, n)| n != me && (t.contains(s) || s.contains(t)))
        .map(|(_, n)| (*s, n.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::model::Vni;

    fn net() -> Network {
        Network {
            outbound_nat: true,
            name: "demo".into(),
            mode: Mode::Bridged,
            cidr: "10.1.0.0/24".parse().unwrap(),
            subnet_len: 28,
            vni: Vni::new(100).unwrap(),
            port: 4789,
            mtu: None,
            gateway: None,
            encrypt: false,
        }
    }

    fn kv(v: &str, rev: i64) -> Kv {
        Kv {
            value: v.as_bytes().to_vec(),
            create_rev: rev,
            mod_rev: rev,
        }
    }

    fn view() -> (View, Keys) {
        let keys = Keys::new("/vxmesh", "demo");
        let mut v = View::new(keys.clone(), net());
        v.put(keys.config(), kv(&records::network_json(&net()), 1));
        (v, keys)
    }

    fn node(name: &str, ip: &str, subnet: &str) -> String {
        format!(r#"{{"name":"{name}","underlay_ip":"{ip}","subnet":"{subnet}"}}"#)
    }

    #[test]
    fn valid_records_make_the_snapshot() {
        let (mut v, k) = view();
        v.put(k.subnet("10.1.0.16/28".parse().unwrap()), kv("h1", 2));
        v.put(
            k.node("h1"),
            kv(&node("h1", "198.18.0.1", "10.1.0.16/28"), 2),
        );
        v.put(
            k.node("h2"),
            kv(&node("h2", "198.18.0.2", "10.1.0.32/28"), 3),
        );
        v.put(
            k.endpoint(Ipv4Addr::new(10, 1, 0, 17)),
            kv(
                r#"{"network":"demo","ip":"10.1.0.17","mac":"02:42:0a:01:00:11","node":"h1"}"#,
                4,
            ),
        );
        let (changed, skipped) = v.rebuild();
        assert!(changed);
        assert!(skipped.is_empty(), "{skipped:?}");
        let s = v.snapshot();
        assert_eq!(s.cluster.nodes.len(), 2);
        assert_eq!(
            s.cluster.nodes[0].subnets["demo"].to_string(),
            "10.1.0.16/28"
        );
        assert_eq!(s.endpoints.as_ref().unwrap().len(), 1);
        let (changed, _) = v.rebuild();
        assert!(!changed);
    }

    #[test]
    fn invalid_records_are_skipped_and_warned_once_per_revision() {
        let (mut v, k) = view();
        v.put(
            k.node("h1"),
            kv(&node("h1", "198.18.0.1", "10.1.0.16/28"), 2),
        );
        v.put(k.node("bad"), kv("{not json", 3));
        v.put(
            k.node("lo"),
            kv(&node("lo", "127.0.0.1", "10.1.0.48/28"), 4),
        );
        v.put(
            k.node("out"),
            kv(&node("out", "198.18.0.9", "10.9.0.0/28"), 5),
        );
        v.put(
            k.node("dup"),
            kv(&node("dup", "198.18.0.1", "10.1.0.64/28"), 6),
        );
        v.put(k.subnet("10.1.0.80/28".parse().unwrap()), kv("h1", 7));
        v.put(
            k.node("thief"),
            kv(&node("thief", "198.18.0.7", "10.1.0.80/28"), 8),
        );
        v.put(
            k.endpoint(Ipv4Addr::new(10, 1, 0, 18)),
            kv(
                r#"{"network":"demo","ip":"10.1.0.18","mac":"01:00:5e:00:00:01","node":"h1"}"#,
                9,
            ),
        );
        let (_, skipped) = v.rebuild();
        let keys: Vec<&str> = skipped
            .iter()
            .map(|s| s.key.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(skipped.len(), 6, "{skipped:#?}");
        for k in ["bad", "lo", "out", "dup", "thief", "10.1.0.18"] {
            assert!(keys.contains(&k), "{k} not skipped: {skipped:#?}");
        }
        let kinds: Vec<RecordKind> = skipped.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == RecordKind::Node).count(),
            5,
            "{skipped:#?}"
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == RecordKind::Endpoint).count(),
            1
        );
        let s = v.snapshot();
        assert_eq!(
            s.cluster
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["h1"]
        );
        assert!(s.endpoints.as_ref().unwrap().is_empty());
        // Same revisions: no new warnings.
        assert!(v.rebuild().1.is_empty());
        // A new revision of a still-bad key warns again; fixing a key clears it.
        v.put(k.node("bad"), kv("{still not json", 10));
        v.put(
            k.node("lo"),
            kv(&node("lo", "198.18.0.4", "10.1.0.48/28"), 11),
        );
        let (changed, skipped) = v.rebuild();
        assert!(changed);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].key.ends_with("/bad"));
        assert_eq!(v.snapshot().cluster.nodes.len(), 2);
    }

    #[test]
    fn config_changes_apply_and_bad_configs_keep_the_last() {
        let (mut v, k) = view();
        v.rebuild();
        let mut n = net();
        n.mtu = Some(1400);
        v.put(k.config(), kv(&records::network_json(&n), 5));
        assert!(v.rebuild().0);
        assert_eq!(v.network().mtu, Some(1400));
        v.put(k.config(), kv("garbage", 6));
        let (changed, skipped) = v.rebuild();
        assert!(!changed);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].kind, RecordKind::Network);
        assert_eq!(v.network().mtu, Some(1400));
        v.delete(&k.config());
        v.rebuild();
        assert_eq!(v.network().mtu, Some(1400));
    }

    #[test]
    fn own_record_is_always_present() {
        let (mut v, _) = view();
        v.set_own(NodeRecord {
            name: "me".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), "10.1.0.16/28".parse().unwrap())]),
            public_key: None,
        });
        v.rebuild();
        assert_eq!(v.snapshot().cluster.nodes.len(), 1);
    }

    #[test]
    fn a_routed_subnet_claimed_by_another_node_is_not_served() {
        let mut n = net();
        n.mode = Mode::Routed;
        n.cidr = "10.9.0.0/23".parse().unwrap();
        n.subnet_len = 24;
        let k = Keys::new("/vxmesh", "demo");
        let mut v = View::new(k.clone(), n.clone());
        v.put(k.config(), kv(&records::network_json(&n), 1));
        let own: Ipv4Net = "10.9.0.0/24".parse().unwrap();
        v.set_own(NodeRecord {
            name: "me".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), own)]),
            public_key: None,
        });
        v.put(k.node("b"), kv(&node("b", "198.18.0.2", "10.9.1.0/24"), 2));
        v.put(k.subnet("10.9.1.0/24".parse().unwrap()), kv("b", 2));
        v.rebuild();
        assert_eq!(v.serving(), Some(own), "nobody else claims it");
        assert_eq!(v.snapshot().cluster.networks.len(), 1);
        // This node's record expired; c claims its subnet.
        v.put(k.subnet(own), kv("c", 3));
        v.put(k.node("c"), kv(&node("c", "198.18.0.3", "10.9.0.0/24"), 3));
        let (changed, _) = v.rebuild();
        assert!(changed);
        assert_eq!(v.serving(), None);
        let s = v.snapshot();
        assert!(
            s.cluster.networks.is_empty(),
            "the lost subnet is still planned"
        );
        assert!(
            s.cluster.node("me").is_some(),
            "the node itself stays known"
        );
        assert!(s.cluster.node("c").is_some());
        // Its record published again (a new subnet claimed): served again.
        let new: Ipv4Net = "10.9.1.0/24".parse().unwrap();
        v.delete(&k.subnet(new));
        v.delete(&k.node("b"));
        v.put(k.subnet(new), kv("me", 4));
        v.put(
            k.node("me"),
            kv(&node("me", "198.18.0.1", "10.9.1.0/24"), 4),
        );
        v.set_own(NodeRecord {
            name: "me".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), new)]),
            public_key: None,
        });
        v.rebuild();
        assert_eq!(v.serving(), Some(new));
        assert_eq!(v.snapshot().cluster.networks.len(), 1);
    }

    #[test]
    fn a_bridged_slice_claimed_by_another_node_stays_served() {
        let (mut v, k) = view();
        let own: Ipv4Net = "10.1.0.16/28".parse().unwrap();
        v.set_own(NodeRecord {
            name: "me".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), own)]),
            public_key: None,
        });
        v.put(k.subnet(own), kv("c", 3));
        v.put(k.node("c"), kv(&node("c", "198.18.0.3", "10.1.0.16/28"), 3));
        v.rebuild();
        // Its addresses are claimed one by one: the slice is only where
        // attach looks first.
        assert_eq!(v.serving(), Some(own));
        assert_eq!(v.snapshot().cluster.networks.len(), 1);
    }
}
