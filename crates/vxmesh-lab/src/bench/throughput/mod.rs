//! `vxmesh bench throughput`: iperf3 between two hosts over four paths side
//! by side, interleaved in one run per mode: host to host on the lab's
//! underlay, container to container over the seed's overlay recipe wired by
//! hand with `ip` ([`handwired`]), over a vxmesh network, and over a vxmesh
//! network with `encrypt = true` (VXLAN over userspace WireGuard).
//!
//! Cases: TCP one stream, TCP four streams (`-P 4`), and UDP at a fixed
//! offered rate (default 1 Gbit/s) with a fixed datagram size (1350 bytes,
//! so no path fragments): the figures are the rate that arrived at the
//! server and the loss. The iperf3 client and server are pinned to two
//! different CPUs; the machine's busy CPU time and the agents' CPU time are
//! sampled around each run and reported per Gbit carried ([`report`]).
//!
//! A last row per mode, `tcp-1-nft`, compares vxmesh plain with its
//! nftables table (VTEP filter and outbound NAT on) against the same overlay
//! with the table as a network without outbound NAT has it (no NAT chain,
//! so no connection tracking) and with no table, the agents paused
//! meanwhile, and all against the hand-wired path (which has no table).

mod handwired;
mod iperf;
pub mod report;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{Table, ensure_tool};
use crate::lab::{Lab, LabGuard, LabSpec};
use handwired::HandWired;
pub use iperf::{IPERF3, UDP_LEN};
pub use report::{PathKind, ThroughputRow};
use report::{Run, path_figures, ratio_figure};
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;

pub struct ThroughputOptions {
    pub modes: Vec<Mode>,
    /// The compared paths (at least one); ratios are reported between the
    /// measured ones.
    pub paths: Vec<PathKind>,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Rounds per case: each runs every path once, the first path rotating
    /// (medians and per-round pair ratios are reported).
    pub repeat: usize,
    /// UDP offered rate, iperf3 syntax (e.g. "1G", "500M").
    pub udp_rate: String,
    /// The vxmesh binary for the lab agents.
    pub exe: PathBuf,
}

/// Everything one `bench throughput` measured.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputReport {
    /// The CPUs the iperf3 client and server were pinned to (none on a
    /// single-CPU machine).
    pub client_cpu: Option<usize>,
    pub server_cpu: Option<usize>,
    /// /proc/loadavg before and after.
    pub load_before: String,
    pub load_after: String,
    pub rows: Vec<ThroughputRow>,
    /// The encrypted labs' agent threads that ran during the bench (the
    /// WireGuard data path among them): where they may run and their CPU time.
    pub agent_threads: Vec<AgentThread>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentThread {
    pub mode: String,
    pub host: String,
    pub name: String,
    pub cpu_s: f64,
    /// `Cpus_allowed_list` of the thread (not pinned: every CPU).
    pub cpus_allowed: String,
}

#[derive(Clone, Copy)]
pub(crate) enum Case {
    Tcp(u32),
    Udp,
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Tcp(p) => format!("tcp-{p}"),
            Case::Udp => "udp".into(),
        }
    }
}

