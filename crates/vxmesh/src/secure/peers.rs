//! The peer table: boringtun tunnels to the peer nodes, found by the
//! peer's transport address (outbound) or underlay address (inbound).
//! A peer has one tunnel; during a key rotation (a peer listing a next
//! key, or this node switching to its next key) one per pair of keys, so
//! that neither side waits for a handshake: inbound datagrams find their
//! tunnel by receiver index, outbound packets go on the newest session
//! (docs/encryption.md, "Rotation"). No I/O here: callers pass the packets
//! in and get what to send back.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;

use super::keys::{PrivateKey, PublicKey};

mod slot;
use slot::Slot;

/// Persistent keepalive (seconds): keeps the session warm across NATs and
/// lets a peer that restarted notice quickly.
const KEEPALIVE_SECS: u16 = 25;

/// A peer that answered this node's new key but sends nothing is taken as
/// switched after this long (it would have sent on the new session by then).
pub const SWITCH_GRACE: Duration = Duration::from_secs(2);

/// A rotation switches without the peers that have not answered the new
/// key by then (down, or not told of the key).
pub const SWITCH_DEADLINE: Duration = Duration::from_secs(30);

/// A peer as planned: who it is and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: String,
    pub public_key: PublicKey,
    /// During the peer's key rotation, the key it switches to: handshakes
    /// with either key are accepted.
    pub next_public_key: Option<PublicKey>,
    /// Its underlay address and WireGuard port.
    pub endpoint: SocketAddrV4,
    /// Its address in the transport range.
    pub transport: Ipv4Addr,
}

impl PeerSpec {
    /// The keys the peer is listed with, the newest last.
    fn keys(&self) -> Vec<PublicKey> {
        std::iter::once(self.public_key)
            .chain(self.next_public_key)
            .collect()
    }

    fn same_place(&self, other: &PeerSpec) -> bool {
        self.endpoint == other.endpoint && self.transport == other.transport
    }
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
    /// One per pair (own key, listed peer key).
    slots: Vec<Slot>,
    counters: PeerCounters,
}

impl Peer {
    /// The slot a packet waits on when no session is usable: this node's
    /// newest key and the peer's newest listed key.
    fn primary(&self, own: PublicKey) -> usize {
        let newest = *self.spec.keys().last().expect("a peer has a key");
        self.slots
            .iter()
            .position(|s| s.own == own && s.peer_key == newest)
            .unwrap_or(0)
    }
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
    /// Peers with a new address, or a key added or dropped.
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
}

/// How far this node's switch to its next key is (see [`PeerTable::switch_progress`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchProgress {
    /// Peers with a tunnel on the next key.
    pub peers: usize,
    /// Of those, the ones that answered it and send on it (or answered and
    /// stayed quiet for [`SWITCH_GRACE`]).
    pub switched: usize,
}

impl SwitchProgress {
    pub fn done(&self) -> bool {
        self.switched == self.peers
    }
}

