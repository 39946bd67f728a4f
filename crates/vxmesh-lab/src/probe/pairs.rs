//! The concurrent all-pairs echo matrix of `vxmesh lab check`.

use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vxmesh::dataplane::netns::Netns;
use vxmesh::icmp::DEFAULT_PAYLOAD;
use vxmesh::icmp::{EchoSocket, Event, PAIR_ATTEMPTS, PAIR_THREADS, local_refusal, ms};

/// One probe of the matrix: from a namespace (by name) to an address.
#[derive(Clone, Debug, Serialize)]
pub struct PairJob {
    pub src_ns: String,
    pub src_label: String,
    pub dst: Ipv4Addr,
    pub dst_label: String,
    /// false: the pair must be isolated, and a reply is the failure.
    pub expect_reach: bool,
}

impl PairJob {
    /// A pair that must reach, labelled by namespace name and address.
    pub fn new(src_ns: &str, dst: Ipv4Addr) -> Self {
        PairJob {
            src_ns: src_ns.to_string(),
            src_label: src_ns.to_string(),
            dst,
            dst_label: dst.to_string(),
            expect_reach: true,
        }
    }
}

/// The outcome of one [`PairJob`].
#[derive(Clone, Debug, Serialize)]
pub struct PairResult {
    pub src_ns: String,
    pub src_label: String,
    pub dst: Ipv4Addr,
    pub dst_label: String,
    pub expect_reach: bool,
    pub reached: bool,
    /// Echo requests sent (or tried) for this pair.
    pub attempts: u32,
    pub rtt_ms: Option<f64>,
    /// Why it was not reached, when known (refusal, setup error).
    pub detail: Option<String>,
}

impl PairResult {
    /// Whether the pair behaved as expected (reached, or isolated).
    pub fn ok(&self) -> bool {
        self.reached == self.expect_reach
    }

    fn from_job(job: &PairJob) -> Self {
        PairResult {
            src_ns: job.src_ns.clone(),
            src_label: job.src_label.clone(),
            dst: job.dst,
            dst_label: job.dst_label.clone(),
            expect_reach: job.expect_reach,
            reached: false,
            attempts: 0,
            rtt_ms: None,
            detail: None,
        }
    }
}

impl fmt::Display for PairResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected = if self.expect_reach {
            "must reach"
        } else {
            "must be isolated"
        };
        write!(
            f,
            "{} (netns {}) -> {} ({}) {expected}: ",
            self.src_label, self.src_ns, self.dst_label, self.dst
        )?;
        match (self.reached, self.rtt_ms) {
            (true, Some(rtt)) => write!(f, "reply in {rtt:.3} ms (attempt {})", self.attempts)?,
            (true, None) => write!(f, "reply (attempt {})", self.attempts)?,
            (false, _) => write!(f, "no reply after {} attempt(s)", self.attempts)?,
        }
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// Probe every job concurrently and return one result per job, in order. Jobs
/// are grouped by source namespace: one socket per namespace sends all of its
/// requests at once; up to [`PAIR_THREADS`] namespaces are probed in parallel.
/// A pair gets up to [`PAIR_ATTEMPTS`] requests, each waited for up to
/// `timeout` (an isolated pair therefore takes the whole 3 × `timeout`).
pub fn probe_pairs(jobs: &[PairJob], timeout: Duration) -> Vec<PairResult> {
    // At most this many pairs per socket, so `index * ATTEMPTS + attempt` fits the sequence number.
    const PER_SOCKET: usize = 16_384;
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_ns: HashMap<&str, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let g = *by_ns.entry(job.src_ns.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    let groups: Vec<&[usize]> = groups.iter().flat_map(|g| g.chunks(PER_SOCKET)).collect();
    let next = AtomicUsize::new(0);
    let mut results: Vec<PairResult> = jobs.iter().map(PairResult::from_job).collect();
    let done: Vec<(usize, PairResult)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..PAIR_THREADS.min(groups.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while let Some(group) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let mut res: Vec<PairResult> = group
                            .iter()
                            .map(|&i| PairResult::from_job(&jobs[i]))
                            .collect();
                        probe_group(&mut res, timeout);
                        out.extend(group.iter().copied().zip(res));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    for (i, r) in done {
        results[i] = r;
    }
    results
}

/// Probe pairs that share a source namespace, all from one socket.
fn probe_group(res: &mut [PairResult], timeout: Duration) {
    let src = res[0].src_ns.clone();
    let opened = Netns::open(&src)
        .map_err(anyhow::Error::from)
        .and_then(|ns| Ok(EchoSocket::open(&ns, DEFAULT_PAYLOAD, false)?));
    let mut sock = match opened {
        Ok(sock) => sock,
        Err(e) => {
            for r in res.iter_mut() {
                r.detail = Some(format!("cannot probe from '{src}': {e:#}"));
            }
            return;
        }
    };
    let attempts = usize::from(PAIR_ATTEMPTS);
    let mut sent_at: Vec<Option<Instant>> = vec![None; res.len() * attempts];
    for attempt in 0..attempts {
        let mut pending = vec![false; res.len()];
        let mut waiting = 0;
        for (k, r) in res.iter_mut().enumerate().filter(|(_, r)| !r.reached) {
            r.attempts += 1;
            let seq = k * attempts + attempt;
            match sock.send(r.dst, seq as u16) {
                Ok(()) => {
                    sent_at[seq] = Some(Instant::now());
                    pending[k] = true;
                    waiting += 1;
                }
                Err(e) => {
                    r.detail = Some(
                        local_refusal(&e).map_or_else(|| format!("send: {e}"), |r| r.to_string()),
                    )
                }
            }
        }
        let deadline = Instant::now() + timeout;
        while waiting > 0 {
            let (seq, from, reply_at, refusal) = match sock.next_event(deadline) {
                Ok(None) => break,
                Ok(Some(Event::Reply { from, seq, at })) => (seq, from, Some(at), None),
                Ok(Some(Event::Error {
                    orig_dst,
                    seq,
                    reason,
                })) => (seq, orig_dst, None, Some(reason)),
                Err(e) => {
                    for r in res.iter_mut().filter(|r| !r.reached) {
                        r.detail = Some(format!("receive: {e}"));
                    }
                    return;
                }
            };
            let k = usize::from(seq) / attempts;
            let Some(r) = res.get_mut(k).filter(|r| r.dst == from && !r.reached) else {
                continue;
            };
            if let Some(at) = reply_at {
                r.reached = true;
                r.rtt_ms = sent_at[usize::from(seq)].map(|t| ms(at.saturating_duration_since(t)));
                r.detail = None;
            } else if let Some(reason) = refusal {
                r.detail = Some(reason.to_string());
            }
            if pending[k] {
                pending[k] = false;
                waiting -= 1;
            }
        }
        if res.iter().all(|r| r.reached) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_result_ok_means_as_expected() {
        let mut r = PairResult::from_job(&PairJob::new("ns1", Ipv4Addr::new(10, 0, 0, 2)));
        assert!(!r.ok());
        r.reached = true;
        assert!(r.ok());
        r.expect_reach = false;
        assert!(!r.ok());
        assert!(r.to_string().contains("must be isolated"), "{r}");
    }
}
