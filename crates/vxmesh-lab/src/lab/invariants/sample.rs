//! Taking one sample: the lab's record (which nodes are live), etcd's
//! records under the prefix (read from the underlay namespace, from the
//! first member that answers a linearizable read), and every node's kernel
//! state as its agent programmed it (netlink dumps in its namespace, and
//! its containers' addresses in theirs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, ConnectOptions, GetOptions};
use ipnet::Ipv4Net;

use super::rules::{EtcdView, NodeView, StoredNode};
use crate::lab::LabInfo;
use vxmesh::config::Mode;
use vxmesh::dataplane::kernel::ActualState;
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::Netns;

/// How long one member may take to answer a sample's read.
const ETCD_READ: Duration = Duration::from_millis(800);

/// Read the lab's record (`lab.json`) as the lab process last saved it.
pub fn read_info(dir: &Path) -> Result<LabInfo> {
    let path = dir.join("lab.json");
    let data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    LabInfo::from_json(&data).with_context(|| format!("parse {}", path.display()))
}

/// The nodes that count as live: agent running and joined.
pub fn live_nodes(info: &LabInfo) -> BTreeSet<String> {
    info.nodes
        .iter()
        .filter(|n| n.agent_pid.is_some() && !n.subnets.is_empty())
        .map(|n| n.name.clone())
        .collect()
}

/// The nodes whose agent runs but has not joined yet.
pub fn joining_nodes(info: &LabInfo) -> BTreeSet<String> {
    info.nodes
        .iter()
        .filter(|n| n.agent_pid.is_some() && n.subnets.is_empty())
        .map(|n| n.name.clone())
        .collect()
}

/// Parse a listing of the keys under `PREFIX/networks/`: claims and node
/// records (everything else is left out, including keys this checker does
/// not know).
pub fn parse_listing<'a>(
    prefix: &str,
    kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> EtcdView {
    let root = format!("{}/networks/", prefix.trim_end_matches('/'));
    let mut view = EtcdView::default();
    for (key, value) in kvs {
        let Some(rest) = key.strip_prefix(&root) else {
            continue;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(net), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "subnets" => {
                let sub = name
                    .split_once('-')
                    .and_then(|(ip, len)| Some(Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?)))
                    .and_then(|r| r.ok());
                if let (Some(sub), Ok(owner)) = (sub, std::str::from_utf8(value)) {
                    view.claims
                        .insert((net.to_string(), sub), owner.to_string());
                }
            }
            "nodes" => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(value) else {
                    continue;
                };
                let sub = v["subnet"].as_str().and_then(|s| s.parse().ok());
                let ul = v["underlay_ip"].as_str().and_then(|s| s.parse().ok());
                if let (Some(subnet), Some(underlay_ip)) = (sub, ul) {
                    view.nodes.insert(
                        (net.to_string(), name.to_string()),
                        StoredNode {
                            subnet,
                            underlay_ip,
                        },
                    );
                }
            }
            _ => {}
        }
    }
    view
}

/// Read everything under `PREFIX/networks/` from the first of `urls` that
/// answers (linearizable, so a member without quorum does not); starts with
/// `prefer` and returns the one that answered. Runs inside the underlay
/// namespace.
pub async fn read_etcd(
    urls: Vec<String>,
    prefer: usize,
    prefix: String,
) -> (Option<EtcdView>, usize) {
    let n = urls.len();
    for k in 0..n {
        let i = (prefer + k) % n.max(1);
        let read = async {
            let opts = ConnectOptions::new()
                .with_connect_timeout(ETCD_READ)
                .with_timeout(ETCD_READ);
            let mut c = Client::connect([urls[i].as_str()], Some(opts)).await?;
            let key = format!("{}/networks/", prefix.trim_end_matches('/'));
            c.get(key, Some(GetOptions::new().with_prefix())).await
        };
        if let Ok(Ok(resp)) = tokio::time::timeout(ETCD_READ * 2, read).await {
            let mut view = parse_listing(
                &prefix,
                resp.kvs()
                    .iter()
                    .map(|kv| (kv.key_str().unwrap_or(""), kv.value())),
            );
            view.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            return (Some(view), i);
        }
    }
    (None, prefer)
}

