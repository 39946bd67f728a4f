//! The lab's model: what to build ([`LabSpec`]), what was built (the
//! [`LabInfo`] record in `lab.json`), and the names and cluster file derived
//! from a spec.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use vxmesh::config::{ClusterFile, Mode, NetworkFile, NodeFile};
use vxmesh::secure::config::EncryptionFile;

use super::{LAB_ROOT, LAB_TTL, LabDocker, LabEtcd, LabStore, Runtime, host_ip};

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    pub containers: usize,
    pub mode: Mode,
    /// Bridged networks (routed mode always has one).
    pub networks: usize,
    /// The vxmesh binary to run as agent.
    pub exe: PathBuf,
    /// Extra agent arguments (e.g. a short --resync for tests).
    pub agent_args: Vec<String>,
    /// How containers are attached.
    pub attach: AttachMode,
    /// Where node and endpoint records live.
    pub store: LabStore,
    /// etcd store: the agents' lease TTL (short: crashed hosts vanish fast).
    pub ttl: Duration,
    /// etcd store: members of the etcd cluster (1..=5), each in its own namespace.
    pub etcd_members: usize,
    /// etcd store, routed mode: the network's CIDR instead of 172.18.0.0/16
    /// (a small one, e.g. a /22 of four /24 subnets, fills up).
    pub routed_cidr: Option<Ipv4Net>,
    /// Run every agent with `--metrics UNDERLAY_IP:PORT` (see [`Lab::metrics_addr`]).
    pub metrics_port: Option<u16>,
    /// What runs the containers (Docker: one dockerd per host).
    pub runtime: Runtime,
    /// Build the outside world (`--external`, see `external`); bridged
    /// networks then get a distributed gateway (and cidrs of their own).
    pub external: bool,
    /// `--publish HOST:CONTAINER`: publish CONTAINER of every container, the
    /// k-th of a node on host port HOST + k.
    pub publish: Option<(u16, u16)>,
    /// Encrypt the lab's first network over the secure underlay. Static
    /// store: each host's key is made in its state dir and listed as its
    /// `public_key`; etcd: the network is created encrypted and the agents
    /// publish their keys. Bridged labs with several networks stay mixed.
    pub encrypt: bool,
    /// With `encrypt`: the secure underlay's settings (the cluster file's
    /// `[encryption]` table; etcd: given when the network is created).
    /// `None`: the defaults.
    pub encryption: Option<EncryptionFile>,
    /// Start the agents and attach the containers (else `up` stops once
    /// the hosts, the underlay and the store are made: a cold start to
    /// measure, see `bench converge --cold-start`).
    pub start_agents: bool,
}

/// How the lab attaches its containers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Call the attach code in-process.
    #[default]
    Library,
    /// Run the vxmesh binary as a CNI plugin (`CNI_COMMAND=ADD`, network
    /// configuration on stdin, inside the node's namespace), as a runtime does.
    Cni,
}

impl LabSpec {
    pub fn new(name: &str, nodes: usize, containers: usize) -> Self {
        LabSpec {
            name: name.to_string(),
            nodes,
            containers,
            mode: Mode::Routed,
            networks: 1,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("vxmesh")),
            agent_args: Vec::new(),
            attach: AttachMode::Library,
            store: LabStore::Static,
            ttl: LAB_TTL,
            etcd_members: 1,
            routed_cidr: None,
            metrics_port: None,
            runtime: Runtime::Netns,
            external: false,
            publish: None,
            encrypt: false,
            encryption: None,
            start_agents: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub subnets: BTreeMap<String, Ipv4Net>,
    pub state_dir: PathBuf,
    pub agent_pid: Option<u32>,
    pub agent_log: PathBuf,
    /// The host's dockerd and plugin (`--runtime docker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<LabDocker>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabContainer {
    pub name: String,
    pub node: String,
    pub network: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// The lab as recorded in `LAB_ROOT/NAME/lab.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabInfo {
    pub name: String,
    pub mode: Mode,
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub cluster_file: PathBuf,
    pub nodes: Vec<LabNode>,
    pub containers: Vec<LabContainer>,
    /// Containers per host (per network), for hosts added later.
    #[serde(default)]
    pub containers_per_node: usize,
    /// The etcd store, if the lab uses one (no cluster file then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<LabEtcd>,
    /// Agents serve metrics on their underlay address at this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// What runs the containers.
    #[serde(default)]
    pub runtime: Runtime,
    /// The lab has an outside world (`--external`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// The ports `--publish` published, per container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<super::LabPublished>,
}

impl LabInfo {
    /// Parse the contents of a `lab.json` file.
    pub fn from_json(data: &[u8]) -> serde_json::Result<LabInfo> {
        serde_json::from_slice(data)
    }
}

pub fn validate_lab_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 16
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!("invalid lab name '{name}': use 1-16 characters from [A-Za-z0-9-]");
    }
    Ok(())
}

pub(super) fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

pub(super) fn ns_prefix(name: &str) -> String {
    format!("vxm-{name}-")
}

pub fn network_names(spec_mode: Mode, networks: usize) -> Vec<String> {
    match spec_mode {
        Mode::Routed => vec!["demo".to_string()],
        Mode::Bridged => (1..=networks).map(|m| format!("net{m}")).collect(),
    }
}

/// The cluster file the lab writes (same on every host).
pub fn cluster_file_for(spec: &LabSpec) -> ClusterFile {
    let networks: Vec<NetworkFile> = match spec.mode {
        Mode::Routed => vec![NetworkFile {
            outbound_nat: true,
            name: "demo".into(),
            mode: Mode::Routed,
            cidr: spec
                .routed_cidr
                .map(|c| c.to_string())
                .unwrap_or_else(|| "172.18.0.0/16".into()),
            subnet_len: 24,
            vni: 100,
            port: 4789,
            mtu: None,
            gateway: None,
            encrypt: false,
        }],
        // Every bridged network uses the same subnet on purpose: VNIs isolate them.
        Mode::Bridged => network_names(Mode::Bridged, spec.networks)
            .into_iter()
            .enumerate()
            .map(|(m, name)| NetworkFile {
                outbound_nat: true,
                name,
                mode: Mode::Bridged,
                // A gateway puts the subnet on every host's bridge: then
                // each network needs a cidr of its own.
                cidr: if spec.external {
                    format!("10.10.{}.0/22", 4 * m)
                } else {
                    "10.10.0.0/22".into()
                },
                subnet_len: 28,
                vni: 200 + m as u32,
                port: 4789,
                mtu: None,
                gateway: spec
                    .external
                    .then_some(vxmesh::config::GatewayFile::Enabled(true)),
                encrypt: false,
            })
            .collect(),
    };
    let nodes = (1..=spec.nodes)
        .map(|i| NodeFile {
            name: format!("host{i}"),
            underlay_ip: host_ip(i).to_string(),
            underlay_dev: Some("eth0".into()),
            // The reference lab's addresses: 172.18.10.0/24, 172.18.20.0/24, ...
            subnet: (spec.mode == Mode::Routed && spec.nodes <= 25 && spec.routed_cidr.is_none())
                .then(|| format!("172.18.{}.0/24", i * 10)),
            subnets: BTreeMap::new(),
            public_key: None,
            next_public_key: None,
        })
        .collect();
    ClusterFile {
        networks,
        nodes,
        encryption: spec.encryption.clone().filter(|_| spec.encrypt),
    }
}
