//! The lab: a whole multi-host cluster on one machine.
//!
//! Every simulated host is a network namespace `vxm-LAB-hostN` whose `eth0`
//! is a veth into the lab's underlay namespace `vxm-LAB-ul`, where a bridge
//! joins them all (underlay addresses 198.18.0.N/24, the benchmarking range).
//! Each host runs a real `vxmesh agent` process inside its namespace, and
//! containers (namespaces `vxm-LAB-hostN-...`) are attached with the same
//! attach code users run. Nothing is created in the root namespace and no
//! packet leaves the lab's namespaces.
//!
//! The store is a cluster file, or etcd ([`LabStore::Etcd`], see [`LabEtcd`]):
//! then an etcd server runs inside the underlay namespace, hosts join and
//! leave while the lab runs ([`Lab::add_node`], [`Lab::remove_node`]) and
//! bridged containers can move between hosts ([`Lab::move_container`]).
//!
//! This module holds the lab's model (spec, record) and topology (hosts,
//! underlay, containers); `agents` supervises the agent processes, `check`
//! probes the pairs, `teardown` removes a lab, `demo` runs the newcomer's
//! tour and `summary` describes a lab for people.

mod agents;
mod check;
mod cni;
mod demo;
mod docker;
mod etcd;
mod membership;
mod summary;
mod teardown;

pub use check::CheckReport;
use cni::cni_add;
pub(crate) use cni::run_plugin;
pub use demo::demo;
pub use docker::{IMAGE, LabDocker, PLUGIN_PORT, Runtime, plugin_name};
pub use teardown::{LabGuard, down_by_name};

pub use etcd::{ETCD_IP, ETCD_PORT, LAB_TTL, LabEtcd, LabStore};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use vxmesh::attach::{self, AttachRequest};
use vxmesh::config::{ClusterFile, Mode, NetworkFile, NodeFile};
use vxmesh::dataplane::NeighSpec;
use vxmesh::dataplane::diff::Change;
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::model::Mac;
use vxmesh::state;

pub const LAB_ROOT: &str = "/run/vxmesh-lab";
/// The underlay bridge's MAC (etcd's address lives on it).
const UNDERLAY_BRIDGE_MAC: Mac = Mac([0x02, 0x00, 198, 18, 0, 254]);

/// The fixed MAC of a host's underlay link, from its underlay address.
fn underlay_mac(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x02, 0x00, o[0], o[1], o[2], o[3]])
}
pub const UNDERLAY_NET: [u8; 3] = [198, 18, 0];

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
    /// Run every agent with `--metrics UNDERLAY_IP:PORT` (see [`Lab::metrics_addr`]).
    pub metrics_port: Option<u16>,
    /// What runs the containers (Docker: one dockerd per host).
    pub runtime: Runtime,
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
            metrics_port: None,
            runtime: Runtime::Netns,
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
}

impl LabInfo {
    /// Parse the contents of a `lab.json` file.
    pub fn from_json(data: &[u8]) -> serde_json::Result<LabInfo> {
        serde_json::from_slice(data)
    }
}

/// A lab in this process. Dropping it does NOT tear it down (the CLI's `lab up`
/// leaves it running); use [`LabGuard`] for scoped labs.
pub struct Lab {
    pub info: LabInfo,
    pub spec_exe: PathBuf,
    pub agent_args: Vec<String>,
    pub attach: AttachMode,
    children: BTreeMap<String, Child>,
    /// The etcd server, when this process started it.
    etcd_child: Option<Child>,
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

fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn ns_prefix(name: &str) -> String {
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
            name: "demo".into(),
            mode: Mode::Routed,
            cidr: "172.18.0.0/16".into(),
            subnet_len: 24,
            vni: 100,
            port: 4789,
            mtu: None,
        }],
        // Every bridged network uses the same subnet on purpose: VNIs isolate them.
        Mode::Bridged => network_names(Mode::Bridged, spec.networks)
            .into_iter()
            .enumerate()
            .map(|(m, name)| NetworkFile {
                name,
                mode: Mode::Bridged,
                cidr: "10.10.0.0/22".into(),
                subnet_len: 28,
                vni: 200 + m as u32,
                port: 4789,
                mtu: None,
            })
            .collect(),
    };
    let nodes = (1..=spec.nodes)
        .map(|i| NodeFile {
            name: format!("host{i}"),
            underlay_ip: Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], i as u8)
                .to_string(),
            underlay_dev: Some("eth0".into()),
            // The reference lab's addresses: 172.18.10.0/24, 172.18.20.0/24, ...
            subnet: (spec.mode == Mode::Routed && spec.nodes <= 25)
                .then(|| format!("172.18.{}.0/24", i * 10)),
            subnets: BTreeMap::new(),
        })
        .collect();
    ClusterFile { networks, nodes }
}

