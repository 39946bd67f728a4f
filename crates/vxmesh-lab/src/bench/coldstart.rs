//! `vxmesh bench converge --cold-start`: N hosts whose agents all start at
//! once on an empty etcd store (a data centre powering up, or every node
//! restarted by one upgrade).
//!
//! The lab is built without agents (hosts, underlay, etcd, the network);
//! every agent process is spawned behind a gate, and the gate opened: all
//! agents start at the same moment (spawning hundreds of processes one by
//! one takes seconds, which would otherwise be measured). Per agent: its
//! join time (start -> subnet claimed and network published). For the
//! lab: the moment every agent runs, the last join,
//! the moment every agent's applied plan holds every peer, and the moment
//! every container pair answers ICMP (one container per host, attached once
//! all have joined: attach time reported apart). etcd's own metrics give
//! the requests and watch events of the whole start, per join; /proc the
//! agents' resident memory and CPU time once converged, and the whole
//! machine's busy CPU time until every pair answered.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::cpu;
use super::{Summary, Table, ms, percentile};
use crate::lab::{ETCD_IP, ETCD_PORT, Lab, LabGuard, LabSpec, LabStore, MAX_HOST, StartGate};
use crate::probe::PairJob;
use vxmesh::dataplane::netns::Netns;

/// Every agent must have joined (and the lab converged) within this.
const LIMIT: Duration = Duration::from_secs(180);
/// Waiting for every agent to know every peer stops after this long
/// without one more agent converging.
const STALL: Duration = Duration::from_secs(30);
/// The agents' nice value in a cold start (see [`one_size`]).
const AGENT_NICE: i32 = 10;

