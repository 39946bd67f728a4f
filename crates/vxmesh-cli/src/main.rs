//! The `vxmesh` command line: agent, attach/detach, down, plan, lab.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use vxmesh::config::{self, Mode};
use vxmesh::dataplane::netns::Netns;
use vxmesh::state::DEFAULT_STATE_DIR;
use vxmesh::store::Store;
use vxmesh::store::etcd;
use vxmesh_lab::lab::{self, Lab, LabGuard, LabSpec};

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
    Agent(AgentArgs),
    /// Remove everything vxmesh owns on this node (devices, routes, entries, state).
    Down {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// This node's networks and peers, and whether each planned kernel entry is in place.
    Status {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Walk the packet path to every peer (or to --to IP) and name the first broken hop.
    Doctor {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// A container IP on a remote node.
        #[arg(long)]
        to: Option<std::net::Ipv4Addr>,
        /// Skip the ICMP echo to each peer's underlay IP.
        #[arg(long)]
        no_ping: bool,
        #[arg(long)]
        json: bool,
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
    /// Networks in the etcd store.
    #[command(subcommand)]
    Net(NetCmd),
    /// Remove a node from etcd network(s) at once (revoke its lease): for a
    /// decommissioned or dead node. Stop its agent first.
    Leave {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(
            long = "network",
            value_name = "NAME",
            value_delimiter = ',',
            required = true
        )]
        networks: Vec<String>,
        #[arg(long)]
        node: String,
        /// Refuse if an agent serving this node runs with this state dir.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// A whole multi-host cluster on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Measured benchmarks (build with --release).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand, Debug)]
enum NetCmd {
    /// Create a network in etcd (validated like a cluster file's network;
    /// an identical existing one is fine, a different one is refused).
    Create {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// routed: cluster CIDR; bridged: the segment's subnet.
        #[arg(long)]
        cidr: String,
        #[arg(long, value_enum, default_value = "routed")]
        mode: ModeArg,
        #[arg(long)]
        vni: u32,
        /// routed: per-node subnet length (default 24); bridged: per-node address slice (default 28).
        #[arg(long)]
        subnet_len: Option<u8>,
        #[arg(long, default_value_t = 4789)]
        port: u32,
        /// Overlay MTU (default: underlay MTU - 50).
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// Print a network's config (JSON).
    Show {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete a network and everything under it (refused while nodes are in it).
    Delete {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Program P remote peers into an empty node, vs `ip -batch` of the same objects.
    Scale {
        /// Peer counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        peers: Vec<usize>,
        /// Modes to measure.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "routed,bridged"
        )]
        mode: Vec<ModeArg>,
        /// Runs per mode and size (interleaved vxmesh / ip -batch pairs);
        /// each figure is the median, the speedup the median of the pairs.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long)]
        json: bool,
    },
    /// iperf3 container-to-container across hosts vs host-to-host on the
    /// underlay (TCP 1 and 4 streams, UDP at a fixed rate), per mode.
    Throughput {
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "routed,bridged"
        )]
        mode: Vec<ModeArg>,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Runs per case and path, interleaved (medians are reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// UDP offered rate (iperf3 -b syntax).
        #[arg(long, default_value = "1G")]
        udp_rate: String,
        #[arg(long)]
        json: bool,
    },
    /// etcd lab of N hosts: join (agent start -> all pairs reachable) and
    /// crash (kill -9 -> peers clean) times.
    Converge {
        /// Lab sizes (hosts before each join).
        #[arg(long, value_delimiter = ',', default_value = "5,20")]
        nodes: Vec<usize>,
        /// Joins (each followed by a crash of the joined host) per size.
        #[arg(long, default_value_t = 5)]
        joins: usize,
        #[arg(long, value_enum, default_value = "routed")]
        mode: ModeArg,
        /// Lease TTL of the agents, seconds.
        #[arg(long, default_value_t = 3)]
        ttl: u64,
        #[arg(long)]
        json: bool,
    },
    /// CNI ADD+DEL latency: the vxmesh plugin vs bridge + host-local.
    Cni {
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        #[arg(long)]
        json: bool,
    },
    /// RSS and CPU of an idle agent holding P peers (vs one holding none).
    Footprint {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Seconds of idle sampling after convergence.
        #[arg(long, default_value_t = 20.0)]
        idle: f64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// The cluster file (static store). Give this or --store.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
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
    #[command(flatten)]
    etcd: EtcdArgs,
    /// etcd store: network(s) to join (repeat the option or separate by commas).
    #[arg(long = "network", value_name = "NAME", value_delimiter = ',')]
    networks: Vec<String>,
    /// etcd store: this node's underlay address (VXLAN source; peers send to it).
    #[arg(long, value_name = "IP")]
    underlay_ip: Option<Ipv4Addr>,
    /// etcd store: the underlay device (default: the one holding --underlay-ip).
    #[arg(long, value_name = "DEV")]
    underlay_dev: Option<String>,
    /// etcd store: lease TTL in seconds; peers drop a crashed node after this long.
    #[arg(long, value_name = "SECS")]
    ttl: Option<u64>,
    /// etcd store: on SIGTERM/SIGINT leave the network(s) (revoke the lease:
    /// peers drop this node at once) instead of keeping the records for a restart.
    #[arg(long)]
    leave: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 10.0.0.1:9472).
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<String>,
}

/// Where the etcd store is and how to log in.
#[derive(Args, Debug, Clone)]
struct EtcdArgs {
    /// The etcd store: etcd://HOST:2379[,HOST2:2379] (TLS when --etcd-ca is given).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Key prefix in etcd.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// CA certificate of the etcd servers (PEM): connect with TLS.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), when etcd requires client certificates.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user, when etcd has authentication enabled.
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    fn given(&self) -> bool {
        self.store.is_some()
            || self.prefix.is_some()
            || self.etcd_ca.is_some()
            || self.etcd_cert.is_some()
            || self.etcd_key.is_some()
            || self.etcd_user.is_some()
            || self.etcd_password_file.is_some()
    }

    fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| etcd::DEFAULT_PREFIX.to_string())
    }

    /// Client options; the TLS and password files are checked now, so that
    /// a typo fails at once rather than in the agent's retry loop.
    fn client(&self) -> Result<etcd::ClientOptions> {
        let url = self
            .store
            .as_deref()
            .context("--store etcd://HOST:2379 is required")?;
        if self.etcd_cert.is_some() && self.etcd_ca.is_none() {
            anyhow::bail!(
                "--etcd-cert needs --etcd-ca (the CA that signed the etcd server certificate)"
            );
        }
        let endpoints = etcd::parse_store_url(url, self.etcd_ca.is_some())?;
        for f in [&self.etcd_ca, &self.etcd_cert, &self.etcd_key]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).with_context(|| format!("TLS file {}", f.display()))?;
        }
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(f)) => Some((u.clone(), etcd::read_password(f)?)),
            _ => None,
        };
        Ok(etcd::ClientOptions {
            endpoints,
            tls: self.etcd_ca.as_ref().map(|ca| etcd::TlsOptions {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            }),
            user,
        })
    }
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
    /// Where node records live: one cluster file (static), or an etcd server
    /// inside the lab's underlay namespace (etcd: hosts can join and leave).
    #[arg(long, value_enum, default_value = "static")]
    store: StoreArg,
    /// etcd store: the agents' lease TTL in seconds.
    #[arg(long, default_value_t = lab::LAB_TTL.as_secs())]
    ttl: u64,
    /// Each agent serves metrics on its underlay address at this port
    /// (scrape from inside the host: `vxmesh lab exec LAB hostN -- curl ...`).
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreArg {
    Static,
    Etcd,
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
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
    s.store = match a.store {
        StoreArg::Static => lab::LabStore::Static,
        StoreArg::Etcd => lab::LabStore::Etcd,
    };
    s.ttl = Duration::from_secs(a.ttl);
    s.metrics_port = a.metrics_port;
    s.exe = std::env::current_exe().context("locate the vxmesh binary")?;
    Ok(s)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Agent(a) => agent(a).await?,
        Cmd::Net(n) => net_cmd(n).await?,
        Cmd::Leave {
            etcd: e,
            networks,
            node,
            state_dir,
        } => leave(&e, &networks, &node, &state_dir).await?,
        Cmd::Down { state_dir } => {
            let nl = vxmesh::dataplane::kernel::Netlink::connect().await?;
            let report = nl.teardown().await?;
            for n in vxmesh::state::list_networks(&state_dir) {
                vxmesh::state::remove_network(&state_dir, &n)?;
            }
            let _ = std::fs::remove_file(state_dir.join(vxmesh::status::PLAN_FILE));
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
        Cmd::Status { state_dir, json } => {
            let r = vxmesh::status::status(&state_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", vxmesh::status::render(&r));
            }
        }
        Cmd::Doctor {
            state_dir,
            to,
            no_ping,
            json,
        } => {
            let opts = vxmesh::doctor::DoctorOptions { to, ping: !no_ping };
            let r = vxmesh::doctor::doctor(&state_dir, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", vxmesh::doctor::render(&r));
            }
            if !r.ok {
                return Ok(ExitCode::from(2));
            }
        }
        Cmd::Validate { cluster } => {
            let c = config::load(&cluster)?;
            println!(
                "{}: {} network(s), {} node(s)",
                cluster.display(),
                c.networks.len(),
                c.nodes.len()
            );
            for n in &c.nodes {
                let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("  {} {} {}", n.name, n.underlay_ip, subs.join(" "));
            }
        }
        Cmd::Plan {
            cluster,
            node,
            underlay_mtu,
        } => {
            let c = config::load(&cluster)?;
            let p = vxmesh::dataplane::plan::plan(&vxmesh::dataplane::plan::PlanInput {
                cluster: &c,
                node: &node,
                endpoints: None,
                underlay_mtu,
            })?;
            println!("{}", serde_json::to_string_pretty(&p)?);
        }
        Cmd::Attach {
            network,
            container_netns,
            id,
            ifname,
            ip,
            state_dir,
        } => {
            let ns = if container_netns.contains('/') {
                Netns::open_path(std::path::Path::new(&container_netns))?
            } else {
                Netns::open(&container_netns)?
            };
            let id = id.unwrap_or_else(|| {
                container_netns
                    .rsplit('/')
                    .next()
                    .unwrap_or(&container_netns)
                    .to_string()
            });
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
        Cmd::Detach {
            network,
            id,
            ifname,
            state_dir,
        } => match vxmesh::attach::detach(&state_dir, &network, &id, &ifname, None).await? {
            Some(ip) => println!("detached {id} ({ip})"),
            None => println!("{id} was not attached"),
        },
        Cmd::Lab(l) => return lab_cmd(l).await,
        Cmd::Bench(b) => bench_cmd(b).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench_cmd(b: BenchCmd) -> Result<()> {
    use vxmesh_lab::bench::{self, cni, converge, footprint, throughput};
    let exe = std::env::current_exe().context("the path of this vxmesh binary")?;
    match b {
        BenchCmd::Scale {
            peers,
            mode,
            repeat,
            json,
        } => {
            if !(1..=50).contains(&repeat) {
                anyhow::bail!("--repeat must be 1..=50 (got {repeat})");
            }
            let mut rows = Vec::new();
            for m in mode {
                for &p in &peers {
                    if p == 0 || p > 60_000 {
                        anyhow::bail!("--peers values must be 1..=60000 (got {p})");
                    }
                    let mut runs = Vec::new();
                    for _ in 0..repeat {
                        let run = bench::scale_one(m.into(), p).await?;
                        if !json {
                            eprintln!(
                                "{} {p} peers: vxmesh {:.1} ms, ip -batch {:.1} ms ({:.1}x)",
                                run.mode, run.vxmesh_ms, run.ip_batch_ms, run.speedup
                            );
                        }
                        runs.push(run);
                    }
                    rows.push(bench::scale::combine(&runs));
                }
            }
            bench::print(json, &rows, &bench::scale_table(&rows))
        }
        BenchCmd::Throughput {
            mode,
            seconds,
            repeat,
            udp_rate,
            json,
        } => {
            let rows = throughput::run(&throughput::ThroughputOptions {
                modes: mode.into_iter().map(Mode::from).collect(),
                seconds,
                repeat,
                udp_rate,
                exe,
            })
            .await?;
            bench::print(json, &rows, &throughput::table(&rows))
        }
        BenchCmd::Converge {
            nodes,
            joins,
            mode,
            ttl,
            json,
        } => {
            let rows = converge::run(&converge::ConvergeOptions {
                nodes,
                joins,
                mode: mode.into(),
                ttl_secs: ttl,
                exe,
            })
            .await?;
            bench::print(json, &rows, &converge::table(&rows))
        }
        BenchCmd::Cni { iterations, json } => {
            let r = cni::run(&cni::CniOptions { iterations, exe }).await?;
            bench::print(json, &r, &cni::table(&r))
        }
        BenchCmd::Footprint { peers, idle, json } => {
            if !(idle.is_finite() && idle > 0.0 && idle < 86400.0) {
                anyhow::bail!("--idle must be between 0 and 86400 seconds");
            }
            let r = footprint::run(&footprint::FootprintOptions {
                peers,
                idle: Duration::from_secs_f64(idle),
                exe,
            })
            .await?;
            bench::print(json, &r, &footprint::table(&r))
        }
    }
}

async fn agent(a: AgentArgs) -> Result<()> {
    if !(a.resync > 0.0 && a.resync < 86400.0) {
        anyhow::bail!("--resync must be between 0 and 86400 seconds");
    }
    let metrics = vxmesh::metrics::Metrics::new();
    // Listen before anything is applied: a bad --metrics fails at once.
    let _metrics_server = match &a.metrics {
        Some(addr) => {
            let listener = vxmesh::metrics::bind(addr).await?;
            Some(vxmesh::metrics::serve(listener, metrics.clone()))
        }
        None => None,
    };
    let opts = vxmesh::agent::AgentOptions {
        node: a.node.clone(),
        state_dir: a.state_dir.clone(),
        resync: Duration::from_secs_f64(a.resync),
        once: a.once,
        metrics: metrics.clone(),
    };
    let etcd_only = a.etcd.given()
        || !a.networks.is_empty()
        || a.underlay_ip.is_some()
        || a.underlay_dev.is_some()
        || a.ttl.is_some()
        || a.leave;
    match (&a.cluster, &a.etcd.store) {
        (Some(_), Some(_)) => {
            anyhow::bail!("--cluster and --store name two different stores: give exactly one")
        }
        (None, None) => anyhow::bail!(
            "no store given: use --cluster FILE (static store) or --store etcd://HOST:2379 --network NAME --underlay-ip IP (etcd store)"
        ),
        (Some(file), None) => {
            if etcd_only {
                anyhow::bail!(
                    "--network, --underlay-ip, --underlay-dev, --ttl, --leave, --prefix and --etcd-* belong to the etcd store (--store): with --cluster the cluster file says it all"
                );
            }
            let mut store = vxmesh::store::static_file::StaticFile::open(file)?;
            // Fail fast on a bad file or node before touching anything.
            let cluster = config::load(file)?;
            if cluster.node(&a.node).is_none() {
                anyhow::bail!(
                    "node '{}' is not in {} (known: {}): check --node",
                    a.node,
                    file.display(),
                    cluster
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            vxmesh::agent::run(&mut store, &opts).await
        }
        (None, Some(_)) => {
            let client = a.etcd.client()?;
            if a.networks.is_empty() {
                anyhow::bail!(
                    "--store needs --network NAME: the network(s) to join (create them with `vxmesh net create`)"
                );
            }
            let ip = a
                .underlay_ip
                .context("--store needs --underlay-ip IP: this node's address on the underlay")?;
            let mut o = etcd::EtcdOptions::new(client.endpoints, &a.networks[0], &a.node, ip);
            o.prefix = a.etcd.prefix();
            o.underlay_dev = a.underlay_dev.clone();
            o.ttl = a.ttl.map_or(etcd::DEFAULT_TTL, Duration::from_secs);
            o.tls = client.tls;
            o.user = client.user;
            o.metrics = metrics.clone();
            o.validate()?;
            let (networks, pw) = (a.networks.clone(), a.etcd.etcd_password_file.clone());
            let store = vxmesh::agent::join_and_run(&opts, || {
                etcd::EtcdNetworks::join(&o, &networks, pw.clone())
            })
            .await?;
            if a.leave
                && let Some(store) = store
            {
                store.leave().await?;
                tracing::info!(node = %a.node, "left the network(s): records removed");
            }
            Ok(())
        }
    }
}

async fn net_cmd(cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            etcd: e,
            cidr,
            mode,
            vni,
            subnet_len,
            port,
            mtu,
        } => {
            let mode: Mode = mode.into();
            let file = config::NetworkFile {
                name,
                mode,
                cidr,
                subnet_len: subnet_len.unwrap_or(if mode == Mode::Bridged { 28 } else { 24 }),
                vni,
                port,
                mtu,
            };
            let net = etcd::validate_network(&file)?;
            etcd::create_network(&e.client()?, &e.prefix(), &net).await?;
            println!(
                "network {} ({}, cidr {}, /{} per node, VNI {}) is in etcd",
                net.name, net.mode, net.cidr, net.subnet_len, net.vni
            );
        }
        NetCmd::Show { name, etcd: e } => {
            match etcd::get_network(&e.client()?, &e.prefix(), &name).await? {
                Some(n) => println!("{}", serde_json::to_string_pretty(&n)?),
                None => anyhow::bail!("network {name} does not exist in etcd"),
            }
        }
        NetCmd::Delete { name, etcd: e } => {
            etcd::delete_network(&e.client()?, &e.prefix(), &name).await?;
            println!("network {name} deleted");
        }
    }
    Ok(())
}

async fn leave(
    e: &EtcdArgs,
    networks: &[String],
    node: &str,
    state_dir: &std::path::Path,
) -> Result<()> {
    let client = e.client()?;
    // A running agent would re-grant its lease and publish everything again.
    if vxmesh::state::agent_running(state_dir)
        && vxmesh::state::list_networks(state_dir)
            .iter()
            .any(|n| vxmesh::state::read_network(state_dir, n).is_ok_and(|s| s.node == node))
    {
        anyhow::bail!(
            "the agent of node {node} is running here (state dir {}): stop it first, or run it with --leave",
            state_dir.display()
        );
    }
    for net in networks {
        if etcd::leave_node(&client, &e.prefix(), net, node).await? {
            println!("node {node} left network {net}");
        } else {
            println!("node {node} has no record in network {net} (already gone)");
        }
    }
    Ok(())
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
        LabCmd::AddNode { name } => {
            let mut lab = Lab::load(&name)?;
            let node = lab.add_node().await?;
            println!("{node} joined lab {name}:");
            print_info(&lab.info);
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
        LabCmd::Demo { name, spec } => return demo(&name, &spec).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(info: &lab::LabInfo) {
    println!(
        "lab {} ({} mode), underlay namespace {}",
        info.name, info.mode, info.underlay_ns
    );
    if let Some(e) = &info.etcd {
        let pid = e.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  etcd     {} (in {}), pid {pid}, lease TTL {} s",
            e.store, info.underlay_ns, e.ttl_secs
        );
    }
    if let Some(port) = info.metrics_port {
        println!("  metrics  http://UNDERLAY_IP:{port}/metrics (inside each host's namespace)");
    }
    for n in &info.nodes {
        let subs: Vec<String> = n.subnets.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "  {:8} netns {:22} underlay {:12} {}  agent pid {}",
            n.name,
            n.netns,
            n.underlay_ip.to_string(),
            subs.join(", "),
            n.agent_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    for c in &info.containers {
        println!(
            "    {:14} on {:8} {:6} {:14} netns {}",
            c.name,
            c.node,
            c.network,
            c.ip.to_string(),
            c.netns
        );
    }
}

async fn demo(name: &str, a: &LabUpArgs) -> Result<ExitCode> {
    let spec = spec_from(name, a)?;
    println!(
        "== vxmesh lab demo: {} hosts, {} container(s) per host{}, {} mode, {} store",
        spec.nodes,
        spec.containers,
        if spec.mode == Mode::Bridged {
            format!(" per network, {} networks", spec.networks)
        } else {
            String::new()
        },
        spec.mode,
        if spec.store == lab::LabStore::Etcd {
            "etcd"
        } else {
            "static"
        }
    );
    let t0 = std::time::Instant::now();
    let lab = LabGuard(Lab::up(&spec).await?);
    println!("-- built in {:.1?}:", t0.elapsed());
    print_info(&lab.info);
    let t1 = std::time::Instant::now();
    let report = lab.check(Duration::from_secs(2))?;
    println!(
        "\n-- connectivity ({} probes in {:.1?}; ok = reached, iso = isolated as it must be):",
        report.results.len(),
        t1.elapsed()
    );
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
