//! `vxmesh bench converge`: how fast an etcd cluster of N hosts takes a new
//! host in, and lets a crashed one go.
//!
//! Join: a host (namespace, underlay link) is made first; the clock starts
//! when its agent starts and stops when every container pair between the new
//! host and all others answers ICMP in both directions. That includes the
//! subnet claim in etcd, the peers' watch and reconcile, and attaching the new
//! host's container (reported separately too).
//!
//! Crash: the host that just joined gets `kill -9`; the clock stops when no
//! peer's kernel holds a route to its subnet or an FDB entry towards its
//! underlay address any more. The lease TTL bounds the part etcd owns, so the
//! report gives the total, the total minus the TTL, and the time from the
//! lease's expiry (the node record's delete, seen by a watch of the bench's
//! own) to the peers' cleanup, which is vxmesh's part.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{EventType, WatchOptions};
use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use serde::Serialize;

use super::{Summary, Table, ms};
use crate::lab::{Lab, LabGuard, LabSpec, LabStore, MAX_HOST};
use crate::probe::{self, PairJob};
use vxmesh::config::Mode;
use vxmesh::dataplane::kernel::Netlink;
use vxmesh::dataplane::netns::Netns;
use vxmesh::store::etcd;

/// Per probe attempt; a round over unreached pairs takes up to 3 of these.
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);
const JOIN_LIMIT: Duration = Duration::from_secs(60);

