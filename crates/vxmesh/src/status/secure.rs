//! The secure underlay part of `status`: the TUN device as the kernel has
//! it, and the sessions as the agent's data path last reported them
//! (`STATE/secure.json`, rewritten every 2 s by the running agent; the data
//! path lives in the agent process, so that is the only honest source).

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::dataplane::kernel::LinkInfo;
use crate::secure::plan::SecurePlan;
use crate::secure::transport::TUN_ALIAS;
use crate::secure::underlay::{RotationReport, UnderlayReport};

/// A report older than this is not the running agent's.
pub const STALE_SECS: u64 = 10;

/// One peer of the secure underlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurePeerStatus {
    pub node: String,
    pub endpoint: SocketAddrV4,
    pub transport: Ipv4Addr,
    /// The store lists a public key for it (else: no tunnel).
    pub has_key: bool,
    /// Seconds since the last completed handshake (`None`: none yet, or no
    /// report).
    pub last_handshake_secs: Option<u64>,
    pub handshakes: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub decrypt_failures: u64,
    pub spoofed_inner: u64,
}

/// The node's secure underlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureStatus {
    pub dev: String,
    /// The device exists, is vxmesh's and is up.
    pub device_ok: bool,
    pub device_mtu: Option<u32>,
    pub addr: Ipv4Net,
    pub port: u16,
    /// This node's own public key (from the running data path).
    pub public_key: Option<String>,
    /// The key the store lists for this node.
    pub listed_key: Option<String>,
    /// Age of the data path's report (`None`: there is none).
    pub report_age_secs: Option<u64>,
    pub dropped_no_peer: Option<u64>,
    pub peers: Vec<SecurePeerStatus>,
    /// A key rotation under way (from the data path's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationReport>,
}

impl SecureStatus {
    /// The session data is the running agent's.
    pub fn live(&self) -> bool {
        self.report_age_secs.is_some_and(|a| a <= STALE_SECS)
    }

    /// The node's own key differs from the one the store lists.
    pub fn key_mismatch(&self) -> bool {
        matches!((&self.public_key, &self.listed_key), (Some(o), Some(l)) if o != l)
    }
}

