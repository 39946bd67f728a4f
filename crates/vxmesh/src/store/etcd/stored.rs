//! The public face of the etcd key layout: what one stored key-value of a
//! network means once validated, how a record is written back, and the
//! snapshot the watcher derives from a listing. The store itself goes
//! through the same functions; the fuzz targets use only this.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::records::{self, KeyKind, Keys};
use super::view::{Kv, View};
use crate::config::Network;
use crate::metrics::RecordKind;
use crate::model::Endpoint;
use crate::names::NodeName;
use crate::secure::config::Encryption;
use crate::store::Snapshot;

pub use super::records::NodeJson as StoredNode;

/// One validated record of a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `config`: the network's settings.
    Network(Network),
    /// `encryption`: an encrypted network's secure underlay settings.
    Encryption(Encryption),
    /// `subnets/A.B.C.D-LEN`: the node holding a subnet (slice).
    Claim { subnet: Ipv4Net, node: NodeName },
    /// `nodes/NODE`: a node's record.
    Node(StoredNode),
    /// `endpoints/A.B.C.D`: a container of a bridged network.
    Endpoint(Endpoint),
}

/// A stored record that failed validation: which key, what kind, why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct RecordError {
    pub key: String,
    pub kind: RecordKind,
    pub reason: String,
}

/// The records of one network under a key prefix (`/vxmesh` by default).
#[derive(Clone, Debug)]
pub struct NetworkRecords {
    keys: Keys,
    network: Network,
}

impl NetworkRecords {
    /// Records of `network` (its current settings validate the others).
    pub fn new(prefix: &str, network: Network) -> Self {
        NetworkRecords {
            keys: Keys::new(prefix, &network.name),
            network,
        }
    }

    /// Parse and validate the value stored under `key` the way the watcher
    /// does. `Ok(None)`: the key is not a record of this network.
    pub fn parse(&self, key: &str, value: &[u8]) -> Result<Option<Record>, RecordError> {
        let net = &self.network;
        let fail = |kind: RecordKind| {
            move |reason: String| RecordError {
                key: key.to_string(),
                kind,
                reason,
            }
        };
        let record = match self.keys.classify(key) {
            KeyKind::Other => return Ok(None),
            KeyKind::Config => records::parse_network(&net.name, value)
                .map(Record::Network)
                .map_err(fail(RecordKind::Network))?,
            KeyKind::Encryption => records::parse_encryption(net, value)
                .map(Record::Encryption)
                .map_err(fail(RecordKind::Network))?,
            KeyKind::Subnet(part) => {
                let (subnet, node) =
                    records::parse_claim(net, part, value).map_err(fail(RecordKind::Subnet))?;
                let node = node.parse().map_err(|e: crate::names::NameError| {
                    fail(RecordKind::Subnet)(e.to_string())
                })?;
                Record::Claim { subnet, node }
            }
            KeyKind::Node(name) => records::parse_node(net, name, value)
                .map(Record::Node)
                .map_err(fail(RecordKind::Node))?,
            KeyKind::Endpoint(ip) => records::parse_endpoint(net, ip, value)
                .map(Record::Endpoint)
                .map_err(fail(RecordKind::Endpoint))?,
        };
        Ok(Some(record))
    }

    /// The key and value a record is stored as.
    pub fn encode(&self, record: &Record) -> (String, Vec<u8>) {
        match record {
            Record::Network(n) => (self.keys.config(), records::network_json(n).into_bytes()),
            Record::Encryption(e) => (
                self.keys.encryption(),
                records::encryption_json(e).into_bytes(),
            ),
            Record::Claim { subnet, node } => (self.keys.subnet(*subnet), node.as_bytes().to_vec()),
            Record::Node(n) => (self.keys.node(&n.name), to_json(n)),
            Record::Endpoint(ep) => (self.keys.endpoint(ep.ip), to_json(ep)),
        }
    }

    /// The key an endpoint at `ip` is stored under.
    pub fn endpoint_key(&self, ip: Ipv4Addr) -> String {
        self.keys.endpoint(ip)
    }

    /// The snapshot the watcher derives from a listing of these key-values
    /// (given in revision order): invalid records and conflicts skipped, the
    /// last valid network config kept.
    pub fn snapshot<'a>(&self, listing: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Snapshot {
        let kvs: BTreeMap<String, Kv> = (1i64..)
            .zip(listing)
            .map(|(rev, (key, value))| {
                let kv = Kv {
                    value: value.to_vec(),
                    create_rev: rev,
                    mod_rev: rev,
                };
                (key.to_string(), kv)
            })
            .collect();
        let mut view = View::new(self.keys.clone(), self.network.clone());
        view.reset(kvs);
        let _ = view.rebuild();
        view.snapshot().clone()
    }
}

/// The JSON of a record value (these types always serialise).
fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("a record serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::model::Mac;

    fn records() -> NetworkRecords {
        NetworkRecords::new(
            "/vxmesh",
            crate::store::etcd::records::test_network(
                "demo",
                Mode::Bridged,
                "10.1.0.0/24",
                28,
                100,
            ),
        )
    }

    #[test]
    fn records_round_trip_through_their_keys() {
        let r = records();
        let all = [
            Record::Claim {
                subnet: "10.1.0.16/28".parse().unwrap(),
                node: "h1".parse().unwrap(),
            },
            Record::Node(StoredNode {
                name: "h1".into(),
                underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
                underlay_dev: Some("eth0".into()),
                subnet: "10.1.0.16/28".parse().unwrap(),
                public_key: Some(crate::secure::PrivateKey::generate().unwrap().public()),
                next_public_key: None,
            }),
            Record::Endpoint(Endpoint {
                network: "demo".into(),
                ip: Ipv4Addr::new(10, 1, 0, 17),
                mac: Mac([2, 0x42, 10, 1, 0, 17]),
                node: "h1".into(),
            }),
        ];
        for rec in &all {
            let (key, value) = r.encode(rec);
            assert_eq!(r.parse(&key, &value), Ok(Some(rec.clone())), "{key}");
        }
        let listing: Vec<(String, Vec<u8>)> = all.iter().map(|rec| r.encode(rec)).collect();
        let snap = r.snapshot(listing.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        assert_eq!(snap.cluster.nodes.len(), 1);
        assert_eq!(snap.endpoints.map(|e| e.len()), Some(1));
    }

    #[test]
    fn invalid_records_name_key_and_kind() {
        let r = records();
        let e = r
            .parse("/vxmesh/networks/demo/nodes/bad name", b"{}")
            .unwrap_err();
        assert_eq!(e.kind, RecordKind::Node);
        assert_eq!(e.key, "/vxmesh/networks/demo/nodes/bad name");
        let e = r
            .parse("/vxmesh/networks/demo/subnets/10.1.0.16-28", b"bad name")
            .unwrap_err();
        assert!(e.reason.contains("not a valid node name"), "{e}");
        assert_eq!(r.parse("/vxmesh/networks/other/config", b""), Ok(None));
    }
}