pub struct ConvergeOptions {
    /// Lab sizes (hosts before a join).
    pub nodes: Vec<usize>,
    /// Joins (and crashes) per size.
    pub joins: usize,
    pub mode: Mode,
    /// Lease TTL of the agents, seconds.
    pub ttl_secs: u64,
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConvergeRow {
    pub mode: String,
    pub nodes: usize,
    pub ttl_ms: f64,
    /// Agent start -> all pairs with the new host reachable.
    pub join_ms: Summary,
    /// Agent start -> subnet claimed and the network published locally.
    pub join_ready_ms: Summary,
    /// Attaching the new host's container (part of `join_ms`).
    pub join_attach_ms: Summary,
    /// kill -9 -> no peer holds its entries.
    pub crash_cleanup_ms: Summary,
    /// `crash_cleanup_ms` minus the TTL (negative: the lease had been
    /// renewed less than a TTL before the kill).
    pub crash_beyond_ttl_ms: Summary,
    /// Lease expiry (the node record's delete in etcd) -> peers clean.
    pub expiry_to_cleanup_ms: Summary,
    pub join_samples_ms: Vec<f64>,
    pub crash_samples_ms: Vec<f64>,
}

pub async fn run(o: &ConvergeOptions) -> Result<Vec<ConvergeRow>> {
    if o.joins == 0 {
        bail!("--joins must be at least 1");
    }
    let mut rows = Vec::new();
    for &n in &o.nodes {
        // Each join adds a host to the N.
        if !(2..=MAX_HOST - o.joins).contains(&n) {
            bail!(
                "--nodes values must be 2..={} with {} joins (got {n})",
                MAX_HOST - o.joins,
                o.joins
            );
        }
        rows.push(one_size(o, n).await?);
    }
    Ok(rows)
}

async fn one_size(o: &ConvergeOptions, n: usize) -> Result<ConvergeRow> {
    let mut spec = LabSpec::new(&super::lab_name("c"), n, 1);
    spec.mode = o.mode;
    spec.store = LabStore::Etcd;
    spec.ttl = Duration::from_secs(o.ttl_secs);
    spec.exe = o.exe.clone();
    let mut lab = LabGuard(Lab::up(&spec).await.context("converge lab")?);
    let ttl = Duration::from_secs(lab.etcd()?.ttl_secs);
    // The starting point: host1's container reaches every other one and
    // back. (Not the whole N x N matrix: at 50 hosts its bursts of
    // concurrent probes lose replies on a 2-core machine, see docs/benchmarks.md.)
    let first = lab.info.nodes[0].name.clone();
    wait_reachable(pairs_with(&lab, &first), Instant::now() + JOIN_LIMIT)
        .await
        .with_context(|| format!("the {n}-host lab did not converge"))?;
    let (mut join, mut ready, mut attach) = (Vec::new(), Vec::new(), Vec::new());
    let (mut crash, mut expiry) = (Vec::new(), Vec::new());
    for j in 0..o.joins {
        let node = lab.add_host().await?;
        let t0 = Instant::now();
        lab.start_agent(&node)?;
        lab.wait_agent_ready(&node, Duration::from_secs(30)).await?;
        ready.push(ms(t0.elapsed()));
        let t1 = Instant::now();
        lab.attach_node_containers(&node).await?;
        attach.push(ms(t1.elapsed()));
        wait_reachable(pairs_with(&lab, &node), t0 + JOIN_LIMIT)
            .await
            .with_context(|| format!("join {} of {node}", j + 1))?;
        join.push(ms(t0.elapsed()));
        let (total, after_expiry) = crash_one(&mut lab, &node, ttl)
            .await
            .with_context(|| format!("crash {} of {node}", j + 1))?;
        crash.push(ms(total));
        expiry.push(ms(after_expiry));
        tracing::info!(
            "{n} hosts, join {}: {:.0} ms; crash cleanup {:.0} ms",
            j + 1,
            join[j],
            crash[j]
        );
    }
    drop(lab);
    let beyond: Vec<f64> = crash.iter().map(|c| c - ms(ttl)).collect();
    Ok(ConvergeRow {
        mode: o.mode.to_string(),
        nodes: n,
        ttl_ms: ms(ttl),
        join_ms: Summary::of(&join),
        join_ready_ms: Summary::of(&ready),
        join_attach_ms: Summary::of(&attach),
        crash_cleanup_ms: Summary::of(&crash),
        crash_beyond_ttl_ms: Summary::of(&beyond),
        expiry_to_cleanup_ms: Summary::of(&expiry),
        join_samples_ms: join,
        crash_samples_ms: crash,
    })
}

/// Both directions between `node`'s containers and every other container.
fn pairs_with(lab: &Lab, node: &str) -> Vec<PairJob> {
    let cs = &lab.info.containers;
    let mut jobs = Vec::new();
    for a in cs.iter().filter(|c| c.node == node) {
        for b in cs
            .iter()
            .filter(|c| c.node != node && c.network == a.network)
        {
            jobs.push(PairJob::new(&a.netns, b.ip));
            jobs.push(PairJob::new(&b.netns, a.ip));
        }
    }
    jobs
}

/// Probe until every pair has answered once; an error names those that never did.
pub(super) async fn wait_reachable(mut pending: Vec<PairJob>, deadline: Instant) -> Result<()> {
    if pending.is_empty() {
        bail!("no container pairs to probe");
    }
    tokio::task::spawn_blocking(move || {
        loop {
            let res = probe::probe_pairs(&pending, PROBE_TIMEOUT);
            let mut left = Vec::new();
            for (job, r) in pending.into_iter().zip(&res) {
                if !r.reached {
                    left.push(job);
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            if let Some(r) = res.iter().find(|r| !r.reached) {
                tracing::debug!(left = left.len(), "pairs not reached yet, e.g. {r}");
            }
            if Instant::now() > deadline {
                let some: Vec<String> = res
                    .iter()
                    .filter(|r| !r.reached)
                    .take(5)
                    .map(|r| r.to_string())
                    .collect();
                bail!(
                    "{} pair(s) still unreachable, e.g. {}",
                    left.len(),
                    some.join("; ")
                );
            }
            pending = left;
        }
    })
    .await
    .context("probe thread")?
}

/// Does a peer's kernel still hold anything of the node at `ip` / `subnets`?
async fn holds(nl: &Netlink, ip: Ipv4Addr, subnets: &[Ipv4Net]) -> Result<bool> {
    let a = nl.dump().await?;
    Ok(
        a.fdb.iter().any(|f| f.dst == Some(ip))
            || a.routes.iter().any(|r| subnets.contains(&r.dst)),
    )
}

/// `kill -9` the agent of `node`; returns (kill -> peers clean, lease expiry -> peers clean).
async fn crash_one(lab: &mut Lab, node: &str, ttl: Duration) -> Result<(Duration, Duration)> {
    let n = lab.node(node)?.clone();
    let subnets: Vec<Ipv4Net> = n.subnets.values().copied().collect();
    let mut peers = Vec::new();
    for p in lab.info.nodes.iter().filter(|p| p.name != node) {
        peers.push(Netlink::connect_in(&Netns::open(&p.netns)?).await?);
    }
    for p in &peers {
        if !holds(p, n.underlay_ip, &subnets).await? {
            bail!(
                "{} holds no entries of {node} before the crash",
                p.namespace()
            );
        }
    }
    // Watch the node record (one per network; the first will do: one lease
    // carries them all) so the lease's expiry is seen when it happens.
    let net = lab.etcd()?.networks[0].clone();
    let key = format!(
        "{}/networks/{net}/nodes/{node}",
        etcd::DEFAULT_PREFIX.trim_end_matches('/')
    );
    let co = lab.etcd()?.client_options();
    let ul = Netns::open(&lab.info.underlay_ns)?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let limit = ttl + Duration::from_secs(30);
    let watch = tokio::spawn(async move {
        ul.run_async(move || watch_delete(co, key, ready_tx, limit))
            .await
    });
    ready_rx
        .await
        .context("the etcd watch of the node record did not start")?;
    let t_kill = Instant::now();
    lab.stop_agent(node, Signal::SIGKILL)?;
    let deadline = t_kill + limit;
    loop {
        let mut any = false;
        for p in &peers {
            if holds(p, n.underlay_ip, &subnets).await? {
                any = true;
                break;
            }
        }
        if !any {
            break;
        }
        if Instant::now() > deadline {
            bail!("peers still hold entries of {node} {limit:?} after its crash");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_clean = Instant::now();
    let t_expired = watch.await.context("watch task")??;
    lab.remove_node(node, true).await?;
    Ok((
        t_clean - t_kill,
        t_clean.saturating_duration_since(t_expired),
    ))
}

/// Inside the underlay namespace: watch `key` and return when it is deleted.
async fn watch_delete(
    co: etcd::ClientOptions,
    key: String,
    ready: tokio::sync::oneshot::Sender<()>,
    limit: Duration,
) -> Result<Instant> {
    let c = etcd::connect(&co).await?;
    let got = etcd::op(format!("get {key}"), c.kv_client().get(key.clone(), None)).await?;
    if got.kvs().is_empty() {
        bail!("{key} is not in etcd");
    }
    let rev = got.header().map(|h| h.revision()).unwrap_or(0);
    let opts = WatchOptions::new().with_start_revision(rev + 1);
    let mut wc = c.watch_client();
    let mut stream = etcd::op(format!("watch {key}"), wc.watch(key.clone(), Some(opts))).await?;
    let _ = ready.send(());
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .with_context(|| format!("{key} not deleted within {limit:?}"))?
            .with_context(|| format!("watch {key}"))?
            .with_context(|| format!("watch {key}: stream closed"))?;
        if msg
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            return Ok(Instant::now());
        }
    }
}

pub fn table(rows: &[ConvergeRow]) -> Table {
    let mut t = Table::new(&[
        "mode",
        "hosts",
        "joins",
        "join p50 ms",
        "join p90 ms",
        "ready p50",
        "attach p50",
        "crash p50 ms",
        "crash p90 ms",
        "ttl ms",
        "beyond ttl p50",
        "expiry->clean p50",
        "expiry->clean p90",
    ]);
    for r in rows {
        t.row(vec![
            r.mode.clone(),
            r.nodes.to_string(),
            r.join_ms.n.to_string(),
            format!("{:.0}", r.join_ms.p50),
            format!("{:.0}", r.join_ms.p90),
            format!("{:.0}", r.join_ready_ms.p50),
            format!("{:.0}", r.join_attach_ms.p50),
            format!("{:.0}", r.crash_cleanup_ms.p50),
            format!("{:.0}", r.crash_cleanup_ms.p90),
            format!("{:.0}", r.ttl_ms),
            format!("{:.0}", r.crash_beyond_ttl_ms.p50),
            format!("{:.0}", r.expiry_to_cleanup_ms.p50),
            format!("{:.0}", r.expiry_to_cleanup_ms.p90),
        ]);
    }
    t
}
