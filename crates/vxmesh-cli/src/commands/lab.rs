//! `vxmesh lab`: a whole multi-host cluster on this machine, built, probed,
//! changed and removed through the lab crate.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use vxmesh_lab::lab::{self, Lab, LabSpec};

use super::ModeArg;

#[derive(Args, Debug, Clone)]
pub struct LabUpArgs {
    /// Number of simulated hosts (1-502; underlay 198.18.0.0/23).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Containers per host (per network in bridged mode).
    #[arg(long, default_value_t = 2)]
    containers: usize,
    #[arg(long, value_enum, default_value = "routed")]
    mode: ModeArg,
    /// Bridged networks (all on the same subnet, isolated by VNI).
    #[arg(long, default_value_t = 2)]
    networks: usize,
    /// How containers are attached: in-process (library) or by running vxmesh
    /// as a CNI plugin exactly as a container runtime does (cni).
    #[arg(long, value_enum, default_value = "library")]
    attach: AttachArg,
    /// What runs the containers: network namespaces (netns, attached as
    /// --attach says), or Docker (docker: every host runs its own dockerd
    /// and its own `vxmesh docker-plugin`).
    #[arg(long, value_enum, default_value = "netns")]
    runtime: RuntimeArg,
    /// Where node records live: one cluster file (static), or an etcd cluster
    /// on the lab's underlay (etcd: hosts can join and leave).
    #[arg(long, value_enum, default_value = "static")]
    store: StoreArg,
    /// etcd store: the agents' lease TTL in seconds.
    #[arg(long, default_value_t = lab::LAB_TTL.as_secs())]
    ttl: u64,
    /// etcd store: members of the etcd cluster (1-5), each in a namespace
    /// of its own on the underlay; agents get every member as an endpoint.
    #[arg(long, default_value_t = 1, value_name = "N")]
    etcd_members: usize,
    /// Each agent serves metrics on its underlay address at this port
    /// (scrape from inside the host: `vxmesh lab exec LAB hostN -- curl ...`).
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    /// Build an outside world: a host 203.0.113.1 behind a router on the
    /// underlay, with no route to any container subnet (bridged networks
    /// get a distributed gateway and a cidr each). `lab demo --external`
    /// also publishes 8080:80 and runs `lab check --external`.
    #[arg(long)]
    external: bool,
    /// Publish port CONTAINER (TCP) of every container on its host: the
    /// k-th container of a host (from 0) on host port HOST + k.
    #[arg(long, value_name = "HOST:CONTAINER", value_parser = lab::parse_publish)]
    publish: Option<(u16, u16)>,
    /// Carry the first network over the secure underlay (VXLAN over
    /// userspace WireGuard; keys listed in the cluster file, or published
    /// by the agents in their etcd records; docs/encryption.md); other
    /// networks stay plain. `lab demo --encrypt` also shows every host's
    /// WireGuard sessions and fails unless each pair of hosts has one.
    #[arg(long)]
    encrypt: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreArg {
    Static,
    Etcd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuntimeArg {
    Netns,
    Docker,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttachArg {
    Library,
    Cni,
}

impl From<AttachArg> for lab::AttachMode {
    fn from(a: AttachArg) -> lab::AttachMode {
        match a {
            AttachArg::Library => lab::AttachMode::Library,
            AttachArg::Cni => lab::AttachMode::Cni,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab and leave it running.
    Up {
        #[arg(long, default_value = "demo")]
        name: String,
        #[command(flatten)]
        spec: LabUpArgs,
    },
    /// Probe every container pair in both directions; non-zero exit on any failure.
    Check {
        name: String,
        #[arg(long)]
        json: bool,
        /// Instead: probe the outside world (lab up --external): ICMP and
        /// TCP from every container to 203.0.113.1, and every published
        /// port from there; non-zero exit on any miss.
        #[arg(long)]
        external: bool,
    },
    /// Run a command in a lab node's (or container's) namespace.
    Exec {
        name: String,
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Describe a lab.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a lab and everything it made.
    Down { name: String },
    /// Add a host to a running etcd lab (agent and containers like the others).
    AddNode { name: String },
    /// Remove a host from a running etcd lab: SIGTERM + leave (peers drop it
    /// at once), or with --crash kill -9 and nothing else (peers drop it when
    /// its lease expires).
    RemoveNode {
        name: String,
        node: String,
        #[arg(long)]
        crash: bool,
    },
    /// Up + check + down, with a readable report.
    Demo {
        #[arg(long, default_value = "demo")]
        name: String,
        #[command(flatten)]
        spec: LabUpArgs,
    },
}

/// The lab to build, from the `lab up` / `lab demo` options.
fn spec_from(name: &str, a: &LabUpArgs) -> Result<LabSpec> {
    let mut s = LabSpec::new(name, a.nodes, a.containers);
    s.mode = a.mode.into();
    s.networks = a.networks;
    s.attach = a.attach.into();
    s.runtime = match a.runtime {
        RuntimeArg::Netns => lab::Runtime::Netns,
        RuntimeArg::Docker => lab::Runtime::Docker,
    };
    s.store = match a.store {
        StoreArg::Static => lab::LabStore::Static,
        StoreArg::Etcd => lab::LabStore::Etcd,
    };
    s.ttl = Duration::from_secs(a.ttl);
    s.etcd_members = a.etcd_members;
    s.metrics_port = a.metrics_port;
    s.external = a.external;
    s.publish = a.publish;
    s.encrypt = a.encrypt;
    s.exe = std::env::current_exe().context("locate the vxmesh binary")?;
    Ok(s)
}

/// Exit code 1 when `check` or `demo` find a misbehaving pair; `exec`
/// passes on its command's code.
pub async fn run(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up { name, spec } => {
            let lab = Lab::up(&spec_from(&name, &spec)?).await?;
            print!("{}", lab.info.summary());
            println!("\nnext: vxmesh lab check {name}   |   vxmesh lab down {name}");
        }
        LabCmd::Check {
            name,
            json,
            external: true,
        } => {
            let lab = Lab::load(&name)?;
            let report = lab.check_external(Duration::from_secs(2))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            let misses = report.failures();
            if !misses.is_empty() {
                eprintln!(
                    "FAILED: {} of {} outside-world probes missed (MISS lines above)",
                    misses.len(),
                    report.probes.len()
                );
                return Ok(ExitCode::from(1));
            }
            println!("all {} outside-world probes answered", report.probes.len());
        }
        LabCmd::Check { name, json, .. } => {
            let lab = Lab::load(&name)?;
            let report = lab.check(Duration::from_secs(2))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.matrix());
            }
            let fails = report.failures();
            if !fails.is_empty() {
                for f in &fails {
                    eprintln!("FAILED: {f}");
                }
                return Ok(ExitCode::from(1));
            }
            println!("all {} probes as expected", report.results.len());
        }
        LabCmd::Exec { name, target, cmd } => {
            let lab = Lab::load(&name)?;
            let st = lab.exec(&target, &cmd)?;
            return Ok(ExitCode::from(st.code().unwrap_or(1).clamp(0, 255) as u8));
        }
        LabCmd::Info { name, json } => {
            let lab = Lab::load(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lab.info)?);
            } else {
                print!("{}", lab.info.summary());
            }
        }
        LabCmd::Down { name } => {
            lab::down_by_name(&name)?;
            println!("lab {name} removed");
        }
        LabCmd::AddNode { name } => {
            let mut lab = Lab::load(&name)?;
            let node = lab.add_node().await?;
            println!("{node} joined lab {name}:");
            print!("{}", lab.info.summary());
        }
        LabCmd::RemoveNode { name, node, crash } => {
            let mut lab = Lab::load(&name)?;
            lab.remove_node(&node, crash).await?;
            if crash {
                println!("{node} crashed (kill -9): peers drop it when its lease expires");
            } else {
                println!("{node} left lab {name}: peers dropped it");
            }
        }
        LabCmd::Demo { name, spec } => {
            let passed = lab::demo(&spec_from(&name, &spec)?).await?;
            return Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
