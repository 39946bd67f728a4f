//! The peer table: one boringtun tunnel per peer node, found by the
//! peer's transport address (outbound) or underlay address (inbound).
//! No I/O here: callers pass the packets in and get what to send back.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

use super::keys::{PrivateKey, PublicKey};

/// Persistent keepalive (seconds): keeps the session warm across NATs and
/// lets a peer that restarted notice quickly.
const KEEPALIVE_SECS: u16 = 25;

/// A peer as planned: who it is and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: String,
    pub public_key: PublicKey,
    /// Its underlay address and WireGuard port.
    pub endpoint: SocketAddrV4,
    /// Its address in the transport range.
    pub transport: Ipv4Addr,
}

/// Counters of one peer (read by status and metrics).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Packets from this peer's address that failed to decrypt or
    /// authenticate (a wrong key, a forged or replayed packet).
    pub decrypt_failures: AtomicU64,
    /// Completed handshakes seen by the timer tick.
    pub handshakes: AtomicU64,
    /// Inner packets whose source was not the peer's transport address.
    pub spoofed_inner: AtomicU64,
}

struct Peer {
    spec: PeerSpec,
    tunn: Mutex<Tunn>,
    counters: PeerCounters,
    /// The last `time_since_last_handshake` seen by the tick, to count
    /// new handshakes.
    last_seen_handshake: Mutex<Option<Duration>>,
}

/// A read-only view of a peer for status and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStats {
    pub node: String,
    pub endpoint: SocketAddrV4,
    pub transport: Ipv4Addr,
    pub since_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub handshakes: u64,
    pub decrypt_failures: u64,
    /// Decrypted packets dropped because their source was not the peer's
    /// transport address.
    pub spoofed_inner: u64,
}

/// What `set_peers` changed (node names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerChanges {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
}

/// The tunnels of this node.
pub struct PeerTable {
    key: PrivateKey,
    peers: BTreeMap<String, Peer>,
    by_transport: HashMap<Ipv4Addr, String>,
    by_underlay: HashMap<Ipv4Addr, String>,
    next_index: u32,
    /// Packets to a transport address with no peer, or from an underlay
    /// address with no peer.
    pub dropped_no_peer: AtomicU64,
}

/// Smallest output buffer for `outbound`/`inbound`: a full TUN packet plus
/// WireGuard's 32 bytes, and at least a handshake message.
pub fn out_buffer_len(mtu: usize) -> usize {
    (mtu + 32).max(148)
}

impl PeerTable {
    pub fn new(key: PrivateKey) -> Self {
        PeerTable {
            key,
            peers: BTreeMap::new(),
            by_transport: HashMap::new(),
            by_underlay: HashMap::new(),
            next_index: 1,
            dropped_no_peer: AtomicU64::new(0),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// Make the table hold exactly `desired`: unchanged peers keep their
    /// sessions, a peer whose key or address changed gets a new tunnel.
    pub fn set_peers(&mut self, desired: &[PeerSpec]) -> PeerChanges {
        let mut changes = PeerChanges::default();
        let wanted: BTreeMap<&str, &PeerSpec> =
            desired.iter().map(|p| (p.node.as_str(), p)).collect();
        let gone: Vec<String> = self
            .peers
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            self.peers.remove(&n);
            changes.removed.push(n);
        }
        for (name, spec) in wanted {
            match self.peers.get(name) {
                Some(p) if p.spec == *spec => continue,
                Some(_) => changes.replaced.push(name.to_string()),
                None => changes.added.push(name.to_string()),
            }
            let peer = self.new_peer(spec.clone());
            self.peers.insert(name.to_string(), peer);
        }
        self.by_transport = self
            .peers
            .iter()
            .map(|(n, p)| (p.spec.transport, n.clone()))
            .collect();
        self.by_underlay = self
            .peers
            .iter()
            .map(|(n, p)| (*p.spec.endpoint.ip(), n.clone()))
            .collect();
        changes
    }

    fn new_peer(&mut self, spec: PeerSpec) -> Peer {
        let index = self.next_index;
        // Indices are 24 bits; the table never holds 16 million peers.
        self.next_index = (self.next_index + 1) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.key.to_x25519(),
            spec.public_key.to_x25519(),
            None,
            Some(KEEPALIVE_SECS),
            index,
            None,
        );
        Peer {
            spec,
            tunn: Mutex::new(tunn),
            counters: PeerCounters::default(),
            last_seen_handshake: Mutex::new(None),
        }
    }

