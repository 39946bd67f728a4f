//! Key layout and record formats of the etcd store (pure: no I/O), and the
//! validation every record read from etcd goes through.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::{self, ClusterFile, Mode, Network, NetworkFile};
use crate::model::{self, Endpoint};
use crate::names::{IfName, NetworkName, NodeName};
use crate::secure::PublicKey;
use crate::secure::config::{Encryption, EncryptionFile};

/// Keys of one network under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keys {
    /// `PREFIX/networks/NET/` (always ends with a slash, so that network
    /// `demo` never matches keys of `demo2`).
    root: String,
}

/// What a key under [`Keys::root`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind<'a> {
    Config,
    /// An encrypted network's secure underlay settings.
    Encryption,
    Subnet(&'a str),
    Node(&'a str),
    Endpoint(&'a str),
    Other,
}

impl Keys {
    pub fn new(prefix: &str, network: &str) -> Self {
        Keys {
            root: format!("{}/networks/{network}/", normalize_prefix(prefix)),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn config(&self) -> String {
        format!("{}config", self.root)
    }
    /// An encrypted network's secure underlay settings (`[encryption]` of
    /// a cluster file), written with its config.
    pub fn encryption(&self) -> String {
        format!("{}encryption", self.root)
    }
    pub fn subnets(&self) -> String {
        format!("{}subnets/", self.root)
    }
    pub fn subnet(&self, s: Ipv4Net) -> String {
        format!("{}subnets/{}", self.root, subnet_key_part(s))
    }
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }
    pub fn node(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.root)
    }
    pub fn endpoints(&self) -> String {
        format!("{}endpoints/", self.root)
    }
    pub fn endpoint(&self, ip: Ipv4Addr) -> String {
        format!("{}endpoints/{ip}", self.root)
    }
    /// Quarantine marker of a subnet claim (`held/subnets/A.B.C.D-LEN`,
    /// the holder's name, bound to its hold lease that outlives its node
    /// lease by a grace period): while present, only that node may claim
    /// the subnet.
    pub fn held_subnet(&self, s: Ipv4Net) -> String {
        format!("{}held/subnets/{}", self.root, subnet_key_part(s))
    }
    pub fn held_subnets(&self) -> String {
        format!("{}held/subnets/", self.root)
    }
    /// Quarantine marker of an endpoint (`held/endpoints/A.B.C.D`).
    pub fn held_endpoint(&self, ip: Ipv4Addr) -> String {
        format!("{}held/endpoints/{ip}", self.root)
    }

    pub fn classify<'a>(&self, key: &'a str) -> KeyKind<'a> {
        let Some(rest) = key.strip_prefix(self.root.as_str()) else {
            return KeyKind::Other;
        };
        if rest == "config" {
            KeyKind::Config
        } else if rest == "encryption" {
            KeyKind::Encryption
        } else if let Some(s) = rest.strip_prefix("subnets/") {
            KeyKind::Subnet(s)
        } else if let Some(s) = rest.strip_prefix("nodes/") {
            KeyKind::Node(s)
        } else if let Some(s) = rest.strip_prefix("endpoints/") {
            KeyKind::Endpoint(s)
        } else {
            KeyKind::Other
        }
    }
}

/// `/vxmesh/` → `/vxmesh`; an empty prefix stays empty (keys then start at `/networks`).
pub(crate) fn normalize_prefix(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// Check a key prefix given by the user.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err(format!(
            "etcd prefix '{prefix}' must start with '/' (the default is /vxmesh)"
        ));
    }
    if prefix.contains("//") || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "etcd prefix '{prefix}' contains '//', spaces or control characters: write it like /vxmesh"
        ));
    }
    Ok(())
}

/// `10.1.2.0/24` → `10.1.2.0-24` (a slash would add a key level).
pub(crate) fn subnet_key_part(s: Ipv4Net) -> String {
    format!("{}-{}", s.network(), s.prefix_len())
}