/// The tunnels of this node.
pub struct PeerTable {
    /// This node's keys: the one in use, then (switching) the next one.
    keys: Vec<PrivateKey>,
    /// The public halves of `keys` (deriving one is a scalar
    /// multiplication: never per packet).
    publics: Vec<PublicKey>,
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
            publics: vec![key.public()],
            keys: vec![key],
            peers: BTreeMap::new(),
            by_transport: HashMap::new(),
            by_underlay: HashMap::new(),
            next_index: 1,
            dropped_no_peer: AtomicU64::new(0),
        }
    }

    /// The public key of the key this node switches to, else of the one in use.
    pub fn public_key(&self) -> PublicKey {
        *self.publics.last().expect("a key")
    }

    /// This node's keys: `current`, and while switching `next`. A new
    /// `next` gets a tunnel to every peer that starts a handshake at once
    /// (the sessions on `current` carry the traffic meanwhile); dropping
    /// `current` (`set_keys(next, None)`) drops its tunnels.
    pub fn set_keys(&mut self, current: PrivateKey, next: Option<PrivateKey>) {
        let keys: Vec<PrivateKey> = std::iter::once(current).chain(next).collect();
        if keys == self.keys {
            return;
        }
        self.publics = keys.iter().map(PrivateKey::public).collect();
        self.keys = keys;
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for n in names {
            let mut peer = self.peers.remove(&n).expect("listed");
            self.sync_slots(&mut peer);
            self.peers.insert(n, peer);
        }
    }

    /// Make the table hold exactly `desired`: unchanged peers keep their
    /// sessions, a peer whose address changed gets new tunnels, a key added
    /// to or dropped from a peer's listing adds or drops its tunnel only.
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
            let mut peer = match self.peers.remove(name) {
                Some(p) if p.spec == *spec => {
                    self.peers.insert(name.to_string(), p);
                    continue;
                }
                Some(mut p) if p.spec.same_place(spec) => {
                    changes.replaced.push(name.to_string());
                    p.spec = spec.clone();
                    p
                }
                old => {
                    if old.is_some() {
                        changes.replaced.push(name.to_string());
                    } else {
                        changes.added.push(name.to_string());
                    }
                    Peer {
                        spec: spec.clone(),
                        slots: Vec::new(),
                        counters: PeerCounters::default(),
                    }
                }
            };
            self.sync_slots(&mut peer);
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

    /// Give `peer` one slot per (own key, listed key), keeping those that
    /// exist. A slot of this node's next key starts the handshake (the
    /// peer cannot: it does not know when this node switches); a slot of
    /// the peer's next key waits for the peer's (its timers, keepalive
    /// included, start with its first session: a keepalive before would
    /// start one to a key the peer does not use yet).
    fn sync_slots(&mut self, peer: &mut Peer) {
        let listed = peer.spec.keys();
        let switching = self.keys.len() > 1;
        let mut old = std::mem::take(&mut peer.slots);
        for (i, (own, own_public)) in self.keys.iter().zip(&self.publics).enumerate() {
            for &pk in &listed {
                if let Some(at) = old
                    .iter()
                    .position(|s| s.own == *own_public && s.peer_key == pk)
                {
                    peer.slots.push(old.swap_remove(at));
                    continue;
                }
                let own_is_next = switching && i == self.keys.len() - 1;
                let peer_key_is_next = Some(pk) == peer.spec.next_public_key;
                let index = self.next_index;
                // Indices are 24 bits; the table never holds 16 million tunnels.
                self.next_index = (self.next_index + 1) & 0x00ff_ffff;
                peer.slots.push(Slot::new(
                    own,
                    pk,
                    index,
                    KEEPALIVE_SECS,
                    own_is_next,
                    peer_key_is_next,
                ));
            }
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
        let Some(slot) = slot::slot_to_send(&peer.slots, || peer.primary(self.public_key())) else {
            return;
        };
        let mut tunn = slot.lock();
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
        let Some(slot) = slot::slot_for(&peer.slots, &self.keys, datagram) else {
            // A key no tunnel of this peer accepts, or a stale index.
            peer.counters
                .decrypt_failures
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let data = slot::is_data(datagram);
        let mut tunn = slot.lock();
        let mut result = tunn.decapsulate(Some(IpAddr::V4(*from.ip())), datagram, out);
        loop {
            match result {
                TunnResult::WriteToNetwork(d) => {
                    send(peer.spec.endpoint, d);
                    // Queued packets may follow a completed handshake.
                    result = tunn.decapsulate(None, &[], out);
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    slot::note_data(slot);
                    // Cryptokey routing: a peer may only send as itself.
                    if src == peer.spec.transport {
                        deliver(p);
                    } else {
                        peer.counters.spoofed_inner.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                TunnResult::WriteToTunnelV6(..) => return,
                TunnResult::Done => {
                    if data {
                        // A keepalive: authenticated, on this session.
                        slot::note_data(slot);
                    }
                    return;
                }
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
    /// keepalives, and the handshakes of this node's next key. Calls
    /// `send` for each packet due.
    pub fn tick(&self, out: &mut [u8], send: &mut dyn FnMut(SocketAddrV4, &[u8])) {
        let now = Instant::now();
        for peer in self.peers.values() {
            for slot in &peer.slots {
                let initiate = slot.tick(now);
                let mut tunn = slot.lock();
                if initiate {
                    if let TunnResult::WriteToNetwork(d) =
                        tunn.format_handshake_initiation(out, true)
                    {
                        send(peer.spec.endpoint, d);
                    }
                } else if !slot.waits_for_peer() {
                    match tunn.update_timers(out) {
                        TunnResult::WriteToNetwork(d) => send(peer.spec.endpoint, d),
                        TunnResult::Err(e) => {
                            tracing::trace!(peer = %peer.spec.node, "timers: {e:?}")
                        }
                        _ => {}
                    }
                }
                let since = tunn.time_since_last_handshake();
                let mut last = slot.last_seen_handshake.lock().expect("handshake lock");
                if is_new_handshake(*last, since) {
                    peer.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                *last = since;
            }
        }
    }

    /// While switching to the next key: how many peers have a session on
    /// it that they use (data came in on it, or it has been up for
    /// [`SWITCH_GRACE`]). `None` when not switching.
    pub fn switch_progress(&self) -> Option<SwitchProgress> {
        let next = *self.publics.get(1)?;
        let now = Instant::now();
        let mut p = SwitchProgress::default();
        for peer in self.peers.values() {
            let slots: Vec<&Slot> = peer.slots.iter().filter(|s| s.own == next).collect();
            if slots.is_empty() {
                continue;
            }
            p.peers += 1;
            if slots.iter().any(|s| {
                s.received_data.load(Ordering::Relaxed)
                    || s.usable_since()
                        .is_some_and(|t| now.duration_since(t) >= SWITCH_GRACE)
            }) {
                p.switched += 1;
            }
        }
        Some(p)
    }

    /// The number of tunnels of each peer (one; two or more during a rotation).
    pub fn tunnels(&self) -> BTreeMap<String, usize> {
        self.peers
            .iter()
            .map(|(n, p)| (n.clone(), p.slots.len()))
            .collect()
    }

    /// Per-peer statistics, by node name (over all of a peer's tunnels:
    /// the newest session's age, bytes summed).
    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .values()
            .map(|p| {
                let mut st = PeerStats {
                    node: p.spec.node.clone(),
                    endpoint: p.spec.endpoint,
                    transport: p.spec.transport,
                    since_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    handshakes: p.counters.handshakes.load(Ordering::Relaxed),
                    decrypt_failures: p.counters.decrypt_failures.load(Ordering::Relaxed),
                    spoofed_inner: p.counters.spoofed_inner.load(Ordering::Relaxed),
                };
                for s in &p.slots {
                    let (since, tx, rx, ..) = s.lock().stats();
                    st.since_handshake = match (st.since_handshake, since) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    st.tx_bytes += tx as u64;
                    st.rx_bytes += rx as u64;
                }
                st
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