pub struct ColdStartOptions {
    /// Lab sizes.
    pub nodes: Vec<usize>,
    /// Lease TTL of the agents, seconds.
    pub ttl_secs: u64,
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdStartRow {
    pub nodes: usize,
    pub ttl_ms: f64,
    /// Agent start -> subnet claimed and network published, per agent.
    pub join_ms: Summary,
    pub join_p99_ms: f64,
    /// Spawning every agent process behind the gate, before the start
    /// (not part of any other time).
    pub spawn_ms: f64,
    /// Start (the gate opened) -> every agent process runs the agent.
    pub all_started_ms: f64,
    /// Start -> last agent joined.
    pub all_joined_ms: f64,
    /// First agent start -> every agent's applied plan holds every peer.
    pub all_known_ms: f64,
    /// Attaching one container per host (after every join).
    pub attach_ms: f64,
    /// First agent start -> every container pair reachable (both ways).
    pub reachable_ms: f64,
    /// etcd requests (gRPC messages received, keep-alives included) from
    /// the first start until every agent knew every peer, per join.
    pub etcd_requests_per_join: f64,
    /// ... of which transactions (claims) and ranges (lists, reads).
    pub etcd_txns_per_join: f64,
    pub etcd_ranges_per_join: f64,
    /// Watch events etcd sent in that time, per join.
    pub watch_events_per_join: f64,
    /// Agents whose first join attempt failed (they log `cannot join yet`
    /// once per distinct cause, then `joined after retrying`).
    pub agents_retried: usize,
    /// The distinct causes they logged, with how many agents logged each.
    pub retry_causes: BTreeMap<String, usize>,
    /// Resident memory of the agents once converged.
    pub rss_mean_mib: f64,
    pub rss_max_mib: f64,
    pub rss_total_mib: f64,
    /// CPU time of one agent (its own and its `nft` children's) from the
    /// start until every agent knew every peer, mean over the agents.
    pub agent_cpu_ms_mean: f64,
    /// Busy CPU time of the whole machine (all processes and the kernel)
    /// from the start until every pair answered, and its CPUs: that time
    /// divided by the CPUs is the least wall time the work could take.
    pub machine_cpu_s: f64,
    pub cpus: usize,
}

pub async fn run(o: &ColdStartOptions) -> Result<Vec<ColdStartRow>> {
    let mut rows = Vec::new();
    for &n in &o.nodes {
        if !(2..=MAX_HOST).contains(&n) {
            bail!("--nodes values must be 2..={MAX_HOST} (got {n})");
        }
        rows.push(one_size(o, n).await?);
    }
    Ok(rows)
}

async fn one_size(o: &ColdStartOptions, n: usize) -> Result<ColdStartRow> {
    let mut spec = LabSpec::new(&super::lab_name("s"), n, 1);
    spec.store = LabStore::Etcd;
    spec.ttl = Duration::from_secs(o.ttl_secs);
    spec.exe = o.exe.clone();
    spec.start_agents = false;
    let mut lab = LabGuard(Lab::up(&spec).await.context("cold-start lab")?);
    let ul = lab.info.underlay_ns.clone();
    let before = etcd_counters(&ul).await?;
    let nodes: Vec<String> = lab.info.nodes.iter().map(|n| n.name.clone()).collect();
    let net = lab.etcd()?.networks[0].clone();

    // On a real cluster etcd has machines of its own; here one etcd
    // process (nice -10) shares two CPUs with N agents. At 250 agents all
    // runnable at once, -10 alone left etcd about a quarter of a CPU:
    // proposals queued, lease renewals (which wait for the applied index)
    // failed, and leases expired by the hundred. The agents, at nice 10,
    // still share the CPUs fairly among themselves.
    lab.agent_nice = AGENT_NICE;
    let mut gate = StartGate::new()?;
    let s0 = Instant::now();
    lab.spawn_agents_gated(&nodes, &gate)?;
    let spawned = s0.elapsed();
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| lab.node(n).ok().and_then(|n| n.agent_pid))
        .collect::<Option<_>>()
        .context("a spawned agent has no pid")?;
    let busy0 = cpu::machine_jiffies()?;
    let t0 = Instant::now();
    gate.open();
    // Joins: each agent's network file appears once its subnet is claimed
    // (a stat per pending agent every 50 ms: the bench must not take the
    // CPU the agents and etcd need). The join ends when the agent wrote
    // the file (its modification time), not when this loop saw it.
    let mut gated = pids.clone();
    let mut all_started = None;
    let mut joins = Vec::new();
    let file = |n: &str| -> PathBuf {
        lab.node(n)
            .map(|n| n.state_dir.join("networks").join(format!("{net}.json")))
            .unwrap_or_default()
    };
    let mut pending: Vec<(&String, PathBuf)> = nodes.iter().map(|n| (n, file(n))).collect();
    while !pending.is_empty() {
        let now = Instant::now();
        gated.retain(|pid| still_gated(*pid));
        if gated.is_empty() && all_started.is_none() {
            all_started = Some(now - t0);
        }
        pending.retain(|(_, f)| match written_at(f, now) {
            Some(at) => {
                joins.push(ms(at.saturating_duration_since(t0)));
                false
            }
            None => true,
        });
        if t0.elapsed() > LIMIT {
            let first = pending[0].0;
            let log = lab
                .node(first)
                .ok()
                .and_then(|n| std::fs::read_to_string(&n.agent_log).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} of {n} agents not joined after {LIMIT:?}, e.g. {first}; the end of its log:\n{}",
                pending.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_joined = t0.elapsed();
    let all_started = all_started.unwrap_or(all_joined);
    // Records the claimed subnets (returns at once: all joined).
    lab.wait_agents_ready(&nodes, Duration::from_secs(5))
        .await?;
    if !lab.wait_converged(STALL).await {
        bail!("the {n} agents did not all learn every peer (no progress for {STALL:?})");
    }
    let all_known = t0.elapsed();
    let after = etcd_counters(&ul).await?;
    let rss = lab.agent_rss_kib();
    let mut agent_jiffies = 0;
    for pid in &pids {
        agent_jiffies += cpu::pid_jiffies(*pid, true).with_context(|| format!("agent {pid}"))?;
    }
    let (agents_retried, retry_causes) = join_retries(&lab);

    let t1 = Instant::now();
    lab.attach_all_containers().await?;
    let attach = t1.elapsed();
    super::converge::wait_reachable(all_pairs(&lab), t0 + LIMIT)
        .await
        .with_context(|| format!("the {n}-host cold start did not reach every pair"))?;
    let reachable = t0.elapsed();
    let busy = cpu::machine_jiffies()? - busy0;

    let per = |k: &str| (after.get(k) - before.get(k)) / n as f64;
    let mut sorted = joins.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rss_total: u64 = rss.iter().sum();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let row = ColdStartRow {
        nodes: n,
        ttl_ms: ms(Duration::from_secs(o.ttl_secs)),
        join_ms: Summary::of(&joins),
        join_p99_ms: percentile(&sorted, 99.0),
        spawn_ms: ms(spawned),
        all_started_ms: ms(all_started),
        all_joined_ms: ms(all_joined),
        all_known_ms: ms(all_known),
        attach_ms: ms(attach),
        reachable_ms: ms(reachable),
        etcd_requests_per_join: per(REQUESTS),
        etcd_txns_per_join: per(TXNS),
        etcd_ranges_per_join: per(RANGES),
        watch_events_per_join: per(EVENTS),
        agents_retried,
        retry_causes,
        rss_mean_mib: mib(rss_total) / rss.len().max(1) as f64,
        rss_max_mib: mib(rss.iter().copied().max().unwrap_or(0)),
        rss_total_mib: mib(rss_total),
        agent_cpu_ms_mean: agent_jiffies as f64 / cpu::clock_tick() * 1000.0 / n as f64,
        machine_cpu_s: busy as f64 / cpu::clock_tick(),
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get()),
    };
    tracing::info!(
        "{n} hosts cold: all joined {:.0} ms, all known {:.0} ms, reachable {:.0} ms",
        row.all_joined_ms,
        row.all_known_ms,
        row.reachable_ms
    );
    drop(lab);
    Ok(row)
}

/// Is `pid` still the shell waiting behind the start gate? (A process
/// that is gone is not: the join loop reports it.)
fn still_gated(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sh")
}

/// When `file` was last written, as an [`Instant`] (`now` = the present),
/// or `None` while it does not exist.
fn written_at(file: &std::path::Path, now: Instant) -> Option<Instant> {
    let mtime = std::fs::metadata(file).ok()?.modified().ok()?;
    let age = std::time::SystemTime::now()
        .duration_since(mtime)
        .unwrap_or_default();
    Some(now.checked_sub(age).unwrap_or(now))
}

/// How many agents retried their join, and the causes they logged.
fn join_retries(lab: &Lab) -> (usize, BTreeMap<String, usize>) {
    let mut retried = 0;
    let mut causes = BTreeMap::new();
    for n in &lab.info.nodes {
        let log = std::fs::read_to_string(&n.agent_log).unwrap_or_default();
        let mut any = false;
        for cause in log
            .lines()
            .filter(|l| l.contains("cannot join yet"))
            .filter_map(|l| l.split("cause=").nth(1)?.split_whitespace().next())
        {
            any = true;
            *causes
                .entry(cause.trim_matches('"').to_string())
                .or_insert(0) += 1;
        }
        retried += usize::from(any);
    }
    (retried, causes)
}

/// Every ordered pair of containers (one network: routed).
fn all_pairs(lab: &Lab) -> Vec<PairJob> {
    let cs = &lab.info.containers;
    let mut jobs = Vec::with_capacity(cs.len() * cs.len());
    for a in cs {
        for b in cs.iter().filter(|b| b.name != a.name) {
            jobs.push(PairJob::new(&a.netns, b.ip));
        }
    }
    jobs
}

const REQUESTS: &str = "requests";
const TXNS: &str = "txns";
const RANGES: &str = "ranges";
const EVENTS: &str = "events";

/// Sums of etcd's counters that the report uses.
#[derive(Debug, Default)]
struct Counters(BTreeMap<&'static str, f64>);

impl Counters {
    fn get(&self, k: &str) -> f64 {
        self.0.get(k).copied().unwrap_or(0.0)
    }
}

/// Read etcd's counters from its Prometheus text: gRPC messages received
/// (every request, stream messages included; by method for Txn and Range)
/// and the watch events it sent.
fn parse_counters(text: &str) -> Counters {
    let mut c = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let mut add = |k: &'static str| *c.0.entry(k).or_default() += v;
        match name {
            "grpc_server_msg_received_total" => {
                add(REQUESTS);
                if series.contains("grpc_method=\"Txn\"") {
                    add(TXNS);
                }
                if series.contains("grpc_method=\"Range\"") {
                    add(RANGES);
                }
            }
            "etcd_debugging_mvcc_events_total" => add(EVENTS),
            _ => {}
        }
    }
    c
}

/// etcd's counters, scraped from inside the lab's underlay namespace.
async fn etcd_counters(underlay_ns: &str) -> Result<Counters> {
    let addr = SocketAddr::from((ETCD_IP, ETCD_PORT));
    let text = Netns::open(underlay_ns)?
        .run(move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            // HTTP/1.0: the whole body, then close (no chunks).
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .with_context(|| format!("scrape etcd's metrics at {addr}"))?;
    let c = parse_counters(&text);
    if c.get(REQUESTS) == 0.0 {
        bail!("etcd's /metrics at {addr} holds no grpc_server_msg_received_total");
    }
    Ok(c)
}

pub fn table(rows: &[ColdStartRow]) -> Table {
    let mut t = Table::new(&[
        "hosts",
        "join p50 ms",
        "join p99 ms",
        "spawn ms (before start)",
        "all started ms",
        "all joined ms",
        "all known ms",
        "attach ms",
        "all pairs ms",
        "etcd req/join",
        "txn/join",
        "range/join",
        "watch ev/join",
        "agent RSS MiB (mean/max)",
        "agents retried",
        "agent CPU ms (mean)",
        "machine CPU-s (CPUs)",
    ]);
    for r in rows {
        t.row(vec![
            r.nodes.to_string(),
            format!("{:.0}", r.join_ms.p50),
            format!("{:.0}", r.join_p99_ms),
            format!("{:.0}", r.spawn_ms),
            format!("{:.0}", r.all_started_ms),
            format!("{:.0}", r.all_joined_ms),
            format!("{:.0}", r.all_known_ms),
            format!("{:.0}", r.attach_ms),
            format!("{:.0}", r.reachable_ms),
            format!("{:.1}", r.etcd_requests_per_join),
            format!("{:.1}", r.etcd_txns_per_join),
            format!("{:.1}", r.etcd_ranges_per_join),
            format!("{:.1}", r.watch_events_per_join),
            format!("{:.1}/{:.1}", r.rss_mean_mib, r.rss_max_mib),
            if r.retry_causes.is_empty() {
                r.agents_retried.to_string()
            } else {
                let causes: Vec<String> = r
                    .retry_causes
                    .iter()
                    .map(|(c, k)| format!("{c} {k}"))
                    .collect();
                format!("{} ({})", r.agents_retried, causes.join(", "))
            },
            format!("{:.0}", r.agent_cpu_ms_mean),
            format!("{:.1} ({})", r.machine_cpu_s, r.cpus),
        ]);
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last())
        && b.nodes > a.nodes
    {
        let k = b.nodes as f64 / a.nodes as f64;
        t.note(format!(
            "{} -> {} hosts (x{k:.1}): all pairs reachable x{:.1}, all known x{:.1}, join p99 x{:.1}, watch events per join x{:.1}, CPU per agent x{:.1}, machine CPU x{:.1}",
            a.nodes,
            b.nodes,
            b.reachable_ms / a.reachable_ms,
            b.all_known_ms / a.all_known_ms,
            b.join_p99_ms / a.join_p99_ms.max(1.0),
            b.watch_events_per_join / a.watch_events_per_join.max(1.0),
            b.agent_cpu_ms_mean / a.agent_cpu_ms_mean.max(1.0),
            b.machine_cpu_s / a.machine_cpu_s.max(0.01),
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_ends_when_the_network_file_was_written() {
        let dir = std::env::temp_dir().join(format!("vxm-coldstart-{}", std::process::id()));
        let f = dir.join("net.json");
        let _ = std::fs::remove_dir_all(&dir);
        let now = Instant::now();
        assert!(written_at(&f, now).is_none());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&f, "{}").unwrap();
        let an_hour = Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - an_hour)
            .unwrap();
        let at = written_at(&f, now).unwrap();
        let age = now - at;
        assert!(
            age >= an_hour && age < an_hour + Duration::from_secs(5),
            "{age:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn etcd_counters_are_summed_by_kind() {
        let text = "\
# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server.
# TYPE grpc_server_msg_received_total counter
grpc_server_msg_received_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 12
grpc_server_msg_received_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 30
grpc_server_msg_received_total{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"} 100
etcd_debugging_mvcc_events_total 4.5e+03
etcd_mvcc_put_total 7
";
        let c = parse_counters(text);
        assert_eq!(c.get(REQUESTS), 142.0);
        assert_eq!(c.get(TXNS), 12.0);
        assert_eq!(c.get(RANGES), 30.0);
        assert_eq!(c.get(EVENTS), 4500.0);
    }
}
