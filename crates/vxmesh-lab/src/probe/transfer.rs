//! A TCP bulk transfer between two namespaces, checked end to end with
//! SHA-256 of deterministic pseudo-random data.

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vxmesh::dataplane::netns::Netns;
use vxmesh::icmp::wait_readable;

const TCP_CHUNK: usize = 64 * 1024;

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
}
