//! The invariant checker that runs through every fault test of an etcd lab.
//! At a fixed interval it samples etcd (the records under the prefix) and
//! every node's kernel (subnet, peer entries, containers' addresses) and
//! checks the promises of [`rules`]: no subnet or address used by two nodes
//! at once, no live node's record disappearing, every node's peers equal to
//! the live members within a grace period (TTL + settle window + 2 s) after a fault heals;
//! meanwhile continuous echo streams between the nodes no fault touches
//! count every lost reply. Tests say when a fault starts and heals
//! ([`InvariantChecker::fault`], [`InvariantChecker::healed`]); membership
//! changes (agents stopped, started or joined) open a window of their own.
//! The report gives the number of samples and every violation with its
//! time, node and what.

pub mod rules;
pub mod sample;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use self::rules::{Excuses, Rule, Sample, Violation, check};
use self::sample::{Connections, LabPlace, joining_nodes, live_nodes, read_etcd, read_info};
use super::Lab;
use crate::probe::{self, PairJob, ProbeStream};
use vxmesh::dataplane::netns::Netns;
use vxmesh::store::etcd::{DEFAULT_PREFIX, settle_window};

/// How the checker samples and what it streams.
#[derive(Clone, Debug)]
pub struct CheckerOptions {
    /// Time between samples.
    pub interval: Duration,
    /// How long after a fault heals peers may still differ: TTL + settle
    /// window + 2 s (a node whose lease ended is kept by its peers for the
    /// settle window, min(TTL, 2 s), after its records vanish).
    pub grace: Duration,
    /// Nodes between whose containers echo streams run: the nodes no fault
    /// will touch. Up to 4 containers: every pair; more: a ring.
    pub stream_nodes: Vec<String>,
    pub stream_interval: Duration,
}

impl CheckerOptions {
    /// Sampling every 250 ms, grace TTL + settle + 2 s, streams every 20 ms.
    pub fn new(ttl: Duration, stream_nodes: &[&str]) -> Self {
        CheckerOptions {
            interval: Duration::from_millis(250),
            grace: ttl + settle_window(ttl) + Duration::from_secs(2),
            stream_nodes: stream_nodes.iter().map(|s| s.to_string()).collect(),
            stream_interval: Duration::from_millis(20),
        }
    }
}

/// A fault (or membership change) as the checker saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    pub label: String,
    /// Nodes whose records are excused while it lasts.
    pub nodes: BTreeSet<String>,
    pub started_ms: u64,
    pub healed_ms: Option<u64>,
    /// From the heal to the first sample where peers equalled the live
    /// members and every live node's records were there.
    pub converged_after_ms: Option<u64>,
}

/// A violation seen in one or more consecutive samples.
#[derive(Clone, Debug, Serialize)]
pub struct ViolationRun {
    pub rule: &'static str,
    pub node: String,
    pub what: String,
    pub first_ms: u64,
    pub last_ms: u64,
    pub samples: u64,
}

/// One echo stream's count.
#[derive(Clone, Debug, Serialize)]
pub struct StreamCount {
    pub pair: String,
    pub sent: u64,
    pub lost: u64,
}

/// What the checker saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InvariantReport {
    pub duration_ms: u64,
    pub samples: u64,
    /// Samples in which etcd answered (the others checked kernels only).
    pub etcd_samples: u64,
    /// Samples in which the peer rule was enforced.
    pub peer_checks: u64,
    /// Live-node record checks enforced (one per node and sample).
    pub record_checks: u64,
    /// Lowest and highest etcd revision seen (a rollback shows as a drop).
    pub revisions: Vec<i64>,
    pub replies_sent: u64,
    pub replies_lost: u64,
    pub streams: Vec<StreamCount>,
    pub windows: Vec<Window>,
    pub violations: Vec<ViolationRun>,
}

