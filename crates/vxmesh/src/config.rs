//! The cluster file: networks and nodes, parsed from TOML and validated.
//!
//! ```toml
//! [[network]]
//! name = "demo"
//! mode = "routed"            # or "bridged"
//! cidr = "172.18.0.0/16"     # routed: cluster CIDR; bridged: the segment's subnet
//! subnet_len = 24            # routed: per-node subnet; bridged: per-node address slice
//! vni = 100
//! port = 4789                # optional, default 4789
//! mtu = 1450                 # optional, default underlay MTU - 50
//!
//! [[node]]
//! name = "host1"
//! underlay_ip = "198.18.0.1"
//! underlay_dev = "eth0"      # optional
//! subnet = "172.18.10.0/24"  # optional (single-network files), derived when absent
//! # subnets = { demo = "172.18.10.0/24" }   # per network, for several networks
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{NodeRecord, Vni};

pub const DEFAULT_PORT: u16 = 4789;
/// VXLAN over IPv4 adds 50 bytes (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 65535 - VXLAN_OVERHEAD;

/// Data-plane mode of a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Routed,
    Bridged,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Routed => "routed",
            Mode::Bridged => "bridged",
        })
    }
}

/// A network as written in the file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    pub name: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    pub cidr: String,
    pub subnet_len: u8,
    pub vni: u32,
    #[serde(default = "default_port")]
    pub port: u32,
    #[serde(default)]
    pub mtu: Option<u32>,
}

fn default_mode() -> Mode {
    Mode::Routed
}
fn default_port() -> u32 {
    DEFAULT_PORT as u32
}

/// A node as written in the file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub name: String,
    pub underlay_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_dev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subnets: BTreeMap<String, String>,
}

/// The cluster file as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkFile>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeFile>,
}

/// A validated network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub mode: Mode,
    pub cidr: Ipv4Net,
    pub subnet_len: u8,
    pub vni: Vni,
    pub port: u16,
    pub mtu: Option<u32>,
}

impl Network {
    /// The overlay MTU given the underlay device's MTU.
    pub fn effective_mtu(&self, underlay_mtu: u32) -> u32 {
        self.mtu
            .unwrap_or(underlay_mtu.saturating_sub(VXLAN_OVERHEAD))
    }
}

/// A validated cluster: networks and node records with every subnet resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub networks: Vec<Network>,
    pub nodes: Vec<NodeRecord>,
}

impl Cluster {
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }
}

/// One problem found in a cluster file: where, what, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem in a cluster file (validation does not stop at the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid cluster file {}:", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(source: &str, field: &str, message: String) -> Self {
        ConfigError {
            source_name: source.to_string(),
            problems: vec![Problem {
                field: field.to_string(),
                message,
            }],
        }
    }
}

/// Read and validate a cluster file.
pub fn load(path: &Path) -> Result<Cluster, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one(&name, "file", format!("cannot read it: {e}")))?;
    parse(&text, &name)
}

/// Parse and validate cluster TOML.
pub fn parse(text: &str, source_name: &str) -> Result<Cluster, ConfigError> {
    let file: ClusterFile = toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let field = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            }
            None => "toml".to_string(),
        };
        ConfigError::one(
            source_name,
            &field,
            format!("{msg} (see the cluster file format in README.md)"),
        )
    })?;
    validate(&file, source_name)
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Parse `a.b.c.d/len` and require it to be a network address (no host bits).
pub fn parse_net(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("'{s}' is not an IPv4 CIDR (write it like 172.18.0.0/16)"))?;
    if net.trunc() != net {
        return Err(format!(
            "'{s}' has host bits set: write it as {}",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_underlay_ip(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an IPv4 address (write it like 198.18.0.1)"))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(format!(
            "{ip} cannot carry VXLAN to other hosts: use the node's unicast underlay address"
        ));
    }
    Ok(ip)
}

