//! `vxmesh bench footprint`: memory and CPU of an idle agent holding P peers,
//! side by side with an agent holding none.
//!
//! Each agent runs as a process in a namespace of its own (an underlay veth
//! `eth0` at 198.18.0.1 whose peer stays inside) on a static cluster file of
//! P + 1 routed nodes; the peers' underlay addresses (198.19.0.0/16) are only
//! programmed, never contacted. Once its kernel holds every peer's route, FDB
//! entry and neighbour, both agents are sampled over the same idle window:
//! VmRSS from /proc/PID/status (peak and end), utime+stime from
//! /proc/PID/stat. The agents keep their default resync (a full pass every
//! 5 s), so the idle CPU includes those passes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::Serialize;

use super::cpu::pid_jiffies;
use super::{Reaped, Table, TempDir, ratio, scale::peer_ip};
use vxmesh::config::{ClusterFile, Mode, NetworkFile, NodeFile};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::NetnsGuard;

const CONVERGE_LIMIT: Duration = Duration::from_secs(120);
pub const RSS_TARGET_MIB: f64 = 20.0;
pub const CPU_TARGET_PCT: f64 = 1.0;

pub struct FootprintOptions {
    pub peers: usize,
    pub idle: Duration,
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentFootprint {
    pub peers: usize,
    /// Agent start -> its kernel holds every peer.
    pub converge_ms: f64,
    /// VmRSS at the end of the idle window.
    pub rss_mib: f64,
    /// Highest VmRSS sampled in the idle window.
    pub rss_max_mib: f64,
    /// VmHWM: peak RSS since start (convergence included).
    pub rss_peak_mib: f64,
    /// utime+stime over the idle window / its length, in % of one core.
    pub cpu_pct: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FootprintReport {
    pub idle_secs: f64,
    pub loaded: AgentFootprint,
    pub baseline: AgentFootprint,
    /// RSS of the loaded agent / RSS of the one without peers.
    pub rss_ratio: f64,
    /// (loaded - baseline) RSS per peer, KiB.
    pub kib_per_peer: f64,
    pub rss_target_met: bool,
    pub cpu_target_met: bool,
}

fn cluster(peers: usize) -> ClusterFile {
    let nodes = (0..=peers)
        .map(|i| NodeFile {
            name: format!("n{i}"),
            underlay_ip: if i == 0 {
                "198.18.0.1".to_string()
            } else {
                peer_ip(i).to_string()
            },
            underlay_dev: Some("eth0".into()),
            subnet: None,
            subnets: Default::default(),
            public_key: None,
            next_public_key: None,
        })
        .collect();
    ClusterFile {
        networks: vec![NetworkFile {
            outbound_nat: true,
            name: "bench".into(),
            mode: Mode::Routed,
            cidr: "10.0.0.0/8".into(),
            subnet_len: 24,
            vni: 100,
            port: 4789,
            mtu: None,
            gateway: None,
            encrypt: false,
        }],
        nodes,
        encryption: None,
    }
}

/// A running agent and everything it needs; all removed when dropped
/// (process first, then namespace and files).
struct Agent {
    peers: usize,
    nl: Netlink,
    child: Reaped,
    started: Instant,
    _ns: NetnsGuard,
    dir: TempDir,
}

async fn start(exe: &PathBuf, peers: usize) -> Result<Agent> {
    let tag = format!("fp{peers}");
    let dir = TempDir::new(&tag)?;
    let ns = NetnsGuard::create(&format!("vxm-bench-{}-{tag}", std::process::id()))?;
    let nl = Netlink::connect_in(&ns.open()?).await?;
    nl.create_veth("eth0", "eth0p", None, 1500).await?;
    for d in ["eth0", "eth0p"] {
        let up = LinkOptions {
            up: Some(true),
            ..Default::default()
        };
        nl.set_link(d, up).await?;
    }
    nl.add_address("eth0", Ipv4Net::new([198, 18, 0, 1].into(), 24)?)
        .await?;
    let file = dir.path().join("cluster.toml");
    std::fs::write(&file, toml::to_string(&cluster(peers))?)?;
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--netns")
        .arg(&ns.name)
        .args(["agent", "--node", "n0", "--cluster"])
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = Instant::now();
    let child = Reaped(
        cmd.spawn()
            .with_context(|| format!("start agent {}", exe.display()))?,
    );
    Ok(Agent {
        peers,
        nl,
        child,
        started,
        _ns: ns,
        dir,
    })
}

impl Agent {
    /// Wait until the kernel holds a route, neighbour and FDB entry per peer.
    async fn converged(&mut self) -> Result<Duration> {
        loop {
            let a = self.nl.dump().await?;
            let p = self.peers;
            if a.routes.len() >= p && a.neighbours.len() >= p && a.fdb.len() >= p && a.ip_forward {
                return Ok(self.started.elapsed());
            }
            if let Some(st) = self.child.0.try_wait()? {
                let log =
                    std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
                bail!("the agent with {p} peers exited with {st}; its log:\n{log}");
            }
            if self.started.elapsed() > CONVERGE_LIMIT {
                bail!(
                    "the agent with {p} peers did not converge within {CONVERGE_LIMIT:?} \
                     ({} routes, {} neighbours, {} FDB entries)",
                    a.routes.len(),
                    a.neighbours.len(),
                    a.fdb.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

pub async fn run(o: &FootprintOptions) -> Result<FootprintReport> {
    if o.peers == 0 || o.peers > 60_000 {
        bail!("--peers must be 1..=60000 (got {})", o.peers);
    }
    if o.idle < Duration::from_secs(1) {
        bail!("--idle must be at least 1 second");
    }
    let mut agents = [start(&o.exe, o.peers).await?, start(&o.exe, 0).await?];
    let mut conv = [Duration::ZERO; 2];
    for (i, a) in agents.iter_mut().enumerate() {
        conv[i] = a.converged().await?;
    }
    // Let the start-up work (first passes, inotify set-up) finish first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SAFETY: sysconf only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let pids = agents.each_ref().map(|a| a.pid());
    let t0 = Instant::now();
    let ticks0 = [pid_jiffies(pids[0], false)?, pid_jiffies(pids[1], false)?];
    let mut max_rss = [0u64; 2];
    while t0.elapsed() < o.idle {
        for (i, &pid) in pids.iter().enumerate() {
            max_rss[i] = max_rss[i].max(rss_kib(pid)?.0);
        }
        let left = o.idle.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(500))).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (i, &pid) in pids.iter().enumerate() {
        let ticks = pid_jiffies(pid, false)? - ticks0[i];
        let (rss, hwm) = rss_kib(pid)?;
        let mib = |k: u64| k as f64 / 1024.0;
        out.push(AgentFootprint {
            peers: agents[i].peers,
            converge_ms: super::ms(conv[i]),
            rss_mib: mib(rss),
            rss_max_mib: mib(max_rss[i].max(rss)),
            rss_peak_mib: mib(hwm),
            cpu_pct: ticks as f64 / tick / secs * 100.0,
        });
    }
    drop(agents);
    let (loaded, baseline) = (out[0].clone(), out[1].clone());
    Ok(FootprintReport {
        idle_secs: secs,
        rss_ratio: ratio(loaded.rss_mib, baseline.rss_mib),
        kib_per_peer: (loaded.rss_mib - baseline.rss_mib) * 1024.0 / o.peers as f64,
        rss_target_met: loaded.rss_max_mib < RSS_TARGET_MIB,
        cpu_target_met: loaded.cpu_pct < CPU_TARGET_PCT,
        loaded,
        baseline,
    })
}

pub fn table(r: &FootprintReport) -> Table {
    let mut t = Table::new(&[
        "agent",
        "peers",
        "converge ms",
        "RSS MiB",
        "RSS max MiB",
        "peak (VmHWM) MiB",
        "idle CPU %",
    ]);
    for (label, a) in [("loaded", &r.loaded), ("baseline", &r.baseline)] {
        t.row(vec![
            label.to_string(),
            a.peers.to_string(),
            format!("{:.0}", a.converge_ms),
            format!("{:.1}", a.rss_mib),
            format!("{:.1}", a.rss_max_mib),
            format!("{:.1}", a.rss_peak_mib),
            format!("{:.2}", a.cpu_pct),
        ]);
    }
    t.note(format!(
            "RSS ratio {:.2}, {:.1} KiB/peer over {:.0} s idle; targets: RSS < {RSS_TARGET_MIB} MiB {}, CPU < {CPU_TARGET_PCT} % {}",
            r.rss_ratio,
            r.kib_per_peer,
            r.idle_secs,
            if r.rss_target_met { "met" } else { "MISSED" },
            if r.cpu_target_met { "met" } else { "MISSED" },
    ));
    t
}