/// One side of a measurement: client namespace, server namespace and
/// address, and the vxmesh agents serving the path (their CPU is sampled).
pub(crate) struct Leg {
    client_ns: String,
    server_ns: String,
    server_ip: Ipv4Addr,
    agents: Vec<u32>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn lab(mode: Mode, tag: &str, encrypt: bool, exe: &std::path::Path) -> Result<LabGuard> {
    let mut spec = LabSpec::new(&super::lab_name(tag), 2, 1);
    spec.mode = mode;
    spec.exe = exe.to_path_buf();
    spec.encrypt = encrypt;
    let what = if encrypt { "encrypted" } else { "plain" };
    Ok(LabGuard(Lab::up(&spec).await.with_context(|| {
        format!("throughput lab ({what}, {mode})")
    })?))
}

fn container_leg(lab: &Lab) -> Result<Leg> {
    let (c1, c2) = (lab.container_on("host1")?, lab.container_on("host2")?);
    Ok(Leg {
        client_ns: c1.netns.clone(),
        server_ns: c2.netns.clone(),
        server_ip: c2.ip,
        agents: lab.info.nodes.iter().filter_map(|n| n.agent_pid).collect(),
    })
}

pub async fn run(o: &ThroughputOptions) -> Result<ThroughputReport> {
    ensure_tool(IPERF3, "iperf3")?;
    if o.seconds == 0 || o.repeat == 0 {
        bail!("--seconds and --repeat must be at least 1");
    }
    if o.paths.is_empty() {
        bail!("--paths names no path: give some of underlay,hand-wired,plain,encrypted");
    }
    let want = |p: PathKind| o.paths.contains(&p);
    let pins = iperf::pinning();
    let load_before = loadavg();
    let (mut rows, mut threads) = (Vec::new(), Vec::new());
    for &mode in &o.modes {
        // The plain lab carries the underlay, plain and tcp-1-nft paths.
        let plain = if want(PathKind::Underlay) || want(PathKind::Plain) {
            Some(lab(mode, "t", false, &o.exe).await?)
        } else {
            None
        };
        let encrypted = if want(PathKind::Encrypted) {
            Some(lab(mode, "w", true, &o.exe).await?)
        } else {
            None
        };
        let hand = if want(PathKind::HandWired) {
            Some(HandWired::build(mode, &super::lab_name("h"))?)
        } else {
            None
        };
        let mut legs: Vec<(PathKind, Leg)> = Vec::new();
        for p in PathKind::ALL.into_iter().filter(|p| want(*p)) {
            let leg = match p {
                PathKind::Underlay => {
                    let lab = plain.as_ref().expect("plain lab");
                    let (h1, h2) = (lab.node("host1")?, lab.node("host2")?);
                    Leg {
                        client_ns: h1.netns.clone(),
                        server_ns: h2.netns.clone(),
                        server_ip: h2.underlay_ip,
                        agents: Vec::new(),
                    }
                }
                PathKind::HandWired => hand.as_ref().expect("hand-wired").leg(),
                PathKind::Plain => container_leg(plain.as_ref().expect("plain lab"))?,
                PathKind::Encrypted => container_leg(encrypted.as_ref().expect("encrypted lab"))?,
            };
            legs.push((p, leg));
        }
        if let Some(h) = &hand {
            tracing::debug!("hand-wired VTEP: {}", h.describe_vtep());
        }
        let names: Vec<&str> = legs.iter().map(|(p, _)| p.name()).collect();
        for case in [Case::Tcp(1), Case::Tcp(4), Case::Udp] {
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); legs.len()];
            for i in 0..o.repeat {
                // Rotate which path goes first, so a drift in the machine's
                // load favours none.
                for k in 0..legs.len() {
                    let j = (i + k) % legs.len();
                    runs[j].push(iperf::iperf(&legs[j].1, case, o).await?);
                }
            }
            let row = report::build_row(&mode.to_string(), &case.name(), &names, &runs);
            for r in &row.ratios {
                tracing::info!("throughput {mode} {}: {} {:.3}", row.case, r.name, r.value);
            }
            rows.push(row);
        }
        if let (true, Some(lab)) = (want(PathKind::Plain), &plain) {
            let leg = container_leg(lab)?;
            let hand_leg = hand.as_ref().map(HandWired::leg);
            rows.push(firewall_row(lab, mode, &leg, hand_leg.as_ref(), o).await?);
        }
        if let Some(lab) = &encrypted {
            threads.extend(agent_threads(lab, mode));
        }
        drop(hand);
        drop(encrypted);
        drop(plain);
    }
    Ok(ThroughputReport {
        client_cpu: pins.map(|p| p.0),
        server_cpu: pins.map(|p| p.1),
        load_before,
        load_after: loadavg(),
        rows,
        agent_threads: threads,
    })
}

/// The threads of `lab`'s agents: the WireGuard data path's (`vxm-wg-*`)
/// and any other that used at least 0.1 s of CPU.
fn agent_threads(lab: &Lab, mode: Mode) -> Vec<AgentThread> {
    let tick = crate::bench::cpu::clock_tick();
    let mut out = Vec::new();
    for n in &lab.info.nodes {
        let Some(pid) = n.agent_pid else { continue };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let dir = t.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let Some(j) = crate::bench::cpu::process_jiffies(&read("stat"), false) else {
                continue;
            };
            let cpu_s = j as f64 / tick;
            let name = read("comm").trim().to_string();
            if cpu_s < 0.1 && !name.starts_with("vxm-wg") {
                continue;
            }
            let allowed = read("status")
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_string();
            out.push(AgentThread {
                mode: mode.to_string(),
                host: n.name.clone(),
                name,
                cpu_s,
                cpus_allowed: allowed,
            });
        }
    }
    out
}

fn signal_agents(lab: &Lab, sig: nix::sys::signal::Signal) -> Result<()> {
    for pid in lab.info.nodes.iter().filter_map(|n| n.agent_pid) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
    }
    Ok(())
}