impl InvariantReport {
    /// The longest time from a heal to convergence, over every window.
    pub fn worst_heal(&self) -> Option<Duration> {
        self.windows
            .iter()
            .filter_map(|w| w.converged_after_ms)
            .max()
            .map(Duration::from_millis)
    }

    /// One line, as the tests print and docs/reliability.md quotes.
    pub fn line(&self, fault: &str) -> String {
        let heals: Vec<String> = self
            .windows
            .iter()
            .filter(|w| w.healed_ms.is_some())
            .map(|w| match w.converged_after_ms {
                Some(ms) => format!("{}:{ms}ms", w.label.replace(' ', "_")),
                None => format!("{}:never", w.label.replace(' ', "_")),
            })
            .collect();
        format!(
            "invariants fault={fault} samples={} etcd_samples={} peer_checks={} record_checks={} replies={} lost={} violations={} heal=[{}]",
            self.samples,
            self.etcd_samples,
            self.peer_checks,
            self.record_checks,
            self.replies_sent,
            self.replies_lost,
            self.violations.len(),
            heals.join(",")
        )
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} samples over {} ms ({} with etcd, {} peer checks, {} record checks), revisions {:?}, {} replies sent, {} lost",
            self.samples,
            self.duration_ms,
            self.etcd_samples,
            self.peer_checks,
            self.record_checks,
            self.revisions,
            self.replies_sent,
            self.replies_lost
        )?;
        for w in &self.windows {
            writeln!(
                f,
                "  window '{}' nodes {:?}: {} ms .. {:?} ms, converged {:?} ms after the heal",
                w.label, w.nodes, w.started_ms, w.healed_ms, w.converged_after_ms
            )?;
        }
        for v in &self.violations {
            writeln!(
                f,
                "  VIOLATION {} at {}..{} ms ({} samples) node {}: {}",
                v.rule, v.first_ms, v.last_ms, v.samples, v.node, v.what
            )?;
        }
        Ok(())
    }
}

/// State shared between the sampling task and the test.
#[derive(Default)]
struct Shared {
    windows: Vec<Window>,
    report: InvariantReport,
    /// Runs still open: (rule, node, what) -> index into report.violations.
    open_runs: BTreeMap<(Rule, String, String), usize>,
    last_live: Option<BTreeSet<String>>,
}

/// Which window a test opened.
#[derive(Clone, Copy, Debug)]
pub struct WindowId(usize);

/// A running checker: a sampling task plus the echo streams.
pub struct InvariantChecker {
    shared: Arc<Mutex<Shared>>,
    stop: StopOnDrop,
    task: tokio::task::JoinHandle<()>,
    streams: Vec<(String, ProbeStream, Duration)>,
    t0: Instant,
    opts: CheckerOptions,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl InvariantChecker {
    /// Start sampling `lab` (an etcd lab) and streaming between the
    /// containers of `opts.stream_nodes` (which must all answer first).
    pub async fn start(lab: &Lab, opts: CheckerOptions) -> Result<InvariantChecker> {
        let e = lab.etcd()?;
        let place = LabPlace {
            dir: lab.info.dir.clone(),
            underlay_ns: lab.info.underlay_ns.clone(),
            etcd_urls: e.members.iter().map(|m| m.client_url()).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
        };
        let streams = start_streams(lab, &opts).await?;
        let t0 = Instant::now();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(place, opts.clone(), t0, shared.clone(), stop.clone()));
        Ok(InvariantChecker {
            shared,
            stop: StopOnDrop(stop),
            task,
            streams,
            t0,
            opts,
        })
    }

