//! One boringtun tunnel of a peer, bound to one of this node's keys and
//! one of the peer's listed keys. A peer has one slot, or during a key
//! rotation (either side's) one per pair of keys; inbound datagrams find
//! their slot by receiver index or, for a handshake initiation, by the key
//! pair it was made with.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519;

use crate::secure::keys::{PrivateKey, PublicKey};

/// How often a slot that must start a handshake (this node's new key)
/// resends its initiation until the peer answers: the peer may learn the
/// new key a moment after this node (boringtun alone retries every 5 s).
const INITIATE_EVERY: Duration = Duration::from_secs(1);

/// How long a slot keeps starting handshakes on its own.
const INITIATE_FOR: Duration = Duration::from_secs(90);

pub(super) struct Slot {
    /// The public half of this node's key the tunnel uses.
    pub own: PublicKey,
    /// The peer's key the tunnel accepts.
    pub peer_key: PublicKey,
    /// The tunnel's index (the top 24 bits of every receiver index of its
    /// sessions).
    pub index: u32,
    pub tunn: Mutex<Tunn>,
    /// While set: until when, and the last initiation sent.
    initiate: Mutex<Option<(Instant, Option<Instant>)>>,
    /// An authenticated data packet (or keepalive) came in on this slot:
    /// the peer sends on it.
    pub received_data: AtomicBool,
    /// When the slot first had a usable session.
    usable_since: Mutex<Option<Instant>>,
    /// A slot of the peer's next key: no timers (no keepalive, no
    /// handshake) before the peer starts its first session on it.
    passive: bool,
    /// The last `time_since_last_handshake` seen by the tick.
    pub last_seen_handshake: Mutex<Option<Duration>>,
}

impl Slot {
    pub fn new(
        own: &PrivateKey,
        peer_key: PublicKey,
        index: u32,
        keepalive: u16,
        initiate: bool,
        passive: bool,
    ) -> Slot {
        let tunn = Tunn::new(
            own.to_x25519(),
            peer_key.to_x25519(),
            None,
            Some(keepalive),
            index,
            None,
        );
        Slot {
            own: own.public(),
            peer_key,
            index,
            tunn: Mutex::new(tunn),
            initiate: Mutex::new(initiate.then(|| (Instant::now() + INITIATE_FOR, None))),
            received_data: AtomicBool::new(false),
            usable_since: Mutex::new(None),
            passive,
            last_seen_handshake: Mutex::new(None),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Tunn> {
        self.tunn.lock().expect("tunnel lock")
    }

    /// The age of the session this slot would send on, if it has one.
    pub fn session_age(&self) -> Option<Duration> {
        self.lock().time_since_last_handshake()
    }

    /// Since when the slot has had a usable session (updated by the tick).
    pub fn usable_since(&self) -> Option<Instant> {
        *self.usable_since.lock().expect("slot lock")
    }

    /// A slot of the peer's next key that the peer has not used yet: its
    /// timers must not run (they would start a handshake to a key the peer
    /// may not use yet).
    pub fn waits_for_peer(&self) -> bool {
        self.passive && self.usable_since().is_none()
    }

    /// The tick's part: note a usable session; say whether an initiation
    /// is due now (a slot of this node's new key that has no session yet).
    pub fn tick(&self, now: Instant) -> bool {
        let usable = self.session_age().is_some();
        if usable {
            self.usable_since
                .lock()
                .expect("slot lock")
                .get_or_insert(now);
        }
        let mut initiate = self.initiate.lock().expect("slot lock");
        match *initiate {
            Some(_) if usable => {
                *initiate = None;
                false
            }
            Some((until, _)) if now >= until => {
                *initiate = None;
                false
            }
            Some((until, last)) => {
                let due = last.is_none_or(|l| now.duration_since(l) >= INITIATE_EVERY);
                if due {
                    *initiate = Some((until, Some(now)));
                }
                due
            }
            None => false,
        }
    }
}

/// Which slot of a peer an inbound datagram is for: by receiver index
/// (responses, cookies, data), or for a handshake initiation by the key
/// pair it was made with (this node's keys are tried in turn). `None`: no
/// slot (a stale index, a key not listed) or not a WireGuard message.
pub(super) fn slot_for<'s>(
    slots: &'s [Slot],
    own_keys: &[PrivateKey],
    datagram: &[u8],
) -> Option<&'s Slot> {
    if slots.len() == 1 {
        return slots.first();
    }
    let by_index = |receiver: u32| slots.iter().find(|s| s.index == receiver >> 8);
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => own_keys.iter().find_map(|k| {
            let secret = k.to_x25519();
            let public = x25519::PublicKey::from(&secret);
            let half = parse_handshake_anon(&secret, &public, &init).ok()?;
            let from = PublicKey(half.peer_static_public);
            slots
                .iter()
                .find(|s| s.own == k.public() && s.peer_key == from)
        }),
        Packet::HandshakeResponse(r) => by_index(r.receiver_idx),
        Packet::PacketCookieReply(c) => by_index(c.receiver_idx),
        Packet::PacketData(d) => by_index(d.receiver_idx),
    }
}

/// The slot to send on: the usable one with the newest session, else the
/// `primary` one (whose handshake the packet then waits for).
pub(super) fn slot_to_send(slots: &[Slot], primary: impl FnOnce() -> usize) -> Option<&Slot> {
    if slots.len() == 1 {
        return slots.first();
    }
    slots
        .iter()
        .filter_map(|s| s.session_age().map(|age| (age, s)))
        .min_by_key(|(age, _)| *age)
        .map(|(_, s)| s)
        .or_else(|| slots.get(primary()))
}

/// Is `datagram` a transport data message (type 4)?
pub(super) fn is_data(datagram: &[u8]) -> bool {
    datagram.first() == Some(&4)
}

/// Mark that the peer sent data on `slot`.
pub(super) fn note_data(slot: &Slot) {
    slot.received_data.store(true, Ordering::Relaxed);
}
