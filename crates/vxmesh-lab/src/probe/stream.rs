//! A continuous ICMP echo stream between two namespaces that counts every
//! lost reply (the probe behind the lab's fault tests).

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vxmesh::dataplane::netns::Netns;
use vxmesh::icmp::DEFAULT_PAYLOAD;
use vxmesh::icmp::{EchoSocket, Event, REPLY_WINDOW, ms};

const MAX_LOST_SEQS: usize = 10_000;
const STREAM_POLL: Duration = Duration::from_millis(25);

const RUN: u8 = 0;
const STOP: u8 = 1;
const ABORT: u8 = 2;

/// What a continuous probe saw. `sent == received + lost` once stopped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStats {
    /// Requests attempted, including those the kernel refused to send.
    pub sent: u64,
    /// Replies within [`REPLY_WINDOW`] of their request.
    pub received: u64,
    pub lost: u64,
    /// Requests the kernel refused to send (e.g. ENETUNREACH while a link is down); counted lost.
    pub send_errors: u64,
    /// Late (after the window) or duplicate replies; not counted as received.
    pub unmatched: u64,
    /// Longest stretch without a reply while probing, in milliseconds.
    pub max_gap_ms: u64,
    pub max_rtt_ms: f64,
    /// Sequence numbers (0-based request indices; the wire sequence is this
    /// modulo 65536) of lost requests, the first 10 000.
    pub lost_seqs: Vec<u64>,
    pub elapsed: Duration,
    /// Why the probe ended early, if it did.
    pub error: Option<String>,
}

/// A background echo stream started by [`continuous`]. [`ProbeStream::stop`]
/// ends it and returns the statistics; dropping it ends it too.
#[derive(Debug)]
pub struct ProbeStream {
    control: Arc<AtomicU8>,
    thread: Option<JoinHandle<StreamStats>>,
}

/// Another name for [`ProbeStream`], the handle [`continuous`] returns.
pub type ContinuousProbe = ProbeStream;

/// Start sending an echo request from `ns` to `dst` every `interval` (at least
/// 1 ms), each with its own sequence number, on a background thread.
pub fn continuous(ns: &Netns, dst: Ipv4Addr, interval: Duration) -> Result<ProbeStream> {
    let ctx = || {
        format!(
            "continuous probe from network namespace '{}' to {dst}",
            ns.name()
        )
    };
    let sock = EchoSocket::open(ns, DEFAULT_PAYLOAD, false).with_context(ctx)?;
    let interval = interval.max(Duration::from_millis(1));
    let control = Arc::new(AtomicU8::new(RUN));
    let ctl = control.clone();
    let thread = std::thread::Builder::new()
        .name("vxm-probe-stream".into())
        .spawn(move || run_stream(sock, dst, interval, &ctl))
        .with_context(ctx)?;
    Ok(ProbeStream {
        control,
        thread: Some(thread),
    })
}

impl ProbeStream {
    /// Stop sending, wait for the replies still due (at most [`REPLY_WINDOW`]),
    /// and return the statistics.
    pub fn stop(mut self) -> StreamStats {
        self.control.store(STOP, Ordering::Release);
        let thread = self.thread.take().expect("a running stream has its thread");
        thread.join().unwrap_or_else(|_| StreamStats {
            error: Some("probe thread panicked".into()),
            ..Default::default()
        })
    }
}

impl Drop for ProbeStream {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.control.store(ABORT, Ordering::Release);
            let _ = thread.join();
        }
    }
}

fn run_stream(
    mut sock: EchoSocket,
    dst: Ipv4Addr,
    interval: Duration,
    control: &AtomicU8,
) -> StreamStats {
    let mut stats = StreamStats::default();
    let start = Instant::now();
    let mut next_send = start;
    let mut next_index: u64 = 0;
    // (wire sequence, index, sent at), oldest first.
    let mut outstanding: VecDeque<(u16, u64, Instant)> = VecDeque::new();
    let mut last_ok = start;
    let mut sending_ended: Option<Instant> = None;
    loop {
        let state = control.load(Ordering::Acquire);
        if state == ABORT {
            break;
        }
        let now = Instant::now();
        if state == RUN && now >= next_send {
            let index = next_index;
            next_index += 1;
            stats.sent += 1;
            match sock.send(dst, index as u16) {
                Ok(()) => outstanding.push_back((index as u16, index, now)),
                Err(_) => {
                    stats.send_errors += 1;
                    lose(&mut stats, index);
                }
            }
            // Never burst to catch up after a stall.
            next_send = (next_send + interval).max(now);
        } else if state != RUN && sending_ended.is_none() {
            sending_ended = Some(now);
        }
        while outstanding
            .front()
            .is_some_and(|(_, _, sent)| now >= *sent + REPLY_WINDOW)
        {
            let (_, index, _) = outstanding.pop_front().expect("checked");
            lose(&mut stats, index);
        }
        if state != RUN && outstanding.is_empty() {
            break;
        }
        let mut wake = now + STREAM_POLL;
        if state == RUN {
            wake = wake.min(next_send);
        }
        if let Some((_, _, sent)) = outstanding.front() {
            wake = wake.min(*sent + REPLY_WINDOW);
        }
        match sock.next_event(wake) {
            Ok(Some(Event::Reply { from, seq, at })) if from == dst => {
                match outstanding.iter().position(|(s, _, _)| *s == seq) {
                    Some(pos) => {
                        let (_, _, sent) = outstanding.remove(pos).expect("found");
                        stats.received += 1;
                        stats.max_rtt_ms = stats.max_rtt_ms.max(ms(at - sent));
                        let gap = at.saturating_duration_since(last_ok).as_millis() as u64;
                        stats.max_gap_ms = stats.max_gap_ms.max(gap);
                        last_ok = last_ok.max(at);
                    }
                    None => stats.unmatched += 1,
                }
            }
            Ok(_) => {}
            Err(e) => {
                stats.error = Some(format!("receive from {dst}: {e}"));
                break;
            }
        }
    }
    let end = sending_ended.unwrap_or_else(Instant::now);
    let tail = end.saturating_duration_since(last_ok).as_millis() as u64;
    stats.max_gap_ms = stats.max_gap_ms.max(tail);
    for (_, index, _) in outstanding {
        lose(&mut stats, index);
    }
    stats.lost_seqs.sort_unstable();
    stats.elapsed = start.elapsed();
    stats
}

fn lose(stats: &mut StreamStats, index: u64) {
    stats.lost += 1;
    if stats.lost_seqs.len() < MAX_LOST_SEQS {
        stats.lost_seqs.push(index);
    }
}
