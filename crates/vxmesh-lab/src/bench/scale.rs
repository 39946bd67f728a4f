//! `vxmesh bench scale`: program P remote peers into one node with one
//! reconcile pass, vs `ip -batch` + `bridge -batch` of the very same objects;
//! and the nftables table with its VTEP filter set of P peers: created, one
//! peer added (the agent's incremental path), and an idle full pass.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::Serialize;

use super::{Table, ms};
use vxmesh::config::{Cluster, Mode, Network};
use vxmesh::dataplane::kernel::{LinkOptions, Netlink};
use vxmesh::dataplane::netns::NetnsGuard;
use vxmesh::dataplane::plan::{PlanInput, plan};
use vxmesh::dataplane::{NodePlan, reconcile, reconcile_from};
use vxmesh::firewall;
use vxmesh::model::{Endpoint, NodeRecord, Vni, container_mac};

/// One row of the scale benchmark: one run, or (see [`combine`]) the
/// medians of several.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRow {
    pub mode: String,
    pub peers: usize,
    /// Runs behind this row (each a vxmesh pass and an `ip -batch` run,
    /// back to back); every figure is the median over them.
    pub runs: usize,
    /// Kernel objects programmed (routes + neighbours + FDB entries).
    pub objects: usize,
    pub vxmesh_ms: f64,
    pub vxmesh_messages: usize,
    /// CPU time of the vxmesh pass in user space and in the kernel (the
    /// kernel's own work per object bounds how fast any tool can be).
    pub vxmesh_user_ms: f64,
    pub vxmesh_kernel_ms: f64,
    pub ip_batch_ms: f64,
    /// CPU time of the `ip`/`bridge` processes, user space and kernel.
    pub ip_batch_user_ms: f64,
    pub ip_batch_kernel_ms: f64,
    /// ip -batch time / vxmesh time (> 1: vxmesh is faster); of several
    /// runs the median of the per-run ratios.
    pub speedup: f64,
    /// The per-run ratios, in run order.
    pub speedups: Vec<f64>,
    /// One more peer on top of the full set.
    pub incremental_ms: f64,
    pub incremental_messages: usize,
    /// Second pass over the converged set (should send nothing).
    pub idle_pass_ms: f64,
    pub idle_pass_messages: usize,
    /// The nftables table created with all P peers in the filter set.
    pub nft_full_ms: f64,
    /// One more peer: one set element, no dump.
    pub nft_peer_ms: f64,
    /// A full firewall pass over the converged table (dump + diff, no change).
    pub nft_idle_ms: f64,
}

const UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub(super) fn peer_ip(i: usize) -> Ipv4Addr {
    // Peers live in 198.19.0.0/16 (benchmarking range); only ever programmed, never contacted.
    Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A cluster of `peers + 1` nodes; node 0 is the one programmed.
fn cluster(mode: Mode, peers: usize) -> Cluster {
    let cidr: Ipv4Net = "10.0.0.0/8".parse().expect("valid");
    let len = match mode {
        Mode::Routed => 24,
        Mode::Bridged => 28,
    };
    let net = Network {
        outbound_nat: true,
        name: "bench".into(),
        mode,
        cidr,
        subnet_len: len,
        vni: Vni::new(100).expect("valid"),
        port: 4789,
        mtu: None,
        gateway: None,
        encrypt: false,
    };
    let nodes = (0..=peers)
        .map(|i| NodeRecord {
            name: format!("n{i}"),
            underlay_ip: if i == 0 { UNDERLAY } else { peer_ip(i) },
            underlay_dev: Some("ul0".into()),
            subnets: BTreeMap::from([(
                "bench".to_string(),
                Ipv4Net::new(
                    Ipv4Addr::from(u32::from(cidr.network()) + ((i as u32) << (32 - len))),
                    len,
                )
                .expect("valid"),
            )]),
            public_key: None,
            next_public_key: None,
        })
        .collect();
    Cluster {
        networks: vec![net],
        nodes,
        encryption: Default::default(),
    }
}

/// Bridged: one endpoint per remote node (the first address of its slice).
fn endpoints(c: &Cluster) -> Vec<Endpoint> {
    c.nodes
        .iter()
        .skip(1)
        .map(|n| {
            let ip = Ipv4Addr::from(u32::from(n.subnets["bench"].network()) + 1);
            Endpoint {
                network: "bench".into(),
                ip,
                mac: container_mac(ip),
                node: n.name.clone(),
            }
        })
        .collect()
}

fn plan_for(mode: Mode, c: &Cluster) -> Result<NodePlan> {
    let eps = endpoints(c);
    Ok(plan(&PlanInput {
        vxlan_filter: true,
        cluster: c,
        node: "n0",
        endpoints: (mode == Mode::Bridged).then_some(eps.as_slice()),
        underlay_mtu: 1500,
    })?)
}

/// Delete the plan's devices, and with them every entry on them, while the
/// namespace is still ours: the kernel does that work now, in this task,
/// instead of in its namespace cleanup worker, which would hold the RTNL lock
/// for tens of milliseconds in the middle of the next timed run.
async fn dismantle(nl: &Netlink, p: &NodePlan) -> Result<()> {
    for l in p.links.iter().rev() {
        nl.delete_link(&l.name).await?;
    }
    Ok(())
}

/// Let the kernel finish deferred work (RCU callbacks, earlier namespace
/// cleanups) before a timed section.
async fn settle() {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// A namespace with an underlay device `ul0` (a veth whose peer stays inside).
async fn bench_ns(tag: &str) -> Result<(NetnsGuard, Netlink)> {
    let name = format!("vxm-bench-{}-{tag}", std::process::id());
    let g = NetnsGuard::create(&name)?;
    let nl = Netlink::connect_in(&g.open()?).await?;
    nl.create_veth("ul0", "ul0p", None, 1500).await?;
    for d in ["ul0", "ul0p"] {
        nl.set_link(
            d,
            LinkOptions {
                up: Some(true),
                ..Default::default()
            },
        )
        .await?;
    }
    nl.add_address("ul0", Ipv4Net::new(UNDERLAY, 24)?).await?;
    Ok((g, nl))
}

/// The same objects as `p`, as `ip -batch` and `bridge -batch` input.
fn batch_files(p: &NodePlan, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let mut ipb = String::new();
    for r in &p.routes {
        writeln!(
            ipb,
            "route replace {} via {} dev {} onlink proto 86 metric {}",
            r.dst,
            r.via,
            r.dev,
            vxmesh::dataplane::kernel::route_metric(r.dst)
        )?;
    }
    for n in &p.neighbours {
        writeln!(
            ipb,
            "neigh replace {} lladdr {} dev {} nud permanent",
            n.ip, n.mac, n.dev
        )?;
    }
    let mut brb = String::new();
    for f in &p.fdb {
        writeln!(
            brb,
            "fdb replace {} dev {} dst {} self permanent",
            f.mac, f.dev, f.dst
        )?;
    }
    let (a, b) = (dir.join("ip.batch"), dir.join("bridge.batch"));
    std::fs::write(&a, ipb)?;
    std::fs::write(&b, brb)?;
    Ok((a, b))
}

fn run_batch(tool: &str, ns: &str, file: &Path) -> Result<()> {
    let out = Command::new(tool)
        .args(["-n", ns, "-batch"])
        .arg(file)
        .output()
        .with_context(|| format!("run {tool} -batch"))?;
    if !out.status.success() {
        bail!(
            "{tool} -batch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Program `peers` remote peers into an empty node with vxmesh, then the same
/// objects with `ip -batch` + `bridge -batch` into another empty node.
pub async fn scale_one(mode: Mode, peers: usize) -> Result<ScaleRow> {
    let c = cluster(mode, peers);
    let p = plan_for(mode, &c)?;
    let objects = p.routes.len() + p.neighbours.len() + p.fdb.len();
    // vxmesh: devices first (not part of the timed peer programming), then peers.
    let (g, nl) = bench_ns("vx").await?;
    let mut devices_only = p.clone();
    devices_only.routes.clear();
    devices_only.neighbours.clear();
    devices_only.fdb.clear();
    reconcile(&nl, &devices_only).await?;
    settle().await;
    let cpu0 = cpu_ms()?;
    let t0 = Instant::now();
    let full = reconcile(&nl, &p).await?;
    let vx = t0.elapsed();
    let cpu1 = cpu_ms()?;
    let t1 = Instant::now();
    let idle = reconcile(&nl, &p).await?;
    let idle_t = t1.elapsed();
    let c2 = cluster(mode, peers + 1);
    let p2 = plan_for(mode, &c2)?;
    // The agent's incremental path: the kernel holds `p`, untouched since.
    let t2 = Instant::now();
    let inc = reconcile_from(&nl, &p, &p2)
        .await?
        .context("one more peer changed more than peer entries")?;
    let inc_t = t2.elapsed();
    let verify = reconcile(&nl, &p2).await?;
    if verify.changes != 0 {
        bail!(
            "the incremental pass left {} differences: {:?}",
            verify.changes,
            verify.applied.iter().take(3).collect::<Vec<_>>()
        );
    }
    let nft = nft_times(&g, &p, &p2)?;
    dismantle(&nl, &p2).await?;
    drop(nl);
    drop(g);
    // Baseline: ip -batch on the same objects, same starting point.
    let (g, nl) = bench_ns("ip").await?;
    reconcile(&nl, &devices_only).await?;
    let dir = super::TempDir::new("scale")?;
    let (ipf, brf) = batch_files(&p, dir.path())?;
    settle().await;
    let kids0 = cpu_of(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let t3 = Instant::now();
    run_batch("ip", &g.name, &ipf)?;
    run_batch("bridge", &g.name, &brf)?;
    let ipb = t3.elapsed();
    let kids1 = cpu_of(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    // Sanity: the baseline programmed the same set (vxmesh sees nothing to do).
    let check = reconcile(&nl, &p).await?;
    if check.changes != 0 {
        if std::env::var_os("VXMESH_BENCH_DEBUG").is_some() {
            let _ = Command::new("bridge")
                .args(["-n", &g.name, "fdb", "show"])
                .status();
            let _ = Command::new("cat").arg(&brf).status();
        }
        bail!(
            "ip -batch baseline differs from the plan by {} changes: {:?}",
            check.changes,
            check.applied.iter().take(3).collect::<Vec<_>>()
        );
    }
    dismantle(&nl, &p).await?;
    let speedup = ms(ipb) / ms(vx).max(0.001);
    Ok(ScaleRow {
        mode: mode.to_string(),
        peers,
        runs: 1,
        objects,
        vxmesh_ms: ms(vx),
        vxmesh_messages: full.messages,
        vxmesh_user_ms: cpu1.0 - cpu0.0,
        vxmesh_kernel_ms: cpu1.1 - cpu0.1,
        ip_batch_ms: ms(ipb),
        ip_batch_user_ms: kids1.0 - kids0.0,
        ip_batch_kernel_ms: kids1.1 - kids0.1,
        speedup,
        speedups: vec![speedup],
        incremental_ms: ms(inc_t),
        incremental_messages: inc.messages,
        idle_pass_ms: ms(idle_t),
        idle_pass_messages: idle.messages,
        nft_full_ms: nft[0],
        nft_peer_ms: nft[1],
        nft_idle_ms: nft[2],
    })
}

/// The firewall passes in the bench namespace: [create with `p`'s peers,
/// `p` -> `p2` (one peer more) incremental, idle full pass over `p2`] in ms.
fn nft_times(g: &NetnsGuard, p: &NodePlan, p2: &NodePlan) -> Result<[f64; 3]> {
    let (p, p2) = (p.clone(), p2.clone());
    let times = g.open()?.run(move || -> Result<[f64; 3]> {
        let t0 = Instant::now();
        firewall::reconcile(&p)?;
        let full = t0.elapsed();
        let t1 = Instant::now();
        let inc = firewall::reconcile_from(&p, &p2)?
            .context("one more peer changed more than the filter set")?;
        let peer = t1.elapsed();
        if inc.changes.len() != 1 {
            bail!("one more peer made {} firewall changes", inc.changes.len());
        }
        let t2 = Instant::now();
        let idle = firewall::reconcile(&p2)?;
        let idle_t = t2.elapsed();
        if !idle.changes.is_empty() {
            bail!(
                "the incremental firewall pass left differences: {:?}",
                idle.changes
            );
        }
        firewall::nft::delete_table()?;
        Ok([ms(full), ms(peer), ms(idle_t)])
    })?;
    Ok(times)
}

/// One row from several runs of the same mode and size: the median of each
/// figure (the speedup: of the per-run ratios, which cancels load that
/// drifts between runs), all per-run ratios kept.
pub fn combine(runs: &[ScaleRow]) -> ScaleRow {
    let med = |f: &dyn Fn(&ScaleRow) -> f64| {
        let xs: Vec<f64> = runs.iter().map(f).collect();
        super::Summary::of(&xs).p50
    };
    let med_n = |f: &dyn Fn(&ScaleRow) -> usize| med(&|r| f(r) as f64).round() as usize;
    let first = &runs[0];
    ScaleRow {
        mode: first.mode.clone(),
        peers: first.peers,
        runs: runs.len(),
        objects: first.objects,
        vxmesh_ms: med(&|r| r.vxmesh_ms),
        vxmesh_messages: med_n(&|r| r.vxmesh_messages),
        vxmesh_user_ms: med(&|r| r.vxmesh_user_ms),
        vxmesh_kernel_ms: med(&|r| r.vxmesh_kernel_ms),
        ip_batch_ms: med(&|r| r.ip_batch_ms),
        ip_batch_user_ms: med(&|r| r.ip_batch_user_ms),
        ip_batch_kernel_ms: med(&|r| r.ip_batch_kernel_ms),
        speedup: med(&|r| r.speedup),
        speedups: runs.iter().map(|r| r.speedup).collect(),
        incremental_ms: med(&|r| r.incremental_ms),
        incremental_messages: med_n(&|r| r.incremental_messages),
        idle_pass_ms: med(&|r| r.idle_pass_ms),
        idle_pass_messages: med_n(&|r| r.idle_pass_messages),
        nft_full_ms: med(&|r| r.nft_full_ms),
        nft_peer_ms: med(&|r| r.nft_peer_ms),
        nft_idle_ms: med(&|r| r.nft_idle_ms),
    }
}

/// (user, system) CPU time of this process so far, in ms.
fn cpu_ms() -> Result<(f64, f64)> {
    cpu_of(nix::sys::resource::UsageWho::RUSAGE_SELF)
}

/// (user, system) CPU time of `who` so far, in ms.
fn cpu_of(who: nix::sys::resource::UsageWho) -> Result<(f64, f64)> {
    let u = nix::sys::resource::getrusage(who).context("getrusage")?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    Ok((ms(u.user_time()), ms(u.system_time())))
}

pub fn scale_table(rows: &[ScaleRow]) -> Table {
    let mut t = Table::new(&[
        "mode",
        "peers",
        "objects",
        "vxmesh ms",
        "(user/kernel)",
        "msgs",
        "ip-batch ms",
        "(user/kernel)",
        "speedup (range)",
        "+1 peer ms",
        "+1 msgs",
        "idle pass ms",
        "idle msgs",
        "nft set ms",
        "nft +1 ms",
        "nft idle ms",
    ]);
    for r in rows {
        t.row(vec![
            r.mode.clone(),
            r.peers.to_string(),
            r.objects.to_string(),
            format!("{:.1}", r.vxmesh_ms),
            format!("({:.0}/{:.0})", r.vxmesh_user_ms, r.vxmesh_kernel_ms),
            r.vxmesh_messages.to_string(),
            format!("{:.1}", r.ip_batch_ms),
            format!("({:.0}/{:.0})", r.ip_batch_user_ms, r.ip_batch_kernel_ms),
            {
                let lo = r.speedups.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.speedups.iter().copied().fold(0.0, f64::max);
                if r.runs > 1 {
                    format!("{:.1}x ({lo:.1}-{hi:.1})", r.speedup)
                } else {
                    format!("{:.1}x", r.speedup)
                }
            },
            format!("{:.2}", r.incremental_ms),
            r.incremental_messages.to_string(),
            format!("{:.1}", r.idle_pass_ms),
            r.idle_pass_messages.to_string(),
            format!("{:.1}", r.nft_full_ms),
            format!("{:.1}", r.nft_peer_ms),
            format!("{:.1}", r.nft_idle_ms),
        ]);
    }
    t
}
