//! `vxmesh bench`: the measured benchmarks of the lab crate, their figures
//! printed as a table or JSON.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use vxmesh::config::Mode;
use vxmesh_lab::bench::{self, cni, coldstart, converge, docker, faults, footprint, throughput};

use super::ModeArg;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
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
    /// iperf3 between two hosts over four paths side by side: host to host
    /// on the underlay, container to container over the seed's overlay wired
    /// by hand with `ip`, over vxmesh plain and over vxmesh encrypted (TCP 1
    /// and 4 streams, UDP at a fixed rate), per mode; client and server
    /// pinned to different CPUs; ratios against issue 16's targets and CPU
    /// seconds per Gbit.
    Throughput {
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "routed,bridged"
        )]
        mode: Vec<ModeArg>,
        /// Paths to compare (ratios are reported between the measured ones;
        /// the tcp-1-nft row comes with `plain`).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "underlay,hand-wired,plain,encrypted"
        )]
        paths: Vec<PathArg>,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Rounds per case: each runs every path once, the first path
        /// rotating (medians and per-round pair ratios are reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// UDP offered rate (iperf3 -b syntax).
        #[arg(long, default_value = "1G")]
        udp_rate: String,
        #[arg(long)]
        json: bool,
    },
    /// etcd lab of N hosts: join (agent start -> all pairs reachable) and
    /// crash (kill -9 -> peers clean) times; with --cold-start, N agents
    /// started at once on an empty store instead.
    Converge {
        /// Lab sizes (hosts before each join; with --cold-start, hosts
        /// started at once, e.g. 50,100,250).
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
        /// Cold start (routed): every agent of the lab started at once; per
        /// size the join time p50/p99, the time until every agent knows
        /// every peer and until every container pair is reachable, etcd
        /// requests and watch events per join, and agent memory.
        #[arg(long, conflicts_with_all = ["joins", "mode"])]
        cold_start: bool,
        #[arg(long)]
        json: bool,
    },
    /// etcd lab under rounds of faults (agents joining at once, a host
    /// partitioned from etcd, the leader killed, the leader paused, a
    /// snapshot rollback) with the invariant checker running throughout:
    /// the heavy variant of the etcd_faults tests.
    Faults {
        /// Hosts before the first round.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Agents joining at once, per round.
        #[arg(long, default_value_t = 20)]
        join: usize,
        #[arg(long, default_value_t = 3)]
        etcd_members: usize,
        /// Lease TTL of the agents, seconds.
        #[arg(long, default_value_t = 2)]
        ttl: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
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
    /// `docker run --rm` on a vxmesh network vs on Docker's own bridge
    /// network, interleaved on one lab host's dockerd (medians).
    Docker {
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        #[arg(long, value_enum, default_value = "routed")]
        mode: ModeArg,
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

/// A path of `bench throughput --paths`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PathArg {
    Underlay,
    HandWired,
    Plain,
    Encrypted,
}

impl PathArg {
    fn kind(self) -> throughput::PathKind {
        match self {
            PathArg::Underlay => throughput::PathKind::Underlay,
            PathArg::HandWired => throughput::PathKind::HandWired,
            PathArg::Plain => throughput::PathKind::Plain,
            PathArg::Encrypted => throughput::PathKind::Encrypted,
        }
    }
}

fn modes(m: Vec<ModeArg>) -> Vec<Mode> {
    m.into_iter().map(Mode::from).collect()
}

pub async fn run(b: BenchCmd) -> Result<()> {
    let exe = std::env::current_exe().context("the path of this vxmesh binary")?;
    match b {
        BenchCmd::Scale {
            peers,
            mode,
            repeat,
            json,
        } => {
            let rows = bench::scale_series(&modes(mode), &peers, repeat, |run| {
                if !json {
                    eprintln!(
                        "{} {} peers: vxmesh {:.1} ms, ip -batch {:.1} ms ({:.1}x)",
                        run.mode, run.peers, run.vxmesh_ms, run.ip_batch_ms, run.speedup
                    );
                }
            })
            .await?;
            bench::print(json, &rows, &bench::scale_table(&rows))
        }
        BenchCmd::Throughput {
            mode,
            paths,
            seconds,
            repeat,
            udp_rate,
            json,
        } => {
            let rows = throughput::run(&throughput::ThroughputOptions {
                modes: modes(mode),
                paths: paths.into_iter().map(PathArg::kind).collect(),
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
            ttl,
            cold_start: true,
            json,
            ..
        } => {
            let rows = coldstart::run(&coldstart::ColdStartOptions {
                nodes,
                ttl_secs: ttl,
                exe,
            })
            .await?;
            bench::print(json, &rows, &coldstart::table(&rows))
        }
        BenchCmd::Converge {
            nodes,
            joins,
            mode,
            ttl,
            json,
            ..
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
        BenchCmd::Faults {
            nodes,
            join,
            etcd_members,
            ttl,
            rounds,
            json,
        } => {
            let rows = faults::run(&faults::FaultBenchOptions {
                nodes,
                join,
                etcd_members,
                ttl_secs: ttl,
                rounds,
                exe,
            })
            .await?;
            bench::print(json, &rows, &faults::table(&rows))
        }
        BenchCmd::Docker {
            iterations,
            mode,
            json,
        } => {
            let r = docker::run(&docker::DockerOptions {
                iterations,
                mode: mode.into(),
                exe,
            })
            .await?;
            bench::print(json, &r, &docker::table(&r))
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