    /// A fault starts now; the records of `nodes` are excused until it has
    /// healed plus the grace period, and peers everywhere meanwhile.
    pub fn fault(&self, label: &str, nodes: &[&str]) -> WindowId {
        let mut s = self.shared.lock().expect("checker state");
        s.windows.push(Window {
            label: label.to_string(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            started_ms: ms(self.t0.elapsed()),
            healed_ms: None,
            converged_after_ms: None,
        });
        WindowId(s.windows.len() - 1)
    }

    /// The fault of `id` is healed now.
    pub fn healed(&self, id: WindowId) {
        let mut s = self.shared.lock().expect("checker state");
        s.windows[id.0].healed_ms = Some(ms(self.t0.elapsed()));
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.shared.lock().expect("checker state").report.samples
    }

    /// Stop: first wait until every window has healed and its grace period
    /// has passed (plus two samples), so that the peer rule is enforced
    /// after each heal; then stop the streams and return the report. A
    /// window never healed is an error.
    pub async fn stop(self) -> Result<InvariantReport> {
        let (last_heal, open) = {
            let s = self.shared.lock().expect("checker state");
            let open: Vec<String> = s
                .windows
                .iter()
                .filter(|w| w.healed_ms.is_none())
                .map(|w| w.label.clone())
                .collect();
            (s.windows.iter().filter_map(|w| w.healed_ms).max(), open)
        };
        if !open.is_empty() {
            self.stop.0.store(true, Ordering::Release);
            bail!("faults never healed: {}", open.join(", "));
        }
        let until = Duration::from_millis(last_heal.unwrap_or(0))
            + self.opts.grace
            + self.opts.interval * 3;
        tokio::time::sleep(until.saturating_sub(self.t0.elapsed())).await;
        self.stop.0.store(true, Ordering::Release);
        self.task.await.context("the sampling task failed")?;
        let mut s = self.shared.lock().expect("checker state");
        let mut report = std::mem::take(&mut s.report);
        report.windows = s.windows.clone();
        report.duration_ms = ms(self.t0.elapsed());
        for (pair, stream, interval) in self.streams {
            let st = stream.stop();
            report.replies_sent += st.sent;
            report.replies_lost += st.lost;
            if st.lost > 0 || st.error.is_some() {
                let first = st.lost_seqs.first().copied().unwrap_or(0);
                let last = st.lost_seqs.last().copied().unwrap_or(0);
                report.violations.push(ViolationRun {
                    rule: Rule::LostReplies.name(),
                    node: pair.clone(),
                    what: format!(
                        "{} of {} replies lost (sequence numbers {:?}){}",
                        st.lost,
                        st.sent,
                        &st.lost_seqs[..st.lost_seqs.len().min(20)],
                        st.error.map(|e| format!(", {e}")).unwrap_or_default()
                    ),
                    first_ms: ms(interval * first as u32),
                    last_ms: ms(interval * last as u32),
                    samples: st.lost,
                });
            }
            report.streams.push(StreamCount {
                pair,
                sent: st.sent,
                lost: st.lost,
            });
        }
        Ok(report)
    }
}

/// Stops the sampling task when the checker is dropped (a test that panics).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Echo streams between the containers of `opts.stream_nodes`, once every
/// such pair answers (10 s at most).
async fn start_streams(
    lab: &Lab,
    opts: &CheckerOptions,
) -> Result<Vec<(String, ProbeStream, Duration)>> {
    let cs: Vec<_> = lab
        .info
        .containers
        .iter()
        .filter(|c| opts.stream_nodes.contains(&c.node))
        .collect();
    let pairs: Vec<(usize, usize)> = if cs.len() <= 4 {
        (0..cs.len())
            .flat_map(|i| (i + 1..cs.len()).map(move |j| (i, j)))
            .collect()
    } else {
        (0..cs.len()).map(|i| (i, (i + 1) % cs.len())).collect()
    };
    let jobs: Vec<PairJob> = pairs
        .iter()
        .map(|&(i, j)| PairJob::new(&cs[i].netns, cs[j].ip))
        .collect();
    let t0 = Instant::now();
    loop {
        let j = jobs.clone();
        let all = tokio::task::spawn_blocking(move || {
            probe::probe_pairs(&j, Duration::from_millis(200))
                .iter()
                .all(|r| r.reached)
        })
        .await?;
        if all {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "the pairs among {:?} do not answer before the checker starts",
                opts.stream_nodes
            );
        }
    }
    let mut out = Vec::new();
    for (i, j) in pairs {
        let s = probe::continuous(&Netns::open(&cs[i].netns)?, cs[j].ip, opts.stream_interval)?;
        out.push((
            format!("{}->{}", cs[i].name, cs[j].name),
            s,
            opts.stream_interval,
        ));
    }
    Ok(out)
}

