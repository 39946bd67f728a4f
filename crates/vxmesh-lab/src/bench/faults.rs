//! `vxmesh bench faults`: the heavy variant of tests/etcd_faults.rs. One
//! etcd lab (3 members by default) of N hosts, the invariant checker running
//! throughout, and R rounds of the fault sequence: M agents joining at once,
//! a host partitioned from etcd for twice the TTL, the leader killed and
//! restarted, the leader paused and resumed, the cluster rolled back to a
//! snapshot taken at the start of the round. One row per fault and round:
//! samples, violations, the time from heal to convergence.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::Table;
use crate::lab::invariants::{CheckerOptions, InvariantChecker, InvariantReport};
use crate::lab::{Lab, LabGuard, LabSpec, LabStore};

/// What to run.
#[derive(Clone, Debug)]
pub struct FaultBenchOptions {
    /// Hosts before the first round (streams run among them, except host1).
    pub nodes: usize,
    /// Agents joining at once, per round.
    pub join: usize,
    pub etcd_members: usize,
    pub ttl_secs: u64,
    pub rounds: usize,
    pub exe: PathBuf,
}

/// One fault of one round, as the checker saw it.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRow {
    pub round: usize,
    pub fault: String,
    pub samples: u64,
    pub peer_checks: u64,
    pub replies: u64,
    pub lost: u64,
    pub violations: usize,
    /// From the heal to convergence (every window of the fault), worst.
    pub heal_ms: Option<u64>,
    /// The fault's own figure (join time, election time, outage).
    pub note: String,
    pub report: InvariantReport,
}

/// Run the rounds; a violation does not stop the bench (it is reported).
pub async fn run(o: &FaultBenchOptions) -> Result<Vec<FaultRow>> {
    if o.nodes < 3 {
        bail!("--nodes must be at least 3 (host1 is partitioned, the others stream)");
    }
    let mut spec = LabSpec::new(&super::lab_name("f"), o.nodes, 1);
    spec.store = LabStore::Etcd;
    spec.etcd_members = o.etcd_members;
    spec.ttl = Duration::from_secs(o.ttl_secs);
    spec.exe = o.exe.clone();
    let ttl = spec.ttl;
    let mut lab = LabGuard(Lab::up(&spec).await.context("fault bench lab")?);
    let streamed: Vec<String> = lab.info.nodes[1..].iter().map(|n| n.name.clone()).collect();
    let streamed: Vec<&str> = streamed.iter().map(|s| s.as_str()).collect();
    let mut rows = Vec::new();
    for round in 1..=o.rounds {
        let snap = lab.info.dir.join(format!("round{round}.db"));
        // Join: M agents at once.
        let c = InvariantChecker::start(&lab, CheckerOptions::new(ttl, &streamed)).await?;
        lab.save_etcd_snapshot(&snap).await?;
        let joined = lab.join_at_once(o.join, Duration::from_secs(120)).await?;
        let slowest = joined.iter().map(|(_, d)| *d).max().unwrap_or_default();
        rows.push(row(
            round,
            "join_at_once",
            c.stop().await?,
            format!(
                "{} joined, slowest {} ms",
                joined.len(),
                slowest.as_millis()
            ),
        ));
        // host1 cut off from etcd for twice the TTL.
        let c = InvariantChecker::start(&lab, CheckerOptions::new(ttl, &streamed)).await?;
        let w = c.fault("host1 cut off from etcd", &["host1"]);
        lab.partition("host1", true, &[])?;
        tokio::time::sleep(ttl * 2).await;
        lab.heal_partition("host1")?;
        c.healed(w);
        rows.push(row(
            round,
            "partition",
            c.stop().await?,
            format!("{} ms", (ttl * 2).as_millis()),
        ));
        // The leader killed, restarted.
        let c = InvariantChecker::start(&lab, CheckerOptions::new(ttl, &streamed)).await?;
        let leader = lab.etcd_leader().await?;
        let w = c.fault(&format!("leader {leader} killed"), &[]);
        lab.kill_member(&leader)?;
        let t0 = Instant::now();
        let next = lab.etcd_leader().await?;
        let elected = t0.elapsed();
        tokio::time::sleep((ttl * 2).saturating_sub(t0.elapsed())).await;
        lab.start_member(&leader).await?;
        c.healed(w);
        rows.push(row(
            round,
            "leader_killed",
            c.stop().await?,
            format!("{leader} -> {next} in {} ms", elected.as_millis()),
        ));
        // The leader paused, resumed.
        let c = InvariantChecker::start(&lab, CheckerOptions::new(ttl, &streamed)).await?;
        let leader = lab.etcd_leader().await?;
        let w = c.fault(&format!("leader {leader} paused"), &[]);
        lab.pause_member(&leader)?;
        tokio::time::sleep(ttl * 2).await;
        lab.resume_member(&leader)?;
        c.healed(w);
        rows.push(row(round, "leader_paused", c.stop().await?, leader.clone()));
        // Rolled back to the snapshot of the round's start: the joined
        // agents' records vanish.
        let c = InvariantChecker::start(&lab, CheckerOptions::new(ttl, &streamed)).await?;
        let names: Vec<String> = joined.iter().map(|(n, _)| n.clone()).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let w = c.fault("etcd restored from a snapshot", &refs);
        let t0 = Instant::now();
        lab.restore_etcd_snapshot(&snap).await?;
        let away = t0.elapsed();
        c.healed(w);
        rows.push(row(
            round,
            "snapshot_rollback",
            c.stop().await?,
            format!("etcd away {} ms", away.as_millis()),
        ));
    }
    Ok(rows)
}

fn row(round: usize, fault: &str, r: InvariantReport, note: String) -> FaultRow {
    eprintln!("{}", r.line(fault));
    for v in &r.violations {
        eprintln!(
            "  VIOLATION {} at {} ms node {}: {}",
            v.rule, v.first_ms, v.node, v.what
        );
    }
    FaultRow {
        round,
        fault: fault.to_string(),
        samples: r.samples,
        peer_checks: r.peer_checks,
        replies: r.replies_sent,
        lost: r.replies_lost,
        violations: r.violations.len(),
        heal_ms: r.worst_heal().map(|d| d.as_millis() as u64),
        note,
        report: r,
    }
}

pub fn table(rows: &[FaultRow]) -> Table {
    let mut t = Table::new(&[
        "fault",
        "round",
        "samples",
        "peer checks",
        "replies",
        "lost",
        "violations",
        "heal ms",
        "note",
    ]);
    for r in rows {
        t.row(vec![
            r.fault.clone(),
            r.round.to_string(),
            r.samples.to_string(),
            r.peer_checks.to_string(),
            r.replies.to_string(),
            r.lost.to_string(),
            r.violations.to_string(),
            r.heal_ms
                .map(|m| m.to_string())
                .unwrap_or_else(|| "never".into()),
            r.note.clone(),
        ]);
    }
    let total: usize = rows.iter().map(|r| r.violations).sum();
    t.note(format!("{total} violations in all"));
    t
}