/// The status of `plan`'s secure underlay, from the kernel's device and the
/// agent's report (`now_ms`: Unix time in milliseconds).
pub fn secure_status(
    plan: &SecurePlan,
    link: Option<&LinkInfo>,
    report: Option<&UnderlayReport>,
    now_ms: u64,
) -> SecureStatus {
    let peers = plan
        .peers
        .iter()
        .map(|(node, p)| {
            let r = report.and_then(|r| r.peers.iter().find(|x| &x.node == node));
            SecurePeerStatus {
                node: node.clone(),
                endpoint: p.endpoint,
                transport: p.transport,
                has_key: p.public_key.is_some(),
                last_handshake_secs: r
                    .and_then(|x| report?.handshake_age(x, now_ms))
                    .map(|d| d.as_secs()),
                handshakes: r.map_or(0, |x| x.handshakes),
                tx_bytes: r.map_or(0, |x| x.tx_bytes),
                rx_bytes: r.map_or(0, |x| x.rx_bytes),
                decrypt_failures: r.map_or(0, |x| x.decrypt_failures),
                spoofed_inner: r.map_or(0, |x| x.spoofed_inner),
            }
        })
        .collect();
    SecureStatus {
        dev: plan.dev.clone(),
        device_ok: link.is_some_and(|l| l.up && l.alias.as_deref() == Some(TUN_ALIAS)),
        device_mtu: link.map(|l| l.mtu),
        addr: plan.addr,
        port: plan.port,
        public_key: report.map(|r| r.public_key.to_string()),
        // The agent's last look at the store: a refused (mismatching)
        // listing never reaches the saved plan.
        listed_key: report
            .and_then(|r| r.listed_key)
            .or(plan.own_key)
            .map(|k| k.to_string()),
        report_age_secs: report.map(|r| r.age(now_ms).as_secs()),
        dropped_no_peer: report.map(|r| r.dropped_no_peer),
        peers,
        rotation: report.and_then(|r| r.rotation.clone()),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The status lines of the secure underlay.
pub fn render(s: &SecureStatus) -> Vec<String> {
    let mut out = vec![format!(
        "secure underlay: device {} {} mtu {}, transport {} port udp/{}, key {}{}",
        s.dev,
        if s.device_ok { "up" } else { "ABSENT/DOWN" },
        s.device_mtu.map_or("-".into(), |m| m.to_string()),
        s.addr,
        s.port,
        s.public_key.as_deref().unwrap_or("-"),
        if s.key_mismatch() {
            format!(
                " (KEY MISMATCH: the store lists {})",
                s.listed_key.as_deref().unwrap_or("-")
            )
        } else {
            String::new()
        }
    )];
    out.push(match s.report_age_secs {
        None => "  no data path report (agent not running, or not started yet)".into(),
        Some(a) if a > STALE_SECS => format!(
            "  data path report is {a} s old (the agent is not running): sessions as of then"
        ),
        Some(_) => format!(
            "  data path: {} packet(s) dropped for want of a peer",
            s.dropped_no_peer.unwrap_or(0)
        ),
    });
    if let Some(r) = &s.rotation {
        out.push(match &r.switch {
            None => format!(
                "  key rotation: next key {} is not listed by the store yet (cluster file: list it as this node's next_public_key)",
                r.next_key
            ),
            Some(w) => format!(
                "  key rotation: switching to {} for {} s, {} of {} peer(s) on it",
                r.next_key,
                w.since_ms / 1000,
                w.switched,
                w.peers
            ),
        });
    }
    for p in &s.peers {
        if !p.has_key {
            out.push(format!(
                "  peer {} endpoint {} transport {}: NO KEY listed (no tunnel)",
                p.node, p.endpoint, p.transport
            ));
            continue;
        }
        out.push(format!(
            "  peer {} endpoint {} transport {}: handshake {}, tx {} rx {}, decrypt failures {}{}",
            p.node,
            p.endpoint,
            p.transport,
            p.last_handshake_secs
                .map_or("NONE".into(), |a| format!("{a} s ago")),
            bytes(p.tx_bytes),
            bytes(p.rx_bytes),
            p.decrypt_failures,
            if p.spoofed_inner > 0 {
                format!(", spoofed inner sources {}", p.spoofed_inner)
            } else {
                String::new()
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::secure::keys::PrivateKey;
    use crate::secure::plan::PlannedPeer;
    use crate::secure::underlay::PeerReport;

    fn plan(own: crate::secure::PublicKey, peer_key: bool) -> SecurePlan {
        let mut peers = BTreeMap::new();
        peers.insert(
            "host2".to_string(),
            PlannedPeer {
                public_key: peer_key.then_some(own),
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                transport: "10.255.0.2".parse().unwrap(),
                next_public_key: None,
            },
        );
        SecurePlan {
            dev: "vxm-wg0".into(),
            addr: "10.255.0.1/16".parse().unwrap(),
            mtu: 1440,
            port: 51820,
            own_key: Some(own),
            own_next_key: None,
            peers,
        }
    }

    fn report(own: crate::secure::PublicKey) -> UnderlayReport {
        UnderlayReport {
            at_ms: 100_000,
            started_ms: 50_000,
            dev: "vxm-wg0".into(),
            addr: "10.255.0.1/16".parse().unwrap(),
            port: 51820,
            public_key: own,
            listed_key: Some(own),
            dropped_no_peer: 2,
            peers: vec![PeerReport {
                node: "host2".into(),
                endpoint: "198.18.0.2:51820".parse().unwrap(),
                transport: "10.255.0.2".parse().unwrap(),
                since_handshake_ms: Some(4_000),
                handshakes: 1,
                tx_bytes: 2048,
                rx_bytes: 100,
                decrypt_failures: 1,
                spoofed_inner: 0,
            }],
            without_key: vec![],
            rotation: None,
        }
    }

    #[test]
    fn sessions_are_aged_by_the_report_and_rendered() {
        let own = PrivateKey::generate().unwrap().public();
        let s = secure_status(&plan(own, true), None, Some(&report(own)), 103_000);
        assert!(!s.device_ok, "no device given");
        assert!(s.live() && !s.key_mismatch());
        assert_eq!(s.peers[0].last_handshake_secs, Some(7));
        let text = render(&s).join("\n");
        assert!(text.contains("device vxm-wg0 ABSENT/DOWN"), "{text}");
        assert!(
            text.contains("2 packet(s) dropped for want of a peer"),
            "{text}"
        );
        assert!(
            text.contains("peer host2 endpoint 198.18.0.2:51820 transport 10.255.0.2: handshake 7 s ago, tx 2.0 KiB rx 100 B, decrypt failures 1"),
            "{text}"
        );
    }

    #[test]
    fn a_stale_report_a_mismatch_and_a_peer_without_key_are_shown() {
        let own = PrivateKey::generate().unwrap().public();
        let other = PrivateKey::generate().unwrap().public();
        let mut r = report(own);
        r.public_key = other;
        let s = secure_status(&plan(own, false), None, Some(&r), 200_000);
        assert!(!s.live() && s.key_mismatch());
        let text = render(&s).join("\n");
        assert!(text.contains("KEY MISMATCH"), "{text}");
        assert!(
            text.contains("100 s old (the agent is not running)"),
            "{text}"
        );
        assert!(text.contains("NO KEY listed (no tunnel)"), "{text}");
        let none = secure_status(&plan(own, true), None, None, 0);
        assert!(render(&none).join("\n").contains("no data path report"));
        assert_eq!(none.peers[0].last_handshake_secs, None);
    }

    #[test]
    fn a_rotation_under_way_is_shown() {
        let own = PrivateKey::generate().unwrap().public();
        let next = PrivateKey::generate().unwrap().public();
        let mut r = report(own);
        let text = |r: &UnderlayReport| {
            render(&secure_status(&plan(own, true), None, Some(r), 103_000)).join("\n")
        };
        assert!(!text(&r).contains("key rotation"), "{}", text(&r));
        r.rotation = Some(RotationReport {
            next_key: next,
            switch: None,
        });
        assert!(
            text(&r).contains(&format!(
                "key rotation: next key {next} is not listed by the store yet"
            )),
            "{}",
            text(&r)
        );
        r.rotation = Some(RotationReport {
            next_key: next,
            switch: Some(crate::secure::underlay::SwitchReport {
                since_ms: 3_400,
                peers: 3,
                switched: 2,
            }),
        });
        assert!(
            text(&r).contains(&format!(
                "key rotation: switching to {next} for 3 s, 2 of 3 peer(s) on it"
            )),
            "{}",
            text(&r)
        );
    }
}
