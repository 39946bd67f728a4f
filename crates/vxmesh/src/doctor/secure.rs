//! The doctor's secure underlay hops, on the path to a peer of an
//! encrypted network: the TUN device, this node's key against the key the
//! store lists for it, the peer's key, and the session (a handshake within
//! [`HANDSHAKE_GRACE`] of the data path's start, no authentication
//! failures) from the running agent's report (`STATE/secure.json`).

use std::time::Duration;

use super::Hop;
use super::hops::{broken, ok};
use crate::secure::plan::SecurePlan;
use crate::status::SecureStatus;

/// A tunnel with traffic or a keepalive (every 25 s) has handshaken this
/// long after the data path started.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(30);

/// WireGuard drops a session this long after its handshake (REJECT_AFTER_TIME);
/// a live tunnel rekeys well before.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// The hops to peer `node` over the secure underlay; `uptime`: how long the
/// data path has run (`None`: no report).
pub fn secure_hops(s: &SecureStatus, node: &str, uptime: Option<Duration>) -> Vec<Hop> {
    let mut hops = Vec::new();
    hops.push(if s.device_ok {
        ok(
            "secure_device",
            format!("{} is up with transport address {}", s.dev, s.addr),
        )
    } else {
        broken(
            "secure_device",
            format!("{} is missing, down or not vxmesh's", s.dev),
            "is the agent running? it creates the device on its next pass".into(),
        )
    });
    if s.key_mismatch() {
        hops.push(broken(
            "own_key",
            format!(
                "key mismatch: this node's key is {} but the store lists {} for it, so every peer's handshake with it fails",
                s.public_key.as_deref().unwrap_or("-"),
                s.listed_key.as_deref().unwrap_or("-")
            ),
            format!(
                "list {} as this node's public_key (cluster file), or give the agent the key file that matches the listed key",
                s.public_key.as_deref().unwrap_or("-")
            ),
        ));
    }
    let Some(p) = s.peers.iter().find(|p| p.node == node) else {
        return hops;
    };
    if !p.has_key {
        hops.push(broken(
            "peer_key",
            format!("the store lists no public_key for {node}: it gets no tunnel"),
            format!("run `vxmesh keygen` on {node} (or read its key from its status) and list the public key as its public_key"),
        ));
        return hops;
    }
    let Some(uptime) = uptime.filter(|_| s.live()) else {
        hops.push(broken(
            "handshake",
            format!(
                "no running data path carries the tunnel to {node} (the agent's report is {})",
                s.report_age_secs
                    .map_or("missing".into(), |a| format!("{a} s old"))
            ),
            "start the agent: encrypted traffic passes through it".into(),
        ));
        return hops;
    };
    let fresh = p
        .last_handshake_secs
        .is_some_and(|a| a < SESSION_LIFETIME.as_secs());
    let endpoint = format!("{} (udp/{})", p.endpoint.ip(), p.endpoint.port());
    hops.push(if fresh {
        ok(
            "handshake",
            format!(
                "last handshake with {node} at {endpoint} {} s ago, {} decryption failure(s)",
                p.last_handshake_secs.unwrap_or_default(),
                p.decrypt_failures
            ),
        )
    } else if p.decrypt_failures > 0 {
        broken(
            "handshake",
            format!(
                "key mismatch with {node}: no valid handshake, {} packet(s) from {endpoint} failed to authenticate",
                p.decrypt_failures
            ),
            format!(
                "the key this node lists for {node} is not {node}'s own key, or {node} lists a wrong key for this node: compare `vxmesh status` (key) on both nodes with their public_key in the store"
            ),
        )
    } else if uptime >= HANDSHAKE_GRACE {
        broken(
            "handshake",
            format!(
                "missing handshake: no handshake with {node} at {endpoint} within {} s (the data path runs for {} s)",
                HANDSHAKE_GRACE.as_secs(),
                uptime.as_secs()
            ),
            format!(
                "is {node}'s agent running, and does udp/{} reach {} from this node (firewalls on the way)? if {node} counts decryption failures from this node, the keys do not match",
                p.endpoint.port(),
                p.endpoint.ip()
            ),
        )
    } else {
        super::hops::hop(
            "handshake",
            super::HopState::Warn,
            format!(
                "no handshake with {node} yet (the data path started {} s ago)",
                uptime.as_secs()
            ),
            Some("traffic or the next keepalive starts one; ask again in half a minute".into()),
        )
    });
    hops
}

