//! One iperf3 run over a [`Leg`]: a one-off server and a client entered
//! into the leg's namespaces and pinned to different CPUs, the machine's and
//! the agents' CPU time sampled around the client.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::report::Run;
use super::{Case, Leg, ThroughputOptions};
use crate::bench::Reaped;
use crate::bench::cpu::{clock_tick, machine_jiffies, pid_jiffies};
use vxmesh::dataplane::netns::Netns;

pub const IPERF3: &str = "/usr/bin/iperf3";
const PORT: u16 = 5201;
/// UDP datagram payload: with its 28 bytes of headers it fits every
/// compared path's MTU (the encrypted overlay's 1390 is the smallest).
pub const UDP_LEN: u32 = 1350;

/// The CPUs the iperf3 client and server are pinned to: 0 and 1 when this
/// process may use both, else none (reported).
pub fn pinning() -> Option<(usize, usize)> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    (cpus.len() >= 2).then(|| (cpus[0], cpus[1]))
}

fn pin(cmd: &mut Command, cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    // SAFETY: only sched_setaffinity, a plain syscall, runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

fn agents_jiffies(pids: &[u32]) -> Result<u64> {
    let mut sum = 0;
    for pid in pids {
        sum += pid_jiffies(*pid, false).with_context(|| format!("agent {pid}"))?;
    }
    Ok(sum)
}

/// One iperf3 run over `p`: a one-off server in the server namespace, the
/// client in the client namespace.
pub async fn iperf(p: &Leg, case: Case, o: &ThroughputOptions) -> Result<Run> {
    let cpus = pinning();
    let server_ns = Netns::open(&p.server_ns)?;
    let mut srv = Command::new(IPERF3);
    srv.args(["-s", "-1", "-p", &PORT.to_string(), "-B"])
        .arg(p.server_ip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    server_ns.enter_on_exec(&mut srv);
    pin(&mut srv, cpus.map(|c| c.1))?;
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
    pin(&mut cli, cpus.map(|c| c.0))?;
    let what = format!(
        "iperf3 {} from {} to {}",
        case.name(),
        p.client_ns,
        p.server_ip
    );
    let (m0, a0, t0) = (
        machine_jiffies()?,
        agents_jiffies(&p.agents)?,
        Instant::now(),
    );
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .context("iperf3 client thread")?
        .with_context(|| format!("run {what}"))?;
    let (m1, a1, secs) = (
        machine_jiffies()?,
        agents_jiffies(&p.agents)?,
        t0.elapsed().as_secs_f64(),
    );
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
    let (bits_per_second, loss_pct) =
        parse(&v, case).with_context(|| format!("{what}: unexpected JSON: {v}"))?;
    if bits_per_second <= 0.0 {
        bail!("{what}: nothing arrived");
    }
    let tick = clock_tick();
    Ok(Run {
        bits_per_second,
        loss_pct,
        seconds: secs,
        machine_cpu_s: (m1 - m0) as f64 / tick,
        agent_cpu_s: (!p.agents.is_empty()).then(|| (a1 - a0) as f64 / tick),
    })
}

/// What arrived (bit/s, and UDP's loss %): TCP `end.sum_received`; UDP
/// `end.sum_received` (iperf3 3.12 and newer), else the sender's `end.sum`
/// minus the loss.
fn parse(v: &Value, case: Case) -> Option<(f64, Option<f64>)> {
    let e = &v["end"];
    match case {
        Case::Tcp(_) => Some((e["sum_received"]["bits_per_second"].as_f64()?, None)),
        Case::Udp => {
            let r = &e["sum_received"];
            if let (Some(bps), Some(loss)) =
                (r["bits_per_second"].as_f64(), r["lost_percent"].as_f64())
            {
                return Some((bps, Some(loss)));
            }
            let sent = e["sum"]["bits_per_second"].as_f64()?;
            let loss = e["sum"]["lost_percent"].as_f64()?;
            Some((sent * (1.0 - loss / 100.0), Some(loss)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf3_json() {
        let tcp: Value = serde_json::from_str(
            r#"{"end":{"sum_received":{"bits_per_second":2.5e9},"sum_sent":{"bits_per_second":2.6e9}}}"#,
        )
        .unwrap();
        assert_eq!(parse(&tcp, Case::Tcp(1)), Some((2.5e9, None)));
        let udp: Value =
            serde_json::from_str(r#"{"end":{"sum":{"bits_per_second":1e9,"lost_percent":10.0}}}"#)
                .unwrap();
        assert_eq!(parse(&udp, Case::Udp), Some((0.9e9, Some(10.0))));
        let udp: Value = serde_json::from_str(
            r#"{"end":{"sum":{"bits_per_second":1e9,"lost_percent":10.0},
                "sum_received":{"bits_per_second":0.8e9,"lost_percent":20.0}}}"#,
        )
        .unwrap();
        assert_eq!(parse(&udp, Case::Udp), Some((0.8e9, Some(20.0))));
        assert!(parse(&serde_json::json!({}), Case::Udp).is_none());
    }
}