/// The subnet of a claim key part, only in the form [`subnet_key_part`]
/// writes: `10.1.2.0-024` or `10.1.2.0-+24` would name the same subnet
/// under another key, outside the compare-and-swap that guards the claim.
pub(crate) fn parse_subnet_key_part(s: &str) -> Option<Ipv4Net> {
    let (ip, len) = s.split_once('-')?;
    let net = Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.trunc() == net && subnet_key_part(net) == s).then_some(net)
}

pub(crate) fn check_node_name(s: &str) -> Result<(), String> {
    s.parse::<NodeName>().map(drop).map_err(|e| e.to_string())
}

pub(crate) fn check_network_name(s: &str) -> Result<(), String> {
    s.parse::<NetworkName>()
        .map(drop)
        .map_err(|e| e.to_string())
}

pub(crate) fn check_underlay_ip(ip: Ipv4Addr) -> Result<(), String> {
    model::check_underlay_ip(ip)
        .map(drop)
        .map_err(|e| e.to_string())
}

pub(crate) fn check_underlay_dev(d: &str) -> Result<(), String> {
    d.parse::<IfName>().map(drop).map_err(|e| e.to_string())
}

/// Parse and validate a subnet claim: the key part `A.B.C.D-LEN` (in the
/// canonical form only) names one of `net`'s subnets, the value the node
/// holding it.
pub(crate) fn parse_claim<'v>(
    net: &Network,
    part: &str,
    value: &'v [u8],
) -> Result<(Ipv4Net, &'v str), String> {
    let s = parse_subnet_key_part(part)
        .ok_or_else(|| format!("'{part}' is not a subnet key (want A.B.C.D-LEN)"))?;
    check_subnet(net, s)?;
    let node = std::str::from_utf8(value).map_err(|_| "claim value is not UTF-8".to_string())?;
    check_node_name(node)?;
    Ok((s, node))
}

/// The node record as stored under `nodes/NODE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeJson {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_dev: Option<String>,
    pub subnet: Ipv4Net,
    /// The node's WireGuard public key (secure underlay; issue 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
    /// During a key rotation, the key it switches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<PublicKey>,
}

/// Check that `s` is one of `net`'s per-node subnets (slices).
pub(crate) fn check_subnet(net: &Network, s: Ipv4Net) -> Result<(), String> {
    let what = if net.mode == Mode::Routed {
        "subnet"
    } else {
        "address slice"
    };
    if s.trunc() != s {
        return Err(format!("{what} {s} has host bits set"));
    }
    if !net.cidr.contains(&s) {
        return Err(format!(
            "{what} {s} is outside network '{}' cidr {}",
            net.name, net.cidr
        ));
    }
    if s.prefix_len() != net.subnet_len {
        return Err(format!(
            "{what} {s} is a /{} but network '{}' has subnet_len = {}",
            s.prefix_len(),
            net.name,
            net.subnet_len
        ));
    }
    Ok(())
}

/// Parse and validate a node record (the key's last part is `key_name`).
pub(crate) fn parse_node(net: &Network, key_name: &str, value: &[u8]) -> Result<NodeJson, String> {
    let n: NodeJson =
        serde_json::from_slice(value).map_err(|e| format!("not a node record: {e}"))?;
    check_node_name(key_name)?;
    if n.name != key_name {
        return Err(format!(
            "record names node '{}' but is stored under node '{key_name}'",
            n.name
        ));
    }
    check_underlay_ip(n.underlay_ip)?;
    if let Some(d) = &n.underlay_dev {
        check_underlay_dev(d)?;
    }
    check_subnet(net, n.subnet)?;
    let text = |k: Option<PublicKey>| k.map(|k| k.to_string());
    crate::secure::keys::check_listed(
        &n.name,
        text(n.public_key).as_deref(),
        text(n.next_public_key).as_deref(),
    )
    .map_err(|(_, e)| e)?;
    Ok(n)
}

