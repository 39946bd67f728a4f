//! The userspace data path: threads moving packets between the TUN device
//! and the WireGuard UDP socket through the peer table, plus the timer
//! tick. Stopped (and joined) on drop.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::gso::{self, Prepared, VNET_HDR_LEN, VnetHdr};
use super::peers::{PeerTable, out_buffer_len};
use super::tun::Tun;
use super::udp::{Datagram, MAX_SEGMENTS, Socket};

/// How often the timers run and the threads look at the stop flag.
pub const TICK: Duration = Duration::from_millis(250);

/// Largest datagram or packet handled.
const MAX_PACKET: usize = 65535;

/// The running data path of one node.
pub struct DataPath {
    table: Arc<RwLock<PeerTable>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DataPath {
    /// Start the threads on `tun` and `socket` (both already opened in the
    /// node's namespace; the socket bound to the WireGuard port).
    pub fn start(tun: Tun, socket: UdpSocket, table: PeerTable) -> std::io::Result<DataPath> {
        DataPath::start_with(tun, socket, table, Box::new(|| {}))
    }

    /// [`Self::start`], calling `switched` (from the tick thread) when a
    /// switch to this node's next key is done with every peer, so that the
    /// owner finishes the rotation without waiting for its next pass.
    pub fn start_with(
        tun: Tun,
        socket: UdpSocket,
        table: PeerTable,
        switched: Box<dyn Fn() + Send>,
    ) -> std::io::Result<DataPath> {
        let table = Arc::new(RwLock::new(table));
        let stop = Arc::new(AtomicBool::new(false));
        socket.set_read_timeout(Some(TICK))?;
        let socket = Arc::new(Socket::new(socket));
        tun.set_nonblocking()?;
        let tun_writer = tun.try_clone()?;
        let mut threads = Vec::new();
        {
            let (table, stop, socket) = (table.clone(), stop.clone(), socket.clone());
            threads.push(spawn("vxm-wg-out", move || {
                outbound_loop(tun, &socket, &table, &stop)
            })?);
        }
        {
            let (table, stop, socket) = (table.clone(), stop.clone(), socket.clone());
            threads.push(spawn("vxm-wg-in", move || {
                inbound_loop(tun_writer, &socket, &table, &stop)
            })?);
        }
        {
            let (table, stop) = (table.clone(), stop.clone());
            threads.push(spawn("vxm-wg-tick", move || {
                tick_loop(&socket, &table, &stop, &*switched)
            })?);
        }
        Ok(DataPath {
            table,
            stop,
            threads,
        })
    }

    /// The peer table, to change peers (write lock) or read statistics.
    pub fn table(&self) -> &Arc<RwLock<PeerTable>> {
        &self.table
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

/// Packets read from the TUN device and encrypted before one send.
const BATCH: usize = MAX_SEGMENTS;

/// The send buffer: a batch of full-sized datagrams, and room for one
/// largest packet more.
const SEND_BUFFER: usize = 256 * 1024;

/// Largest read from the TUN device: a segmentation burst with its header.
const MAX_READ: usize = 256 * 1024;

/// Read what the TUN device holds (up to [`BATCH`] reads), cut bursts into
/// packets, encrypt each into the send buffer one after another, and send
/// them in runs.
fn outbound_loop(mut tun: Tun, socket: &Socket, table: &RwLock<PeerTable>, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_READ];
    let mut out = Outgoing::new();
    let mut scratch = Vec::with_capacity(MAX_READ);
    let offloaded = tun.offloaded();
    while !stop.load(Ordering::Relaxed) {
        let mut n = match tun.read_timeout(&mut buf, TICK) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(dev = tun.name(), "read: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let table = table.read().expect("peer table lock");
        for read in 1.. {
            if offloaded {
                out.burst(&table, socket, &mut buf[..n], &mut scratch);
            } else {
                out.encrypt(&table, socket, &buf[..n]);
            }
            if read == BATCH {
                break;
            }
            match tun.try_read(&mut buf) {
                Ok(Some(m)) => n = m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(dev = tun.name(), "read: {e}");
                    break;
                }
            }
        }
        out.flush(socket);
    }
}

/// Encrypted datagrams waiting in one buffer for one send.
struct Outgoing {
    buf: Vec<u8>,
    used: usize,
    batch: Vec<Datagram>,
}

impl Outgoing {
    fn new() -> Outgoing {
        Outgoing {
            buf: vec![0u8; SEND_BUFFER],
            used: 0,
            batch: Vec::with_capacity(BATCH),
        }
    }

    fn flush(&mut self, socket: &Socket) {
        socket.send_batch(&self.buf, &self.batch);
        self.batch.clear();
        self.used = 0;
    }

    /// One read from a device with offloads (`raw` starts with the
    /// virtio-net header): its packet, or each packet of its burst.
    fn burst(&mut self, table: &PeerTable, socket: &Socket, raw: &mut [u8], scratch: &mut Vec<u8>) {
        let Some(hdr) = VnetHdr::parse(raw) else {
            return;
        };
        let packet = &mut raw[VNET_HDR_LEN..];
        scratch.clear();
        match gso::prepare(&hdr, packet, scratch) {
            Ok(Prepared::One) => self.encrypt(table, socket, packet),
            Ok(Prepared::Many(pieces)) => {
                for r in pieces {
                    self.encrypt(table, socket, &scratch[r]);
                }
            }
            Err(e) => tracing::debug!("TUN packet dropped: {e}"),
        }
    }

    /// Encrypt `packet` into the buffer (sending what is there first when
    /// it is full).
    fn encrypt(&mut self, table: &PeerTable, socket: &Socket, packet: &[u8]) {
        let room = out_buffer_len(packet.len());
        if self.batch.len() == BATCH || SEND_BUFFER - self.used < room {
            self.flush(socket);
        }
        let used = self.used;
        let out = &mut self.buf[used..used + room];
        let start = out.as_ptr() as usize;
        let mut queued = None;
        table.outbound(packet, out, &mut |to, d| {
            // boringtun writes at the start of `out`: that datagram joins
            // the batch; anything else goes out at once.
            if queued.is_none() && d.as_ptr() as usize == start {
                queued = Some((to, d.len()));
            } else {
                socket.send_one(to, d);
            }
        });
        if let Some((to, len)) = queued {
            self.batch.push(Datagram {
                to,
                start: used,
                len,
            });
            self.used += len;
        }
    }
}

/// Receive datagrams (coalesced ones split), decrypt them and write the
/// inner packets to the TUN device.
fn inbound_loop(mut tun: Tun, socket: &Socket, table: &RwLock<PeerTable>, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; out_buffer_len(MAX_PACKET)];
    let mut send = |to, d: &[u8]| socket.send_one(to, d);
    while !stop.load(Ordering::Relaxed) {
        let received = match socket.recv(&mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("recv: {e}");
                std::thread::sleep(TICK);
                continue;
            }
        };
        let mut deliver = |p: &[u8]| {
            if let Err(e) = tun.write_packet(p) {
                tracing::debug!("write to TUN: {e}");
            }
        };
        let table = table.read().expect("peer table lock");
        for datagram in received.datagrams(&buf) {
            table.inbound(received.from, datagram, &mut out, &mut send, &mut deliver);
        }
    }
}

fn tick_loop(socket: &Socket, table: &RwLock<PeerTable>, stop: &AtomicBool, switched: &dyn Fn()) {
    let mut out = vec![0u8; out_buffer_len(MAX_PACKET)];
    let mut send = |to, d: &[u8]| socket.send_one(to, d);
    let mut told = false;
    while !stop.load(Ordering::Relaxed) {
        let done = {
            let t = table.read().expect("peer table lock");
            t.tick(&mut out, &mut send);
            t.switch_progress().is_some_and(|p| p.done())
        };
        // Once per switch (the owner drops the old key, which ends it).
        if done && !told {
            switched();
        }
        told = done;
        std::thread::sleep(TICK);
    }
}
