//! The send side's hand-off: the thread that encrypts fills one buffer of
//! datagrams while a second thread sends the previous one. A small fixed
//! pool of buffers goes round between the two through bounded channels, in
//! order, with back-pressure when every buffer is in flight.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use super::udp::Datagram;

/// Encrypted datagrams lying one after another in one buffer, waiting for
/// one send.
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    used: usize,
    datagrams: Vec<Datagram>,
    most: usize,
}

impl Batch {
    /// An empty batch of `bytes` bytes holding at most `most` datagrams.
    pub fn new(bytes: usize, most: usize) -> Batch {
        Batch {
            buf: vec![0u8; bytes],
            used: 0,
            datagrams: Vec::with_capacity(most),
            most,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Whether a datagram of up to `room` bytes still fits.
    pub fn fits(&self, room: usize) -> bool {
        self.datagrams.len() < self.most && self.buf.len() - self.used >= room
    }

    /// The free part of the buffer, to write the next datagram into.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Record a datagram to `to` written at `offset..offset + len` of
    /// [`Self::spare`] (anything before `offset` is skipped).
    pub fn push(&mut self, to: SocketAddrV4, offset: usize, len: usize) {
        let start = self.used + offset;
        assert!(start + len <= self.buf.len(), "datagram beyond the buffer");
        self.datagrams.push(Datagram { to, start, len });
        self.used = start + len;
    }

    /// The buffer the datagrams lie in.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    /// The datagrams, in the order they were pushed.
    pub fn datagrams(&self) -> &[Datagram] {
        &self.datagrams
    }

    fn clear(&mut self) {
        self.datagrams.clear();
        self.used = 0;
    }
}

/// The encrypting thread's end: the batch being filled and the channels
/// to and from the sending thread.
pub struct Filler {
    current: Batch,
    full: SyncSender<Batch>,
    empty: Receiver<Batch>,
    stop: Arc<AtomicBool>,
    wait: Duration,
}

/// Start the sending thread `name`, which calls `send` with each handed-off
/// batch in the order handed off, then returns the batch for reuse.
/// `buffers` (at least 2) batches are made with `make`, once. The thread
/// ends when the [`Filler`] is dropped or `stop` is set (it looks every
/// `wait`).
pub fn start(
    name: &str,
    buffers: usize,
    make: impl Fn() -> Batch,
    stop: Arc<AtomicBool>,
    wait: Duration,
    mut send: impl FnMut(&Batch) + Send + 'static,
) -> std::io::Result<(Filler, JoinHandle<()>)> {
    assert!(buffers >= 2, "a pipeline needs two buffers");
    // Both channels hold every buffer, so neither side's send ever waits.
    let (full_tx, full_rx) = sync_channel::<Batch>(buffers);
    let (empty_tx, empty_rx) = sync_channel::<Batch>(buffers);
    for _ in 1..buffers {
        empty_tx.send(make()).expect("receiver alive");
    }
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            loop {
                match full_rx.recv_timeout(wait) {
                    Ok(mut batch) => {
                        send(&batch);
                        batch.clear();
                        // With the filler gone, what it handed off before
                        // is still sent (the loop ends once drained).
                        let _ = empty_tx.send(batch);
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if thread_stop.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    let filler = Filler {
        current: make(),
        full: full_tx,
        empty: empty_rx,
        stop,
        wait,
    };
    Ok((filler, thread))
}

impl Filler {
    /// The batch being filled.
    pub fn batch(&mut self) -> &mut Batch {
        &mut self.current
    }

    /// Hand the current batch (if it holds anything) to the sending thread
    /// and take an empty one, waiting while all are in flight. `false` when
    /// the data path stops (or the sending thread is gone): nothing more
    /// can be filled.
    pub fn hand_off(&mut self) -> bool {
        if self.current.is_empty() {
            return true;
        }
        let full = std::mem::take(&mut self.current);
        if self.full.send(full).is_err() {
            return false;
        }
        loop {
            match self.empty.recv_timeout(self.wait) {
                Ok(batch) => {
                    self.current = batch;
                    return true;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    const WAIT: Duration = Duration::from_millis(20);

    fn to(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, n), 51820)
    }

    /// Fill `n` numbered datagrams of 8 bytes (the number, little-endian),
    /// handing off whenever the batch is full.
    fn fill(f: &mut Filler, n: u64) {
        for i in 0..n {
            if !f.batch().fits(8) {
                assert!(f.hand_off());
            }
            f.batch().spare()[..8].copy_from_slice(&i.to_le_bytes());
            f.batch().push(to(1), 0, 8);
        }
        assert!(f.hand_off());
    }

    fn numbers(b: &Batch) -> Vec<u64> {
        b.datagrams()
            .iter()
            .map(|d| u64::from_le_bytes(b.bytes()[d.start..d.start + 8].try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_batch_records_datagrams_where_they_were_written() {
        let mut b = Batch::new(100, 3);
        assert!(b.is_empty() && b.fits(100) && !b.fits(101));
        b.spare()[..4].copy_from_slice(b"abcd");
        b.push(to(1), 0, 4);
        // A datagram written further into the spare part keeps its place.
        b.spare()[10..13].copy_from_slice(b"xyz");
        b.push(to(2), 10, 3);
        assert_eq!(
            b.datagrams(),
            &[
                Datagram {
                    to: to(1),
                    start: 0,
                    len: 4
                },
                Datagram {
                    to: to(2),
                    start: 14,
                    len: 3
                }
            ]
        );
        assert_eq!(&b.bytes()[14..17], b"xyz");
        assert!(b.fits(83) && !b.fits(84));
        b.push(to(1), 0, 1);
        assert!(!b.fits(1), "at most 3 datagrams");
        b.clear();
        assert!(b.is_empty() && b.fits(100));
    }

    #[test]
    fn every_datagram_arrives_once_in_order_through_a_fixed_pool() {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((Vec::new(), HashSet::new())));
        let s = seen.clone();
        let (mut f, t) = start(
            "t-order",
            3,
            || Batch::new(8 * 7, 64),
            stop.clone(),
            WAIT,
            move |b| {
                let mut s = s.lock().unwrap();
                s.0.extend(numbers(b));
                s.1.insert(b.bytes().as_ptr() as usize);
            },
        )
        .unwrap();
        fill(&mut f, 10_000);
        drop(f);
        t.join().unwrap();
        let s = seen.lock().unwrap();
        assert_eq!(s.0.len(), 10_000, "datagrams lost or repeated");
        let wrong = s.0.iter().enumerate().find(|&(i, &n)| n != i as u64);
        assert_eq!(wrong, None, "(place, number) out of order");
        // 1 429 batches went through three buffers (the one being filled
        // and two in circulation): nothing allocated per batch.
        assert!(s.1.len() <= 3, "{} distinct buffers", s.1.len());
    }

    #[test]
    fn the_filler_waits_while_every_buffer_is_in_flight() {
        let stop = Arc::new(AtomicBool::new(false));
        let (go_tx, go_rx) = channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let (mut f, t) = start(
            "t-pressure",
            2,
            || Batch::new(64, 8),
            stop.clone(),
            WAIT,
            move |_| {
                let _ = go_rx.lock().unwrap().recv();
            },
        )
        .unwrap();
        // The first hand-off takes the spare buffer at once; the sender
        // blocks in `send` with the first batch, so the second hand-off has
        // no empty buffer to take until that send is released.
        f.batch().push(to(1), 0, 8);
        let t0 = Instant::now();
        assert!(f.hand_off());
        assert!(t0.elapsed() < Duration::from_millis(150), "waited");
        f.batch().push(to(1), 0, 8);
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            go_tx.send(()).unwrap();
            go_tx
        });
        let t0 = Instant::now();
        assert!(f.hand_off());
        assert!(t0.elapsed() >= Duration::from_millis(150), "did not wait");
        let go_tx = released.join().unwrap();
        drop(go_tx);
        drop(f);
        t.join().unwrap();
    }

    #[test]
    fn stop_ends_a_waiting_filler_and_the_sending_thread() {
        let stop = Arc::new(AtomicBool::new(false));
        let (block_tx, block_rx) = channel::<()>();
        let block_rx = Mutex::new(block_rx);
        let (mut f, t) = start(
            "t-stop",
            2,
            || Batch::new(64, 8),
            stop.clone(),
            WAIT,
            // Blocks until the test lets go (a send that hangs).
            move |_| {
                let _ = block_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(5));
            },
        )
        .unwrap();
        f.batch().push(to(1), 0, 8);
        assert!(f.hand_off(), "the spare buffer is free");
        f.batch().push(to(1), 0, 8);
        let s = stop.clone();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            s.store(true, Ordering::Relaxed);
        });
        let t0 = Instant::now();
        assert!(!f.hand_off(), "stop must end the wait for a buffer");
        assert!(t0.elapsed() < Duration::from_secs(2));
        stopper.join().unwrap();
        // The sending thread ends once its sends return (the filler still
        // alive: it ends on stop).
        drop(block_tx);
        let t0 = Instant::now();
        t.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(f);
    }

    #[test]
    fn an_empty_batch_is_not_handed_off() {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(0));
        let c = calls.clone();
        let (mut f, t) = start(
            "t-empty",
            2,
            || Batch::new(64, 8),
            stop.clone(),
            WAIT,
            move |_| *c.lock().unwrap() += 1,
        )
        .unwrap();
        for _ in 0..5 {
            assert!(f.hand_off());
        }
        drop(f);
        t.join().unwrap();
        assert_eq!(*calls.lock().unwrap(), 0);
    }
}