/// Is `ip` an address a container may hold in `net` (inside the cidr and not
/// its network or broadcast address)?
pub(crate) fn check_endpoint_ip(net: &Network, ip: Ipv4Addr) -> Result<(), String> {
    if !net.cidr.contains(&ip) {
        return Err(format!(
            "address {ip} is outside network '{}' cidr {}",
            net.name, net.cidr
        ));
    }
    if net.cidr.prefix_len() < 31 && (ip == net.cidr.network() || ip == net.cidr.broadcast()) {
        return Err(format!(
            "address {ip} is the network or broadcast address of {}",
            net.cidr
        ));
    }
    if net.gateway == Some(ip) {
        return Err(format!(
            "address {ip} is the distributed gateway of network '{}': choose another address",
            net.name
        ));
    }
    Ok(())
}

/// Validate an endpoint (read from etcd or about to be published).
pub(crate) fn check_endpoint(net: &Network, ep: &Endpoint) -> Result<(), String> {
    if ep.network != net.name {
        return Err(format!(
            "endpoint belongs to network '{}', not '{}'",
            ep.network, net.name
        ));
    }
    check_endpoint_ip(net, ep.ip)?;
    if !ep.mac.is_valid_peer() {
        return Err(format!(
            "MAC {} is zero or multicast: endpoints need a unicast MAC",
            ep.mac
        ));
    }
    check_node_name(&ep.node)
}

/// Parse and validate an endpoint record stored under `endpoints/KEY_IP`.
pub(crate) fn parse_endpoint(
    net: &Network,
    key_ip: &str,
    value: &[u8],
) -> Result<Endpoint, String> {
    let ep: Endpoint =
        serde_json::from_slice(value).map_err(|e| format!("not an endpoint record: {e}"))?;
    if key_ip.parse::<Ipv4Addr>().ok() != Some(ep.ip) {
        return Err(format!(
            "record is for address {} but is stored under '{key_ip}'",
            ep.ip
        ));
    }
    check_endpoint(net, &ep)?;
    Ok(ep)
}

/// Validate a network the way the cluster file does. Problems name the field
/// and the fix: "network 'demo': cidr: '10.0.0.1/16' has host bits set: ...".
pub(crate) fn validate_network(n: &NetworkFile) -> Result<Network, String> {
    let file = ClusterFile {
        networks: vec![n.clone()],
        nodes: vec![],
        encryption: Default::default(),
    };
    match config::validate(&file, "etcd") {
        Ok(mut c) => Ok(c.networks.remove(0)),
        Err(e) => {
            let problems: Vec<String> = e
                .problems
                .iter()
                .map(|p| {
                    format!(
                        "{}: {}",
                        p.field.trim_start_matches("network[0]."),
                        p.message
                    )
                })
                .collect();
            Err(format!("network '{}': {}", n.name, problems.join("; ")))
        }
    }
}

pub(crate) fn network_file(n: &Network) -> NetworkFile {
    NetworkFile::from(n)
}

/// The JSON stored under `config`.
pub(crate) fn network_json(n: &Network) -> String {
    serde_json::to_string(n).expect("a network serializes")
}

/// Parse and validate a stored network config.
pub(crate) fn parse_network(expected_name: &str, value: &[u8]) -> Result<Network, String> {
    let f: NetworkFile =
        serde_json::from_slice(value).map_err(|e| format!("not a network config: {e}"))?;
    if f.name != expected_name {
        return Err(format!(
            "config names network '{}' but is stored under '{expected_name}'",
            f.name
        ));
    }
    validate_network(&f)
}

/// The JSON stored under `encryption`: the settings as a cluster file's
/// `[encryption]` table writes them.
pub(crate) fn encryption_json(e: &Encryption) -> String {
    serde_json::to_string(&EncryptionFile::from(e)).expect("settings serialize")
}

/// Parse and validate stored secure underlay settings of `net`.
pub(crate) fn parse_encryption(net: &Network, value: &[u8]) -> Result<Encryption, String> {
    let f: EncryptionFile = serde_json::from_slice(value)
        .map_err(|e| format!("not the settings of a secure underlay: {e}"))?;
    crate::secure::config::validate(Some(&f), &[net.port]).map_err(|problems| {
        let p: Vec<String> = problems.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        p.join("; ")
    })
}