/// Validate a parsed file, collecting every problem, and resolve derived subnets.
pub fn validate(file: &ClusterFile, source: &str) -> Result<Cluster, ConfigError> {
    let mut problems = Vec::new();
    let mut p = |field: String, message: String| problems.push(Problem { field, message });

    if file.networks.is_empty() {
        p(
            "network".into(),
            "no [[network]] table: declare at least one network".into(),
        );
    }
    let mut networks = Vec::new();
    let mut names = HashMap::new();
    let mut vnis: HashMap<u32, (String, u32)> = HashMap::new();
    let mut routed = None::<String>;
    for (i, n) in file.networks.iter().enumerate() {
        let f = |k: &str| format!("network[{i}].{k}");
        if !valid_name(&n.name, 32) {
            p(
                f("name"),
                format!(
                    "'{}' is not a valid network name: use 1-32 characters from [A-Za-z0-9._-]",
                    n.name
                ),
            );
        } else if let Some(j) = names.insert(n.name.clone(), i) {
            p(
                f("name"),
                format!(
                    "network '{}' is already declared as network[{j}]: give each network its own name",
                    n.name
                ),
            );
        }
        let vni = match Vni::new(n.vni) {
            Ok(v) => Some(v),
            Err(e) => {
                p(f("vni"), e);
                None
            }
        };
        if let Some((other, other_port)) = vnis.get(&n.vni) {
            let extra = if *other_port != n.port {
                format!(" (and with a different port, {other_port} vs {})", n.port)
            } else {
                String::new()
            };
            p(
                f("vni"),
                format!(
                    "VNI {} is already used by network '{other}'{extra}: every network needs its own VNI",
                    n.vni
                ),
            );
        } else {
            vnis.insert(n.vni, (n.name.clone(), n.port));
        }
        let port = if n.port == 0 || n.port > 65535 {
            p(
                f("port"),
                format!(
                    "UDP port {} is out of range: use 1-65535 (VXLAN's standard port is 4789)",
                    n.port
                ),
            );
            None
        } else {
            Some(n.port as u16)
        };
        if let Some(mtu) = n.mtu
            && !(MIN_MTU..=MAX_MTU).contains(&mtu)
        {
            p(
                f("mtu"),
                format!(
                    "MTU {mtu} is out of range: use {MIN_MTU}-{MAX_MTU}, or omit it to use the underlay MTU - {VXLAN_OVERHEAD}"
                ),
            );
        }
        let cidr = match parse_net(&n.cidr) {
            Ok(c) => Some(c),
            Err(e) => {
                p(f("cidr"), e);
                None
            }
        };
        let max_len = match n.mode {
            Mode::Routed => 30,
            Mode::Bridged => 32,
        };
        if let Some(c) = cidr
            && (n.subnet_len <= c.prefix_len() || n.subnet_len > max_len)
        {
            {
                p(
                    f("subnet_len"),
                    format!(
                        "/{} does not fit cidr {c}: use a length from {} to {max_len}",
                        n.subnet_len,
                        c.prefix_len() + 1
                    ),
                );
            }
        }
        if n.mode == Mode::Routed {
            if let Some(other) = &routed {
                p(
                    f("mode"),
                    format!(
                        "a node serves one routed network (bridge vxm-br0) and '{other}' is routed already: make this one bridged or move it to another file"
                    ),
                );
            } else {
                routed = Some(n.name.clone());
            }
        }
        if let (Some(vni), Some(port), Some(cidr)) = (vni, port, cidr) {
            networks.push(Network {
                name: n.name.clone(),
                mode: n.mode,
                cidr,
                subnet_len: n.subnet_len,
                vni,
                port,
                mtu: n.mtu,
            });
        }
    }

    // Nodes.
    let mut node_names = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut node_ips = Vec::new();
    for (i, n) in file.nodes.iter().enumerate() {
        let f = |k: &str| format!("node[{i}].{k}");
        if !valid_name(&n.name, 64) {
            p(
                f("name"),
                format!(
                    "'{}' is not a valid node name: use 1-64 characters from [A-Za-z0-9._-]",
                    n.name
                ),
            );
        } else if let Some(j) = node_names.insert(n.name.clone(), i) {
            p(
                f("name"),
                format!(
                    "node '{}' is already declared as node[{j}]: node names must be unique",
                    n.name
                ),
            );
        }
        match parse_underlay_ip(&n.underlay_ip) {
            Ok(ip) => {
                if let Some(j) = ips.insert(ip, i) {
                    p(
                        f("underlay_ip"),
                        format!(
                            "{ip} is already the underlay IP of node[{j}]: each node needs its own"
                        ),
                    );
                }
                node_ips.push(Some(ip));
            }
            Err(e) => {
                p(f("underlay_ip"), e);
                node_ips.push(None);
            }
        }
        if let Some(d) = &n.underlay_dev
            && (d.is_empty() || d.len() > 15 || d.contains('/') || d.contains(' '))
        {
            p(
                f("underlay_dev"),
                format!("'{d}' is not a valid interface name (1-15 characters, no '/' or spaces)"),
            );
        }
        if n.subnet.is_some() && file.networks.len() > 1 {
            p(
                f("subnet"),
                "the file declares several networks: use subnets = { NETWORK = \"CIDR\" } instead"
                    .into(),
            );
        }
        if n.subnet.is_some() && !n.subnets.is_empty() {
            p(f("subnet"), "set either subnet or subnets, not both".into());
        }
        for k in n.subnets.keys() {
            if !file.networks.iter().any(|net| &net.name == k) {
                p(
                    f(&format!("subnets.{k}")),
                    format!("there is no network '{k}': subnets keys must name a declared network"),
                );
            }
        }
    }

    // Subnets per network: explicit ones first, then derived by node order.
    let mut node_subnets: Vec<BTreeMap<String, Ipv4Net>> = vec![BTreeMap::new(); file.nodes.len()];
    for net in &networks {
        let mut taken: Vec<(Ipv4Net, usize)> = Vec::new();
        for (i, n) in file.nodes.iter().enumerate() {
            let explicit = n.subnets.get(&net.name).or(if file.networks.len() == 1 {
                n.subnet.as_ref()
            } else {
                None
            });
            let Some(s) = explicit else { continue };
            let field = if n.subnets.contains_key(&net.name) {
                format!("node[{i}].subnets.{}", net.name)
            } else {
                format!("node[{i}].subnet")
            };
            let what = if net.mode == Mode::Routed {
                "subnet"
            } else {
                "address slice"
            };
            match parse_net(s) {
                Err(e) => p(field, e),
                Ok(sn) => {
                    if !net.cidr.contains(&sn) {
                        p(
                            field,
                            format!(
                                "{what} {sn} is outside network '{}' cidr {}: pick one inside it or omit it to derive one",
                                net.name, net.cidr
                            ),
                        );
                    } else if sn.prefix_len() != net.subnet_len {
                        p(
                            field,
                            format!(
                                "{what} {sn} is a /{} but network '{}' has subnet_len = {}: use a /{}",
                                sn.prefix_len(),
                                net.name,
                                net.subnet_len,
                                net.subnet_len
                            ),
                        );
                    } else if let Some((_, j)) = taken
                        .iter()
                        .find(|(t, _)| t.contains(&sn) || sn.contains(t))
                    {
                        p(
                            field,
                            format!(
                                "{what} {sn} overlaps the one of node[{j}] ('{}'): give each node its own",
                                file.nodes[*j].name
                            ),
                        );
                    } else {
                        taken.push((sn, i));
                        node_subnets[i].insert(net.name.clone(), sn);
                    }
                }
            }
        }
        if net.subnet_len <= net.cidr.prefix_len() || net.subnet_len > 32 {
            continue;
        }
        let mut free = net
            .cidr
            .subnets(net.subnet_len)
            .expect("subnet_len checked above")
            .filter(|c| !taken.iter().any(|(t, _)| t.contains(c) || c.contains(t)));
        for (i, n) in file.nodes.iter().enumerate() {
            let explicit = n.subnets.contains_key(&net.name)
                || (file.networks.len() == 1 && n.subnet.is_some());
            if explicit {
                continue;
            }
            match free.next() {
                Some(sn) => {
                    node_subnets[i].insert(net.name.clone(), sn);
                }
                None => {
                    p(
                        format!("node[{i}]"),
                        format!(
                            "network '{}' cidr {} has no free /{} left for node '{}': widen the cidr or lengthen subnet_len",
                            net.name, net.cidr, net.subnet_len, n.name
                        ),
                    );
                    break;
                }
            }
        }
    }

    if !problems.is_empty() {
        return Err(ConfigError {
            source_name: source.to_string(),
            problems,
        });
    }
    let nodes = file
        .nodes
        .iter()
        .zip(node_ips)
        .zip(node_subnets)
        .map(|((n, ip), subnets)| NodeRecord {
            name: n.name.clone(),
            underlay_ip: ip.expect("checked"),
            underlay_dev: n.underlay_dev.clone(),
            subnets,
        })
        .collect();
    Ok(Cluster { networks, nodes })
}

