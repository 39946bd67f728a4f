//! Settling: records of another node that vanished from etcd are kept for a
//! short window. The view shows them meanwhile only while that node's
//! quarantine marker still names it (its lease expired or was revoked; a
//! node that leaves revokes its hold lease first, so it goes at once), so a
//! node that re-publishes within the window causes no churn on its peers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::view::Kv;

/// The longest a vanished node's records are kept (for TTLs above it).
pub const SETTLE_MAX: Duration = Duration::from_secs(2);

/// How long peers keep a node whose lease ended (expired or revoked) while
/// its quarantine marker lives, for a node lease of `ttl`: min(TTL,
/// [`SETTLE_MAX`]). A node that re-publishes meanwhile is never removed; one
/// that does not is removed this long after its records vanished.
pub fn settle_window(ttl: Duration) -> Duration {
    ttl.min(SETTLE_MAX)
}

/// Vanished keys (node records and endpoints of other nodes) with the time
/// they vanished, until their window ends or they come back.
#[derive(Debug, Default)]
pub(crate) struct Vanished {
    window: Duration,
    keys: BTreeMap<String, (Kv, Instant)>,
}

impl Vanished {
    pub fn new(window: Duration) -> Self {
        Vanished {
            window,
            keys: BTreeMap::new(),
        }
    }

    /// `key` (last value `kv`) vanished at `at`.
    pub fn vanished(&mut self, key: &str, kv: Kv, at: Instant) {
        if !self.window.is_zero() {
            self.keys.insert(key.to_string(), (kv, at));
        }
    }

    /// `key` is back (written again): nothing to keep.
    pub fn returned(&mut self, key: &str) {
        self.keys.remove(key);
    }

    /// Forget what vanished a whole window before `now`.
    pub fn prune(&mut self, now: Instant) {
        let w = self.window;
        self.keys.retain(|_, (_, at)| *at + w > now);
    }

    /// When the next kept key's window ends.
    pub fn deadline(&self) -> Option<Instant> {
        self.keys.values().map(|(_, at)| *at + self.window).min()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Kv)> {
        self.keys.iter().map(|(k, (kv, _))| (k.as_str(), kv))
    }
}

