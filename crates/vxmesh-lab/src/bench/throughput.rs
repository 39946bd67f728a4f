//! `vxmesh bench throughput`: iperf3 between two lab hosts, container to
//! container across the overlay vs host to host on the underlay, interleaved
//! in one lab run per mode.
//!
//! Cases: TCP one stream, TCP four streams (`-P 4`), and UDP at a fixed
//! offered rate (default 1 Gbit/s) with a fixed datagram size (1350 bytes,
//! so neither path fragments: the overlay MTU is the underlay's minus 50):
//! the figures are the rate that arrived at the server and the loss. When the
//! offered rate is above what a path carries, that is the path's UDP goodput
//! under overload, and the loss shows how far above it was. iperf3 server and client
//! run as processes entered into the lab's namespaces; nothing runs in the
//! root namespace.
//!
//! A fourth row per mode, `tcp-1-nft`, compares the overlay with vxmesh's
//! nftables table (VTEP filter and outbound NAT on) against the same overlay
//! with the table removed, the agents paused meanwhile: its `baseline`
//! column is then the overlay without the table, and `ratio` is on / off.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::{Reaped, Table, ensure_tool, gbps, ratio};
use crate::lab::{Lab, LabGuard, LabSpec};
use vxmesh::config::Mode;
use vxmesh::dataplane::netns::Netns;

pub const IPERF3: &str = "/usr/bin/iperf3";
const PORT: u16 = 5201;
/// UDP datagram payload: fits the overlay MTU (1450) and the underlay's.
pub const UDP_LEN: u32 = 1350;

pub struct ThroughputOptions {
    pub modes: Vec<Mode>,
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Runs per case and path (interleaved; the median is reported).
    pub repeat: usize,
    /// UDP offered rate, iperf3 syntax (e.g. "1G", "500M").
    pub udp_rate: String,
    /// The vxmesh binary for the lab agents.
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    pub mode: String,
    /// "tcp-1", "tcp-4", "udp", or "tcp-1-nft" (table on vs off).
    pub case: String,
    /// What `underlay_gbps` measured: "underlay" (host to host), or for
    /// `tcp-1-nft` "overlay without nftables table".
    pub baseline: String,
    /// Host to host on the underlay (Gbit/s, median of the runs).
    pub underlay_gbps: f64,
    /// Container to container across the overlay (Gbit/s, median).
    pub overlay_gbps: f64,
    /// overlay / underlay: the median of the per-pair ratios (run i of each
    /// path ran back to back), robust to the machine's load drifting.
    pub ratio: f64,
    /// UDP only: lost datagrams in % (median).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub underlay_loss_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_loss_pct: Option<f64>,
    /// Every run's Gbit/s, in order.
    pub underlay_runs: Vec<f64>,
    pub overlay_runs: Vec<f64>,
}

/// One iperf3 result.
#[derive(Clone, Copy, Debug)]
struct Run {
    bits_per_second: f64,
    loss_pct: Option<f64>,
}

