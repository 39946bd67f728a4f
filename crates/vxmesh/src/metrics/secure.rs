//! The secure underlay's metrics (docs/encryption.md), taken from the data
//! path's report ([`UnderlayReport`]) after every pass and every few
//! seconds. The data path's counters are cumulative per tunnel (a replaced
//! peer or a restarted agent starts at 0); the exported counters only grow.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `vxmesh_wg_peers` | gauge | peers with a tunnel |
//! | `vxmesh_wg_handshakes_total{peer}` | counter | completed handshakes |
//! | `vxmesh_wg_handshake_age_seconds{peer}` | gauge | time since the last handshake (absent before the first) |
//! | `vxmesh_wg_bytes_total{peer,direction="tx\|rx"}` | counter | bytes through the tunnel |
//! | `vxmesh_wg_decrypt_failures_total{peer}` | counter | packets from the peer's address that failed to decrypt or authenticate (a wrong key, forged or replayed packets) |
//! | `vxmesh_wg_spoofed_inner_total{peer}` | counter | decrypted packets whose source was not the peer's transport address |
//! | `vxmesh_wg_dropped_no_peer_total` | counter | packets to or from an address with no tunnel |

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::secure::underlay::UnderlayReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabel {
    peer: String,
    direction: &'static str,
}

/// The value each exported counter last followed, by series.
type Seen = HashMap<(String, &'static str), u64>;

pub(super) struct SecureMetrics {
    peers: Gauge,
    handshakes: Family<PeerLabel, Counter>,
    handshake_age: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    bytes: Family<BytesLabel, Counter>,
    decrypt_failures: Family<PeerLabel, Counter>,
    spoofed_inner: Family<PeerLabel, Counter>,
    dropped_no_peer: Counter,
    seen: Mutex<Seen>,
}

/// How much a cumulative source value moved since it was `last` seen (a
/// smaller value: the source restarted from 0).
fn delta(seen: &mut Seen, key: (String, &'static str), now: u64) -> u64 {
    let last = seen.insert(key, now).unwrap_or(0);
    if now >= last { now - last } else { now }
}

impl SecureMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = SecureMetrics {
            peers: Gauge::default(),
            handshakes: Family::default(),
            handshake_age: Family::default(),
            bytes: Family::default(),
            decrypt_failures: Family::default(),
            spoofed_inner: Family::default(),
            dropped_no_peer: Counter::default(),
            seen: Mutex::new(HashMap::new()),
        };
        registry.register(
            "wg_peers",
            "Peers of the secure underlay with a tunnel",
            m.peers.clone(),
        );
        registry.register(
            "wg_handshakes",
            "Completed WireGuard handshakes, per peer",
            m.handshakes.clone(),
        );
        registry.register_with_unit(
            "wg_handshake_age",
            "Time since the last completed handshake, per peer",
            Unit::Seconds,
            m.handshake_age.clone(),
        );
        registry.register(
            "wg_bytes",
            "Bytes through the tunnel, per peer and direction",
            m.bytes.clone(),
        );
        registry.register(
            "wg_decrypt_failures",
            "Packets from the peer's address that failed to decrypt or authenticate",
            m.decrypt_failures.clone(),
        );
        registry.register(
            "wg_spoofed_inner",
            "Decrypted packets whose source was not the peer's transport address",
            m.spoofed_inner.clone(),
        );
        registry.register(
            "wg_dropped_no_peer",
            "Packets to or from an address with no tunnel",
            m.dropped_no_peer.clone(),
        );
        m
    }

    pub(super) fn record(&self, r: &UnderlayReport) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.peers.set(r.peers.len() as i64);
        let d = delta(
            &mut seen,
            (String::new(), "dropped_no_peer"),
            r.dropped_no_peer,
        );
        self.dropped_no_peer.inc_by(d);
        for p in &r.peers {
            let peer = || PeerLabel {
                peer: p.node.clone(),
            };
            let key = |k| (p.node.clone(), k);
            let d = delta(&mut seen, key("handshakes"), p.handshakes);
            self.handshakes.get_or_create(&peer()).inc_by(d);
            let d = delta(&mut seen, key("decrypt"), p.decrypt_failures);
            self.decrypt_failures.get_or_create(&peer()).inc_by(d);
            let d = delta(&mut seen, key("spoofed"), p.spoofed_inner);
            self.spoofed_inner.get_or_create(&peer()).inc_by(d);
            for (direction, v) in [("tx", p.tx_bytes), ("rx", p.rx_bytes)] {
                let d = delta(&mut seen, key(direction), v);
                self.bytes
                    .get_or_create(&BytesLabel {
                        peer: p.node.clone(),
                        direction,
                    })
                    .inc_by(d);
            }
            match p.since_handshake_ms {
                Some(ms) => {
                    self.handshake_age
                        .get_or_create(&peer())
                        .set(ms as f64 / 1000.0);
                }
                None => {
                    self.handshake_age.remove(&peer());
                }
            }
        }
        // A peer that left: its age is no longer meaningful.
        let gone: Vec<String> = seen
            .keys()
            .map(|(n, _)| n.clone())
            .filter(|n| !n.is_empty() && !r.peers.iter().any(|p| &p.node == n))
            .collect();
        for n in gone {
            self.handshake_age.remove(&PeerLabel { peer: n.clone() });
            seen.retain(|(s, _), _| *s != n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_a_source_that_restarts() {
        let mut seen = Seen::new();
        let k = || ("host2".to_string(), "tx");
        assert_eq!(delta(&mut seen, k(), 100), 100);
        assert_eq!(delta(&mut seen, k(), 150), 50);
        // The tunnel was replaced (or the agent restarted): counts from 0.
        assert_eq!(delta(&mut seen, k(), 20), 20);
    }

    #[test]
    fn a_report_becomes_series_that_only_grow() {
        let key = crate::secure::keys::PrivateKey::generate()
            .unwrap()
            .public();
        let peer = |tx: u64, failures: u64| crate::secure::underlay::PeerReport {
            node: "host2".into(),
            endpoint: "198.18.0.2:51820".parse().unwrap(),
            transport: "10.255.0.2".parse().unwrap(),
            since_handshake_ms: Some(1_500),
            handshakes: 1,
            tx_bytes: tx,
            rx_bytes: 10,
            decrypt_failures: failures,
            spoofed_inner: 0,
        };
        let report = |p| UnderlayReport {
            at_ms: 0,
            started_ms: 0,
            dev: "vxm-wg0".into(),
            addr: "10.255.0.1/16".parse().unwrap(),
            port: 51820,
            public_key: key,
            listed_key: None,
            dropped_no_peer: 4,
            peers: vec![p],
            without_key: vec![],
            rotation: None,
        };
        let m = crate::metrics::Metrics::new();
        m.secure(&report(peer(100, 2)));
        // The tunnel was replaced: its counters start again.
        m.secure(&report(peer(30, 1)));
        let text = m.encode();
        for line in [
            "vxmesh_wg_peers 1",
            "vxmesh_wg_handshakes_total{peer=\"host2\"} 1",
            "vxmesh_wg_bytes_total{peer=\"host2\",direction=\"tx\"} 130",
            "vxmesh_wg_decrypt_failures_total{peer=\"host2\"} 3",
            "vxmesh_wg_handshake_age_seconds{peer=\"host2\"} 1.5",
            "vxmesh_wg_dropped_no_peer_total 4",
            "vxmesh_vxlan_spoofed_total 0",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
