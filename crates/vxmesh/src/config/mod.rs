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
//! gateway = true             # bridged only, optional: a distributed gateway
//!                            # (first host address, or gateway = "A.B.C.D")
//! outbound_nat = true        # optional, default true: masquerade traffic leaving the overlay
//! encrypt = false            # optional: over the secure underlay (docs/encryption.md)
//!
//! [[node]]
//! name = "host1"
//! underlay_ip = "198.18.0.1"
//! underlay_dev = "eth0"      # optional
//! subnet = "172.18.10.0/24"  # optional (single-network files), derived when absent
//! # subnets = { demo = "172.18.10.0/24" }   # per network, for several networks
//! # public_key = "base64..."                # optional, `vxmesh keygen`
//! # next_public_key = "base64..."           # during a rotation (`vxmesh rotate-key`)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{NodeRecord, Vni};

mod error;
mod gateway;
#[cfg(test)]
mod tests;
mod validate;

pub use error::{ConfigError, Problem};
pub use gateway::{GatewayFile, first_host};
pub use validate::{CidrError, parse_net, validate};

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
    /// Bridged networks: the distributed gateway (`true`, or its address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayFile>,
    /// Masquerade the containers' traffic to destinations outside every
    /// vxmesh network (default true).
    #[serde(default = "default_true")]
    pub outbound_nat: bool,
    /// Carry this network over the secure underlay (docs/encryption.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypt: bool,
}

fn default_true() -> bool {
    true
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
    /// The node's WireGuard public key (`vxmesh keygen`), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// During a key rotation: the key `vxmesh rotate-key` printed, listed
    /// beside `public_key` until the node has switched (docs/encryption.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
}

/// The cluster file as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkFile>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeFile>,
    /// The secure underlay's settings (`[encryption]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::secure::config::EncryptionFile>,
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
    /// Bridged networks with a distributed gateway: its address, on every
    /// node's bridge (with [`crate::model::gateway_mac`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Masquerade traffic from the network to outside every vxmesh network.
    #[serde(default = "default_true")]
    pub outbound_nat: bool,
    /// Carried over the secure underlay (docs/encryption.md).
    #[serde(default)]
    pub encrypt: bool,
}

impl From<&Network> for NetworkFile {
    /// The table that declares `n` (validates back to `n`).
    fn from(n: &Network) -> Self {
        NetworkFile {
            name: n.name.clone(),
            mode: n.mode,
            cidr: n.cidr.to_string(),
            subnet_len: n.subnet_len,
            vni: n.vni.get(),
            port: n.port.into(),
            mtu: n.mtu,
            gateway: n.gateway.map(|g| GatewayFile::Address(g.to_string())),
            outbound_nat: n.outbound_nat,
            encrypt: n.encrypt,
        }
    }
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
    /// The secure underlay's settings (defaults without `[encryption]`).
    #[serde(default)]
    pub encryption: crate::secure::config::Encryption,
}

impl Cluster {
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }
    /// The node names, comma separated (for messages about an unknown node).
    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
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

/// Names of the nodes of a cluster (sorted), for messages.
pub fn node_names(c: &Cluster) -> BTreeSet<&str> {
    c.nodes.iter().map(|n| n.name.as_str()).collect()
}
