//! Validation of a parsed cluster file, one section at a time (networks,
//! nodes, subnets), collecting every problem, and the resolution of the
//! subnets the file leaves to derive.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{
    Cluster, ClusterFile, ConfigError, MAX_MTU, MIN_MTU, Mode, Network, NetworkFile, NodeFile,
    Problem, VXLAN_OVERHEAD,
};
use crate::model::{self, NodeRecord, Vni};
use crate::names::{IfName, NetworkName, NodeName};

/// Text that is not a network address in CIDR form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("'{0}' is not an IPv4 CIDR (write it like 172.18.0.0/16)")]
    NotCidr(String),
    #[error("'{text}' has host bits set: write it as {network}")]
    HostBits { text: String, network: Ipv4Net },
}

/// Parse `a.b.c.d/len` and require it to be a network address (no host bits).
pub fn parse_net(s: &str) -> Result<Ipv4Net, CidrError> {
    let net: Ipv4Net = s.parse().map_err(|_| CidrError::NotCidr(s.to_string()))?;
    if net.trunc() != net {
        return Err(CidrError::HostBits {
            text: s.to_string(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

fn parse_underlay_ip(s: &str) -> Result<Ipv4Addr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| format!("'{s}' is not an IPv4 address (write it like 198.18.0.1)"))?;
    model::check_underlay_ip(ip).map_err(|e| e.to_string())
}

/// The problems found so far, in the order they were found.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Validate a parsed file, collecting every problem, and resolve derived subnets.
pub fn validate(file: &ClusterFile, source: &str) -> Result<Cluster, ConfigError> {
    let mut problems = Problems::default();
    let networks = networks(&file.networks, &mut problems);
    let node_ips = nodes(file, &mut problems);
    let node_keys: Vec<_> = (file.nodes.iter().enumerate())
        .map(|(i, n)| public_key(i, n, &mut problems))
        .collect();
    let mut node_subnets = vec![BTreeMap::new(); file.nodes.len()];
    for net in &networks {
        subnets(file, net, &mut node_subnets, &mut problems);
    }
    let ports: Vec<u16> = networks.iter().map(|n| n.port).collect();
    let encryption = crate::secure::config::validate(file.encryption.as_ref(), &ports)
        .unwrap_or_else(|list| {
            list.into_iter().for_each(|(f, m)| problems.add(f, m));
            Default::default()
        });
    if !problems.0.is_empty() {
        return Err(ConfigError {
            source_name: source.to_string(),
            problems: problems.0,
        });
    }
    let nodes = file
        .nodes
        .iter()
        .zip(node_ips)
        .zip(node_subnets)
        .zip(node_keys)
        .map(
            |(((n, ip), subnets), (public_key, next_public_key))| NodeRecord {
                name: n.name.clone(),
                underlay_ip: ip.expect("checked"),
                underlay_dev: n.underlay_dev.clone(),
                subnets,
                public_key,
                next_public_key,
            },
        )
        .collect();
    let cluster = Cluster {
        networks,
        nodes,
        encryption,
    };
    if cluster.networks.iter().any(|n| n.encrypt)
        && let Err(e) = cluster.encryption.assign(&cluster.nodes)
    {
        return Err(ConfigError::one(
            source,
            "encryption.transport_cidr",
            e.to_string(),
        ));
    }
    Ok(cluster)
}

/// What earlier networks of the file hold, for the uniqueness rules.
#[derive(Default)]
struct SeenNetworks {
    names: HashMap<String, usize>,
    vnis: HashMap<u32, (String, u32)>,
    routed: Option<String>,
}

/// The `[[network]]` tables: the valid ones, in file order.
fn networks(files: &[NetworkFile], problems: &mut Problems) -> Vec<Network> {
    if files.is_empty() {
        problems.add(
            "network",
            "no [[network]] table: declare at least one network",
        );
    }
    let mut seen = SeenNetworks::default();
    let nets: Vec<Network> = files
        .iter()
        .enumerate()
        .filter_map(|(i, n)| network(i, n, &mut seen, problems))
        .collect();
    gateway_overlaps(&nets, problems);
    nets
}

/// A gateway puts the network's subnet on every node's bridge: it must
/// overlap no other network's range, or the node could not route to both.
fn gateway_overlaps(nets: &[Network], problems: &mut Problems) {
    for (i, n) in nets.iter().enumerate() {
        if n.gateway.is_none() {
            continue;
        }
        for o in nets.iter().filter(|o| o.name != n.name) {
            if n.cidr.contains(&o.cidr.network()) || o.cidr.contains(&n.cidr.network()) {
                problems.add(
                    format!("network[{i}].gateway"),
                    format!(
                        "network '{}' has a gateway but its cidr {} overlaps network '{}' ({}): give it a cidr of its own, or remove `gateway`",
                        n.name, n.cidr, o.name, o.cidr
                    ),
                );
            }
        }
    }
}

fn network(
    i: usize,
    n: &NetworkFile,
    seen: &mut SeenNetworks,
    problems: &mut Problems,
) -> Option<Network> {
    let f = |k: &str| format!("network[{i}].{k}");
    match n.name.parse::<NetworkName>() {
        Err(e) => problems.add(f("name"), e.to_string()),
        Ok(_) => {
            if let Some(j) = seen.names.insert(n.name.clone(), i) {
                problems.add(
                    f("name"),
                    format!(
                        "network '{}' is already declared as network[{j}]: give each network its own name",
                        n.name
                    ),
                );
            }
        }
    }
    let vni = network_vni(n, seen, problems, &f);
    let port = network_port(n, problems, &f);
    network_mtu(n, problems, &f);
    let cidr = match parse_net(&n.cidr) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.add(f("cidr"), e.to_string());
            None
        }
    };
    if let Some(c) = cidr {
        network_subnet_len(n, c, problems, &f);
    }
    network_mode(n, seen, problems, &f);
    let gateway = cidr.and_then(
        |c| match super::gateway::resolve(n.gateway.as_ref(), n.mode, c) {
            Ok(g) => g,
            Err(e) => {
                problems.add(f("gateway"), e);
                None
            }
        },
    );
    Some(Network {
        name: n.name.clone(),
        mode: n.mode,
        cidr: cidr?,
        subnet_len: n.subnet_len,
        vni: vni?,
        port: port?,
        mtu: n.mtu,
        gateway,
        outbound_nat: n.outbound_nat,
        encrypt: n.encrypt,
    })
}

/// A VNI in range and not used by an earlier network.
fn network_vni(
    n: &NetworkFile,
    seen: &mut SeenNetworks,
    problems: &mut Problems,
    f: &dyn Fn(&str) -> String,
) -> Option<Vni> {
    let vni = match Vni::new(n.vni) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.add(f("vni"), e.to_string());
            None
        }
    };
    if let Some((other, other_port)) = seen.vnis.get(&n.vni) {
        let extra = if *other_port != n.port {
            format!(" (and with a different port, {other_port} vs {})", n.port)
        } else {
            String::new()
        };
        problems.add(
            f("vni"),
            format!(
                "VNI {} is already used by network '{other}'{extra}: every network needs its own VNI",
                n.vni
            ),
        );
    } else {
        seen.vnis.insert(n.vni, (n.name.clone(), n.port));
    }
    vni
}

