//! The `vxmesh` command line: agent, attach/detach, down, plan, lab.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use vxmesh::config::{self, Mode};
use vxmesh::dataplane::netns::Netns;
use vxmesh::lab::{self, Lab, LabGuard, LabSpec};
use vxmesh::state::DEFAULT_STATE_DIR;

#[derive(Parser, Debug)]
#[command(name = "vxmesh", version, about = "VXLAN overlay networks for containers across Linux hosts")]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace). Quiet by default.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Run inside this named network namespace (/run/netns/NAME).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the node agent: reconcile this node to the cluster and keep it so.
    Agent(AgentArgs),
    /// Remove everything vxmesh owns on this node (devices, routes, entries, state).
    Down {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Validate a cluster file and print the resolved cluster.
    Validate {
        #[arg(long)]
        cluster: PathBuf,
    },
    /// Print the desired state of a node (JSON), without touching anything.
    Plan {
        #[arg(long)]
        cluster: PathBuf,
        #[arg(long)]
        node: String,
        /// Underlay MTU to assume for networks without an explicit MTU.
        #[arg(long, default_value_t = 1500)]
        underlay_mtu: u32,
    },
    /// Attach a network namespace to a network as a container.
    Attach {
        #[arg(long)]
        network: String,
        /// The container's network namespace: a name under /run/netns or a path.
        #[arg(long = "container-netns")]
        container_netns: String,
        /// Container id (default: the namespace name).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Ask for this address.
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Detach a container (idempotent).
    Detach {
        #[arg(long)]
        network: String,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// A whole multi-host cluster on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(LabCmd),
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// The cluster file (static store).
    #[arg(long)]
    cluster: PathBuf,
    /// This node's name in the cluster.
    #[arg(long)]
    node: String,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// One reconcile pass, then exit.
    #[arg(long)]
    once: bool,
    /// Seconds between full passes (kernel events and file edits act at once).
    #[arg(long, default_value_t = 5.0)]
    resync: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Routed,
    Bridged,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Routed => Mode::Routed,
            ModeArg::Bridged => Mode::Bridged,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct LabUpArgs {
    /// Number of simulated hosts.
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
enum LabCmd {
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
    /// Up + check + down, with a readable report.
    Demo {
        #[arg(long, default_value = "demo")]
        name: String,
        #[command(flatten)]
        spec: LabUpArgs,
    },
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VXMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("vxmesh={level},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> ExitCode {
    // Invoked by a container runtime as a CNI plugin.
    if std::env::var_os("CNI_COMMAND").is_some() {
        return ExitCode::from(vxmesh::cni::main() as u8);
    }
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // Enter the namespace before any other thread exists: every thread the
    // runtime starts later inherits it.
    if let Some(ns) = &cli.netns
        && let Err(e) = Netns::open(ns).and_then(|n| n.enter_for_process())
    {
        eprintln!("vxmesh: {e:#}");
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vxmesh: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vxmesh: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn spec_from(name: &str, a: &LabUpArgs) -> Result<LabSpec> {
    let mut s = LabSpec::new(name, a.nodes, a.containers);
    s.mode = a.mode.into();
    s.networks = a.networks;
    s.attach = a.attach.into();
    s.exe = std::env::current_exe().context("locate the vxmesh binary")?;
    Ok(s)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Agent(a) => {
            let store = vxmesh::store::static_file::StaticFile::open(&a.cluster)?;
            // Fail fast on a bad file or node before touching anything.
            let cluster = config::load(&a.cluster)?;
            if cluster.node(&a.node).is_none() {
                anyhow::bail!(
                    "node '{}' is not in {} (known: {}): check --node",
                    a.node,
                    a.cluster.display(),
                    cluster.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
            if !(a.resync > 0.0 && a.resync < 86400.0) {
                anyhow::bail!("--resync must be between 0 and 86400 seconds");
            }
            vxmesh::agent::run(
                store,
                vxmesh::agent::AgentOptions {
                    node: a.node,
                    state_dir: a.state_dir,
                    resync: Duration::from_secs_f64(a.resync),
                    once: a.once,
                },
            )
            .await?;
        }
        Cmd::Down { state_dir } => {
            let nl = vxmesh::dataplane::kernel::Netlink::connect().await?;
            let report = nl.teardown().await?;
            for n in vxmesh::state::list_networks(&state_dir) {
                vxmesh::state::remove_network(&state_dir, &n)?;
            }
            println!(
                "removed {} device(s) ({}) and {} route(s)",
                report.links_deleted.len(),
                report.links_deleted.join(", "),
                report.routes_deleted
            );
            for s in &report.skipped {
                println!("left alone (not vxmesh's): {s}");
            }
            if !report.errors.is_empty() {
                anyhow::bail!("teardown incomplete: {}", report.errors.join("; "));
            }
        }
        Cmd::Validate { cluster } => {
            let c = config::load(&cluster)?;
            println!("{}: {} network(s), {} node(s)", cluster.display(), c.networks.len(), c.nodes.len());
            for n in &c.nodes {
                let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  {} {} {}", n.name, n.underlay_ip, subs.join(" "));
            }
        }
        Cmd::Plan { cluster, node, underlay_mtu } => {
            let c = config::load(&cluster)?;
            let p = vxmesh::dataplane::plan::plan(&vxmesh::dataplane::plan::PlanInput {
                cluster: &c,
                node: &node,
                endpoints: None,
                underlay_mtu,
            })?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        Cmd::Attach { network, container_netns, id, ifname, ip, state_dir } => {
            let ns = if container_netns.contains('/') {
                Netns::open_path(std::path::Path::new(&container_netns))?
            } else {
                Netns::open(&container_netns)?
            };
            let id = id.unwrap_or_else(|| container_netns.rsplit('/').next().unwrap_or(&container_netns).to_string());
            let a = vxmesh::attach::attach(&vxmesh::attach::AttachRequest {
                state_dir: &state_dir,
                network: &network,
                container_id: &id,
                ifname: &ifname,
                host_ns: None,
                container_ns: &ns,
                ip,
                mtu: None,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&a)?);
        }
        Cmd::Detach { network, id, ifname, state_dir } => {
            match vxmesh::attach::detach(&state_dir, &network, &id, &ifname, None).await? {
                Some(ip) => println!("detached {id} ({ip})"),
                None => println!("{id} was not attached"),
            }
        }
        Cmd::Lab(l) => return lab_cmd(l).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn lab_cmd(cmd: LabCmd) -> Result<ExitCode> {
    match cmd {
        LabCmd::Up { name, spec } => {
            let lab = Lab::up(&spec_from(&name, &spec)?).await?;
            print_info(&lab.info);
            println!("\nnext: vxmesh lab check {name}   |   vxmesh lab down {name}");
        }
        LabCmd::Check { name, json } => {
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
                print_info(&lab.info);
            }
        }
        LabCmd::Down { name } => {
            lab::down_by_name(&name)?;
            println!("lab {name} removed");
        }
        LabCmd::Demo { name, spec } => return demo(&name, &spec).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(info: &lab::LabInfo) {
    println!("lab {} ({} mode), underlay namespace {}", info.name, info.mode, info.underlay_ns);
    for n in &info.nodes {
        let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  {:8} netns {:22} underlay {:12} {}  agent pid {}",
            n.name,
            n.netns,
            n.underlay_ip.to_string(),
            subs.join(", "),
            n.agent_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    for c in &info.containers {
        println!("    {:14} on {:8} {:6} {:14} netns {}", c.name, c.node, c.network, c.ip.to_string(), c.netns);
    }
}

async fn demo(name: &str, a: &LabUpArgs) -> Result<ExitCode> {
    let spec = spec_from(name, a)?;
    println!(
        "== vxmesh lab demo: {} hosts, {} container(s) per host{}, {} mode",
        spec.nodes,
        spec.containers,
        if spec.mode == Mode::Bridged { format!(" per network, {} networks", spec.networks) } else { String::new() },
        spec.mode
    );
    let t0 = std::time::Instant::now();
    let lab = LabGuard(Lab::up(&spec).await?);
    println!("-- built in {:.1?}:", t0.elapsed());
    print_info(&lab.info);
    let t1 = std::time::Instant::now();
    let report = lab.check(Duration::from_secs(2))?;
    println!("\n-- connectivity ({} probes in {:.1?}; ok = reached, iso = isolated as it must be):", report.results.len(), t1.elapsed());
    print!("{}", report.matrix());
    let fails = report.failures();
    for f in &fails {
        eprintln!("FAILED: {f}");
    }
    drop(lab);
    println!("\n-- lab removed (namespaces, agents, state)");
    if fails.is_empty() {
        println!("PASS: every pair behaved as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAIL: {} pair(s) misbehaved", fails.len());
        Ok(ExitCode::from(1))
    }
}