#[derive(Clone, Copy)]
enum Case {
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

/// One side of a measurement: client namespace, server namespace and address.
struct Leg {
    client_ns: String,
    server_ns: String,
    server_ip: Ipv4Addr,
}

pub async fn run(o: &ThroughputOptions) -> Result<Vec<ThroughputRow>> {
    ensure_tool(IPERF3, "iperf3")?;
    if o.seconds == 0 || o.repeat == 0 {
        bail!("--seconds and --repeat must be at least 1");
    }
    let mut rows = Vec::new();
    for &mode in &o.modes {
        let mut spec = LabSpec::new(&super::lab_name("t"), 2, 1);
        spec.mode = mode;
        spec.exe = o.exe.clone();
        let lab = LabGuard(Lab::up(&spec).await.context("throughput lab")?);
        let h = |n: &str| lab.node(n).cloned();
        let (h1, h2) = (h("host1")?, h("host2")?);
        let underlay = Leg {
            client_ns: h1.netns.clone(),
            server_ns: h2.netns.clone(),
            server_ip: h2.underlay_ip,
        };
        let (c1, c2) = (lab.container_on("host1")?, lab.container_on("host2")?);
        let overlay = Leg {
            client_ns: c1.netns.clone(),
            server_ns: c2.netns.clone(),
            server_ip: c2.ip,
        };
        for case in [Case::Tcp(1), Case::Tcp(4), Case::Udp] {
            let (mut ul, mut ov) = (Vec::new(), Vec::new());
            for i in 0..o.repeat {
                // Alternate which path goes first, so a drift in the
                // machine's load does not favour one.
                if i % 2 == 0 {
                    ul.push(iperf(&underlay, case, o).await?);
                    ov.push(iperf(&overlay, case, o).await?);
                } else {
                    ov.push(iperf(&overlay, case, o).await?);
                    ul.push(iperf(&underlay, case, o).await?);
                }
            }
            let med = |v: &[Run], f: fn(&Run) -> f64| {
                let xs: Vec<f64> = v.iter().map(f).collect();
                median(&xs)
            };
            let u = med(&ul, |r| gbps(r.bits_per_second));
            let v = med(&ov, |r| gbps(r.bits_per_second));
            let loss = |v: &[Run]| {
                matches!(case, Case::Udp).then(|| med(v, |r| r.loss_pct.unwrap_or(0.0)))
            };
            let row = ThroughputRow {
                mode: mode.to_string(),
                case: case.name(),
                baseline: "underlay".into(),
                underlay_gbps: u,
                overlay_gbps: v,
                ratio: median(
                    &ul.iter()
                        .zip(&ov)
                        .map(|(a, b)| ratio(b.bits_per_second, a.bits_per_second))
                        .collect::<Vec<_>>(),
                ),
                underlay_loss_pct: loss(&ul),
                overlay_loss_pct: loss(&ov),
                underlay_runs: ul.iter().map(|r| gbps(r.bits_per_second)).collect(),
                overlay_runs: ov.iter().map(|r| gbps(r.bits_per_second)).collect(),
            };
            tracing::info!(
                "throughput {} {}: underlay {:.2} Gbit/s, overlay {:.2} Gbit/s, ratio {:.2}",
                row.mode,
                row.case,
                u,
                v,
                row.ratio
            );
            rows.push(row);
        }
        rows.push(firewall_row(&lab, mode, &overlay, o).await?);
        drop(lab);
    }
    Ok(rows)
}

/// Set the nftables table of every lab host: the agent's saved plan (`on`)
/// or none.
fn set_tables(lab: &Lab, on: bool) -> Result<()> {
    for n in &lab.info.nodes {
        let plan = vxmesh::status::read_plan(&n.state_dir)?.plan;
        Netns::open(&n.netns)?.run(move || -> Result<()> {
            if on {
                vxmesh::firewall::reconcile(&plan)?;
            } else {
                vxmesh::firewall::nft::delete_table()?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn signal_agents(lab: &Lab, sig: nix::sys::signal::Signal) -> Result<()> {
    for pid in lab.info.nodes.iter().filter_map(|n| n.agent_pid) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
    }
    Ok(())
}

/// The overlay's TCP-1 with vxmesh's table (filter and NAT on) against
/// without it, interleaved; the agents are paused so none puts the table
/// back in between.
async fn firewall_row(
    lab: &Lab,
    mode: Mode,
    overlay: &Leg,
    o: &ThroughputOptions,
) -> Result<ThroughputRow> {
    use nix::sys::signal::Signal;
    signal_agents(lab, Signal::SIGSTOP)?;
    let result = async {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for i in 0..o.repeat {
            for table in if i % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                set_tables(lab, table)?;
                let r = iperf(overlay, Case::Tcp(1), o).await?;
                if table { on.push(r) } else { off.push(r) }
            }
        }
        set_tables(lab, true)?;
        anyhow::Ok((off, on))
    }
    .await;
    signal_agents(lab, Signal::SIGCONT)?;
    let (off, on) = result?;
    let g = |v: &[Run]| {
        v.iter()
            .map(|r| gbps(r.bits_per_second))
            .collect::<Vec<_>>()
    };
    let row = ThroughputRow {
        mode: mode.to_string(),
        case: "tcp-1-nft".into(),
        baseline: "overlay without nftables table".into(),
        underlay_gbps: median(&g(&off)),
        overlay_gbps: median(&g(&on)),
        ratio: median(
            &off.iter()
                .zip(&on)
                .map(|(a, b)| ratio(b.bits_per_second, a.bits_per_second))
                .collect::<Vec<_>>(),
        ),
        underlay_loss_pct: None,
        overlay_loss_pct: None,
        underlay_runs: g(&off),
        overlay_runs: g(&on),
    };
    tracing::info!(
        "throughput {} tcp-1 nftables table off {:.2} Gbit/s, on {:.2} Gbit/s, ratio {:.3}",
        row.mode,
        row.underlay_gbps,
        row.overlay_gbps,
        row.ratio
    );
    Ok(row)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One iperf3 run over `p`: a one-off server in the server namespace, the
/// client in the client namespace.
async fn iperf(p: &Leg, case: Case, o: &ThroughputOptions) -> Result<Run> {
    let server_ns = Netns::open(&p.server_ns)?;
    let mut srv = Command::new(IPERF3);
    srv.args(["-s", "-1", "-p", &PORT.to_string(), "-B"])
        .arg(p.server_ip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    server_ns.enter_on_exec(&mut srv);
    let server = Reaped(
        srv.spawn()
            .with_context(|| format!("start iperf3 server in {}", p.server_ns))?,
    );
    drop(server_ns);
    wait_listening(server.0.id(), PORT, Duration::from_secs(10))
        .await
        .with_context(|| format!("iperf3 server in {}", p.server_ns))?;
    let client_ns = Netns::open(&p.client_ns)?;
    let mut cli = Command::new(IPERF3);
    cli.args(["-c", &p.server_ip.to_string(), "-p", &PORT.to_string()])
        .args(["-t", &o.seconds.to_string(), "-J"]);
    match case {
        Case::Tcp(n) => {
            cli.args(["-P", &n.to_string()]);
        }
        Case::Udp => {
            cli.args(["-u", "-b", &o.udp_rate, "-l", &UDP_LEN.to_string()]);
        }
    }
    cli.stdin(Stdio::null());
    client_ns.enter_on_exec(&mut cli);
    let what = format!(
        "iperf3 {} from {} to {}",
        case.name(),
        p.client_ns,
        p.server_ip
    );
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .context("iperf3 client thread")?
        .with_context(|| format!("run {what}"))?;
    drop(client_ns);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{what}: no JSON ({}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("{what} failed: {e}");
    }
    let r = parse(&v, case).with_context(|| format!("{what}: unexpected JSON: {v}"))?;
    if r.bits_per_second <= 0.0 {
        bail!("{what}: nothing arrived");
    }
    Ok(r)
}

/// What arrived: TCP `end.sum_received`; UDP `end.sum_received` (iperf3
/// 3.12 and newer), else the sender's `end.sum` minus the loss.
fn parse(v: &Value, case: Case) -> Option<Run> {
    let e = &v["end"];
    match case {
        Case::Tcp(_) => Some(Run {
            bits_per_second: e["sum_received"]["bits_per_second"].as_f64()?,
            loss_pct: None,
        }),
        Case::Udp => {
            let r = &e["sum_received"];
            if let (Some(bps), Some(loss)) =
                (r["bits_per_second"].as_f64(), r["lost_percent"].as_f64())
            {
                return Some(Run {
                    bits_per_second: bps,
                    loss_pct: Some(loss),
                });
            }
            let sent = e["sum"]["bits_per_second"].as_f64()?;
            let loss = e["sum"]["lost_percent"].as_f64()?;
            Some(Run {
                bits_per_second: sent * (1.0 - loss / 100.0),
                loss_pct: Some(loss),
            })
        }
    }
}

/// Wait until process `pid` has a TCP socket listening on `port` (read from
/// its own view of /proc/net, i.e. inside its namespace).
async fn wait_listening(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    let want = format!(":{port:04X} ");
    let deadline = Instant::now() + timeout;
    loop {
        for f in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
            // Columns: sl local_address rem_address st ...; LISTEN is 0A.
            if text.lines().skip(1).any(|l| {
                let mut c = l.split_whitespace().skip(1);
                let local = c.next().unwrap_or_default();
                let st = c.nth(1).unwrap_or_default();
                format!("{local} ").ends_with(&want) && st == "0A"
            }) {
                return Ok(());
            }
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("exited before it listened on port {port}");
        }
        if Instant::now() > deadline {
            bail!("not listening on port {port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn table(rows: &[ThroughputRow]) -> Table {
    let mut t = Table::new(&[
        "mode",
        "case",
        "baseline",
        "baseline Gbit/s",
        "overlay Gbit/s",
        "ratio",
        "underlay loss %",
        "overlay loss %",
    ]);
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for r in rows {
        t.row(vec![
            r.mode.clone(),
            r.case.clone(),
            r.baseline.clone(),
            format!("{:.2}", r.underlay_gbps),
            format!("{:.2}", r.overlay_gbps),
            format!("{:.2}", r.ratio),
            pct(r.underlay_loss_pct),
            pct(r.overlay_loss_pct),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json() {
        let tcp: Value = serde_json::from_str(
            r#"{"end":{"sum_received":{"bits_per_second":2.5e9},"sum_sent":{"bits_per_second":2.6e9}}}"#,
        )
        .unwrap();
        let r = parse(&tcp, Case::Tcp(1)).unwrap();
        assert_eq!(r.bits_per_second, 2.5e9);
        let udp: Value =
            serde_json::from_str(r#"{"end":{"sum":{"bits_per_second":1e9,"lost_percent":10.0}}}"#)
                .unwrap();
        let r = parse(&udp, Case::Udp).unwrap();
        assert_eq!((r.bits_per_second, r.loss_pct), (0.9e9, Some(10.0)));
        let udp: Value = serde_json::from_str(
            r#"{"end":{"sum":{"bits_per_second":1e9,"lost_percent":10.0},
                "sum_received":{"bits_per_second":0.8e9,"lost_percent":20.0}}}"#,
        )
        .unwrap();
        let r = parse(&udp, Case::Udp).unwrap();
        assert_eq!((r.bits_per_second, r.loss_pct), (0.8e9, Some(20.0)));
        assert!(parse(&serde_json::json!({}), Case::Udp).is_none());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
    }
}
