//! The lab's connectivity probes: a continuous echo stream that counts every
//! lost reply, a TCP bulk transfer checked end to end with SHA-256, and the
//! concurrent all-pairs matrix of `vxmesh lab check`. Single echoes and the
//! raw socket come from [`vxmesh::icmp`].
//!
//! Every socket is created on a thread that has entered the probing namespace
//! (see [`Netns::run`]). A socket stays in the namespace it was created in, so it
//! is then used from any thread. No external tool (ping, iperf) is run.

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vxmesh::dataplane::netns::Netns;
pub use vxmesh::icmp::{DEFAULT_PAYLOAD, EchoOutcome, Refusal, icmp_echo, icmp_payload_for_ip_len};
use vxmesh::icmp::{
    EchoSocket, Event, PAIR_ATTEMPTS, PAIR_THREADS, REPLY_WINDOW, local_refusal, ms, wait_readable,
};

const TCP_CHUNK: usize = 64 * 1024;
const MAX_LOST_SEQS: usize = 10_000;
const STREAM_POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------
// Continuous echo stream

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

// ---------------------------------------------------------------------------
// TCP transfer

/// The outcome of [`tcp_transfer`].
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    pub bytes: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
    /// From connection set-up to the receiver having read everything.
    pub elapsed: Duration,
    pub throughput_mbit_s: f64,
}

/// The sending side of a transfer, see [`tcp_send`].
#[derive(Clone, Debug, Serialize)]
pub struct SendReport {
    pub bytes: u64,
    pub sha256: String,
    pub elapsed: Duration,
}

/// Stream `bytes` of deterministic pseudo-random data from `client_ns` to the
/// listener at `server_ip` in `server_ns` (an ephemeral port) and check that
/// the SHA-256 of what arrived equals that of what was sent. Err on a
/// connection failure, a short or corrupted transfer, or after `timeout`.
pub fn tcp_transfer(
    server_ns: &Netns,
    server_ip: Ipv4Addr,
    client_ns: &Netns,
    bytes: u64,
    timeout: Duration,
) -> Result<TransferReport> {
    let deadline = Instant::now() + timeout;
    let listener = server_ns
        .run(move || {
            TcpListener::bind((server_ip, 0)).with_context(|| format!("listen on {server_ip}"))
        })
        .with_context(|| format!("TCP receiver in network namespace '{}'", server_ns.name()))?;
    let addr = match listener.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => bail!("listener bound to IPv6 address {a}"),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let cancelled = cancel.clone();
    let receiver = std::thread::Builder::new()
        .name("vxm-probe-sink".into())
        .spawn(move || receive_all(listener, deadline, &cancelled))
        .context("spawn TCP receiver thread")?;
    let sent = send_until(client_ns, addr, bytes, deadline, timeout);
    if sent.is_err() {
        cancel.store(true, Ordering::Release);
    }
    let received = receiver
        .join()
        .map_err(|_| anyhow!("TCP receiver thread panicked"))?;
    let sent = sent?;
    let (got, received_sha256) = received.with_context(|| {
        format!(
            "TCP receiver on {addr} in network namespace '{}'",
            server_ns.name()
        )
    })?;
    if got != bytes || received_sha256 != sent.sha256 {
        bail!(
            "TCP transfer from network namespace '{}' to {addr} in '{}' corrupted: sent {bytes} bytes \
             (sha256 {}), received {got} bytes (sha256 {received_sha256})",
            client_ns.name(),
            server_ns.name(),
            sent.sha256
        );
    }
    let secs = sent.elapsed.as_secs_f64().max(1e-9);
    Ok(TransferReport {
        bytes,
        sent_sha256: sent.sha256,
        received_sha256,
        elapsed: sent.elapsed,
        throughput_mbit_s: bytes as f64 * 8.0 / secs / 1e6,
    })
}

