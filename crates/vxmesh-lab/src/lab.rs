//! The lab: a whole multi-host cluster on one machine.
//!
//! Every simulated host is a network namespace `vxm-LAB-hostN` whose `eth0`
//! is a veth into the lab's underlay namespace `vxm-LAB-ul`, where a bridge
//! joins them all (underlay 198.18.0.0/23 in the benchmarking range: host N
//! is 198.18.0.N up to host248, then 198.18.1.1 for host249 and on; see
//! [`host_ip`]).
//! Each host runs a real `vxmesh agent` process inside its namespace, and
//! containers (namespaces `vxm-LAB-hostN-...`) are attached with the same
//! attach code users run. Nothing is created in the root namespace and no
//! packet leaves the lab's namespaces.
//!
//! The store is a cluster file, or etcd ([`LabStore::Etcd`], see
//! [`LabEtcd`]): then an etcd cluster of 1-5 members runs on the underlay,
//! each member in a namespace of its own; [`faults`] breaks it on demand and
//! [`invariants`] checks what vxmesh does meanwhile. Hosts join and leave
//! while the lab runs ([`Lab::add_node`], [`Lab::remove_node`]) and bridged
//! containers can move between hosts ([`Lab::move_container`]).
//!
//! This module holds the lab's topology (underlay, containers); `spec`
//! holds its model (spec, record), `hosts` makes hosts on the underlay, `agents` supervises the
//! agent processes, `check` probes the pairs, `teardown` removes a lab,
//! `demo` runs the newcomer's tour and `summary` describes a lab for people.

mod agents;
mod check;
mod child;
mod cni;
mod containers;
mod demo;
mod docker;
mod etcd;
mod external;
pub mod faults;
mod gate;
mod hosts;
pub mod invariants;
mod membership;
mod memfs;
mod secure;
mod spec;
mod summary;
mod teardown;

pub use check::CheckReport;
pub(crate) use cni::run_plugin;
pub use demo::demo;
pub use docker::{IMAGE, LabDocker, PLUGIN_PORT, Runtime, plugin_name};
pub use external::{
    ExternalProbe, ExternalReport, LabPublished, OUTSIDE_IP, OUTSIDE_NET, OUTSIDE_PORT, ROUTER_IP,
    outside_ns, parse_publish,
};
pub use gate::StartGate;
pub use teardown::{LabGuard, down_by_name};

pub use etcd::{
    ETCD_IP, ETCD_PORT, EtcdMember, LAB_CONTROL_IP, LAB_TTL, LabEtcd, LabStore, MAX_ETCD_MEMBERS,
    member_ip,
};
pub use spec::{
    AttachMode, LabContainer, LabInfo, LabNode, LabSpec, cluster_file_for, network_names,
    validate_lab_name,
};
use spec::{lab_dir, ns_prefix};

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use vxmesh::config::{ClusterFile, Mode};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::{self, Netns};
use vxmesh::model::Mac;
use vxmesh::state;

pub const LAB_ROOT: &str = "/run/vxmesh-lab";
/// The underlay bridge's MAC (fixed: see [`Lab::build`]); no host or etcd
/// member has it (their MACs end in their address's last byte, never 0).
const UNDERLAY_BRIDGE_MAC: Mac = Mac([0x02, 0x00, 198, 18, 0, 0]);
/// Highest host number: 248 hosts in 198.18.0.1-248 (198.18.0.249 and
/// above are the lab's own address and etcd's members), then 254 more in
/// 198.18.1.1-254.
pub const MAX_HOST: usize = 248 + 254;
/// The underlay's prefix length (198.18.0.0/23).
pub const UNDERLAY_PREFIX: u8 = 23;

/// The underlay address of host `i` (1..=[`MAX_HOST`]): 198.18.0.i up to
/// host248, then 198.18.1.(i - 248), so small labs keep their addresses.
pub const fn host_ip(i: usize) -> Ipv4Addr {
    if i <= 248 {
        Ipv4Addr::new(198, 18, 0, i as u8)
    } else {
        Ipv4Addr::new(198, 18, 1, (i - 248) as u8)
    }
}

/// The fixed MAC of a host's underlay link, from its underlay address.
fn underlay_mac(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    Mac([0x02, 0x00, o[0], o[1], o[2], o[3]])
}

/// A lab in this process. Dropping it does NOT tear it down (the CLI's `lab up`
/// leaves it running); use [`LabGuard`] for scoped labs.
pub struct Lab {
    pub info: LabInfo,
    pub spec_exe: PathBuf,
    pub agent_args: Vec<String>,
    /// The nice value the agents are started with (0: this process's).
    /// See `bench converge --cold-start`.
    pub agent_nice: i32,
    pub attach: AttachMode,
    children: BTreeMap<String, Child>,
    /// The etcd members this process started, by member name.
    etcd_children: BTreeMap<String, Child>,
}

impl Lab {
    /// Build a lab. On failure everything already created is removed.
    pub async fn up(spec: &LabSpec) -> Result<Lab> {
        validate_lab_name(&spec.name)?;
        if spec.nodes == 0 || spec.nodes > MAX_HOST {
            bail!("--nodes must be 1..={MAX_HOST} (got {})", spec.nodes);
        }
        if spec.store == LabStore::Static && (spec.etcd_members != 1 || spec.routed_cidr.is_some())
        {
            bail!("--etcd-members and a routed CIDR belong to the etcd store: add --store etcd");
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
        // The lab's files in memory (see `memfs`); a Docker lab's dockerd
        // keeps its data root on the disk (only etcd's data then).
        if spec.runtime != Runtime::Docker
            && let Err(e) = memfs::mount(&dir, "the lab")
        {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
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
            external: false,
            published: Vec::new(),
        };
        let mut lab = Lab {
            info,
            spec_exe: spec.exe.clone(),
            agent_args: spec.agent_args.clone(),
            agent_nice: 0,
            attach: spec.attach,
            children: BTreeMap::new(),
            etcd_children: BTreeMap::new(),
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
        hosts::plain_switch(&ul)?;
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
                let mut cluster = cluster_file_for(spec);
                if spec.encrypt {
                    self.encrypt_first_network(&mut cluster)?;
                }
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
        if spec.external {
            self.build_external(&ul_nl).await?;
        }
        self.save()?;
        if !spec.start_agents {
            return Ok(());
        }
        for i in 0..self.info.nodes.len() {
            let n = self.info.nodes[i].name.clone();
            self.start_agent(&n)?;
        }
        self.wait_agents_ready(&all, Duration::from_secs(30))
            .await?;
        // Containers: K per node per network.
        let nets = network_names(spec.mode, spec.networks);
        if spec.runtime == Runtime::Docker {
            self.start_docker_everywhere(&nets).await?;
        }
        self.attach_everywhere(&nets, spec.containers).await?;
        if let Some((host, container)) = spec.publish {
            self.publish_all(host, container).await?;
        }
        self.save()?;
        // A ready agent has published its networks, which a full pass does
        // before it programs the peers: `up` returns once every agent's
        // applied plan covers the whole lab (with etcd, also once the
        // agents learned each other through the watch).
        if !self.wait_converged(Duration::from_secs(10)).await {
            tracing::warn!(
                "lab {}: not every agent knows every peer yet",
                self.info.name
            );
        }
        Ok(())
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
            agent_nice: 0,
            attach: AttachMode::Library,
            children: BTreeMap::new(),
            etcd_children: BTreeMap::new(),
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