    /// A packet read from the TUN device: encrypt it for the peer owning its
    /// destination. Calls `send(endpoint, datagram)` for what must go out
    /// (data or, without a session yet, a handshake; the packet is then
    /// queued and sent when the handshake completes).
    pub fn outbound(
        &self,
        packet: &[u8],
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddrV4, &[u8]),
    ) {
        let Some(dst) = ipv4_dst(packet) else {
            self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(peer) = self.by_transport.get(&dst).and_then(|n| self.peers.get(n)) else {
            self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut tunn = peer.tunn.lock().expect("tunnel lock");
        match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => send(peer.spec.endpoint, d),
            TunnResult::Err(e) => tracing::debug!(peer = %peer.spec.node, "encapsulate: {e:?}"),
            _ => {}
        }
    }

    /// A datagram received on the WireGuard socket from `from`. Calls
    /// `send` for replies (handshake responses, queued packets) and
    /// `deliver` with each decrypted inner packet to write to the TUN
    /// device. Datagrams from an address with no peer are dropped unread.
    pub fn inbound(
        &self,
        from: SocketAddrV4,
        datagram: &[u8],
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddrV4, &[u8]),
        deliver: &mut dyn FnMut(&[u8]),
    ) {
        let Some(peer) = self
            .by_underlay
            .get(from.ip())
            .and_then(|n| self.peers.get(n))
        else {
            self.dropped_no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut tunn = peer.tunn.lock().expect("tunnel lock");
        let mut result = tunn.decapsulate(Some(IpAddr::V4(*from.ip())), datagram, out);
        loop {
            match result {
                TunnResult::WriteToNetwork(d) => {
                    send(peer.spec.endpoint, d);
                    // Queued packets may follow a completed handshake.
                    result = tunn.decapsulate(None, &[], out);
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    // Cryptokey routing: a peer may only send as itself.
                    if src == peer.spec.transport {
                        deliver(p);
                    } else {
                        peer.counters.spoofed_inner.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                TunnResult::WriteToTunnelV6(..) | TunnResult::Done => return,
                TunnResult::Err(e) => {
                    peer.counters
                        .decrypt_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.spec.node, %from, "decapsulate: {e:?}");
                    // The peer sends on a session this tunnel lacks (this
                    // agent restarted, or the tunnel was replaced): start a
                    // handshake now instead of waiting up to 15 s for the
                    // peer's own rekey (one at a time: boringtun answers
                    // Done while one is in progress).
                    if matches!(e, WireGuardError::NoCurrentSession)
                        && let TunnResult::WriteToNetwork(d) =
                            tunn.format_handshake_initiation(out, false)
                    {
                        send(peer.spec.endpoint, d);
                    }
                    return;
                }
            }
        }
    }

    /// The timer tick (every 250 ms or so): handshake retries, rekeying,
    /// keepalives. Calls `send` for each packet due.
    pub fn tick(&self, out: &mut [u8], send: &mut dyn FnMut(SocketAddrV4, &[u8])) {
        for peer in self.peers.values() {
            let mut tunn = peer.tunn.lock().expect("tunnel lock");
            match tunn.update_timers(out) {
                TunnResult::WriteToNetwork(d) => send(peer.spec.endpoint, d),
                TunnResult::Err(e) => tracing::trace!(peer = %peer.spec.node, "timers: {e:?}"),
                _ => {}
            }
            let since = tunn.time_since_last_handshake();
            let mut last = peer.last_seen_handshake.lock().expect("handshake lock");
            if is_new_handshake(*last, since) {
                peer.counters.handshakes.fetch_add(1, Ordering::Relaxed);
            }
            *last = since;
        }
    }

    /// Per-peer statistics, by node name.
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .values()
            .map(|p| {
                let (since, tx, rx, ..) = p.tunn.lock().expect("tunnel lock").stats();
                PeerStats {
                    node: p.spec.node.clone(),
                    endpoint: p.spec.endpoint,
                    transport: p.spec.transport,
                    since_handshake: since,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                    handshakes: p.counters.handshakes.load(Ordering::Relaxed),
                    decrypt_failures: p.counters.decrypt_failures.load(Ordering::Relaxed),
                    spoofed_inner: p.counters.spoofed_inner.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

/// A handshake completed between two ticks when the time since the last
/// one went down (or appeared).
fn is_new_handshake(before: Option<Duration>, now: Option<Duration>) -> bool {
    match (before, now) {
        (None, Some(_)) => true,
        (Some(b), Some(n)) => n < b,
        _ => false,
    }
}

/// The destination of an IPv4 packet, if it is one.
fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

#[cfg(test)]
mod tests;