fn network_port(
    n: &NetworkFile,
    problems: &mut Problems,
    f: &dyn Fn(&str) -> String,
) -> Option<u16> {
    match u16::try_from(n.port) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            problems.add(
                f("port"),
                format!(
                    "UDP port {} is out of range: use 1-65535 (VXLAN's standard port is 4789)",
                    n.port
                ),
            );
            None
        }
    }
}

fn network_mtu(n: &NetworkFile, problems: &mut Problems, f: &dyn Fn(&str) -> String) {
    if let Some(mtu) = n.mtu
        && !(MIN_MTU..=MAX_MTU).contains(&mtu)
    {
        problems.add(
            f("mtu"),
            format!(
                "MTU {mtu} is out of range: use {MIN_MTU}-{MAX_MTU}, or omit it to use the underlay MTU - {VXLAN_OVERHEAD}"
            ),
        );
    }
}

/// Per-node subnets (routed, at most /30) or slices (bridged) inside the cidr.
fn network_subnet_len(
    n: &NetworkFile,
    cidr: Ipv4Net,
    problems: &mut Problems,
    f: &dyn Fn(&str) -> String,
) {
    let max_len = match n.mode {
        Mode::Routed => 30,
        Mode::Bridged => 32,
    };
    if n.subnet_len <= cidr.prefix_len() || n.subnet_len > max_len {
        problems.add(
            f("subnet_len"),
            format!(
                "/{} does not fit cidr {cidr}: use a length from {} to {max_len}",
                n.subnet_len,
                cidr.prefix_len() + 1
            ),
        );
    }
}