/// The client half of [`tcp_transfer`]: connect from `client_ns` to `dst`,
/// send `bytes` of the deterministic stream, half-close, and wait until the
/// receiver closes its side (so everything was read). Err if the connection
/// fails (e.g. refused: nothing listens) or `timeout` passes.
pub fn tcp_send(
    client_ns: &Netns,
    dst: SocketAddrV4,
    bytes: u64,
    timeout: Duration,
) -> Result<SendReport> {
    send_until(client_ns, dst, bytes, Instant::now() + timeout, timeout)
}

fn send_until(
    client_ns: &Netns,
    dst: SocketAddrV4,
    bytes: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<SendReport> {
    let ctx = || {
        format!(
            "TCP transfer from network namespace '{}' to {dst}",
            client_ns.name()
        )
    };
    let connect_timeout = remaining(deadline).with_context(ctx)?;
    let mut stream = client_ns
        .run(move || TcpStream::connect_timeout(&dst.into(), connect_timeout).context("connect"))
        .with_context(ctx)?;
    let start = Instant::now();
    let timed_out =
        |done: u64| anyhow!("timed out after {timeout:?} with {done} of {bytes} bytes sent");
    let mut rng = XorShift64::new();
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; TCP_CHUNK];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(TCP_CHUNK as u64) as usize;
        rng.fill(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        stream.set_write_timeout(Some(
            remaining(deadline)
                .map_err(|_| timed_out(done))
                .with_context(ctx)?,
        ))?;
        stream
            .write_all(&chunk[..n])
            .map_err(|e| io_or_timeout(e, || timed_out(done)))
            .with_context(ctx)?;
        done += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .context("half-close")
        .with_context(ctx)?;
    // The receiver closes once it has read (and hashed) everything.
    let mut sink = [0u8; 512];
    loop {
        stream.set_read_timeout(Some(
            remaining(deadline)
                .map_err(|_| timed_out(done))
                .with_context(ctx)?,
        ))?;
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io_or_timeout(e, || {
                    anyhow!("waiting for the receiver to finish after {timeout:?}")
                }))
                .with_context(ctx);
            }
        }
    }
    Ok(SendReport {
        bytes,
        sha256: hex(&hasher.finalize()),
        elapsed: start.elapsed(),
    })
}

/// Accept one connection and read it to the end: (bytes, SHA-256).
fn receive_all(
    listener: TcpListener,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<(u64, String)> {
    let slice = Duration::from_millis(100);
    listener.set_nonblocking(true)?;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if cancel.load(Ordering::Acquire) {
                    bail!("the sender gave up before connecting");
                }
                let left = remaining(deadline).context("no connection arrived")?;
                wait_readable(listener.as_raw_fd(), left.min(slice))?;
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    stream.set_nonblocking(false)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; TCP_CHUNK];
    let mut got = 0u64;
    loop {
        let left = remaining(deadline).with_context(|| format!("after receiving {got} bytes"))?;
        stream.set_read_timeout(Some(left.min(slice)))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                got += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if cancel.load(Ordering::Acquire) {
                    bail!("the sender failed after {got} bytes");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read after {got} bytes")),
        }
    }
    Ok((got, hex(&hasher.finalize())))
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

fn io_or_timeout(e: io::Error, timed_out: impl FnOnce() -> anyhow::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => e.into(),
    }
}

/// xorshift64: fast, deterministic test data (not for anything secret).
struct XorShift64(u64);

impl XorShift64 {
    fn new() -> Self {
        XorShift64(0x9e37_79b9_7f4a_7c15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// The pair matrix

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
    fn prng_is_deterministic_across_chunk_boundaries() {
        let (mut a, mut b) = (XorShift64::new(), XorShift64::new());
        let mut whole = vec![0u8; 40];
        a.fill(&mut whole);
        let mut parts = vec![0u8; 40];
        b.fill(&mut parts[..16]);
        b.fill(&mut parts[16..]);
        assert_eq!(whole, parts);
        assert_ne!(whole[..8], whole[8..16]);
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
    }

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
