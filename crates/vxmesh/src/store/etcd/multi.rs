//! The agent's etcd store: one node's membership in one or more networks of
//! the same etcd cluster (one [`EtcdStore`], lease and claim per network),
//! seen as one merged snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{EtcdOptions, EtcdStore};
use crate::config::Mode;
use crate::model::NodeRecord;
use crate::state::EtcdSection;
use crate::store::error::{Result, StoreError};
use crate::store::{AllocatorSpec, LostAddress, Snapshot, Store};

pub struct EtcdNetworks {
    stores: Vec<EtcdStore>,
    opts: EtcdOptions,
    password_file: Option<PathBuf>,
    /// Addresses sync could not publish, per network (warned once each).
    refused: HashMap<String, BTreeMap<Ipv4Addr, String>>,
}

impl EtcdNetworks {
    /// Join every network of `networks` with `opts` (its `network` field is
    /// ignored). `password_file` is where `opts.user`'s password came from:
    /// attach reads it there (the state file holds paths, never secrets).
    /// If one join fails, the networks already joined are dropped without
    /// revoking their leases (a retry reuses their claims).
    pub async fn join(
        opts: &EtcdOptions,
        networks: &[String],
        password_file: Option<PathBuf>,
    ) -> Result<EtcdNetworks> {
        if networks.is_empty() {
            return Err(StoreError::invalid(
                "",
                "give at least one network to join (--network NAME)",
            ));
        }
        let mut uniq = BTreeSet::new();
        if let Some(dup) = networks.iter().find(|n| !uniq.insert(n.as_str())) {
            return Err(StoreError::invalid(
                "",
                format!("network {dup} is given twice"),
            ));
        }
        let mut stores = Vec::new();
        for n in networks {
            let mut o = opts.clone();
            o.network = n.clone();
            stores.push(EtcdStore::join(o).await?);
        }
        // What one node can serve side by side.
        let nets: Vec<_> = stores.iter().map(|s| s.network()).collect();
        let routed: Vec<&str> = nets
            .iter()
            .filter(|n| n.mode == Mode::Routed)
            .map(|n| n.name.as_str())
            .collect();
        if routed.len() > 1 {
            return Err(StoreError::Conflict(format!(
                "networks {} are all routed: a node serves one routed network (bridge vxm-br0); join one of them",
                routed.join(", ")
            )));
        }
        for (i, a) in nets.iter().enumerate() {
            if let Some(b) = nets[..i].iter().find(|b| b.vni == a.vni) {
                return Err(StoreError::Conflict(format!(
                    "networks {} and {} both use VNI {}: a node cannot serve both (re-create one with its own VNI)",
                    b.name, a.name, a.vni
                )));
            }
        }
        Ok(EtcdNetworks {
            stores,
            opts: opts.clone(),
            password_file,
            refused: HashMap::new(),
        })
    }

    /// The per-network stores (subnet, lease, connection state).
    pub fn stores(&self) -> &[EtcdStore] {
        &self.stores
    }

    fn store(&self, network: &str) -> Option<&EtcdStore> {
        self.stores.iter().find(|s| s.network().name == network)
    }
}

/// Merge per-network snapshots: one node record per node name, its subnets
/// of every network (a record whose underlay IP differs from the one seen
/// first for that name is left out of the merge). The secure underlay's
/// settings are the first encrypted network's (`vxmesh net create` keeps
/// every encrypted network's the same).
fn merge(snaps: Vec<Snapshot>) -> Snapshot {
    let mut encryption = None;
    let mut networks = Vec::new();
    let mut nodes: BTreeMap<String, NodeRecord> = BTreeMap::new();
    let mut endpoints = Vec::new();
    for s in snaps {
        if encryption.is_none() && s.cluster.networks.iter().any(|n| n.encrypt) {
            encryption = Some(s.cluster.encryption);
        }
        networks.extend(s.cluster.networks);
        for n in s.cluster.nodes {
            match nodes.get_mut(&n.name) {
                None => {
                    nodes.insert(n.name.clone(), n);
                }
                Some(have) if have.underlay_ip == n.underlay_ip => {
                    have.subnets.extend(n.subnets);
                    // Each network's record lists the node's keys; while
                    // they are re-published, the first network's win.
                    have.public_key = have.public_key.or(n.public_key);
                    have.next_public_key = have.next_public_key.or(n.next_public_key);
                }
                Some(have) => tracing::debug!(
                    node = %n.name,
                    "node has underlay IP {} in one network and {} in another: using the first",
                    have.underlay_ip,
                    n.underlay_ip
                ),
            }
        }
        endpoints.extend(s.endpoints.unwrap_or_default());
    }
    Snapshot {
        cluster: crate::config::Cluster {
            networks,
            nodes: nodes.into_values().collect(),
            encryption: encryption.unwrap_or_default(),
        },
        endpoints: Some(endpoints),
    }
}

impl Store for EtcdNetworks {
    fn describe(&self) -> String {
        let nets: Vec<String> = self.stores.iter().map(|s| s.network().name).collect();
        format!(
            "etcd {} {} networks {} (node {})",
            self.opts.endpoints.join(","),
            self.opts.prefix,
            nets.join(","),
            self.opts.node
        )
    }

    async fn snapshot(&mut self) -> Result<Snapshot> {
        let mut snaps = Vec::with_capacity(self.stores.len());
        for s in &mut self.stores {
            snaps.push(s.snapshot().await?);
        }
        Ok(merge(snaps))
    }

    async fn changed(&mut self) -> Result<()> {
        let futs = self.stores.iter_mut().map(|s| Box::pin(s.changed()));
        futures::future::select_all(futs).await.0
    }