/// Names of the nodes of a cluster (sorted), for messages.
pub fn node_names(c: &Cluster) -> BTreeSet<&str> {
    c.nodes.iter().map(|n| n.name.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[network]]
name = "demo"
cidr = "172.18.0.0/16"
subnet_len = 24
vni = 100

[[node]]
name = "host1"
underlay_ip = "198.18.0.1"
subnet = "172.18.10.0/24"

[[node]]
name = "host2"
underlay_ip = "198.18.0.2"
"#;

    fn errs(text: &str) -> Vec<String> {
        match parse(text, "t.toml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn has(text: &str, needle: &str) {
        let e = errs(text);
        assert!(
            e.iter().any(|m| m.contains(needle)),
            "no problem containing '{needle}' in {e:#?}"
        );
    }

    #[test]
    fn good_file_resolves_subnets() {
        let c = parse(GOOD, "t").unwrap();
        assert_eq!(c.networks[0].port, 4789);
        assert_eq!(c.networks[0].mode, Mode::Routed);
        assert_eq!(c.nodes[0].subnets["demo"].to_string(), "172.18.10.0/24");
        // Derived: the first /24 not explicitly taken.
        assert_eq!(c.nodes[1].subnets["demo"].to_string(), "172.18.0.0/24");
    }

    #[test]
    fn derivation_skips_explicit_subnets() {
        let t = GOOD.replace("172.18.10.0/24", "172.18.0.0/24");
        let c = parse(&t, "t").unwrap();
        assert_eq!(c.nodes[1].subnets["demo"].to_string(), "172.18.1.0/24");
    }

    #[test]
    fn bad_cidr() {
        has(
            &GOOD.replace("172.18.0.0/16", "172.18.0.0/33"),
            "network[0].cidr",
        );
        has(
            &GOOD.replace("172.18.0.0/16", "172.18.0.1/16"),
            "host bits set: write it as 172.18.0.0/16",
        );
        has(
            &GOOD.replace("172.18.0.0/16", "banana"),
            "is not an IPv4 CIDR",
        );
    }

    #[test]
    fn subnet_outside_and_overlapping() {
        has(
            &GOOD.replace("172.18.10.0/24", "172.19.10.0/24"),
            "node[0].subnet: subnet 172.19.10.0/24 is outside",
        );
        has(
            &GOOD.replace("172.18.10.0/24", "172.18.10.0/25"),
            "is a /25 but network 'demo' has subnet_len = 24",
        );
        let t = GOOD.replace(
            "underlay_ip = \"198.18.0.2\"",
            "underlay_ip = \"198.18.0.2\"\nsubnet = \"172.18.10.0/24\"",
        );
        has(&t, "overlaps the one of node[0]");
    }

    #[test]
    fn duplicates() {
        has(
            &GOOD.replace("host2", "host1"),
            "node[1].name: node 'host1' is already declared",
        );
        has(
            &GOOD.replace("198.18.0.2", "198.18.0.1"),
            "node[1].underlay_ip: 198.18.0.1 is already",
        );
        has(
            &GOOD.replace("198.18.0.2", "127.0.0.1"),
            "cannot carry VXLAN",
        );
    }

    #[test]
    fn ranges() {
        has(
            &GOOD.replace("vni = 100", "vni = 0"),
            "network[0].vni: VNI 0 is out of range",
        );
        has(&GOOD.replace("vni = 100", "vni = 16777216"), "out of range");
        has(
            &GOOD.replace("vni = 100", "vni = 100\nport = 0"),
            "network[0].port",
        );
        has(
            &GOOD.replace("vni = 100", "vni = 100\nport = 70000"),
            "network[0].port",
        );
        has(
            &GOOD.replace("vni = 100", "vni = 100\nmtu = 500"),
            "network[0].mtu: MTU 500 is out of range",
        );
        has(
            &GOOD.replace("subnet_len = 24", "subnet_len = 16"),
            "network[0].subnet_len",
        );
    }

    #[test]
    fn unknown_keys_and_typos() {
        has(
            &GOOD.replace("vni = 100", "vni = 100\nvnii = 3"),
            "unknown field `vnii`",
        );
        has(
            &GOOD.replace("vni = 100", "vni = 100\nmode = \"routd\""),
            "unknown variant `routd`",
        );
        has(
            &GOOD.replace(
                "[[node]]\nname = \"host1\"",
                "[[node]]\nname = \"host1\"\ncolour = 1",
            ),
            "line 10: unknown field `colour`",
        );
    }

    #[test]
    fn cidr_exhausted() {
        let t = GOOD
            .replace("172.18.0.0/16", "172.18.0.0/23")
            .replace("172.18.10.0/24", "172.18.0.0/24")
            + "\n[[node]]\nname = \"host3\"\nunderlay_ip = \"198.18.0.3\"\n";
        has(&t, "has no free /24 left for node 'host3'");
    }

    #[test]
    fn several_networks() {
        let t = r#"
[[network]]
name = "a"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 28
vni = 200

[[network]]
name = "b"
mode = "bridged"
cidr = "10.1.0.0/24"
subnet_len = 28
vni = 201

[[node]]
name = "h1"
underlay_ip = "198.18.0.1"
subnets = { a = "10.1.0.16/28" }

[[node]]
name = "h2"
underlay_ip = "198.18.0.2"
"#;
        let c = parse(t, "t").unwrap();
        assert_eq!(c.nodes[0].subnets["a"].to_string(), "10.1.0.16/28");
        assert_eq!(c.nodes[1].subnets["a"].to_string(), "10.1.0.0/28");
        assert_eq!(c.nodes[0].subnets["b"].to_string(), "10.1.0.0/28");
        has(
            &t.replace("vni = 201", "vni = 200"),
            "VNI 200 is already used by network 'a'",
        );
        has(
            &t.replace("vni = 201", "vni = 200\nport = 8472"),
            "with a different port",
        );
        has(
            &t.replace("{ a = \"10.1.0.16/28\" }", "{ c = \"10.1.0.16/28\" }"),
            "there is no network 'c'",
        );
        has(
            &t.replace("10.1.0.16/28", "10.2.0.16/28"),
            "address slice 10.2.0.16/28 is outside",
        );
        has(
            &t.replace("name = \"h2\"", "name = \"h2\"\nsubnet = \"10.1.0.0/28\""),
            "use subnets = {",
        );
        let two_routed = t.replace("mode = \"bridged\"", "mode = \"routed\"");
        has(&two_routed, "a node serves one routed network");
    }
}