/// What a node's kernel holds, from one dump: the routed bridge's subnet
/// and the peer entries (route -> neighbour -> FDB, or neighbour -> FDB for
/// bridged endpoints).
pub fn node_view(a: &ActualState, underlay_ip: Ipv4Addr, mode: Mode) -> NodeView {
    let bridges: BTreeSet<&str> = a
        .managed_links()
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .map(|l| l.name.as_str())
        .collect();
    let vteps: BTreeSet<&str> = a
        .managed_links()
        .filter(|l| l.kind.as_deref() == Some("vxlan"))
        .map(|l| l.name.as_str())
        .collect();
    let subnet = match mode {
        Mode::Routed => a
            .addresses
            .iter()
            .find(|x| bridges.contains(x.dev.as_str()))
            .map(|x| x.addr.trunc()),
        Mode::Bridged => None,
    };
    let underlay_of = |dev: &str, mac| {
        a.fdb
            .iter()
            .find(|f| f.dev == dev && f.mac == mac)
            .and_then(|f| f.dst)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    };
    let neigh_mac = |dev: &str, ip: Ipv4Addr| {
        a.neighbours
            .iter()
            .find(|n| n.dev == dev && n.ip == ip && n.permanent)
            .and_then(|n| n.mac)
    };
    let mut peers = BTreeSet::new();
    match mode {
        Mode::Routed => {
            for r in &a.routes {
                let (Some(dev), Some(via)) = (r.dev.as_deref(), r.via) else {
                    continue;
                };
                if !vteps.contains(dev) {
                    continue;
                }
                let ul = neigh_mac(dev, via)
                    .map(|m| underlay_of(dev, m))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                peers.insert((r.dst, ul));
            }
        }
        Mode::Bridged => {
            for n in a.neighbours.iter().filter(|n| n.permanent) {
                if !vteps.contains(n.dev.as_str()) {
                    continue;
                }
                let ul = n
                    .mac
                    .map(|m| underlay_of(&n.dev, m))
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                peers.insert((Ipv4Net::from(n.ip), ul));
            }
        }
    }
    NodeView {
        underlay_ip,
        subnet,
        peers,
        containers: Vec::new(),
    }
}

/// Open netlink connections, one per namespace, reused between samples.
#[derive(Default)]
pub struct Connections(HashMap<String, Netlink>);

impl Connections {
    async fn get(&mut self, netns: &str) -> Result<&Netlink> {
        if !self.0.contains_key(netns) {
            let nl = Netlink::connect_in(&Netns::open(netns)?).await?;
            self.0.insert(netns.to_string(), nl);
        }
        Ok(&self.0[netns])
    }

    /// Forget namespaces no longer in the lab.
    fn keep(&mut self, wanted: &BTreeSet<String>) {
        self.0.retain(|k, _| wanted.contains(k));
    }

    /// Every node's kernel view with its containers' addresses; a node or
    /// container whose namespace is gone (being removed) is left out.
    pub async fn kernels(&mut self, info: &LabInfo) -> BTreeMap<String, NodeView> {
        let wanted: BTreeSet<String> = info
            .nodes
            .iter()
            .map(|n| n.netns.clone())
            .chain(info.containers.iter().map(|c| c.netns.clone()))
            .collect();
        self.keep(&wanted);
        let mut out = BTreeMap::new();
        for n in &info.nodes {
            let Ok(nl) = self.get(&n.netns).await else {
                continue;
            };
            let Ok(actual) = nl.dump().await else {
                self.0.remove(&n.netns);
                continue;
            };
            out.insert(n.name.clone(), node_view(&actual, n.underlay_ip, info.mode));
        }
        for c in &info.containers {
            let Ok(nl) = self.get(&c.netns).await else {
                continue;
            };
            let Ok(facts) = nl.interface_facts("eth0").await else {
                self.0.remove(&c.netns);
                continue;
            };
            if let (Some(f), Some(v)) = (facts, out.get_mut(&c.node)) {
                for a in f.addresses {
                    v.containers
                        .push((c.name.clone(), c.network.clone(), a.addr()));
                }
            }
        }
        out
    }
}

/// Where a sampler finds the lab.
#[derive(Clone, Debug)]
pub struct LabPlace {
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub etcd_urls: Vec<String>,
    pub prefix: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_yields_claims_and_records_and_skips_the_rest() {
        let kvs: Vec<(&str, &[u8])> = vec![
            ("/vxmesh/networks/demo/config", b"{}"),
            ("/vxmesh/networks/demo/subnets/172.18.3.0-24", b"host1"),
            (
                "/vxmesh/networks/demo/nodes/host1",
                br#"{"name":"host1","underlay_ip":"198.18.0.1","subnet":"172.18.3.0/24"}"#,
            ),
            ("/vxmesh/networks/demo/nodes/host2", b"not json"),
            ("/vxmesh/networks/demo/quarantine/172.18.9.0-24", b"host2"),
            ("/elsewhere/x", b"y"),
        ];
        let v = parse_listing("/vxmesh", kvs);
        let sub: Ipv4Net = "172.18.3.0/24".parse().unwrap();
        assert_eq!(
            v.claims,
            BTreeMap::from([(("demo".to_string(), sub), "host1".to_string())])
        );
        assert_eq!(
            v.nodes,
            BTreeMap::from([(
                ("demo".to_string(), "host1".to_string()),
                StoredNode {
                    subnet: sub,
                    underlay_ip: Ipv4Addr::new(198, 18, 0, 1)
                }
            )])
        );
    }
}