/// How two networks differ, for "already exists with different settings (...)".
pub(crate) fn network_diff(stored: &Network, wanted: &Network) -> String {
    let mut d = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{name} {a} there, {b} requested"));
        }
    };
    field("mode", stored.mode.to_string(), wanted.mode.to_string());
    field("cidr", stored.cidr.to_string(), wanted.cidr.to_string());
    field(
        "subnet_len",
        stored.subnet_len.to_string(),
        wanted.subnet_len.to_string(),
    );
    field("vni", stored.vni.to_string(), wanted.vni.to_string());
    field("port", stored.port.to_string(), wanted.port.to_string());
    let mtu = |m: Option<u32>| m.map_or("default".to_string(), |m| m.to_string());
    field("mtu", mtu(stored.mtu), mtu(wanted.mtu));
    let gw = |g: Option<Ipv4Addr>| g.map_or("none".to_string(), |g| g.to_string());
    field("gateway", gw(stored.gateway), gw(wanted.gateway));
    field(
        "encrypt",
        stored.encrypt.to_string(),
        wanted.encrypt.to_string(),
    );
    d.join(", ")
}

/// 64-bit FNV-1a: a stable hash (unlike std's), so that a node's candidate
/// order is the same on every run and every version.
pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The `i`-th candidate subnet for `node`: all `subnet_len` subnets of the
/// cidr, in cyclic order starting at a position derived from the node name.
pub(crate) fn subnet_candidates(
    net: &Network,
    node: &str,
) -> impl Iterator<Item = Ipv4Net> + use<> {
    let host_bits = 32 - net.subnet_len as u32;
    let count: u64 = 1u64 << (net.subnet_len - net.cidr.prefix_len()) as u32;
    let base = u32::from(net.cidr.network()) as u64;
    let start = fnv1a(node) % count;
    let len = net.subnet_len;
    (0..count).map(move |i| {
        let idx = (start + i) % count;
        let addr = (base + (idx << host_bits)) as u32;
        Ipv4Net::new(Ipv4Addr::from(addr), len).expect("valid prefix length")
    })
}

/// Candidate addresses of a bridged network, starting at `start` (the node's
/// slice) and wrapping around the cidr; network and broadcast addresses skipped.
pub(crate) fn address_candidates(
    net: &Network,
    start: Ipv4Addr,
) -> impl Iterator<Item = Ipv4Addr> + use<> {
    let lo = u32::from(net.cidr.network()) as u64;
    let count: u64 = 1u64 << (32 - net.cidr.prefix_len() as u32);
    let first = if net.cidr.contains(&start) {
        u32::from(start) as u64 - lo
    } else {
        0
    };
    let cidr = net.cidr;
    let gateway = net.gateway;
    (0..count)
        .map(move |i| Ipv4Addr::from((lo + (first + i) % count) as u32))
        .filter(move |ip| {
            Some(*ip) != gateway
                && (cidr.prefix_len() >= 31 || (*ip != cidr.network() && *ip != cidr.broadcast()))
        })
}

