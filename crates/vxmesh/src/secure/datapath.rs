//! The userspace data path: threads moving packets between the TUN device
//! and the WireGuard UDP socket through the peer table, plus the timer
//! tick. Stopped (and joined) on drop.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::gro::{self, MergeCounts, Merger};
use super::gso::{self, Prepared, VNET_HDR_LEN, VnetHdr};
use super::peers::{PeerTable, out_buffer_len};
use super::sendq::{self, Batch, Filler};
use super::tun::Tun;
use super::udp::{MAX_SEGMENTS, Socket};

/// How often the timers run and the threads look at the stop flag.
pub const TICK: Duration = Duration::from_millis(250);

/// Largest datagram or packet handled.
const MAX_PACKET: usize = 65535;

/// The running data path of one node.
pub struct DataPath {
    table: Arc<RwLock<PeerTable>>,
    stop: Arc<AtomicBool>,
    inbound: Arc<InboundCounts>,
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
        let inbound = Arc::new(InboundCounts::default());
        socket.set_read_timeout(Some(TICK))?;
        // A send never blocks longer than a tick (the threads stop in time).
        socket.set_write_timeout(Some(TICK))?;
        let socket = Arc::new(Socket::new(socket));
        tun.set_nonblocking()?;
        let tun_writer = tun.try_clone()?;
        let mut threads = Vec::new();
        let (sends, sender) = start_sending(socket.clone(), stop.clone())?;
        {
            let (table, stop) = (table.clone(), stop.clone());
            threads.push(spawn("vxm-wg-out", move || {
                outbound_loop(tun, sends, &table, &stop)
            })?);
        }
        // Joined after the outbound thread, which hands it the last batch.
        threads.push(sender);
        {
            let (table, stop, socket) = (table.clone(), stop.clone(), socket.clone());
            let counts = inbound.clone();
            threads.push(spawn("vxm-wg-in", move || {
                inbound_loop(tun_writer, &socket, &table, &stop, &counts)
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
            inbound,
            threads,
        })
    }

    /// The peer table, to change peers (write lock) or read statistics.
    pub fn table(&self) -> &Arc<RwLock<PeerTable>> {
        &self.table
    }

    /// Decrypted packets written to the TUN device, the bursts they were
    /// merged into, and bursts the device refused.
    pub fn inbound(&self) -> MergeCounts {
        self.inbound.load()
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let c = self.inbound();
        tracing::debug!(
            packets = c.packets,
            bursts = c.bursts,
            refused = c.refused,
            "data path stopped: decrypted packets written, in bursts"
        );
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

/// Packets read from the TUN device and encrypted before one send.
const BATCH: usize = MAX_SEGMENTS;

/// One send buffer: a batch of full-sized datagrams, and room for one
/// largest packet more.
const SEND_BUFFER: usize = 256 * 1024;

/// Send buffers going round between the encrypting and the sending thread.
const SEND_BUFFERS: usize = 3;

/// Largest read from the TUN device: a segmentation burst with its header.
const MAX_READ: usize = 256 * 1024;

/// Start the sending thread: it sends each batch the outbound thread hands
/// off ([`super::sendq`]), so that encryption of the next batch overlaps
/// the kernel's send of the previous one.
fn start_sending(
    socket: Arc<Socket>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(Filler, JoinHandle<()>)> {
    sendq::start(
        "vxm-wg-send",
        SEND_BUFFERS,
        || Batch::new(SEND_BUFFER, BATCH),
        stop,
        TICK,
        move |b| socket.send_batch(b.bytes(), b.datagrams()),
    )
}

/// Read what the TUN device holds (up to [`BATCH`] reads), cut bursts into
/// packets, encrypt each into the send buffer one after another, and hand
/// the buffer to the sending thread.
fn outbound_loop(mut tun: Tun, mut sends: Filler, table: &RwLock<PeerTable>, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_READ];
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
            let going = if offloaded {
                burst(&table, &mut sends, &mut buf[..n], &mut scratch)
            } else {
                encrypt(&table, &mut sends, &buf[..n])
            };
            if !going {
                return;
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
        if !sends.hand_off() {
            return;
        }
    }
}

/// One read from a device with offloads (`raw` starts with the virtio-net
/// header): its packet, or each packet of its burst. `false` when the data
/// path stops.
fn burst(table: &PeerTable, sends: &mut Filler, raw: &mut [u8], scratch: &mut Vec<u8>) -> bool {
    let Some(hdr) = VnetHdr::parse(raw) else {
        return true;
    };
    let packet = &mut raw[VNET_HDR_LEN..];
    scratch.clear();
    match gso::prepare(&hdr, packet, scratch) {
        Ok(Prepared::One) => encrypt(table, sends, packet),
        Ok(Prepared::Many(pieces)) => pieces
            .into_iter()
            .all(|r| encrypt(table, sends, &scratch[r])),
        Err(e) => {
            tracing::debug!("TUN packet dropped: {e}");
            true
        }
    }
}

/// Encrypt `packet` into the batch being filled (handing it off first when
/// it is full). `false` when the data path stops.
///
/// boringtun writes what `encapsulate` returns (a data packet or a
/// handshake initiation) into the buffer it is given, one datagram per
/// call, so every datagram of the outbound path joins the batch in the
/// order of the packets: none overtakes another.
fn encrypt(table: &PeerTable, sends: &mut Filler, packet: &[u8]) -> bool {
    let room = out_buffer_len(packet.len());
    if !sends.batch().fits(room) && !sends.hand_off() {
        return false;
    }
    let out = &mut sends.batch().spare()[..room];
    let (start, end) = (out.as_ptr() as usize, out.as_ptr() as usize + room);
    let mut queued = None;
    table.outbound(packet, out, &mut |to, d| {
        let at = d.as_ptr() as usize;
        if queued.is_none() && at >= start && at + d.len() <= end {
            queued = Some((to, at - start, d.len()));
        } else {
            tracing::debug!(%to, "datagram outside the send buffer dropped");
        }
    });
    if let Some((to, offset, len)) = queued {
        sends.batch().push(to, offset, len);
    }
    true
}

/// Receive datagrams (coalesced ones split), decrypt them and write the
/// inner packets to the TUN device: on a device with offloads, the
/// datagrams of one receive merged into bursts ([`super::gro`]).
fn inbound_loop(
    mut tun: Tun,
    socket: &Socket,
    table: &RwLock<PeerTable>,
    stop: &AtomicBool,
    counts: &InboundCounts,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; out_buffer_len(MAX_PACKET)];
    let mut send = |to, d: &[u8]| socket.send_one(to, d);
    let mut merger = tun.offloaded().then(Merger::new);
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
        let mut write = |w: gro::Write| tun.write_parts(&w.vnet, w.head, w.body);
        let table = table.read().expect("peer table lock");
        match merger.as_mut() {
            Some(m) => {
                let mut deliver = |p: &[u8]| m.push(p, &mut write);
                for datagram in received.datagrams(&buf) {
                    table.inbound(received.from, datagram, &mut out, &mut send, &mut deliver);
                }
                m.flush(&mut write);
                counts.store(m.counts());
            }
            None => {
                let mut deliver = |p: &[u8]| {
                    if let Err(e) = tun.write_packet(p) {
                        tracing::debug!("write to TUN: {e}");
                    }
                };
                for datagram in received.datagrams(&buf) {
                    table.inbound(received.from, datagram, &mut out, &mut send, &mut deliver);
                }
            }
        }
    }
}

/// What the inbound thread's merger did so far (see [`DataPath::inbound`]).
#[derive(Default)]
pub struct InboundCounts {
    packets: AtomicU64,
    bursts: AtomicU64,
    refused: AtomicU64,
}

impl InboundCounts {
    fn store(&self, c: MergeCounts) {
        self.packets.store(c.packets, Ordering::Relaxed);
        self.bursts.store(c.bursts, Ordering::Relaxed);
        self.refused.store(c.refused, Ordering::Relaxed);
    }

    fn load(&self) -> MergeCounts {
        MergeCounts {
            packets: self.packets.load(Ordering::Relaxed),
            bursts: self.bursts.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
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