/// The sampling loop.
async fn run(
    place: LabPlace,
    opts: CheckerOptions,
    t0: Instant,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
) {
    let mut conns = Connections::default();
    let mut prefer = 0;
    let ul = Netns::open(&place.underlay_ns).ok();
    while !stop.load(Ordering::Acquire) {
        let tick = Instant::now();
        let Ok(info) = read_info(&place.dir) else {
            tokio::time::sleep(opts.interval).await;
            continue;
        };
        let etcd = match &ul {
            Some(ns) => {
                let (urls, prefix) = (place.etcd_urls.clone(), place.prefix.clone());
                ns.run_async(move || async move {
                    Ok::<_, vxmesh::dataplane::netns::NetnsError>(
                        read_etcd(urls, prefer, prefix).await,
                    )
                })
                .await
                .unwrap_or((None, prefer))
            }
            None => (None, prefer),
        };
        prefer = etcd.1;
        let nodes = conns.kernels(&info).await;
        let sample = Sample {
            at: t0.elapsed(),
            routed: info.mode == vxmesh::config::Mode::Routed,
            etcd: etcd.0,
            nodes,
            live: live_nodes(&info),
            joining: joining_nodes(&info),
        };
        record(&shared, &sample, opts.grace);
        let spent = tick.elapsed();
        tokio::time::sleep(opts.interval.saturating_sub(spent)).await;
    }
}