/// A network as the store's unit tests use it: everything optional left
/// at its default (no gateway, outbound NAT on, plain).
#[cfg(test)]
pub(crate) fn test_network(
    name: &str,
    mode: Mode,
    cidr: &str,
    subnet_len: u8,
    vni: u32,
) -> Network {
    Network {
        outbound_nat: true,
        name: name.into(),
        mode,
        cidr: cidr.parse().unwrap(),
        subnet_len,
        vni: crate::model::Vni::new(vni).unwrap(),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    fn net(mode: Mode, cidr: &str, len: u8) -> Network {
        test_network("demo", mode, cidr, len, 100)
    }

    #[test]
    fn key_layout() {
        let k = Keys::new("/vxmesh/", "demo");
        assert_eq!(k.config(), "/vxmesh/networks/demo/config");
        assert_eq!(
            k.subnet("10.1.2.0/24".parse().unwrap()),
            "/vxmesh/networks/demo/subnets/10.1.2.0-24"
        );
        assert_eq!(k.node("h1"), "/vxmesh/networks/demo/nodes/h1");
        assert_eq!(
            k.endpoint(Ipv4Addr::new(10, 1, 0, 5)),
            "/vxmesh/networks/demo/endpoints/10.1.0.5"
        );
        assert_eq!(
            k.classify("/vxmesh/networks/demo/nodes/h1"),
            KeyKind::Node("h1")
        );
        assert_eq!(
            k.classify("/vxmesh/networks/demo2/nodes/h1"),
            KeyKind::Other
        );
        assert_eq!(k.classify("/vxmesh/networks/demo/config"), KeyKind::Config);
        assert_eq!(
            parse_subnet_key_part("10.1.2.0-24"),
            Some("10.1.2.0/24".parse().unwrap())
        );
        assert_eq!(parse_subnet_key_part("10.1.2.1-24"), None);
        assert_eq!(parse_subnet_key_part("10.1.2.0/24"), None);
        // Found by fuzzing: only the canonical key names a claim.
        assert_eq!(parse_subnet_key_part("10.1.2.0-024"), None);
        assert_eq!(parse_subnet_key_part("10.1.2.0-+24"), None);
        assert!(check_prefix("vxmesh").is_err());
        assert!(check_prefix("/vx mesh").is_err());
        assert!(check_prefix("/vxmesh").is_ok());
    }

    #[test]
    fn node_records_are_validated() {
        let n = net(Mode::Routed, "172.18.0.0/16", 24);
        let ok = br#"{"name":"h1","underlay_ip":"198.18.0.1","subnet":"172.18.3.0/24"}"#;
        assert_eq!(
            parse_node(&n, "h1", ok).unwrap().subnet.to_string(),
            "172.18.3.0/24"
        );
        assert!(
            parse_node(&n, "h2", ok)
                .unwrap_err()
                .contains("stored under node 'h2'")
        );
        assert!(
            parse_node(&n, "h1", b"{")
                .unwrap_err()
                .contains("not a node record")
        );
        let outside = br#"{"name":"h1","underlay_ip":"198.18.0.1","subnet":"172.19.3.0/24"}"#;
        assert!(
            parse_node(&n, "h1", outside)
                .unwrap_err()
                .contains("outside")
        );
        let len = br#"{"name":"h1","underlay_ip":"198.18.0.1","subnet":"172.18.3.0/25"}"#;
        assert!(
            parse_node(&n, "h1", len)
                .unwrap_err()
                .contains("subnet_len = 24")
        );
        let lo = br#"{"name":"h1","underlay_ip":"127.0.0.1","subnet":"172.18.3.0/24"}"#;
        assert!(
            parse_node(&n, "h1", lo)
                .unwrap_err()
                .contains("cannot carry VXLAN")
        );
        let mc = br#"{"name":"h1","underlay_ip":"224.0.0.1","subnet":"172.18.3.0/24"}"#;
        assert!(parse_node(&n, "h1", mc).is_err());
        // Keys (issue 16): valid ones are read, a bad or lone next one is refused.
        let (a, b) = (
            crate::secure::PrivateKey::generate().unwrap().public(),
            crate::secure::PrivateKey::generate().unwrap().public(),
        );
        let keyed = |k: &str| {
            format!(r#"{{"name":"h1","underlay_ip":"198.18.0.1","subnet":"172.18.3.0/24"{k}}}"#)
        };
        let both = keyed(&format!(r#","public_key":"{a}","next_public_key":"{b}""#));
        let rec = parse_node(&n, "h1", both.as_bytes()).unwrap();
        assert_eq!((rec.public_key, rec.next_public_key), (Some(a), Some(b)));
        let lone = keyed(&format!(r#","next_public_key":"{b}""#));
        assert!(
            parse_node(&n, "h1", lone.as_bytes())
                .unwrap_err()
                .contains("no public_key")
        );
        let bad = keyed(r#","public_key":"AAAA""#);
        assert!(parse_node(&n, "h1", bad.as_bytes()).is_err());
    }

    #[test]
    fn endpoint_records_are_validated() {
        let n = net(Mode::Bridged, "10.1.0.0/24", 28);
        let ep = |ip: &str, mac: &str| {
            format!(r#"{{"network":"demo","ip":"{ip}","mac":"{mac}","node":"h1"}}"#).into_bytes()
        };
        assert!(parse_endpoint(&n, "10.1.0.5", &ep("10.1.0.5", "02:42:0a:01:00:05")).is_ok());
        assert!(parse_endpoint(&n, "10.1.0.6", &ep("10.1.0.5", "02:42:0a:01:00:05")).is_err());
        assert!(
            parse_endpoint(&n, "10.2.0.5", &ep("10.2.0.5", "02:42:0a:01:00:05"))
                .unwrap_err()
                .contains("outside")
        );
        assert!(parse_endpoint(&n, "10.1.0.0", &ep("10.1.0.0", "02:42:0a:01:00:05")).is_err());
        assert!(parse_endpoint(&n, "10.1.0.255", &ep("10.1.0.255", "02:42:0a:01:00:05")).is_err());
        assert!(
            parse_endpoint(&n, "10.1.0.5", &ep("10.1.0.5", "01:00:5e:00:00:01"))
                .unwrap_err()
                .contains("multicast")
        );
        assert!(parse_endpoint(&n, "10.1.0.5", &ep("10.1.0.5", "00:00:00:00:00:00")).is_err());
        let mut e = Endpoint {
            network: "demo".into(),
            ip: Ipv4Addr::new(10, 1, 0, 9),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            node: "h1".into(),
        };
        assert!(check_endpoint(&n, &e).is_ok());
        e.network = "other".into();
        assert!(check_endpoint(&n, &e).is_err());
    }

    #[test]
    fn network_validation_and_diff() {
        let n = net(Mode::Routed, "172.18.0.0/16", 24);
        let json = network_json(&n);
        assert_eq!(parse_network("demo", json.as_bytes()).unwrap(), n);
        assert!(parse_network("other", json.as_bytes()).is_err());
        let mut f = network_file(&n);
        f.cidr = "172.18.0.1/16".into();
        let e = validate_network(&f).unwrap_err();
        assert!(
            e.contains("network 'demo': cidr: '172.18.0.1/16' has host bits set"),
            "{e}"
        );
        let mut m = n.clone();
        m.cidr = "10.0.0.0/16".parse().unwrap();
        m.mtu = Some(1400);
        assert_eq!(
            network_diff(&n, &m),
            "cidr 172.18.0.0/16 there, 10.0.0.0/16 requested, mtu default there, 1400 requested"
        );
    }

    #[test]
    fn candidates_cover_the_cidr_once() {
        let n = net(Mode::Routed, "172.18.0.0/16", 24);
        let all: Vec<Ipv4Net> = subnet_candidates(&n, "h1").collect();
        assert_eq!(all.len(), 256);
        let set: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(set.len(), 256);
        assert!(
            all.iter()
                .all(|s| n.cidr.contains(s) && s.prefix_len() == 24)
        );
        // Deterministic per node, different between nodes.
        assert_eq!(all[0], subnet_candidates(&n, "h1").next().unwrap());
        let starts: std::collections::BTreeSet<_> = (0..20)
            .map(|i| subnet_candidates(&n, &format!("node{i}")).next().unwrap())
            .collect();
        assert!(starts.len() > 10);

        let b = net(Mode::Bridged, "10.1.0.0/29", 30);
        let a: Vec<String> = address_candidates(&b, Ipv4Addr::new(10, 1, 0, 4))
            .map(|a| a.to_string())
            .collect();
        assert_eq!(
            a,
            [
                "10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.1", "10.1.0.2", "10.1.0.3"
            ]
        );
    }
}