    /// Bridged networks: etcd, bound to this node's lease in `network`.
    fn allocator(&self, network: &str) -> AllocatorSpec {
        let Some(s) = self.store(network) else {
            return AllocatorSpec::Local;
        };
        if s.network().mode != Mode::Bridged {
            return AllocatorSpec::Local;
        }
        let tls = self.opts.tls.as_ref();
        AllocatorSpec::Etcd(Box::new(EtcdSection {
            endpoints: self.opts.endpoints.clone(),
            prefix: self.opts.prefix.clone(),
            network: network.to_string(),
            node: self.opts.node.clone(),
            lease: s.lease_id(),
            hold_lease: s.hold_lease_id(),
            ca: tls.map(|t| t.ca.clone()),
            cert: tls.and_then(|t| t.cert.clone()),
            key: tls.and_then(|t| t.key.clone()),
            user: self.opts.user.as_ref().map(|(u, _)| u.clone()),
            password_file: self.password_file.clone(),
        }))
    }

    async fn sync_endpoints(
        &mut self,
        network: &str,
        allocated: &BTreeSet<Ipv4Addr>,
    ) -> Result<Vec<LostAddress>> {
        let Some(s) = self.store(network) else {
            return Ok(Vec::new());
        };
        let mut lost = Vec::new();
        let mut refused = BTreeMap::new();
        for r in s.sync_endpoints(allocated).await? {
            match r.lost() {
                Some(l) => lost.push(l),
                None => {
                    refused.insert(r.ip, r.why);
                }
            }
        }
        let warned = self.refused.entry(network.to_string()).or_default();
        for (ip, why) in &refused {
            if warned.get(ip) != Some(why) {
                tracing::warn!(
                    network,
                    %ip,
                    "address allocated on this node cannot be published ({why}): detach the container here"
                );
            }
        }
        *warned = refused;
        Ok(lost)
    }

    fn lists_keys(&self) -> bool {
        true
    }

    async fn publish_keys(&mut self, keys: crate::secure::ListedKeys) -> Result<()> {
        for s in &self.stores {
            s.publish_keys(keys).await?;
        }
        Ok(())
    }

    async fn leave(self) -> Result<()> {
        let mut problems = Vec::new();
        for s in self.stores {
            let net = s.network().name;
            if let Err(e) = s.leave().await {
                problems.push(format!("network {net}: {e:#}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Several {
                op: "leave",
                problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cluster, Network};
    use crate::model::{Endpoint, container_mac};

    fn net(name: &str, vni: u32) -> Network {
        crate::store::etcd::records::test_network(name, Mode::Bridged, "10.1.0.0/24", 28, vni)
    }

    fn node(name: &str, ip: [u8; 4], net: &str, subnet: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            underlay_ip: ip.into(),
            underlay_dev: None,
            subnets: BTreeMap::from([(net.to_string(), subnet.parse().unwrap())]),
            public_key: None,
            next_public_key: None,
        }
    }

    #[test]
    fn the_secure_underlay_settings_are_the_encrypted_networks() {
        let settings = crate::secure::config::validate(
            Some(&crate::secure::config::EncryptionFile {
                transport_cidr: Some("100.64.0.0/24".into()),
                port: Some(51999),
            }),
            &[],
        )
        .unwrap();
        let snap = |n: Network, e| Snapshot {
            cluster: Cluster {
                networks: vec![n],
                nodes: vec![],
                encryption: e,
            },
            endpoints: Some(vec![]),
        };
        let mut secret = net("b", 201);
        secret.encrypt = true;
        // A plain network's (default) settings do not count.
        let m = merge(vec![
            snap(net("a", 200), Default::default()),
            snap(secret, settings),
        ]);
        assert_eq!(m.cluster.encryption, settings);
        let m = merge(vec![snap(net("a", 200), Default::default())]);
        assert_eq!(m.cluster.encryption, Default::default());
    }

    #[test]
    fn snapshots_merge_by_node() {
        let ep = |n: &str, ip: [u8; 4], node: &str| Endpoint {
            network: n.into(),
            ip: ip.into(),
            mac: container_mac(ip.into()),
            node: node.into(),
        };
        let a = Snapshot {
            cluster: Cluster {
                networks: vec![net("a", 200)],
                nodes: vec![
                    node("h1", [198, 18, 0, 1], "a", "10.1.0.16/28"),
                    node("h2", [198, 18, 0, 2], "a", "10.1.0.32/28"),
                ],
                encryption: Default::default(),
            },
            endpoints: Some(vec![ep("a", [10, 1, 0, 17], "h1")]),
        };
        let b = Snapshot {
            cluster: Cluster {
                networks: vec![net("b", 201)],
                nodes: vec![
                    node("h1", [198, 18, 0, 1], "b", "10.1.0.48/28"),
                    node("h3", [198, 18, 0, 3], "b", "10.1.0.64/28"),
                    // Same name, another IP: left out.
                    node("h2", [198, 18, 0, 9], "b", "10.1.0.80/28"),
                ],
                encryption: Default::default(),
            },
            endpoints: Some(vec![ep("b", [10, 1, 0, 49], "h1")]),
        };
        let m = merge(vec![a, b]);
        assert_eq!(m.cluster.networks.len(), 2);
        let names: Vec<_> = m.cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["h1", "h2", "h3"]);
        let h1 = m.cluster.node("h1").unwrap();
        assert_eq!(h1.subnets.len(), 2);
        let h2 = m.cluster.node("h2").unwrap();
        assert_eq!(h2.subnets.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(m.endpoints.unwrap().len(), 2);
    }
}