/// Add the secure hops to every path over the secure underlay (after its
/// FDB hop: the VTEP hands the packet to the tunnel there), naming the
/// peer by its transport address, and recompute the first broken hops.
pub fn add_secure(
    r: &mut super::DoctorReport,
    plan: &SecurePlan,
    s: &SecureStatus,
    uptime: Option<Duration>,
) {
    for p in &mut r.paths {
        let Some((node, _)) = plan
            .peers
            .iter()
            .find(|(_, x)| x.transport == p.underlay_ip)
        else {
            continue;
        };
        p.peer = Some(node.clone());
        let at = p
            .hops
            .iter()
            .position(|h| h.hop == "fdb")
            .map_or(p.hops.len(), |i| i + 1);
        let hops = secure_hops(s, node, uptime);
        p.hops.splice(at..at, hops);
        p.first_broken = p
            .hops
            .iter()
            .find(|h| h.state == super::HopState::Broken)
            .cloned();
    }
    r.first_broken = r.paths.iter().find_map(|p| p.first_broken.clone());
    r.ok = r.first_broken.is_none();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::HopState;
    use crate::status::SecurePeerStatus;

    fn status(last: Option<u64>, failures: u64) -> SecureStatus {
        SecureStatus {
            dev: "vxm-wg0".into(),
            device_ok: true,
            device_mtu: Some(1440),
            addr: "10.255.0.1/16".parse().unwrap(),
            port: 51820,
            public_key: Some("A".into()),
            listed_key: Some("A".into()),
            report_age_secs: Some(1),
            dropped_no_peer: Some(0),
            peers: vec![SecurePeerStatus {
                node: "host2".into(),
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                transport: "10.255.0.2".parse().unwrap(),
                has_key: true,
                last_handshake_secs: last,
                handshakes: u64::from(last.is_some()),
                tx_bytes: 0,
                rx_bytes: 0,
                decrypt_failures: failures,
                spoofed_inner: 0,
            }],
            rotation: None,
        }
    }

    fn handshake(s: &SecureStatus, uptime: u64) -> Hop {
        secure_hops(s, "host2", Some(Duration::from_secs(uptime)))
            .into_iter()
            .find(|h| h.hop == "handshake")
            .unwrap()
    }

    #[test]
    fn a_recent_handshake_is_healthy() {
        assert_eq!(handshake(&status(Some(5), 0), 100).state, HopState::Ok);
    }

    #[test]
    fn failures_without_a_session_are_a_key_mismatch() {
        let h = handshake(&status(None, 3), 5);
        assert_eq!(h.state, HopState::Broken);
        assert!(
            h.detail.starts_with("key mismatch with host2"),
            "{}",
            h.detail
        );
        // An expired session with failures too.
        let h = handshake(&status(Some(400), 3), 500);
        assert!(h.detail.starts_with("key mismatch"), "{}", h.detail);
    }

    #[test]
    fn no_handshake_after_the_grace_is_missing() {
        let h = handshake(&status(None, 0), 31);
        assert_eq!(h.state, HopState::Broken);
        assert!(h.detail.starts_with("missing handshake"), "{}", h.detail);
        assert!(h.fix.unwrap().contains("udp/51820"));
        assert_eq!(handshake(&status(None, 0), 10).state, HopState::Warn);
    }

    #[test]
    fn own_key_differing_from_the_listed_one_is_named() {
        let mut s = status(Some(1), 0);
        s.listed_key = Some("B".into());
        let hops = secure_hops(&s, "host2", Some(Duration::from_secs(60)));
        let own = hops.iter().find(|h| h.hop == "own_key").unwrap();
        assert_eq!(own.state, HopState::Broken);
        assert!(
            own.detail
                .contains("this node's key is A but the store lists B")
        );
    }

    #[test]
    fn no_agent_no_session() {
        let mut s = status(Some(1), 0);
        s.report_age_secs = Some(60);
        let h = handshake(&s, 100);
        assert_eq!(h.state, HopState::Broken);
        assert!(h.fix.unwrap().starts_with("start the agent"));
    }

    #[test]
    fn a_peer_without_key_gets_no_tunnel() {
        let mut s = status(None, 0);
        s.peers[0].has_key = false;
        let hops = secure_hops(&s, "host2", Some(Duration::from_secs(60)));
        assert_eq!(hops.last().unwrap().hop, "peer_key");
    }
}