/// What a lab host's nftables table holds during one `tcp-1-nft` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NftTable {
    /// No table.
    None,
    /// The table of the agent's saved plan without outbound NAT: no NAT
    /// chain (as a network with `outbound_nat = false` and no published
    /// port has it), so no connection tracking.
    NoNat,
    /// The table of the agent's saved plan.
    Full,
}

/// Set the nftables table of every lab host.
fn set_tables(lab: &Lab, table: NftTable) -> Result<()> {
    for n in &lab.info.nodes {
        let mut plan = vxmesh::status::read_plan(&n.state_dir)?.plan;
        if table == NftTable::NoNat {
            plan.firewall.nat_sources.clear();
            plan.ports.clear();
        }
        Netns::open(&n.netns)?.run(move || -> Result<()> {
            if table == NftTable::None {
                vxmesh::firewall::nft::delete_table()?;
            } else {
                vxmesh::firewall::reconcile(&plan)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// The row of plain with vxmesh's table (filter and NAT on), with it but
/// without NAT, and without it, and against the hand-wired path if
/// measured (it has no table), in rotating rounds; the agents are paused
/// so none puts the table back in between.
async fn firewall_row(
    lab: &Lab,
    mode: Mode,
    overlay: &Leg,
    hand: Option<&Leg>,
    o: &ThroughputOptions,
) -> Result<ThroughputRow> {
    use nix::sys::signal::Signal;
    // The legs: the overlay with each table, then the hand-wired path.
    let tables = [NftTable::None, NftTable::Full, NftTable::NoNat];
    let n = tables.len() + usize::from(hand.is_some());
    signal_agents(lab, Signal::SIGSTOP)?;
    let result = async {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); n];
        for i in 0..o.repeat {
            for k in 0..n {
                let j = (i + k) % n;
                let leg = match tables.get(j) {
                    None => hand.expect("hand-wired leg"),
                    Some(t) => {
                        set_tables(lab, *t)?;
                        overlay
                    }
                };
                runs[j].push(iperf::iperf(leg, Case::Tcp(1), o).await?);
            }
        }
        set_tables(lab, NftTable::Full)?;
        anyhow::Ok(runs)
    }
    .await;
    signal_agents(lab, Signal::SIGCONT)?;
    let runs = result?;
    let (off, on, no_nat) = (&runs[0], &runs[1], &runs[2]);
    let mut paths = vec![
        path_figures(NO_TABLE, off),
        path_figures("plain", on),
        path_figures(NO_NAT, no_nat),
    ];
    let mut ratios = vec![
        ratio_figure(format!("plain/{NO_TABLE}"), on, off, None),
        ratio_figure(format!("{NO_NAT}/{NO_TABLE}"), no_nat, off, None),
    ];
    if let Some(h) = runs.get(3) {
        let hand = PathKind::HandWired.name();
        paths.push(path_figures(hand, h));
        ratios.push(ratio_figure(format!("{NO_TABLE}/{hand}"), off, h, None));
        ratios.push(ratio_figure(format!("{NO_NAT}/{hand}"), no_nat, h, None));
    }
    let row = ThroughputRow {
        mode: mode.to_string(),
        case: "tcp-1-nft".into(),
        paths,
        ratios,
    };
    for r in &row.ratios {
        tracing::info!("throughput {mode} tcp-1-nft: {} {:.3}", r.name, r.value);
    }
    Ok(row)
}

/// The `tcp-1-nft` row's baseline path: plain without vxmesh's table.
pub const NO_TABLE: &str = "plain-no-nft";
/// The `tcp-1-nft` row's path with vxmesh's table but no NAT chain.
pub const NO_NAT: &str = "plain-no-nat";

/// The printed table: one line per mode, case and path; the notes say where
/// the iperf3 ends and the encrypted path's agent threads ran.
pub fn table(r: &ThroughputReport) -> Table {
    let mut t = report::table(&r.rows);
    t.note(match (r.client_cpu, r.server_cpu) {
        (Some(c), Some(s)) => format!("iperf3 client pinned to CPU {c}, server to CPU {s}"),
        _ => "iperf3 not pinned (fewer than 2 CPUs)".into(),
    });
    t.note(format!(
        "load average before {}, after {}",
        r.load_before, r.load_after
    ));
    for a in &r.agent_threads {
        t.note(format!(
            "encrypted {} {} agent thread {:<16} {:6.2} CPU-s, CPUs allowed {}",
            a.mode, a.host, a.name, a.cpu_s, a.cpus_allowed
        ));
    }
    t
}
