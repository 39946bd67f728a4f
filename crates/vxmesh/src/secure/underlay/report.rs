//! What the running secure underlay reports to `status`, `doctor` and the
//! metrics. The data path lives in the agent process, so the agent writes
//! this report to `STATE/secure.json` after every pass and every few
//! seconds ([`REPORT_EVERY`]); readers see how old it is.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::SecureUnderlay;
use crate::secure::keys::{self, PublicKey};
use crate::secure::plan::SecurePlan;
use crate::state::StateError;

/// File name of the report in the state dir.
pub const REPORT_FILE: &str = "secure.json";

/// How often the agent rewrites the report between passes.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// One peer's session as the data path sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    /// Its underlay address and WireGuard port.
    pub endpoint: SocketAddrV4,
    pub transport: Ipv4Addr,
    /// Milliseconds since the last completed handshake, when the report
    /// was written (`None`: no handshake yet).
    pub since_handshake_ms: Option<u64>,
    pub handshakes: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub decrypt_failures: u64,
    pub spoofed_inner: u64,
}

/// A key rotation under way on this node (`vxmesh rotate-key`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationReport {
    /// The next key, as `rotate-key` printed it.
    pub next_key: PublicKey,
    /// The switch to it: `None` while the store does not list it yet
    /// (cluster file: as the node's `next_public_key`).
    pub switch: Option<SwitchReport>,
}

/// How far a switch to the next key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReport {
    /// Milliseconds since it began, when the report was written.
    pub since_ms: u64,
    /// Peers with a tunnel on the next key.
    pub peers: usize,
    /// Of those, the ones that send on it.
    pub switched: usize,
}

/// The running secure underlay of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayReport {
    /// Unix time (milliseconds) the report was taken.
    pub at_ms: u64,
    /// Unix time (milliseconds) the data path started.
    pub started_ms: u64,
    pub dev: String,
    pub addr: Ipv4Net,
    pub port: u16,
    /// This node's own public key (the data path's).
    pub public_key: PublicKey,
    /// The key the store lists for this node.
    pub listed_key: Option<PublicKey>,
    /// Packets dropped for want of a peer (no key, unknown address).
    pub dropped_no_peer: u64,
    /// Peers with a tunnel.
    pub peers: Vec<PeerReport>,
    /// Planned peers the store lists no key for (no tunnel).
    pub without_key: Vec<String>,
    /// A key rotation under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationReport>,
}

impl UnderlayReport {
    /// Seconds since the last handshake with `peer`, as of `now_ms`.
    pub fn handshake_age(&self, peer: &PeerReport, now_ms: u64) -> Option<Duration> {
        peer.since_handshake_ms
            .map(|s| Duration::from_millis(s + now_ms.saturating_sub(self.at_ms)))
    }

    /// How old the report is at `now_ms`.
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.at_ms))
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SecureUnderlay {
    /// The report of the running data path for `plan` (`None` while
    /// stopped).
    pub fn report(&self, plan: &SecurePlan) -> Option<UnderlayReport> {
        let r = self.running.as_ref()?;
        // The next key file of a rotation under way (a stale one holding
        // the current key is not a rotation).
        let next = keys::read_next(&self.state_dir)
            .ok()
            .flatten()
            .map(|k| k.public())
            .filter(|n| *n != r.current.public());
        let table = r.datapath.table().read().expect("peer table lock");
        let rotation = next.map(|next_key| RotationReport {
            next_key,
            switch: r
                .switch_started
                .zip(table.switch_progress())
                .map(|(t, p)| SwitchReport {
                    since_ms: t.elapsed().as_millis() as u64,
                    peers: p.peers,
                    switched: p.switched,
                }),
        });
        let peers = table
            .stats()
            .into_iter()
            .map(|s| PeerReport {
                node: s.node,
                endpoint: s.endpoint,
                transport: s.transport,
                since_handshake_ms: s.since_handshake.map(|d| d.as_millis() as u64),
                handshakes: s.handshakes,
                tx_bytes: s.tx_bytes,
                rx_bytes: s.rx_bytes,
                decrypt_failures: s.decrypt_failures,
                spoofed_inner: s.spoofed_inner,
            })
            .collect();
        Some(UnderlayReport {
            at_ms: now_ms(),
            started_ms: r.started_ms,
            dev: r.dev.clone(),
            addr: plan.addr,
            port: r.port,
            public_key: table.public_key(),
            listed_key: self.listed_seen.or(plan.own_key),
            dropped_no_peer: table
                .dropped_no_peer
                .load(std::sync::atomic::Ordering::Relaxed),
            peers,
            without_key: plan
                .peers
                .iter()
                .filter(|(_, p)| p.public_key.is_none())
                .map(|(n, _)| n.clone())
                .collect(),
            rotation,
        })
    }
}

/// Write `report` to `STATE/secure.json`, or remove the file (`None`: no
/// secure underlay runs).
pub fn write_report(state_dir: &Path, report: Option<&UnderlayReport>) -> Result<(), StateError> {
    let path = state_dir.join(REPORT_FILE);
    match report {
        Some(r) => {
            let json = serde_json::to_vec_pretty(r).map_err(|json| StateError::Serialise {
                what: "the secure underlay report".into(),
                json,
            })?;
            crate::state::write_atomic(&path, &json)
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                tracing::debug!("remove {}: {e}", path.display());
                Ok(())
            }
        },
    }
}

/// Read `STATE/secure.json` (`None`: absent or unreadable).
pub fn read_report(state_dir: &Path) -> Option<UnderlayReport> {
    let data = std::fs::read(state_dir.join(REPORT_FILE)).ok()?;
    serde_json::from_slice(&data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_age_grows_with_the_report_age() {
        let key = crate::secure::keys::PrivateKey::generate()
            .unwrap()
            .public();
        let r = UnderlayReport {
            at_ms: 10_000,
            started_ms: 1_000,
            dev: "vxm-wg0".into(),
            addr: "10.255.0.1/16".parse().unwrap(),
            port: 51820,
            public_key: key,
            listed_key: Some(key),
            dropped_no_peer: 0,
            peers: vec![],
            without_key: vec![],
            rotation: None,
        };
        let p = PeerReport {
            node: "host2".into(),
            endpoint: "198.18.0.2:51820".parse().unwrap(),
            transport: "10.255.0.2".parse().unwrap(),
            since_handshake_ms: Some(1_500),
            handshakes: 1,
            tx_bytes: 0,
            rx_bytes: 0,
            decrypt_failures: 0,
            spoofed_inner: 0,
        };
        assert_eq!(
            r.handshake_age(&p, 12_000),
            Some(Duration::from_millis(3_500))
        );
        assert_eq!(r.age(9_000), Duration::ZERO);
        let none = PeerReport {
            since_handshake_ms: None,
            ..p
        };
        assert_eq!(r.handshake_age(&none, 12_000), None);
    }
}