impl Lab {
    /// Build a lab. On failure everything already created is removed.
    pub async fn up(spec: &LabSpec) -> Result<Lab> {
        validate_lab_name(&spec.name)?;
        if spec.nodes == 0 || spec.nodes > 200 {
            bail!("--nodes must be 1..=200 (got {})", spec.nodes);
        }
        if spec.mode == Mode::Bridged && (spec.networks == 0 || spec.networks > 16) {
            bail!("--networks must be 1..=16 (got {})", spec.networks);
        }
        let dir = lab_dir(&spec.name);
        if dir.exists() || !netns::list(&ns_prefix(&spec.name)).is_empty() {
            bail!(
                "lab '{}' already exists: run `vxmesh lab down {}` first",
                spec.name,
                spec.name
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let info = LabInfo {
            name: spec.name.clone(),
            mode: spec.mode,
            dir: dir.clone(),
            underlay_ns: format!("vxm-{}-ul", spec.name),
            cluster_file: dir.join("cluster.toml"),
            nodes: Vec::new(),
            containers: Vec::new(),
            containers_per_node: spec.containers,
            etcd: None,
            metrics_port: spec.metrics_port,
            runtime: spec.runtime,
        };
        let mut lab = Lab {
            info,
            spec_exe: spec.exe.clone(),
            agent_args: spec.agent_args.clone(),
            attach: spec.attach,
            children: BTreeMap::new(),
            etcd_child: None,
        };
        if let Err(e) = lab.build(spec).await {
            // Teardown waits for agents to exit: off the runtime's threads.
            let cleanup = tokio::task::spawn_blocking(move || lab.down()).await;
            if let Err(e2) = cleanup.map_err(anyhow::Error::from).and_then(|r| r) {
                tracing::warn!("cleanup after failed lab up: {e2:#}");
            }
            return Err(e);
        }
        Ok(lab)
    }

    async fn build(&mut self, spec: &LabSpec) -> Result<()> {
        // Underlay: one namespace with a bridge.
        let ul = netns::create(&self.info.underlay_ns)?;
        let ul_nl = Netlink::connect_in(&ul).await?;
        // A fixed MAC: a bridge without one takes its ports' lowest, which
        // changes when a host leaves, and hosts would keep ARP entries for
        // etcd's address (on this bridge) that no longer reach it.
        ul_nl
            .create_bridge("br-ul", 1500, Some(UNDERLAY_BRIDGE_MAC), None)
            .await
            .context("underlay bridge")?;
        ul_nl
            .set_link(
                "br-ul",
                LinkOptions {
                    up: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        // Hosts: subnets from the cluster file, or claimed in etcd by the agents.
        let resolved = match spec.store {
            LabStore::Static => {
                let cluster = cluster_file_for(spec);
                let toml = toml::to_string(&cluster)?;
                state::write_atomic(&self.info.cluster_file, toml.as_bytes())?;
                Some(vxmesh::config::load(&self.info.cluster_file)?)
            }
            LabStore::Etcd => {
                self.setup_etcd(&ul_nl, spec).await?;
                None
            }
        };
        for i in 1..=spec.nodes {
            let subnets = match &resolved {
                Some(c) => c
                    .node(&format!("host{i}"))
                    .context("node in cluster")?
                    .subnets
                    .clone(),
                None => BTreeMap::new(),
            };
            self.create_host(&ul_nl, i, subnets).await?;
        }
        let all: Vec<String> = self.info.nodes.iter().map(|n| n.name.clone()).collect();
        self.pin_underlay(&all).await?;
        self.save()?;
        for i in 0..self.info.nodes.len() {
            let n = self.info.nodes[i].name.clone();
            self.start_agent(&n)?;
        }
        for i in 0..self.info.nodes.len() {
            let n = self.info.nodes[i].name.clone();
            self.wait_agent_ready(&n, Duration::from_secs(20)).await?;
        }
        // Containers: K per node per network.
        let nets = network_names(spec.mode, spec.networks);
        if spec.runtime == Runtime::Docker {
            self.start_docker_everywhere(&nets).await?;
        }
        for node in self.info.nodes.clone() {
            self.attach_containers(&node.name, &nets, spec.containers)
                .await?;
        }
        self.save()
    }

    /// Create host `hostI`: its namespace, its underlay link into the
    /// underlay bridge and its address 198.18.0.I (no agent yet).
    async fn create_host(
        &mut self,
        ul_nl: &Netlink,
        i: usize,
        subnets: BTreeMap<String, Ipv4Net>,
    ) -> Result<String> {
        if !(1..=253).contains(&i) {
            bail!("host{i}: the underlay has room for host1..host253");
        }
        let node = format!("host{i}");
        let ns_name = format!("vxm-{}-{node}", self.info.name);
        let ns = netns::create(&ns_name)?;
        let ul_port = format!("p-{node}");
        ul_nl
            .create_veth(&ul_port, "eth0", Some(&ns), 1500)
            .await
            .with_context(|| format!("underlay link of {node}"))?;
        ul_nl
            .set_link(
                &ul_port,
                LinkOptions {
                    master: Some("br-ul".into()),
                    up: Some(true),
                    ..Default::default()
                },
            )
            .await?;
        let ip = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], i as u8);
        let h = Netlink::connect_in(&ns).await?;
        h.set_link(
            "eth0",
            LinkOptions {
                up: Some(true),
                mac: Some(underlay_mac(ip)),
                ..Default::default()
            },
        )
        .await?;
        h.add_address("eth0", Ipv4Net::new(ip, 24)?).await?;
        let node_dir = self.info.dir.join(&node);
        self.info.nodes.push(LabNode {
            name: node.clone(),
            netns: ns_name,
            underlay_ip: ip,
            subnets,
            state_dir: node_dir.join("state"),
            agent_pid: None,
            agent_log: node_dir.join("agent.log"),
            docker: None,
        });
        Ok(node)
    }

    /// Pin the underlay's ARP entries as permanent neighbours: between the
    /// `new` hosts and every host, and from the `new` hosts to etcd.
    ///
    /// The lab's hosts share one kernel, whose limit on learned neighbours
    /// (`gc_thresh3`, 1 024 by default, settable only in the root namespace)
    /// counts every namespace's entries: 50 hosts learning each other's
    /// underlay addresses need 2 450, and beyond the limit the kernel drops
    /// packets ("neighbor table overflow"). Permanent entries do not count.
    /// Real hosts each have a kernel of their own and learn these by ARP.
    pub(crate) async fn pin_underlay(&self, new: &[String]) -> Result<()> {
        let is_new = |n: &LabNode| new.contains(&n.name);
        let entry = |ip: Ipv4Addr, mac: Mac| Change::ReplaceNeighbour {
            neigh: NeighSpec {
                dev: "eth0".into(),
                ip,
                mac,
            },
        };
        for h in &self.info.nodes {
            let mut changes: Vec<Change> = self
                .info
                .nodes
                .iter()
                .filter(|o| o.name != h.name && (is_new(h) || is_new(o)))
                .map(|o| entry(o.underlay_ip, underlay_mac(o.underlay_ip)))
                .collect();
            if is_new(h) && self.info.etcd.is_some() {
                changes.push(entry(ETCD_IP, UNDERLAY_BRIDGE_MAC));
            }
            if changes.is_empty() {
                continue;
            }
            let nl = Netlink::connect_in(&Netns::open(&h.netns)?).await?;
            nl.apply(&changes)
                .await
                .with_context(|| format!("pin the underlay neighbours of {}", h.name))?;
        }
        Ok(())
    }

    /// Attach `k` containers per network of `nets` on `node`.
    async fn attach_containers(&mut self, node: &str, nets: &[String], k: usize) -> Result<()> {
        let state_dir = self.node(node)?.state_dir.clone();
        for (m, net) in nets.iter().enumerate() {
            for k in 1..=k {
                let cname = if self.info.mode == Mode::Routed {
                    format!("{node}-c{k}")
                } else {
                    format!("{node}-n{}c{k}", m + 1)
                };
                // Bridged: network m starts m addresses further into the slice, so
                // networks share some addresses (same IP, different VNI) and not
                // others (an isolation probe has a real target in one network only).
                let ip = match self.info.mode {
                    Mode::Routed => None,
                    Mode::Bridged => {
                        let st = state::read_network(&state_dir, net)?.state;
                        vxmesh::dataplane::plan::usable_addresses(st.pool, st.subnet, st.gateway)
                            .nth(k - 1 + m)
                    }
                };
                self.add_container(node, net, &cname, ip).await?;
            }
        }
        Ok(())
    }

    /// Create a container namespace on `node` and attach it to `network`.
    pub async fn add_container(
        &mut self,
        node: &str,
        network: &str,
        cname: &str,
        ip: Option<Ipv4Addr>,
    ) -> Result<LabContainer> {
        if self.info.runtime == Runtime::Docker {
            return self.docker_add(node, network, cname, ip).await;
        }
        let n = self.node(node)?.clone();
        let ns_name = format!("vxm-{}-{cname}", self.info.name);
        let cns = netns::create(&ns_name)?;
        let host_ns = Netns::open(&n.netns)?;
        let attached = match self.attach {
            AttachMode::Library => {
                let req = AttachRequest {
                    state_dir: &n.state_dir,
                    network,
                    container_id: cname,
                    ifname: "eth0",
                    host_ns: Some(&host_ns),
                    container_ns: &cns,
                    ip,
                    mtu: None,
                };
                attach::attach(&req)
                    .await
                    .map(|a| a.ip.addr())
                    .map_err(anyhow::Error::from)
            }
            AttachMode::Cni => {
                cni_add(
                    &self.spec_exe,
                    host_ns,
                    &n.state_dir,
                    network,
                    cname,
                    &ns_name,
                    ip,
                )
                .await
            }
        };
        let ip = match attached {
            Ok(ip) => ip,
            Err(e) => {
                let _ = netns::delete(&ns_name);
                return Err(e);
            }
        };
        let c = LabContainer {
            name: cname.to_string(),
            node: node.to_string(),
            network: network.to_string(),
            netns: ns_name,
            ip,
        };
        self.info.containers.push(c.clone());
        self.save()?;
        Ok(c)
    }

    pub fn load(name: &str) -> Result<Lab> {
        validate_lab_name(name)?;
        let path = lab_dir(name).join("lab.json");
        let data = std::fs::read(&path)
            .with_context(|| format!("lab '{name}' does not exist ({} missing)", path.display()))?;
        let info =
            LabInfo::from_json(&data).with_context(|| format!("corrupt {}", path.display()))?;
        Ok(Lab {
            info,
            spec_exe: std::env::current_exe()?,
            agent_args: Vec::new(),
            attach: AttachMode::Library,
            children: BTreeMap::new(),
            etcd_child: None,
        })
    }

    pub fn save(&self) -> Result<()> {
        Ok(state::write_atomic(
            &self.info.dir.join("lab.json"),
            serde_json::to_string_pretty(&self.info)?.as_bytes(),
        )?)
    }

    pub fn node(&self, name: &str) -> Result<&LabNode> {
        self.info
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| {
                format!(
                    "lab '{}' has no node '{name}' (nodes: {})",
                    self.info.name,
                    self.info
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// The first container on `node` (any network).
    pub fn container_on(&self, node: &str) -> Result<&LabContainer> {
        self.info
            .containers
            .iter()
            .find(|c| c.node == node)
            .with_context(|| format!("lab '{}' has no container on '{node}'", self.info.name))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut LabNode> {
        let lab = self.info.name.clone();
        self.info
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("lab '{lab}' has no node '{name}'"))
    }

    /// Where the agent of `node` serves its metrics (its underlay address, in
    /// its namespace), if the lab runs agents with metrics.
    pub fn metrics_addr(&self, node: &str) -> Option<std::net::SocketAddr> {
        let port = self.info.metrics_port?;
        let n = self.info.nodes.iter().find(|n| n.name == node)?;
        Some((n.underlay_ip, port).into())
    }

    /// Rewrite the lab's cluster file (agents pick it up through inotify).
    pub fn write_cluster(&self, file: &ClusterFile) -> Result<()> {
        Ok(state::write_atomic(
            &self.info.cluster_file,
            toml::to_string(file)?.as_bytes(),
        )?)
    }

    pub fn read_cluster(&self) -> Result<ClusterFile> {
        Ok(toml::from_str(&std::fs::read_to_string(
            &self.info.cluster_file,
        )?)?)
    }

    /// Run a command inside a node's namespace (or a container's, by name).
    pub fn exec(&self, target: &str, argv: &[String]) -> Result<std::process::ExitStatus> {
        let ns_name = if let Ok(n) = self.node(target) {
            n.netns.clone()
        } else if let Some(c) = self.info.containers.iter().find(|c| c.name == target) {
            c.netns.clone()
        } else {
            bail!(
                "lab '{}' has no node or container '{target}'",
                self.info.name
            );
        };
        let (prog, args) = argv
            .split_first()
            .context("no command given: use `vxmesh lab exec LAB NODE -- CMD ARGS`")?;
        let ns = Netns::open(&ns_name)?;
        let mut cmd = Command::new(prog);
        cmd.args(args);
        ns.enter_on_exec(&mut cmd);
        let status = cmd
            .status()
            .with_context(|| format!("run {prog} in {ns_name}"))?;
        drop(ns);
        Ok(status)
    }
}