/// Does the quarantine marker `held` in `kvs` name `node`?
pub(crate) fn held_by(kvs: &BTreeMap<String, Kv>, held: &str, node: &str) -> bool {
    kvs.get(held).is_some_and(|kv| kv.value == node.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::{Mode, Network};
    use crate::model::NodeRecord;
    use crate::store::etcd::records::{self, Keys};
    use crate::store::etcd::view::View;

    const W: Duration = Duration::from_secs(2);

    fn net() -> Network {
        records::test_network("demo", Mode::Bridged, "10.1.0.0/24", 28, 100)
    }

    fn kv(v: &str, rev: i64) -> Kv {
        Kv {
            value: v.as_bytes().to_vec(),
            create_rev: rev,
            mod_rev: rev,
        }
    }

    fn node(name: &str, ip: &str, subnet: &str) -> String {
        format!(r#"{{"name":"{name}","underlay_ip":"{ip}","subnet":"{subnet}"}}"#)
    }

    fn endpoint(ip: &str, node: &str) -> String {
        format!(r#"{{"network":"demo","ip":"{ip}","mac":"02:42:0a:01:00:11","node":"{node}"}}"#)
    }

    const S2: &str = "10.1.0.32/28";
    const IP2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 33);

    /// A view of node "me" that sees h2 (record, claim, endpoint, markers).
    fn view(t0: Instant) -> (View, Keys) {
        let k = Keys::new("/vxmesh", "demo");
        let mut v = View::new(k.clone(), net());
        v.set_settle(W);
        v.set_own(NodeRecord {
            name: "me".into(),
            underlay_ip: Ipv4Addr::new(198, 18, 0, 1),
            underlay_dev: None,
            subnets: BTreeMap::from([("demo".to_string(), "10.1.0.16/28".parse().unwrap())]),
            public_key: None,
            next_public_key: None,
        });
        v.put(k.config(), kv(&records::network_json(&net()), 1));
        put_h2(&mut v, &k, 2);
        v.put(k.held_subnet(S2.parse().unwrap()), kv("h2", 2));
        v.put(k.held_endpoint(IP2), kv("h2", 2));
        assert!(v.rebuild_at(t0).0);
        assert!(has_h2(&v), "h2 is seen");
        (v, k)
    }

    fn put_h2(v: &mut View, k: &Keys, rev: i64) {
        v.put(k.subnet(S2.parse().unwrap()), kv("h2", rev));
        v.put(k.node("h2"), kv(&node("h2", "198.18.0.2", S2), rev));
        v.put(k.endpoint(IP2), kv(&endpoint("10.1.0.33", "h2"), rev));
    }

    /// h2's node lease ends: record, claim and endpoint go; markers stay.
    fn expire_h2(v: &mut View, k: &Keys, at: Instant) {
        v.delete_at(&k.subnet(S2.parse().unwrap()), at);
        v.delete_at(&k.node("h2"), at);
        v.delete_at(&k.endpoint(IP2), at);
    }

    fn has_h2(v: &View) -> bool {
        let s = v.snapshot();
        s.cluster.node("h2").is_some() && s.endpoints.as_ref().unwrap().iter().any(|e| e.ip == IP2)
    }

    #[test]
    fn a_lost_lease_is_kept_for_the_window_then_dropped() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        let t1 = t0 + Duration::from_secs(5);
        expire_h2(&mut v, &k, t1);
        let (changed, _) = v.rebuild_at(t1);
        assert!(!changed, "nothing changes while h2 settles");
        assert!(has_h2(&v));
        assert_eq!(v.settle_deadline(), Some(t1 + W));
        assert!(!v.rebuild_at(t1 + W - Duration::from_millis(1)).0);
        assert!(has_h2(&v));
        assert!(v.rebuild_at(t1 + W).0, "the window ended");
        assert!(v.snapshot().cluster.node("h2").is_none());
        assert!(v.snapshot().endpoints.as_ref().unwrap().is_empty());
        assert_eq!(v.settle_deadline(), None);
    }

    #[test]
    fn a_node_back_within_the_window_causes_no_change() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        let t1 = t0 + Duration::from_secs(5);
        expire_h2(&mut v, &k, t1);
        assert!(!v.rebuild_at(t1).0);
        // Re-published under a new lease: record first, endpoint later.
        let t2 = t1 + Duration::from_millis(800);
        v.put(k.subnet(S2.parse().unwrap()), kv("h2", 9));
        v.put(k.node("h2"), kv(&node("h2", "198.18.0.2", S2), 9));
        assert!(!v.rebuild_at(t2).0);
        assert!(has_h2(&v), "its endpoint is kept until re-published");
        v.put(k.endpoint(IP2), kv(&endpoint("10.1.0.33", "h2"), 10));
        assert!(!v.rebuild_at(t2).0);
        assert_eq!(v.settle_deadline(), None);
        assert!(!v.rebuild_at(t2 + W * 10).0, "nothing left to drop");
        assert!(has_h2(&v));
    }

    #[test]
    fn a_node_that_left_goes_at_once() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        // `leave`: the hold lease (markers) is revoked first, then the node lease.
        v.delete_at(&k.held_subnet(S2.parse().unwrap()), t0);
        v.delete_at(&k.held_endpoint(IP2), t0);
        expire_h2(&mut v, &k, t0);
        assert!(v.rebuild_at(t0).0);
        let s = v.snapshot();
        assert!(s.cluster.node("h2").is_none());
        assert!(s.endpoints.as_ref().unwrap().is_empty());
        // Also when both arrive in one rebuild in the other order.
        let (mut v, k) = view(t0);
        expire_h2(&mut v, &k, t0);
        v.delete_at(&k.held_subnet(S2.parse().unwrap()), t0);
        assert!(v.rebuild_at(t0).0);
        assert!(v.snapshot().cluster.node("h2").is_none());
    }

    #[test]
    fn a_marker_going_ends_the_settling() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        expire_h2(&mut v, &k, t0);
        assert!(!v.rebuild_at(t0).0);
        // `vxmesh leave h2` while it settles (or its hold lease ended).
        v.delete_at(&k.held_subnet(S2.parse().unwrap()), t0);
        assert!(v.rebuild_at(t0).0);
        assert!(v.snapshot().cluster.node("h2").is_none());
        assert!(v.snapshot().endpoints.as_ref().unwrap().is_empty());
    }

    #[test]
    fn a_new_owner_ends_the_settling_at_once() {
        let t0 = Instant::now();
        // Another node's endpoint on h2's address: the endpoint goes, h2 stays.
        let (mut v, k) = view(t0);
        expire_h2(&mut v, &k, t0);
        v.put(k.held_endpoint(IP2), kv("h3", 5));
        v.put(k.endpoint(IP2), kv(&endpoint("10.1.0.33", "h3"), 5));
        v.rebuild_at(t0);
        let s = v.snapshot();
        assert!(s.cluster.node("h2").is_some());
        let eps = s.endpoints.as_ref().unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].node, "h3");
        // Another node's claim of h2's subnet (a marker written by hand or
        // a rewound history): h2 goes, the new owner is accepted.
        let (mut v, k) = view(t0);
        expire_h2(&mut v, &k, t0);
        v.put(k.subnet(S2.parse().unwrap()), kv("h3", 6));
        v.put(k.node("h3"), kv(&node("h3", "198.18.0.3", S2), 6));
        v.rebuild_at(t0);
        let s = v.snapshot();
        assert!(s.cluster.node("h2").is_none(), "stale h2 kept: {s:?}");
        assert!(s.cluster.node("h3").is_some());
        // A node on h2's underlay IP: h2 goes.
        let (mut v, k) = view(t0);
        expire_h2(&mut v, &k, t0);
        v.put(
            k.node("h4"),
            kv(&node("h4", "198.18.0.2", "10.1.0.64/28"), 7),
        );
        v.rebuild_at(t0);
        assert!(v.snapshot().cluster.node("h2").is_none());
        assert!(v.snapshot().cluster.node("h4").is_some());
    }

    #[test]
    fn a_relist_missing_a_node_settles_it_too() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        let mut kvs = BTreeMap::new();
        kvs.insert(k.config(), kv(&records::network_json(&net()), 1));
        kvs.insert(k.held_subnet(S2.parse().unwrap()), kv("h2", 2));
        kvs.insert(k.held_endpoint(IP2), kv("h2", 2));
        v.reset_at(kvs, t0);
        assert!(!v.rebuild_at(t0).0);
        assert!(v.rebuild_at(t0 + W).0);
        assert!(v.snapshot().cluster.node("h2").is_none());
    }

    #[test]
    fn no_window_no_settling() {
        let t0 = Instant::now();
        let (mut v, k) = view(t0);
        v.set_settle(Duration::ZERO);
        expire_h2(&mut v, &k, t0);
        assert!(v.rebuild_at(t0).0);
        assert!(v.snapshot().cluster.node("h2").is_none());
        assert_eq!(
            settle_window(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(settle_window(Duration::from_secs(30)), SETTLE_MAX);
    }
}
