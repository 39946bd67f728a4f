//! The `vxmesh` command line: parse the arguments, set up logging, enter
//! `--netns`, and hand each command to its group in [`commands`]. Invoked
//! with `CNI_COMMAND` set, it is the CNI plugin instead.

mod commands;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use vxmesh::dataplane::netns::Netns;

use commands::{agent, attach, bench, cluster, docker, docs, keys, lab, leave, net, node, rotate};

#[derive(Parser, Debug)]
#[command(
    name = "vxmesh",
    version,
    about = "VXLAN overlay networks for containers across Linux hosts"
)]
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
    /// Options come from the configuration file (--config, default
    /// /etc/vxmesh/agent.toml when present) and the flags, which override it.
    Agent(agent::AgentArgs),
    /// Remove everything vxmesh owns on this node (devices, routes, entries, state).
    Down(node::DownArgs),
    /// This node's networks and peers, and whether each planned kernel entry is in place.
    Status(node::StatusArgs),
    /// Walk the packet path to every peer (or to --to IP) and name the first broken hop.
    Doctor(node::DoctorArgs),
    /// Validate a cluster file (and print the resolved cluster) or an agent
    /// configuration file, without starting anything.
    Validate(cluster::ValidateArgs),
    /// Print the desired state of a node (JSON), without touching anything.
    Plan(cluster::PlanArgs),
    /// Attach a network namespace to a network as a container.
    Attach(attach::AttachArgs),
    /// Detach a container (idempotent).
    Detach(attach::DetachArgs),
    /// Serve Docker's remote network and IPAM plugin protocols for the
    /// networks this node's agent serves (`docker network create -d vxmesh
    /// --ipam-driver vxmesh ...`).
    DockerPlugin(docker::DockerPluginArgs),
    /// Networks in the etcd store.
    #[command(subcommand)]
    Net(net::NetCmd),
    /// Remove a node from etcd network(s) at once (revoke its lease): for a
    /// decommissioned or dead node. Stop its agent first.
    Leave(leave::LeaveArgs),
    /// A whole multi-host cluster on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Measured benchmarks (build with --release).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Make a WireGuard key pair for the secure underlay: the private key
    /// goes to --out (mode 0600), the public key (a node's `public_key`) is
    /// printed.
    Keygen(keys::KeygenArgs),
    /// Rotate this node's WireGuard key without a lost packet: writes the
    /// next key (STATE_DIR/wg.next.key, 0600) and prints its public key.
    /// etcd: the agent publishes it and switches on its own. Cluster file:
    /// list it as the node's next_public_key; when the file is gone, make
    /// it the public_key (docs/encryption.md).
    RotateKey(rotate::RotateKeyArgs),
    /// Print a shell completion script (e.g. `vxmesh completions bash > /etc/bash_completion.d/vxmesh`).
    Completions(docs::CompletionsArgs),
    /// Write the man pages (vxmesh.1 and one per command) into DIR.
    #[command(hide = true)]
    Man(docs::ManArgs),
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Logging of the CNI plugin: to stderr, where runtimes collect it, at
/// `level` (a level or `tracing` filter; a bad one means `warn`).
fn init_cni_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    // Invoked by a container runtime as a CNI plugin.
    if std::env::var_os("CNI_COMMAND").is_some() {
        return ExitCode::from(vxmesh::cni::main(init_cni_logging) as u8);
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
    // One worker, and the command runs on it as a task: the agent's passes
    // and the netlink and etcd connections they talk to wake each other on
    // one thread, not across three (in a 250-agent cold start, futex
    // wake-ups and task switches were about a tenth of the agents' CPU).
    // Still the multi-thread flavour, so a task may block in place
    // (`state::lock_file`).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vxmesh: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(rt.spawn(run(cli.cmd))) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("vxmesh: {e:#}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vxmesh: {e}");
            ExitCode::from(1)
        }
    }
}

/// Run one command; its exit code, or an error printed as `vxmesh: ...`.
async fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Agent(a) => agent::run(a).await?,
        Cmd::Down(a) => node::down(a).await?,
        Cmd::Status(a) => node::status(a).await?,
        Cmd::Doctor(a) => return node::doctor(a).await,
        Cmd::Validate(a) => cluster::validate(a)?,
        Cmd::Plan(a) => cluster::plan_node(a)?,
        Cmd::Attach(a) => attach::attach(a).await?,
        Cmd::Detach(a) => attach::detach(a).await?,
        Cmd::DockerPlugin(a) => docker::run(a).await?,
        Cmd::Net(n) => net::run(n).await?,
        Cmd::Leave(a) => leave::run(a).await?,
        Cmd::Lab(l) => return lab::run(l).await,
        Cmd::Bench(b) => bench::run(b).await?,
        Cmd::Keygen(a) => keys::keygen(a)?,
        Cmd::RotateKey(a) => rotate::rotate_key(a)?,
        Cmd::Completions(a) => docs::completions(a, Cli::command())?,
        Cmd::Man(a) => docs::man(a, Cli::command())?,
    }
    Ok(ExitCode::SUCCESS)
}