/// A node serves one routed network at most (its bridge is `vxm-br0`).
fn network_mode(
    n: &NetworkFile,
    seen: &mut SeenNetworks,
    problems: &mut Problems,
    f: &dyn Fn(&str) -> String,
) {
    if n.mode != Mode::Routed {
        return;
    }
    if let Some(other) = &seen.routed {
        problems.add(
            f("mode"),
            format!(
                "a node serves one routed network (bridge vxm-br0) and '{other}' is routed already: make this one bridged or move it to another file"
            ),
        );
    } else {
        seen.routed = Some(n.name.clone());
    }
}

/// The `[[node]]` tables: each node's underlay IP (`None` where invalid).
/// A node's `public_key` and `next_public_key`, where given and valid
/// (secure underlay; checked by [`crate::secure::keys::check_listed`]).
fn public_key(
    i: usize,
    n: &NodeFile,
    problems: &mut Problems,
) -> (
    Option<crate::secure::PublicKey>,
    Option<crate::secure::PublicKey>,
) {
    match crate::secure::keys::check_listed(
        &n.name,
        n.public_key.as_deref(),
        n.next_public_key.as_deref(),
    ) {
        Ok(keys) => keys,
        Err((field, e)) => {
            problems.add(format!("node[{i}].{field}"), e);
            (None, None)
        }
    }
}

fn nodes(file: &ClusterFile, problems: &mut Problems) -> Vec<Option<Ipv4Addr>> {
    let mut names = HashMap::new();
    let mut ips = HashMap::new();
    file.nodes
        .iter()
        .enumerate()
        .map(|(i, n)| node(file, i, n, &mut names, &mut ips, problems))
        .collect()
}

fn node(
    file: &ClusterFile,
    i: usize,
    n: &NodeFile,
    names: &mut HashMap<String, usize>,
    ips: &mut HashMap<Ipv4Addr, usize>,
    problems: &mut Problems,
) -> Option<Ipv4Addr> {
    let f = |k: &str| format!("node[{i}].{k}");
    match n.name.parse::<NodeName>() {
        Err(e) => problems.add(f("name"), e.to_string()),
        Ok(_) => {
            if let Some(j) = names.insert(n.name.clone(), i) {
                problems.add(
                    f("name"),
                    format!(
                        "node '{}' is already declared as node[{j}]: node names must be unique",
                        n.name
                    ),
                );
            }
        }
    }
    let ip = match parse_underlay_ip(&n.underlay_ip) {
        Ok(ip) => {
            if let Some(j) = ips.insert(ip, i) {
                problems.add(
                    f("underlay_ip"),
                    format!(
                        "{ip} is already the underlay IP of node[{j}]: each node needs its own"
                    ),
                );
            }
            Some(ip)
        }
        Err(e) => {
            problems.add(f("underlay_ip"), e);
            None
        }
    };
    if let Some(d) = &n.underlay_dev
        && let Err(e) = d.parse::<IfName>()
    {
        problems.add(f("underlay_dev"), e.to_string());
    }
    node_subnet_keys(file, n, problems, &f);
    ip
}