/// Check one sample against the windows open at its time and record the verdict.
fn record(shared: &Mutex<Shared>, sample: &Sample, grace: Duration) {
    let mut s = shared.lock().expect("checker state");
    let now = ms(sample.at);
    // Membership changes open a window of their own, healed at once.
    if let Some(prev) = s.last_live.clone()
        && prev != sample.live
    {
        let changed: BTreeSet<String> = prev.symmetric_difference(&sample.live).cloned().collect();
        s.windows.push(Window {
            label: format!(
                "membership {}",
                changed.iter().cloned().collect::<Vec<_>>().join("+")
            ),
            nodes: changed,
            started_ms: now,
            healed_ms: Some(now),
            converged_after_ms: None,
        });
    }
    s.last_live = Some(sample.live.clone());
    let grace = ms(grace);
    let mut ex = Excuses::default();
    for w in &s.windows {
        let active = w.healed_ms.is_none_or(|h| now < h + grace);
        if active {
            ex.peers = true;
            ex.records.extend(w.nodes.iter().cloned());
        }
    }
    let verdict = check(sample, &ex);
    for w in s.windows.iter_mut() {
        if let Some(h) = w.healed_ms
            && now >= h
            && w.converged_after_ms.is_none()
            && verdict.converged
        {
            w.converged_after_ms = Some(now - h);
        }
    }
    let r = &mut s.report;
    r.samples += 1;
    if let Some(e) = &sample.etcd {
        r.etcd_samples += 1;
        match r.revisions.as_mut_slice() {
            [] => r.revisions = vec![e.revision, e.revision],
            [lo, hi] => {
                *lo = (*lo).min(e.revision);
                *hi = (*hi).max(e.revision);
            }
            _ => {}
        }
    }
    if verdict.peers_checked {
        r.peer_checks += 1;
    }
    r.record_checks += verdict.records_checked;
    // Consecutive samples with the same violation make one run.
    let seen: BTreeSet<(Rule, String, String)> = verdict
        .violations
        .iter()
        .map(|v: &Violation| (v.rule, v.node.clone(), v.what.clone()))
        .collect();
    s.open_runs.retain(|k, _| seen.contains(k));
    for key in seen {
        if let Some(&i) = s.open_runs.get(&key) {
            let run = &mut s.report.violations[i];
            run.last_ms = now;
            run.samples += 1;
        } else {
            s.report.violations.push(ViolationRun {
                rule: key.0.name(),
                node: key.1.clone(),
                what: key.2.clone(),
                first_ms: now,
                last_ms: now,
                samples: 1,
            });
            let i = s.report.violations.len() - 1;
            s.open_runs.insert(key, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rules::{EtcdView, NodeView, StoredNode};
    use super::*;
    use std::net::Ipv4Addr;

    fn sample(at_ms: u64, live: &[&str], peers_ok: bool) -> Sample {
        let mut s = Sample {
            at: Duration::from_millis(at_ms),
            routed: true,
            ..Default::default()
        };
        let mut e = EtcdView::default();
        for (i, n) in ["host1", "host2"].iter().enumerate() {
            let sub = format!("172.18.{}.0/24", i + 1).parse().unwrap();
            let ul = Ipv4Addr::new(198, 18, 0, i as u8 + 1);
            e.claims.insert(("demo".into(), sub), n.to_string());
            e.nodes.insert(
                ("demo".into(), n.to_string()),
                StoredNode {
                    subnet: sub,
                    underlay_ip: ul,
                },
            );
            s.nodes.insert(
                n.to_string(),
                NodeView {
                    underlay_ip: ul,
                    subnet: Some(sub),
                    ..Default::default()
                },
            );
        }
        s.live = live.iter().map(|n| n.to_string()).collect();
        s.etcd = Some(e);
        for n in ["host1", "host2"] {
            let want = if peers_ok {
                rules::expected_peers(&s, n)
            } else {
                Default::default()
            };
            s.nodes.get_mut(n).unwrap().peers = want;
        }
        s
    }

    #[test]
    fn a_fault_excuses_peers_until_grace_after_its_heal_and_measures_convergence() {
        let shared = Mutex::new(Shared::default());
        let grace = Duration::from_secs(5);
        shared.lock().unwrap().windows.push(Window {
            label: "partition".into(),
            nodes: ["host1".to_string()].into(),
            started_ms: 0,
            healed_ms: Some(1000),
            converged_after_ms: None,
        });
        let both = ["host1", "host2"];
        record(&shared, &sample(500, &both, false), grace);
        record(&shared, &sample(2000, &both, false), grace);
        record(&shared, &sample(3000, &both, true), grace);
        {
            let s = shared.lock().unwrap();
            assert!(s.report.violations.is_empty());
            assert_eq!(s.windows[0].converged_after_ms, Some(2000));
            assert_eq!(s.report.peer_checks, 0);
        }
        // Past the grace period, wrong peers count, once per run.
        record(&shared, &sample(6500, &both, false), grace);
        record(&shared, &sample(6750, &both, false), grace);
        record(&shared, &sample(7000, &both, true), grace);
        let s = shared.lock().unwrap();
        assert_eq!(s.report.samples, 6);
        assert_eq!(s.report.peer_checks, 3);
        assert_eq!(s.report.violations.len(), 2, "{:?}", s.report.violations);
        let v = &s.report.violations[0];
        assert_eq!((v.first_ms, v.last_ms, v.samples), (6500, 6750, 2));
        assert_eq!(v.rule, "peers-not-live-members");
    }

    #[test]
    fn a_membership_change_opens_a_window_of_its_own() {
        let shared = Mutex::new(Shared::default());
        let grace = Duration::from_secs(5);
        record(&shared, &sample(0, &["host1", "host2"], true), grace);
        // host2's agent stopped: host1 still routes to it, excused for a while.
        record(&shared, &sample(250, &["host1"], false), grace);
        let s = shared.lock().unwrap();
        assert_eq!(s.windows.len(), 1);
        assert_eq!(s.windows[0].label, "membership host2");
        assert!(s.report.violations.is_empty(), "{:?}", s.report.violations);
    }
}