/// `subnet` (single-network files) or `subnets` (keyed by declared networks).
fn node_subnet_keys(
    file: &ClusterFile,
    n: &NodeFile,
    problems: &mut Problems,
    f: &dyn Fn(&str) -> String,
) {
    if n.subnet.is_some() && file.networks.len() > 1 {
        problems.add(
            f("subnet"),
            "the file declares several networks: use subnets = { NETWORK = \"CIDR\" } instead",
        );
    }
    if n.subnet.is_some() && !n.subnets.is_empty() {
        problems.add(f("subnet"), "set either subnet or subnets, not both");
    }
    for k in n.subnets.keys() {
        if !file.networks.iter().any(|net| &net.name == k) {
            problems.add(
                f(&format!("subnets.{k}")),
                format!("there is no network '{k}': subnets keys must name a declared network"),
            );
        }
    }
}

/// The subnet the file gives node `n` in `net`, with the field it is written in.
fn explicit_subnet<'a>(
    file: &'a ClusterFile,
    i: usize,
    n: &'a NodeFile,
    net: &Network,
) -> Option<(&'a String, String)> {
    if let Some(s) = n.subnets.get(&net.name) {
        return Some((s, format!("node[{i}].subnets.{}", net.name)));
    }
    let single = file.networks.len() == 1;
    n.subnet
        .as_ref()
        .filter(|_| single)
        .map(|s| (s, format!("node[{i}].subnet")))
}

/// Subnets of one network: explicit ones first, then derived by node order.
fn subnets(
    file: &ClusterFile,
    net: &Network,
    node_subnets: &mut [BTreeMap<String, Ipv4Net>],
    problems: &mut Problems,
) {
    let taken = explicit_subnets(file, net, node_subnets, problems);
    if net.subnet_len <= net.cidr.prefix_len() || net.subnet_len > 32 {
        return;
    }
    derive_subnets(file, net, &taken, node_subnets, problems);
}

fn explicit_subnets(
    file: &ClusterFile,
    net: &Network,
    node_subnets: &mut [BTreeMap<String, Ipv4Net>],
    problems: &mut Problems,
) -> Vec<(Ipv4Net, usize)> {
    let what = if net.mode == Mode::Routed {
        "subnet"
    } else {
        "address slice"
    };
    let mut taken: Vec<(Ipv4Net, usize)> = Vec::new();
    for (i, n) in file.nodes.iter().enumerate() {
        let Some((s, field)) = explicit_subnet(file, i, n, net) else {
            continue;
        };
        let sn = match parse_net(s) {
            Err(e) => {
                problems.add(field, e.to_string());
                continue;
            }
            Ok(sn) => sn,
        };
        if !net.cidr.contains(&sn) {
            problems.add(
                field,
                format!(
                    "{what} {sn} is outside network '{}' cidr {}: pick one inside it or omit it to derive one",
                    net.name, net.cidr
                ),
            );
        } else if sn.prefix_len() != net.subnet_len {
            problems.add(
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
            problems.add(
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
    taken
}

/// Give every node without an explicit subnet the next free one, in node order.
fn derive_subnets(
    file: &ClusterFile,
    net: &Network,
    taken: &[(Ipv4Net, usize)],
    node_subnets: &mut [BTreeMap<String, Ipv4Net>],
    problems: &mut Problems,
) {
    let mut free = net
        .cidr
        .subnets(net.subnet_len)
        .expect("subnet_len checked above")
        .filter(|c| !taken.iter().any(|(t, _)| t.contains(c) || c.contains(t)));
    for (i, n) in file.nodes.iter().enumerate() {
        let explicit =
            n.subnets.contains_key(&net.name) || (file.networks.len() == 1 && n.subnet.is_some());
        if explicit {
            continue;
        }
        match free.next() {
            Some(sn) => {
                node_subnets[i].insert(net.name.clone(), sn);
            }
            None => {
                problems.add(
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
